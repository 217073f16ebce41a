"""Tiny configs and random reference pipelines, shared by the tests, tools and training.

Everything that builds a PyTorch oracle imports torch / diffusers lazily: they are test-only
dependencies.
"""

from __future__ import annotations

import json
import os
from typing import Any

# -- tiny architecture configs (diffusers / transformers config.json dicts) ------------------------
UNET_SD1 = {  # conv projection, one head count for every block
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [32, 64],
    "layers_per_block": 2,
    "cross_attention_dim": 32,
    "attention_head_dim": 2,
    "norm_num_groups": 8,
}

UNET_SD2 = {  # linear projection, per-block head counts, upcast attention, 3 levels
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [16, 32, 32],
    "layers_per_block": 1,
    "cross_attention_dim": 24,
    "attention_head_dim": [2, 4, 4],
    "norm_num_groups": 8,
    "use_linear_projection": True,
    "upcast_attention": True,
    "flip_sin_to_cos": False,
    "freq_shift": 1,
    "transformer_layers_per_block": [1, 2, 1],
}

# The x4 upscaler's layout (stable-diffusion-x4-upscaler): the latents and the noised low-res
# image in (7 channels), its noise level as a class label, no attention in the first level and
# cross-attention only (attn1 attends to the text too) in the others but the last.
UNET_X4 = {
    **UNET_SD2,
    "in_channels": 7,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "only_cross_attention": [True, True, False],
    "num_class_embeds": 1000,
    "transformer_layers_per_block": 1,
}

# SDXL layout: no attention in the first level, linear projection, per-block heads, transformer
# depth growing with depth (the mid block takes the last), text_time added conditioning. The two
# text encoders are 24 and 40 wide (context 64), the second projects its pooled state to 20.
SDXL_TIME_EMBED_DIM = 8
UNET_SDXL = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [16, 32, 32],
    "layers_per_block": 1,
    "cross_attention_dim": 64,
    "attention_head_dim": [2, 2, 4],
    "norm_num_groups": 8,
    "use_linear_projection": True,
    "upcast_attention": None,  # as SDXL's config.json
    "transformer_layers_per_block": [1, 1, 2],
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": SDXL_TIME_EMBED_DIM,
    "addition_embed_type_num_heads": 64,
    "projection_class_embeddings_input_dim": 20 + 6 * SDXL_TIME_EMBED_DIM,
}

# The refiner: conditioned on the second encoder only (context 40), 5 time ids (aesthetic score).
UNET_SDXL_REFINER = {
    **UNET_SDXL,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [16, 24, 32],
    "attention_head_dim": [2, 3, 4],
    "cross_attention_dim": 40,
    "transformer_layers_per_block": 2,
    "projection_class_embeddings_input_dim": 20 + 5 * SDXL_TIME_EMBED_DIM,
}

# A distilled (SSD-1B / Vega-like) layout: per-layer depths, explicit up-block depths.
UNET_SDXL_DISTILLED = {
    **UNET_SDXL,
    "layers_per_block": [1, 2, 2],
    "transformer_layers_per_block": [1, [1, 2], [2, 0]],
    "reverse_transformer_layers_per_block": [[2, 1, 0], [1, 0, 2], [1, 1, 1]],
}

VAE_SDXL = {  # latents_mean / latents_std as newer SDXL-family VAEs carry them
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 2,
    "up_block_types": ["UpDecoderBlock2D"] * 2,
    "block_out_channels": [16, 32],
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 8,
    "sample_size": 16,
    "scaling_factor": 0.13025,
    "force_upcast": True,
    "latents_mean": [0.1, -0.2, 0.05, 0.3],
    "latents_std": [0.9, 1.1, 1.3, 0.8],
}

SCHEDULER_SDXL = {
    "_class_name": "EulerDiscreteScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}

VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 2,
    "up_block_types": ["UpDecoderBlock2D"] * 2,
    "block_out_channels": [16, 32],
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 8,
    "sample_size": 16,
    "scaling_factor": 0.5,
}


