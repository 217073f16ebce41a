"""A1111's Tiling (seamless images): diffusers' pipelines with every Conv2d of the UNet and the
VAE set to padding_mode="circular", as A1111 sets them, against generate(tiling=True):
text-to-image (also in cfg_parallel's split program), img2img (the VAE encoder too), with a
ControlNet (whose convolutions A1111 leaves alone); main.py's --tiling."""

import dataclasses
import json

import diffusers
import numpy as np
import pytest
import torch
from parity import img2img_draws, nchw, one_image_run, randn

from sdjax import testing

torch.set_num_threads(1)

PROMPTS = ["a red circle in the center", "a photo of a cat"]


def _circular(*modules, enable: bool = True) -> None:
  for module in modules:
    for layer in module.modules():
      if isinstance(layer, torch.nn.Conv2d):
        layer.padding_mode = "circular" if enable else "zeros"


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
  """(diffusers' tiny SD1 pipeline with circular convolutions, sdjax's)."""
  import sdjax  # noqa: PLC0415

  folder = str(tmp_path_factory.mktemp("tiling") / "sd1")
  base = testing.write_torch_pipeline(folder, "sd1", seed=11)
  pipe = sdjax.load_pipeline(folder)
  base.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler_config)
  base.set_progress_bar_config(disable=True)
  _circular(base.unet, base.vae)
  return base, pipe


def _err(ours, expected) -> float:
  return float(np.linalg.norm(ours - expected) / np.linalg.norm(expected))


def test_generate_and_img2img_match_diffusers(sd1):
  base, pipe = sd1
  latents = randn(2, 8, 12, 4, seed=6)
  with torch.no_grad():
    expected = base(PROMPTS, latents=nchw(latents), output_type="np", num_inference_steps=3,
                    guidance_scale=3.0, height=16, width=24).images
  common = dict(steps=3, guidance_scale=3.0, height=16, width=24, scheduler="euler",
                latents=latents)
  ours = pipe.generate(PROMPTS, tiling=True, **common)
  err = _err(ours, expected)
  assert err <= 1e-4
  assert np.abs(pipe.generate(PROMPTS, **common) - ours).max() > 1e-2  # the padding mattered
  # cfg_parallel's split program (here on one device) decodes in a program of its own
  split = _err(pipe.generate(PROMPTS, tiling=True, cfg_parallel=True, **common), expected)
  assert split <= 1e-4
  img = diffusers.StableDiffusionImg2ImgPipeline(**base.components)
  images = np.random.default_rng(8).uniform(size=(2, 16, 24, 3)).astype(np.float32)
  noise, seed = randn(2, 8, 12, 4, seed=12), 3
  with img2img_draws("diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img",
                     seed, (8, 12, 4), noise):
    expected = img(PROMPTS, image=images, strength=0.6, num_inference_steps=6,
                   guidance_scale=3.0, output_type="np").images
  ours = pipe.generate(PROMPTS, init_images=images, strength=0.6, steps=6, guidance_scale=3.0,
                       scheduler="euler", seed=seed, latents=noise, tiling=True)
  img2img = _err(ours, expected)
  print(f"\ntiling generate {err:.2e} (split program {split:.2e}), img2img {img2img:.2e}")
  assert img2img <= 1e-4


def _one_axis(axes: str, *modules) -> list:
  """The asymmetric-tiling extension's convolution: pad width circularly (for "x", else zeros),
  then height (for "y"), then convolve unpadded. Returns the patched layers."""
  patched = []
  for module in modules:
    for layer in module.modules():
      if isinstance(layer, torch.nn.Conv2d):
        def forward(x, weight, bias, layer=layer):
          ph, pw = layer.padding
          x = torch.nn.functional.pad(x, (pw, pw, 0, 0),
                                      mode="circular" if "x" in axes else "constant")
          x = torch.nn.functional.pad(x, (0, 0, ph, ph),
                                      mode="circular" if "y" in axes else "constant")
          return torch.nn.functional.conv2d(x, weight, bias, layer.stride, 0, layer.dilation,
                                            layer.groups)

        layer._conv_forward = forward  # noqa: SLF001
        patched.append(layer)
  return patched


