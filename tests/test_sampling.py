"""generate() end to end against diffusers' pipelines, plus exact fake-model and compile checks."""

import dataclasses
from unittest import mock

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from parity import img2img_draws, nchw

import sdjax
from sdjax import conditioning, sampling, schedulers, testing, upscaling
from sdjax.models import layers

PROMPTS = ["a red circle in the center", "a photo of a cat"]
NEGATIVES = ["blue", ""]  # the second image has no negative prompt: diffusers' empty default
# Random tiny networks with strong guidance blow latents up to where the VAE's attention softmax
# amplifies float32 rounding a thousandfold; a moderate scale keeps the check well conditioned.
GUIDANCE = 3.0
DIFFUSERS_SCHEDULERS = {
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "kdpm2": ("KDPM2DiscreteScheduler", {}),  # two UNet calls a step, as heun
    # EDM: preconditioned input, timesteps 0.25 * log(sigma) (Playground v2.5's)
    "edm_dpmpp_2m": ("EDMDPMSolverMultistepScheduler", {}),
    "deis": ("DEISMultistepScheduler", {}),
    # singlestep: each second step starts from the sample of the step before
    "dpmpp_2s": ("DPMSolverSinglestepScheduler", {}),
}


def rel(a, b):
  return float(np.linalg.norm(np.asarray(a) - b) / np.linalg.norm(b))


@pytest.fixture(scope="module", params=["sd1", "sd2"])  # epsilon / v_prediction
def pipes(request, tmp_path_factory):
  folder = str(tmp_path_factory.mktemp(request.param) / "pipe")
  testing.write_torch_pipeline(folder, request.param, seed=21)
  ref = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
  ref.set_progress_bar_config(disable=True)
  return ref, sdjax.load_pipeline(folder), folder


def _v_prediction(pipe):
  return pipe.scheduler_config.get("prediction_type") == "v_prediction"


def _sd1_only(pipes):
  """Family-independent checks run once, to keep the suite fast."""
  if _v_prediction(pipes[1]):
    pytest.skip("family-independent: checked on the sd1 family")


def _unit_noise(shape, seed=0):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# Every scheduler's v-prediction arithmetic is checked against diffusers' in its own tests
# (test_scheduler_*.py); end to end, the v-prediction family runs two.
V_PREDICTION_CHECKED = ("euler", "dpmpp_2m_karras")


@pytest.mark.parametrize("name", list(DIFFUSERS_SCHEDULERS))
def test_generate_matches_diffusers(pipes, name):
  ref, pipe, _ = pipes
  if _v_prediction(pipe) and name not in V_PREDICTION_CHECKED:
    pytest.skip(f"v-prediction end to end: {', '.join(V_PREDICTION_CHECKED)}")
  cls, overrides = DIFFUSERS_SCHEDULERS[name]
  ref.scheduler = getattr(diffusers, cls).from_config(pipe.scheduler_config, **overrides)
  latents = _unit_noise((2, 8, 8, 4))
  expected = ref(PROMPTS, negative_prompt=NEGATIVES, num_inference_steps=6,
                 guidance_scale=GUIDANCE, height=16, width=16, latents=nchw(latents),
                 output_type="np").images
  ours = pipe.generate(PROMPTS, negative_prompts=NEGATIVES, steps=6, guidance_scale=GUIDANCE,
                       scheduler=name, height=16, width=16, latents=latents)
  assert ours.shape == (2, 16, 16, 3) and ours.dtype == np.float32
  err = rel(ours, expected)
  print(f"\n{name} ({pipe.scheduler_config.get('prediction_type', 'epsilon')}): {err:.2e}")
  assert err <= 1e-3


def test_custom_sigmas_match_diffusers(pipes):
  """generate(sigmas=...) as diffusers' pipe(sigmas=...) (Euler); a schedule type gives the
  pixels of its own sigmas passed as a list, from the same compiled program; timesteps=... as
  diffusers' pipe(timesteps=...) (DPM-Solver++)."""
  _sd1_only(pipes)
  ref, pipe, _ = pipes
  ref.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler_config)
  latents = _unit_noise((2, 8, 8, 4), seed=2)
  sigmas = [14.6, 5.0, 1.9, 0.6, 0.1, 0.0]
  expected = ref(PROMPTS, negative_prompt=NEGATIVES, sigmas=sigmas, guidance_scale=GUIDANCE,
                 height=16, width=16, latents=nchw(latents), output_type="np").images
  ours = pipe.generate(PROMPTS, negative_prompts=NEGATIVES, sigmas=sigmas, scheduler="euler",
                       guidance_scale=GUIDANCE, height=16, width=16, latents=latents)
  err = rel(ours, expected)
  print(f"\neuler custom sigmas: {err:.2e}")
  assert err <= 1e-4
  state = schedulers.get_scheduler("euler", pipe.scheduler_config,
                                   options={"schedule_type": "align_your_steps"}
                                   ).set_timesteps(5)
  common = dict(negative_prompts=NEGATIVES, steps=5, scheduler="euler", guidance_scale=GUIDANCE,
                height=16, width=16, latents=latents)
  by_type = pipe.generate(PROMPTS, schedule_type="align_your_steps", **common)
  before = sampling.trace_count
  by_list = pipe.generate(PROMPTS, sigmas=np.asarray(state.sigmas), **common)
  assert sampling.trace_count == before
  np.testing.assert_array_equal(by_type, by_list)
  assert rel(by_type, ours) > 1e-3  # the schedule matters (parity above: ~1e-7)
  # diffusers' Align Your Steps recipe: NVIDIA's timesteps with DPM-Solver++
  timesteps = diffusers.schedulers.AysSchedules["StableDiffusionTimesteps"]
  ref.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(pipe.scheduler_config)
  expected = ref(PROMPTS, negative_prompt=NEGATIVES, timesteps=timesteps,
                 guidance_scale=GUIDANCE, height=16, width=16, latents=nchw(latents),
                 output_type="np").images
  ours = pipe.generate(PROMPTS, negative_prompts=NEGATIVES, timesteps=timesteps,
                       scheduler="dpmpp_2m", guidance_scale=GUIDANCE, height=16, width=16,
                       latents=latents)
  err = rel(ours, expected)
  print(f"dpmpp_2m custom timesteps: {err:.2e}")
  assert err <= 1e-4


def _network_traces(fn, *args):
  """The traces of the networks (the jit calls) in `fn`'s jaxpr, in order."""
  return [e.params["jaxpr"] for e in jax.make_jaxpr(fn)(*args).eqns if e.primitive.name == "jit"]


def test_networks_are_traced_once(pipes):
  """conditioning.apply: programs that call a network with inputs of the same shapes call one
  trace of it (what a run's samplers share), made again for other shapes, other static inputs
  and another circular padding; its outputs are an inline trace's, bit for bit."""
  _sd1_only(pipes)
  pipe = pipes[1]
  unet, params = pipe.unet, pipe.params["unet"]
  x, ctx = jnp.ones((2, 2, 2, 4)), jnp.ones((2, 77, unet.config.cross_attention_dim))

  def call(x, t=None):
    return conditioning.apply(unet, params, x, jnp.float32(3.0) if t is None else t, ctx)

  first, = _network_traces(lambda x: call(x) * 2, x)
  again, other_t = _network_traces(lambda x: call(x + 1) + call(x, jnp.float32(5.0)), x)
  assert again is first and other_t is first
  shape, = _network_traces(call, jnp.ones((1, 2, 2, 4)))
  with layers.circular_padding("xy"):  # a function of its own: jax keys its trace on none
    tiled, = _network_traces(lambda x: call(x), x)
  assert shape is not first and tiled is not first
  ids = jnp.ones((1, 77), jnp.int32)
  skips = [_network_traces(lambda i, k=k: conditioning.apply(
      pipe.text_encoder, pipe.params["text_encoder"], i, k)["prompt_embeds"], ids)[0]
           for k in (None, 1, 1)]
  assert skips[0] is not skips[1] and skips[1] is skips[2]  # clip_skip: static
  np.testing.assert_array_equal(jax.jit(call)(x), jax.jit(
      lambda x: unet.apply({"params": params}, x, jnp.float32(3.0), ctx))(x))


def test_align_your_steps_follows_the_model():
  """A1111 picks NVIDIA's SDXL levels for an SDXL model, SD1.5's otherwise."""
  options = {"schedule_type": "align_your_steps", "eta": 0}
  sdxl, sd1 = (mock.Mock(is_sdxl=flag) for flag in (True, False))
  assert sampling.model_schedule(sdxl, options)["schedule_type"] == "align_your_steps_sdxl"
  assert sampling.model_schedule(sd1, options) == options
  assert sampling.model_schedule(sdxl, None) is None
  for kind in ("align_your_steps_gits", "align_your_steps_32"):  # Forge's, alike
    assert sampling.model_schedule(sdxl, {"schedule_type": kind}) == {"schedule_type":
                                                                      f"{kind}_sdxl"}
    assert sampling.model_schedule(sd1, {"schedule_type": kind}) == {"schedule_type": kind}
  assert sampling.model_schedule(sdxl, {"schedule_type": "turbo"}) == {"schedule_type": "turbo"}


def test_no_guidance_and_guidance_rescale(pipes):
  _sd1_only(pipes)
  ref, pipe, _ = pipes
  ref.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler_config)
  latents = _unit_noise((2, 8, 8, 4), seed=1)
  for scale, rescale in [(1.0, 0.0), (GUIDANCE, 0.7)]:
    expected = ref(PROMPTS, num_inference_steps=4, guidance_scale=scale,
                   guidance_rescale=rescale, height=16, width=16, latents=nchw(latents),
                   output_type="np").images
    ours = pipe.generate(PROMPTS, steps=4, guidance_scale=scale, guidance_rescale=rescale,
                         scheduler="ddim", height=16, width=16, latents=latents)
    assert rel(ours, expected) <= 1e-3, (scale, rescale)


