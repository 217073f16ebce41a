"""Depth-to-image models (5-channel UNet: the latents and a depth map) end to end against
diffusers' StableDiffusionDepth2ImgPipeline given depth maps (no estimator) and our draws (the
init image's posterior sample, the noise)."""

import diffusers
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from parity import assert_close, img2img_draws, nchw, nhwc, randn, rel_err, single_file_round_trip

import sdjax
from sdjax import sampling, testing

torch.set_num_threads(1)

PROMPTS = ["a red circle in the center", "a photo of a cat"]
NEGATIVES = ["blue", ""]
H, W = 16, 24  # latents 8 x 12
SCHEDULERS = {"euler": "EulerDiscreteScheduler", "heun": "HeunDiscreteScheduler"}


@pytest.fixture(scope="module")
def depth(tmp_path_factory):
  """A tiny SD2 (v-prediction) depth-to-image model: diffusers' pipeline, ours, its folder."""
  folder = str(tmp_path_factory.mktemp("depth") / "pipe")
  testing.write_torch_pipeline(folder, "sd2", seed=19, depth=True)
  ref = diffusers.StableDiffusionDepth2ImgPipeline.from_pretrained(
      folder, depth_estimator=None, feature_extractor=None)
  ref.set_progress_bar_config(disable=True)
  return ref, sdjax.load_pipeline(folder), folder


def _inputs(seed=0, depth_hw=(12, 20)):
  rng = np.random.default_rng(seed)
  images = rng.uniform(size=(2, H, W, 3)).astype(np.float32)
  depth_maps = rng.uniform(0.5, 9.0, size=(2, *depth_hw)).astype(np.float32)
  return images, depth_maps


