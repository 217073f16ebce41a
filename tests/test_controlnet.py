"""ControlNet against diffusers: the network (`ControlNetModel`), the UNet taking its residuals,
and generate() against `StableDiffusionControlNetPipeline`."""

import dataclasses

import diffusers
import numpy as np
import pytest
import torch
from flax import traverse_util
from parity import assert_close, nchw, nhwc, randn, transfer

from sdjax import testing
from sdjax.models.controlnet import ControlNetConfig, ControlNetModel
from sdjax.models.unet import UNet2DConditionModel, UNetConfig

torch.set_num_threads(1)


def torch_controlnet(unet_config, seed, **kwargs):
  """A random diffusers ControlNet shaped as a UNet of `unet_config` (its zero convolutions
  perturbed too, so that every residual is non-zero)."""
  unet = testing.torch_unet(unet_config, seed=seed)
  model = diffusers.ControlNetModel.from_unet(unet, **kwargs).eval()
  testing.perturb_(model, seed + 1)
  gen = torch.Generator().manual_seed(seed + 2)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.startswith(("controlnet_down_blocks", "controlnet_mid_block",
                          "controlnet_cond_embedding.conv_out")) and name.endswith("weight"):
        p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
  return model


def original_layout_file(controlnet, path, prefix="", extra=None):
  """Writes an sdjax ControlNet's weights in lllyasviel's original layout (`.pth`: a pickle)."""
  from sdjax.checkpoints import single_file, weights  # noqa: PLC0415

  state = weights.flax_to_torch(controlnet.params)
  table = single_file.controlnet_table(controlnet.config, state, prefix)
  original = {**single_file.scatter(state, table), **(extra or {})}
  if path.endswith(".pth"):
    torch.save({k: torch.from_numpy(np.array(v)) for k, v in original.items()}, path)
  else:
    weights.write_safetensors(path, original)
  return path


# SD1's default layout: end to end in test_generate_matches_diffusers.
@pytest.mark.parametrize("name,kwargs", [
    ("sd2", {"conditioning_embedding_out_channels": (8, 16)}),
    ("sdxl", {"conditioning_embedding_out_channels": (8, 16, 16)}),
    ("sd1-bgr-pooled", {"controlnet_conditioning_channel_order": "bgr"}),
])
def test_controlnet_matches_diffusers(name, kwargs):
  config = {"sd2": testing.UNET_SD2, "sdxl": testing.UNET_SDXL,
            "sd1-bgr-pooled": testing.UNET_SD1}[name]
  tm = torch_controlnet(config, 7, **kwargs)
  if name == "sd1-bgr-pooled":
    tm.register_to_config(global_pool_conditions=True)
  fm = ControlNetModel(ControlNetConfig.from_dict(dict(tm.config)))
  down_factor = 2 ** (len(tm.config.conditioning_embedding_out_channels) - 1)
  x, ctx = randn(2, 8, 8, 4), randn(2, 77, config["cross_attention_dim"], seed=1)
  cond = np.random.default_rng(2).uniform(size=(2, 8 * down_factor, 8 * down_factor, 3))
  cond = cond.astype(np.float32)
  t, scale = np.array([3.0, 801.0], np.float32), 0.7
  extra, torch_extra = (), {}
  if config is testing.UNET_SDXL:
    text_embeds = randn(2, 20, seed=3)
    time_ids = np.tile(np.float32([[64, 64, 0, 0, 64, 64]]), (2, 1))
    extra = (text_embeds, time_ids)
    torch_extra = {"added_cond_kwargs": {"text_embeds": torch.from_numpy(text_embeds),
                                         "time_ids": torch.from_numpy(time_ids)}}
  params = transfer(tm, fm, x, t, ctx, cond, scale, *extra)
  down, mid = fm.apply({"params": params}, x, t, ctx, cond, scale, *extra)
  with torch.no_grad():
    ref_down, ref_mid = tm(nchw(x), torch.from_numpy(t), torch.from_numpy(ctx), nchw(cond),
                           conditioning_scale=scale, return_dict=False, **torch_extra)
  assert len(down) == len(ref_down) == len(fm.config.skip_channels)
  errs = [assert_close(a, nhwc(b)) for a, b in zip(down, ref_down, strict=True)]
  errs.append(assert_close(mid, nhwc(ref_mid)))
  # Each residual varies over the image (not just the zero convs' biases).
  assert all(float(np.std(np.asarray(r))) > 1e-3 for r in [*down, mid])
  print(f"\ncontrolnet {name}: worst residual {max(errs):.2e}")


def test_unet_adds_the_residuals_as_diffusers():
  tm = testing.torch_unet(testing.UNET_SD1, seed=3)
  fm = UNet2DConditionModel(UNetConfig.from_dict(dict(tm.config)))
  x, ctx = randn(2, 8, 8, 4), randn(2, 77, 32, seed=1)
  t = np.array([3.0, 801.0], np.float32)
  params = transfer(tm, fm, x, t, ctx)
  shapes = [(2, 8, 8, 32)] * 3 + [(2, 4, 4, 32)] + [(2, 4, 4, 64)] * 2  # conv_in, block 0, 1
  down = [randn(*s, seed=10 + i) for i, s in enumerate(shapes)]
  mid = randn(2, 4, 4, 64, seed=20)
  ours = fm.apply({"params": params}, x, t, ctx, down_residuals=down, mid_residual=mid)
  with torch.no_grad():
    ref = tm(nchw(x), torch.from_numpy(t), torch.from_numpy(ctx),
             down_block_additional_residuals=[nchw(d) for d in down],
             mid_block_additional_residual=nchw(mid)).sample
  assert_close(ours, nhwc(ref))
  plain = fm.apply({"params": params}, x, t, ctx)
  assert np.abs(np.asarray(plain) - np.asarray(ours)).max() > 1e-2


@pytest.fixture(scope="module")
def sd1_controlnet(tmp_path_factory):
  """(diffusers' StableDiffusionControlNetPipeline, sdjax pipeline, sdjax ControlNet) of tiny
  random SD1 networks; the ControlNet downsamples its images 2x as the tiny VAE does."""
  import sdjax  # noqa: PLC0415

  folder = str(tmp_path_factory.mktemp("cn") / "pipe")
  base = testing.write_torch_pipeline(folder, "sd1", seed=11)
  controlnet = torch_controlnet(testing.UNET_SD1, 13,
                                conditioning_embedding_out_channels=(8, 16))
  controlnet.save_pretrained(folder + "_controlnet", safe_serialization=True)
  pipe = sdjax.load_pipeline(folder)
  # From the saved config, as sdjax reads it (diffusers' in-memory one marks the options it
  # defaulted, which another scheduler class then takes at its own defaults).
  ref = diffusers.StableDiffusionControlNetPipeline(
      vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer, unet=base.unet,
      controlnet=controlnet, scheduler=diffusers.EulerDiscreteScheduler.from_config(
          pipe.scheduler_config), safety_checker=None, feature_extractor=None,
      requires_safety_checker=False)
  ref.set_progress_bar_config(disable=True)
  return ref, pipe, sdjax.load_controlnet(folder + "_controlnet")