@pytest.mark.parametrize("name", ["ddim", "euler"])
def test_img2img_matches_diffusers(pipes, name):
  """img2img at the loop level: the same init latents (posterior sample) and the same noise."""
  ref, pipe, folder = pipes
  if (name == "ddim") == _v_prediction(pipe):
    pytest.skip("ddim is checked on the epsilon family, euler on the v-prediction one")
  img_pipe = diffusers.StableDiffusionImg2ImgPipeline.from_pretrained(folder, safety_checker=None)
  img_pipe.set_progress_bar_config(disable=True)
  cls, overrides = DIFFUSERS_SCHEDULERS[name]
  img_pipe.scheduler = getattr(diffusers, cls).from_config(pipe.scheduler_config, **overrides)
  images = np.random.default_rng(3).uniform(size=(2, 16, 16, 3)).astype(np.float32)
  noise = _unit_noise((2, 8, 8, 4), seed=4)
  seed = 17
  module = "diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img"
  with img2img_draws(module, seed, (8, 8, 4), noise):
    expected = img_pipe(PROMPTS, image=images, strength=0.6, num_inference_steps=6,
                        guidance_scale=GUIDANCE, output_type="np").images
  ours = pipe.generate(PROMPTS, init_images=images, strength=0.6, steps=6, seed=seed,
                       guidance_scale=GUIDANCE, scheduler=name, latents=noise)
  assert rel(ours, expected) <= 1e-3


@pytest.mark.parametrize(("form", "placed", "first"), [
    ({"k_diffusion": True}, 10, 4),  # A1111: the last int(0.5 * 10) + 1 of 10 steps
    ({"k_diffusion": True, "comfyui": True}, 20, 10)])  # ComfyUI: the last 10 of int(10 / 0.5)
def test_img2img_steps_as_a1111_and_comfyui(pipes, form, placed, first):
  """An img2img run in A1111's and ComfyUI's forms runs their steps: the same image as a
  strength-1 run over those levels; diffusers' (the last 5 of 10) is another."""
  _, pipe, _ = pipes
  if _v_prediction(pipe):
    pytest.skip("the epsilon family shows it")
  options = {"timestep_spacing": "linspace", "use_karras_sigmas": True, **form}
  sched = schedulers.get_scheduler("euler", pipe.scheduler_config, options=options)
  assert sched.img2img_steps(10, 0.5) == (placed, first)
  levels = np.asarray(sched.set_timesteps(placed).sigmas)[first:]
  images = np.random.default_rng(3).uniform(size=(1, 16, 16, 3)).astype(np.float32)
  kw = dict(init_images=images, seed=5, guidance_scale=GUIDANCE, scheduler="euler")
  ours = pipe.generate(PROMPTS[:1], strength=0.5, steps=10, scheduler_options=options, **kw)
  over = {k: v for k, v in options.items() if k != "use_karras_sigmas"}
  want = pipe.generate(PROMPTS[:1], strength=1.0, steps=len(levels) - 1,
                       scheduler_options={**over, "sigmas": levels.tolist()}, **kw)
  np.testing.assert_allclose(ours, want, rtol=0, atol=1e-6)  # one program's rounding vs another's
  diffusers_form = {k: v for k, v in options.items() if k not in form}
  other = pipe.generate(PROMPTS[:1], strength=0.5, steps=10, scheduler_options=diffusers_form,
                        **kw)
  assert np.abs(other - ours).max() > 1e-4


def test_hires_resize_layout_is_a1111s():
  """A1111's calculate_target_resolution on a 512x768 (w x h) image of an SD1.5-like pipeline:
  one side keeps the aspect; both cover, then cut the excess (top, left offsets in latents)."""
  import types  # noqa: PLC0415

  pipe = types.SimpleNamespace(vae_scale=8, unet=types.SimpleNamespace(
      config=types.SimpleNamespace(downscale=8)))
  for resize, size, crop in (((1024, 0), (1536, 1024), (192, 128, 0, 0)),
                             ((0, 1536), (1536, 1024), (192, 128, 0, 0)),
                             ((1024, 1024), (1024, 1024), (192, 128, 32, 0)),
                             ((1536, 1024), (1024, 1536), (288, 192, 80, 0)),
                             ((640, 1536), (1536, 640), (192, 128, 0, 24))):
    assert sampling.Hires(resize=resize).layout(pipe, 768, 512) == (size, crop), resize
  assert sampling.Hires(scale=1.5).layout(pipe, 768, 512) == ((1152, 768), None)
  with pytest.raises(ValueError, match="hires resize must be"):
    sampling.Hires(resize=(-8, 0)).check()


def test_hires_pass_places_its_own_levels(pipes):
  """A list of sigmas (or timesteps) is the first pass's: the hires pass, of another length,
  keeps its scheduler's placement; a schedule type applies to both passes."""
  _sd1_only(pipes)
  _, pipe, _ = pipes
  common = dict(steps=4, scheduler="euler", height=16, width=16, guidance_scale=GUIDANCE)
  hires = sampling.Hires(2.0, 3, 0.5)

  def hires_sigmas(options):
    return np.asarray(sampling.prepare_hires(pipe, 1, hires, scheduler_options=options,
                                             **common)[1].sigmas)

  plain = hires_sigmas(None)
  assert len(plain) == 7  # 3 hires steps of a 6-step schedule
  for options in ({"sigmas": [14.6, 3.0, 1.0, 0.3, 0.0]}, {"timesteps": [999, 600, 300, 50]}):
    np.testing.assert_array_equal(hires_sigmas(options), plain)
  typed = hires_sigmas({"schedule_type": "sgm_uniform"})
  assert typed.shape == plain.shape and not np.allclose(typed, plain)
  # A1111's Hires schedule type replaces the first pass's; "" (Automatic): the scheduler's own.
  for own, want in (("karras", hires_sigmas({"schedule_type": "karras"})), ("", plain)):
    state = sampling.prepare_hires(pipe, 1, dataclasses.replace(hires, schedule_type=own),
                                   scheduler_options={"schedule_type": "sgm_uniform"}, **common)
    np.testing.assert_array_equal(np.asarray(state[1].sigmas), want)
  assert not np.allclose(hires_sigmas({"schedule_type": "karras"}), plain)
  with pytest.raises(ValueError, match="hires_schedule_type is the hires pass's"):
    pipe.generate(PROMPTS, hires_schedule_type="Karras", **common)
  # A hires sampler without schedule types uses its own, as A1111's "Use same scheduler".
  ddim = sampling.Hires(2.0, 3, 0.5, scheduler="ddim")
  for options in ({"schedule_type": "karras"}, {"schedule_type": "align_your_steps"}):
    state = sampling.prepare_hires(pipe, 1, ddim, scheduler_options=options, **common)[1]
    want = sampling.prepare_hires(pipe, 1, ddim, **common)[1]
    np.testing.assert_array_equal(np.asarray(state.timesteps), np.asarray(want.timesteps))


def test_hires_pass_plans_dpm_fast_over_its_levels(pipes):
  """DPM fast's hires pass (A1111's sample_img2img, ComfyUI's second KSampler) plans its calls
  between the first and last levels it keeps (the last n of int(n / strength)), from its first
  call: not the text-to-image plan's tail."""
  _sd1_only(pipes)
  _, pipe, _ = pipes
  options = {"timestep_spacing": "linspace", "k_diffusion": True}
  common = dict(steps=4, scheduler="dpm_fast_ancestral", height=16, width=16,
                guidance_scale=GUIDANCE, scheduler_options=options)
  spec, state = sampling.prepare_hires(pipe, 1, sampling.Hires(2.0, 3, 0.5), **common)
  ours = schedulers.get_scheduler("dpm_fast_ancestral", pipe.scheduler_config, options=options)
  want = ours.planned_from(3)[0].set_timesteps(6, sample_shape=(1, 4, 4, 4))
  np.testing.assert_array_equal(np.asarray(state.sigmas), np.asarray(want.sigmas))
  assert spec.begin == 0 and len(state.timesteps) == 3
  levels = np.asarray(sampling.prepare(pipe, 1, **{**common, "steps": 6})[1].sigmas)
  assert not np.allclose(np.asarray(state.sigmas), levels[-4:])  # its own plan


def test_restart_plans_img2img_and_hires_passes(pipes):
  """A1111's Restart in img2img and hires passes (as DPM fast): its walk planned afresh over the
  levels the pass keeps, from its first call (tests/test_k_diffusion.py's test_restart_img2img
  checks the walk against A1111's loop); no refiner handoff."""
  _sd1_only(pipes)
  _, pipe, _ = pipes
  common = dict(steps=4, scheduler="restart", height=16, width=16, guidance_scale=GUIDANCE)
  spec, state = sampling.prepare_hires(pipe, 1, sampling.Hires(2.0, 3, 0.5), **common)
  ours = schedulers.get_scheduler("restart", pipe.scheduler_config)
  want = ours.planned_from(3)[0].set_timesteps(6, sample_shape=(1, 4, 4, 4))
  assert spec.begin == 0 and len(state.timesteps) == 5  # 3 levels: 2 Heun steps, 1 Euler
  np.testing.assert_array_equal(np.asarray(state.sigma_in), np.asarray(want.sigma_in))
  spec, state = sampling.prepare(pipe, 1, img2img=True, strength=0.5, **common)
  assert spec.begin == 0 and len(state.timesteps) == 5  # int(0.5 * 4) + 1 of 4 levels
  with pytest.raises(ValueError, match="'restart' plans its steps between its run's ends"):
    sampling.prepare(pipe, 1, denoising_end=0.5, **common)
  image = pipe.generate(PROMPTS[:1], hires_scale=2.0, hires_steps=3, hires_strength=0.5,
                        **common)
  assert np.isfinite(image).all() and image.shape == (1, 32, 32, 3)


@pytest.mark.parametrize("name", ["ddim", "pndm", "unipc"])
def test_hires_pass_of_a1111s_own_loops(pipes, name):
  """A1111's DDIM / PLMS / UniPC in a hires pass (the `a1111` form): its sample_img2img with the
  pass's n steps given, t_enc = n - 1 of a grid of int(n / strength) steps (the placement is
  tests/test_scheduler_*'s img2img); with another hires sampler, that one's own form."""
  _sd1_only(pipes)
  _, pipe, _ = pipes
  common = dict(steps=4, height=16, width=16, guidance_scale=GUIDANCE)
  hires = sampling.Hires(2.0, 5, 0.5)
  options = {"a1111": True}
  spec, state = sampling.prepare_hires(pipe, 1, hires, scheduler=name, scheduler_options=options,
                                       **common)
  want_sched = schedulers.get_scheduler(name, pipe.scheduler_config,
                                        options={**options, "a1111_img2img": 4})
  want = want_sched.set_timesteps(10, sample_shape=(1, 4, 4, 4))  # 5 / 0.5 = 10 steps' grid
  assert spec.begin == 0
  np.testing.assert_array_equal(np.asarray(state.timesteps), np.asarray(want.timesteps))
  assert state.start is not None
  other = sampling.Hires(2.0, 5, 0.5, scheduler="euler")
  spec, _ = sampling.prepare_hires(pipe, 1, other, scheduler=name, scheduler_options=options,
                                   **common)
  assert spec.begin == 5 and spec.scheduler.name == "euler"
  image = pipe.generate(PROMPTS[:1], scheduler=name, scheduler_options=options, hires_scale=2.0,
                        hires_steps=5, hires_strength=0.5, **common)
  assert np.isfinite(image).all() and image.shape == (1, 32, 32, 3)


