"""IP-Adapters against diffusers: the CLIP image encoder (transformers'
`CLIPVisionModelWithProjection`), the three image projections, and generate() against
diffusers' pipelines after `load_ip_adapter` (SD1, SDXL; scales, InstantStyle per-layer scales,
two adapters), from random IP-Adapter files in the original layout (`.bin` and `.safetensors`)."""

import dataclasses
import os

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
from parity import assert_close, img2img_draws, nchw, randn
from PIL import Image
from transformers import CLIPImageProcessor

from sdjax import testing
from sdjax.checkpoints import ip_adapter as ip_files
from sdjax.checkpoints.weights import torch_to_flax
from sdjax.models.clip import CLIPVisionConfig, CLIPVisionModelWithProjection

torch.set_num_threads(1)


def cross_attention_widths(unet) -> list[int]:
  """The inner width of each cross-attention layer of a diffusers UNet, in its module order."""
  return [unet.get_submodule(name.removesuffix(".processor")).to_k.out_features
          for name in unet.attn_processors if name.endswith("attn2.processor")]


def ip_state(kind: str, unet, seed: int, tokens: int = 4, vision=None) -> dict:
  """A random IP-Adapter in the original layout: {"image_proj": ..., "ip_adapter": ...}."""
  vision = vision or testing.CLIP_VISION
  rng = np.random.default_rng(seed)

  def w(*shape, scale=None):
    return (rng.standard_normal(shape) * (scale or shape[-1] ** -0.5)).astype(np.float32)

  def norm(prefix, width):
    return {f"{prefix}.weight": 1 + w(width, scale=0.2), f"{prefix}.bias": w(width, scale=0.2)}

  cross = unet.config.cross_attention_dim
  embeds, hidden = vision["projection_dim"], vision["hidden_size"]
  if kind == "image":
    proj = {"proj.weight": w(tokens * cross, embeds), "proj.bias": w(tokens * cross, scale=0.2),
            **norm("norm", cross)}
  elif kind == "full":
    proj = {"proj.0.weight": w(hidden, hidden), "proj.0.bias": w(hidden, scale=0.2),
            "proj.2.weight": w(cross, hidden), "proj.2.bias": w(cross, scale=0.2),
            **norm("proj.3", cross)}
  else:  # plus: 4 perceiver layers of one 64-wide head over a 32-wide resampler
    width = 32
    proj = {"latents": w(1, tokens, width), "proj_in.weight": w(width, hidden),
            "proj_in.bias": w(width, scale=0.2), "proj_out.weight": w(cross, width),
            "proj_out.bias": w(cross, scale=0.2), **norm("norm_out", cross)}
    for i in range(4):
      proj.update({**norm(f"layers.{i}.0.norm1", width), **norm(f"layers.{i}.0.norm2", width),
                   f"layers.{i}.0.to_q.weight": w(64, width),
                   f"layers.{i}.0.to_kv.weight": w(128, width),
                   f"layers.{i}.0.to_out.weight": w(width, 64), **norm(f"layers.{i}.1.0", width),
                   f"layers.{i}.1.1.weight": w(4 * width, width),
                   f"layers.{i}.1.3.weight": w(width, 4 * width)})
  layers = {}
  for i, inner in enumerate(cross_attention_widths(unet)):
    layers[f"{2 * i + 1}.to_k_ip.weight"] = w(inner, cross)
    layers[f"{2 * i + 1}.to_v_ip.weight"] = w(inner, cross)
  return {"image_proj": proj, "ip_adapter": layers}


def write_ip_file(path: str, state: dict) -> str:
  """`.bin`: the nested dicts torch-pickled, as Tencent's files; `.safetensors`: prefixed keys."""
  if path.endswith(".safetensors"):
    safetensors.numpy.save_file({f"{part}.{k}": v for part, d in state.items()
                                 for k, v in d.items()}, path)
  else:
    torch.save({part: {k: torch.from_numpy(v) for k, v in d.items()}
                for part, d in state.items()}, path)
  return path