PROMPTS = ["a red circle in the center", "a photo of a cat"]


@pytest.mark.parametrize("scale,start,end", [(1.3, 0.25, 0.75)])
def test_generate_matches_diffusers(sd1_controlnet, scale, start, end):
  """Text-to-image steered by a ControlNet, with classifier-free guidance (the control image
  and the ControlNet on both halves), a conditioning scale, and the ControlNet acting in part of
  the steps only (diffusers' control_guidance_start / end)."""
  ref, pipe, controlnet = sd1_controlnet
  rng = np.random.default_rng(4)
  control = rng.uniform(size=(2, 16, 16, 3)).astype(np.float32)
  latents = randn(2, 8, 8, 4, seed=5)
  kw = dict(num_inference_steps=4, guidance_scale=3.0, height=16, width=16)
  with torch.no_grad():
    expected = ref(PROMPTS, image=nchw(control), latents=nchw(latents), output_type="np",
                   controlnet_conditioning_scale=scale, control_guidance_start=start,
                   control_guidance_end=end, **kw).images
  ours = pipe.generate(PROMPTS, steps=4, guidance_scale=3.0, height=16, width=16,
                       scheduler="euler", latents=latents, controlnet=controlnet,
                       control_images=control, controlnet_conditioning_scale=scale,
                       control_guidance_start=start, control_guidance_end=end)
  err = float(np.linalg.norm(ours - expected) / np.linalg.norm(expected))
  plain = pipe.generate(PROMPTS, steps=4, guidance_scale=3.0, height=16, width=16,
                        scheduler="euler", latents=latents)
  change = float(np.linalg.norm(plain - expected) / np.linalg.norm(expected))
  print(f"\ncontrolnet generate, scale {scale}, steps {start}-{end}: {err:.2e} (without the "
        f"ControlNet: {change:.2e})")
  assert err <= 1e-4 and change > 100 * err


@pytest.mark.parametrize("guess", [False, True])
def test_negative_prompt_skipped_throughout_is_no_guidance(sd1_controlnet, guess):
  """A1111's Skip Early CFG over the whole run (skip_early_cond=1) leaves the negative prompt out
  of every call: diffusers' ControlNet pipeline at guidance scale 1 (no CFG pass), the ControlNet
  on the prompt's rows (scaled as guess mode scales them, in guess mode)."""
  ref, pipe, controlnet = sd1_controlnet
  control = np.random.default_rng(8).uniform(size=(2, 16, 16, 3)).astype(np.float32)
  latents = randn(2, 8, 8, 4, seed=9)
  with torch.no_grad():
    expected = ref(PROMPTS, image=nchw(control), latents=nchw(latents), output_type="np",
                   num_inference_steps=3, guidance_scale=1.0, height=16, width=16,
                   guess_mode=guess, controlnet_conditioning_scale=1.2).images
  ours = pipe.generate(PROMPTS, negative_prompts="blue", steps=3, guidance_scale=3.0, height=16,
                       width=16, scheduler="euler", latents=latents, controlnet=controlnet,
                       control_images=control, guess_mode=guess, controlnet_conditioning_scale=1.2,
                       skip_early_cond=1.0)
  err = float(np.linalg.norm(ours - expected) / np.linalg.norm(expected))
  print(f"\ncontrolnet, negative prompt skipped throughout (guess mode {guess}): {err:.2e}")
  assert err <= 1e-4


def test_two_controlnets_and_guess_mode_match_diffusers(sd1_controlnet, tmp_path):
  """Two ControlNets (diffusers' MultiControlNetModel: residuals summed in order), each with
  its own images (one image serving both prompts for the second), scale and share of the steps,
  in diffusers' guess mode: the ControlNets skip the unconditional half of CFG, the first's
  residuals scaled 0.1 to 1, the second's not (it has pooled conditions, the shuffle model's,
  which on their own turn guess mode on). With cfg_parallel too (each half of a guidance pair
  its own UNet call)."""
  import sdjax  # noqa: PLC0415
  from sdjax import sampling  # noqa: PLC0415

  ref, pipe, first = sd1_controlnet
  torch_pooled = torch_controlnet(testing.UNET_SD1, 37, conditioning_embedding_out_channels=(8, 16))
  torch_pooled.register_to_config(global_pool_conditions=True)
  torch_pooled.save_pretrained(str(tmp_path / "pooled"), safe_serialization=True)
  multi = diffusers.StableDiffusionControlNetPipeline(
      **{**ref.components, "controlnet": [ref.controlnet, torch_pooled]})
  multi.set_progress_bar_config(disable=True)
  rng = np.random.default_rng(6)
  control = [rng.uniform(size=(2, 16, 16, 3)).astype(np.float32),
             rng.uniform(size=(1, 16, 16, 3)).astype(np.float32)]
  latents = randn(2, 8, 8, 4, seed=7)
  settings = dict(controlnet_conditioning_scale=[0.8, 1.5], control_guidance_start=[0.0, 0.25],
                  control_guidance_end=[1.0, 0.75])
  with torch.no_grad():
    expected = multi(PROMPTS, image=[nchw(c) for c in control], latents=nchw(latents),
                     output_type="np", num_inference_steps=4, guidance_scale=3.0, height=16,
                     width=16, guess_mode=True, **settings).images
  kw = dict(steps=4, guidance_scale=3.0, height=16, width=16, scheduler="euler",
            latents=latents)
  pooled = sdjax.load_controlnet(str(tmp_path / "pooled"))
  assert sampling.uses_guess_mode([pooled.model], False)
  assert not sampling.uses_guess_mode([first.model, pooled.model], False)
  for split in (False, True):  # cfg_parallel: the split program (here on one device)
    ours = pipe.generate(PROMPTS, controlnet=[first, pooled], control_images=control, **kw,
                         guess_mode=True, cfg_parallel=split, **settings)
    err = float(np.linalg.norm(ours - expected) / np.linalg.norm(expected))
    print(f"\ntwo controlnets, guess mode, cfg_parallel={split}: {err:.2e}")
    assert err <= 1e-4
  with pytest.raises(ValueError, match="with 2 ControlNets, control_images is a list of 2"):
    pipe.generate(PROMPTS, controlnet=[first, pooled], control_images=control[0], **kw)
  with pytest.raises(ValueError, match="controlnet_conditioning_scale must be one number or "
                                       "one per ControlNet .2., got 3"):
    pipe.generate(PROMPTS, controlnet=[first, pooled], control_images=control, **kw,
                  controlnet_conditioning_scale=[1.0, 1.0, 1.0])