def test_noise_multiplier(pipes):
  """A1111's Noise multiplier for img2img: the initial noise times it before it noises the
  image (not a hires pass's); only img2img takes it; an image's field reads back as the flag."""
  _sd1_only(pipes)
  _, pipe, _ = pipes
  from sdjax import infotext  # noqa: PLC0415

  images = np.random.default_rng(3).uniform(size=(1, 16, 16, 3)).astype(np.float32)
  noise = np.random.default_rng(4).standard_normal((1, 8, 8, 4)).astype(np.float32)
  kw = dict(guidance_scale=GUIDANCE, scheduler="euler", steps=4, init_images=images,
            strength=0.75)
  scaled = pipe.generate(PROMPTS[:1], latents=noise, noise_multiplier=0.7, **kw)
  np.testing.assert_array_equal(scaled, pipe.generate(PROMPTS[:1], latents=noise * np.float32(
      0.7), **kw))
  assert np.abs(scaled - pipe.generate(PROMPTS[:1], latents=noise, **kw)).max() > 1e-3
  with pytest.raises(ValueError, match="noise_multiplier is img2img's"):
    pipe.generate(PROMPTS[:1], noise_multiplier=0.7, steps=2, height=16, width=16)
  flags = infotext.reproduce("a cat\nSteps: 20, Sampler: Euler, Seed: 1, Denoising strength: "
                             "0.5, Noise multiplier: 0.8").flags
  assert flags["noise_multiplier"] == "0.8"


@pytest.mark.parametrize("name,options", [
    ("euler", {"timestep_spacing": "linspace", "k_diffusion": True}),
    ("ddim", {"a1111": True}),
    ("dpmpp_2m", {"timestep_spacing": "linspace", "k_diffusion": True})])
def test_extra_noise_as_a1111(pipes, name, options):
  """A1111's Extra noise: an img2img (or hires) start gets its noise again times it, in
  k-diffusion's x (its sample_img2img: `xi += noise * extra`; its timestep samplers times
  sqrt(alphas_cumprod)); a variance-preserving form holds that x times alpha_t."""
  _sd1_only(pipes)
  _, pipe, _ = pipes
  from sdjax import infotext  # noqa: PLC0415

  spec, state = sampling.prepare(pipe, 1, steps=10, scheduler=name, height=16, width=16,
                                 guidance_scale=GUIDANCE, img2img=True, strength=0.5,
                                 scheduler_options=options, extra_noise=0.4)
  assert spec.extra_noise == 0.4
  rng = np.random.default_rng(5)
  latents, noise = (jnp.asarray(rng.standard_normal((1, 8, 8, 4)), jnp.float32) for _ in "ab")
  got = np.asarray(sampling._started(spec, state, latents, noise))
  plain = np.asarray(spec.scheduler.img2img_noise(state, latents, noise, spec.begin))
  extra = np.asarray(noise) * np.float32(0.4)
  if name == "euler":  # k-diffusion's x: noise * sigma, then the extra
    np.testing.assert_array_equal(got, plain + extra)
  elif name == "ddim":  # A1111's DDIM: times sqrt(alphas_cumprod) of its start
    np.testing.assert_array_equal(got, plain + extra * np.asarray(state.start[0]))
  else:  # x / sqrt(sigma^2 + 1)
    sigma = float(np.asarray(state.sigmas)[spec.begin])
    np.testing.assert_allclose(got, plain + extra / np.sqrt(sigma**2 + 1), rtol=1e-6, atol=1e-6)
  off = sampling.prepare(pipe, 1, steps=10, scheduler=name, height=16, width=16,
                         guidance_scale=GUIDANCE, img2img=True, strength=0.5,
                         scheduler_options=options)[0]
  np.testing.assert_array_equal(np.asarray(sampling._started(off, state, latents, noise)), plain)
  hires = sampling.prepare_hires(pipe, 1, sampling.Hires(2.0, 3, 0.5), steps=4, scheduler=name,
                                 height=16, width=16, guidance_scale=GUIDANCE,
                                 scheduler_options=options, extra_noise=0.4)[0]
  assert hires.extra_noise == 0.4
  with pytest.raises(ValueError, match="extra_noise is img2img's"):
    pipe.generate(PROMPTS[:1], extra_noise=0.4, steps=2, height=16, width=16)
  assert infotext.reproduce("a cat\nSteps: 20, Sampler: Euler, Seed: 1, Denoising strength: "
                            "0.5, Extra noise: 0.2").flags["extra_noise"] == "0.2"


def test_noise_batch_as_comfyui(pipes):
  """ComfyUI's batch noise (`noise_batch`): a batch of B draws its latents' noise from its seed
  at once (torch.randn of [B, C, h, w]), image k the k-th slice: the same images as diffusers given
  that draw; 5 images in batches of 2 take seeds s, s, s + 1, s + 1, s + 2."""
  _sd1_only(pipes)
  _, pipe, _ = pipes
  kw = dict(guidance_scale=GUIDANCE, scheduler="euler", steps=3, height=16, width=16)
  prompts = PROMPTS[:1] * 5
  ours = pipe.generate(prompts, seed=40, rng="torch_cpu", noise_batch=2, **kw)
  draws = []
  for seed, size in ((40, 2), (41, 2), (42, 2)):
    draws.append(torch.randn([size, 4, 8, 8], generator=torch.Generator().manual_seed(seed)))
  latents = torch.cat(draws)[:5].numpy().transpose(0, 2, 3, 1)
  want = pipe.generate(prompts, latents=latents, **kw)
  np.testing.assert_allclose(ours, want, rtol=0, atol=1e-5)
  alone = pipe.generate(prompts[:1], seed=40, rng="torch_cpu", **kw)
  np.testing.assert_allclose(ours[:1], alone, atol=1e-5)  # the first: its seed's own draw
  other = pipe.generate(prompts[:1], seed=41, rng="torch_cpu", **kw)[0]
  assert np.abs(ours[1] - other).max() > 1e-3
  for bad, match in ((dict(rng="jax"), "rng='torch_cpu'"),
                     (dict(rng="torch_cpu", subseed=3, subseed_strength=0.5), "variation seeds"),
                     (dict(rng="torch_cpu", scheduler="dpmpp_sde", brownian="torch_cpu"),
                      "Brownian tree")):
    with pytest.raises(ValueError, match=match):
      pipe.generate(prompts[:2], seed=40, noise_batch=2, **{**kw, **bad})


def test_hires_upscaler_by_a1111s_name():
  """A hires upscaler given as A1111 names it (its infotext, its UI) is sdjax's of that name;
  any other name is left for a model upscaler's file."""
  for name, key in (("Lanczos", "lanczos"), ("Latent (bicubic antialiased)",
                                             "latent-bicubic-antialiased"),
                    ("latent (Nearest-exact)", "latent-nearest-exact"), ("NONE", "none"),
                    ("latent-bicubic", "latent-bicubic"), ("R-ESRGAN 4x+", "R-ESRGAN 4x+")):
    assert sampling.hires_upscaler_key(name) == key
  assert sampling.Hires(upscaler="Lanczos").upscaler == "lanczos"
  assert not sampling.Hires(upscaler="Lanczos").in_latents
  with pytest.raises(ValueError, match="unknown hires upscaler 'Lanczos3'"):
    sampling.Hires(upscaler="Lanczos3").check()


def test_hires_model_must_take_the_latents():
  """A hires model continues the first pass's latents: the same channels and VAE scale, and a
  text-to-image UNet (an inpainting one would want a mask)."""
  import types  # noqa: PLC0415

  def fake(channels=4, scale=8, unet_in=4):
    return types.SimpleNamespace(vae=types.SimpleNamespace(config=types.SimpleNamespace(
        latent_channels=channels)), vae_scale=scale, unet=types.SimpleNamespace(
            config=types.SimpleNamespace(in_channels=unet_in)))

  sampling.check_hires_model(fake(), fake())
  with pytest.raises(ValueError, match=r"hires model's latents \(16 channels, 1/8 of the image\) "
                     r"are not the model's \(4, 1/8\)"):
    sampling.check_hires_model(fake(), fake(channels=16, unet_in=16))
  with pytest.raises(ValueError, match="are not the model's"):
    sampling.check_hires_model(fake(), fake(scale=4))
  with pytest.raises(ValueError, match="must be a text-to-image model .* takes 9 input channels"):
    sampling.check_hires_model(fake(), fake(unet_in=9))


@pytest.mark.parametrize("name,upscaler,hires_prompts,resize,hires_scheduler,hires_guidance", [
    ("euler", "latent", None, (40, 24), "ddim", None),
    ("dpmpp_2m_karras", "latent-bicubic-antialiased", (["a blue square", "a dog"], "blurry"),
     None, None, 2.5)])