@pytest.mark.parametrize("act", ["gelu", "quick_gelu"])
def test_image_encoder_matches_transformers(act):
  """image_embeds and the penultimate hidden states, and the config of a weights-only file."""
  tm = testing.torch_clip_vision({**testing.CLIP_VISION, "hidden_act": act}, seed=2)
  cfg = CLIPVisionConfig.from_dict(tm.config.to_dict())
  fm = CLIPVisionModelWithProjection(cfg)
  state = {k: v.numpy() for k, v in tm.state_dict().items()}
  expected = jax.eval_shape(fm.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
  params = torch_to_flax(ip_files.vision_state(state), expected, "image_encoder")
  x = randn(2, 32, 32, 3, seed=1)
  ours = fm.apply({"params": params}, x)
  with torch.no_grad():
    ref = tm(nchw(x), output_hidden_states=True)
  e1 = assert_close(ours["image_embeds"], ref.image_embeds.numpy())
  e2 = assert_close(ours["hidden_states"][-2], ref.hidden_states[-2].numpy())
  print(f"\nclip vision {act}: image_embeds {e1:.2e}, hidden_states[-2] {e2:.2e}")
  with pytest.raises(ip_files.WeightsError, match="width 32 is not one sdjax knows"):
    ip_files.vision_config(state, "encoder.safetensors")


@pytest.mark.parametrize("name", sorted(testing.CLIP_VISION_SIZES))
def test_encoder_config_from_real_weights(name):
  """A weights-only encoder file (A1111's clip_vision/) of each real size gives its config
  (shapes from torch's meta device: no real-size weights made)."""
  from transformers import CLIPVisionConfig as TorchConfig  # noqa: PLC0415
  from transformers import CLIPVisionModelWithProjection as TorchModel  # noqa: PLC0415

  raw = {**testing.CLIP_VISION_SIZES[name], "image_size": 224}
  with torch.device("meta"):
    model = TorchModel(TorchConfig(**raw))
  state = {k: np.broadcast_to(np.float32(0), v.shape) for k, v in model.state_dict().items()}
  inferred = CLIPVisionConfig.from_dict(ip_files.vision_config(state, f"{name}.safetensors"))
  assert inferred == CLIPVisionConfig(**raw)


@pytest.mark.parametrize("kind", ["image", "plus", "full"])
def test_projection_matches_diffusers(kind):
  """Each image projection, read from the original layout, against the module diffusers'
  `load_ip_adapter` builds from the same weights."""
  from sdjax.models.ip_adapter import ImageProjection  # noqa: PLC0415

  unet = testing.torch_unet(testing.UNET_SD1, seed=1)
  state = ip_state(kind, unet, seed=3, tokens=4 if kind == "image" else 6)  # diffusers: 4
  ref = unet._convert_ip_adapter_image_proj_to_diffusers(
      {k: torch.from_numpy(v) for k, v in state["image_proj"].items()}, low_cpu_mem_usage=False)
  cfg = ip_files.projection_config(state["image_proj"], 17)
  fm = ImageProjection(cfg)
  features = (randn(2, 17, 32, seed=4) if cfg.uses_hidden_states else randn(2, 24, seed=4))
  expected = jax.eval_shape(fm.init, jax.random.key(0), features)["params"]
  params = torch_to_flax(ip_files.projection_state(state["image_proj"], cfg), expected, kind)
  ours = fm.apply({"params": params}, features)
  with torch.no_grad():
    want = ref(torch.from_numpy(features)).numpy()
  err = assert_close(ours, want)
  print(f"\nip-adapter projection {kind}: {ours.shape}, {err:.2e}")


@pytest.fixture(scope="module")
def sd1_ip(tmp_path_factory):
  """(diffusers StableDiffusionPipeline with an image encoder, sdjax pipeline, the folder
  holding image_encoder/ and the IP-Adapter files) of tiny random SD1 networks."""
  import sdjax  # noqa: PLC0415

  root = tmp_path_factory.mktemp("ip")
  folder = str(root / "pipe")
  base = testing.write_torch_pipeline(folder, "sd1", seed=21)
  encoder = testing.torch_clip_vision(seed=22)
  models = root / "models"
  encoder.save_pretrained(str(models / "image_encoder"), safe_serialization=True)
  pipe = sdjax.load_pipeline(folder)
  ref = diffusers.StableDiffusionPipeline(
      vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer, unet=base.unet,
      scheduler=diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler_config),
      safety_checker=None, feature_extractor=CLIPImageProcessor(size=32, crop_size=32),
      image_encoder=encoder, requires_safety_checker=False)
  ref.set_progress_bar_config(disable=True)
  for kind, seed in (("image", 1), ("plus", 2), ("full", 3)):
    state = ip_state(kind, base.unet, seed)
    write_ip_file(str(models / f"ip-{kind}.bin"), state)
    write_ip_file(str(models / f"ip-{kind}.safetensors"), state)
  return ref, pipe, models


def reference_images(seed: int, n: int = 2) -> list[Image.Image]:
  """Non-square 8-bit images (CLIP's processor resizes the shorter side, then crops)."""
  rng = np.random.default_rng(seed)
  return [Image.fromarray(rng.integers(0, 256, (40, 52, 3), dtype=np.uint8)) for _ in range(n)]