def test_img2img_matches_diffusers(sd1_controlnet):
  """img2img steered by a ControlNet: StableDiffusionControlNetImg2ImgPipeline given our draws
  (the init image's posterior sample, the noise); the ControlNet's steps count from where
  strength starts the run."""
  from parity import img2img_draws  # noqa: PLC0415

  ref, pipe, controlnet = sd1_controlnet
  img = diffusers.StableDiffusionControlNetImg2ImgPipeline(**ref.components)
  img.set_progress_bar_config(disable=True)
  rng = np.random.default_rng(8)
  images, control = (rng.uniform(size=(2, 16, 16, 3)).astype(np.float32) for _ in range(2))
  noise, seed = randn(2, 8, 8, 4, seed=12), 3
  kw = dict(controlnet_conditioning_scale=0.8, control_guidance_start=0.2)
  with img2img_draws("diffusers.pipelines.controlnet.pipeline_controlnet_img2img", seed,
                     (8, 8, 4), noise):
    expected = img(PROMPTS, image=images, control_image=control, strength=0.6,
                   num_inference_steps=6, guidance_scale=3.0, height=16, width=16,
                   output_type="np", **kw).images
  ours = pipe.generate(PROMPTS, init_images=images, strength=0.6, steps=6, guidance_scale=3.0,
                       scheduler="euler", seed=seed, latents=noise, controlnet=controlnet,
                       control_images=control, **kw)
  err = float(np.linalg.norm(ours - expected) / np.linalg.norm(expected))
  print(f"\ncontrolnet img2img: {err:.2e}")
  assert err <= 1e-4


def test_hires_fix_matches_diffusers(sd1_controlnet):
  """The hires fix with a ControlNet, which steers both passes (A1111's ControlNet extension):
  diffusers' ControlNet pipeline to latents, torch's interpolate, then its ControlNet img2img
  pipeline on those latents with the second pass's control images, for the steps A1111 runs (the
  last 3 of int(3 / 0.6) = 5), with our draws of the second pass's noise; control_guidance_end
  counts over each pass's steps. The default second-pass images are the first's enlarged
  bilinearly."""
  from unittest import mock  # noqa: PLC0415

  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415

  from sdjax import sampling  # noqa: PLC0415

  ref, pipe, controlnet = sd1_controlnet
  img = diffusers.StableDiffusionControlNetImg2ImgPipeline(**ref.components)
  img.set_progress_bar_config(disable=True)
  rng = np.random.default_rng(10)
  control = rng.uniform(size=(2, 16, 16, 3)).astype(np.float32)
  hires_control = rng.uniform(size=(1, 24, 24, 3)).astype(np.float32)
  noise, seed, hires_steps, strength = randn(2, 8, 8, 4, seed=13), 4, 3, 0.6
  total = int(hires_steps / strength)
  keys = sampling.image_keys(jnp.asarray(sampling.make_seeds(seed, 2)))
  second = nchw(np.asarray(sampling._keyed_noise(keys, sampling._HIRES_NOISE, (12, 12, 4))))  # noqa: SLF001
  kw = dict(guidance_scale=3.0, controlnet_conditioning_scale=1.2, control_guidance_end=0.7)
  module = "diffusers.pipelines.controlnet.pipeline_controlnet_img2img"
  ours = {}
  for name, given in (("given", hires_control), ("default", None)):
    with torch.no_grad():
      first = ref(PROMPTS, image=nchw(control), num_inference_steps=4, height=16, width=16,
                  latents=nchw(noise), output_type="latent", **kw).images
      enlarged = torch.nn.functional.interpolate(first, size=(12, 12), mode="bilinear")
      again = (np.repeat(hires_control, 2, axis=0) if given is not None else
               np.asarray(jax.image.resize(control, (2, 24, 24, 3), "linear")))
      with mock.patch(f"{module}.randn_tensor", lambda *a, **k: second):
        expected = img(PROMPTS, image=enlarged, control_image=nchw(again),
                       strength=(hires_steps + 0.5) / total, num_inference_steps=total,
                       height=24, width=24, output_type="np", **kw).images
    ours[name] = pipe.generate(PROMPTS, steps=4, height=16, width=16, scheduler="euler",
                               latents=noise, seed=seed, hires_scale=1.5,
                               hires_steps=hires_steps, hires_strength=strength,
                               controlnet=controlnet, control_images=control,
                               hires_control_images=given, **kw)
    assert ours[name].shape == (2, 24, 24, 3)
    err = float(np.linalg.norm(ours[name] - expected) / np.linalg.norm(expected))
    print(f"\ncontrolnet hires fix ({name} second-pass images): {err:.2e}")
    assert err <= 1e-4
  assert np.abs(ours["given"] - ours["default"]).max() > 1e-3
  # A hires model (A1111's Hires checkpoint) takes the ControlNet too: the same model loaded
  # again makes the same pixels (sdjax.sampling's hires-model test checks another model's).
  import sdjax  # noqa: PLC0415

  again = pipe.generate(PROMPTS, steps=4, height=16, width=16, scheduler="euler", latents=noise,
                        seed=seed, hires_scale=1.5, hires_steps=hires_steps,
                        hires_strength=strength, controlnet=controlnet, control_images=control,
                        hires_control_images=hires_control,
                        hires_model=sdjax.load_pipeline(pipe.name), **kw)
  np.testing.assert_array_equal(again, ours["given"])


def test_bad_controlnet_arguments(sd1_controlnet, tmp_path):
  import sdjax  # noqa: PLC0415

  _, pipe, controlnet = sd1_controlnet
  kw = dict(steps=2, height=16, width=16)
  control = np.zeros((16, 16, 3), np.float32)
  with pytest.raises(ValueError, match="needs control_images"):
    pipe.generate(PROMPTS, controlnet=controlnet, **kw)
  with pytest.raises(ValueError, match=r"control_images must be \[2 \(or 1\), 16, 16, 3\]"):
    pipe.generate(PROMPTS, controlnet=controlnet, control_images=control[:8], **kw)
  with pytest.raises(ValueError, match="give controlnet= too"):
    pipe.generate(PROMPTS, control_images=control, **kw)
  with pytest.raises(ValueError, match="0 <= start < end <= 1"):
    pipe.generate(PROMPTS, controlnet=controlnet, control_images=control,
                  control_guidance_start=0.5, control_guidance_end=0.5, **kw)
  with pytest.raises(ValueError, match=r"hires_control_images must be \[2 \(or 1\), 24, 24, 3\]"):
    pipe.generate(PROMPTS, controlnet=controlnet, control_images=control, hires_scale=1.5,
                  hires_control_images=control, **kw)
  with pytest.raises(ValueError, match="give hires_scale too"):
    pipe.generate(PROMPTS, controlnet=controlnet, control_images=control,
                  hires_control_images=control, **kw)
  other = torch_controlnet(testing.UNET_SD2, 3, conditioning_embedding_out_channels=(8, 16))
  other.save_pretrained(str(tmp_path / "sd2"), safe_serialization=True)
  with pytest.raises(ValueError, match="does not fit this model .skip_channels"):
    pipe.generate(PROMPTS, controlnet=sdjax.load_controlnet(str(tmp_path / "sd2")),
                  control_images=control, **kw)
  with pytest.raises(sdjax.PipelineError, match="cannot load ControlNet .*missing"):
    sdjax.load_controlnet(str(tmp_path / "missing"))