def test_hires_fix_matches_diffusers(pipes, name, upscaler, hires_prompts, resize,
                                     hires_scheduler, hires_guidance):
  """hires_scale: diffusers' text-to-image to latents, torch's interpolate, then its img2img
  pipeline on those latents for the steps A1111 runs (the last 3 of int(3 / 0.6) = 5), with our
  draws of the second pass's noise; A1111's hires prompts are that pipeline's. hires_resize to
  another aspect (40x24 from 32x16): enlarged to cover (48x24), then 2 latent pixels cut from
  each side, as A1111; a hires scheduler (A1111's Hires sampler) is that pipeline's, and so is
  a hires guidance scale (Forge's Hires CFG Scale)."""
  import torch  # noqa: PLC0415

  ref, pipe, folder = pipes
  if _v_prediction(pipe) != (name == "euler"):
    pytest.skip("euler + latent is checked on the v-prediction family, the other on epsilon")
  cls, overrides = DIFFUSERS_SCHEDULERS[name]
  ref.scheduler = getattr(diffusers, cls).from_config(pipe.scheduler_config, **overrides)
  second_cls, second_overrides = DIFFUSERS_SCHEDULERS[hires_scheduler or name]
  img_pipe = diffusers.StableDiffusionImg2ImgPipeline(**{**ref.components, "scheduler": getattr(
      diffusers, second_cls).from_config(pipe.scheduler_config, **second_overrides)})
  img_pipe.set_progress_bar_config(disable=True)
  noise, seed, steps, hires_steps, strength = _unit_noise((2, 8, 16, 4), seed=5), 9, 4, 3, 0.6
  total = int(hires_steps / strength)
  keys = sampling.image_keys(jnp.asarray(sampling.make_seeds(seed, 2)))
  hw = (12, 20) if resize else (12, 24)
  second = nchw(np.asarray(sampling._keyed_noise(keys, sampling._HIRES_NOISE, (*hw, 4))))  # noqa: SLF001
  module = "diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img"
  with torch.no_grad():
    first = ref(PROMPTS, negative_prompt=NEGATIVES, num_inference_steps=steps,
                guidance_scale=GUIDANCE, height=16, width=32, latents=nchw(noise),
                output_type="latent").images
    mode, antialias = {"latent": ("bilinear", False),
                       "latent-bicubic-antialiased": ("bicubic", True)}[upscaler]
    enlarged = torch.nn.functional.interpolate(first, size=(12, 24), mode=mode,
                                               antialias=antialias)
    if resize:
      enlarged = enlarged[:, :, :, 2:22]
    second_prompts, second_negatives = hires_prompts or (PROMPTS, NEGATIVES)
    with mock.patch(f"{module}.randn_tensor", lambda *a, **k: second):
      negatives = [second_negatives] * 2 if isinstance(second_negatives, str) else NEGATIVES
      expected = img_pipe(second_prompts, negative_prompt=negatives, image=enlarged,
                          strength=(hires_steps + 0.5) / total, num_inference_steps=total,
                          guidance_scale=hires_guidance or GUIDANCE, output_type="np").images
  ours = pipe.generate(PROMPTS, negative_prompts=NEGATIVES, steps=steps, guidance_scale=GUIDANCE,
                       scheduler=name, height=16, width=32, latents=noise, seed=seed,
                       hires_scale=1.5, hires_steps=hires_steps, hires_strength=strength,
                       hires_upscaler=upscaler, hires_prompts=second_prompts,
                       hires_negative_prompts=second_negatives, hires_resize=resize,
                       hires_scheduler=hires_scheduler, hires_guidance_scale=hires_guidance)
  assert ours.shape == (2, 24, 40 if resize else 48, 3)
  err = rel(ours, expected)
  print(f"\nhires {name} {upscaler}: {err:.2e}")
  assert err <= 1e-4  # seen 7.0e-7, 4.0e-7; the first pass's prompts in the second: 1.3e-3


def _pixel_hires_err(pipes, enlarge, upscaler, *, noise_seed, seed, hires_steps, strength,
                     image_encode="sample"):
  """rel(ours, diffusers') of a hires fix with a pixel upscaler: diffusers' text-to-image
  images (16x32, 3 euler steps) as A1111 turns them into 8-bit levels (truncated), enlarged to
  24x48 by `enlarge` (uint8 [16, 32, 3] -> [24, 48, 3], A1111's resize_image written with
  PIL), then diffusers' img2img pipeline on them for the steps A1111 runs, with our draws of
  the posterior sample (`image_encode` "mode": its mode) and the second pass's noise; ours
  `generate(hires_upscaler=upscaler, image_encode=image_encode)`.
  The 8-bit levels are those of our first pass, checked against diffusers' to 1e-6 first: a
  level is a floor, which a float32 ulp between the two first passes can move by one (a jump of
  1/255 that the rest of the fix carries), and that says nothing of the steps after it."""
  ref, pipe, _ = pipes
  ref.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler_config)
  img_pipe = diffusers.StableDiffusionImg2ImgPipeline(**ref.components)
  img_pipe.set_progress_bar_config(disable=True)
  noise, steps = _unit_noise((2, 8, 16, 4), seed=noise_seed), 3
  total = int(hires_steps / strength)
  keys = sampling.image_keys(jnp.asarray(sampling.make_seeds(seed, 2)))
  second = np.asarray(sampling._keyed_noise(keys, sampling._HIRES_NOISE, (12, 24, 4)))  # noqa: SLF001
  first = ref(PROMPTS, negative_prompt=NEGATIVES, num_inference_steps=steps,
              guidance_scale=GUIDANCE, height=16, width=32, latents=nchw(noise),
              output_type="np").images
  ours_first = pipe.generate(PROMPTS, negative_prompts=NEGATIVES, steps=steps,
                             guidance_scale=GUIDANCE, scheduler="euler", height=16, width=32,
                             latents=noise, seed=seed)
  assert rel(ours_first, first) <= 1e-6
  levels = np.floor(ours_first * np.float32(255.0)).astype(np.uint8)  # A1111's astype(np.uint8)
  enlarged = np.stack([enlarge(x) for x in levels])
  module = "diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img"
  with img2img_draws(module, seed, (12, 24, 4), second, mode=image_encode == "mode"):
    expected = img_pipe(PROMPTS, negative_prompt=NEGATIVES,
                        image=enlarged.astype(np.float32) / np.float32(255.0),
                        strength=(hires_steps + 0.5) / total, num_inference_steps=total,
                        guidance_scale=GUIDANCE, output_type="np").images
  ours = pipe.generate(PROMPTS, negative_prompts=NEGATIVES, steps=steps, guidance_scale=GUIDANCE,
                       scheduler="euler", height=16, width=32, latents=noise, seed=seed,
                       hires_scale=1.5, hires_steps=hires_steps, hires_strength=strength,
                       hires_upscaler=upscaler, image_encode=image_encode)
  assert ours.shape == (2, 24, 48, 3)
  return rel(ours, expected)


@pytest.mark.parametrize("upscaler", ["lanczos", "nearest"])  # "none": Lanczos, by its steps
def test_pixel_hires_upscaler_matches_diffusers(pipes, upscaler):
  """A1111's pixel upscalers (Lanczos, Nearest): here one PIL resize, 16x32 -> 24x48 (Nearest's
  images encoded to the posterior's mode, image_encode="mode")."""
  from PIL import Image  # noqa: PLC0415

  if _v_prediction(pipes[1]) != (upscaler == "nearest"):
    pytest.skip("lanczos is checked on the epsilon family, nearest on the v-prediction one")
  assert upscaling.resize_steps(upscaler, (16, 32), (24, 48)) == (
      ((24, 48), upscaler),)
  filt = {"lanczos": Image.LANCZOS, "nearest": Image.NEAREST}[upscaler]

  def enlarge(x):
    if upscaler == "lanczos":  # PIL 9.5's two passes, horizontal first
      return np.asarray(Image.fromarray(x).resize((48, 16), filt).resize((48, 24), filt))
    return np.asarray(Image.fromarray(x).resize((48, 24), filt))

  err = _pixel_hires_err(pipes, enlarge, upscaler, noise_seed=8, seed=5, hires_steps=3,
                         strength=0.6, image_encode="mode" if upscaler == "nearest" else "sample")
  print(f"\nhires {upscaler} (pixel): {err:.2e}")
  assert err <= 1e-5


@pytest.mark.parametrize("tile", [0, 24])
def test_model_hires_upscaler_matches_diffusers(pipes, tmp_path, tile):
  """A model upscaler (an ESRGAN file): one 4x pass, whole or in tiles of 24 overlapping by 4,
  then Lanczos from 64x128 to 24x48 (the steps written with PIL in esrgan_reference; the
  network our converted one, whose parity test_upscaling checks)."""
  import esrgan_reference  # noqa: PLC0415
  from PIL import Image  # noqa: PLC0415

  _sd1_only(pipes)
  net = esrgan_reference.random_rrdbnet(seed=4, blocks=1, feat=8, grow=8)
  path = str(tmp_path / "4x-Tiny.pth")
  torch.save(net.state_dict(), path)
  upscaler = sdjax.load_upscaler(path, tile=tile, overlap=4)
  apply = jax.jit(lambda x: upscaling.esrgan.network(upscaler.spec.config).apply(
      {"params": upscaler.params}, x))

  def enlarge(x):
    return np.asarray(esrgan_reference.a1111_resize_with_model(
        lambda x: np.asarray(apply(x)), Image.fromarray(x), 48, 24, tile, 4))

  err = _pixel_hires_err(pipes, enlarge, upscaler, noise_seed=9, seed=6, hires_steps=2,
                         strength=0.5)
  print(f"\nhires {upscaler.name} tile {tile}: {err:.2e}")
  assert err <= 1e-5


def test_hires_model_matches_diffusers(pipes, tmp_path):
  """hires_model (A1111's Hires checkpoint): the first pass's latents, enlarged, continue in
  another model's img2img pipeline: here an SD2 (v-prediction, its own text encoder, UNet,
  schedule and VAE) after an SD1; the first pass's scheduler by name on the second model's
  config, as A1111 builds its sampler on the model it switched to."""
  import torch  # noqa: PLC0415

  _sd1_only(pipes)
  ref, pipe, _ = pipes
  testing.write_torch_pipeline(str(tmp_path / "sd2"), "sd2", seed=22)
  hires_ref = diffusers.StableDiffusionImg2ImgPipeline.from_pretrained(
      str(tmp_path / "sd2"), safety_checker=None, requires_safety_checker=False)
  hires_ref.set_progress_bar_config(disable=True)
  hires_model = sdjax.load_pipeline(str(tmp_path / "sd2"))
  ref.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler_config)
  hires_ref.scheduler = diffusers.EulerDiscreteScheduler.from_config(hires_model.scheduler_config)
  noise, seed, steps, hires_steps, strength = _unit_noise((2, 8, 8, 4), seed=6), 4, 3, 3, 0.6
  total = int(hires_steps / strength)
  keys = sampling.image_keys(jnp.asarray(sampling.make_seeds(seed, 2)))
  second = nchw(np.asarray(sampling._keyed_noise(keys, sampling._HIRES_NOISE, (16, 16, 4))))  # noqa: SLF001
  module = "diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img"
  with torch.no_grad():
    first = ref(PROMPTS, negative_prompt=NEGATIVES, num_inference_steps=steps,
                guidance_scale=GUIDANCE, height=16, width=16, latents=nchw(noise),
                output_type="latent").images
    enlarged = torch.nn.functional.interpolate(first, size=(16, 16), mode="bilinear")
    with mock.patch(f"{module}.randn_tensor", lambda *a, **k: second):
      expected = hires_ref(PROMPTS, negative_prompt=NEGATIVES, image=enlarged,
                           strength=(hires_steps + 0.5) / total, num_inference_steps=total,
                           guidance_scale=GUIDANCE, output_type="np").images
  kw = dict(negative_prompts=NEGATIVES, steps=steps, guidance_scale=GUIDANCE, scheduler="euler",
            height=16, width=16, latents=noise, seed=seed, hires_scale=2.0,
            hires_steps=hires_steps, hires_strength=strength)
  ours = pipe.generate(PROMPTS, hires_model=hires_model, **kw)
  err = rel(ours, expected)
  print(f"\nhires model (sd1 -> sd2): {err:.2e}")
  assert err <= 1e-4
  assert rel(pipe.generate(PROMPTS, **kw), expected) > 1e-2  # the first model's second pass
  with pytest.raises(ValueError, match="hires_model is the hires pass's model: give hires_scale"):
    pipe.generate(PROMPTS, hires_model=hires_model, steps=2)


