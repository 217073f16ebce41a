"""InstructPix2Pix (8-channel UNet: the latents and the edited image's) end to end against
diffusers' StableDiffusionInstructPix2PixPipeline, with our initial noise; at strength < 1
(A1111's img2img with such a model) against the same pipeline started from diffusers' img2img
latents, made from our posterior draw."""

import dataclasses
import os

import diffusers
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from parity import nchw, nhwc, rel_err, single_file_round_trip

import sdjax
from sdjax import pipeline, sampling, testing

torch.set_num_threads(1)

PROMPTS = ["make it a red circle", "turn it into a cat"]
NEGATIVES = ["blue", ""]
H, W = 16, 24  # latents 8 x 12
SCHEDULERS = {
    "euler": ("EulerDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
}


@pytest.fixture(scope="module")
def pix2pix(tmp_path_factory):
  folder = str(tmp_path_factory.mktemp("pix2pix") / "pipe")
  testing.write_torch_pipeline(folder, "sd1", seed=23, pix2pix=True)
  ref = diffusers.StableDiffusionInstructPix2PixPipeline.from_pretrained(folder,
                                                                         safety_checker=None)
  ref.set_progress_bar_config(disable=True)
  return ref, sdjax.load_pipeline(folder), folder


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  images = rng.uniform(size=(2, H, W, 3)).astype(np.float32)
  noise = rng.standard_normal((2, H // 2, W // 2, 4)).astype(np.float32)
  return images, noise


def _reference(ref, pipe, images, noise, name, steps, guidance, image_guidance, start=None,
               skip=0, **kwargs):
  """diffusers' edit of `images`, from `noise` (scaled by the scheduler's initial sigma, as the
  pipeline scales given latents), or from `start` (diffusion latents, NCHW) at the schedule's
  position `skip` (its img2img pipelines' `timesteps[t_start * order:]` and `set_begin_index`)."""
  cls, overrides = SCHEDULERS[name]
  ref.scheduler = sched = getattr(diffusers, cls).from_config(pipe.scheduler_config, **overrides)
  latents = nchw(noise)
  if start is not None:
    set_timesteps = sched.set_timesteps

    def truncated(*args, **kwargs):
      set_timesteps(*args, **kwargs)
      sched.timesteps = sched.timesteps[skip * sched.order:]
      sched.set_begin_index(skip * sched.order)

    sched.set_timesteps = truncated
    set_timesteps(steps)  # the pipeline multiplies `latents` by its schedule's initial sigma
    latents = start / sched.init_noise_sigma
  with torch.no_grad():
    return ref(PROMPTS, image=nchw(images), num_inference_steps=steps, guidance_scale=guidance,
               image_guidance_scale=image_guidance, latents=latents, output_type="np",
               **{"negative_prompt": NEGATIVES, **kwargs}).images


@pytest.mark.parametrize("name,guidance,image_guidance", [
    ("euler", 3.0, 1.7), ("ddim", 3.0, 1.0), ("heun", 1.0, 1.5)])
def test_edit_matches_diffusers(pix2pix, name, guidance, image_guidance):
  ref, pipe, _ = pix2pix
  images, noise = _inputs(1)
  steps = 5
  expected = _reference(ref, pipe, images, noise, name, steps, guidance, image_guidance)
  ours = pipe.generate(PROMPTS, negative_prompts=NEGATIVES, init_images=images, steps=steps,
                       guidance_scale=guidance, image_guidance_scale=image_guidance,
                       scheduler=name, latents=noise)
  assert ours.shape == (2, H, W, 3)
  err = rel_err(ours, expected)
  print(f"\npix2pix, {name}, guidance {guidance}, image guidance {image_guidance}: {err:.2e}")
  assert err <= 1e-4
  if guidance > 1:  # the image guidance scale is used
    other = pipe.generate(PROMPTS, negative_prompts=NEGATIVES, init_images=images, steps=steps,
                          guidance_scale=guidance, image_guidance_scale=image_guidance + 1.0,
                          scheduler=name, latents=noise)
    assert rel_err(other, expected) > 1e-3


def test_edit_from_noised_image_matches_diffusers(pix2pix):
  """strength < 1: the run starts from the image's posterior sample noised to the schedule's
  position, as diffusers' img2img pipeline starts (and A1111's img2img with an edit model)."""
  ref, pipe, _ = pix2pix
  images, noise = _inputs(2)
  seed, steps, strength = 5, 6, 0.5
  skip = steps - int(steps * strength)
  keys = sampling.image_keys(jnp.asarray(sampling.make_seeds(seed, 2)))
  eps = nchw(np.asarray(sampling._keyed_noise(keys, sampling._POSTERIOR,  # noqa: SLF001
                                              noise.shape[1:])))
  sched = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler_config)
  sched.set_timesteps(steps)
  with torch.no_grad():
    dist = ref.vae.encode(nchw(2 * images - 1)).latent_dist
    sample = (dist.mean + dist.std * eps) * ref.vae.config.scaling_factor
    start = sched.add_noise(sample, nchw(noise), sched.timesteps[skip:skip + 1])
  expected = _reference(ref, pipe, images, noise, "euler", steps, 4.0, 1.5, start, skip)
  ours = pipe.generate(PROMPTS, negative_prompts=NEGATIVES, init_images=images, steps=steps,
                       guidance_scale=4.0, scheduler="euler", seed=seed, latents=noise,
                       strength=strength)
  err = rel_err(ours, expected)
  print(f"\npix2pix from the noised image, strength {strength}: {err:.2e}")
  assert err <= 1e-4
  full = pipe.generate(PROMPTS, negative_prompts=NEGATIVES, init_images=images, steps=steps,
                       guidance_scale=4.0, scheduler="euler", seed=seed, latents=noise)
  assert rel_err(full, expected) > 1e-2


def test_edit_latents_are_the_posterior_mode(pix2pix):
  ref, pipe, _ = pix2pix
  images, _ = _inputs(3)
  ours = sampling.edit_latents(pipe.vae, pipe.params["vae"], jnp.asarray(images))
  with torch.no_grad():
    theirs = ref.vae.encode(nchw(2 * images - 1)).latent_dist.mode()
  assert rel_err(ours, nhwc(theirs)) <= 1e-5


def test_bad_edit_arguments(pix2pix):
  _, pipe, _ = pix2pix
  images, _ = _inputs()
  kw = dict(steps=2, guidance_scale=3.0)
  with pytest.raises(ValueError, match="edits images: give init_images"):
    pipe.generate(PROMPTS, height=H, width=W, **kw)
  with pytest.raises(ValueError, match="takes no masks"):
    pipe.generate(PROMPTS, init_images=images, mask_images=np.ones((2, H, W)), **kw)
  with pytest.raises(ValueError, match="image_guidance_scale must be a number >= 0"):
    pipe.generate(PROMPTS, init_images=images, image_guidance_scale=-1.0, **kw)
  with pytest.raises(ValueError, match="edit does not take guidance_rescale"):
    pipe.generate(PROMPTS, init_images=images, guidance_rescale=0.7, **kw)
  with pytest.raises(ValueError, match="edit does not take cfg_parallel"):
    pipe.generate(PROMPTS, init_images=images, cfg_parallel=True, **kw)
  with pytest.raises(ValueError, match="edit does not take scheduler 'euler_cfg_pp'"):
    pipe.generate(PROMPTS, init_images=images, scheduler="euler_cfg_pp", **kw)
  with pytest.raises(ValueError, match="edit does not take NGMS or Skip Early CFG"):
    pipe.generate(PROMPTS, init_images=images, skip_early_cond=0.5, **kw)
  with pytest.raises(ValueError, match="or perturbed-attention guidance"):
    pipe.generate(PROMPTS, init_images=images, pag_scale=3.0, **kw)
  with pytest.raises(ValueError, match="composable prompts .* not instruct-pix2pix"):
    pipe.generate(["a cat AND a dog"] * 2, init_images=images, prompt_syntax="a1111", **kw)


def test_image_guidance_scale_needs_an_edit_model(model):
  plain = sdjax.load_pipeline(model)
  with pytest.raises(ValueError, match="image_guidance_scale is an instruct-pix2pix model's"):
    plain.generate(PROMPTS, steps=2, height=H, width=W, image_guidance_scale=1.5)


def test_single_file_and_export_round_trip(pix2pix, model, tmp_path):
  """An instruct-pix2pix single file (8 input channels) loads with a text-to-image model's
  config, as diffusers' `from_single_file` reads it with the pipeline's own; a folder sdjax
  writes is diffusers' instruct-pix2pix pipeline."""
  ref, pipe, folder = pix2pix
  single_file_round_trip(ref, pipe, folder, model, tmp_path)
  assert sampling.is_edit_model(sdjax.load_pipeline(str(tmp_path / "model.safetensors"),
                                                    config=model))
  assert sampling.is_edit_model(sdjax.load_pipeline(str(tmp_path / "folder")))


def test_run_with_init_image_lines(pix2pix, model, tmp_path):
  """main.py's run on an edit model: each jsonl line's init_image is edited as generate() edits
  it (the run's strength, A1111's img2img; --image_guidance_scale); the records and the PNG's
  A1111 parameters ("Image CFG scale", which --parameters_file reads back) keep the scale. A
  line without an image, or the flag on another model, is a clear error."""
  import json

  from PIL import Image

  from sdjax import infotext, outputs, run

  _, pipe, folder = pix2pix
  rng = np.random.default_rng(5)
  Image.fromarray(rng.integers(0, 255, (20, 28, 3), np.uint8)).save(tmp_path / "a.png")
  path = tmp_path / "edit.jsonl"
  path.write_text(json.dumps({"prompt": "make it snowy", "init_image": "a.png"}) + "\n"
                  + json.dumps({"prompt": "make it red", "init_image": "a.png", "seed": 3})
                  + "\n")
  kw = dict(steps=4, guidance_scale=3.0, scheduler="euler")
  cfg = run.RunConfig(model=folder, prompts_file=str(path), height=H, width=W, seed=1,
                      batch_size=2, image_guidance_scale=2.0, output_dir=str(tmp_path / "out"),
                      compilation_cache="", show_progress=False, **kw)
  assert run.generate_run(cfg).images == 2
  records = [json.loads(x) for x in open(tmp_path / "out" / outputs.MANIFEST_NAME)]
  image = outputs.read_image(str(tmp_path / "a.png"), (H, W))
  for record in records:
    assert record["image_guidance_scale"] == 2.0 and record["strength"] == 0.75
    expected = pipe.generate(record["prompt"], init_images=image[None], strength=0.75,
                             image_guidance_scale=2.0, seed=record["seed"], **kw)
    written = Image.open(tmp_path / "out" / record["file"])
    assert np.abs(np.asarray(written, np.float32) / 255 - expected[0]).max() <= 1 / 255 + 1e-6
    parameters = written.text["parameters"]
    assert "Denoising strength: 0.75, Image CFG scale: 2.0" in parameters
    assert infotext.reproduce(parameters).flags["image_guidance_scale"] == "2.0"
  text = tmp_path / "text.jsonl"
  text.write_text('{"prompt": "a cat"}\n')
  with pytest.raises(run.RunError, match="edits images: give init_images"):
    run.generate_run(dataclasses.replace(cfg, prompts_file=str(text), batch_size=1,
                                         output_dir=str(tmp_path / "text")))
  with pytest.raises(run.RunError, match="--image_guidance_scale is an instruct-pix2pix"):
    run.generate_run(dataclasses.replace(cfg, model=model, output_dir=str(tmp_path / "plain")))
  with pytest.raises(run.RunError, match="--image_guidance_scale must be a number >= 0"):
    run.generate_run(dataclasses.replace(cfg, image_guidance_scale=-1.0,
                                         output_dir=str(tmp_path / "bad")))


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
  """A tiny SDXL instruct-pix2pix model (diffusers' StableDiffusionXLInstructPix2PixPipeline):
  the base's encoders and VAE (with latent statistics), an 8-channel UNet."""
  base, _ = testing.torch_sdxl_pipelines(str(tmp_path_factory.mktemp("sdxl_src")), seed=29)
  ref = diffusers.StableDiffusionXLInstructPix2PixPipeline(
      vae=base.vae, text_encoder=base.text_encoder, text_encoder_2=base.text_encoder_2,
      tokenizer=base.tokenizer, tokenizer_2=base.tokenizer_2,
      unet=testing.torch_unet({**testing.UNET_SDXL, "in_channels": 8}, seed=31),
      scheduler=base.scheduler, add_watermarker=False)
  ref.set_progress_bar_config(disable=True)
  folder = str(tmp_path_factory.mktemp("sdxl_pix2pix") / "pipe")
  ref.save_pretrained(folder, safe_serialization=True)
  return ref, sdjax.load_pipeline(folder), folder


@pytest.mark.parametrize("name,guidance,negatives", [("euler", 4.0, None),
                                                     ("ddim", 3.0, ["blue", ""])])
def test_sdxl_edit_matches_diffusers(sdxl, name, guidance, negatives):
  """SDXL: the pooled embeds and time ids in the same three rows (no negative prompt: zeros, as
  `force_zeros_for_empty_prompt`), the decode through the VAE's latent statistics."""
  ref, pipe, _ = sdxl
  images, noise = _inputs(4)
  micro = dict(original_size=(32, 40), crops_coords_top_left=(2, 4))
  expected = _reference(ref, pipe, images, noise, name, 4, guidance, 1.6, height=H, width=W,
                        negative_prompt=negatives, **micro)
  ours = pipe.generate(PROMPTS, negative_prompts=negatives, init_images=images, steps=4,
                       guidance_scale=guidance, image_guidance_scale=1.6, scheduler=name,
                       latents=noise, **micro)
  err = rel_err(ours, expected)
  print(f"\nSDXL pix2pix, {name}, negatives {negatives}: {err:.2e}")
  assert err <= 1e-4
  # A folder sdjax writes is this pipeline (SD1's round trip: test_single_file_and_export...).
  index = pipeline._model_index(pipe, "EulerDiscreteScheduler")  # noqa: SLF001
  assert index["_class_name"] == "StableDiffusionXLInstructPix2PixPipeline"


def test_main_init_image_flags(pix2pix, tmp_path, monkeypatch):
  """main.py's --init_image / --mask_image give --prompt's lines their images (a local path
  made absolute), as a jsonl line's init_image / mask_image."""
  from absl import flags

  import main
  from sdjax import run

  _, _, folder = pix2pix
  monkeypatch.chdir(tmp_path)

  def config(*args):
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["main.py", "--model", folder, *args])
    try:
      return main._run_config()  # noqa: SLF001
    finally:
      flags.FLAGS.unparse_flags()

  cfg = config("--prompt", "make it snowy", "--prompt", "make it red", "--init_image", "a.png",
               "--image_guidance_scale", "1.25")
  assert cfg.prompts == tuple(run.PromptLine(p, init_image=str(tmp_path / "a.png"))
                              for p in ("make it snowy", "make it red"))
  assert cfg.image_guidance_scale == 1.25
  cfg = config("--prompt", "a", "--init_image", "gs://b/a.png", "--mask_image", "~/m.png")
  assert cfg.prompts[0].init_image == "gs://b/a.png"
  assert cfg.prompts[0].mask_image == os.path.expanduser("~/m.png")
  assert config("--prompt", "a", "--init_image", "a.png", "--depth_image",
                "d.png").prompts[0].depth_image == str(tmp_path / "d.png")
  with pytest.raises(run.RunError, match="--mask_image marks what to repaint in --init_image"):
    config("--prompt", "a", "--mask_image", "m.png")
  with pytest.raises(run.RunError, match="--depth_image is the depth map of --init_image"):
    config("--prompt", "a", "--depth_image", "d.png")
  (tmp_path / "p.txt").write_text("a cat\n")
  with pytest.raises(run.RunError, match="--init_image, --mask_image and --depth_image are"):
    config("--prompts_file", "p.txt", "--init_image", "a.png")


def test_torch_generators_match_diffusers(pix2pix):
  """rng="torch_cpu": diffusers' edit with per-image CPU generators of the same seeds (which
  draw the initial noise alone: the image's latents are the posterior's mode)."""
  ref, pipe, _ = pix2pix
  images, _ = _inputs(5)
  ref.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler_config)
  with torch.no_grad():
    expected = ref(PROMPTS, image=nchw(images), negative_prompt=NEGATIVES, num_inference_steps=3,
                   guidance_scale=3.0, image_guidance_scale=1.5, output_type="np",
                   generator=[torch.Generator().manual_seed(s) for s in (8, 9)]).images
  ours = pipe.generate(PROMPTS, negative_prompts=NEGATIVES, init_images=images, steps=3,
                       guidance_scale=3.0, scheduler="euler", seed=8, rng="torch_cpu")
  assert rel_err(ours, expected) <= 1e-4