def test_single_files_load_as_diffusers_reads_them(tmp_path):
  """ControlNet files as users have them: lllyasviel's original layout under `control_model.`
  (a 1.0 `.pth` holds a whole SD model beside it) or bare (thibaud's SD2 files), and one
  diffusers component in a file. diffusers' `from_single_file` reads the original-layout files
  written here to the torch model's exact weights (so the layout is the real one); sdjax loads
  each to exactly the folder's params. Bad files are one-line errors."""
  import sdjax  # noqa: PLC0415
  from sdjax.checkpoints import single_file, weights  # noqa: PLC0415

  tm = torch_controlnet(testing.UNET_SD1, 13)  # the 4-level image embedding real files have
  folder = str(tmp_path / "cn")
  tm.save_pretrained(folder, safe_serialization=True)
  ref = sdjax.load_controlnet(folder)
  torch_state = tm.state_dict()
  sd_model = {"model.diffusion_model.input_blocks.0.0.weight": np.ones((2, 4, 3, 3), np.float32)}
  original = [original_layout_file(ref, str(tmp_path / "control_sd15.pth"), "control_model.",
                                   sd_model),
              original_layout_file(ref, str(tmp_path / "control_sd21.safetensors"))]
  component = str(tmp_path / "diffusers_layout.safetensors")
  weights.write_safetensors(component, {k: v.numpy() for k, v in torch_state.items()})
  want = traverse_util.flatten_dict(ref.params)
  for path in [*original, component]:
    if path in original:
      theirs = diffusers.ControlNetModel.from_single_file(path, config=folder,
                                                          local_files_only=True).state_dict()
      assert all(torch.equal(v, theirs[k]) for k, v in torch_state.items()), path
    got = traverse_util.flatten_dict(sdjax.load_controlnet(path, config=folder).params)
    assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want), path

  def load_error(state=None, **kw):
    path = str(tmp_path / "bad.safetensors")
    if state is not None:
      weights.write_safetensors(path, state)
    with pytest.raises(sdjax.PipelineError) as e:
      sdjax.load_controlnet(kw.pop("source", path), **kw)
    return str(e.value)

  assert "cannot tell the model family of this ControlNet (text context widths [32]); pass " \
      "its diffusers config" in load_error(source=original[1])
  state = single_file.read_single_file(original[1])
  assert "is missing key 'middle_block_out.0.bias'" in load_error(
      {k: v for k, v in state.items() if k != "middle_block_out.0.bias"}, config=folder)
  assert "has key 'zero_convs.9.0.weight' that the model does not use" in load_error(
      {**state, "zero_convs.9.0.weight": np.zeros(1, np.float32)}, config=folder)
  assert "a Control-LoRA is made from the model it steers" in load_error(
      {"lora_controlnet": np.zeros(1, np.float32)})
  assert "is not a ControlNet file: a Stable Diffusion checkpoint" in load_error(sd_model)
  assert "config= is only for single-file ControlNets" in load_error(source=folder,
                                                                      config=folder)


@pytest.mark.parametrize("family,layout", [("sd1", "control_model."), ("sd2", ""),
                                           ("sdxl", None)])
def test_files_without_config_get_the_standard_one(family, layout):
  """A ControlNet file without a config: the standard architecture of the family its weights
  show. The full-size diffusers ControlNet of each family (on torch's meta device: shapes only),
  as a file of each layout, is read key for key, none left over, every shape as the config's."""
  import inspect  # noqa: PLC0415

  import jax.numpy as jnp  # noqa: PLC0415

  from sdjax import pipeline  # noqa: PLC0415
  from sdjax.checkpoints import single_file, standard, weights  # noqa: PLC0415

  unet = standard.standard_config("sd2_768_v" if family == "sd2" else family)["unet"]
  accepted = inspect.signature(diffusers.ControlNetModel.__init__).parameters
  with torch.device("meta"):
    tm = diffusers.ControlNetModel(**{k: v for k, v in unet.items() if k in accepted})
  state = {k: np.broadcast_to(np.float32(0), tuple(v.shape)) for k, v in tm.state_dict().items()}
  if layout is not None:
    table = single_file.controlnet_table(ControlNetConfig.from_dict(dict(tm.config)), state,
                                         layout)
    state = single_file.scatter(state, table)
  prefix = single_file.controlnet_prefix(state, family)
  assert prefix == layout
  cfg = ControlNetConfig.from_dict(single_file.controlnet_config(state, prefix, family))
  assert not cfg.global_pool_conditions
  # The shuffle model is told by its name (ComfyUI's rule): its pooled conditions.
  assert single_file.controlnet_config(state, prefix, "control_v11e_sd15_shuffle.pth")[
      "global_pool_conditions"]
  assert single_file.controlnet_config(state, prefix, "x/shuffle_fp16/control_lineart_shuffle"
                                       "_fp16.safetensors")["global_pool_conditions"]
  _, expected = pipeline._controlnet_model(cfg, jnp.float32, jnp.float32)  # noqa: SLF001
  keys = [weights.torch_key(p) for p in traverse_util.flatten_dict(expected)]
  weights.check_state(single_file.controlnet_state(state, prefix, cfg, keys, family), expected,
                      "controlnet")