PROMPTS = ["a red circle in the center", "a photo of a cat"]
KW = dict(num_inference_steps=4, guidance_scale=3.0, height=16, width=16, output_type="np")
OURS = dict(steps=4, guidance_scale=3.0, height=16, width=16, scheduler="euler")


def diffusers_rows(ref, latents, images, prompts=PROMPTS, **kw):
  """diffusers one prompt at a time (its IP-Adapter images serve a whole call)."""
  out = []
  with torch.no_grad():
    for i, prompt in enumerate(prompts):
      out.append(ref(prompt, latents=nchw(latents[i:i + 1]), ip_adapter_image=images[i],
                     **{**KW, **kw}).images[0])
  return np.stack(out)


@pytest.mark.parametrize("kind", ["image", "plus", "full"])
def test_generate_matches_diffusers(sd1_ip, kind):
  """One image per prompt (ours: one batch; diffusers: a call each) at scale 0.6; the file read
  as .bin and as .safetensors gives the same pixels; without the adapter the images differ."""
  import sdjax  # noqa: PLC0415

  ref, pipe, models = sd1_ip
  ref.load_ip_adapter(str(models), subfolder="", weight_name=f"ip-{kind}.bin",
                      image_encoder_folder=None)
  ref.set_ip_adapter_scale(0.6)
  latents = randn(2, 8, 8, 4, seed=5)
  images = reference_images(7)
  expected = diffusers_rows(ref, latents, images)
  arrays = np.stack([np.asarray(i, np.float32) / 255 for i in images])
  plain = pipe.generate(PROMPTS, latents=latents, **OURS)
  change = float(np.linalg.norm(plain - expected) / np.linalg.norm(expected))
  errs = []
  for ext in ("bin", "safetensors"):
    adapter = sdjax.load_ip_adapter(str(models / f"ip-{kind}.{ext}"))
    assert adapter.config.kind == kind
    ours = pipe.generate(PROMPTS, latents=latents, ip_adapter=adapter,
                         ip_adapter_images=arrays, ip_adapter_scale=0.6, **OURS)
    errs.append(float(np.linalg.norm(ours - expected) / np.linalg.norm(expected)))
  print(f"\nip-adapter {kind} generate: {errs[0]:.2e} / {errs[1]:.2e} (without it: {change:.2e})")
  assert max(errs) <= 1e-4 and change > 100 * max(errs)


def test_layer_scales_and_two_adapters(sd1_ip):
  """InstantStyle's per-layer scales (what the dict leaves out: 0), and two IP-Adapters at
  once, each with its own image shared by both prompts (diffusers: a list of files and
  images); cfg_parallel's split program gives the same pixels."""
  import sdjax  # noqa: PLC0415

  ref, pipe, models = sd1_ip
  latents = randn(2, 8, 8, 4, seed=6)
  first, second = reference_images(8, 2)
  style = {"up": {"block_1": [0.0, 1.5, 0.5]}}
  ref.load_ip_adapter(str(models), subfolder="", weight_name="ip-image.bin",
                      image_encoder_folder=None)
  ref.set_ip_adapter_scale(style)
  expected = diffusers_rows(ref, latents, [first, first])
  adapter = sdjax.load_ip_adapter(str(models / "ip-image.safetensors"))
  ours = pipe.generate(PROMPTS, latents=latents, ip_adapter=adapter, ip_adapter_images=first,
                       ip_adapter_scale=style, **OURS)
  err = assert_close(ours, expected, 1e-4)
  ref.load_ip_adapter(str(models), subfolder="", image_encoder_folder=None,
                      weight_name=["ip-image.bin", "ip-plus.bin"])
  ref.set_ip_adapter_scale([0.7, 0.4])
  with torch.no_grad():
    expected = np.stack([ref(p, latents=nchw(latents[i:i + 1]), **KW,
                             ip_adapter_image=[first, second]).images[0]
                         for i, p in enumerate(PROMPTS)])
  both = [sdjax.load_ip_adapter(str(models / f"ip-{k}.bin")) for k in ("image", "plus")]
  errs = [assert_close(pipe.generate(PROMPTS, latents=latents, ip_adapter=both,
                                     ip_adapter_images=[first, second],
                                     ip_adapter_scale=[0.7, 0.4], cfg_parallel=split, **OURS),
                       expected, 1e-4) for split in (False, True)]
  print(f"\nip-adapter InstantStyle scales {err:.2e}; two adapters {errs[0]:.2e}, "
        f"split {errs[1]:.2e}")


