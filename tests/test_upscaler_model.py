"""The x4 upscaler (stable-diffusion-x4-upscaler's layout: the UNet takes the latents and the
noised low-res image, its noise level as a class label; a VAE of 1/4) against diffusers'
StableDiffusionUpscalePipeline given our draws (the low-res image's noise, the initial noise),
and with per-image CPU generators."""

from unittest import mock

import diffusers
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from parity import nchw, rel_err

import sdjax
from sdjax import sampling, testing

torch.set_num_threads(1)

PROMPTS = ["a red circle in the center", "a photo of a cat"]
NEGATIVES = ["blue", ""]
h, w = 8, 12  # the low-res images: the latents' size; the output 32 x 48


@pytest.fixture(scope="module")
def upscaler(tmp_path_factory):
  ref = testing.torch_upscaler_pipeline(str(tmp_path_factory.mktemp("x4_src")), seed=13)
  folder = str(tmp_path_factory.mktemp("x4") / "pipe")
  ref.save_pretrained(folder, safe_serialization=True)
  return ref, sdjax.load_pipeline(folder), folder


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  images = rng.uniform(size=(2, h, w, 3)).astype(np.float32)
  noise = rng.standard_normal((2, h, w, 4)).astype(np.float32)
  return images, noise


@pytest.mark.parametrize("name,guidance,noise_level", [("ddim", 4.0, 20), ("euler", 1.0, 300)])
def test_upscale_matches_diffusers(upscaler, name, guidance, noise_level):
  ref, pipe, _ = upscaler
  images, noise = _inputs(1)
  seed = 3
  keys = sampling.image_keys(jnp.asarray(sampling.make_seeds(seed, 2)))
  low_eps = np.asarray(sampling._keyed_noise(keys, sampling._LOW_RES_NOISE,  # noqa: SLF001
                                             (h, w, 3)))
  draws = iter([nchw(low_eps), nchw(noise)])  # the low-res image's noise first, as diffusers
  ref.scheduler = {"ddim": diffusers.DDIMScheduler,
                   "euler": diffusers.EulerDiscreteScheduler}[name].from_config(
                       pipe.scheduler_config)
  module = type(ref).__module__
  with mock.patch(f"{module}.randn_tensor", lambda *a, **k: next(draws)), torch.no_grad():
    expected = ref(PROMPTS, image=nchw(images), negative_prompt=NEGATIVES,
                   num_inference_steps=4, guidance_scale=guidance, noise_level=noise_level,
                   output_type="np").images
  ours = pipe.generate(PROMPTS, negative_prompts=NEGATIVES, init_images=images, steps=4,
                       guidance_scale=guidance, noise_level=noise_level, scheduler=name,
                       seed=seed, latents=noise)
  assert ours.shape == (2, 4 * h, 4 * w, 3)
  err = rel_err(ours, expected)
  print(f"\nx4 upscaler, {name}, guidance {guidance}, noise level {noise_level}: {err:.2e}")
  assert err <= 1e-4
  other = pipe.generate(PROMPTS, negative_prompts=NEGATIVES, init_images=images, steps=4,
                        guidance_scale=guidance, noise_level=noise_level + 30, scheduler=name,
                        seed=seed, latents=noise)
  assert rel_err(other, expected) > 1e-3  # the level is the UNet's label and the noise's


def test_torch_generators_match_diffusers(upscaler):
  """rng="torch_cpu": diffusers' pipeline with per-image CPU generators of the same seeds, which
  draw the low-res images' noise (3 channels) before the latents'."""
  ref, pipe, _ = upscaler
  images, _ = _inputs(2)
  ref.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler_config)
  with torch.no_grad():
    expected = ref(PROMPTS, image=nchw(images), negative_prompt=NEGATIVES, num_inference_steps=3,
                   guidance_scale=3.0, output_type="np", eta=1.0,
                   generator=[torch.Generator().manual_seed(s) for s in (4, 5)]).images
  ours = pipe.generate(PROMPTS, negative_prompts=NEGATIVES, init_images=images, steps=3,
                       guidance_scale=3.0, scheduler="ddim", eta=1.0, seed=4, rng="torch_cpu")
  err = rel_err(ours, expected)
  print(f"\nx4 upscaler, torch generators: {err:.2e}")
  assert err <= 1e-4


def test_bad_upscaler_arguments(upscaler, model):
  _, pipe, _ = upscaler
  images, _ = _inputs()
  kw = dict(steps=2, guidance_scale=3.0)
  with pytest.raises(ValueError, match="enlarges images: give init_images"):
    pipe.generate(PROMPTS, height=32, width=48, **kw)
  with pytest.raises(ValueError, match=r"noise_level must be an integer in \[0, 350\]"):
    pipe.generate(PROMPTS, init_images=images, noise_level=351, **kw)
  with pytest.raises(ValueError, match="starts from pure noise: no strength"):
    pipe.generate(PROMPTS, init_images=images, strength=0.5, **kw)
  with pytest.raises(ValueError, match="from the seeds' keys .rng='jax'. or their torch CPU"):
    pipe.generate(PROMPTS, init_images=images, rng="nv", **kw)
  with pytest.raises(ValueError, match="noise_level is an x4 upscaler model's"):
    sdjax.load_pipeline(model).generate(PROMPTS, height=16, width=16, noise_level=20, **kw)


def test_export_round_trip(upscaler, tmp_path):
  """A folder sdjax writes is diffusers' upscale pipeline, its low-res scheduler kept."""
  ref, pipe, _ = upscaler
  pipe.save_pretrained(str(tmp_path / "out"))
  back = diffusers.DiffusionPipeline.from_pretrained(str(tmp_path / "out"))
  assert type(back) is diffusers.StableDiffusionUpscalePipeline
  for key, value in ref.low_res_scheduler.config.items():
    if not key.startswith("_"):
      assert back.low_res_scheduler.config[key] == value, key
  def own(config):
    return {k: v for k, v in config.items() if not k.startswith("_")}

  again = sdjax.load_pipeline(str(tmp_path / "out"))
  assert own(again.low_res_scheduler_config) == own(pipe.low_res_scheduler_config)
  assert again.max_noise_level == pipe.max_noise_level == 350


def test_run_refuses_an_upscaler_model(upscaler, tmp_path):
  from sdjax import run

  cfg = run.RunConfig(model=upscaler[2], prompts=(run.PromptLine("a cat"),), steps=2,
                      output_dir=str(tmp_path / "out"), compilation_cache="",
                      show_progress=False)
  with pytest.raises(run.RunError, match="is an x4 upscaler model, which main.py does not run"):
    run.generate_run(cfg)