def test_run_with_control_images(sd1_controlnet, tmp_path):
  """main.py's run with two ControlNets (an original-layout file with its diffusers config, and
  a folder): each jsonl line's control_image list (relative to the file; null: that
  ControlNet's --control_image), resized to the image size; each image is generate()'s with
  those images; records and PNG parameters name both. A line's single image for two ControlNets
  and a line without any control image are one-line errors; with one ControlNet in guess mode,
  an inpainting line with "Only masked" gets its control image cut as its image."""
  import json  # noqa: PLC0415

  from PIL import Image  # noqa: PLC0415

  import sdjax  # noqa: PLC0415
  from sdjax import infotext, outputs, run  # noqa: PLC0415

  _, pipe, controlnet = sd1_controlnet
  file = original_layout_file(controlnet, str(tmp_path / "control_tiny.safetensors"))
  torch_controlnet(testing.UNET_SD1, 31, conditioning_embedding_out_channels=(8, 16)
                   ).save_pretrained(str(tmp_path / "depth"), safe_serialization=True)
  second = sdjax.load_controlnet(str(tmp_path / "depth"))
  rng = np.random.default_rng(9)
  for name, size in (("edges.png", (16, 16)), ("pose.png", (24, 32)), ("default.png", (16, 16)),
                     ("depth.png", (16, 16))):
    Image.fromarray(rng.integers(0, 255, (*size, 3), np.uint8)).save(tmp_path / name)
  lines = [{"prompt": "a cat", "control_image": ["edges.png", "pose.png"]},
           {"prompt": "a dog", "control_image": ["pose.png", None], "seed": 7},
           {"prompt": "a cow"}]
  path = tmp_path / "control.jsonl"
  path.write_text("".join(json.dumps(line) + "\n" for line in lines))
  cfg = run.RunConfig(model=pipe.name, prompts_file=str(path), steps=3, guidance_scale=3.0,
                      scheduler="euler", height=16, width=16, seed=2, batch_size=2,
                      controlnet=(file, str(tmp_path / "depth")),
                      controlnet_config=(controlnet.name, ""),
                      control_image=(str(tmp_path / "default.png"), str(tmp_path / "depth.png")),
                      controlnet_scale=(0.9, 0.5), control_guidance_end=(0.8,),
                      output_dir=str(tmp_path / "out"), compilation_cache="",
                      show_progress=False)
  assert run.generate_run(cfg).images == 3
  records = [json.loads(x) for x in open(tmp_path / "out" / outputs.MANIFEST_NAME)]
  used = [["edges.png", "pose.png"], ["pose.png", "depth.png"], ["default.png", "depth.png"]]
  for record, names in zip(records, used, strict=True):
    assert record["control_image"] == [str(tmp_path / name) for name in names]
    assert record["controlnet"] == [file, str(tmp_path / "depth")]
    assert record["controlnet_config"] == [controlnet.name, ""]
    assert record["controlnet_scale"] == [0.9, 0.5]
    assert record["control_guidance_end"] == [0.8, 0.8]
    control = [outputs.read_image(str(tmp_path / name), (16, 16)) for name in names]
    expected = pipe.generate(record["prompt"], steps=3, guidance_scale=3.0, scheduler="euler",
                             height=16, width=16, seed=record["seed"],
                             controlnet=[controlnet, second], control_images=control,
                             controlnet_conditioning_scale=[0.9, 0.5], control_guidance_end=0.8)
    png = Image.open(tmp_path / "out" / record["file"])
    assert np.abs(np.asarray(png, np.float32) - expected[0] * 255).max() <= 1.0
    params = outputs.parse_a1111_parameters(png.text["parameters"])
    assert params["ControlNet 0"] == (f"Model: control_tiny [{outputs.short_hash(file)}], "
                                      "Weight: 0.9, Guidance Start: 0, Guidance End: 0.8")
    assert params["ControlNet 1"] == ("Model: depth, Weight: 0.5, Guidance Start: 0, "
                                      "Guidance End: 0.8")
    found = infotext.reproduce(png.text["parameters"])  # its ControlNets' settings read back
    assert found.flags["controlnet_scale"] == ["0.9", "0.5"]
    assert found.flags["control_guidance_end"] == ["0.8", "0.8"]
    assert "control_mode" not in found.flags and "control_type" not in found.flags
    assert [flag for flag, _ in found.notes].count("controlnet") == 1
  path.write_text('{"prompt": "a cat", "control_image": "edges.png"}\n')
  with pytest.raises(run.RunError, match=r'"control_image" must be a list of one per '
                                         r'ControlNet \(2\)'):
    run.generate_run(dataclasses.replace(cfg, output_dir=str(tmp_path / "one")))
  single = dataclasses.replace(cfg, controlnet=(file,), controlnet_config=(controlnet.name,),
                               control_image=(), controlnet_scale=(0.9,))
  path.write_text('{"prompt": "a cat"}\n')
  with pytest.raises(run.RunError, match="--controlnet needs a control image"):
    run.generate_run(dataclasses.replace(single, output_dir=str(tmp_path / "none")))
  # Inpainting "Only masked": the control image, resized to the init image's size, is cut as
  # the image is (generate()'s padding_mask_crop).
  mask = np.zeros((24, 32), np.uint8)
  mask[4:14, 18:30] = 255
  Image.fromarray(mask).save(tmp_path / "mask.png")
  path.write_text(json.dumps({"prompt": "a cat", "init_image": "pose.png", "mask_image":
                              "mask.png", "control_image": "edges.png"}) + "\n")
  inpaint = dataclasses.replace(single, inpaint_full_res=True, inpaint_full_res_padding=2,
                                mask_blur=1, batch_size=1, output_dir=str(tmp_path / "inpaint"),
                                controlnet_guess_mode=True)
  assert run.generate_run(inpaint).images == 1
  record = json.loads(open(tmp_path / "inpaint" / outputs.MANIFEST_NAME).readline())
  assert record["controlnet"] == file and record["control_image"] == str(tmp_path / "edges.png")
  assert record["controlnet_scale"] == 0.9 and record["controlnet_config"] == controlnet.name
  assert record["controlnet_guess_mode"]
  expected = pipe.generate(
      "a cat", init_images=np.asarray(Image.open(tmp_path / "pose.png"))[None] / 255,
      mask_images=mask[None] / 255, mask_blur=1, padding_mask_crop=2, height=16, width=16,
      strength=0.75, seed=record["seed"], steps=3, guidance_scale=3.0, scheduler="euler",
      controlnet=controlnet, control_images=outputs.read_image(str(tmp_path / "edges.png"),
                                                               (24, 32)),
      controlnet_conditioning_scale=0.9, control_guidance_end=0.8, guess_mode=True)
  written = np.asarray(Image.open(tmp_path / "inpaint" / record["file"]), np.float32)
  assert written.shape == (24, 32, 3)
  assert np.abs(written - np.round(expected[0] * 255)).max() <= 1.0


@pytest.fixture(scope="module")
def sdxl_controlnet(tmp_path_factory):
  """(StableDiffusionXLControlNetPipeline, diffusers' refiner, sdjax base, refiner,
  ControlNet) of tiny random SDXL networks."""
  import sdjax  # noqa: PLC0415

  tmp_path = tmp_path_factory.mktemp("sdxl_cn")
  folder = str(tmp_path / "sdxl")
  base, refiner = testing.write_torch_sdxl(folder, seed=17)
  pipe = sdjax.load_pipeline(folder + "/base")
  controlnet = torch_controlnet(testing.UNET_SDXL, 19, conditioning_embedding_out_channels=(8, 16))
  controlnet.save_pretrained(str(tmp_path / "cn"), safe_serialization=True)
  ref = diffusers.StableDiffusionXLControlNetPipeline(
      vae=base.vae, text_encoder=base.text_encoder, text_encoder_2=base.text_encoder_2,
      tokenizer=base.tokenizer, tokenizer_2=base.tokenizer_2, unet=base.unet,
      controlnet=controlnet, scheduler=diffusers.EulerDiscreteScheduler.from_config(
          pipe.scheduler_config), add_watermarker=False)
  ref.set_progress_bar_config(disable=True)
  refiner.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler_config)
  refiner.set_progress_bar_config(disable=True)
  return (ref, refiner, pipe, sdjax.load_pipeline(folder + "/refiner"),
          sdjax.load_controlnet(str(tmp_path / "cn")))