def _region_masks(height: int, width: int) -> list[Image.Image]:
  """Two grey-level masks of another size than the output: left and right, overlapping, with
  soft edges (cut at 0.5 after the resize)."""
  x = np.linspace(0.0, 1.0, width)[None, :].repeat(height, 0)
  left = np.clip(1.6 - 2.2 * x, 0, 1)
  right = np.clip(2.2 * x - 0.5, 0, 1)
  return [Image.fromarray((255 * m).round().astype(np.uint8)) for m in (left, right)]


def test_masks_match_diffusers(sd1_ip):
  """Two images for one adapter: attended to together (a list, diffusers' [[a, b]]), and each
  kept where its mask is (diffusers' ip_adapter_masks by IPAdapterMaskProcessor), at a
  non-square size whose layers downsample the masks to 8x12 and 4x6 grids; masks as arrays,
  in cfg_parallel's split program, give the same pixels."""
  from diffusers.image_processor import IPAdapterMaskProcessor  # noqa: PLC0415

  import sdjax  # noqa: PLC0415

  ref, pipe, models = sd1_ip
  size = dict(height=16, width=24)
  latents = randn(2, 8, 12, 4, seed=9)
  images, masks = reference_images(10, 2), _region_masks(20, 36)
  ref.load_ip_adapter(str(models), subfolder="", weight_name="ip-plus.bin",
                      image_encoder_folder=None)
  ref.set_ip_adapter_scale(0.8)
  prepared = IPAdapterMaskProcessor().preprocess(masks, **size)  # 2, 1, H, W
  assert 0 < float(prepared.mean()) < 1

  def diffusers_run(**kw):
    with torch.no_grad():
      return np.stack([ref(p, latents=nchw(latents[i:i + 1]), **{**KW, **size},
                           ip_adapter_image=[images], **kw).images[0]
                       for i, p in enumerate(PROMPTS)])

  together = diffusers_run()
  expected = diffusers_run(cross_attention_kwargs={"ip_adapter_masks": [
      prepared.reshape(1, 2, *prepared.shape[2:])]})
  adapter = sdjax.load_ip_adapter(str(models / "ip-plus.bin"))
  common = dict(latents=latents, ip_adapter=adapter, ip_adapter_images=images,
                ip_adapter_scale=0.8, **{**OURS, **size})
  err = assert_close(pipe.generate(PROMPTS, **common), together, 1e-4)
  errs = [assert_close(pipe.generate(PROMPTS, ip_adapter_masks=m, cfg_parallel=split, **common),
                       expected, 1e-4)
          for m, split in ((masks, False),
                           ([np.asarray(m, np.float32) / 255 for m in masks], True))]
  change = float(np.linalg.norm(together - expected) / np.linalg.norm(expected))
  print(f"\nip-adapter two images {err:.2e}; masked {errs[0]:.2e}, split {errs[1]:.2e} "
        f"(masks change the images by {change:.2e})")
  assert change > 100 * max(errs)
  with pytest.raises(ValueError, match="one mask per image of the adapter's entry"):
    pipe.generate(PROMPTS, ip_adapter=adapter, ip_adapter_images=images,
                  ip_adapter_masks=masks[:1], **OURS)


def test_sdxl_matches_diffusers(tmp_path):
  """SDXL (context 64 from two encoders, an IP-Adapter of the "plus" kind) against
  StableDiffusionXLPipeline; then with the refiner, which the adapter does not condition (the
  base's steps have it: diffusers' base with denoising_end, then its refiner)."""
  import sdjax  # noqa: PLC0415

  base, refiner = testing.write_torch_sdxl(str(tmp_path / "sdxl"), seed=31)
  encoder = testing.torch_clip_vision(seed=32)
  encoder.save_pretrained(str(tmp_path / "image_encoder"), safe_serialization=True)
  write_ip_file(str(tmp_path / "ip.safetensors"), ip_state("plus", base.unet, 4))
  pipe = sdjax.load_pipeline(str(tmp_path / "sdxl" / "base"))
  ref_refiner = sdjax.load_pipeline(str(tmp_path / "sdxl" / "refiner"))
  components = {**base.components, "image_encoder": encoder,
                "feature_extractor": CLIPImageProcessor(size=32, crop_size=32),
                "scheduler": diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler_config)}
  ref = diffusers.StableDiffusionXLPipeline(**components)
  ref.set_progress_bar_config(disable=True)
  ref.load_ip_adapter(str(tmp_path), subfolder="", weight_name="ip.safetensors",
                      image_encoder_folder=None)
  ref.set_ip_adapter_scale(0.8)
  adapter = sdjax.load_ip_adapter(str(tmp_path / "ip.safetensors"),
                                  image_encoder=str(tmp_path / "image_encoder"))
  image = reference_images(9, 1)[0]
  latents = randn(1, 8, 8, 4, seed=7)
  kw = dict(latents=latents, ip_adapter=adapter, ip_adapter_images=image, ip_adapter_scale=0.8,
            **OURS)
  with torch.no_grad():
    expected = ref(PROMPTS[0], latents=nchw(latents), ip_adapter_image=image, **KW).images
    handoff = ref(PROMPTS[0], latents=nchw(latents), ip_adapter_image=image, denoising_end=0.5,
                  **{**KW, "output_type": "latent"}).images
    refiner.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler_config)
    refined = refiner(PROMPTS[0], image=handoff, denoising_start=0.5,
                      **{k: v for k, v in KW.items() if k not in ("height", "width")}).images
  err = assert_close(pipe.generate(PROMPTS[0], **kw), expected, 1e-4)
  err_refined = assert_close(pipe.generate(PROMPTS[0], refiner=ref_refiner, refiner_start=0.5,
                                           **kw), refined, 1e-4)
  print(f"\nip-adapter sdxl: {err:.2e}, with the refiner {err_refined:.2e}")