def clip_config(hidden_act: str = "quick_gelu", hidden_size: int = 32,
                **overrides) -> dict[str, Any]:
  vocab, _ = _vocab_and_merges()
  return {
      "vocab_size": len(vocab),
      "bos_token_id": vocab["<|startoftext|>"],
      "eos_token_id": vocab["<|endoftext|>"],
      "pad_token_id": vocab["<|endoftext|>"],
      "hidden_size": hidden_size,
      "intermediate_size": 37,
      "num_hidden_layers": 3,
      "num_attention_heads": 4,
      "max_position_embeddings": 77,
      "hidden_act": hidden_act,
      "layer_norm_eps": 1e-5,
      **overrides,
  }


def sdxl_clip_configs() -> tuple[dict[str, Any], dict[str, Any]]:
  """SDXL's two encoders, tiny: CLIP-L-like (quick_gelu) and bigG-like (gelu, projection,
  `eos_token_id=2` as the real config, which selects transformers' legacy pooling rule)."""
  return (clip_config("quick_gelu", hidden_size=24),
          clip_config("gelu", hidden_size=40, projection_dim=20, eos_token_id=2,
                      num_attention_heads=5))


SCHEDULER_SD15 = {
    "_class_name": "PNDMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}

# -- a tiny CLIP BPE tokenizer ---------------------------------------------------------------------
# Whole-word tokens for these words; anything else falls back to single byte-level characters.
TOKENIZER_WORDS = (
    "a an the of in on at with and photo picture painting cat dog house tree car sky "
    "red orange yellow green blue purple white black circle square triangle center top bottom "
    "left right background"
).split()


def _bytes_to_unicode() -> dict[int, str]:
  """GPT-2 / CLIP's reversible byte -> printable unicode character table."""
  printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
      range(ord("®"), ord("ÿ") + 1))
  chars = printable[:]
  extra = 0
  for b in range(256):
    if b not in printable:
      printable.append(b)
      chars.append(256 + extra)
      extra += 1
  return dict(zip(printable, map(chr, chars), strict=True))


