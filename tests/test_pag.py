"""Perturbed-attention guidance against diffusers' PAG pipelines: which layers a layer id picks
(`set_pag_applied_layers`), generate() against StableDiffusionPAGPipeline (with and without
classifier-free guidance, adaptive scale, guidance rescale), its img2img pipeline and
StableDiffusionXLPAGPipeline; main.py's --pag_scale."""

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


def _reference(base, pipe, cls, layers):
  ref = cls(**{k: v for k, v in base.components.items()
               if k not in ("safety_checker", "feature_extractor", "image_encoder", "scheduler")},
            scheduler=diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler_config),
            pag_applied_layers=layers,
            **({} if "XL" in cls.__name__ else {"safety_checker": None,
                                                 "feature_extractor": None,
                                                 "requires_safety_checker": False}))
  ref.set_progress_bar_config(disable=True)
  return ref


def _err(ours, expected) -> float:
  return float(np.linalg.norm(ours - expected) / np.linalg.norm(expected))


@pytest.mark.parametrize("layers", [
    "mid", ["down_blocks.0", "up.*attentions.0"], "up_blocks.1.attentions.1",
    ["down_blocks.1", "mid"], "attentions.(0|2)"])
def test_layer_selection_matches_diffusers(sd1, layers):
  """The self-attention layers a list of layer ids picks are those diffusers' PAG processors go
  to (regular expressions; an id ending in a number is not matched by that number's prefix of
  another; every id must match)."""
  from sdjax import sampling  # noqa: PLC0415
  from sdjax.checkpoints.weights import torch_key  # noqa: PLC0415

  base, pipe = sd1
  ref = _reference(base, pipe, diffusers.StableDiffusionPAGPipeline, layers)
  ref.set_pag_applied_layers(layers)
  original = base.unet.attn_processors
  try:
    ref._set_pag_attn_processor(ref.pag_applied_layers, True)  # noqa: SLF001
  except ValueError:
    with pytest.raises(ValueError, match="names no self-attention layer of this UNet"):
      sampling.pag_blocks(pipe.params["unet"], layers)
    return
  expected = sorted(name[:-len(".attn1")] for name, module in base.unet.named_modules()
                    if name.endswith("attn1") and "PAG" in type(module.processor).__name__)
  base.unet.set_attn_processor(original)
  ours = sorted(torch_key((*block, "x"))[:-2] for block in sampling.pag_blocks(
      pipe.params["unet"], layers))
  assert ours == expected and ours


@pytest.mark.parametrize("layers,guidance,scale,adaptive,rescale", [
    ("mid", 3.0, 2.0, 0.0, 0.0),
    (["down_blocks.0", "up.*attentions.0"], 3.0, 1.5, 0.001, 0.5),
    ("mid", 1.0, 2.5, 0.0, 0.0),
])
def test_generate_matches_diffusers(sd1, layers, guidance, scale, adaptive, rescale):
  """generate() against StableDiffusionPAGPipeline: PAG with classifier-free guidance (one
  UNet call on [uncond, cond, perturbed] rows), with an adaptive scale and guidance rescale
  (applied after PAG's term, as diffusers), and without guidance ([cond, perturbed])."""
  base, pipe = sd1
  latents = randn(2, 8, 8, 4, seed=6)
  with torch.no_grad():
    expected = _reference(base, pipe, diffusers.StableDiffusionPAGPipeline, layers)(
        PROMPTS, latents=nchw(latents), output_type="np", num_inference_steps=3,
        guidance_scale=guidance, height=16, width=16, pag_scale=scale,
        pag_adaptive_scale=adaptive, guidance_rescale=rescale).images
  common = dict(steps=3, guidance_scale=guidance, height=16, width=16, scheduler="euler",
                latents=latents, guidance_rescale=rescale)
  ours = pipe.generate(PROMPTS, pag_scale=scale, pag_adaptive_scale=adaptive,
                       pag_applied_layers=layers, **common)
  err = _err(ours, expected)
  print(f"\nPAG generate {layers} guidance {guidance}: {err:.2e}")
  assert err <= 1e-4
  assert _err(pipe.generate(PROMPTS, **common), expected) > 1e-3  # PAG changed the images


def test_img2img_matches_diffusers(sd1):
  """img2img with PAG: StableDiffusionPAGImg2ImgPipeline given our draws."""
  base, pipe = sd1
  rng = np.random.default_rng(8)
  images = rng.uniform(size=(2, 16, 16, 3)).astype(np.float32)
  noise, seed = randn(2, 8, 8, 4, seed=12), 3
  ref = _reference(base, pipe, diffusers.StableDiffusionPAGImg2ImgPipeline, "mid")
  with img2img_draws("diffusers.pipelines.pag.pipeline_pag_sd_img2img", seed, (8, 8, 4), noise):
    expected = ref(PROMPTS, image=images, strength=0.6, num_inference_steps=6,
                   guidance_scale=3.0, output_type="np", pag_scale=3.0).images
  ours = pipe.generate(PROMPTS, init_images=images, strength=0.6, steps=6, guidance_scale=3.0,
                       scheduler="euler", seed=seed, latents=noise, pag_scale=3.0)
  err = _err(ours, expected)
  print(f"\nPAG img2img: {err:.2e}")
  assert err <= 1e-4


