"""SDXL base and refiner end to end against diffusers' StableDiffusionXL(Img2Img)Pipeline.

The tiny architectures differ where SDXL's do: two encoders of different widths, a projection
narrower than the encoder, non-uniform transformer depth, a refiner conditioned on the second
encoder only with an aesthetic score, a VAE with latent statistics; sizes are non-square.
"""

import dataclasses
import os
import subprocess
import sys
from unittest import mock

import diffusers
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from parity import assert_close, img2img_draws, nchw, nhwc, randn, rel_err

import sdjax
from sdjax import sampling, schedulers, testing
from sdjax.conditioning import MicroConditioning
from sdjax.schedulers import euler, sigma_schedules

torch.set_num_threads(1)

PROMPTS = ["a red circle in the center", "a photo of a cat"]
NEGATIVES = ["blue", ""]
H, W = 16, 24  # latents 8 x 12
GUIDANCE = 3.0
MICRO = dict(original_size=(40, 32), crops_coords_top_left=(4, 8), target_size=(24, 16))
GENERATE_TOL = 1e-4
DIFFUSERS_SCHEDULERS = {
    "euler": ("EulerDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    # Playground v2.5's: EDM preconditioning, with this VAE's latents_mean / latents_std
    "edm_dpmpp_2m": ("EDMDPMSolverMultistepScheduler", {}),
}


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
  folder = str(tmp_path_factory.mktemp("sdxl") / "pipes")
  ref_base, ref_refiner = testing.write_torch_sdxl(folder, seed=31)
  base = sdjax.load_pipeline(os.path.join(folder, "base"))
  refiner = sdjax.load_pipeline(os.path.join(folder, "refiner"))
  return ref_base, ref_refiner, base, refiner, folder


def _set_scheduler(ref, name, config):
  cls, overrides = DIFFUSERS_SCHEDULERS[name]
  if cls.startswith("EDM"):  # diffusers' EDM fails on Euler's sigma_min: None (sdjax: default)
    config = {k: v for k, v in config.items() if v is not None}
  ref.scheduler = getattr(diffusers, cls).from_config(config, **overrides)


def test_loads_base_and_refiner(pipes):
  _, _, base, refiner, _ = pipes
  assert base.is_sdxl and base.text_encoder is not None and base.force_zeros_for_empty_prompt
  assert refiner.is_sdxl and refiner.text_encoder is None and refiner.tokenizer is None
  assert refiner.requires_aesthetics_score and not refiner.force_zeros_for_empty_prompt
  assert base.vae.config.latents_mean is not None


@pytest.mark.parametrize("case", ["negatives", "zeros", "prompts_2_clip_skip"])
def test_encode_prompt_matches_diffusers(pipes, case):
  ref, _, pipe, _, _ = pipes
  kwargs = {
      "negatives": dict(negative_prompt=NEGATIVES),
      "zeros": {},  # no negative prompt: force_zeros_for_empty_prompt
      "prompts_2_clip_skip": dict(prompt_2=["a dog", "green tree"], negative_prompt=NEGATIVES,
                                  negative_prompt_2=["square", "sky"], clip_skip=1),
  }[case]
  with torch.no_grad():
    expected = ref.encode_prompt(PROMPTS, device="cpu", **kwargs)
  ours = pipe.encode_prompt(PROMPTS, kwargs.get("negative_prompt"), kwargs.get("prompt_2"),
                            kwargs.get("negative_prompt_2"), kwargs.get("clip_skip"))
  assert ours[0].shape == (2, 77, 64) and ours[2].shape == (2, 20)
  for a, b in zip(ours, expected, strict=True):
    if case == "zeros" and not b.abs().sum():
      assert not np.asarray(a).any()
      continue
    err = assert_close(a, b.numpy())
    print(f"\nencode_prompt {case}: {err:.2e}")


def test_refiner_encode_prompt_matches_diffusers(pipes):
  _, ref, _, pipe, _ = pipes
  with torch.no_grad():
    expected = ref.encode_prompt(PROMPTS, device="cpu", negative_prompt=NEGATIVES)
  ours = pipe.encode_prompt(PROMPTS, NEGATIVES)
  assert ours[0].shape == (2, 77, 40)
  for a, b in zip(ours, expected, strict=True):
    assert_close(a, b.numpy())


def test_predict_noise_matches_diffusers(pipes):
  ref, _, pipe, _, _ = pipes
  x, ctx, pooled = randn(2, 8, 12, 4), randn(2, 77, 64, seed=1), randn(2, 20, seed=2)
  time_ids = np.array([[40, 32, 4, 8, 24, 16], [16, 24, 0, 0, 16, 24]], np.float32)
  t = np.array([10.0, 700.0], np.float32)
  with torch.no_grad():
    expected = ref.unet(nchw(x), torch.from_numpy(t), torch.from_numpy(ctx), added_cond_kwargs={
        "text_embeds": torch.from_numpy(pooled), "time_ids": torch.from_numpy(time_ids)}).sample
  err = assert_close(pipe.predict_noise(x, t, ctx, pooled, time_ids), nhwc(expected))
  print(f"\npredict_noise: {err:.2e}")
  with pytest.raises(ValueError, match="needs text_embeds and time_ids"):
    pipe.predict_noise(x, t, ctx)


@pytest.mark.parametrize("name", ["euler", "dpmpp_2m_karras", "ddim", "edm_dpmpp_2m"])
def test_generate_matches_diffusers(pipes, name):
  ref, _, pipe, _, _ = pipes
  _set_scheduler(ref, name, pipe.scheduler_config)
  prompts, prompts_2, negatives, extra = PROMPTS, ["a dog", "sky"], NEGATIVES, {}
  if name == "euler":
    negatives = None  # zeroed negative conditioning (force_zeros_for_empty_prompt)
  if name == "ddim":
    # Negative micro-conditioning. diffusers' text-to-image pipeline pairs the time ids with
    # the wrong rows for batches of more than one ([neg, pos] repeated per image, while the
    # UNet batch is [negatives..., positives...]); sdjax gives every image its own ids, which
    # equals diffusers at batch 1.
    prompts, prompts_2, negatives = PROMPTS[:1], prompts_2[:1], NEGATIVES[:1]
    extra = dict(negative_original_size=(24, 24), negative_target_size=(8, 16),
                 negative_crops_coords_top_left=(0, 8))
  latents = randn(len(prompts), 8, 12, 4, seed=3)
  with torch.no_grad():
    expected = ref(prompts, prompt_2=prompts_2, negative_prompt=negatives, height=H,
                   width=W, num_inference_steps=5, guidance_scale=GUIDANCE,
                   latents=nchw(latents), output_type="np", **MICRO, **extra).images
  ours = pipe.generate(prompts, prompts_2=prompts_2, negative_prompts=negatives,
                       height=H, width=W, steps=5, guidance_scale=GUIDANCE, scheduler=name,
                       latents=latents, **MICRO, **extra)
  assert ours.shape == (len(prompts), H, W, 3)
  err = rel_err(ours, expected)
  print(f"\ngenerate {name}: {err:.2e}")
  assert err <= GENERATE_TOL
  if name == "euler":  # Align Your Steps takes SDXL's levels here (the same compiled program)
    sigmas = schedulers.get_scheduler("euler", pipe.scheduler_config, options={
      "schedule_type": "align_your_steps_sdxl"}).set_timesteps(5).sigmas
    with torch.no_grad():
      expected = ref(prompts, prompt_2=prompts_2, negative_prompt=negatives, height=H, width=W,
                     sigmas=np.asarray(sigmas).tolist(), guidance_scale=GUIDANCE,
                     latents=nchw(latents), output_type="np", **MICRO).images
    ours = pipe.generate(prompts, prompts_2=prompts_2, negative_prompts=negatives, height=H,
                         width=W, steps=5, guidance_scale=GUIDANCE, scheduler=name,
                         schedule_type="align_your_steps", latents=latents, **MICRO)
    err = rel_err(ours, expected)
    print(f"generate {name} Align Your Steps: {err:.2e}")
    assert err <= GENERATE_TOL


def test_refiner_img2img_matches_diffusers(pipes):
  _, ref, _, pipe, _ = pipes
  _set_scheduler(ref, "euler", pipe.scheduler_config)
  images = np.random.default_rng(3).uniform(size=(2, H, W, 3)).astype(np.float32)
  noise, seed = randn(2, 8, 12, 4, seed=4), 17
  module = "diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl_img2img"
  with img2img_draws(module, seed, (8, 12, 4), noise):
    expected = ref(PROMPTS, image=images, strength=0.3, num_inference_steps=10,
                   guidance_scale=GUIDANCE, negative_prompt=NEGATIVES, aesthetic_score=7.0,
                   negative_aesthetic_score=2.0, original_size=(32, 32),
                   output_type="np").images
  ours = pipe.generate(PROMPTS, init_images=images, strength=0.3, steps=10, seed=seed,
                       guidance_scale=GUIDANCE, negative_prompts=NEGATIVES, aesthetic_score=7.0,
                       negative_aesthetic_score=2.0, original_size=(32, 32), scheduler="euler",
                       latents=noise)
  err = rel_err(ours, expected)
  print(f"\nrefiner img2img: {err:.2e}")
  assert err <= GENERATE_TOL


def test_img2img_handoff_matches_diffusers(pipes):
  """An img2img run handed to the refiner: diffusers' img2img pipeline of the base (strength,
  denoising_end) to latents, then the refiner's from them (denoising_start); masks are
  refused."""
  ref_base, ref_refiner, base, refiner, _ = pipes
  _set_scheduler(ref_base, "euler", base.scheduler_config)
  _set_scheduler(ref_refiner, "euler", refiner.scheduler_config)
  img_pipe = diffusers.StableDiffusionXLImg2ImgPipeline(**ref_base.components)
  img_pipe.set_progress_bar_config(disable=True)
  images = np.random.default_rng(9).uniform(size=(2, H, W, 3)).astype(np.float32)
  noise, seed = randn(2, 8, 12, 4, seed=10), 23
  common = dict(num_inference_steps=8, guidance_scale=GUIDANCE, negative_prompt=NEGATIVES)
  module = "diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl_img2img"
  with img2img_draws(module, seed, (8, 12, 4), noise):
    handed = img_pipe(PROMPTS, image=images, strength=0.7, denoising_end=0.75,
                      output_type="latent", **common).images
    expected = ref_refiner(PROMPTS, image=handed, denoising_start=0.75, output_type="np",
                           **common).images
  kw = dict(init_images=images, strength=0.7, steps=8, seed=seed, latents=noise,
            guidance_scale=GUIDANCE, negative_prompts=NEGATIVES, scheduler="euler")
  ours = base.generate(PROMPTS, refiner=refiner, refiner_start=0.75, **kw)
  err = rel_err(ours, expected)
  print(f"\nimg2img handoff: {err:.2e}")
  assert err <= GENERATE_TOL
  assert rel_err(base.generate(PROMPTS, **kw), expected) > 1e-3  # the refiner's steps matter
  with pytest.raises(ValueError, match="^a refiner finishes an inpainting run .a mask. as "
                                       "A1111.s does"):
    base.generate(PROMPTS, refiner=refiner, mask_images=np.ones((2, H, W), np.float32), **kw)


def test_a1111_switch_runs_on_the_runs_own_schedule(pipes):
  """With A1111's switch the refiner runs on over the run's own schedule: a base that is its own
  refiner makes the image of the base alone (ComfyUI's img2img form, int(steps / strength) steps
  placed, and A1111's own DDIM img2img, whose refiner once placed `steps`: another image). An
  img2img run or hires pass starting past the switch is the refiner's from its first call, as
  A1111 switches (diffusers' handoff leaves the base no step there: refused)."""
  _, _, base, refiner, _ = pipes
  images = np.random.default_rng(3).uniform(size=(1, H, W, 3)).astype(np.float32)
  kw = dict(steps=6, guidance_scale=GUIDANCE, height=H, width=W, seed=1)
  switch = dict(refiner=base, refiner_start=0.8, refiner_switch="a1111")
  for run in (dict(init_images=images, strength=0.5, scheduler="dpmpp_2m",
                   scheduler_options={"k_diffusion": True, "comfyui": True}),
              dict(init_images=images, strength=0.5, scheduler="ddim",
                   scheduler_options={"a1111": True}),
              dict(hires_scale=1.5, hires_strength=0.15, scheduler="euler")):
    alone = base.generate(["a cat"], **run, **kw)
    both = base.generate(["a cat"], **run, **switch, **kw)
    np.testing.assert_allclose(both, alone, rtol=0, atol=1e-6, err_msg=str(run))
  # ... and with the refiner (the same VAE here) the refiner's own img2img image.
  late = dict(init_images=images, strength=0.1, scheduler="dpmpp_2m", **{**kw, "steps": 10})
  refined = base.generate(["a cat"], **late, **{**switch, "refiner": refiner})
  np.testing.assert_allclose(refined, refiner.generate(["a cat"], **late), rtol=0, atol=1e-5)
  with pytest.raises(ValueError, match="^strength 0.1 starts the run past refiner_start 0.8: "
                                       "the base would make no step of it"):
    base.generate(["a cat"], **late, **{**switch, "refiner_switch": "diffusers"})


def test_a1111_switch_inpaints_on(pipes):
  """An inpainting run handed to the refiner as A1111's does (its switch and its blend): the
  refiner's sampler runs on, blending the image's latents the base encoded into each call, the
  final blend after its last step only. A base that is its own refiner makes the base's
  inpainted image (the generators' draws running on: torch's CPU generators here); a run
  starting past the switch is the refiner's own inpainting run (the same VAE here). Not with
  diffusers' switch or blend (a one-line error)."""
  _, _, base, refiner, _ = pipes
  rng = np.random.default_rng(4)
  images = rng.uniform(size=(2, H, W, 3)).astype(np.float32)
  masks = np.round(rng.uniform(size=(2, H, W, 1)) * 255) / 255
  kw = dict(negative_prompts=NEGATIVES, init_images=images, mask_images=masks, steps=6,
            guidance_scale=GUIDANCE, height=H, width=W, seed=1, inpaint_blend="a1111",
            rng="torch_cpu")
  switch = dict(refiner=base, refiner_start=0.6, refiner_switch="a1111")
  for run in (dict(strength=0.9, scheduler="euler_ancestral",
                   scheduler_options={"k_diffusion": True}),
              dict(strength=0.7, scheduler="ddim", scheduler_options={"a1111": True})):
    alone = base.generate(PROMPTS, **run, **kw)
    both = base.generate(PROMPTS, **run, **switch, **kw)
    np.testing.assert_allclose(both, alone, rtol=0, atol=1e-6, err_msg=str(run))
    plain = base.generate(PROMPTS, **run, **{**kw, "inpaint_blend": "diffusers"})
    assert rel_err(alone, plain) > 1e-3  # the blend shows
  late = dict(strength=0.2, scheduler="dpmpp_2m", **kw)
  refined = base.generate(PROMPTS, **late, **{**switch, "refiner": refiner})
  np.testing.assert_allclose(refined, refiner.generate(PROMPTS, **late), rtol=0, atol=1e-5)
  for wrong in ({"refiner_switch": "diffusers"}, {"inpaint_blend": "diffusers"}):
    with pytest.raises(ValueError, match="^a refiner finishes an inpainting run .a mask. as "
                                         "A1111's does: with refiner_switch 'a1111' and "
                                         "inpaint_blend 'a1111'$"):
      base.generate(PROMPTS, **{**late, **switch, **wrong})


@pytest.mark.parametrize("name", ["euler", "heun"])
def test_base_to_refiner_handoff_matches_diffusers(pipes, name):
  """base(denoising_end=0.8, output_type="latent") then refiner(denoising_start=0.8)."""
  ref_base, ref_refiner, base, refiner, _ = pipes
  _set_scheduler(ref_base, name, base.scheduler_config)
  _set_scheduler(ref_refiner, name, refiner.scheduler_config)
  latents = randn(2, 8, 12, 4, seed=5)
  common = dict(num_inference_steps=6, guidance_scale=GUIDANCE, height=H, width=W)
  with torch.no_grad():
    handed = ref_base(PROMPTS, negative_prompt=NEGATIVES, latents=nchw(latents),
                      denoising_end=0.8, output_type="latent", **common).images
    expected = ref_refiner(PROMPTS, negative_prompt=NEGATIVES, image=handed,
                           denoising_start=0.8, output_type="np",
                           **{k: v for k, v in common.items() if k in (
                               "num_inference_steps", "guidance_scale")}).images
  ours = base.generate(PROMPTS, negative_prompts=NEGATIVES, steps=6, guidance_scale=GUIDANCE,
                       height=H, width=W, scheduler=name, latents=latents, refiner=refiner,
                       refiner_start=0.8)
  err = rel_err(ours, expected)
  print(f"\nhandoff {name}: {err:.2e}")
  assert err <= GENERATE_TOL
  # refiner_start as a number of steps (ComfyUI's KSamplerAdvanced pair): the steps diffusers'
  # cutoff leaves the base make the same handoff (Heun's base stops between a step's two calls
  # there: no number of steps does); one step more, another
  spec, state = sampling.prepare(base, 2, steps=6, scheduler=name, height=H, width=W,
                                 guidance_scale=GUIDANCE, denoising_end=0.8)
  k = [k for k in range(1, 6) if spec.scheduler.step_position(state, k) == spec.end]
  assert len(k) == (name != "heun")
  kw = dict(negative_prompts=NEGATIVES, steps=6, guidance_scale=GUIDANCE, height=H, width=W,
            scheduler=name, latents=latents, refiner=refiner)
  if k:
    np.testing.assert_array_equal(base.generate(PROMPTS, refiner_start=k[0], **kw), ours)
  later = base.generate(PROMPTS, refiner_start=5, **kw)
  assert rel_err(later, ours) > 10 * GENERATE_TOL
  with pytest.raises(ValueError, match=r"refiner_start as a number of steps must be in \[1, "):
    base.generate(PROMPTS, refiner_start=6, **kw)


def test_a1111_refiner_switch_runs_the_sampler_on(pipes):
  """refiner_switch="a1111": A1111 switches models inside its sampler loop, so a "refiner" that
  is the base model itself makes the base's own image (to the rounding of two programs): DPM++
  SDE's state between a step's two calls (the switch falls between them here) and its Brownian
  tree run on (a second stage that restarts the sampler fails this)."""
  _, _, base, _, _ = pipes
  kw = dict(negative_prompts=NEGATIVES[:1], steps=6, guidance_scale=GUIDANCE, height=H, width=W,
            scheduler="dpmpp_sde_karras", seed=3, brownian="torch_cpu")
  spec, state = sampling.prepare(base, 1, steps=6, scheduler="dpmpp_sde_karras", height=H,
                                 width=W, guidance_scale=GUIDANCE, denoising_end=0.7,
                                 handoff="a1111")
  assert not spec.scheduler.starts_step(state, spec.end)  # between a step's calls
  plain = base.generate(PROMPTS[:1], **kw)
  ours = base.generate(PROMPTS[:1], refiner=base, refiner_start=0.7, refiner_switch="a1111",
                       **kw)
  np.testing.assert_allclose(ours, plain, atol=1e-6)
  with pytest.raises(ValueError, match="unknown refiner switch 'comfyui'"):
    base.generate(PROMPTS[:1], refiner=base, refiner_switch="comfyui", **kw)
  # An EDM scheduler's config has no beta schedule: A1111's model sigmas are the checkpoint's
  # (it raised a KeyError); a model without one either is refused in a line.
  common = dict(steps=6, height=H, width=W, guidance_scale=GUIDANCE, denoising_end=0.5,
                handoff="a1111")
  edm = sampling.prepare(base, 1, scheduler="edm_euler", **common)[1]
  model_sigmas = euler.train_sigmas(sigma_schedules.form_alphas_cumprod(
      base.scheduler_config, "a1111"))
  nearest = np.abs(model_sigmas[None] - np.asarray(edm.sigmas)[:-1, None]).argmin(axis=1)
  switched = np.flatnonzero((999 - nearest.astype(np.float32)) / 1000 >= np.float32(0.5))
  spec = sampling.prepare(base, 1, scheduler="edm_euler", **common)[0]
  assert spec.end == switched[0] and 0 < spec.end < 6
  no_betas = dataclasses.replace(base, scheduler_config={
      k: v for k, v in base.scheduler_config.items() if not k.startswith("beta")})
  with pytest.raises(ValueError, match="use refiner_switch 'diffusers'"):
    sampling.prepare(no_betas, 1, scheduler="edm_euler", **common)
  # diffusers' cutoff over EDM's timesteps (c_noise, not 0..999) keeps no base step: said so.
  with pytest.raises(ValueError, match="refiner_start 0.5 with 6 steps of scheduler 'edm_euler' "
                                       "leaves no denoising step"):
    sampling.prepare(base, 1, scheduler="edm_euler", **{**common, "handoff": "diffusers"})


def test_torch_generators_through_the_refiner_match_diffusers(pipes):
  """rng="torch_cpu": diffusers' base and refiner given the same per-image CPU generators: the
  refiner's step noise follows the base's draws (KDPM2 a: a draw every other UNet call, the
  base stopping mid-step). Nothing is passed in but the seeds."""
  ref_base, ref_refiner, base, refiner, _ = pipes
  for ref, pipe in ((ref_base, base), (ref_refiner, refiner)):
    ref.scheduler = diffusers.KDPM2AncestralDiscreteScheduler.from_config(pipe.scheduler_config)
  generators = [torch.Generator().manual_seed(3 + i) for i in range(2)]
  common = dict(negative_prompt=NEGATIVES, generator=generators, num_inference_steps=6,
                guidance_scale=GUIDANCE)
  with torch.no_grad():
    handed = ref_base(PROMPTS, height=H, width=W, denoising_end=0.8, output_type="latent",
                      **common).images
    expected = ref_refiner(PROMPTS, image=handed, denoising_start=0.8, output_type="np",
                           **common).images
  ours = base.generate(PROMPTS, negative_prompts=NEGATIVES, steps=6, guidance_scale=GUIDANCE,
                       height=H, width=W, scheduler="kdpm2_ancestral", seed=3, rng="torch_cpu",
                       refiner=refiner, refiner_start=0.8)
  err = rel_err(ours, expected)
  print(f"\nhandoff with torch generators: {err:.2e}")
  assert err <= 1e-5


HIRES_COMMON = dict(negative_prompt=NEGATIVES, guidance_scale=GUIDANCE,
                    crops_coords_top_left=(4, 8))


def _diffusers_hires(pipes, noise, seed, hires_steps, strength, refiner_start=None,
                     first_refiner_start=None):
  """diffusers' text-to-image (4 euler steps) to latents, torch's interpolate, then its img2img
  pipeline of the base on those latents for the steps A1111 runs (the last `hires_steps` of
  int(hires_steps / strength)), with our draws of the second pass's noise; with
  `refiner_start`, that pipeline's `denoising_end` and the refiner's img2img pipeline from its
  latents with `denoising_start`; with `first_refiner_start`, the same handoff in the first
  pass, before the interpolation. Returns (images, the hires size)."""
  ref, ref_refiner, pipe, refiner, _ = pipes
  _set_scheduler(ref, "euler", pipe.scheduler_config)
  _set_scheduler(ref_refiner, "euler", refiner.scheduler_config)
  img_pipe = diffusers.StableDiffusionXLImg2ImgPipeline(**ref.components)
  img_pipe.set_progress_bar_config(disable=True)
  total = int(hires_steps / strength)
  h, w = sampling.Hires(1.5, hires_steps, strength).size(pipe, H, W)
  latent_hw = (h // pipe.vae_scale, w // pipe.vae_scale)
  keys = sampling.image_keys(jnp.asarray(sampling.make_seeds(seed, 2)))
  second = nchw(np.asarray(sampling._keyed_noise(keys, sampling._HIRES_NOISE, (*latent_hw, 4))))  # noqa: SLF001
  module = "diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl_img2img"
  with torch.no_grad():
    first = ref(PROMPTS, height=H, width=W, num_inference_steps=4, latents=nchw(noise),
                denoising_end=first_refiner_start, output_type="latent", **HIRES_COMMON).images
    if first_refiner_start is not None:
      first = ref_refiner(PROMPTS, image=first, num_inference_steps=4,
                          denoising_start=first_refiner_start, output_type="latent",
                          **HIRES_COMMON).images
    enlarged = torch.nn.functional.interpolate(first, size=latent_hw, mode="bilinear")
    handed = refiner_start is not None
    with mock.patch(f"{module}.randn_tensor", lambda *a, **k: second):
      images = img_pipe(PROMPTS, image=enlarged, strength=(hires_steps + 0.5) / total,
                        num_inference_steps=total, denoising_end=refiner_start,
                        output_type="latent" if handed else "np", **HIRES_COMMON).images
    if handed:
      images = ref_refiner(PROMPTS, image=images, num_inference_steps=total,
                           denoising_start=refiner_start, output_type="np",
                           **HIRES_COMMON).images
  return images, (h, w)


def test_hires_fix_matches_diffusers(pipes):
  """hires_scale on SDXL as diffusers' pipelines make it (`_diffusers_hires`). The default
  original / target sizes of the second pass are its own size, as A1111 conditions its hires
  pass: the reference's default for its image."""
  pipe = pipes[2]
  noise, seed, hires_steps, strength = randn(2, 8, 12, 4, seed=6), 9, 3, 0.6
  expected, (h, w) = _diffusers_hires(pipes, noise, seed, hires_steps, strength)
  assert (h, w) != (H, W) and h / H != w / W  # rounded to the model's size multiple
  ours = pipe.generate(PROMPTS, negative_prompts=NEGATIVES, steps=4, guidance_scale=GUIDANCE,
                       scheduler="euler", height=H, width=W, latents=noise, seed=seed,
                       crops_coords_top_left=(4, 8), hires_scale=1.5, hires_steps=hires_steps,
                       hires_strength=strength)
  assert ours.shape == (2, h, w, 3)
  err = rel_err(ours, expected)
  print(f"\nhires: {err:.2e}")
  assert err <= GENERATE_TOL


def test_hires_fix_with_refiner_matches_diffusers(pipes):
  """refiner= with the hires fix takes the hires pass over, as A1111's refiner does by default
  ("Hires refiner: second pass"): the first pass the base's alone, then the base's img2img
  pipeline with denoising_end=0.7 and the refiner's with denoising_start=0.7 on its latents,
  over the hires pass's schedule (the last 3 of 5 steps; `_diffusers_hires`). A refiner that is
  the base itself, switched at 0.8 as A1111 switches inside the hires pass's sampler loop
  (DPM++ SDE: between a step's two calls), makes the base's image (its history and the pass's
  step noise run on)."""
  pipe, refiner = pipes[2:4]
  noise, seed, hires_steps, strength = randn(2, 8, 12, 4, seed=7), 9, 3, 0.6
  expected, (h, w) = _diffusers_hires(pipes, noise, seed, hires_steps, strength, 0.7)
  kw = dict(negative_prompts=NEGATIVES, steps=4, guidance_scale=GUIDANCE, height=H, width=W,
            crops_coords_top_left=(4, 8), hires_scale=1.5, hires_steps=hires_steps,
            hires_strength=strength)
  ours = pipe.generate(PROMPTS, scheduler="euler", latents=noise, seed=seed, refiner=refiner,
                       refiner_start=0.7, **kw)
  assert ours.shape == (2, h, w, 3)
  err = rel_err(ours, expected)
  print(f"\nhires + refiner: {err:.2e}")
  assert err <= GENERATE_TOL
  sde = dict(kw, scheduler="dpmpp_sde_karras", seed=seed)
  spec, state = sampling.prepare_hires(pipe, 2, sampling.Hires(1.5, hires_steps, strength),
                                       steps=4, scheduler="dpmpp_sde_karras", height=H, width=W,
                                       guidance_scale=GUIDANCE, denoising_end=0.8,
                                       handoff="a1111")
  assert spec.begin < spec.end and not spec.scheduler.starts_step(state, spec.end)
  np.testing.assert_allclose(
      pipe.generate(PROMPTS, refiner=pipe, refiner_start=0.8, refiner_switch="a1111", **sde),
      pipe.generate(PROMPTS, **sde), atol=1e-6)
  with pytest.raises(ValueError, match="refiner_start as a number of steps is the first pass's"):
    pipe.generate(PROMPTS, refiner=refiner, refiner_start=2, **sde)
  with pytest.raises(ValueError, match="leaves the model none of the hires pass's 3 steps"):
    pipe.generate(PROMPTS, refiner=refiner, refiner_start=0.3, **sde)


@pytest.mark.parametrize("which", ["first pass", "both passes"])
def test_hires_refiner_passes_match_diffusers(pipes, which):
  """hires_refiner as A1111's "Hires refiner": "first pass" hands the first pass to the refiner
  at refiner_start (diffusers' base with denoising_end, its refiner with denoising_start), whose
  latents the hires pass (the base's alone) enlarges; "both passes" hands over in the hires pass
  too, at the same refiner_start of its schedule (`_diffusers_hires`). With a pixel upscaler the
  refiner's decoded images go to the hires pass: a refiner that is the base itself, switched
  inside the sampler loop (Euler: nothing carried over), makes the base's image."""
  pipe, refiner = pipes[2:4]
  noise, seed, hires_steps, strength = randn(2, 8, 12, 4, seed=8), 5, 3, 0.6
  start = 0.6 if which == "first pass" else 0.7
  expected, (h, w) = _diffusers_hires(pipes, noise, seed, hires_steps, strength,
                                      start if which == "both passes" else None,
                                      first_refiner_start=start)
  kw = dict(negative_prompts=NEGATIVES, steps=4, guidance_scale=GUIDANCE, height=H, width=W,
            crops_coords_top_left=(4, 8), hires_scale=1.5, hires_steps=hires_steps,
            hires_strength=strength, scheduler="euler", latents=noise, seed=seed)
  ours = pipe.generate(PROMPTS, refiner=refiner, refiner_start=start,
                       hires_refiner=which.split()[0].title(), **kw)
  assert ours.shape == (2, h, w, 3)
  err = rel_err(ours, expected)
  print(f"\nhires refiner, {which}: {err:.2e}")
  assert err <= GENERATE_TOL
  second = pipe.generate(PROMPTS, refiner=refiner, refiner_start=start, **kw)
  assert rel_err(second, ours) > 1e-3  # the default, "second pass", is another image
  if which == "first pass":
    pixels = dict(kw, hires_upscaler="lanczos")
    np.testing.assert_allclose(
        pipe.generate(PROMPTS, refiner=pipe, refiner_start=0.6, refiner_switch="a1111",
                      hires_refiner=which, **pixels),
        pipe.generate(PROMPTS, **pixels), atol=1e-6)


# The handoff test's shapes: jit's cache is warm when the whole module runs.
HANDOFF = dict(steps=6, scheduler="euler", height=H, width=W, guidance_scale=GUIDANCE,
               refiner_start=0.8)


def test_compiles_once_per_shape(pipes):
  _, _, base, refiner, _ = pipes
  kwargs = dict(HANDOFF, refiner=refiner)
  base.generate(["warm", "up"], **kwargs)
  before = sampling.trace_count
  a = base.generate(["a cat", "a"], seed=2, original_size=(64, 64), aesthetic_score=3.0,
                    **kwargs)
  b = base.generate(["a dog", "b"], negative_prompts="red", seed=9, **kwargs)
  assert sampling.trace_count == before
  assert not np.allclose(a, b)


def test_bad_sdxl_arguments(pipes):
  _, _, base, refiner, _ = pipes
  with pytest.raises(ValueError, match="refiner_start must be in"):
    base.generate(PROMPTS, steps=3, height=H, width=W, refiner=refiner, refiner_start=1.0)
  with pytest.raises(ValueError, match="unknown hires refiner pass 'third'; use one of first"):
    base.generate(PROMPTS, steps=3, height=H, width=W, refiner=refiner, hires_refiner="third")
  with pytest.raises(ValueError, match="hires_refiner 'both passes' says which pass of the hires "
                                       "fix the refiner finishes: give refiner= and hires_scale"):
    base.generate(PROMPTS, steps=3, height=H, width=W, refiner=refiner, hires_refiner="both")
  with pytest.raises(ValueError, match="prompts_2: got 3 entries"):
    base.generate(PROMPTS, prompts_2=["a", "b", "c"], steps=3, height=H, width=W)
  with pytest.raises(ValueError, match="clip_skip must be in"):
    base.encode_prompt(PROMPTS, clip_skip=3)


def test_eight_devices_same_pixels(pipes, tmp_path):
  """The sharded sampler on 8 simulated devices makes generate()'s pixels."""
  _, _, base, _, folder = pipes
  out = str(tmp_path / "images.npy")
  code = f"""
import numpy as np, sdjax
from sdjax import parallel, sampling
pipe = sdjax.load_pipeline({os.path.join(folder, "base")!r})
mesh = parallel.make_mesh()
assert mesh.size == 8
spec, state = sampling.prepare(pipe, 1, steps=3, scheduler="euler", height={H}, width={W},
                               guidance_scale={GUIDANCE})
prompts = [f"a cat {{i}}" for i in range(8)]
cond = sampling.make_conditioning(pipe, prompts, [None] * 8, size=({H}, {W}))
images = parallel.sharded_sampler(mesh, spec, pipe)(
    parallel.replicate(pipe.params, mesh), parallel.shard_tree(mesh, cond, 8),
    parallel.shard_batch(mesh, np.arange(50, 58, dtype=np.uint32), 8), np.float32({GUIDANCE}),
    np.float32(0), parallel.replicate(state, mesh))
np.save({out!r}, np.asarray(images))
"""
  flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8"
  env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stderr[-2000:]
  ours = base.generate([f"a cat {i}" for i in range(8)], steps=3, scheduler="euler", height=H,
                       width=W, guidance_scale=GUIDANCE, seed=50)
  np.testing.assert_allclose(np.load(out), ours, atol=1e-5)


def test_run_with_refiner_records_it(pipes, tmp_path):
  """main.py's run: base + refiner in the sharded program, recorded in PNG and manifest."""
  import json

  from PIL import Image

  from sdjax import outputs, run

  _, _, base, refiner, folder = pipes
  micro = MicroConditioning(original_size=(32, 48), aesthetic_score=7.0,
                            negative_original_size=(24, 24), negative_target_size=(16, 24))
  cfg = run.RunConfig(
      prompts=(run.PromptLine("a cat"), run.PromptLine("a dog", negative_prompt="red")),
      model=os.path.join(folder, "base"), refiner=os.path.join(folder, "refiner"),
      refiner_start=0.8, steps=6, guidance_scale=GUIDANCE, scheduler="euler", height=H, width=W,
      seed=5, batch_size=2, output_dir=str(tmp_path / "out"), compilation_cache="",
      show_progress=False, micro=micro)
  assert run.generate_run(cfg).images == 2
  records = [json.loads(line) for line in open(tmp_path / "out" / "manifest.jsonl")]
  assert records[0]["refiner"] == cfg.refiner and records[0]["refiner_start"] == 0.8
  assert records[0]["micro_conditioning"]["original_size"] == [32, 48]
  png = Image.open(tmp_path / "out" / records[1]["file"])
  params = outputs.parse_a1111_parameters(png.text["parameters"])
  assert params["Refiner switch at"] == "0.8" and params["Original size"] == "48x32"
  assert (params["Negative original size"], params["Negative crop"],
          params["Negative target size"]) == ("24x24", "0x0", "24x16")
  # A1111's `name [short hash]`, no local path (the manifest keeps the path).
  assert params["Refiner"] == f"refiner [{run.model_identity(cfg.refiner)[1]}]"
  assert run.model_identity(cfg.refiner)[1] == outputs.short_hash(
      os.path.join(folder, "refiner", "unet", "diffusion_pytorch_model.safetensors"))
  expected = base.generate(["a cat", "a dog"], negative_prompts=[None, "red"], seed=5,
                           refiner=refiner, original_size=(32, 48), aesthetic_score=7.0,
                           negative_original_size=(24, 24), negative_target_size=(16, 24),
                           **HANDOFF)
  written = np.asarray(png, np.float32) / 255
  assert np.abs(written - expected[1]).max() <= 1 / 255 + 1e-6
  # A1111's Clip skip leaves SDXL's encoders alone: refused rather than silently dropped.
  with pytest.raises(run.RunError, match="--clip_skip is A1111's Clip skip for SD1/SD2 models"):
    run.generate_run(dataclasses.replace(cfg, clip_skip=2, output_dir=str(tmp_path / "cs")))
  # ... unless it was read from an image's parameters, as A1111 reads it: then ignored (this
  # run's image is generate()'s without it). A switch after a number of steps (ComfyUI's
  # KSamplerAdvanced pair), A1111's way (the sampler running on into the refiner): sdjax's
  # fields.
  run.generate_run(dataclasses.replace(cfg, clip_skip=2, sdxl_ignores_clip_skip=True,
                                       refiner_start=4, refiner_switch="a1111",
                                       scheduler="dpmpp_2m", output_dir=str(tmp_path / "step")))
  png = Image.open(tmp_path / "step" / records[1]["file"])
  params = outputs.parse_a1111_parameters(png.text["parameters"])
  assert "Clip skip" not in params
  assert params["Refiner switch step"] == "4" and "Refiner switch at" not in params
  assert params["Refiner switch"] == "A1111"
  step_records = [json.loads(line) for line in open(tmp_path / "step" / "manifest.jsonl")]
  assert step_records[0]["refiner_switch"] == "a1111" and "refiner_switch" not in records[0]
  expected = base.generate(["a cat", "a dog"], negative_prompts=[None, "red"], seed=5,
                           refiner=refiner, original_size=(32, 48), aesthetic_score=7.0,
                           negative_original_size=(24, 24), negative_target_size=(16, 24),
                           **{**HANDOFF, "refiner_start": 4, "refiner_switch": "a1111",
                              "scheduler": "dpmpp_2m"})
  written = np.asarray(png, np.float32) / 255
  assert np.abs(written - expected[1]).max() <= 1 / 255 + 1e-6
  # main.py --parameters_file makes the image again from its PNG (micro-conditioning, refiner
  # switch step and aesthetic scores from the file; the refiner, a local folder, from its flag).
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  made = tmp_path / "made"
  proc = subprocess.run(
      [sys.executable, os.path.join(root, "main.py"), "--model", cfg.model, "--refiner",
       cfg.refiner, "--parameters_file", str(tmp_path / "step" / records[1]["file"]),
       "--output_dir", str(made), "--compilation_cache="],
      env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0 and "warning" not in proc.stderr.lower(), proc.stderr[-2000:]
  remade = Image.open(made / "00000" / "000000.png")
  assert remade.text["parameters"] == png.text["parameters"]
  # One image, not the run's batch of two: the same pixels, to a rounding step.
  assert np.abs(np.asarray(remade, np.int16) - np.asarray(png, np.int16)).max() <= 1


def test_run_img2img_lines_with_refiner(pipes, tmp_path):
  """main.py's img2img lines hand over to --refiner as generate() does (the base's img2img to
  refiner_start, the refiner's steps from there; with A1111's switch, a line starting past it
  the refiner's alone); a line with a mask too, with A1111's switch and blend (else refused in
  one line)."""
  from PIL import Image

  from sdjax import infotext, masks, outputs, run

  _, _, base, refiner, folder = pipes
  Image.fromarray(np.random.default_rng(5).integers(0, 255, (H, W, 3), np.uint8)).save(
      tmp_path / "init.png")
  init = str(tmp_path / "init.png")
  cfg = run.RunConfig(
      prompts=(run.PromptLine("a cat", init_image=init),), model=os.path.join(folder, "base"),
      refiner=os.path.join(folder, "refiner"), refiner_start=0.75, strength=0.7, steps=8,
      guidance_scale=GUIDANCE, scheduler="euler", height=H, width=W, seed=5,
      output_dir=str(tmp_path / "out"), compilation_cache="", show_progress=False)
  assert run.generate_run(cfg).images == 1
  expected = base.generate("a cat", init_images=outputs.read_image(init, (H, W))[None],
                           strength=0.7, steps=8, guidance_scale=GUIDANCE, scheduler="euler",
                           seed=5, refiner=refiner, refiner_start=0.75)
  png = np.asarray(Image.open(tmp_path / "out" / "00000" / "000000.png"), np.float32) / 255
  assert np.abs(png - expected[0]).max() <= 1 / 255 + 1e-6
  # A1111's switch with a line starting past it: the refiner's from the first call.
  late = dataclasses.replace(cfg, strength=0.15, refiner_switch="a1111",
                             output_dir=str(tmp_path / "late"))
  assert run.generate_run(late).images == 1
  expected = base.generate("a cat", init_images=outputs.read_image(init, (H, W))[None],
                           strength=0.15, steps=8, guidance_scale=GUIDANCE, scheduler="euler",
                           seed=5, refiner=refiner, refiner_start=0.75, refiner_switch="a1111")
  png = np.asarray(Image.open(tmp_path / "late" / "00000" / "000000.png"), np.float32) / 255
  assert np.abs(png - expected[0]).max() <= 1 / 255 + 1e-6
  # A mask line: with A1111's switch and blend the refiner runs on, blending (generate()'s
  # image, the original pasted back outside the blurred mask); else a one-line error.
  mask = np.zeros((H, W), np.uint8)
  mask[4:12, 6:20] = 255
  Image.fromarray(mask).save(tmp_path / "m.png")
  masked = dataclasses.replace(cfg, prompts=(run.PromptLine("a cat", init_image=init,
                                                            mask_image=str(tmp_path / "m.png")),),
                               refiner_switch="a1111", inpaint_blend="a1111",
                               output_dir=str(tmp_path / "masked"))
  assert run.generate_run(masked).images == 1
  prepared = masks.prepare(Image.open(init), Image.open(tmp_path / "m.png"), H, W,
                           masks.MaskOptions(blur=4.0, overlay=True))
  expected = base.generate("a cat", init_images=prepared.image[None],
                           mask_images=prepared.mask[None], strength=0.7, steps=8,
                           guidance_scale=GUIDANCE, scheduler="euler", seed=5, refiner=refiner,
                           refiner_start=0.75, refiner_switch="a1111", inpaint_blend="a1111")
  expected = prepared.finish(outputs.to_uint8(expected[0])).astype(int)
  written = Image.open(tmp_path / "masked" / "00000" / "000000.png")
  assert np.abs(np.asarray(written, int) - expected).max() <= 1
  flags = infotext.reproduce(written.text["parameters"]).flags  # the PNG says both, read back
  assert flags["refiner_switch"] == "a1111" and flags["inpaint_blend"] == "a1111"
  for wrong in ({"refiner_switch": "diffusers"}, {"inpaint_blend": "diffusers"}):
    with pytest.raises(run.RunError, match="^--refiner: a refiner finishes an inpainting run "
                                           ".a mask. as A1111's does"):
      run.generate_run(dataclasses.replace(masked, **wrong,
                                           output_dir=str(tmp_path / "-".join(wrong))))


@pytest.mark.parametrize("which", ["second pass", "first pass"])
def test_run_with_hires_fix_and_refiner(pipes, tmp_path, which):
  """main.py's run with the hires fix and a refiner (--hires_refiner): the refiner takes the
  hires pass over, or finishes the first pass (with a pixel upscaler, handing the hires pass
  its decoded images), in the same sharded program (A1111's switch here, between a DPM++ SDE
  step's two calls; a line's hires prompt its prompt); each image is generate()'s, and its PNG
  says both, as its text makes it again. ("both passes" in a run: test_controlnet's SDXL run.)"""
  import json

  from PIL import Image

  from sdjax import infotext, outputs, run

  _, _, base, refiner, folder = pipes
  upscaler = "lanczos" if which == "first pass" else "latent"
  cfg = run.RunConfig(
      prompts=(run.PromptLine("a cat", hires_prompt="a lion"), run.PromptLine("a dog")),
      model=os.path.join(folder, "base"), refiner=os.path.join(folder, "refiner"),
      refiner_start=0.6, refiner_switch="a1111", hires_refiner=which, steps=4,
      guidance_scale=GUIDANCE, scheduler="dpmpp_sde", height=H, width=W, seed=5, batch_size=2,
      hires_scale=1.5, hires_steps=3, hires_strength=0.6, hires_upscaler=upscaler,
      output_dir=str(tmp_path / "out"), compilation_cache="", show_progress=False)
  assert run.generate_run(cfg).images == 2
  records = [json.loads(line) for line in open(tmp_path / "out" / "manifest.jsonl")]
  expected = base.generate(["a cat", "a dog"], seed=5, refiner=refiner, refiner_start=0.6,
                           refiner_switch="a1111", hires_refiner=which, steps=4,
                           guidance_scale=GUIDANCE, scheduler="dpmpp_sde", height=H, width=W,
                           hires_scale=1.5, hires_steps=3, hires_strength=0.6,
                           hires_upscaler=upscaler, hires_prompts=["a lion", "a dog"])
  for record, image in zip(records, expected, strict=True):
    png = Image.open(tmp_path / "out" / record["file"])
    assert np.abs(np.asarray(png, np.float32) / 255 - image).max() <= 1 / 255 + 1e-6
    params = outputs.parse_a1111_parameters(png.text["parameters"])
    assert params["Refiner switch at"] == "0.6" and params["Hires upscale"] == "1.5"
    assert record["refiner"] == cfg.refiner and record["hires"]["steps"] == 3
    assert params.get("Hires refiner", "second pass") == record.get("hires_refiner",
                                                                    "second pass") == which
    again = infotext.reproduce(png.text["parameters"]).flags
    assert again.get("hires_refiner", "second pass") == which
    # Default original and target sizes are each pass's own: not written as the first pass's
    # (which --parameters_file would then give the hires pass too), the crop is
    assert "original_size" not in again and "target_size" not in again
    assert params["Crop"] == "0x0"


def test_run_second_prompts(pipes, tmp_path):
  """main.py's prompt_2 / negative_prompt_2 (diffusers' second encoder's prompts): a jsonl
  line's own, else the run's, else the prompt; recorded in manifest and PNG (sdjax's fields
  "Prompt 2" / "Negative prompt 2", read back). An empty negative prompt with a
  negative_prompt_2 is the empty text (not SDXL base's zeros, which would drop it). Images of a
  batch take their own pairs: each as generate() makes it alone."""
  import json

  from PIL import Image

  from sdjax import infotext, outputs, run

  _, _, base, _, folder = pipes
  lines = [{"prompt": "a cat", "prompt_2": "a dog", "negative_prompt_2": "blue"},
           {"prompt": "a red circle", "negative_prompt": "green"},
           {"prompt": "a photo of a cat", "negative_prompt": "(red:1.3)",
            "negative_prompt_2": "sky", "prompt_2": "a (red:0.8) circle"}]
  path = tmp_path / "prompts.jsonl"
  path.write_text("".join(json.dumps(line) + "\n" for line in lines))
  kw = dict(steps=3, scheduler="euler", guidance_scale=GUIDANCE, height=H, width=W)
  cfg = run.RunConfig(prompts_file=str(path), model=os.path.join(folder, "base"),
                      prompt_2="a tree", prompt_syntax="a1111", seed=5, batch_size=2,
                      output_dir=str(tmp_path / "out"), compilation_cache="",
                      show_progress=False, **kw)
  assert run.generate_run(cfg).images == 3
  records = [json.loads(line) for line in open(tmp_path / "out" / "manifest.jsonl")]
  assert [(r.get("prompt_2"), r.get("negative_prompt_2")) for r in records] == [
      ("a dog", "blue"), ("a tree", None), ("a (red:0.8) circle", "sky")]
  want = [("a cat", "a dog", "", "blue"), ("a red circle", "a tree", "green", "green"),
          ("a photo of a cat", "a (red:0.8) circle", "(red:1.3)", "sky")]
  for record, (prompt, prompt_2, negative, negative_2) in zip(records, want, strict=True):
    expected = base.generate([prompt], prompts_2=[prompt_2], negative_prompts=[negative],
                             negative_prompts_2=[negative_2], seed=5 + record["index"],
                             prompt_syntax="a1111", **kw)
    png = Image.open(tmp_path / "out" / record["file"])
    written = np.asarray(png, np.float32) / 255
    assert np.abs(written - expected[0]).max() <= 1 / 255 + 1e-6, record
    flags = infotext.reproduce(png.text["parameters"]).flags
    assert (flags.get("prompt_2"), flags.get("negative_prompt_2")) == (
        record.get("prompt_2"), record.get("negative_prompt_2"))
  # The zeros an empty negative prompt alone gets would have dropped line 1's "blue".
  zeros = base.generate(["a cat"], prompts_2=["a dog"], seed=5, prompt_syntax="a1111", **kw)
  assert np.abs(np.asarray(Image.open(tmp_path / "out" / records[0]["file"]), np.float32) / 255
                - zeros[0]).max() > 2 / 255
  params = outputs.parse_a1111_parameters(
      Image.open(tmp_path / "out" / records[2]["file"]).text["parameters"])
  assert (params["Prompt 2"], params["Negative prompt 2"]) == ("a (red:0.8) circle", "sky")
  # Composable prompts are one text for both encoders (A1111's); SD1 / SD2: one encoder.
  path.write_text(json.dumps({"prompt": "a cat AND a dog", "prompt_2": "sky"}) + "\n")
  with pytest.raises(ValueError, match="give no second prompt"):
    run.generate_run(dataclasses.replace(cfg, prompt_2="", output_dir=str(tmp_path / "c")))


def test_hires_fix_run_conditions_each_pass_at_its_size(pipes):
  """main.py's run with the hires fix on SDXL: the second pass's default time ids are its own
  size, as generate()'s (the sharded two-pass program itself is checked on SD1, test_run).
  Pixels cannot show it here: the tiny model's images move by less than a PNG step."""
  from sdjax import parallel, run

  _, _, base, _, folder = pipes
  cfg = run.RunConfig(model=os.path.join(folder, "base"), steps=3, scheduler="euler",
                      hires_scale=1.5, hires_steps=2, hires_strength=0.5,
                      micro=MicroConditioning(crops_coords_top_left=(4, 8)))
  sampler = run._Sampler(cfg, base, parallel.make_mesh(), "euler")  # noqa: SLF001
  program = sampler.program((H, W), None, GUIDANCE)
  first, second = sampler._conditioning(program, [run.PromptLine("a cat")], (H, W))  # noqa: SLF001
  h, w = sampling.Hires(1.5).size(base, H, W)
  assert (h, w) != (H, W)
  np.testing.assert_array_equal(first.time_ids, [[H, W, 4, 8, H, W]])
  np.testing.assert_array_equal(second.time_ids, [[h, w, 4, 8, h, w]])
  np.testing.assert_array_equal(second.negative_time_ids, second.time_ids)


def test_hires_pass_takes_each_images_second_prompts(pipes):
  """main.py's hires pass on SDXL: an image without a hires prompt of its own keeps its pair
  (prompt_2 to the second encoder); one with its own hires prompt gives that to both encoders
  (A1111's hires prompt), each image by its own texts whatever its batch mates'; an empty
  negative prompt with a negative_prompt_2 is the empty text in both passes, not zeros."""
  from sdjax import parallel, run
  from sdjax.plan import ImageJob

  _, _, base, _, folder = pipes
  cfg = run.RunConfig(model=os.path.join(folder, "base"), steps=3, scheduler="euler",
                      hires_scale=1.5, hires_steps=2, hires_strength=0.5)
  sampler = run._Sampler(cfg, base, parallel.make_mesh(), "euler")  # noqa: SLF001
  program = sampler.program((H, W), None, GUIDANCE)
  jobs = [ImageJob(0, "a cat", "", 1, prompt_2="a dog", negative_prompt_2="blue"),
          ImageJob(1, "a cat", "red", 2, prompt_2="a dog", hires_prompt="a tiger"),
          ImageJob(2, "a bird", "red", 3)]
  first, second = sampler._conditioning(program, jobs, (H, W))  # noqa: SLF001
  for cond, texts, texts_2, negatives, negatives_2 in (
      (first, ["a cat", "a cat", "a bird"], ["a dog", "a dog", "a bird"], ["", "red", "red"],
       ["blue", "red", "red"]),
      (second, ["a cat", "a tiger", "a bird"], ["a dog", "a tiger", "a bird"],
       ["", "red", "red"], ["blue", "red", "red"])):
    np.testing.assert_array_equal(cond.prompt.ids, base.tokenize(texts))
    np.testing.assert_array_equal(cond.prompt.ids_2, base.tokenize_2(texts_2))
    np.testing.assert_array_equal(cond.negative.ids, base.tokenize(negatives))
    np.testing.assert_array_equal(cond.negative.ids_2, base.tokenize_2(negatives_2))
    assert not np.asarray(cond.zero_negative).any()


def test_export_round_trip(pipes, tmp_path):
  """SDXL base and refiner folders written by sdjax load in diffusers with the same weights."""
  ref_base, ref_refiner, base, refiner, _ = pipes
  for ours, ref, cls in ((base, ref_base, diffusers.StableDiffusionXLPipeline),
                         (refiner, ref_refiner, diffusers.StableDiffusionXLImg2ImgPipeline)):
    out = str(tmp_path / cls.__name__)
    ours.save_pretrained(out)
    back = cls.from_pretrained(out)
    assert back.config.force_zeros_for_empty_prompt == ref.config.force_zeros_for_empty_prompt
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
      a, b = getattr(ref, name), getattr(back, name)
      assert (a is None) == (b is None), name
      if a is not None:
        sa, sb = a.state_dict(), b.state_dict()
        assert sorted(sa) == sorted(sb), name
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name
    again = sdjax.load_pipeline(out)
    assert again.requires_aesthetics_score == ours.requires_aesthetics_score
    np.testing.assert_array_equal(again.tokenize_2(PROMPTS), ours.tokenize_2(PROMPTS))


def test_v_prediction_marker_file_matches_diffusers(pipes, tmp_path):
  """A v-prediction fine-tune's single file (`v_pred` and `ztsnr` marker keys, as NoobAI-XL
  v-pred ships) loads as v-prediction on zero-terminal-SNR betas, and generates what diffusers
  makes from the same file with the scheduler its model cards set up."""
  from safetensors.numpy import load_file, save_file

  _, _, base, _, folder = pipes
  plain = str(tmp_path / "plain.safetensors")
  base.save_single_file(plain)
  assert not {"v_pred", "ztsnr"} & set(load_file(plain))  # epsilon: no markers
  path = str(tmp_path / "vpred.safetensors")
  save_file({**load_file(plain), "v_pred": np.zeros((0,), np.float32),
             "ztsnr": np.zeros((0,), np.float32)}, path)
  pipe = sdjax.load_pipeline(path, config=os.path.join(folder, "base"))
  assert pipe.scheduler_config["prediction_type"] == "v_prediction"
  assert pipe.scheduler_config["rescale_betas_zero_snr"] is True
  explicit = sdjax.load_pipeline(path, config=os.path.join(folder, "base"),
                                 prediction_type="epsilon")
  assert explicit.scheduler_config["prediction_type"] == "epsilon"

  ref = diffusers.StableDiffusionXLPipeline.from_single_file(
      path, config=os.path.join(folder, "base"), local_files_only=True)
  ref.scheduler = diffusers.EulerDiscreteScheduler.from_config(
      ref.scheduler.config, prediction_type="v_prediction", rescale_betas_zero_snr=True)
  latents = randn(1, 8, 12, 4, seed=5)
  with torch.no_grad():
    expected = ref(PROMPTS[:1], negative_prompt=NEGATIVES[:1], height=H, width=W,
                   num_inference_steps=5, guidance_scale=GUIDANCE, latents=nchw(latents),
                   output_type="np").images
  kwargs = dict(negative_prompts=NEGATIVES[:1], height=H, width=W, steps=5,
                guidance_scale=GUIDANCE, scheduler="euler", latents=latents)
  ours = pipe.generate(PROMPTS[:1], **kwargs)
  err = rel_err(ours, expected)
  print(f"\nv_pred + ztsnr file, euler: {err:.2e}")
  assert err <= GENERATE_TOL
  assert rel_err(base.generate(PROMPTS[:1], **kwargs), expected) > 1e-2  # the markers matter

  again = str(tmp_path / "again.safetensors")
  pipe.save_single_file(again)  # the markers go out again, for A1111 and ComfyUI
  assert {"v_pred", "ztsnr"} <= set(load_file(again))