def test_with_other_features(sd1_ip):
  """A composable prompt of the prompt and itself at weight 0 (A1111's `AND`, `:0`: the UNet on
  [uncond, part rows], image tokens repeated per part) is the plain guided image; without
  guidance (scale 1) only the conditional tokens are used, as diffusers; the hires fix takes
  it; with a ControlNet it matches diffusers' ControlNet pipeline."""
  import sdjax  # noqa: PLC0415

  ref, pipe, models = sd1_ip
  adapter = sdjax.load_ip_adapter(str(models / "ip-image.bin"))
  images = np.random.default_rng(3).uniform(size=(2, 24, 20, 3)).astype(np.float32)
  kw = dict(steps=3, guidance_scale=3.0, height=16, width=16, scheduler="euler", seed=3,
            ip_adapter=adapter, ip_adapter_images=images, prompt_syntax="a1111")
  plain = pipe.generate(PROMPTS, **kw)
  parts = pipe.generate([f"{p} AND {p} :0" for p in PROMPTS], **kw)
  err = assert_close(parts, plain)
  ref.load_ip_adapter(str(models), subfolder="", weight_name="ip-image.bin",
                      image_encoder_folder=None)
  ref.set_ip_adapter_scale(1.0)
  latents = randn(2, 8, 8, 4, seed=5)
  pil = [Image.fromarray((x * 255).round().astype(np.uint8)) for x in images]
  expected = diffusers_rows(ref, latents, pil, guidance_scale=1.0)
  unguided = assert_close(pipe.generate(PROMPTS, latents=latents, ip_adapter=adapter,
                                        ip_adapter_images=images,
                                        **{**OURS, "guidance_scale": 1.0}), expected, 1e-4)
  hires = pipe.generate(PROMPTS, **{**kw, "hires_scale": 1.5, "prompt_syntax": "plain"})
  assert hires.shape == (2, 24, 24, 3) and np.isfinite(hires).all()
  # A hires model (A1111's Hires checkpoint) takes the IP-Adapter too: the same model loaded
  # again makes the same pixels.
  np.testing.assert_array_equal(pipe.generate(PROMPTS, **{
      **kw, "hires_scale": 1.5, "prompt_syntax": "plain",
      "hires_model": sdjax.load_pipeline(pipe.name)}), hires)
  # With a ControlNet (which, as diffusers', sees the text alone): StableDiffusionControlNet-
  # Pipeline with the same IP-Adapter.
  from test_controlnet import torch_controlnet  # noqa: PLC0415

  torch_cn = torch_controlnet(testing.UNET_SD1, 41, conditioning_embedding_out_channels=(8, 16))
  torch_cn.save_pretrained(str(models.parent / "cn"), safe_serialization=True)
  controlled = diffusers.StableDiffusionControlNetPipeline(**{**ref.components,
                                                              "controlnet": torch_cn})
  controlled.set_progress_bar_config(disable=True)
  controlled.set_ip_adapter_scale(0.5)
  edges = np.random.default_rng(4).uniform(size=(1, 16, 16, 3)).astype(np.float32)
  expected = diffusers_rows(controlled, latents, pil, image=nchw(edges))
  both = assert_close(pipe.generate(PROMPTS, latents=latents, ip_adapter=adapter,
                                    ip_adapter_images=images, ip_adapter_scale=0.5,
                                    controlnet=sdjax.load_controlnet(str(models.parent / "cn")),
                                    control_images=edges, **OURS), expected, 1e-4)
  print(f"\nip-adapter composable parts {err:.2e}, no guidance {unguided:.2e}, with a "
        f"ControlNet {both:.2e}")