def test_hires_pass_prompt_edits_count_on(pipes):
  """A1111 syntax: the hires pass's schedules continue the first pass's count, so an edit at
  1.5 (past the first pass: "red" throughout it) switches halfway through the hires pass."""
  _sd1_only(pipes)
  _, pipe, _ = pipes
  kw = dict(steps=2, guidance_scale=GUIDANCE, scheduler="euler", height=16, width=16, seed=3,
            hires_scale=2.0, hires_steps=4, hires_strength=0.5, prompt_syntax="a1111")
  edited, red = (pipe.generate([p], **kw) for p in ("a [red:blue:1.5] cat", "a red cat"))
  # The first pass reads both as "a red cat" (`test_prompts`); without the count going on, the
  # images are bit-equal. The tiny random text encoder moves images little.
  assert rel(edited, red) > 1e-5


# Samplers that draw from the generator at each step, as diffusers configures them.
GENERATOR_SCHEDULERS = {
    "euler_ancestral": ("EulerAncestralDiscreteScheduler", {}, {}),
    "dpmpp_2m_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}, {}),
    "kdpm2_ancestral": ("KDPM2AncestralDiscreteScheduler", {}, {}),  # one draw per two calls
    "tcd": ("TCDScheduler", {}, {"eta": 0.3}),  # no draw on the last step
    "dpmpp_2s": ("DPMSolverSinglestepScheduler", {"algorithm_type": "sde-dpmsolver++"}, {}),
}


def _generators(seed: int, n: int) -> list[torch.Generator]:
  return [torch.Generator().manual_seed(seed + i) for i in range(n)]


@pytest.mark.parametrize("name", list(GENERATOR_SCHEDULERS))
def test_torch_generators_match_diffusers(pipes, name):
  """rng="torch_cpu": diffusers' images for per-image CPU generators of the same seeds (the
  initial noise and every step's), with no noise passed in; img2img draws its posterior sample
  first. The default rng's images differ."""
  _sd1_only(pipes)
  ref, pipe, folder = pipes
  cls, config, extra = GENERATOR_SCHEDULERS[name]
  ref.scheduler = getattr(diffusers, cls).from_config(pipe.scheduler_config, **config)
  common = dict(guidance_scale=GUIDANCE, height=16, width=16, **extra)
  expected = ref(PROMPTS, negative_prompt=NEGATIVES, num_inference_steps=5,
                 generator=_generators(40, 2), output_type="np", **common).images
  ours = pipe.generate(PROMPTS, negative_prompts=NEGATIVES, steps=5, scheduler=name, seed=40,
                       rng="torch_cpu", scheduler_options=config or None, **common)
  err = rel(ours, expected)
  print(f"\n{name} with torch generators: {err:.2e}")
  assert err <= 1e-5
  jax_rng = pipe.generate(PROMPTS, negative_prompts=NEGATIVES, steps=5, scheduler=name,
                          seed=40, scheduler_options=config or None, **common)
  assert rel(jax_rng, expected) > 1e-2
  if name != "kdpm2_ancestral":
    return
  img_pipe = diffusers.StableDiffusionImg2ImgPipeline(**ref.components)
  img_pipe.set_progress_bar_config(disable=True)
  images = np.random.default_rng(3).uniform(size=(2, 16, 16, 3)).astype(np.float32)
  expected = img_pipe(PROMPTS, image=images, strength=0.6, num_inference_steps=5,
                      guidance_scale=GUIDANCE, generator=_generators(7, 2),
                      output_type="np").images
  ours = pipe.generate(PROMPTS, init_images=images, strength=0.6, steps=5, seed=7,
                       guidance_scale=GUIDANCE, scheduler=name, rng="torch_cpu")
  err = rel(ours, expected)
  print(f"img2img {name} with torch generators: {err:.2e}")
  assert err <= 1e-5


def _a1111_slerp(val, low, high):
  """A1111's `slerp` of two [C, h, w] noises (modules/rng.py), written out in torch."""
  low_norm = low / torch.norm(low, dim=1, keepdim=True)
  high_norm = high / torch.norm(high, dim=1, keepdim=True)
  dot = (low_norm * high_norm).sum(1)
  if dot.mean() > 0.9995:
    return low * val + high * (1 - val)
  omega = torch.acos(dot)
  so = torch.sin(omega)
  return ((torch.sin((1.0 - val) * omega) / so).unsqueeze(1) * low
          + (torch.sin(val * omega) / so).unsqueeze(1) * high)


def test_torch_generators_through_the_hires_fix(pipes):
  """rng="torch_cpu" with the hires fix, as A1111's "RNG: CPU" runs it: each pass starts its
  images' generators again from their seeds, the second drawing its noise at its size first,
  then its steps'. diffusers' text-to-image, torch's interpolate and its img2img pipeline on the
  latents (which draws no posterior sample), each given fresh generators: nothing patched."""
  _sd1_only(pipes)
  ref, pipe, _ = pipes
  ref.scheduler = diffusers.EulerAncestralDiscreteScheduler.from_config(pipe.scheduler_config)
  img_pipe = diffusers.StableDiffusionImg2ImgPipeline(**ref.components)
  img_pipe.set_progress_bar_config(disable=True)
  seed, hires_steps, strength = 12, 3, 0.6
  total = int(hires_steps / strength)
  with torch.no_grad():
    first = ref(PROMPTS, num_inference_steps=4, guidance_scale=GUIDANCE, height=16, width=16,
                generator=_generators(seed, 2), output_type="latent").images
    enlarged = torch.nn.functional.interpolate(first, size=(12, 12), mode="bilinear")
    expected = img_pipe(PROMPTS, image=enlarged, strength=(hires_steps + 0.5) / total,
                        num_inference_steps=total, guidance_scale=GUIDANCE,
                        generator=_generators(seed, 2), output_type="np").images
  ours = pipe.generate(PROMPTS, steps=4, guidance_scale=GUIDANCE, scheduler="euler_ancestral",
                       height=16, width=16, seed=seed, rng="torch_cpu", hires_scale=1.5,
                       hires_steps=hires_steps, hires_strength=strength)
  err = rel(ours, expected)
  print(f"\nhires fix with torch generators: {err:.2e}")
  assert err <= 1e-5


def _matches_a1111_noise(pipes, what, latents, generators, **ours):
  """Euler a, 4 steps at 16x16, rng="torch_cpu" with `ours` (the seed among them): diffusers'
  images given `latents` [B, 4, 8, 8] (built as A1111 builds its first noise) and `generators`
  for the steps' noise."""
  ref, pipe, _ = pipes
  ref.scheduler = diffusers.EulerAncestralDiscreteScheduler.from_config(pipe.scheduler_config)
  common = dict(guidance_scale=GUIDANCE, height=16, width=16)
  expected = ref(PROMPTS, num_inference_steps=4, generator=generators,
                 latents=torch.stack(latents), output_type="np", **common).images
  got = pipe.generate(PROMPTS, steps=4, scheduler="euler_ancestral", rng="torch_cpu", **ours,
                      **common)
  err = rel(got, expected)
  print(f"\n{what} with torch generators: {err:.2e}")
  assert err <= 1e-5


def test_variation_seeds(pipes):
  """A1111's variation seeds with rng="torch_cpu": each image's initial noise is A1111's slerp of
  its generator's first draw towards its subseed's (a fresh generator's first draw), and the
  step noise goes on from its own generator: diffusers given those latents and generators that
  drew them. Strength 0 is no variation, bit for bit; 1 is the subseed's noise; any strength
  runs the same program."""
  _sd1_only(pipes)
  _, pipe, _ = pipes
  seed, subseed, strength = 40, 900, 0.3
  generators, latents = _generators(seed, 2), []
  for i, gen in enumerate(generators):
    noise = torch.randn((4, 8, 8), generator=gen)
    subnoise = torch.randn((4, 8, 8), generator=torch.Generator().manual_seed(subseed + i))
    latents.append(_a1111_slerp(strength, noise, subnoise))
  _matches_a1111_noise(pipes, "variation seeds", latents, generators, seed=seed,
                       subseed=subseed, subseed_strength=strength)
  common = dict(guidance_scale=GUIDANCE, height=16, width=16, steps=3, scheduler="ddim")
  plain = pipe.generate(PROMPTS, seed=seed, **common)
  np.testing.assert_array_equal(
      pipe.generate(PROMPTS, seed=seed, subseed=subseed, subseed_strength=0.0, **common), plain)
  np.testing.assert_allclose(
      pipe.generate(PROMPTS, seed=seed, subseed=subseed, subseed_strength=1.0, **common),
      pipe.generate(PROMPTS, seed=subseed, **common), atol=1e-6)
  before = sampling.trace_count
  half = pipe.generate(PROMPTS, seed=seed, subseed=subseed, subseed_strength=0.5, **common)
  assert sampling.trace_count == before and rel(half, plain) > 0.05
  with pytest.raises(ValueError, match="needs a subseed"):
    pipe.generate(PROMPTS, subseed_strength=0.5, **common)
  with pytest.raises(ValueError, match=r"subseed_strength must be in \[0, 1\]"):
    pipe.generate(PROMPTS, subseed=1, subseed_strength=1.5, **common)