def test_ip_adapter_matches_diffusers(pix2pix, tmp_path):
  """An IP-Adapter on the edit model: diffusers' pipeline after load_ip_adapter orders the image
  embeds [image, negative, negative], as the three rows' embeddings are here (one prompt per
  diffusers call: its adapter images serve a whole call)."""
  from test_ip_adapter import ip_state, reference_images, write_ip_file
  from transformers import CLIPImageProcessor

  ref, pipe, _ = pix2pix
  encoder = testing.torch_clip_vision(seed=12)
  encoder.save_pretrained(str(tmp_path / "image_encoder"), safe_serialization=True)
  write_ip_file(str(tmp_path / "ip.bin"), ip_state("plus", ref.unet, 4))
  withip = diffusers.StableDiffusionInstructPix2PixPipeline(
      **{**ref.components, "image_encoder": encoder,
         "feature_extractor": CLIPImageProcessor(size=32, crop_size=32)})
  withip.set_progress_bar_config(disable=True)
  withip.load_ip_adapter(str(tmp_path), subfolder="", weight_name="ip.bin",
                         image_encoder_folder=None)
  withip.set_ip_adapter_scale(0.7)
  withip.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler_config)
  images, noise = _inputs(6)
  adapter_images = reference_images(8)
  expected = []
  with torch.no_grad():
    for i in range(2):
      expected.append(withip(PROMPTS[i], image=nchw(images[i:i + 1]),
                             negative_prompt=NEGATIVES[i], num_inference_steps=3,
                             guidance_scale=3.0, image_guidance_scale=1.4,
                             latents=nchw(noise[i:i + 1]), ip_adapter_image=adapter_images[i],
                             output_type="np").images[0])
  adapter = sdjax.load_ip_adapter(str(tmp_path / "ip.bin"))
  ours = pipe.generate(PROMPTS, negative_prompts=NEGATIVES, init_images=images, steps=3,
                       guidance_scale=3.0, image_guidance_scale=1.4, scheduler="euler",
                       latents=noise, ip_adapter=adapter, ip_adapter_scale=0.7,
                       ip_adapter_images=np.stack([np.asarray(a, np.float32) / 255
                                                   for a in adapter_images]))
  err = rel_err(ours, np.stack(expected))
  print(f"\npix2pix with an IP-Adapter: {err:.2e}")
  assert err <= 1e-4
  plain = pipe.generate(PROMPTS, negative_prompts=NEGATIVES, init_images=images, steps=3,
                        guidance_scale=3.0, image_guidance_scale=1.4, scheduler="euler",
                        latents=noise)
  assert rel_err(plain, np.stack(expected)) > 1e-3  # the adapter steers it