def test_controlnet_matches_diffusers(sd1, tmp_path):
  """PAG with a ControlNet (on all three rows, its scale and end) against
  StableDiffusionControlNetPAGPipeline."""
  from test_controlnet import torch_controlnet  # noqa: PLC0415

  import sdjax  # noqa: PLC0415

  base, pipe = sd1
  torch_cn = torch_controlnet(testing.UNET_SD1, 13, conditioning_embedding_out_channels=(8, 16))
  torch_cn.save_pretrained(str(tmp_path / "cn"), safe_serialization=True)
  ref = diffusers.StableDiffusionControlNetPAGPipeline(
      **{k: v for k, v in base.components.items() if k not in ("scheduler", "image_encoder")},
      controlnet=torch_cn, scheduler=diffusers.EulerDiscreteScheduler.from_config(
          pipe.scheduler_config), pag_applied_layers="mid")
  ref.set_progress_bar_config(disable=True)
  control = np.random.default_rng(3).uniform(size=(2, 16, 16, 3)).astype(np.float32)
  latents = randn(2, 8, 8, 4, seed=6)
  kw = dict(controlnet_conditioning_scale=0.8, control_guidance_end=0.7)
  with torch.no_grad():
    expected = ref(PROMPTS, image=nchw(control), latents=nchw(latents), output_type="np",
                   num_inference_steps=3, guidance_scale=3.0, height=16, width=16,
                   pag_scale=2.0, **kw).images
  ours = pipe.generate(PROMPTS, steps=3, guidance_scale=3.0, height=16, width=16,
                       scheduler="euler", latents=latents, pag_scale=2.0,
                       controlnet=sdjax.load_controlnet(str(tmp_path / "cn")),
                       control_images=control, **kw)
  err = _err(ours, expected)
  print(f"\nPAG with a ControlNet: {err:.2e}")
  assert err <= 1e-4


def test_sdxl_matches_diffusers(tmp_path):
  """SDXL (two text encoders, micro-conditioning in all three rows) against
  StableDiffusionXLPAGPipeline, non-square."""
  import sdjax  # noqa: PLC0415

  base, _ = testing.write_torch_sdxl(str(tmp_path / "sdxl"), seed=17)
  pipe = sdjax.load_pipeline(str(tmp_path / "sdxl" / "base"))
  latents = randn(2, 8, 12, 4, seed=6)
  ref = _reference(base, pipe, diffusers.StableDiffusionXLPAGPipeline, ["mid", "up_blocks.0"])
  with torch.no_grad():
    expected = ref(PROMPTS, latents=nchw(latents), output_type="np", num_inference_steps=3,
                   guidance_scale=3.0, height=16, width=24, pag_scale=2.0).images
  ours = pipe.generate(PROMPTS, steps=3, guidance_scale=3.0, height=16, width=24,
                       scheduler="euler", latents=latents, pag_scale=2.0,
                       pag_applied_layers=["mid", "up_blocks.0"])
  err = _err(ours, expected)
  print(f"\nPAG SDXL generate: {err:.2e}")
  assert err <= 1e-4


def test_run_with_pag(sd1, tmp_path):
  """main.py --pag_scale: the image is generate()'s (hires pass included: PAG in both passes);
  the settings and Forge's PNG entries name it; bad values and what PAG does not combine with
  are one-line errors."""
  from sdjax import outputs, run  # noqa: PLC0415

  _, pipe = sd1
  hires = dict(hires_scale=1.5, hires_steps=2, hires_strength=0.5)
  cfg, _, png, kw = one_image_run(pipe, tmp_path / "out", pag_scale=2.5,
                                  pag_adaptive_scale=0.001,
                                  pag_applied_layers=("mid", "up_blocks.1"), **hires)
  expected = pipe.generate("a cat", pag_scale=2.5, pag_adaptive_scale=0.001,
                           pag_applied_layers=["mid", "up_blocks.1"], **hires, **kw)
  plain = pipe.generate("a cat", **hires, **kw)
  written = np.asarray(png, np.float32)
  assert written.shape == (24, 24, 3)
  assert np.abs(written - expected[0] * 255).max() <= 1.0
  assert np.abs(expected - plain).max() * 255 > 2.0  # a run ignoring PAG would fail above
  params = outputs.parse_a1111_parameters(png.text["parameters"])
  assert params["PerturbedAttentionGuidance_enabled"] == "True"
  assert params["PerturbedAttentionGuidance_scale"] == "2.5"
  assert params["PerturbedAttentionGuidance_adaptive_scale"] == "0.001"
  assert json.loads(params["PerturbedAttentionGuidance_layers"]) == ["mid", "up_blocks.1"]
  settings = json.load(open(tmp_path / "out" / "run.json"))
  assert settings["pag"] == {"scale": 2.5, "adaptive_scale": 0.001,
                             "applied_layers": ["mid", "up_blocks.1"]}
  for change, message in (
      ({"pag_applied_layers": ("down_blocks.7",)},
       "--pag_scale: pag_applied_layers 'down_blocks.7' names no self-attention layer"),
      ({"pag_scale": -1.0}, "--pag_scale: pag_scale must be a number >= 0, got -1.0"),
      ({"cfg_parallel": True},
       "perturbed-attention guidance .pag_scale. does not work with cfg_parallel yet")):
    with pytest.raises(run.RunError, match=message):
      run.generate_run(dataclasses.replace(cfg, output_dir=str(tmp_path / "bad"), **change))
  with pytest.raises(ValueError, match="composable prompts .* or pag_scale"):
    pipe.generate("a cat AND a dog", prompt_syntax="a1111", steps=2, guidance_scale=3.0,
                  height=16, width=16, pag_scale=2.0)