def test_eta_noise_seed_delta(pipes):
  """A1111's ENSD with rng="torch_cpu": the initial noise is the seed generator's first draw, the
  steps' noise comes from a generator seeded seed + ensd: diffusers given those latents and
  those generators. Deterministic samplers do not see it; a refiner's steps go on from the
  base's in that stream."""
  _sd1_only(pipes)
  _, pipe, _ = pipes
  seed, ensd = 40, 31337
  latents = [torch.randn((4, 8, 8), generator=g) for g in _generators(seed, 2)]
  _matches_a1111_noise(pipes, "ENSD", latents, _generators(seed + ensd, 2), seed=seed, ensd=ensd)
  ddim = dict(steps=3, scheduler="ddim", seed=seed, guidance_scale=GUIDANCE, height=16, width=16)
  np.testing.assert_array_equal(pipe.generate(PROMPTS, ensd=ensd, **ddim),
                                pipe.generate(PROMPTS, **ddim))
  base, state = sampling.prepare(pipe, 2, steps=6, scheduler="euler_ancestral", height=16,
                                 width=16, guidance_scale=GUIDANCE, denoising_end=0.5,
                                 rng="torch_cpu", ensd=ensd)
  assert 0 < base.end < 6
  assert sampling.stream_draws(base, len(state.timesteps)) == base.end  # the steps' draws only
  base = dataclasses.replace(base, ensd=0)
  assert sampling.stream_draws(base, len(state.timesteps)) == base.end + 1  # the noise first
  with pytest.raises(ValueError, match=r"ensd \(eta noise seed delta\) must be an integer"):
    pipe.generate(PROMPTS, ensd=-1, **ddim)


def test_seed_resize_from(pipes):
  """A1111's "Resize seed from" with rng="torch_cpu" (and a variation seed, applied at that
  size): each seed's noise at 24x8 pixels (latents 4 x 12), varied towards its subseed's there,
  pasted at the centre of its generator's own first draw at 16x16 (8 x 8: two rows of its own
  above and below, two columns of the pasted cut from each side), as A1111's ImageRNG builds
  it; the steps' noise then goes on from the image's generator. diffusers given those latents
  and generators that drew once."""
  _sd1_only(pipes)
  _, pipe, _ = pipes
  seed, subseed, strength = 40, 7, 0.3
  generators, latents = _generators(seed, 2), []
  for i, gen in enumerate(generators):
    own = torch.randn((4, 8, 8), generator=gen)
    small = torch.randn((4, 4, 12), generator=torch.Generator().manual_seed(seed + i))
    sub = torch.randn((4, 4, 12), generator=torch.Generator().manual_seed(subseed + i))
    own[:, 2:6, 0:8] = _a1111_slerp(strength, small, sub)[:, 0:4, 2:10]
    latents.append(own)
  _matches_a1111_noise(pipes, "seed resize", latents, generators, seed=seed, subseed=subseed,
                       subseed_strength=strength, seed_resize_from=(24, 8))
  ddim = dict(steps=3, scheduler="ddim", seed=seed, guidance_scale=GUIDANCE, height=16, width=16)
  np.testing.assert_array_equal(pipe.generate(PROMPTS, seed_resize_from=(0, 8), **ddim),
                                pipe.generate(PROMPTS, **ddim))  # a 0 side: off, as A1111


def test_ddim_eta_matches_diffusers_and_compiles_once(pipes):
  """eta > 0: diffusers' DDIM step given our per-step noise (`variance_noise`, drawn from each
  image's seed) lands on the same images; another eta reuses the compiled program."""
  _sd1_only(pipes)
  ref, pipe, _ = pipes
  seed, eta, steps = 11, 0.5, 4
  keys = sampling.image_keys(jnp.asarray(sampling.make_seeds(seed, 2)))
  step_noise = [nchw(np.asarray(sampling._keyed_noise(keys, sampling._STEP_NOISE, (8, 8, 4), i)))
                for i in range(steps)]

  class NoisedDDIM(diffusers.DDIMScheduler):
    def step(self, model_output, timestep, sample, eta=0.0, **kwargs):
      i = list(self.timesteps).index(timestep)
      kwargs.pop("generator", None)
      return super().step(model_output, timestep, sample, eta=eta,
                          variance_noise=step_noise[i], **kwargs)

  ref.scheduler = NoisedDDIM.from_config(pipe.scheduler_config)
  latents = _unit_noise((2, 8, 8, 4), seed=7)
  expected = ref(PROMPTS, num_inference_steps=steps, guidance_scale=GUIDANCE, eta=eta, height=16,
                 width=16, latents=nchw(latents), output_type="np").images
  ours = pipe.generate(PROMPTS, steps=steps, guidance_scale=GUIDANCE, scheduler="ddim", eta=eta,
                       height=16, width=16, latents=latents, seed=seed)
  deterministic = pipe.generate(PROMPTS, steps=steps, guidance_scale=GUIDANCE, scheduler="ddim",
                                height=16, width=16, latents=latents, seed=seed)
  err = rel(ours, expected)
  print(f"\nddim eta={eta} vs diffusers: {err:.2e}")
  assert err <= 1e-3 and rel(deterministic, expected) > 10 * err
  before = sampling.trace_count
  other = pipe.generate(PROMPTS, steps=steps, guidance_scale=GUIDANCE, scheduler="ddim", eta=1.0,
                        height=16, width=16, latents=latents, seed=seed)
  assert sampling.trace_count == before and rel(other, ours) > 10 * err


@pytest.mark.parametrize("name,options", [
    ("euler", {"timestep_spacing": "trailing"}),  # SDXL Lightning's
    ("dpmpp_2m", {"use_karras_sigmas": True, "final_sigmas_type": "sigma_min"}),
])
def test_scheduler_options_match_diffusers(pipes, name, options):
  """scheduler_options override the checkpoint's scheduler config as diffusers'
  `from_config(config, **options)` does."""
  _sd1_only(pipes)
  ref, pipe, _ = pipes
  cls, overrides = {**DIFFUSERS_SCHEDULERS, "dpmpp_2m": ("DPMSolverMultistepScheduler", {})}[name]
  ref.scheduler = getattr(diffusers, cls).from_config(pipe.scheduler_config,
                                                      **{**overrides, **options})
  latents = _unit_noise((2, 8, 8, 4), seed=9)
  expected = ref(PROMPTS, num_inference_steps=4, guidance_scale=GUIDANCE, height=16, width=16,
                 latents=nchw(latents), output_type="np").images
  kw = dict(steps=4, guidance_scale=GUIDANCE, scheduler=name, height=16, width=16, latents=latents)
  ours = pipe.generate(PROMPTS, scheduler_options=options, **kw)
  err = rel(ours, expected)
  print(f"\n{name} with {options}: {err:.2e}")
  assert err <= 1e-3
  # The options change the schedule (the default's is another program, not compiled here).
  plain, changed = (schedulers.get_scheduler(name, pipe.scheduler_config, options=o)
                    .set_timesteps(4, sample_shape=latents.shape) for o in (None, options))
  assert not np.array_equal(plain.timesteps, changed.timesteps)
  with pytest.raises(ValueError, match=f"scheduler '{name}' has no option 'spacing'"):
    pipe.generate(PROMPTS, scheduler_options={"spacing": "trailing"}, **kw)


@pytest.mark.parametrize("name,guidance,eta", [("lcm", 1.0, 0.0), ("tcd", 1.5, 0.3)])
def test_lcm_and_tcd_match_diffusers(pipes, name, guidance, eta):
  """LCM and TCD (LCM-, TCD-LoRA's and Hyper-SD's samplers: few steps, little or no guidance):
  diffusers' pipeline with its LCMScheduler / TCDScheduler (TCD's gamma: the pipeline's `eta`)
  given our per-step noise (drawn from each image's seed; none after the last)."""
  _sd1_only(pipes)
  ref, pipe, _ = pipes
  seed, steps = 5, 4
  keys = sampling.image_keys(jnp.asarray(sampling.make_seeds(seed, 2)))
  draws = iter([nchw(np.asarray(sampling._keyed_noise(keys, sampling._STEP_NOISE, (8, 8, 4), i)))
                for i in range(steps - 1)])
  cls = {"lcm": diffusers.LCMScheduler, "tcd": diffusers.TCDScheduler}[name]
  ref.scheduler = cls.from_config(pipe.scheduler_config)
  latents = _unit_noise((2, 8, 8, 4), seed=8)
  with mock.patch(f"{cls.__module__}.randn_tensor", lambda *a, **k: next(draws)):
    expected = ref(PROMPTS, num_inference_steps=steps, guidance_scale=guidance, height=16,
                   width=16, latents=nchw(latents), output_type="np", eta=eta).images
  assert next(draws, None) is None  # a draw for every step but the last
  ours = pipe.generate(PROMPTS, steps=steps, guidance_scale=guidance, scheduler=name, height=16,
                       width=16, latents=latents, seed=seed, eta=eta)
  err = rel(ours, expected)
  print(f"\n{name}, guidance {guidance}, eta {eta}: {err:.2e}")
  assert err <= 1e-3


def test_lcm_distilled_unet_matches_diffusers(pipes, tmp_path):
  """An LCM-distilled UNet (time_cond_proj_dim, here odd: the embedding's zero pad) with its
  LCMScheduler: no CFG, the guidance scale as the guidance embedding (`timestep_cond`), as
  diffusers' StableDiffusionPipeline runs it; predict_noise takes timestep_cond too."""
  _sd1_only(pipes)
  ref, _, _ = pipes
  unet = testing.torch_unet({**testing.UNET_SD1, "time_cond_proj_dim": 9}, seed=31)
  lcm = diffusers.StableDiffusionPipeline(
      vae=ref.vae, text_encoder=ref.text_encoder, tokenizer=ref.tokenizer, unet=unet,
      scheduler=diffusers.LCMScheduler.from_config(ref.scheduler.config), safety_checker=None,
      feature_extractor=None, requires_safety_checker=False)
  lcm.set_progress_bar_config(disable=True)
  folder = str(tmp_path / "lcm")
  lcm.save_pretrained(folder, safe_serialization=True)
  pipe = sdjax.load_pipeline(folder)
  assert pipe.unet.config.time_cond_proj_dim == 9

  guidance, seed, steps = 4.0, 6, 3
  w = lcm.get_guidance_scale_embedding(torch.tensor([guidance - 1] * 2), embedding_dim=9)
  ours_w = sdjax.conditioning.guidance_embedding(jnp.float32(guidance), 2, 9)
  # sin and cos of float32 angles up to w = 3000: an ulp of the angle 139 (1.5e-5) shows.
  np.testing.assert_allclose(ours_w, w.numpy(), rtol=0, atol=2e-5)
  x, ctx = _unit_noise((2, 8, 8, 4), seed=2), _unit_noise((2, 77, 32), seed=3)
  t = np.array([999, 259])
  with torch.no_grad():
    eps = unet(nchw(x), torch.from_numpy(t), torch.from_numpy(ctx), timestep_cond=w).sample
  got = pipe.predict_noise(x, t, ctx, timestep_cond=w.numpy())
  assert rel(got, eps.numpy().transpose(0, 2, 3, 1)) <= 1e-5

  keys = sampling.image_keys(jnp.asarray(sampling.make_seeds(seed, 2)))
  draws = iter([nchw(np.asarray(sampling._keyed_noise(keys, sampling._STEP_NOISE, (8, 8, 4), i)))
                for i in range(steps - 1)])
  latents = _unit_noise((2, 8, 8, 4), seed=10)
  with mock.patch("diffusers.schedulers.scheduling_lcm.randn_tensor", lambda *a, **k: next(draws)):
    expected = lcm(PROMPTS, num_inference_steps=steps, guidance_scale=guidance, height=16,
                   width=16, latents=nchw(latents), output_type="np").images
  ours = pipe.generate(PROMPTS, steps=steps, guidance_scale=guidance, height=16, width=16,
                       latents=latents, seed=seed)  # the checkpoint's own scheduler: lcm
  err = rel(ours, expected)
  print(f"\nLCM-distilled UNet: predict_noise {rel(got, eps.numpy().transpose(0, 2, 3, 1)):.2e}, "
        f"generate {err:.2e}")
  assert err <= 1e-3
  other = pipe.generate(PROMPTS, steps=steps, guidance_scale=8.0, height=16, width=16,
                        latents=latents, seed=seed)
  assert rel(other, ours) > 10 * err  # the guidance scale reaches the UNet