def test_sdxl_generate_matches_diffusers(sdxl_controlnet):
  """An SDXL ControlNet (text_time conditioning in the ControlNet too) against
  StableDiffusionXLControlNetPipeline, with a non-square image."""
  ref, _, pipe, _, controlnet = sdxl_controlnet
  control = np.random.default_rng(3).uniform(size=(2, 16, 24, 3)).astype(np.float32)
  latents = randn(2, 8, 12, 4, seed=6)
  with torch.no_grad():
    expected = ref(PROMPTS, image=nchw(control), latents=nchw(latents), output_type="np",
                   num_inference_steps=3, guidance_scale=3.0, height=16, width=24,
                   controlnet_conditioning_scale=0.7).images
  ours = pipe.generate(PROMPTS, steps=3, guidance_scale=3.0, height=16, width=24,
                       scheduler="euler", latents=latents, controlnet=controlnet,
                       control_images=control, controlnet_conditioning_scale=0.7)
  err = float(np.linalg.norm(ours - expected) / np.linalg.norm(expected))
  print(f"\nSDXL controlnet generate: {err:.2e}")
  assert err <= 1e-4


def test_sdxl_controlnet_with_refiner_matches_diffusers(sdxl_controlnet):
  """The ControlNet steers the base's steps of a base -> refiner hand-off: diffusers' ControlNet
  base with denoising_end=0.8 (its control_guidance_start / _end counted over the whole
  schedule: the ControlNet acts at calls 2 and 3 of 6, not 1 and 2 of the base's 5), then its
  refiner with denoising_start=0.8."""
  ref, ref_refiner, pipe, refiner, controlnet = sdxl_controlnet
  control = np.random.default_rng(4).uniform(size=(1, 16, 24, 3)).astype(np.float32)
  latents = randn(2, 8, 12, 4, seed=7)
  settings = dict(controlnet_conditioning_scale=1.5, control_guidance_start=0.2,
                  control_guidance_end=0.7)
  with torch.no_grad():
    handed = ref(PROMPTS, image=nchw(control), latents=nchw(latents), output_type="latent",
                 num_inference_steps=6, guidance_scale=3.0, height=16, width=24,
                 denoising_end=0.8, **settings).images
    expected = ref_refiner(PROMPTS, image=handed, denoising_start=0.8, num_inference_steps=6,
                           guidance_scale=3.0, output_type="np").images
  kw = dict(steps=6, guidance_scale=3.0, height=16, width=24, scheduler="euler",
            latents=latents, refiner=refiner, refiner_start=0.8)
  ours = pipe.generate(PROMPTS, controlnet=controlnet, control_images=control, **settings, **kw)
  err = float(np.linalg.norm(ours - expected) / np.linalg.norm(expected))
  plain = pipe.generate(PROMPTS, **kw)
  change = float(np.linalg.norm(plain - expected) / np.linalg.norm(expected))
  print(f"\nSDXL controlnet + refiner: {err:.2e} (without the ControlNet: {change:.2e})")
  assert err <= 1e-4 and change > 100 * err


def test_run_with_hires_fix_and_refiner(sd1_controlnet, sdxl_controlnet, tmp_path):
  """main.py's run with a ControlNet and the hires fix (its control image read at each pass's
  size), and with the refiner finishing both passes of the hires fix too (the ControlNet steers
  the base's steps of each): each image is generate()'s."""
  from unittest import mock  # noqa: PLC0415

  from PIL import Image  # noqa: PLC0415

  from sdjax import outputs, run  # noqa: PLC0415

  Image.fromarray(np.random.default_rng(11).integers(0, 255, (24, 32, 3), np.uint8)).save(
      tmp_path / "edges.png")
  edges = str(tmp_path / "edges.png")
  _, pipe, controlnet = sd1_controlnet
  common = dict(steps=3, guidance_scale=3.0, scheduler="euler", seed=2, batch_size=1,
                controlnet=(controlnet.name,), control_image=(edges,), controlnet_scale=(1.5,),
                control_guidance_end=(0.7,), compilation_cache="", show_progress=False)
  hires = dict(hires_scale=1.5, hires_steps=2, hires_strength=0.6)
  cfg = run.RunConfig(model=pipe.name, prompts=(run.PromptLine("a cat"),), height=16, width=16,
                      output_dir=str(tmp_path / "hires"), **hires, **common)
  read = run._Sampler._control_images  # noqa: SLF001
  sizes = []

  def spy(self, batch, size, prepared=None):
    sizes.append(size)
    return read(self, batch, size, prepared)

  # (The tiny model's pixels move by less than a PNG step between the two ways of making the
  # second pass's images: the sizes they are read at show it.)
  with mock.patch.object(run._Sampler, "_control_images", spy):  # noqa: SLF001
    assert run.generate_run(cfg).images == 1
  assert sizes == [(16, 16), (24, 24)]
  expected = pipe.generate("a cat", steps=3, guidance_scale=3.0, scheduler="euler", seed=2,
                           height=16, width=16, controlnet=controlnet,
                           control_images=outputs.read_image(edges, (16, 16)),
                           hires_control_images=outputs.read_image(edges, (24, 24)),
                           controlnet_conditioning_scale=1.5, control_guidance_end=0.7, **hires)
  written = np.asarray(Image.open(tmp_path / "hires" / "00000" / "000000.png"), np.float32)
  assert written.shape == (24, 24, 3)
  assert np.abs(written - expected[0] * 255).max() <= 1.0

  _, _, base, refiner, sdxl_controlnet_ = sdxl_controlnet
  cfg = run.RunConfig(model=base.name, refiner=refiner.name, refiner_start=0.7,
                      hires_refiner="both passes", prompts=(run.PromptLine("a cat"),),
                      height=16, width=24, output_dir=str(tmp_path / "refiner"),
                      **{**common, "controlnet": (sdxl_controlnet_.name,), "steps": 6}, **hires)
  assert run.generate_run(cfg).images == 1
  expected = base.generate("a cat", steps=6, guidance_scale=3.0, scheduler="euler", seed=2,
                           height=16, width=24, refiner=refiner, refiner_start=0.7,
                           hires_refiner="both passes", controlnet=sdxl_controlnet_,
                           control_images=outputs.read_image(edges, (16, 24)),
                           hires_control_images=outputs.read_image(edges, (24, 32)),
                           controlnet_conditioning_scale=1.5, control_guidance_end=0.7, **hires)
  written = np.asarray(Image.open(tmp_path / "refiner" / "00000" / "000000.png"), np.float32)
  assert np.abs(written - expected[0] * 255).max() <= 1.0