def test_with_perturbed_attention_guidance(sd1_ip):
  """PAG with an IP-Adapter (its image tokens in all three rows) against
  StableDiffusionPAGPipeline with the same adapter."""
  import sdjax  # noqa: PLC0415

  ref, pipe, models = sd1_ip
  pag = diffusers.StableDiffusionPAGPipeline(**ref.components, pag_applied_layers="mid")
  pag.set_progress_bar_config(disable=True)
  pag.load_ip_adapter(str(models), subfolder="", weight_name="ip-plus.bin",
                      image_encoder_folder=None)
  pag.set_ip_adapter_scale(0.7)
  latents = randn(2, 8, 8, 4, seed=5)
  images = reference_images(9)
  expected = diffusers_rows(pag, latents, images, pag_scale=2.0)
  arrays = np.stack([np.asarray(i, np.float32) / 255 for i in images])
  ours = pipe.generate(PROMPTS, latents=latents, ip_adapter=sdjax.load_ip_adapter(
      str(models / "ip-plus.bin")), ip_adapter_images=arrays, ip_adapter_scale=0.7,
                       pag_scale=2.0, **OURS)
  err = assert_close(ours, expected, 1e-4)
  print(f"\nip-adapter with PAG: {err:.2e}")


def test_bad_input(sd1_ip, tmp_path):
  """One-line errors: the wrong model family, a FaceID file, no image encoder, an encoder of
  another width, missing images, a bad scale."""
  import sdjax  # noqa: PLC0415

  _, pipe, models = sd1_ip
  adapter = sdjax.load_ip_adapter(str(models / "ip-image.bin"))
  image = np.zeros((16, 16, 3), np.float32)
  sdxl_unet = testing.torch_unet(testing.UNET_SDXL, seed=1)
  write_ip_file(str(tmp_path / "xl.bin"), ip_state("image", sdxl_unet, 1))
  os.symlink(models / "image_encoder", tmp_path / "image_encoder")
  xl = sdjax.load_ip_adapter(str(tmp_path / "xl.bin"))
  with pytest.raises(ValueError, match="another model family"):
    pipe.generate("x", ip_adapter=xl, ip_adapter_images=image, steps=1)
  faceid = ip_state("image", sdxl_unet, 1)
  faceid["image_proj"] = {"proj.0.weight": np.zeros((8, 4), np.float32),
                          "norm.weight": np.ones(8, np.float32)}
  write_ip_file(str(tmp_path / "faceid.bin"), faceid)
  with pytest.raises(sdjax.PipelineError, match="FaceID"):
    sdjax.load_ip_adapter(str(tmp_path / "faceid.bin"))
  lone = tmp_path / "a" / "lone"
  lone.mkdir(parents=True)
  write_ip_file(str(lone / "ip.bin"), ip_state("image", sdxl_unet, 1))
  with pytest.raises(sdjax.PipelineError, match="no image_encoder/ folder"):
    sdjax.load_ip_adapter(str(lone / "ip.bin"))
  wide = testing.torch_clip_vision({**testing.CLIP_VISION, "projection_dim": 16}, seed=1)
  wide.save_pretrained(str(tmp_path / "wide"), safe_serialization=True)
  with pytest.raises(sdjax.PipelineError, match="the wrong image encoder"):
    sdjax.load_ip_adapter(str(models / "ip-image.bin"), image_encoder=str(tmp_path / "wide"))
  safetensors.numpy.save_file({"a": np.zeros(2, np.float32)}, str(tmp_path / "other.safetensors"))
  with pytest.raises(sdjax.PipelineError, match="not an IP-Adapter file"):
    sdjax.load_ip_adapter(str(tmp_path / "other.safetensors"))
  for kwargs, match in [
      (dict(ip_adapter=adapter), "needs ip_adapter_images"),
      (dict(ip_adapter_images=image), "give ip_adapter= too"),
      (dict(ip_adapter=[adapter, adapter], ip_adapter_images=image), "a list of 2"),
      (dict(ip_adapter=adapter, ip_adapter_images=image, ip_adapter_scale={"mid": 1, "x": 2}),
       "keys down, mid, up"),
      (dict(ip_adapter=adapter, ip_adapter_images=image,
            ip_adapter_scale={"up": {"block_0": 1.0}}), "no attention block 'block_0'"),
      (dict(ip_adapter=adapter, ip_adapter_images=image,
            ip_adapter_scale={"up": {"block_1": [1.0, 2.0]}}), "has 3 attention layers"),
      (dict(ip_adapter=adapter, ip_adapter_images=np.zeros((3, 8, 8, 3))), "one image per"),
      (dict(ip_adapter=adapter, ip_adapter_images=np.zeros((8, 8))), "PIL image or"),
      (dict(ip_adapter="ip.bin", ip_adapter_images=image), "takes an IPAdapter")]:
    with pytest.raises(ValueError, match=match):
      pipe.generate(PROMPTS, steps=1, height=16, width=16, **kwargs)