def test_true_noise_model_recovers_clean_sample():
  """A model that predicts the exact noise of x_t around a known x0 must give x0 back."""
  config = {**testing.SCHEDULER_SD15, "set_alpha_to_one": True}
  sched = schedulers.get_scheduler("ddim", config)
  state = sched.set_timesteps(10, sample_shape=(2, 4, 4, 4))
  alphas = jnp.asarray(np.cumprod(1 - np.asarray(schedulers.common.make_betas(
      sched.cfg), np.float64)), jnp.float32)
  x0 = jnp.asarray(_unit_noise((2, 4, 4, 4), seed=5)) * 0.5

  def true_noise(x_t, t, call=None):
    a = alphas[t.astype(jnp.int32)]
    return (x_t - jnp.sqrt(a) * x0) / jnp.sqrt(1 - a)

  spec = sampling.SampleSpec(sched, 0, (4, 4), False, False, False)
  x_start = jnp.asarray(_unit_noise((2, 4, 4, 4), seed=6))
  out = jax.jit(lambda x: sampling._denoise(spec, true_noise, state, x, None))(x_start)
  np.testing.assert_allclose(np.asarray(out), np.asarray(x0), atol=1e-5)


def test_guidance_formula():
  u, c = jnp.ones((1, 2, 2, 1)), jnp.full((1, 2, 2, 1), 3.0)
  np.testing.assert_allclose(sampling.guide(u, c, 2.5), np.full((1, 2, 2, 1), 6.0))


def test_compiles_once_per_shape(pipes):
  _sd1_only(pipes)
  _, pipe, _ = pipes
  pipe.generate(["warm up"], steps=3, scheduler="euler", seed=1)
  before = sampling.trace_count
  a = pipe.generate(["a cat"], steps=3, scheduler="euler", seed=2, guidance_scale=5.0)
  b = pipe.generate(["a dog"], negative_prompts="red", steps=3, scheduler="euler", seed=9,
                    guidance_scale=9.0)
  assert sampling.trace_count == before
  assert not np.allclose(a, b)


@pytest.mark.parametrize("scheduler,rng", [("euler_ancestral", "jax"),
                                           ("dpmpp_sde_karras", "jax"),
                                           ("dpmpp_sde_karras", "torch_cpu")])
def test_each_image_depends_on_its_seed_alone(pipes, scheduler, rng):
  """Stochastic samplers draw each step's noise from the image's own seed (dpmpp_sde: two
  stages a step, the second's noise built from the first's; the same noise path serves every
  stochastic scheduler), with either rng (dpmpp_sde's Brownian noise stays JAX's: diffusers
  does not take it from the generator)."""
  _sd1_only(pipes)
  _, pipe, _ = pipes
  prompts = ["a red circle", "a cat", "a dog"]
  batch = pipe.generate(prompts, steps=3, scheduler=scheduler, seed=40, rng=rng)
  alone = pipe.generate(prompts[1], steps=3, scheduler=scheduler, seed=41, rng=rng)
  np.testing.assert_allclose(batch[1], alone[0], atol=1e-5)
  again = pipe.generate(prompts, steps=3, scheduler=scheduler, seed=40, rng=rng)
  np.testing.assert_array_equal(batch, again)
  assert not np.allclose(batch[0], batch[1])


def test_default_size_and_bfloat16(pipes):
  _sd1_only(pipes)
  _, _, folder = pipes
  half = sdjax.load_pipeline(folder, dtype="bfloat16")
  out = half.generate(PROMPTS, steps=3)  # the checkpoint's own scheduler, native size
  assert out.shape == (2, half.native_size, half.native_size, 3)
  assert np.isfinite(out).all() and out.min() >= 0 and out.max() <= 1


def test_restart_below_20_steps_is_heun_over_karras(pipes):
  """A1111's Restart plans no restart below 20 steps: generate() then makes Heun's image over
  the same Karras levels (from 20 steps its walk is checked against its loop in
  test_k_diffusion)."""
  _sd1_only(pipes)
  _, pipe, _ = pipes
  common = dict(steps=5, guidance_scale=GUIDANCE, seed=7, height=64, width=64)
  got = pipe.generate(PROMPTS, scheduler="restart", **common)
  want = pipe.generate(PROMPTS, scheduler="heun", scheduler_options={
      "use_karras_sigmas": True, "timestep_spacing": "linspace"}, **common)
  np.testing.assert_allclose(got, want, atol=2e-6)


def test_a1111_forms_follow_only_where_the_hires_sampler_has_them(pipes):
  """An A1111 image's Euler a with Eta and k-diffusion's form, its hires pass DPM++ SDE (which
  takes neither): the hires pass runs without them, as A1111's, rather than failing."""
  _sd1_only(pipes)
  _, pipe, _ = pipes
  common = dict(steps=2, guidance_scale=GUIDANCE, seed=7, height=64, width=64, hires_scale=1.5,
                hires_steps=1)
  options = {"timestep_spacing": "linspace", "k_diffusion": True}
  got = pipe.generate(PROMPTS[:1], scheduler="euler_ancestral", hires_scheduler="dpmpp_sde",
                      scheduler_options={**options, "eta": 0.5}, **common)
  assert got.shape == (1, 96, 96, 3) and np.isfinite(got).all()


@pytest.mark.parametrize("kwargs,match", [
    ({"scheduler": "fancy"}, "unknown scheduler 'fancy'"),
    ({"steps": 0}, "steps must be a positive integer"),
    ({"height": 10}, "height must be a positive multiple of"),
    ({"width": 0}, "width must be a positive multiple of"),
    ({"seed": -1}, "seed must be in"),
    ({"seed": 2**32 - 1}, "seed must be in"),  # the second image's seed would not fit
    ({"latents": np.zeros((1, 4, 4, 4))}, "latents must have shape"),
    ({"negative_prompts": ["a", "b", "c"]}, "negative_prompts: got 3 entries"),
    ({"eta": 0.5, "scheduler": "euler"}, "eta is an option of ddim, tcd, ddim_cfg_pp only"),
    ({"eta": -1.0, "scheduler": "ddim"}, "eta must be a number >= 0"),
    ({"eta": float("inf"), "scheduler": "ddim"}, "eta must be a number >= 0"),
    ({"guidance_scale": float("nan")}, "guidance_scale must be a finite number, got nan"),
    ({"guidance_rescale": float("inf")}, "guidance_rescale must be a finite number, got inf"),
    ({"hires_prompts": "a cat"}, "hires_prompts and hires_negative_prompts are the hires pass"),
    ({"rng": "cuda"}, "unknown rng 'cuda'; use one of jax, torch_cpu, nv"),
    ({"rng": "torch_cpu", "latents": np.zeros((2, 8, 8, 4))}, "give seed, not latents"),
    ({"hires_scale": 2.0, "hires_negative_prompts": ["a"] * 3},
     "hires_negative_prompts: got 3 entries"),
])
def test_bad_arguments(pipes, kwargs, match):
  _sd1_only(pipes)
  _, pipe, _ = pipes
  with pytest.raises(ValueError, match=match):
    pipe.generate(PROMPTS, **kwargs)


def test_decode_in_chunks(monkeypatch):
  """Large batches decode (and img2img encodes) a few images at a time (a scan): the same
  images, less memory."""
  import functools

  from sdjax.models.vae import AutoencoderKL, VAEConfig

  assert sampling.decode_chunk(8, 64, 64) == 1  # SD1.5 at 512x512: one at a time
  assert sampling.decode_chunk(6, 32, 32) == 3  # the largest divisor within the limit
  assert sampling.decode_chunk(7, 32, 32) == 1
  assert sampling.decode_chunk(3, 8, 8) == 3  # small images: the whole batch at once
  vae = AutoencoderKL(VAEConfig.from_dict(testing.VAE))
  params = vae.init(jax.random.key(0), jnp.zeros((1, 8, 12, 3)))["params"]
  z = _unit_noise((6, 4, 6, 4), seed=3)
  decode = jax.jit(functools.partial(sampling.decode_images, vae))
  whole = decode(params, z)
  monkeypatch.setattr(sampling, "DECODE_LATENT_PIXELS", 2 * 4 * 6)
  assert sampling.decode_chunk(6, 4, 6) == 2
  chunked = jax.jit(functools.partial(sampling.decode_images, vae))
  assert "scan" in str(jax.make_jaxpr(chunked)(params, z))
  out = chunked(params, z)
  assert out.shape == whole.shape == (6, 8, 12, 3)
  np.testing.assert_allclose(out, whole, atol=2e-6)
  assert float(out.std()) > 0.01  # not trivially equal
  # img2img's encode takes the same chunks.
  images = np.random.default_rng(4).uniform(size=(6, 8, 12, 3)).astype(np.float32)
  encode = functools.partial(sampling.encode_images, vae)
  assert "scan" in str(jax.make_jaxpr(encode)(params, images))
  chunked_post = jax.jit(encode)(params, images)
  monkeypatch.setattr(sampling, "DECODE_LATENT_PIXELS", 4096)
  whole_post = jax.jit(functools.partial(sampling.encode_images, vae))(params, images)
  assert chunked_post.mean.shape == (6, 4, 6, 4)
  np.testing.assert_allclose(chunked_post.mean, whole_post.mean, atol=2e-6)
  np.testing.assert_allclose(chunked_post.std, whole_post.std, atol=2e-6)