@pytest.mark.parametrize("name,strength,guidance", [("euler", 0.7, 3.0), ("heun", 1.0, 1.0)])
def test_depth_matches_diffusers(depth, name, strength, guidance):
  ref, pipe, _ = depth
  images, depth_maps = _inputs(1)
  noise, seed, steps = randn(2, H // 2, W // 2, 4, seed=6), 4, 5
  ref.scheduler = getattr(diffusers, SCHEDULERS[name]).from_config(pipe.scheduler_config)
  with img2img_draws(type(ref).__module__, seed, noise.shape[1:], noise):
    expected = ref(PROMPTS, image=nchw(images), depth_map=torch.from_numpy(depth_maps),
                   negative_prompt=NEGATIVES, strength=strength, num_inference_steps=steps,
                   guidance_scale=guidance, output_type="np").images
  ours = pipe.generate(PROMPTS, negative_prompts=NEGATIVES, init_images=images,
                       depth_maps=depth_maps, strength=strength, steps=steps,
                       guidance_scale=guidance, scheduler=name, seed=seed, latents=noise)
  err = rel_err(ours, expected)
  print(f"\ndepth, {name}, strength {strength}, guidance {guidance}: {err:.2e}")
  assert err <= 1e-4
  flipped = pipe.generate(PROMPTS, negative_prompts=NEGATIVES, init_images=images,
                          depth_maps=-depth_maps, strength=strength, steps=steps,
                          guidance_scale=guidance, scheduler=name, seed=seed, latents=noise)
  assert rel_err(flipped, expected) > 1e-3  # the depth steers it


@pytest.mark.parametrize("depth_hw", [(12, 20), (8, 12), (40, 56)])
def test_depth_condition_matches_diffusers(depth, depth_hw):
  """The UNet's depth input, from maps smaller, as large as and larger than the latents."""
  ref, _, _ = depth
  _, depth_maps = _inputs(2, depth_hw)
  theirs = ref.prepare_depth_map(nchw(np.zeros((2, H, W, 3), np.float32)),
                                 torch.from_numpy(depth_maps), 2, False, torch.float32, "cpu")
  ours = sampling.depth_condition(jnp.asarray(depth_maps), (H // 2, W // 2))
  assert_close(ours, nhwc(theirs))  # float32 sums in another order: ~2e-6


def test_bad_depth_arguments(depth, model):
  _, pipe, _ = depth
  images, depth_maps = _inputs()
  kw = dict(steps=2, guidance_scale=3.0)
  with pytest.raises(ValueError, match="needs depth_maps: .* sdjax has no estimator"):
    pipe.generate(PROMPTS, init_images=images, **kw)
  with pytest.raises(ValueError, match="makes img2img runs: give init_images and their"):
    pipe.generate(PROMPTS, height=H, width=W, depth_maps=depth_maps, **kw)
  with pytest.raises(ValueError, match=r"depth_maps must be \[2, h, w\], got \(1, 12, 20\)"):
    pipe.generate(PROMPTS, init_images=images, depth_maps=depth_maps[:1], **kw)
  with pytest.raises(ValueError, match="a depth map is constant"):
    pipe.generate(PROMPTS, init_images=images, depth_maps=np.ones((2, 4, 4)), **kw)
  with pytest.raises(ValueError, match="takes no masks"):
    pipe.generate(PROMPTS, init_images=images, depth_maps=depth_maps,
                  mask_images=np.ones((2, H, W)), **kw)
  with pytest.raises(ValueError, match="depth_maps are a depth-to-image model's"):
    sdjax.load_pipeline(model).generate(PROMPTS, init_images=images, depth_maps=depth_maps,
                                        **kw)


def test_single_file_and_export_round_trip(depth, tmp_path):
  ref, pipe, folder = depth
  single_file_round_trip(ref, pipe, folder, folder, tmp_path, depth_estimator=None,
                         feature_extractor=None)


def test_run_with_depth_image_lines(depth, model, tmp_path):
  """main.py's run on a depth model: each jsonl line's init_image and depth_image (a 16-bit
  grey PNG; an 8-bit one) make generate()'s image given that map as floats; records keep the
  depth image. A line without one, or one on another model, is a clear error."""
  import dataclasses
  import json

  from PIL import Image

  from sdjax import outputs, run

  _, pipe, folder = depth
  rng = np.random.default_rng(5)
  Image.fromarray(rng.integers(0, 255, (20, 28, 3), np.uint8)).save(tmp_path / "a.png")
  deep = rng.integers(0, 65535, (30, 44)).astype(np.uint16)
  Image.fromarray(deep).save(tmp_path / "d16.png")
  assert Image.open(tmp_path / "d16.png").mode.startswith("I")
  shallow = rng.integers(0, 255, (10, 14), np.uint8)
  Image.fromarray(shallow).save(tmp_path / "d8.png")
  path = tmp_path / "depth.jsonl"
  path.write_text("".join(json.dumps({"prompt": p, "init_image": "a.png", "depth_image": d})
                          + "\n" for p, d in (("a cat", "d16.png"), ("a dog", "d8.png"))))
  kw = dict(steps=3, guidance_scale=3.0, scheduler="euler")
  cfg = run.RunConfig(model=folder, prompts_file=str(path), height=H, width=W, seed=1,
                      batch_size=2, strength=0.7, output_dir=str(tmp_path / "out"),
                      compilation_cache="", show_progress=False, **kw)
  assert run.generate_run(cfg).images == 2
  records = [json.loads(x) for x in open(tmp_path / "out" / outputs.MANIFEST_NAME)]
  image = outputs.read_image(str(tmp_path / "a.png"), (H, W))
  for record, raw in zip(records, (deep, shallow), strict=True):
    assert record["depth_image"].endswith(("d16.png", "d8.png"))
    expected = pipe.generate(record["prompt"], init_images=image[None], strength=0.7,
                             depth_maps=raw[None].astype(np.float32), seed=record["seed"], **kw)
    written = np.asarray(Image.open(tmp_path / "out" / record["file"]), np.float32) / 255
    assert np.abs(written - expected[0]).max() <= 1 / 255 + 1e-6
  lone = tmp_path / "lone.jsonl"
  lone.write_text('{"prompt": "a cat", "init_image": "a.png"}\n')
  with pytest.raises(run.RunError, match="a depth-to-image model's lines need an init_image"):
    run.generate_run(dataclasses.replace(cfg, prompts_file=str(lone),
                                         output_dir=str(tmp_path / "lone")))
  with pytest.raises(run.RunError, match="a depth_image steers a depth-to-image model"):
    run.generate_run(dataclasses.replace(cfg, model=model, output_dir=str(tmp_path / "plain")))
  flat = tmp_path / "flat.jsonl"
  Image.fromarray(np.full((8, 8), 7, np.uint8)).save(tmp_path / "flat.png")
  flat.write_text('{"prompt": "a cat", "init_image": "a.png", "depth_image": "flat.png"}\n')
  with pytest.raises(run.RunError, match="flat.png is constant"):
    run.generate_run(dataclasses.replace(cfg, prompts_file=str(flat), batch_size=1,
                                         output_dir=str(tmp_path / "flat")))