def _bpe(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
  """CLIP's BPE: merge the best-ranked adjacent pair until none of the merges applies."""
  while len(symbols) > 1:
    pairs = [(ranks.get(p, len(ranks)), i) for i, p in enumerate(zip(symbols[:-1], symbols[1:], strict=True))]
    rank, i = min(pairs)
    if rank == len(ranks):
      break
    symbols = symbols[:i] + [symbols[i] + symbols[i + 1]] + symbols[i + 2:]
  return symbols


def _vocab_and_merges(words=TOKENIZER_WORDS):
  """A byte-level BPE vocabulary in which every word of `words` is one token.

  Each word is first split by the merges so far (as the tokenizer will), then its pieces are
  joined left to right by new merges. New merges rank after the old ones, so the words before
  keep their single token: a word whose letters an earlier word's merge claims ("re" of "red"
  inside "green") still ends as one token.
  """
  base = list(_bytes_to_unicode().values())
  vocab = base + [c + "</w>" for c in base]
  merges, ranks = [], {}
  for word in words:
    symbols = _bpe(list(word[:-1]) + [word[-1] + "</w>"], ranks)
    while len(symbols) > 1:
      pair = (symbols[0], symbols[1])
      ranks.setdefault(pair, len(merges))
      if len(ranks) > len(merges):
        merges.append(pair)
      if pair[0] + pair[1] not in vocab:
        vocab.append(pair[0] + pair[1])
      symbols = _bpe([pair[0] + pair[1]] + symbols[2:], ranks)
  vocab += ["<|startoftext|>", "<|endoftext|>"]
  return {tok: i for i, tok in enumerate(vocab)}, merges


def write_tokenizer(folder: str, words=TOKENIZER_WORDS, pad_token: str = "<|endoftext|>",
                    max_length: int = 77) -> None:
  """Writes a CLIP tokenizer folder in the slow layout (vocab.json + merges.txt)."""
  os.makedirs(folder, exist_ok=True)
  vocab, merges = _vocab_and_merges(words)
  with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
    json.dump(vocab, f, ensure_ascii=False)
  with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
    f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
  with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
    json.dump({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": max_length, "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": pad_token,
        "do_lower_case": True,
    }, f)


# -- random PyTorch reference models ---------------------------------------------------------------
def perturb_(module, seed: int, scale: float = 0.1) -> None:
  """Moves every bias and norm parameter away from its init, so no test passes trivially."""
  import torch  # noqa: PLC0415

  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      if name.endswith("bias") or "norm" in name:
        p.add_(torch.randn(p.shape, generator=gen) * scale)


def torch_unet(config: dict[str, Any], seed: int = 0):
  import torch  # noqa: PLC0415
  from diffusers import UNet2DConditionModel  # noqa: PLC0415

  torch.manual_seed(seed)
  model = UNet2DConditionModel(**config).eval()
  perturb_(model, seed)
  return model


def torch_vae(config: dict[str, Any], seed: int = 0):
  import torch  # noqa: PLC0415
  from diffusers import AutoencoderKL  # noqa: PLC0415

  torch.manual_seed(seed)
  model = AutoencoderKL(**config).eval()
  perturb_(model, seed)
  return model


def _init_clip_(model, seed: int) -> None:
  """CLIP's initialisation (transformers' `CLIPPreTrainedModel._init_weights` as of 4.x: normal
  weights with per-layer widths, unit norms, zero biases) drawn by us, each parameter from a
  generator seeded by `seed` and its name, so the random test models do not change when
  transformers changes how or in which order it draws (5.2x did: a tiny CLIP's mean output
  moved from -1.1e-3 to 3.7e-3)."""
  import zlib  # noqa: PLC0415

  import torch  # noqa: PLC0415

  cfg = model.config
  width, layers = cfg.hidden_size, cfg.num_hidden_layers
  attention, outputs = width ** -0.5 * (2 * layers) ** -0.5, width ** -0.5
  with torch.no_grad():
    for name, p in model.named_parameters():
      gen = torch.Generator().manual_seed(seed * 2 ** 32 + zlib.crc32(name.encode()))
      if name.endswith("bias"):
        p.zero_()
      elif "norm" in name:
        p.fill_(1.0)
      else:
        std = (0.02 if "embedding" in name else
               attention if name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight",
                                           "fc2.weight")) else
               (2 * width) ** -0.5 if name.endswith("fc1.weight") else outputs)
        p.copy_(torch.randn(p.shape, generator=gen) * std)


def torch_clip(config: dict[str, Any], seed: int = 0):
  from transformers import CLIPTextConfig, CLIPTextModel  # noqa: PLC0415

  model = CLIPTextModel(CLIPTextConfig(**config)).eval()
  _init_clip_(model, seed)
  perturb_(model, seed)
  return model


def torch_clip_with_projection(config: dict[str, Any], seed: int = 0):
  from transformers import CLIPTextConfig, CLIPTextModelWithProjection  # noqa: PLC0415

  model = CLIPTextModelWithProjection(CLIPTextConfig(**config)).eval()
  _init_clip_(model, seed)
  perturb_(model, seed)
  return model


# A tiny CLIP image encoder (IP-Adapters'): 32x32 images in 8x8 patches (17 tokens).
CLIP_VISION = {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 3,
               "num_attention_heads": 4, "image_size": 32, "patch_size": 8,
               "projection_dim": 24, "hidden_act": "gelu", "layer_norm_eps": 1e-5}


# The real image encoders of IP-Adapters (transformers CLIPVisionConfig, 224x224): OpenCLIP
# ViT-H/14 (SD1.5 and the "vit-h" SDXL adapters), ViT-bigG/14 (SDXL), OpenAI ViT-L/14.
CLIP_VISION_SIZES = {
    "vit-h": dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                  num_attention_heads=16, patch_size=14, projection_dim=1024, hidden_act="gelu"),
    "vit-bigg": dict(hidden_size=1664, intermediate_size=8192, num_hidden_layers=48,
                     num_attention_heads=16, patch_size=14, projection_dim=1280,
                     hidden_act="gelu"),
    "vit-l": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                  num_attention_heads=16, patch_size=14, projection_dim=768,
                  hidden_act="quick_gelu"),
}


