"""The x4 upscaler (stable-diffusion-x4-upscaler's layout: the UNet takes the latents and the
noised low-res image, its noise level as a class label; a VAE of 1/4) against diffusers'
StableDiffusionUpscalePipeline given our draws (the low-res image's noise, the initial noise),
and with per-image CPU generators."""

import json
import os
import shutil
from unittest import mock

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from parity import nchw, rel_err, single_file_round_trip
from safetensors.numpy import load_file, save_file

import sdjax
from sdjax import sampling, testing
from sdjax.checkpoints import standard

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


def test_latent_scale_is_the_upscalers(upscaler, tmp_path):
  """diffusers' upscale pipeline scales latents by 0.08333 whatever its VAE's config says (a
  config without scaling_factor defaults to 0.18215); sdjax does the same, for a replacement
  VAE too."""
  _, _, folder = upscaler
  copy = str(tmp_path / "pipe")
  shutil.copytree(folder, copy)
  vae_config = os.path.join(copy, "vae", "config.json")
  with open(vae_config) as f:
    config = json.load(f)
  del config["scaling_factor"]
  with open(vae_config, "w") as f:
    json.dump(config, f)
  ref = diffusers.StableDiffusionUpscalePipeline.from_pretrained(copy)
  assert ref.vae.config.scaling_factor == 0.08333
  assert sdjax.load_pipeline(copy).scaling_factor == ref.vae.config.scaling_factor
  assert sdjax.load_pipeline(folder, vae=os.path.join(copy, "vae")).scaling_factor == 0.08333


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


def test_export_round_trip(upscaler, tmp_path, monkeypatch):
  """A folder sdjax writes is diffusers' upscale pipeline, its low-res scheduler kept. A single
  file sdjax writes (the original layout, the noise-level classes as `label_emb`) is diffusers'
  `from_single_file` weights, and loads with the upscaler's config folder (its low-res schedule
  and max noise level: the file does not say them) or, without one, with the built-in standard
  config of the x4 upscaler (the tiny architecture standing in for the full-size one)."""
  ref, pipe, folder = upscaler
  single_file_round_trip(ref, pipe, folder, folder, tmp_path, safety_checker=None)
  path = str(tmp_path / "model.safetensors")
  loaded = sdjax.load_pipeline(path, config=folder)
  assert loaded.low_res_scheduler_config == pipe.low_res_scheduler_config
  assert loaded.max_noise_level == pipe.max_noise_level
  built_in = standard.standard_config("sd2_x4_upscaler")
  tiny = {}
  for name in ("unet", "vae", "text_encoder", "scheduler", "low_res_scheduler"):
    file = "config.json" if name in ("unet", "vae", "text_encoder") else "scheduler_config.json"
    with open(os.path.join(folder, name, file)) as f:
      tiny[name] = json.load(f)
  tiny.update(tokenizer=built_in["tokenizer"], model_index={"max_noise_level": 300})
  asked = []
  monkeypatch.setattr(standard, "standard_config", lambda name: asked.append(name) or tiny)
  monkeypatch.setattr(standard, "clip_tokenizer", lambda pad: pipe.tokenizer)
  own = sdjax.load_pipeline(path)
  assert asked == ["sd2_x4_upscaler"]
  jax.tree.map(np.testing.assert_array_equal, own.params, pipe.params)
  assert {k: v for k, v in own.low_res_scheduler_config.items() if not k.startswith("_")} == {
      k: v for k, v in ref.low_res_scheduler.config.items() if not k.startswith("_")}
  assert own.max_noise_level == 300  # the config's, not a default
  assert own.scheduler_config["prediction_type"] == "v_prediction"
  monkeypatch.undo()  # the rest with the real standard configs
  state = load_file(path)  # a 4-channel UNet with the upscaler's config
  conv_in = "model.diffusion_model.input_blocks.0.0.weight"
  save_file({**state, conv_in: state[conv_in][:, :4].copy()}, str(tmp_path / "four.safetensors"))
  with pytest.raises(sdjax.PipelineError, match="four.safetensors is not an x4 upscaler .4 UNet "
                                                "input channels. but config .* is one"):
    sdjax.load_pipeline(str(tmp_path / "four.safetensors"), config=folder)
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


def test_run_with_init_image_lines(upscaler, model, tmp_path):
  """main.py's run on an x4 upscaler: each line's init_image, read at a quarter of the run's
  image size, is enlarged as generate() enlarges it (--noise_level, recorded); a line without
  one, or the flag on another model, is a clear error."""
  import dataclasses
  import json

  from PIL import Image

  from sdjax import outputs, run

  _, pipe, folder = upscaler
  rng = np.random.default_rng(7)
  Image.fromarray(rng.integers(0, 255, (10, 14, 3), np.uint8)).save(tmp_path / "small.png")
  path = tmp_path / "x4.jsonl"
  path.write_text(json.dumps({"prompt": "a cat", "init_image": "small.png"}) + "\n")
  kw = dict(steps=3, guidance_scale=3.0, scheduler="ddim")
  cfg = run.RunConfig(model=folder, prompts_file=str(path), height=4 * h, width=4 * w, seed=2,
                      batch_size=1, noise_level=40, output_dir=str(tmp_path / "out"),
                      compilation_cache="", show_progress=False, **kw)
  assert run.generate_run(cfg).images == 1
  record = json.loads(open(tmp_path / "out" / outputs.MANIFEST_NAME).readline())
  assert record["noise_level"] == 40 and (record["height"], record["width"]) == (4 * h, 4 * w)
  small = outputs.read_image(str(tmp_path / "small.png"), (h, w))
  expected = pipe.generate("a cat", init_images=small[None], noise_level=40,
                           seed=record["seed"], **kw)
  written = np.asarray(Image.open(tmp_path / "out" / record["file"]), np.float32) / 255
  assert np.abs(written - expected[0]).max() <= 1 / 255 + 1e-6
  assert "strength" not in record  # it starts from pure noise
  # Level 0 (no noise on the low-res image) is recorded as 0, not as the default.
  assert run.generate_run(dataclasses.replace(cfg, noise_level=0,
                                              output_dir=str(tmp_path / "zero"))).images == 1
  zero = json.loads(open(tmp_path / "zero" / outputs.MANIFEST_NAME).readline())
  assert zero["noise_level"] == 0
  assert "Denoising strength" not in Image.open(tmp_path / "out" / record["file"]).text[
      "parameters"]
  text = tmp_path / "text.jsonl"
  text.write_text('{"prompt": "a cat"}\n')
  with pytest.raises(run.RunError, match="enlarges images: give init_images"):
    run.generate_run(dataclasses.replace(cfg, prompts_file=str(text),
                                         output_dir=str(tmp_path / "text")))
  with pytest.raises(run.RunError, match="--noise_level is an x4 upscaler model's"):
    run.generate_run(dataclasses.replace(cfg, model=model, output_dir=str(tmp_path / "plain")))
  with pytest.raises(run.RunError, match=r"--noise_level must be an integer in \[0, 350\]"):
    run.generate_run(dataclasses.replace(cfg, noise_level=400, output_dir=str(tmp_path / "bad")))