def test_run_with_ip_adapter(sd1_ip, tmp_path):
  """main.py's run: each jsonl line's ip_adapter_image (else --ip_adapter_image), a batch with
  a padded row; each image is generate()'s with its image; the manifest and the PNG's A1111
  ControlNet unit name the adapter; InstantStyle's per-layer scales given as JSON; on two
  devices (a subprocess) the same pixels; a line without an image is a one-line error."""
  import json  # noqa: PLC0415
  import subprocess  # noqa: PLC0415
  import sys  # noqa: PLC0415

  import sdjax  # noqa: PLC0415
  from sdjax import infotext, outputs, run  # noqa: PLC0415

  _, pipe, models = sd1_ip
  file = str(models / "ip-plus.safetensors")
  adapter = sdjax.load_ip_adapter(file)
  rng = np.random.default_rng(10)
  for name in ("style.png", "default.png"):
    Image.fromarray(rng.integers(0, 255, (20, 28, 3), np.uint8)).save(tmp_path / name)
  lines = [{"prompt": "a cat", "ip_adapter_image": "style.png"}, {"prompt": "a dog", "seed": 7},
           {"prompt": "a cow", "ip_adapter_image": "style.png"}]
  path = tmp_path / "ip.jsonl"
  path.write_text("".join(json.dumps(line) + "\n" for line in lines))
  cfg = run.RunConfig(model=pipe.name, prompts_file=str(path), steps=3, guidance_scale=3.0,
                      scheduler="euler", height=16, width=16, seed=2, batch_size=2,
                      ip_adapter=(file,), ip_adapter_image=(str(tmp_path / "default.png"),),
                      ip_adapter_scale=(0.7,), output_dir=str(tmp_path / "out"),
                      compilation_cache="", show_progress=False)
  assert run.generate_run(cfg).images == 3
  records = [json.loads(x) for x in open(tmp_path / "out" / outputs.MANIFEST_NAME)]
  for record, name in zip(records, ["style.png", "default.png", "style.png"], strict=True):
    assert record["ip_adapter_image"] == str(tmp_path / name)
    assert record["ip_adapter"] == file and record["ip_adapter_scale"] == 0.7
    expected = pipe.generate(record["prompt"], steps=3, guidance_scale=3.0, scheduler="euler",
                             height=16, width=16, seed=record["seed"], ip_adapter=adapter,
                             ip_adapter_images=Image.open(tmp_path / name),
                             ip_adapter_scale=0.7)
    png = Image.open(tmp_path / "out" / record["file"])
    assert np.abs(np.asarray(png, np.float32) - expected[0] * 255).max() <= 1.0
    params = outputs.parse_a1111_parameters(png.text["parameters"])
    assert params["ControlNet 0"] == (f"Module: ip-adapter_clip, Model: ip-plus "
                                      f"[{outputs.short_hash(file)}], Weight: 0.7, "
                                      "Guidance Start: 0, Guidance End: 1")
  # InstantStyle's per-layer scales, as JSON text (main.py's flag): the PNG writes them beside
  # the unit, whose Weight is 1. With --ip_adapter_mask, a mask file keeps the image to a
  # region.
  style = {"up": {"block_1": [0.0, 1.5, 0.5]}}
  mask = _region_masks(20, 28)[1]
  mask.save(tmp_path / "mask.png")
  path.write_text(json.dumps(lines[0]) + "\n")
  styled = dataclasses.replace(cfg, ip_adapter_scale=(json.dumps(style),),
                               ip_adapter_mask=(str(tmp_path / "mask.png"),),
                               output_dir=str(tmp_path / "style"))
  assert run.generate_run(styled).images == 1
  record = json.loads(open(tmp_path / "style" / outputs.MANIFEST_NAME).readline())
  assert record["ip_adapter_scale"] == style
  assert record["ip_adapter_mask"] == str(tmp_path / "mask.png")
  expected = pipe.generate("a cat", steps=3, guidance_scale=3.0, scheduler="euler", height=16,
                           width=16, seed=2, ip_adapter=adapter, ip_adapter_scale=style,
                           ip_adapter_images=Image.open(tmp_path / "style.png"),
                           ip_adapter_masks=mask)
  png = Image.open(tmp_path / "style" / record["file"])
  assert np.abs(np.asarray(png, np.float32) - expected[0] * 255).max() <= 1.0
  params = outputs.parse_a1111_parameters(png.text["parameters"])
  assert "Weight: 1," in params["ControlNet 0"]
  assert json.loads(params["IP-Adapter 0 layer scales"]) == style
  found = infotext.reproduce(png.text["parameters"])  # read back: the scales, a note
  scale, = found.flags["ip_adapter_scale"]
  assert json.loads(scale) == style and "ip_adapter" in dict(found.notes)
  path.write_text("".join(json.dumps(line) + "\n" for line in lines))
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"}
  two = str(tmp_path / "two")
  proc = subprocess.run(
      [sys.executable, os.path.join(root, "main.py"), "--model", pipe.name, "--prompts_file",
       str(path), "--steps", "3", "--guidance_scale", "3", "--scheduler", "euler", "--height",
       "16", "--width", "16", "--seed", "2", "--batch_size", "1", "--ip_adapter", file,
       "--ip_adapter_image", str(tmp_path / "default.png"), "--ip_adapter_scale", "0.7",
       "--output_dir", two, "--compilation_cache="],
      cwd=root, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  for record in records:
    one = np.asarray(Image.open(tmp_path / "out" / record["file"]), np.float32)
    assert np.abs(np.asarray(Image.open(os.path.join(two, record["file"])), np.float32)
                  - one).max() <= 1.0
  with pytest.raises(run.RunError, match="--ip_adapter needs an image"):
    run.generate_run(dataclasses.replace(cfg, ip_adapter_image=(),
                                         output_dir=str(tmp_path / "none")))


def test_hub_file_brings_its_image_encoder(sd1_ip, tmp_path, monkeypatch):
  """`owner/name/models/ip.safetensors`: the file, and of its repo's `models/image_encoder/`
  only the config and the safetensors weights (h94/IP-Adapter keeps a .bin beside them)."""
  import shutil  # noqa: PLC0415

  import huggingface_hub  # noqa: PLC0415

  import sdjax  # noqa: PLC0415

  _, _, models = sd1_ip
  snapshot = tmp_path / "snapshot"
  shutil.copytree(models, snapshot / "models")
  files = ["models/ip-image.safetensors", "models/image_encoder/config.json",
           "models/image_encoder/model.safetensors", "models/image_encoder/pytorch_model.bin",
           "sdxl_models/image_encoder/config.json"]
  asked = []
  monkeypatch.setattr(huggingface_hub, "list_repo_files", lambda repo, revision=None: files)
  monkeypatch.setattr(huggingface_hub, "hf_hub_download",
                      lambda repo, name, revision=None: str(snapshot / name))

  def snapshot_download(repo, revision=None, allow_patterns=()):
    asked.append((repo, list(allow_patterns)))
    return str(snapshot)

  monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
  adapter = sdjax.load_ip_adapter("h94/IP-Adapter/models/ip-image.safetensors")
  assert asked == [("h94/IP-Adapter", ["models/image_encoder/config.json",
                                       "models/image_encoder/model.safetensors"])]
  local = sdjax.load_ip_adapter(str(models / "ip-image.safetensors"))
  assert jax.tree.all(jax.tree.map(lambda a, b: bool((np.asarray(a) == np.asarray(b)).all()),
                                   adapter.params, local.params))


def test_img2img_matches_diffusers(sd1_ip):
  """img2img with an IP-Adapter against StableDiffusionImg2ImgPipeline after load_ip_adapter,
  given the same posterior sample and noise."""
  import sdjax  # noqa: PLC0415

  ref, pipe, models = sd1_ip
  img_pipe = diffusers.StableDiffusionImg2ImgPipeline(**ref.components)
  img_pipe.set_progress_bar_config(disable=True)
  img_pipe.load_ip_adapter(str(models), subfolder="", weight_name="ip-image.bin",
                           image_encoder_folder=None)
  img_pipe.set_ip_adapter_scale(0.6)
  image = reference_images(3, 1)[0]
  init = np.random.default_rng(0).uniform(size=(1, 16, 16, 3)).astype(np.float32)
  noise = randn(1, 8, 8, 4, seed=4)
  module = "diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img"
  with img2img_draws(module, 17, (8, 8, 4), noise), torch.no_grad():
    expected = img_pipe(PROMPTS[1], image=nchw(init), strength=0.6, ip_adapter_image=image,
                        **{k: v for k, v in KW.items() if k not in ("height", "width")}).images
  ours = pipe.generate(PROMPTS[1], init_images=init, strength=0.6, latents=noise, seed=17,
                       ip_adapter=sdjax.load_ip_adapter(str(models / "ip-image.bin")),
                       ip_adapter_images=image, ip_adapter_scale=0.6, **OURS)
  err = assert_close(ours, expected, 1e-4)
  print(f"\nip-adapter img2img: {err:.2e}")