def test_cfg_parallel_run_in_guess_mode(sd1_controlnet, tmp_path):
  """main.py --cfg_parallel --controlnet_guess_mode on two devices: the device making the
  unconditional half adds no residuals, so each image is generate(cfg_parallel=True,
  guess_mode=True)'s (the split program on one device)."""
  import os  # noqa: PLC0415
  import subprocess  # noqa: PLC0415
  import sys  # noqa: PLC0415

  from PIL import Image  # noqa: PLC0415

  from sdjax import outputs  # noqa: PLC0415

  _, pipe, controlnet = sd1_controlnet
  Image.fromarray(np.random.default_rng(12).integers(0, 255, (16, 16, 3), np.uint8)).save(
      tmp_path / "edges.png")
  edges, out = str(tmp_path / "edges.png"), str(tmp_path / "out")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"}
  proc = subprocess.run(
      [sys.executable, os.path.join(root, "main.py"), "--model", pipe.name, "--prompt", "a cat",
       "--steps", "3", "--guidance_scale", "3", "--scheduler", "euler", "--height", "16",
       "--width", "16", "--seed", "5", "--cfg_parallel", "--controlnet", controlnet.name,
       "--control_image", edges, "--controlnet_guess_mode", "--output_dir", out,
       "--compilation_cache="], cwd=root, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  expected = pipe.generate("a cat", steps=3, guidance_scale=3.0, scheduler="euler", height=16,
                           width=16, seed=5, cfg_parallel=True, controlnet=controlnet,
                           control_images=outputs.read_image(edges, (16, 16)), guess_mode=True)
  written = np.asarray(Image.open(os.path.join(out, "00000", "000000.png")), np.float32)
  assert np.abs(written - expected[0] * 255).max() <= 1.0


def test_control_lora_loads_as_comfyui_builds_it(tmp_path):
  """A Control-LoRA file (Stability AI's layout: the original names without prefix, the UNet's
  shared weights as low-rank up/down pairs, the ControlNet's own parts, norms and biases in full)
  loads against its base UNet to the ControlNet ComfyUI builds: the UNet's weight plus up @ down,
  or the file's. The file's names are the real ones: diffusers' Control-LoRA converter maps
  every one of them; its residuals agree with that reference ControlNet's."""
  import types  # noqa: PLC0415

  from diffusers.utils import convert_sai_sd_control_lora_state_dict_to_peft  # noqa: PLC0415

  import sdjax  # noqa: PLC0415
  from sdjax.checkpoints import single_file, weights  # noqa: PLC0415

  # diffusers' converter assumes SDXL's two layers per block and a 4-level image embedding.
  config = {**testing.UNET_SDXL, "layers_per_block": 2}
  unet = testing.torch_unet(config, seed=41)
  embedding = dict(conditioning_embedding_out_channels=(4, 8, 8, 8))
  shape = diffusers.ControlNetModel.from_unet(unet, **embedding)
  cfg = ControlNetConfig.from_dict(dict(shape.config))
  table = single_file.controlnet_table(cfg, list(shape.state_dict()), prefix="")
  shared, gen = set(unet.state_dict()), np.random.default_rng(43)
  file = {"lora_controlnet": np.zeros((0,), np.float32)}
  for k, v in shape.state_dict().items():
    v, name = v.numpy(), table[k].key
    if k in shared and k.endswith("weight") and v.ndim >= 2:
      extra = (1, 1) if v.ndim == 4 else ()
      file[name.removesuffix("weight") + "up"] = (
          gen.standard_normal((v.shape[0], 2, *extra)) * 0.1).astype(np.float32)
      file[name.removesuffix("weight") + "down"] = (
          gen.standard_normal((2, *v.shape[1:])) * 0.1).astype(np.float32)
    elif k not in shared or "norm" in k or k.endswith("bias"):
      file[name] = (v + gen.standard_normal(v.shape) * 0.05).astype(np.float32)
  path = str(tmp_path / "control-lora-tiny-rank2.safetensors")
  weights.write_safetensors(path, file)

  converted = convert_sai_sd_control_lora_state_dict_to_peft(
      {k: torch.from_numpy(v) for k, v in file.items()})
  converted = {k: v for k, v in converted.items() if v is not None}
  assert len(converted) == len(file) - 1  # every key but the marker has a diffusers name
  ref = diffusers.ControlNetModel.from_unet(unet, **embedding).eval()
  state = ref.state_dict()
  for k, v in converted.items():
    if k.endswith("lora_B.weight"):
      target, down = k.replace("lora_B.", ""), converted[k.replace("lora_B", "lora_A")]
      state[target] = state[target] + (v.flatten(1) @ down.flatten(1)).reshape(state[target].shape)
    elif not k.endswith("lora_A.weight"):
      assert k in state, k
      state[k] = v
  ref.load_state_dict(state)

  fm = UNet2DConditionModel(UNetConfig.from_dict(dict(unet.config)))
  x, ctx = randn(2, 8, 8, 4), randn(2, 77, 64, seed=1)
  t, text_embeds = np.array([3.0, 801.0], np.float32), randn(2, 20, seed=3)
  time_ids = np.tile(np.float32([[64, 64, 0, 0, 64, 64]]), (2, 1))
  base = types.SimpleNamespace(unet=fm, params={"unet": transfer(unet, fm, x, t, ctx, text_embeds,
                                                                  time_ids)})
  with pytest.raises(sdjax.PipelineError, match="a Control-LoRA is made from the model it steers"):
    sdjax.load_controlnet(path)
  controlnet = sdjax.load_controlnet(path, base=base)
  ours, theirs = (np.asarray(p["down_blocks_1"]["attentions_0"]["proj_in"]["kernel"])
                  for p in (controlnet.params, base.params["unet"]))
  assert np.abs(ours - theirs).max() > 1e-3  # the low-rank difference is applied
  cond = np.random.default_rng(2).uniform(size=(2, 64, 64, 3)).astype(np.float32)
  down, mid = controlnet.model.apply({"params": controlnet.params}, x, t, ctx, cond, 0.8,
                                     text_embeds, time_ids)
  with torch.no_grad():
    ref_down, ref_mid = ref(nchw(x), torch.from_numpy(t), torch.from_numpy(ctx), nchw(cond),
                            conditioning_scale=0.8, return_dict=False, added_cond_kwargs={
                                "text_embeds": torch.from_numpy(text_embeds),
                                "time_ids": torch.from_numpy(time_ids)})
  errs = [assert_close(a, nhwc(b)) for a, b in zip([*down, mid], [*ref_down, ref_mid],
                                                    strict=True)]
  print(f"\ncontrol-lora: worst residual {max(errs):.2e}")


def test_run_with_control_lora(sdxl_controlnet, tmp_path):
  """main.py's --controlnet takes a Control-LoRA file, built from the run's own model."""
  from PIL import Image  # noqa: PLC0415

  import sdjax  # noqa: PLC0415
  from sdjax import outputs, run  # noqa: PLC0415
  from sdjax.checkpoints import single_file, weights  # noqa: PLC0415

  _, _, base, _, controlnet = sdxl_controlnet
  state = weights.flax_to_torch(controlnet.params)
  table = single_file.controlnet_table(controlnet.config, list(state), prefix="")
  unet = weights.flax_to_torch(base.params["unet"])
  file = {"lora_controlnet": np.zeros((0,), np.float32)}
  for k, v in state.items():  # the ControlNet's own parts in full, the rest as the UNet's
    if k not in unet or not np.array_equal(unet[k], v):
      file[table[k].key] = v
  path = str(tmp_path / "control-lora-tiny.safetensors")
  weights.write_safetensors(path, file)
  from flax import traverse_util  # noqa: PLC0415

  got = traverse_util.flatten_dict(sdjax.load_controlnet(path, base=base).params)
  want = traverse_util.flatten_dict(controlnet.params)
  assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)
  Image.fromarray(np.random.default_rng(3).integers(0, 255, (16, 24, 3), np.uint8)).save(
      tmp_path / "edges.png")
  cfg = run.RunConfig(model=base.name, prompts=(run.PromptLine("a cat"),), steps=2,
                      guidance_scale=3.0, scheduler="euler", height=16, width=24, seed=2,
                      batch_size=1, controlnet=(path,), control_image=(str(tmp_path / "edges.png"),),
                      output_dir=str(tmp_path / "out"), compilation_cache="", show_progress=False)
  assert run.generate_run(cfg).images == 1
  expected = base.generate("a cat", steps=2, guidance_scale=3.0, scheduler="euler", height=16,
                           width=24, seed=2, controlnet=sdjax.load_controlnet(path, base=base),
                           control_images=outputs.read_image(str(tmp_path / "edges.png"),
                                                             (16, 24)))
  png = np.asarray(Image.open(tmp_path / "out" / "00000" / "000000.png"), np.float32)
  assert np.abs(png - expected[0] * 255).max() <= 1.0