def torch_clip_vision(config: dict[str, Any] | None = None, seed: int = 0):
  """A random transformers `CLIPVisionModelWithProjection` (default: CLIP_VISION)."""
  from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection  # noqa: PLC0415

  model = CLIPVisionModelWithProjection(CLIPVisionConfig(**(config or CLIP_VISION))).eval()
  _init_clip_(model, seed)
  perturb_(model, seed)
  return model


def torch_tokenizer(folder: str):
  from transformers import CLIPTokenizer  # noqa: PLC0415

  return CLIPTokenizer.from_pretrained(folder)


FAMILIES = {
    # family -> (unet config, clip activation, scheduler overrides)
    "sd1": (UNET_SD1, "quick_gelu", {}),
    "sd2": (UNET_SD2, "gelu", {"_class_name": "DDIMScheduler", "prediction_type": "v_prediction",
                               "set_alpha_to_one": False, "clip_sample": False}),
}


def torch_pipeline(tmp_folder: str, family: str = "sd1", seed: int = 0,
                   inpainting: bool = False, pix2pix: bool = False, depth: bool = False):
  """A randomly initialised diffusers `StableDiffusionPipeline` of a tiny family config (with
  `inpainting`, a `StableDiffusionInpaintPipeline` whose UNet also takes the mask and the masked
  image's latents: 9 input channels; with `pix2pix`, a `StableDiffusionInstructPix2PixPipeline`
  whose UNet also takes the image's latents: 8; with `depth`, a
  `StableDiffusionDepth2ImgPipeline` (no depth estimator: give it depth maps) whose UNet also
  takes a depth map: 5)."""
  import diffusers  # noqa: PLC0415

  unet_config, act, sched_overrides = FAMILIES[family]
  if inpainting:
    unet_config = {**unet_config, "in_channels": 2 * VAE["latent_channels"] + 1}
  if pix2pix:
    unet_config = {**unet_config, "in_channels": 2 * VAE["latent_channels"]}
  if depth:
    unet_config = {**unet_config, "in_channels": VAE["latent_channels"] + 1}
  scheduler_config = {**SCHEDULER_SD15, **sched_overrides}
  scheduler_cls = getattr(diffusers, scheduler_config["_class_name"])
  tok_folder = os.path.join(tmp_folder, "_tokenizer_src")
  write_tokenizer(tok_folder, pad_token="!" if family == "sd2" else "<|endoftext|>")
  clip = clip_config(act, hidden_size=unet_config["cross_attention_dim"])
  cls = diffusers.StableDiffusionPipeline
  if inpainting:
    cls = diffusers.StableDiffusionInpaintPipeline
  if pix2pix:
    cls = diffusers.StableDiffusionInstructPix2PixPipeline
  if depth:
    return diffusers.StableDiffusionDepth2ImgPipeline(
        vae=torch_vae(VAE, seed + 1), text_encoder=torch_clip(clip, seed + 2),
        tokenizer=torch_tokenizer(tok_folder), unet=torch_unet(unet_config, seed + 3),
        scheduler=scheduler_cls.from_config(scheduler_config), depth_estimator=None,
        feature_extractor=None)
  return cls(
      vae=torch_vae(VAE, seed + 1),
      text_encoder=torch_clip(clip, seed + 2),
      tokenizer=torch_tokenizer(tok_folder),
      unet=torch_unet(unet_config, seed + 3),
      scheduler=scheduler_cls.from_config(scheduler_config),
      safety_checker=None,
      feature_extractor=None,
      requires_safety_checker=False,
  )


def write_torch_pipeline(folder: str, family: str = "sd1", seed: int = 0,
                         inpainting: bool = False, pix2pix: bool = False, depth: bool = False):
  """Saves a random tiny diffusers pipeline as a diffusers-format folder; returns the pipeline."""
  pipe = torch_pipeline(folder + "_src", family, seed, inpainting, pix2pix, depth)
  pipe.save_pretrained(folder, safe_serialization=True)
  return pipe


