"""Inpainting end to end against diffusers' StableDiffusionInpaintPipeline: an inpainting model
(9-channel UNet: latents, mask, masked image latents) and a text-to-image model (the latents
outside the mask reset to the image's after every step), with our draws of every random
number (initial noise, the VAE posterior samples of the image and of the masked image)."""

import contextlib
import dataclasses
import math
from unittest import mock

import diffusers
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from parity import nchw, rel_err, single_file_round_trip

import sdjax
from sdjax import run, sampling, testing

torch.set_num_threads(1)

PROMPTS = ["a red circle in the center", "a photo of a cat"]
NEGATIVES = ["blue", ""]
GUIDANCE = 3.0
H, W = 16, 24  # latents 8 x 12
SCHEDULERS = {
    "euler": ("EulerDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
}


def _pipes(tmp_path_factory, name, inpainting):
  folder = str(tmp_path_factory.mktemp(name) / "pipe")
  testing.write_torch_pipeline(folder, "sd1", seed=41, inpainting=inpainting)
  ref = diffusers.StableDiffusionInpaintPipeline.from_pretrained(folder, safety_checker=None)
  ref.set_progress_bar_config(disable=True)
  return ref, sdjax.load_pipeline(folder), folder


@pytest.fixture(scope="module")
def inpainting(tmp_path_factory):
  return _pipes(tmp_path_factory, "inpainting", True)


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
  return _pipes(tmp_path_factory, "plain", False)


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  images = rng.uniform(size=(2, H, W, 3)).astype(np.float32)
  masks = np.zeros((2, H, W), np.float32)
  masks[0, 4:12, 8:20] = 1.0  # a rectangle to repaint
  masks[1] = rng.uniform(size=(H, W)) > 0.6  # scattered pixels: the binarized, sampled mask
  masks[1, :, :5] = 0.7  # >= 0.5 repaints
  masks[1, :3] = 0.3  # < 0.5 keeps
  noise = rng.standard_normal((2, H // 2, W // 2, 4)).astype(np.float32)
  return images, masks, noise


@contextlib.contextmanager
def _our_draws(module, seed, noise, masked_mean, image_latents=None):
  """diffusers' pipeline (in `module`) given our random numbers: `randn_tensor` our initial
  noise, the VAE posterior samples from our streams: the masked image's (told apart by its
  posterior mean, `masked_mean`) and the image's (then passed through `image_latents`, if
  given). Yields the encodings' order."""
  keys = sampling.image_keys(jnp.asarray(sampling.make_seeds(seed, len(noise))))
  shape = noise.shape[1:]
  eps = {stream: nchw(np.asarray(sampling._keyed_noise(keys, stream, shape)))  # noqa: SLF001
         for stream in (sampling._POSTERIOR, sampling._MASKED_POSTERIOR)}  # noqa: SLF001
  calls = []

  def retrieve_latents(encoder_output, generator=None, sample_mode="sample"):
    dist = encoder_output.latent_dist
    # A single PIL image is encoded once for the whole batch (its first row; a batch of one
    # may round differently).
    masked = torch.allclose(dist.mean, masked_mean[:len(dist.mean)], rtol=1e-5, atol=1e-6)
    calls.append("masked" if masked else "image")
    latents = dist.mean + dist.std * eps[sampling._MASKED_POSTERIOR if masked  # noqa: SLF001
                                         else sampling._POSTERIOR]  # noqa: SLF001
    return latents if masked or image_latents is None else image_latents(latents)

  with mock.patch(f"{module}.retrieve_latents", retrieve_latents), \
       mock.patch(f"{module}.randn_tensor", lambda *a, **k: nchw(noise)), torch.no_grad():
    yield calls


def _reference(ref, pipe, images, masks, noise, seed, name, strength, steps, image_latents=None,
               **kwargs):
  """diffusers' images; `images` and `masks` are what the sampler sees ([N, H, W, 3], [N, H, W]),
  `kwargs` may give diffusers its own `image` and `mask_image` (which it preprocesses into
  those); `image_latents` changes the image's encoding (see `_our_draws`)."""
  cls, overrides = SCHEDULERS[name]
  ref.scheduler = getattr(diffusers, cls).from_config(pipe.scheduler_config, **overrides)
  masked = nchw(2 * images - 1) * ~torch.from_numpy(masks[:, None] >= 0.5)
  with torch.no_grad():
    masked_mean = ref.vae.encode(masked).latent_dist.mean
  kwargs = {"image": nchw(images), "mask_image": torch.from_numpy(masks[:, None]),
            "output_type": "np", **kwargs}
  with _our_draws(type(ref).__module__, seed, noise, masked_mean, image_latents) as calls:
    out = ref(PROMPTS, negative_prompt=NEGATIVES, height=H, width=W, strength=strength,
              num_inference_steps=steps, guidance_scale=GUIDANCE, **kwargs).images
  return out, calls


@pytest.mark.parametrize("weight", [0.3, 0.7])
def test_conditional_mask_weight_as_a1111(inpainting, weight):
  """A1111's Conditional mask weight: the inpainting model's masked image is torch.lerp(image,
  image * (1 - mask), weight) in [-1, 1] (of the rounded mask), encoded as usual: diffusers'
  pipeline given the latents of that image (A1111's formula, in torch) as masked_image_latents,
  with our posterior draw. Other models take no weight."""
  ref, pipe, _ = inpainting
  images, masks, noise = _inputs(1)
  seed = 7
  signed = nchw(2 * images - 1)
  cond = torch.lerp(signed, signed * (1 - torch.from_numpy((masks[:, None] >= 0.5) * 1.0).float()),
                    weight)
  keys = sampling.image_keys(jnp.asarray(sampling.make_seeds(seed, len(noise))))
  eps = nchw(np.asarray(sampling._keyed_noise(  # noqa: SLF001
      keys, sampling._MASKED_POSTERIOR, noise.shape[1:])))  # noqa: SLF001
  with torch.no_grad():
    dist = ref.vae.encode(cond).latent_dist
  latents = (dist.mean + dist.std * eps) * ref.vae.config.scaling_factor
  expected, calls = _reference(ref, pipe, images, masks, noise, seed, "euler", 1.0, 4,
                               masked_image_latents=latents)
  assert calls == []  # diffusers encoded nothing itself
  common = dict(negative_prompts=NEGATIVES, init_images=images, mask_images=masks, steps=4,
                seed=seed, guidance_scale=GUIDANCE, scheduler="euler", latents=noise)
  ours = pipe.generate(PROMPTS, inpainting_mask_weight=weight, **common)
  err = rel_err(ours, expected)
  print(f"\ninpainting model, Conditional mask weight {weight}: {err:.2e}")
  assert err <= 1e-4
  assert rel_err(pipe.generate(PROMPTS, **common), expected) > 100 * err
  with pytest.raises(ValueError, match="inpainting_mask_weight must be a number from 0 to 1"):
    pipe.generate(PROMPTS, inpainting_mask_weight=1.5, **common)


# The second-order path (heun) is checked on the text-to-image model below.
@pytest.mark.parametrize("name,strength", [("euler", 1.0), ("dpmpp_2m_karras", 0.6)])
def test_inpainting_model_matches_diffusers(inpainting, name, strength):
  ref, pipe, _ = inpainting
  images, masks, noise = _inputs(1)
  seed = 7
  expected, calls = _reference(ref, pipe, images, masks, noise, seed, name, strength, 6)
  # strength 1 starts from pure noise: only the masked image is encoded.
  assert calls == (["masked"] if strength == 1.0 else ["image", "masked"])
  ours = pipe.generate(PROMPTS, negative_prompts=NEGATIVES, init_images=images,
                       mask_images=masks, strength=strength, steps=6, seed=seed,
                       guidance_scale=GUIDANCE, scheduler=name, latents=noise)
  assert ours.shape == (2, H, W, 3)
  err = rel_err(ours, expected)
  print(f"\ninpainting model, {name}, strength {strength}: {err:.2e}")
  assert err <= 1e-4


@pytest.mark.parametrize("name,strength", [("ddim", 1.0), ("euler", 0.6), ("heun", 1.0)])
def test_text_to_image_model_matches_diffusers(plain, name, strength):
  ref, pipe, _ = plain
  images, masks, noise = _inputs(2)
  seed = 11
  expected, calls = _reference(ref, pipe, images, masks, noise, seed, name, strength, 5)
  assert calls == ["image", "masked"]  # the masked image's latents go unused here
  ours = pipe.generate(PROMPTS, negative_prompts=NEGATIVES, init_images=images,
                       mask_images=masks[..., None], strength=strength, steps=5, seed=seed,
                       guidance_scale=GUIDANCE, scheduler=name, latents=noise)
  err = rel_err(ours, expected)
  print(f"\ntext-to-image model, {name}, strength {strength}: {err:.2e}")
  assert err <= 1e-4
  # Outside the mask the image stays close to the (VAE round trip of the) init image; inside
  # it does not.
  inside = masks[0] >= 0.5
  assert np.abs(ours[0] - images[0])[~inside].mean() < np.abs(ours[0] - images[0])[inside].mean()


@pytest.mark.parametrize("model,name,strength", [("inpainting", "euler", 1.0),
                                                 ("plain", "dpmpp_2m_karras", 0.6)])
def test_only_masked_matches_diffusers(request, model, name, strength):
  """A1111's "Only masked" with a blurred mask: diffusers' `padding_mask_crop` given the mask
  after its `mask_processor.blur`. An 8-bit original of another size and aspect; the results
  are pasted back into it, so equal as 8-bit images but where our float rounding differs from
  torch's by a level."""
  from PIL import Image

  from sdjax import masks

  ref, pipe, _ = request.getfixturevalue(model)
  rng = np.random.default_rng(6)
  original = rng.integers(0, 256, (36, 52, 3), dtype=np.uint8)
  mask = np.zeros((36, 52), np.uint8)
  mask[22:31, 30:41] = 255
  blur, padding, seed = 2.0, 3, 5
  options = masks.MaskOptions(blur=blur, padding=padding)
  prepared = masks.prepare(Image.fromarray(original), Image.fromarray(mask), H, W, options)
  noise = _inputs(6)[2]
  expected, calls = _reference(
      ref, pipe, np.stack([prepared.image] * 2), np.stack([prepared.mask[..., 0]] * 2), noise,
      seed, name, strength, 4, image=Image.fromarray(original),
      mask_image=ref.mask_processor.blur(Image.fromarray(mask), blur), output_type="pil",
      padding_mask_crop=padding)
  ours = pipe.generate(PROMPTS, negative_prompts=NEGATIVES, init_images=np.stack([original] * 2)
                       / 255, mask_images=np.stack([mask] * 2) / 255, mask_blur=blur,
                       padding_mask_crop=padding, height=H, width=W, strength=strength, steps=4,
                       seed=seed, guidance_scale=GUIDANCE, scheduler=name, latents=noise)
  assert calls == (["masked"] if strength == 1.0 else ["image", "masked"])
  assert ours.shape == (2, 36, 52, 3)
  levels = np.round(ours * 255).astype(int)
  diff = np.abs(levels - np.stack([np.asarray(image, int) for image in expected]))
  print(f"\nonly masked, {model} model, {name}: {(diff > 0).mean():.2%} of values differ, "
        f"by at most {diff.max()}")
  assert diff.max() <= 1 and (diff > 0).mean() <= 0.01
  x1, y1, x2, y2 = prepared.crop  # outside the box: the original's own pixels
  outside = np.ones((36, 52), bool)
  outside[y1:y2, x1:x2] = False
  np.testing.assert_array_equal(levels[:, outside], np.stack([original[outside]] * 2))
  inside = np.asarray(ref.mask_processor.blur(Image.fromarray(mask), blur)) >= 128
  assert np.abs(levels[:, inside] - original[inside]).mean() > 20  # repainted


def _levels(images):
  return np.clip(np.round(np.asarray(images) * 255), 0, 255).astype(int)


@pytest.mark.parametrize("model,content,name", [
    ("plain", "latent noise", "euler"), ("plain", "latent nothing", "dpmpp_2m_karras"),
    ("inpainting", "fill", "euler")])
def test_masked_content_matches_diffusers(request, model, content, name):
  """A1111's "Masked content" at strength < 1: the image filled where the mask is
  (`masks.fill`; every mode but "original"), and for the latent modes its latents there
  replaced by the image's initial noise or by zeros (A1111 does so before sampling, where
  diffusers encodes the image: given those latents instead, diffusers is the oracle). 8-bit
  images and binary masks, so equal as 8-bit images but where float rounding differs by a
  level; each mode changes the masked area from "original"'s."""
  from PIL import Image

  from sdjax import masks

  ref, pipe, _ = request.getfixturevalue(model)
  images, mask_values, noise = _inputs(5)
  images = _levels(images).astype(np.uint8)
  binary = np.where(mask_values >= 0.5, 255, 0).astype(np.uint8)
  filled = np.stack([np.asarray(masks.fill(Image.fromarray(image), Image.fromarray(mask)))
                     for image, mask in zip(images, binary, strict=True)])
  s = H // noise.shape[1]
  where = torch.from_numpy(binary[:, None, ::s, ::s] > 0)
  # what the hook sees is not yet scaled by the VAE's scaling factor
  instead = {"latent noise": nchw(noise) / ref.vae.config.scaling_factor,
             "latent nothing": torch.zeros(nchw(noise).shape)}
  change = None if content == "fill" else (
      lambda latents: torch.where(where, instead[content], latents))
  seed, strength, steps = 3, 0.6, 4
  expected, calls = _reference(ref, pipe, filled.astype(np.float32) / 255, binary / 255.0, noise,
                               seed, name, strength, steps, image_latents=change)
  assert calls[0] == "image"
  kw = dict(negative_prompts=NEGATIVES, init_images=images / 255, mask_images=binary / 255,
            strength=strength, steps=steps, seed=seed, guidance_scale=GUIDANCE, scheduler=name,
            latents=noise)
  ours = pipe.generate(PROMPTS, masked_content=content, **kw)
  diff = np.abs(_levels(ours) - _levels(expected))
  print(f"\nmasked content {content!r}, {model} model, {name}: {(diff > 0).mean():.2%} of "
        f"values differ, by at most {diff.max()}")
  assert diff.max() <= 1 and (diff > 0).mean() <= 0.01
  original = pipe.generate(PROMPTS, **kw)
  inside = binary >= 128
  assert np.abs(ours - original)[inside].mean() > 0.01


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
  """Tiny SDXL models for inpainting: {"inpainting": (diffusers, sdjax) with a 9-channel UNet,
  "plain": the same with the base's own 4-channel UNet}. The VAE has no latent statistics, as
  SDXL's: diffusers' SDXL inpainting pipeline encodes without them."""
  base, _ = testing.torch_sdxl_pipelines(str(tmp_path_factory.mktemp("sdxl_src")), seed=43)
  vae = diffusers.AutoencoderKL.from_config({**base.vae.config, "latents_mean": None,
                                             "latents_std": None})
  vae.load_state_dict(base.vae.state_dict())
  pipes = {}
  for name, unet in (("inpainting", testing.torch_unet({**testing.UNET_SDXL, "in_channels": 9},
                                                       seed=47)), ("plain", base.unet)):
    ref = diffusers.StableDiffusionXLInpaintPipeline(
        vae=vae, text_encoder=base.text_encoder, text_encoder_2=base.text_encoder_2,
        tokenizer=base.tokenizer, tokenizer_2=base.tokenizer_2, unet=unet,
        scheduler=base.scheduler, add_watermarker=False)
    ref.set_progress_bar_config(disable=True)
    folder = str(tmp_path_factory.mktemp("sdxl") / name)
    ref.save_pretrained(folder, safe_serialization=True)
    pipes[name] = ref, sdjax.load_pipeline(folder)
  return pipes


@pytest.mark.parametrize("model,name", [("inpainting", "euler"), ("plain", "dpmpp_2m_karras")])
def test_sdxl_matches_diffusers(sdxl, model, name):
  """StableDiffusionXLInpaintPipeline with an SDXL inpainting model and with the base's own
  UNet (the latents outside the mask kept to the image's): the micro-conditioning as its
  img2img pipeline's (a negative original size alone counts there, not in text-to-image)."""
  ref, pipe = sdxl[model]
  strength, micro = 0.7, dict(crops_coords_top_left=(4, 8), negative_original_size=(24, 24))
  images, masks, noise = _inputs(3)
  expected, _ = _reference(ref, pipe, images, masks, noise, 13, name, strength, 5, **micro)
  ours = pipe.generate(PROMPTS, negative_prompts=NEGATIVES, init_images=images,
                       mask_images=masks, strength=strength, steps=5, seed=13,
                       guidance_scale=GUIDANCE, scheduler=name, latents=noise, **micro)
  err = rel_err(ours, expected)
  print(f"\nSDXL {model} model, {name}, strength {strength}: {err:.2e}")
  assert err <= 1e-4


@pytest.mark.parametrize("model,strength", [("inpainting", 1.0), ("plain", 0.6)])
def test_torch_generators_match_diffusers(request, model, strength):
  """rng="torch_cpu": diffusers' inpainting with per-image CPU generators of the same seeds,
  nothing patched: the image encoded (if it is), the noise, the masked image encoded (for any
  model), then each step's noise (Euler a), all drawn in turn from each image's generator."""
  ref, pipe, _ = request.getfixturevalue(model)
  ref.scheduler = diffusers.EulerAncestralDiscreteScheduler.from_config(pipe.scheduler_config)
  images, masks, _ = _inputs(5)
  generators = [torch.Generator().manual_seed(21 + i) for i in range(2)]
  expected = ref(PROMPTS, negative_prompt=NEGATIVES, image=nchw(images),
                 mask_image=torch.from_numpy(masks[:, None]), height=H, width=W,
                 strength=strength, num_inference_steps=4, guidance_scale=GUIDANCE,
                 generator=generators, output_type="np").images
  ours = pipe.generate(PROMPTS, negative_prompts=NEGATIVES, init_images=images,
                       mask_images=masks, strength=strength, steps=4, seed=21,
                       guidance_scale=GUIDANCE, scheduler="euler_ancestral", rng="torch_cpu")
  err = rel_err(ours, expected)
  print(f"\n{model} model with torch generators, strength {strength}: {err:.2e}")
  assert err <= 1e-5


@pytest.mark.parametrize("with_image", [False, True])
def test_inpainting_model_without_mask_matches_diffusers(inpainting, with_image):
  """An inpainting model without a mask repaints everything, as A1111 runs one: diffusers'
  inpainting pipeline given a full mask, and (text-to-image) a grey image at strength 1."""
  ref, pipe, _ = inpainting
  images, _, noise = _inputs(4)
  strength = 0.6 if with_image else 1.0
  given = images if with_image else np.full_like(images, 0.5)
  expected, _ = _reference(ref, pipe, given, np.ones((2, H, W), np.float32), noise, 9,
                           "euler", strength, 4)
  kw = dict(init_images=images, strength=strength) if with_image else dict(height=H, width=W)
  ours = pipe.generate(PROMPTS, negative_prompts=NEGATIVES, steps=4, seed=9,
                       guidance_scale=GUIDANCE, scheduler="euler", latents=noise, **kw)
  err = rel_err(ours, expected)
  print(f"\ninpainting model without a mask, {'img2img' if with_image else 'txt2img'}: {err:.2e}")
  assert err <= 1e-4


@pytest.mark.parametrize("padding", [None, 3])
def test_controlnet_matches_diffusers(inpainting, tmp_path, padding):
  """An inpainting model steered by a ControlNet (which sees the latents, not the mask and
  masked image's channels) against StableDiffusionControlNetInpaintPipeline, at strength 0.6;
  with "Only masked" (`padding_mask_crop`; one 8-bit original of another size, as diffusers
  cuts one PIL image) the control image is cut as the image is, and the results pasted back."""
  from PIL import Image
  from test_controlnet import torch_controlnet

  from sdjax import masks as masks_lib

  ref, pipe, _ = inpainting
  torch_cn = torch_controlnet(testing.UNET_SD1, 23, conditioning_embedding_out_channels=(8, 16))
  torch_cn.save_pretrained(str(tmp_path / "cn"), safe_serialization=True)
  cref = diffusers.StableDiffusionControlNetInpaintPipeline(
      vae=ref.vae, text_encoder=ref.text_encoder, tokenizer=ref.tokenizer, unet=ref.unet,
      controlnet=torch_cn, scheduler=ref.scheduler, safety_checker=None, feature_extractor=None,
      requires_safety_checker=False)
  cref.set_progress_bar_config(disable=True)
  images, masks, noise = _inputs(3)
  rng = np.random.default_rng(4)
  seed, strength, steps = 5, 0.6, 4
  if padding is None:
    control = rng.uniform(size=(2, H, W, 3)).astype(np.float32)
    expected, _ = _reference(cref, pipe, images, masks, noise, seed, "euler", strength, steps,
                             control_image=nchw(control), controlnet_conditioning_scale=0.8)
  else:
    original = rng.integers(0, 256, (36, 52, 3), dtype=np.uint8)
    mask = np.zeros((36, 52), np.uint8)
    mask[22:31, 30:41] = 255
    control = rng.integers(0, 256, (36, 52, 3), dtype=np.uint8)
    prepared = masks_lib.prepare(Image.fromarray(original), Image.fromarray(mask), H, W,
                                 masks_lib.MaskOptions(padding=padding))
    expected, _ = _reference(
        cref, pipe, np.stack([prepared.image] * 2), np.stack([prepared.mask[..., 0]] * 2), noise,
        seed, "euler", strength, steps, image=Image.fromarray(original),
        mask_image=Image.fromarray(mask), control_image=Image.fromarray(control),
        controlnet_conditioning_scale=0.8, padding_mask_crop=padding, output_type="pil")
    expected = np.stack([np.asarray(image, np.float32) / 255 for image in expected])
    images, masks = np.stack([original] * 2) / 255, np.stack([mask] * 2) / 255
    control = control / 255  # one image for both prompts
  kw = dict(negative_prompts=NEGATIVES, init_images=images, mask_images=masks, steps=steps,
            guidance_scale=GUIDANCE, scheduler="euler", latents=noise, strength=strength,
            seed=seed, padding_mask_crop=padding, height=H, width=W)
  ours = pipe.generate(PROMPTS, controlnet=sdjax.load_controlnet(str(tmp_path / "cn")),
                       control_images=control, controlnet_conditioning_scale=0.8, **kw)
  err = rel_err(ours, expected)
  print(f"\ncontrolnet inpainting, padding {padding}: {err:.2e}")
  if padding is None:
    assert err <= 1e-4
  else:  # 8-bit results: a level where float rounding differs
    diff = np.abs(np.round(ours * 255) - np.round(expected * 255))
    assert diff.max() <= 1 and (diff > 0).mean() <= 0.01
  if padding is None:
    assert rel_err(pipe.generate(PROMPTS, **kw), expected) > 1e-2  # the ControlNet steered it


def test_bad_inpainting_arguments(inpainting, plain):
  _, pipe, _ = inpainting
  images, masks, _ = _inputs()
  kw = dict(steps=2, guidance_scale=GUIDANCE)
  with pytest.raises(ValueError, match="an inpainting model .* takes no hires fix or refiner"):
    pipe.generate(PROMPTS, height=H, width=W, hires_scale=2.0, **kw)
  with pytest.raises(ValueError, match="mask_images must be"):
    pipe.generate(PROMPTS, init_images=images, mask_images=masks[:, :8], **kw)
  with pytest.raises(ValueError, match="give both"):
    plain[1].generate(PROMPTS, mask_images=masks, **kw)
  with pytest.raises(ValueError, match="are inpainting options"):
    plain[1].generate(PROMPTS, init_images=images, padding_mask_crop=8, **kw)
  with pytest.raises(ValueError, match="mask blur must be >= 0"):
    pipe.generate(PROMPTS, init_images=images, mask_images=masks, mask_blur=-1.0, **kw)
  with pytest.raises(ValueError, match="masked content must be one of"):
    pipe.generate(PROMPTS, init_images=images, mask_images=masks, masked_content="noise", **kw)
  with pytest.raises(ValueError, match="are inpainting options"):
    plain[1].generate(PROMPTS, init_images=images, masked_content="fill", **kw)
  with pytest.raises(ValueError, match="inpainting_mask_weight is an inpainting model's"):
    plain[1].generate(PROMPTS, init_images=images, mask_images=masks,
                      inpainting_mask_weight=0.5, **kw)
  with pytest.raises(ValueError, match="^unknown inpaint_blend 'comfy'; use one of diffusers, "
                                       "a1111, comfyui$"):
    plain[1].generate(PROMPTS, inpaint_blend="comfy", **kw)
  with pytest.raises(ValueError, match="^unknown image_encode 'argmax'; use one of sample, mode$"):
    plain[1].generate(PROMPTS, init_images=images, image_encode="argmax", **kw)
  with pytest.raises(ValueError, match="^grow_mask_by is ComfyUI's VAEEncodeForInpaint: give "
                                       "mask_images and inpaint_blend 'comfyui' too$"):
    plain[1].generate(PROMPTS, init_images=images, mask_images=masks, grow_mask_by=6, **kw)
  with pytest.raises(ValueError, match=r"^grow_mask_by must be an integer in \[0, 64\]"):
    plain[1].generate(PROMPTS, init_images=images, mask_images=masks, inpaint_blend="comfyui",
                      scheduler="euler", grow_mask_by=65, **kw)
  for config, message in ((dict(grow_mask_by=6), "give --inpaint_blend comfyui too"),
                          (dict(grow_mask_by=-1, inpaint_blend="comfyui"), "got -1")):
    with pytest.raises(run.RunError, match=f"^--grow_mask_by .*{message}$"):
      run.validate(run.RunConfig(model="m", prompts=(run.PromptLine("a"),), **config))
  with pytest.raises(ValueError, match="^inpaint_blend 'comfyui' blends ComfyUI's k-diffusion "
                                       "samplers' inputs and denoised predictions, which "
                                       "scheduler 'ddim' does not make so"):
    plain[1].generate(PROMPTS, init_images=images, mask_images=masks, inpaint_blend="comfyui",
                      scheduler="ddim", **kw)
  with pytest.raises(ValueError, match="^inpaint_blend 'a1111' blends A1111's samplers' denoised "
                                       "predictions, which scheduler 'lcm' does not make so"):
    pipe.generate(PROMPTS, init_images=images, mask_images=masks, inpaint_blend="a1111",
                  scheduler="lcm", **kw)


def test_single_file_and_export_round_trip(inpainting, plain, tmp_path):
  """An inpainting model's single file loads with a text-to-image model's config (the weights
  say 9 input channels, as sd-v1-5-inpainting.ckpt beside a v1-5 config), as diffusers reads
  the same file; a folder sdjax writes is diffusers' inpainting pipeline."""
  ref, pipe, folder = inpainting
  single_file_round_trip(ref, pipe, folder, plain[2], tmp_path)


def test_run_with_mask_lines(inpainting, tmp_path):
  """main.py's run: jsonl lines with an init_image and a mask_image (paths relative to the
  file; the mask resized to the image, blurred (A1111's 4 pixels), both resized to the run's
  size) make generate()'s images with the original pasted back outside the mask; records keep
  the mask; --inpaint_blend a1111 is generate()'s too. "Only masked" is generate()'s
  `padding_mask_crop`, at the original's size. A text-to-image line on an inpainting model is
  generate()'s too; a mask needs an image. The image is RGBA: flattened over white first, as
  A1111's img2img takes it."""
  import json
  import os

  from PIL import Image

  from sdjax import infotext, masks, outputs

  _, pipe, folder = inpainting
  rng = np.random.default_rng(5)
  Image.fromarray(rng.integers(0, 255, (20, 28, 4), np.uint8)).save(tmp_path / "a.png")
  flat = outputs.flatten(Image.open(tmp_path / "a.png"))
  mask = np.zeros((32, 48), np.uint8)
  mask[8:24, 12:40] = 255
  Image.fromarray(mask).save(tmp_path / "m.png")
  Image.fromarray(rng.integers(0, 255, (H, W), np.uint8)).save(tmp_path / "noisy.png")
  path = tmp_path / "inpaint.jsonl"
  path.write_text(json.dumps({"prompt": "a cat", "init_image": "a.png", "mask_image": "m.png"})
                  + "\n" + json.dumps({"prompt": "a dog", "init_image": "a.png",
                                       "mask_image": "noisy.png", "seed": 3}) + "\n")
  kw = dict(steps=3, guidance_scale=GUIDANCE, scheduler="euler")
  cfg = run.RunConfig(model=folder, prompts_file=str(path), height=H, width=W, seed=1,
                      batch_size=2, strength=0.8, output_dir=str(tmp_path / "out"),
                      compilation_cache="", show_progress=False, **kw)
  assert run.generate_run(cfg).images == 2
  records = [json.loads(x) for x in open(tmp_path / "out" / outputs.MANIFEST_NAME)]
  for record, name in zip(records, ["m.png", "noisy.png"], strict=True):
    assert record["mask_image"] == str(tmp_path / name) and record["strength"] == 0.8
    assert record["mask_blur"] == 4.0 and (record["height"], record["width"]) == (H, W)
    prepared = masks.prepare(flat, Image.open(tmp_path / name), H, W,
                             masks.MaskOptions(blur=4.0, overlay=True))
    expected = pipe.generate(record["prompt"], init_images=prepared.image[None],
                             mask_images=prepared.mask[None], strength=0.8,
                             seed=record["seed"], **kw)
    expected = prepared.finish(outputs.to_uint8(expected[0])).astype(int)
    written = np.asarray(Image.open(tmp_path / "out" / record["file"]), int)
    assert np.abs(written - expected).max() <= 1
    parameters = Image.open(tmp_path / "out" / record["file"]).text["parameters"]
    assert "Mask blur: 4, " in parameters and "Inpaint area" not in parameters
  # --inpaint_blend a1111 (an inpainting model: its UNet's mask and A1111's blend): generate()'s
  # too, said in the PNG and read back.
  a1111 = dataclasses.replace(cfg, inpaint_blend="a1111", output_dir=str(tmp_path / "a1111"))
  assert run.generate_run(a1111).images == 2
  record = json.loads(open(tmp_path / "a1111" / outputs.MANIFEST_NAME).readline())
  assert record["inpaint_blend"] == "a1111" and "inpaint_blend" not in records[0]
  prepared = masks.prepare(flat, Image.open(tmp_path / "m.png"), H, W,
                           masks.MaskOptions(blur=4.0, overlay=True))
  expected = pipe.generate("a cat", init_images=prepared.image[None],
                           mask_images=prepared.mask[None], strength=0.8, seed=record["seed"],
                           inpaint_blend="a1111", **kw)
  expected = prepared.finish(outputs.to_uint8(expected[0])).astype(int)
  written = Image.open(tmp_path / "a1111" / record["file"])
  assert np.abs(np.asarray(written, int) - expected).max() <= 1
  assert np.abs(np.asarray(written, int) - np.asarray(
      Image.open(tmp_path / "out" / records[0]["file"]), int)).max() > 1
  assert "Inpaint blend: A1111" in written.text["parameters"]
  assert infotext.reproduce(written.text["parameters"]).flags["inpaint_blend"] == "a1111"
  # "Only masked" (of an inverted mask): the file is the original's size, generate()'s pixels
  # with padding_mask_crop and the inverted mask.
  Image.open(tmp_path / "m.png").resize((28, 20)).save(tmp_path / "m_small.png")
  path.write_text(json.dumps({"prompt": "a cat", "init_image": "a.png",
                              "mask_image": "m_small.png"}) + "\n")
  full = dataclasses.replace(cfg, inpaint_full_res=True, inpaint_full_res_padding=2, mask_blur=1,
                             inpainting_mask_invert=True, inpainting_fill="fill",
                             inpainting_mask_weight=0.6, batch_size=1,
                             output_dir=str(tmp_path / "full"))
  assert run.generate_run(full).images == 1
  record = json.loads(open(tmp_path / "full" / outputs.MANIFEST_NAME).readline())
  assert (record["height"], record["width"], record["inpaint_full_res_padding"]) == (20, 28, 2)
  assert record["inpainting_mask_invert"] and len(record["inpaint_region"]) == 4
  assert record["inpainting_fill"] == "fill" and record["inpainting_mask_weight"] == 0.6
  expected = pipe.generate(
      "a cat", init_images=np.asarray(flat)[None] / 255,
      mask_images=1 - np.asarray(Image.open(tmp_path / "m_small.png"))[None] / 255, mask_blur=1,
      padding_mask_crop=2, masked_content="fill", inpainting_mask_weight=0.6, height=H, width=W,
      strength=0.8, seed=record["seed"], **kw)
  written = Image.open(tmp_path / "full" / record["file"])
  assert np.abs(np.asarray(written, int) - np.round(expected[0] * 255)).max() <= 1
  assert ("Inpaint area: Only masked, Masked area padding: 2, Masked content: fill, "
          "Mask mode: Inpaint not masked, Conditional mask weight: 0.6"
          in written.text["parameters"])
  flags = infotext.reproduce(written.text["parameters"]).flags
  assert flags["inpainting_mask_weight"] == "0.6" and flags["inpainting_mask_invert"] == "true"
  text = tmp_path / "text.jsonl"  # as A1111: from grey, everything repainted, pure noise
  text.write_text('{"prompt": "a cat"}\n')
  run.generate_run(dataclasses.replace(cfg, prompts_file=str(text), batch_size=1,
                                       output_dir=str(tmp_path / "text")))
  record = json.loads(open(tmp_path / "text" / outputs.MANIFEST_NAME).readline())
  expected = pipe.generate("a cat", seed=record["seed"], height=H, width=W, **kw)
  written = np.asarray(Image.open(tmp_path / "text" / record["file"]), np.float32) / 255
  assert np.abs(written - expected[0]).max() <= 1 / 255 + 1e-6
  lone = tmp_path / "lone.jsonl"
  lone.write_text('{"prompt": "a cat", "mask_image": "m.png"}\n')
  with pytest.raises(run.RunError, match='"mask_image" marks what to repaint in an "init_image"'):
    run.generate_run(dataclasses.replace(cfg, prompts_file=str(lone),
                                         output_dir=str(tmp_path / "lone")))
  assert not os.path.exists(tmp_path / "lone" / "00000")


def _a1111_latent_mask(mask: np.ndarray, h: int, w: int, rounded: bool = True) -> np.ndarray:
  """A1111's `latmask` of a float [H, W] mask of 8-bit levels: the L image as RGB through PIL's
  default (bicubic) resize to the latents' size, channel 0, / 255, np.around (not `rounded`:
  its soft inpainting's). (One axis at a time, horizontal first: Pillow up to 12's order, which
  A1111 pins.)"""
  from PIL import Image  # noqa: PLC0415

  image = Image.fromarray(np.round(mask * 255).astype(np.uint8)).convert("RGB")
  image = image.resize((w, image.height), Image.BICUBIC).resize((w, h), Image.BICUBIC)
  small = np.asarray(image, np.float32)[..., 0] / 255
  return np.around(small) if rounded else small


def _torch_inpaint_inputs(ref, images, seeds):
  """(each image's torch generator, the images' latents, the initial noise, the prompts'
  [negative, prompt] context) as diffusers' inpainting pipeline draws them from the generators:
  the image's posterior sample, the noise, the masked image's posterior (unused by a plain
  model)."""
  gens = [torch.Generator().manual_seed(s) for s in seeds]
  shape = (1, 4, H // 2, W // 2)
  sf = ref.vae.config.scaling_factor
  with torch.no_grad():
    dist = [ref.vae.encode(nchw(2 * images[i:i + 1] - 1)).latent_dist for i in range(2)]
    init = torch.cat([(d.mean + d.std * torch.randn(shape, generator=g)) * sf
                      for d, g in zip(dist, gens, strict=True)])
    noise = torch.cat([torch.randn(shape, generator=g) for g in gens])
    for g in gens:
      torch.randn(shape, generator=g)
    context = torch.cat(ref.encode_prompt(PROMPTS, "cpu", 1, True, NEGATIVES)[::-1])
  return gens, init, noise, context


def test_run_with_comfyui_blend(plain, tmp_path):
  """main.py's --inpaint_blend comfyui --image_encode mode --grow_mask_by 6 (VAEEncodeForInpaint)
  --differential_diffusion 0.5: a line whose image is also its mask (its transparent pixels
  repainted, as ComfyUI's LoadImage reads them) on a plain model is generate()'s image (the
  original not pasted back, as ComfyUI's), its PNG says `Inpaint blend: ComfyUI`, `Image
  encode: mode`, `Grow mask by: 6` and `Differential diffusion: 0.5`, and its text makes the
  flags again. With --comfyui_composite (ComfyUI's ImageCompositeMasked) the image is pasted
  back through the mask before ComfyUI's 8-bit levels, and its PNG says so. Differential
  diffusion or the composite with another blend: a one-line error."""
  import json
  import os

  from PIL import Image

  from sdjax import infotext, masks, outputs

  _, pipe, folder = plain
  rng = np.random.default_rng(6)
  pixels = rng.integers(0, 255, (H, W, 3), np.uint8)
  mask = np.zeros((H, W), np.uint8)
  mask[4:12, 6:18] = 255
  Image.fromarray(np.dstack([pixels, 255 - mask])).save(tmp_path / "a.png")  # RGBA
  kw = dict(steps=3, guidance_scale=GUIDANCE, scheduler="euler_ancestral",
            scheduler_options={"k_diffusion": True, "comfyui": True})
  cfg = run.RunConfig(model=folder, prompts=(run.PromptLine(
      "a cat", init_image=str(tmp_path / "a.png"), mask_image=str(tmp_path / "a.png")),),
      height=H, width=W, seed=1, strength=1.0, inpaint_blend="comfyui", image_encode="mode",
      grow_mask_by=6, differential_diffusion=0.5, output_dir=str(tmp_path / "out"),
      compilation_cache="", show_progress=False, **kw)
  assert run.generate_run(cfg).images == 1
  record = json.loads(open(tmp_path / "out" / outputs.MANIFEST_NAME).readline())
  assert record["inpaint_blend"] == "comfyui" and record["image_encode"] == "mode"
  assert record["grow_mask_by"] == 6 and record["differential_diffusion"] == 0.5
  prepared = masks.prepare(Image.fromarray(pixels), Image.fromarray(mask), H, W,
                           masks.MaskOptions(blur=4.0))
  expected = pipe.generate("a cat", init_images=prepared.image[None],
                           mask_images=prepared.mask[None], strength=1.0, seed=1,
                           inpaint_blend="comfyui", image_encode="mode", grow_mask_by=6,
                           differential_diffusion=0.5, **kw)
  expected = prepared.finish(outputs.to_uint8(expected[0])).astype(int)
  written = Image.open(os.path.join(tmp_path / "out", record["file"]))
  assert np.abs(np.asarray(written, int) - expected).max() <= 1
  assert ("Inpaint blend: ComfyUI, Grow mask by: 6, Differential diffusion: 0.5"
          in written.text["parameters"])
  assert "Image encode: mode" in written.text["parameters"]
  flags = infotext.reproduce(written.text["parameters"]).flags
  assert flags["inpaint_blend"] == "comfyui" and flags["image_encode"] == "mode"
  assert flags["grow_mask_by"] == "6" and flags["differential_diffusion"] == "0.5"
  # ComfyUI's paste back: the image where the mask keeps it, the decoded image where it repaints
  composite = dataclasses.replace(cfg, comfyui_composite=True, mask_blur=0.0,
                                  pixel_levels="floor", output_dir=str(tmp_path / "composite"))
  assert run.generate_run(composite).images == 1
  record = json.loads(open(tmp_path / "composite" / outputs.MANIFEST_NAME).readline())
  assert record["comfyui_composite"] is True
  sampled = pipe.generate("a cat", init_images=(pixels / np.float32(255))[None],
                          mask_images=(mask / np.float32(255))[None], strength=1.0, seed=1,
                          inpaint_blend="comfyui", image_encode="mode", grow_mask_by=6,
                          differential_diffusion=0.5, **kw)[0]
  kept = 1. - (255 - mask[..., None]).astype(np.float32) / 255.0  # its LoadImage's mask
  expected = np.floor(255. * (kept * sampled + (1 - kept) * pixels / np.float32(255)))
  written = Image.open(tmp_path / "composite" / record["file"])
  assert np.abs(np.asarray(written, int) - expected).max() <= 1
  np.testing.assert_array_equal(np.asarray(written)[mask == 0], pixels[mask == 0])
  assert np.abs(np.asarray(written, int)[mask == 255] - pixels[mask == 255]).mean() > 20
  assert "Inpaint composite: ComfyUI" in written.text["parameters"]
  assert infotext.reproduce(written.text["parameters"]).flags["comfyui_composite"] == "true"
  for change, message in ((dict(inpaint_blend="a1111", grow_mask_by=None,
                                differential_diffusion=None), "^--comfyui_composite is ComfyUI's "
                           "ImageCompositeMasked: give --inpaint_blend comfyui too$"),
                          (dict(inpaint_full_res=True), "^--comfyui_composite pastes the whole "
                           "picture back: not with --inpaint_full_res$")):
    with pytest.raises(run.RunError, match=message):
      run.generate_run(dataclasses.replace(composite, **change))
  with pytest.raises(run.RunError, match="^--differential_diffusion is ComfyUI's "
                                         "DifferentialDiffusion: give --inpaint_blend comfyui"):
    run.generate_run(dataclasses.replace(cfg, inpaint_blend="a1111", grow_mask_by=None))
  with pytest.raises(run.RunError, match=r"^--differential_diffusion must be a number in \[0, 1\]"):
    run.generate_run(dataclasses.replace(cfg, differential_diffusion=1.5))


@pytest.mark.parametrize(("strength", "encode", "masked", "model", "grow", "differential"), [
    (1.0, "sample", True, "plain", None, None), (0.6, "mode", True, "plain", None, None),
    (0.6, "mode", False, "plain", None, None), (1.0, "mode", False, "plain", None, None),
    (1.0, "mode", True, "inpainting", None, None), (1.0, "mode", True, "inpainting", 6, None),
    (0.6, "mode", True, "plain", None, 1.0), (1.0, "mode", True, "inpainting", None, 0.4)])
def test_comfyui_blend_matches_its_loop(request, strength, encode, masked, model, grow,
                                        differential):
  """inpaint_blend="comfyui": ComfyUI's KSampler over a latent with a noise mask, written out
  over diffusers' UNet and VAE (Euler a in ComfyUI's form: the UNet at whole timesteps): the
  mask through torch's bilinear to the latents' size (unrounded), the run from the image's
  latents plus the noise times its first level (sqrt(1 + sigma_max^2) from the training
  schedule's largest), each
  call's input outside the mask the latents plus sigma times that noise, each denoised
  prediction blended with the latents, nothing after the loop. With image_encode="sample" the
  latents and draws are sdjax's (the posterior sample and torch generators in diffusers' order);
  with "mode" they are ComfyUI's too: its VAEEncode's posterior mode, the noise its seed's CPU
  generator's first draw, the steps' noise (step_rng="torch_cpu", ComfyUI's sampler on CPU) a
  generator of the seed's own. Without a mask: ComfyUI's img2img, the same loop unblended. An
  inpainting model's UNet also sees its InpaintModelConditioning inputs: the mask's bilinear
  resize rounded (half to even), and the mode of the image less 0.5 times 1 - the rounded
  mask, plus 0.5. With `grow` (VAEEncodeForInpaint's grow_mask_by): the image's latents are
  those of that masked image (the inpainting model's masked latents too), the mask the rounded
  one through its padded box convolution, clamped and cut. With `differential`
  (DifferentialDiffusion's strength), each call's mask is where the mask reaches the call's
  model timestep (its sigma's nearest in ComfyUI's float32 table of the float64 schedule) over
  the first call's, mixed with the mask by 1 - strength below 1 (a graded mask)."""
  import k_diffusion_reference as kd  # noqa: PLC0415

  ref, pipe, _ = request.getfixturevalue(model)
  images, masks, _ = _inputs(7)
  if model == "inpainting":
    masks[1, 3:6, 5:12] = 0.5  # ComfyUI's round keeps it, diffusers' binarizing repaints it
  if differential is not None:  # grey levels that join the repainting at different steps
    masks[0] = np.clip(np.linspace(-0.5, 1.5, W)[None] * np.ones((H, 1)), 0, 1)
  seeds, steps = (31, 32), 8
  options = {"k_diffusion": True, "comfyui": True, "timestep_spacing": "linspace"}
  kw = dict(negative_prompts=NEGATIVES, init_images=images, strength=strength, steps=steps,
            seed=seeds[0], guidance_scale=GUIDANCE, scheduler="euler_ancestral",
            scheduler_options=options, rng="torch_cpu")
  comfyui = dict(image_encode="mode", step_rng="torch_cpu") if encode == "mode" else {}
  if masked:
    kw.update(mask_images=masks, inpaint_blend="comfyui", grow_mask_by=grow,
              differential_diffusion=differential)
  ours = pipe.generate(PROMPTS, **kw, **comfyui)

  spec, state = sampling.prepare(pipe, 2, steps=steps, scheduler="euler_ancestral", height=H,
                                 width=W, guidance_scale=GUIDANCE, img2img=True,
                                 strength=strength, inpaint=masked, scheduler_options=options)
  timesteps = np.asarray(state.timesteps)[spec.begin:]
  assert np.array_equal(timesteps, np.round(timesteps))
  gens, init, noise, context = _torch_inpaint_inputs(ref, images, seeds)
  shape, sf = init[:1].shape, ref.vae.config.scaling_factor
  repaint = torch.round(torch.from_numpy(masks[..., None].astype(np.float32)))
  hidden = (torch.from_numpy(images) - 0.5) * (1.0 - repaint) + 0.5
  if grow is not None:  # VAEEncodeForInpaint: the masked image's latents, the mask grown
    grown = torch.nn.functional.conv2d(repaint.permute(0, 3, 1, 2), torch.ones(1, 1, grow, grow),
                                       padding=math.ceil((grow - 1) / 2))
    masks = torch.clamp(grown, 0, 1)[:, 0, :H, :W].round().numpy()
    assert masks.sum() > repaint.sum()
  if encode == "mode":  # ComfyUI's: the mode, the noise each seed's first draw
    encoded = images if grow is None else hidden.numpy()
    with torch.no_grad():
      init = torch.cat([ref.vae.encode(nchw(2 * encoded[i:i + 1] - 1)).latent_dist.mode() * sf
                        for i in range(2)])
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    noise = torch.cat([torch.randn(shape, generator=g) for g in gens])
    gens = [torch.Generator().manual_seed(s) for s in seeds]  # the steps' own
  mask = torch.nn.functional.interpolate(nchw(masks[..., None].astype(np.float32)),
                                         size=shape[2:], mode="bilinear")
  if not masked:
    mask = torch.ones_like(mask)
  concat = []
  if model == "inpainting":
    with torch.no_grad():
      concat = [torch.round(mask), init if grow is not None else torch.cat([
          ref.vae.encode(2 * hidden[i:i + 1].permute(0, 3, 1, 2) - 1).latent_dist.mode() * sf
          for i in range(2)])]
  calls = iter(timesteps)
  sigmas = torch.from_numpy(np.asarray(state.sigmas)[spec.begin:])
  config = ref.scheduler.config
  assert config.beta_schedule == "scaled_linear"  # ComfyUI's "linear": float64, then float32
  betas = torch.linspace(config.beta_start**0.5, config.beta_end**0.5, 1000,
                         dtype=torch.float64) ** 2
  table = torch.cumprod(1 - betas, 0)
  log_table = (((1 - table) / table) ** 0.5).float().log()

  def mask_at(sigma):  # DifferentialDiffusion's mask at the call (the run ends at level 0)
    if differential is None:
      return mask

    def timestep(s):
      return (s.log() - log_table).abs().argmin()

    binary = (mask >= timestep(sigma) / timestep(sigmas[0])).to(mask.dtype)
    if differential < 1:
      return differential * binary + (1 - differential) * mask
    return binary

  def denoiser(config, timesteps=None):
    def call(x, sigma):
      mask_now = mask_at(sigma)
      x = x * mask_now + (init + noise * sigma) * (1 - mask_now)
      x_in = torch.cat([x / (sigma**2 + 1) ** 0.5, *concat], dim=1)
      with torch.no_grad():
        eps_u, eps_c = ref.unet(torch.cat([x_in, x_in]), float(next(calls)),
                                encoder_hidden_states=context).sample.chunk(2)
      denoised = x - sigma * (eps_u + GUIDANCE * (eps_c - eps_u))
      return denoised * mask_now + init * (1 - mask_now)

    return call

  alphas = ref.scheduler.alphas_cumprod.double()
  sigma_max = float(((1 - alphas[-1]) / alphas[-1]) ** 0.5)  # ComfyUI's max_denoise test
  full = math.isclose(float(sigmas[0]), sigma_max, rel_tol=1e-5) or sigmas[0] > sigma_max
  assert full == (strength == 1.0)
  first = (1 + sigmas[0] ** 2) ** 0.5 if full else sigmas[0]
  step_noises = [torch.cat([torch.randn(shape, generator=g) for g in gens])
                 for _ in range(len(timesteps))]
  with mock.patch.object(kd, "denoiser", denoiser):
    x = torch.from_numpy(kd.sample_euler_ancestral(None, sigmas, init + noise * first,
                                                   step_noises)[-1])
  with torch.no_grad():
    expected = (ref.vae.decode(x / sf).sample / 2 + 0.5).clamp(0, 1)
  expected = expected.permute(0, 2, 3, 1).numpy()
  err = rel_err(ours, expected)
  print(f"\nComfyUI's loop at denoise {strength}, {encode}, masked {masked}, differential "
        f"{differential}: {err:.2e}")
  assert err <= 1e-5
  if differential is not None:  # the per-call mask shows
    plain = pipe.generate(PROMPTS, **{**kw, "differential_diffusion": None}, **comfyui)
    assert rel_err(plain, expected) > 1e-3
  if masked:  # (an inpainting model's UNet inputs as diffusers makes them with A1111's blend)
    assert rel_err(pipe.generate(PROMPTS, **{**kw, "inpaint_blend": "a1111", "grow_mask_by": None,
                                             "differential_diffusion": None}, **comfyui),
                   expected) > 1e-3
  else:  # the posterior sample (diffusers' draws) makes another image
    assert rel_err(pipe.generate(PROMPTS, **kw, step_rng="torch_cpu"), expected) > 1e-3


def _a1111_loop(ref, spec, state, name, init, noise, gens, context, blend, concat=(),
                v=False):
  """A1111's img2img inpaint loop over diffusers' UNet (its inputs `concat` beside the latents),
  from the image's latents `init` noised to the run's first level: k-diffusion's Euler a (its
  step noise drawn from `gens`), every denoised prediction through `blend(x0, sigma)` (`v`: the
  UNet's output read as v, k-diffusion's v denoiser), or its DDIM (sdjax's `a1111` form's
  steps, which tests/test_scheduler_ddim.py checks against A1111's loop), every model input
  through `blend(x, t)`, t the call's timestep (float32), which A1111 hands its CFG denoiser in
  the sigma's place. The final latents, unblended."""
  import k_diffusion_reference as kd  # noqa: PLC0415

  calls = iter(np.asarray(state.timesteps)[spec.begin:])

  def guided(x_in):
    x_in = torch.cat([x_in, *concat], dim=1)
    with torch.no_grad():
      eps_u, eps_c = ref.unet(torch.cat([x_in, x_in]), float(next(calls)),
                              encoder_hidden_states=context).sample.chunk(2)
    return eps_u + GUIDANCE * (eps_c - eps_u)

  if name == "euler_ancestral":
    sigmas = torch.from_numpy(np.asarray(state.sigmas)[spec.begin:])

    def denoiser(config, timesteps=None):
      if not v:
        return lambda x, sigma: blend(x - sigma * guided(x / (sigma**2 + 1) ** 0.5), sigma)
      # k-diffusion's v denoiser: c_skip x + c_out v, v the model's at c_in x
      return lambda x, sigma: blend(x / (sigma**2 + 1) - sigma / (sigma**2 + 1) ** 0.5 * guided(
          x / (sigma**2 + 1) ** 0.5), sigma)

    step_noises = [torch.cat([torch.randn(init[:1].shape, generator=g) for g in gens])
                   for _ in range(len(sigmas) - 1)]
    with mock.patch.object(kd, "denoiser", denoiser):
      return torch.from_numpy(kd.sample_euler_ancestral(None, sigmas, init + noise * sigmas[0],
                                                        step_noises)[-1])
  sched = spec.scheduler

  def nhwc(t):
    return jnp.asarray(t.permute(0, 2, 3, 1).numpy())

  x = sched.img2img_noise(state, nhwc(init), nhwc(noise), spec.begin)
  for i in range(spec.begin, len(state.timesteps)):
    x_in = torch.from_numpy(np.asarray(x)).permute(0, 3, 1, 2)
    t = torch.tensor(float(state.timesteps[i]), dtype=torch.float32)
    x, state = sched.step(state, nhwc(guided(blend(x_in, t))), i, x)
  return torch.from_numpy(np.asarray(x)).permute(0, 3, 1, 2)


@pytest.mark.parametrize(("name", "prediction_type", "content"), [
    ("euler_ancestral", "epsilon", "original"), ("ddim", "epsilon", "original"),
    ("euler_ancestral", "v_prediction", "latent noise")])
def test_a1111_blend_matches_its_loop(plain, name, prediction_type, content):
  """inpaint_blend="a1111": A1111's img2img inpaint loop over diffusers' UNet and VAE, written
  out here: its latent mask (PIL's bicubic resize of the 8-bit mask, rounded), k-diffusion's
  Euler a from the image's latents noised to the first level with every denoised prediction
  blended with them outside the mask (DDIM, its timestep sampler: the model's input blended
  instead), then the final latents blended too; each image's draws from its torch generator in
  diffusers' order (the image's posterior, the noise, the masked image's posterior, each
  step's); a v model's (the UNet's output read as v) through k-diffusion's v denoiser. "Latent
  noise" masked content: the filled image's latents where A1111's latent mask repaints are the
  initial noise. Another image than the default (diffusers') blend's."""
  from PIL import Image  # noqa: PLC0415

  from sdjax import masks as mask_lib  # noqa: PLC0415

  ref, pipe, _ = plain
  images, masks, _ = _inputs(7)
  masks = np.round(masks * 255) / 255  # 8-bit levels, as masks read from files
  seeds, steps, strength = (31, 32), 8, 0.6
  options = {"k_diffusion": True} if name != "ddim" else {"a1111": True}
  options["prediction_type"] = prediction_type
  kw = dict(negative_prompts=NEGATIVES, init_images=images, mask_images=masks, strength=strength,
            steps=steps, seed=seeds[0], guidance_scale=GUIDANCE, scheduler=name,
            scheduler_options=options, rng="torch_cpu", masked_content=content)
  ours = pipe.generate(PROMPTS, inpaint_blend="a1111", **kw)
  if content != "original":  # the host's fill first (8-bit), as A1111's
    images = np.stack([np.asarray(mask_lib.fill(
        Image.fromarray(_levels(i).astype(np.uint8)), Image.fromarray(_levels(m).astype(
            np.uint8))), np.float32) / 255 for i, m in zip(images, masks, strict=True)])

  spec, state = sampling.prepare(pipe, 2, steps=steps, scheduler=name, height=H, width=W,
                                 guidance_scale=GUIDANCE, img2img=True, strength=strength,
                                 inpaint=True, scheduler_options=options)
  gens, init, noise, context = _torch_inpaint_inputs(ref, images, seeds)
  sf = ref.vae.config.scaling_factor
  nmask = torch.from_numpy(np.stack([_a1111_latent_mask(m, H // 2, W // 2) for m in masks]))[
      :, None]
  if content == "latent noise":
    init = torch.where(nmask > 0, noise, init)

  def blend(x, level=None):
    return x * nmask + init * (1 - nmask)

  x = _a1111_loop(ref, spec, state, name, init, noise, gens, context, blend,
                  v=prediction_type == "v_prediction")
  with torch.no_grad():
    expected = (ref.vae.decode(blend(x) / sf).sample / 2 + 0.5).clamp(0, 1)
  expected = expected.permute(0, 2, 3, 1).numpy()
  if content == "original":
    err = rel_err(ours, expected)
    print(f"\nA1111's inpaint loop, {name}, {prediction_type}: {err:.2e}")
    assert err <= 1e-5
  else:  # the host's work makes 8-bit images: equal but where rounding differs by a level
    diff = np.abs(_levels(ours) - _levels(expected))
    print(f"\nA1111's inpaint loop, {name}, {prediction_type}, {content}: "
          f"{(diff > 0).mean():.2%} of values differ, by at most {diff.max()}")
    assert diff.max() <= 1 and (diff > 0).mean() <= 0.01
  assert rel_err(pipe.generate(PROMPTS, **kw), expected) > 1e-3  # the default blend's


@pytest.mark.parametrize(("model", "name", "settings"), [
    ("plain", "euler_ancestral", (1.0, 0.5, 4.0, 0.0, 0.5, 2.0)),
    ("plain", "ddim", (0.5, 1.5, 2.0, 0.5, 0.25, 3.0)),
    ("inpainting", "euler_ancestral", (1.5, 1.0, 8.0, 0.0, 1.0, 2.0))])
def test_soft_inpainting_matches_its_loop(request, model, name, settings):
  """A1111's Soft inpainting (`soft_inpainting`, with its blend) against its loop written out
  over diffusers' UNet and VAE: the latent mask unrounded, every blend (Euler a: of each
  denoised prediction at the call's sigma; DDIM: of each model input at the call's timestep,
  as A1111 hands it its CFG denoiser) its magnitude-keeping blend towards the clean image
  latents by nmask ** (level ** bias * preservation), no blend after the loop; then its pixel
  composite: the original pasted back over the decoded image by the overlay mask it makes
  from the distance between the final latents and the image's. Graded masks (a ramp; scattered
  levels). An inpainting model's UNet also sees A1111's conditioning with the rounding off:
  the mask as it is (torch's nearest to the latents' size) and the latents of the image times
  1 - that mask (in [-1, 1]; the masked image's posterior draw). The distance maps match, the
  images as 8-bit images but where rounding differs by a level; the result is not plain A1111
  inpainting's. With DDIM, "latent nothing" masked content: the image filled, its latents
  times 1 - the unrounded mask (where the run starts, what it blends towards, what the distance
  is from)."""
  import soft_inpainting_reference as soft_ref  # noqa: PLC0415
  from PIL import Image  # noqa: PLC0415

  from sdjax import masks as mask_lib  # noqa: PLC0415

  ref, pipe, _ = request.getfixturevalue(model)
  images, masks, _ = _inputs(7)
  masks[0] = np.clip(np.linspace(-2, 1.5, W)[None] * np.ones((H, 1)), 0, 1)  # a ramp
  masks = (np.round(masks * 255) / 255).astype(np.float32)  # 8-bit levels, as files'
  images = (_levels(images) / 255).astype(np.float32)  # 8-bit originals, pasted back as they are
  seeds, steps, strength = (31, 32), 8, 0.6
  power, scale, detail = settings[:3]
  options = {"k_diffusion": True} if name != "ddim" else {"a1111": True}
  kw = dict(negative_prompts=NEGATIVES, init_images=images, mask_images=masks, strength=strength,
            steps=steps, seed=seeds[0], guidance_scale=GUIDANCE, scheduler=name,
            scheduler_options=options, rng="torch_cpu", inpaint_blend="a1111")
  content = "latent nothing" if name == "ddim" else "original"
  ours = pipe.generate(PROMPTS, soft_inpainting=",".join(map(str, settings)),
                       masked_content=content, **kw)
  encoded = images
  if content != "original":  # the host's fill first, as A1111's
    encoded = np.stack([np.asarray(mask_lib.fill(
        Image.fromarray(_levels(i).astype(np.uint8)), Image.fromarray(_levels(m).astype(
            np.uint8))), np.float32) / 255 for i, m in zip(images, masks, strict=True)])
  _, distances = sampling.generate(pipe, PROMPTS, soft_inpainting=settings,
                                   masked_content=content, **{**kw, "init_images": encoded})

  spec, state = sampling.prepare(pipe, 2, steps=steps, scheduler=name, height=H, width=W,
                                 guidance_scale=GUIDANCE, img2img=True, strength=strength,
                                 inpaint=True, scheduler_options=options)
  gens, init, noise, context = _torch_inpaint_inputs(ref, encoded, seeds)
  shape, sf = init[:1].shape, ref.vae.config.scaling_factor
  nmask = torch.from_numpy(np.stack([_a1111_latent_mask(m, H // 2, W // 2, rounded=False)
                                     for m in masks]))[:, None]
  assert ((nmask > 0.05) & (nmask < 0.95)).any()
  if content == "latent nothing":
    init = init * (1 - nmask)
  concat = []
  if model == "inpainting":  # A1111's conditioning, unrounded, with the masked posterior draw
    m = torch.from_numpy(masks[:, None])
    hidden = nchw(2 * images - 1) * (1 - m)
    draws = [torch.Generator().manual_seed(s) for s in seeds]
    eps = torch.cat([[torch.randn(shape, generator=g) for _ in range(3)][-1] for g in draws])
    with torch.no_grad():
      dist = ref.vae.encode(hidden).latent_dist
    concat = [torch.nn.functional.interpolate(m, size=shape[2:]),
              (dist.mean + dist.std * eps) * sf]

  def blend(x, level):
    return soft_ref.latent_blend(init, x, soft_ref.blend_weight(nmask, level, power, scale),
                                 detail)

  x = _a1111_loop(ref, spec, state, name, init, noise, gens, context, blend, concat)
  distance = torch.norm(x - init, p=2, dim=1)
  err = rel_err(distances, distance.numpy())
  with torch.no_grad():
    decoded = (ref.vae.decode(x / sf).sample / 2 + 0.5).clamp(0, 1)
  decoded = _levels(decoded.permute(0, 2, 3, 1).numpy()).astype(np.uint8)
  expected, overlays = [], []
  for i in range(2):
    overlay = soft_ref.overlay_mask(nmask[i, 0], distance[i], settings, W, H)
    overlays.append(np.asarray(overlay))
    expected.append(np.asarray(soft_ref.composite(
        Image.fromarray(decoded[i]), Image.fromarray((images[i] * 255).round().astype(np.uint8)),
        overlay)))
  diff = np.abs(_levels(ours) - np.stack(expected).astype(int))
  print(f"\nA1111's soft inpainting, {name}: distances {err:.2e}; {(diff > 0).mean():.2%} of "
        f"values differ, by at most {diff.max()}")
  assert err <= 1e-5
  assert diff.max() <= 1 and (diff > 0).mean() <= 0.01
  if name == "euler_ancestral" and model == "plain":  # the original pasted back in part (A1111's DDIM steps its own
    # latents from each blended input: they move everywhere, and the overlay keeps little)
    assert overlays[0].min() < 64 and overlays[0].max() > 192
  plain_a1111 = pipe.generate(PROMPTS, **kw)
  assert np.abs(_levels(plain_a1111) - _levels(ours)).max() > 8


def test_run_with_soft_inpainting(plain, tmp_path):
  """main.py's --soft_inpainting (with --inpaint_blend a1111): mask lines make generate()'s
  images (its overlay from the latents' distance maps, which the run's program hands back
  beside its images); a mask with transparency is its alpha as it is (A1111's rounding off);
  records and PNGs say so, and the PNG's infotext reads back to the same flags. Bad settings,
  another blend or --cfg_parallel: one-line errors."""
  import json

  from PIL import Image

  from sdjax import infotext, masks, outputs

  _, pipe, folder = plain
  rng = np.random.default_rng(8)
  Image.fromarray(rng.integers(0, 255, (H, W, 3), np.uint8)).save(tmp_path / "a.png")
  alpha = np.zeros((H, W), np.uint8)
  alpha[:, 10:] = np.linspace(40, 255, W - 10).astype(np.uint8)  # graded, mostly below 129
  rgba = np.dstack([rng.integers(0, 255, (H, W, 3), np.uint8), alpha])
  Image.fromarray(rgba).save(tmp_path / "m.png")
  path = tmp_path / "soft.jsonl"
  path.write_text(json.dumps({"prompt": "a cat", "init_image": "a.png", "mask_image": "m.png"})
                  + "\n")
  settings = (1.0, 0.5, 4.0, 0.0, 0.5, 2.0)
  kw = dict(steps=3, guidance_scale=GUIDANCE, scheduler="euler")
  cfg = run.RunConfig(model=folder, prompts_file=str(path), height=H, width=W, seed=1,
                      strength=0.8, mask_blur=2, inpaint_blend="a1111", soft_inpainting=settings,
                      output_dir=str(tmp_path / "out"), compilation_cache="",
                      show_progress=False, **kw)
  assert run.generate_run(cfg).images == 1
  record = json.loads(open(tmp_path / "out" / outputs.MANIFEST_NAME).readline())
  assert record["soft_inpainting"] == list(settings)
  soft = masks.SoftInpainting(*settings)
  mask = masks.read_mask(Image.open(tmp_path / "m.png"), rounded=False)
  np.testing.assert_array_equal(np.asarray(mask), alpha)
  prepared = masks.prepare(Image.open(tmp_path / "a.png"), mask, H, W,
                           masks.MaskOptions(blur=2, overlay=True, soft=soft))
  expected = pipe.generate("a cat", init_images=prepared.image[None],
                           mask_images=prepared.mask[None], strength=0.8, seed=record["seed"],
                           inpaint_blend="a1111", soft_inpainting=soft, **kw)
  written = Image.open(tmp_path / "out" / record["file"])
  assert np.abs(np.asarray(written, int) - _levels(expected[0])).max() <= 1
  parameters = written.text["parameters"]
  assert "Inpaint blend: A1111, " in parameters
  assert "Soft inpainting enabled: True, Soft inpainting schedule bias: 1, " in parameters
  flags = infotext.reproduce(parameters).flags
  assert flags["inpaint_blend"] == "a1111" and flags["soft_inpainting"] == [
      f"{x:.1f}" for x in settings]
  hard = pipe.generate("a cat", init_images=prepared.image[None],
                       mask_images=prepared.mask[None], strength=0.8, seed=record["seed"],
                       inpaint_blend="a1111", **kw)
  assert np.abs(_levels(hard[0]) - _levels(expected[0])).max() > 8
  for changes, message in (
      (dict(inpaint_blend="diffusers"), "give --inpaint_blend a1111 too"),
      (dict(soft_inpainting=(1.0, 0.5, 0.5, 0.0, 0.5, 2.0)), "transition_contrast_boost"),
      (dict(cfg_parallel=True), "not made with --cfg_parallel")):
    with pytest.raises(run.RunError, match=message):
      run.generate_run(dataclasses.replace(cfg, output_dir=str(tmp_path / "bad"), **changes))
  with pytest.raises(ValueError, match="inpaint_blend 'a1111' too"):
    pipe.generate("a cat", init_images=prepared.image[None], mask_images=prepared.mask[None],
                  soft_inpainting="on", **kw)
  with pytest.raises(ValueError, match="soft_inpainting are inpainting options"):
    pipe.generate("a cat", soft_inpainting="on", **kw)
  with pytest.raises(ValueError, match="DifferentialDiffusion: give mask_images and "
                                       "inpaint_blend 'comfyui' too"):
    pipe.generate("a cat", init_images=prepared.image[None], mask_images=prepared.mask[None],
                  inpaint_blend="a1111", differential_diffusion=1.0, **kw)