def test_control_modes_soften_as_a1111(sd1_controlnet):
  """A1111's Control Modes (its ControlNet extension's hook): "prompt" scales a ControlNet's
  j-th residual (down skips, then mid) by 0.825^(12-j); "controlnet" does too and leaves the
  unconditional rows without residuals. Checked on the UNet call against residuals scaled by
  hand, then through generate(): the split guidance program agrees with the batched one."""
  import jax.numpy as jnp  # noqa: PLC0415

  from sdjax import conditioning  # noqa: PLC0415

  _, pipe, controlnet = sd1_controlnet
  controlled = pipe.with_controlnet(controlnet)
  nets, params = controlled.networks, controlled.params
  x, ctx = randn(4, 8, 8, 4, seed=1), randn(4, 77, 32, seed=2)
  t = np.full((4,), 501.0, np.float32)
  image = np.random.default_rng(3).uniform(size=(4, 16, 16, 3)).astype(np.float32)
  cond_rows = jnp.asarray([0.0, 0.0, 1.0, 1.0])
  down, mid = controlnet.model.apply({"params": controlnet.params}, x, t, ctx, image, 0.7)
  residuals = [*down, mid]
  assert len(residuals) == 7  # the tiny UNet's: 6 skips and the mid block
  soft = [r * np.float32(0.825 ** (12 - j)) for j, r in enumerate(residuals)]
  for mode in ("balanced", "prompt", "controlnet"):
    got = conditioning.predict(nets, params, x, t, conditioning.Embeddings(ctx),
                               control=conditioning.ControlInput(
                                   (image,), jnp.asarray([0.7]), (mode,), cond_rows))
    want = {"balanced": residuals, "prompt": soft,
            "controlnet": [r * np.asarray(cond_rows).reshape(-1, 1, 1, 1) for r in soft]}[mode]
    expected = pipe.unet.apply({"params": params["unet"]}, x, t, ctx, down_residuals=want[:-1],
                               mid_residual=want[-1])
    assert_close(got, expected, 1e-6)
  kw = dict(steps=3, guidance_scale=3.0, height=16, width=16, scheduler="euler", seed=4,
            controlnet=controlnet, control_images=image[:2])
  out = {mode: pipe.generate(PROMPTS, control_mode=mode, **kw)
         for mode in ("balanced", "My prompt is more important", "controlnet")}
  split = pipe.generate(PROMPTS, control_mode="controlnet", cfg_parallel=True, **kw)
  err = float(np.linalg.norm(split - out["controlnet"]) / np.linalg.norm(out["controlnet"]))
  print(f"\ncontrol mode 'controlnet', split guidance vs batched: {err:.2e}")
  assert err <= 1e-5
  for a, b in (("balanced", "My prompt is more important"),
               ("My prompt is more important", "controlnet")):
    assert np.abs(out[a] - out[b]).max() > 1e-3
  with pytest.raises(ValueError, match="guess mode is diffusers' counterpart"):
    pipe.generate(PROMPTS, control_mode="prompt", guess_mode=True, **kw)
  with pytest.raises(ValueError, match="unknown control mode 'strong'"):
    pipe.generate(PROMPTS, control_mode="strong", **kw)


def test_run_with_control_modes(sd1_controlnet, tmp_path):
  """main.py's --control_mode (A1111's names taken too): each image is generate()'s; PNGs name
  the mode as A1111's extension does, records keep it (absent when balanced)."""
  import dataclasses  # noqa: PLC0415
  import json  # noqa: PLC0415

  from PIL import Image  # noqa: PLC0415

  from sdjax import outputs, run  # noqa: PLC0415

  _, pipe, controlnet = sd1_controlnet
  Image.fromarray(np.random.default_rng(13).integers(0, 255, (16, 16, 3), np.uint8)).save(
      tmp_path / "edges.png")
  edges = str(tmp_path / "edges.png")
  cfg = run.RunConfig(model=pipe.name, prompts=(run.PromptLine("a cat"),), steps=2,
                      guidance_scale=3.0, scheduler="euler", height=16, width=16, seed=6,
                      controlnet=(controlnet.name,), control_image=(edges,),
                      control_mode=("ControlNet is more important",),
                      output_dir=str(tmp_path / "out"), compilation_cache="", show_progress=False)
  assert run.generate_run(cfg).images == 1
  record = json.loads(open(tmp_path / "out" / outputs.MANIFEST_NAME).readline())
  assert record["control_mode"] == "ControlNet is more important"
  png = Image.open(tmp_path / "out" / record["file"])
  assert outputs.parse_a1111_parameters(png.text["parameters"])["ControlNet 0"].endswith(
      "Guidance End: 1, Control Mode: ControlNet is more important")
  expected = pipe.generate("a cat", steps=2, guidance_scale=3.0, scheduler="euler", height=16,
                           width=16, seed=6, controlnet=controlnet,
                           control_images=outputs.read_image(edges, (16, 16)),
                           control_mode="controlnet")
  assert np.abs(np.asarray(png, np.float32) - expected[0] * 255).max() <= 1.0
  with pytest.raises(run.RunError, match="--control_mode: unknown control mode 'strong'"):
    run.generate_run(dataclasses.replace(cfg, control_mode=("strong",),
                                         output_dir=str(tmp_path / "bad")))