def test_a1111_and_comfyui_unipc_in_a_run(pipes):
  """A1111's UniPC (`a1111`; bh1, order 3) runs text-to-image at its fractional timesteps, for
  epsilon and v models, another image than diffusers' form with the same settings, as does
  ComfyUI's (`comfyui`); an img2img run of A1111's, its img2img (`a1111_img2img`, set from the
  strength: tests/test_scheduler_unipc.py), another than diffusers' form's too (those two on
  the epsilon model: the forms' placement does not depend on the prediction type)."""
  _, pipe, _ = pipes
  solver = {"solver_type": "bh1", "solver_order": 3}
  kw = dict(seed=5, guidance_scale=GUIDANCE, scheduler="unipc", steps=8, height=16, width=16)
  diffusers_form = pipe.generate(PROMPTS[:1], scheduler_options=solver, **kw)
  forms = ({"a1111": True}, {"comfyui": True, "schedule_type": "karras"})
  for form in forms[:1] if _v_prediction(pipe) else forms:  # v: A1111's text-to-image only
    ours = pipe.generate(PROMPTS[:1], scheduler_options={**form, **solver}, **kw)
    assert np.isfinite(ours).all() and np.abs(ours - diffusers_form).max() > 1e-4, form
  if _v_prediction(pipe):
    return
  images = np.random.default_rng(3).uniform(size=(1, 16, 16, 3)).astype(np.float32)
  kw.update(init_images=images, strength=0.5)
  ours = pipe.generate(PROMPTS[:1], scheduler_options={"a1111": True, **solver}, **kw)
  diffusers_form = pipe.generate(PROMPTS[:1], scheduler_options=solver, **kw)
  assert np.isfinite(ours).all() and np.abs(ours - diffusers_form).max() > 1e-4
  spec, _ = sampling.prepare(pipe, 1, steps=8, scheduler="unipc", height=16, width=16,
                             guidance_scale=GUIDANCE, img2img=True, strength=0.5,
                             scheduler_options={"a1111": True, **solver})
  assert spec.begin == 0 and spec.scheduler.name == "unipc"
  with pytest.raises(ValueError, match="higher strength"):
    pipe.generate(PROMPTS[:1], scheduler_options={"a1111": True, **solver},
                  **{**kw, "strength": 0.3})


def _comfyui_rescale_cfg(cond_pred, uncond_pred, cond_scale, x, sigma, multiplier):
  """ComfyUI's cfg_function (comfy/samplers.py) with its RescaleCFG node's sampler_cfg_function
  (comfy_extras/nodes_model_advanced.py), as they compute it in torch: the guided denoised
  prediction from the two denoised ones at k-diffusion's x and noise level sigma."""
  args = {"cond": x - cond_pred, "uncond": x - uncond_pred, "cond_scale": cond_scale,
          "sigma": sigma, "input": x}
  cond, uncond, sigma = args["cond"], args["uncond"], args["sigma"]
  sigma = sigma.view(sigma.shape[:1] + (1,) * (cond.ndim - 1))
  x_orig = args["input"]
  x_ = x_orig / (sigma * sigma + 1.0)
  cond = ((x_ - (x_orig - cond)) * (sigma ** 2 + 1.0) ** 0.5) / (sigma)
  uncond = ((x_ - (x_orig - uncond)) * (sigma ** 2 + 1.0) ** 0.5) / (sigma)
  x_cfg = uncond + cond_scale * (cond - uncond)
  ro_pos = torch.std(cond, dim=(1, 2, 3), keepdim=True)
  ro_cfg = torch.std(x_cfg, dim=(1, 2, 3), keepdim=True)
  x_rescaled = x_cfg * (ro_pos / ro_cfg)
  x_final = multiplier * x_rescaled + (1.0 - multiplier) * x_cfg
  return x - (x_orig - (x_ - x_final * sigma / (sigma * sigma + 1.0) ** 0.5))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_comfyui_rescale_is_its_rescale_cfg(prediction_type):
  """`comfyui_rescale` (guidance_rescale_form "comfyui") against ComfyUI's RescaleCFG in its
  cfg_function, on model outputs at three noise levels: the denoised predictions ComfyUI's
  model wrapper makes of them (epsilon: x - sigma out; v: x / (sigma^2 + 1) - out sigma /
  sqrt(sigma^2 + 1)), its guided one, back to sdjax's model output. For a v-prediction model
  it is diffusers' rescale of the output; for an epsilon model it is not."""
  rng = np.random.default_rng(4)
  for sigma in (0.03, 1.2, 14.6):
    x = rng.standard_normal((2, 5, 6, 4), dtype=np.float32) * np.float32((sigma ** 2 + 1) ** 0.5)
    out_c, out_u = (rng.standard_normal((2, 5, 6, 4), dtype=np.float32) for _ in range(2))
    s = np.float32(sigma)
    x_in = x / np.sqrt(np.float32(s * s + 1))  # the model's input

    def denoised(out, x=x, s=s):
      t_out, t_x, t_s = torch.from_numpy(out), torch.from_numpy(x), torch.tensor(s)
      if prediction_type == "epsilon":
        return t_x - t_out * t_s
      return t_x * 1.0 / (t_s ** 2 + 1.0) - t_out * t_s * 1.0 / (t_s ** 2 + 1.0) ** 0.5

    want = _comfyui_rescale_cfg(denoised(out_c), denoised(out_u), 5.0, torch.from_numpy(x),
                                torch.tensor([s, s]), 0.7).numpy()
    ours = sampling.comfyui_rescale(jnp.asarray(out_u), jnp.asarray(out_c), jnp.float32(5.0),
                                    jnp.float32(0.7), jnp.asarray(x_in), jnp.float32(s),
                                    prediction_type)
    if prediction_type == "epsilon":
      ours_denoised = x - s * np.asarray(ours)
    else:
      a2 = np.float32(1) / np.float32(s * s + 1)
      ours_denoised = a2 * x - s * np.sqrt(a2) * np.asarray(ours)
    err = np.abs(ours_denoised - want).max() / np.abs(want).max()
    assert err < 2e-6, (sigma, err)
    plain = sampling.guide(jnp.asarray(out_u), jnp.asarray(out_c), jnp.float32(5.0),
                           jnp.float32(0.7))
    differs = np.abs(np.asarray(plain) - np.asarray(ours)).max() / np.abs(np.asarray(ours)).max()
    assert (differs < 1e-5) == (prediction_type == "v_prediction"), (sigma, differs)


def test_comfyui_rescale_in_generate(sd1):
  """generate(guidance_rescale_form="comfyui") with Euler in ComfyUI's form: at each call the
  guided output is `comfyui_rescale` of the pair at that call's noise level and input (two
  steps written out with the pipeline's own UNet, scheduler and VAE); diffusers' form makes
  another image (an epsilon model)."""
  from parity import randn  # noqa: PLC0415

  _, pipe = sd1
  options = {"k_diffusion": True, "comfyui": True}
  common = dict(steps=2, guidance_scale=5.0, guidance_rescale=0.7, scheduler="euler",
                scheduler_options=options, height=16, width=16)
  latents = randn(1, 8, 8, 4, seed=12)
  ours = pipe.generate(["a photo of a cat"], latents=latents, guidance_rescale_form="comfyui",
                       **common)
  sched = schedulers.get_scheduler("euler", pipe.scheduler_config, options=options)
  state = sched.set_timesteps(2, sample_shape=(1, 8, 8, 4))
  sigmas = np.append(np.asarray(sched.call_sigmas(state), np.float32), np.float32(0))  # to 0
  positive, negative, *_ = pipe.encode_prompt(["a photo of a cat"], [""])
  context = jnp.concatenate([negative, positive])
  x = jnp.asarray(latents) * sched.init_noise_sigma(state)
  for i in range(2):
    x_in = sched.scale_model_input(state, x, i)
    out = pipe.predict_noise(jnp.concatenate([x_in, x_in]),
                             jnp.full((2,), state.timesteps[i], jnp.float32), context)
    eps = sampling.comfyui_rescale(out[:1], out[1:], jnp.float32(5.0), jnp.float32(0.7), x_in,
                                   jnp.float32(sigmas[i]), "epsilon")
    denoised = x - sigmas[i] * eps
    x = x + (x - denoised) / sigmas[i] * (sigmas[i + 1] - sigmas[i])
  want = np.asarray(sampling.decode_images(pipe.vae, pipe.params["vae"], x))
  err = float(np.linalg.norm(ours - want) / np.linalg.norm(want))
  print(f"\nComfyUI RescaleCFG in generate: {err:.2e}")
  assert err <= 2e-6, err
  plain = pipe.generate(["a photo of a cat"], latents=latents, **common)
  assert np.abs(plain - ours).max() > 1e-3
  with pytest.raises(ValueError, match="guidance_rescale_form 'comfyui' .* not 'ddim'"):
    pipe.generate(["a cat"], latents=latents, guidance_rescale_form="comfyui",
                  **{**common, "scheduler": "ddim", "scheduler_options": None})


def test_run_with_comfyui_rescale(sd1, tmp_path):
  """main.py --guidance_rescale 0.7 --guidance_rescale_form comfyui: generate()'s image, run.json
  and the PNG's `Guidance rescale form: ComfyUI RescaleCFG`, read back; over a sampler that
  cannot give it each call's noise level (DDIM), a one-line error."""
  import json  # noqa: PLC0415

  from parity import one_image_run  # noqa: PLC0415

  from sdjax import infotext, outputs, run  # noqa: PLC0415

  _, pipe = sd1
  cfg, _, png, kw = one_image_run(pipe, tmp_path / "out", guidance_rescale=0.7,
                                  guidance_rescale_form="comfyui")
  expected = pipe.generate("a cat", guidance_rescale=0.7, guidance_rescale_form="comfyui", **kw)
  assert np.abs(np.asarray(png, np.float32) - expected[0] * 255).max() <= 1.0
  params = outputs.parse_a1111_parameters(png.text["parameters"])
  assert params["Guidance rescale form"] == "ComfyUI RescaleCFG"
  assert json.load(open(tmp_path / "out" / "run.json"))["guidance_rescale_form"] == "comfyui"
  flags = infotext.reproduce(png.text["parameters"]).flags
  assert (flags["guidance_rescale"], flags["guidance_rescale_form"]) == ("0.7", "comfyui")
  with pytest.raises(run.RunError, match="^--guidance_rescale_form 'comfyui' .* not 'ddim'"):
    run.generate_run(dataclasses.replace(cfg, scheduler="ddim", output_dir=str(tmp_path / "b")))