# The x4 upscaler's VAE: three levels (1/4 of the image), its small scaling factor.
VAE_X4 = {**VAE, "down_block_types": ["DownEncoderBlock2D"] * 3,
          "up_block_types": ["UpDecoderBlock2D"] * 3, "block_out_channels": [16, 32, 32],
          "scaling_factor": 0.08333}


def torch_upscaler_pipeline(tmp_folder: str, seed: int = 0):
  """A random tiny diffusers `StableDiffusionUpscalePipeline` (stable-diffusion-x4-upscaler's
  layout: UNET_X4, VAE_X4, an SD2 text encoder, v-prediction DDIM, a DDPM low-res scheduler)."""
  import diffusers  # noqa: PLC0415

  tok_folder = os.path.join(tmp_folder, "_tokenizer_src")
  write_tokenizer(tok_folder, pad_token="!")
  clip = clip_config("gelu", hidden_size=UNET_X4["cross_attention_dim"])
  scheduler = diffusers.DDIMScheduler.from_config({**SCHEDULER_SD15, **FAMILIES["sd2"][2],
                                                   "beta_start": 0.0001, "beta_end": 0.02})
  pipe = diffusers.StableDiffusionUpscalePipeline(
      vae=torch_vae(VAE_X4, seed + 1), text_encoder=torch_clip(clip, seed + 2),
      tokenizer=torch_tokenizer(tok_folder), unet=torch_unet(UNET_X4, seed + 3),
      low_res_scheduler=diffusers.DDPMScheduler(beta_schedule="scaled_linear",
                                                beta_start=0.0001, beta_end=0.02),
      scheduler=scheduler, max_noise_level=350)
  pipe.set_progress_bar_config(disable=True)
  return pipe


def torch_sdxl_pipelines(tmp_folder: str, seed: int = 0):
  """Random tiny diffusers `StableDiffusionXLPipeline` and its refiner
  (`StableDiffusionXLImg2ImgPipeline`: second encoder only, aesthetic score), sharing the VAE,
  the second encoder and its tokenizer as the real pair does."""
  import diffusers  # noqa: PLC0415

  tok_1, tok_2 = os.path.join(tmp_folder, "_tok1"), os.path.join(tmp_folder, "_tok2")
  write_tokenizer(tok_1)
  write_tokenizer(tok_2, pad_token="!")  # SDXL's second tokenizer pads with "!"
  clip_1, clip_2 = sdxl_clip_configs()
  vae = torch_vae(VAE_SDXL, seed + 1)
  text_encoder_2 = torch_clip_with_projection(clip_2, seed + 3)
  tokenizer_2 = torch_tokenizer(tok_2)
  scheduler = diffusers.EulerDiscreteScheduler.from_config(SCHEDULER_SDXL)
  base = diffusers.StableDiffusionXLPipeline(
      vae=vae, text_encoder=torch_clip(clip_1, seed + 2), text_encoder_2=text_encoder_2,
      tokenizer=torch_tokenizer(tok_1), tokenizer_2=tokenizer_2,
      unet=torch_unet(UNET_SDXL, seed + 4), scheduler=scheduler, add_watermarker=False,
  )
  refiner = diffusers.StableDiffusionXLImg2ImgPipeline(
      vae=vae, text_encoder=None, text_encoder_2=text_encoder_2, tokenizer=None,
      tokenizer_2=tokenizer_2, unet=torch_unet(UNET_SDXL_REFINER, seed + 5),
      scheduler=scheduler, requires_aesthetics_score=True, force_zeros_for_empty_prompt=False,
      add_watermarker=False,
  )
  for pipe in (base, refiner):
    pipe.set_progress_bar_config(disable=True)
  return base, refiner


def write_torch_sdxl(folder: str, seed: int = 0):
  """Saves random tiny SDXL base and refiner folders (`folder`/base, `folder`/refiner)."""
  base, refiner = torch_sdxl_pipelines(folder + "_src", seed)
  base.save_pretrained(os.path.join(folder, "base"), safe_serialization=True)
  refiner.save_pretrained(os.path.join(folder, "refiner"), safe_serialization=True)
  return base, refiner