@pytest.mark.parametrize("axes", ["x", "y"])
def test_one_axis_matches_diffusers(sd1, axes):
  """tiling="x" (or "y"): circular along that axis, zeros along the other, as A1111's
  asymmetric-tiling extension pads: diffusers with that convolution."""
  base, pipe = sd1
  _circular(base.unet, base.vae, enable=False)
  patched = _one_axis(axes, base.unet, base.vae)
  latents = randn(1, 8, 12, 4, seed=7)
  try:
    with torch.no_grad():
      expected = base(PROMPTS[:1], latents=nchw(latents), output_type="np",
                      num_inference_steps=3, guidance_scale=3.0, height=16, width=24).images
  finally:
    for layer in patched:
      del layer._conv_forward  # noqa: SLF001
    _circular(base.unet, base.vae)
  common = dict(steps=3, guidance_scale=3.0, height=16, width=24, scheduler="euler",
                latents=latents)
  ours = pipe.generate(PROMPTS[:1], tiling=axes, **common)
  err = _err(ours, expected)
  print(f"\ntiling {axes}: {err:.2e}")
  assert err <= 1e-4
  assert np.abs(pipe.generate(PROMPTS[:1], tiling=True, **common) - ours).max() > 1e-2


def test_controlnet_keeps_zero_padding(sd1, tmp_path):
  """With a ControlNet, as A1111 with its ControlNet extension: the UNet and VAE circular, the
  ControlNet's convolutions as they are."""
  from test_controlnet import torch_controlnet  # noqa: PLC0415

  import sdjax  # noqa: PLC0415

  base, pipe = sd1
  torch_cn = torch_controlnet(testing.UNET_SD1, 13, conditioning_embedding_out_channels=(8, 16))
  torch_cn.save_pretrained(str(tmp_path / "cn"), safe_serialization=True)
  ref = diffusers.StableDiffusionControlNetPipeline(**base.components, controlnet=torch_cn)
  control = np.random.default_rng(3).uniform(size=(2, 16, 16, 3)).astype(np.float32)
  latents = randn(2, 8, 8, 4, seed=6)
  with torch.no_grad():
    expected = ref(PROMPTS, image=nchw(control), latents=nchw(latents), output_type="np",
                   num_inference_steps=3, guidance_scale=3.0, height=16, width=16).images
  ours = pipe.generate(PROMPTS, steps=3, guidance_scale=3.0, height=16, width=16,
                       scheduler="euler", latents=latents, tiling=True,
                       controlnet=sdjax.load_controlnet(str(tmp_path / "cn")),
                       control_images=control)
  err = _err(ours, expected)
  print(f"\ntiling with a ControlNet: {err:.2e}")
  assert err <= 1e-4


def test_run_with_tiling(sd1, tmp_path):
  """main.py --tiling: generate()'s image, also with --cfg_parallel (its separate decode pads
  circularly too); run.json and A1111's `Tiling: True` say it."""
  from sdjax import outputs, run  # noqa: PLC0415

  _, pipe = sd1
  cfg, _, png, kw = one_image_run(pipe, tmp_path / "out", tiling=True)
  expected = pipe.generate("a cat", tiling=True, **kw)
  assert np.abs(np.asarray(png, np.float32) - expected[0] * 255).max() <= 1.0
  assert outputs.parse_a1111_parameters(png.text["parameters"])["Tiling"] == "True"
  assert json.load(open(tmp_path / "out" / "run.json"))["tiling"] is True
  _, _, png, _ = one_image_run(pipe, tmp_path / "split", tiling=True, cfg_parallel=True)
  assert np.abs(np.asarray(png, np.float32) - expected[0] * 255).max() <= 1.0
  with pytest.raises(run.RunError, match="--tiling: tiling is True, False or one of xy, x, y"):
    run.generate_run(dataclasses.replace(cfg, tiling="z", output_dir=str(tmp_path / "bad")))
  _, _, png, kw = one_image_run(pipe, tmp_path / "x", tiling="x")
  np.testing.assert_allclose(np.asarray(png, np.float32),
                             np.round(pipe.generate("a cat", tiling="x", **kw)[0] * 255), atol=1)
  assert outputs.parse_a1111_parameters(png.text["parameters"])["Tiling axis"] == "x"
  assert json.load(open(tmp_path / "x" / "run.json"))["tiling"] == "x"
