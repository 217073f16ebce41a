"""Original-layout single-file checkpoints (CompVis / LDM, as A1111 and model sites share them).

One file holds the whole model under per-network prefixes: the UNet under
`model.diffusion_model.` (`input_blocks` / `middle_block` / `output_blocks`), the VAE under
`first_stage_model.` (`encoder.down.N.block.M`, attention as 1x1 convs), the text encoder under
`cond_stage_model.transformer.text_model.` (SD1, OpenAI CLIP: transformers' names) or
`cond_stage_model.model.` (SD2, OpenCLIP: fused q/k/v `in_proj`, `resblocks`); SDXL (SGM) has
`conditioner.embedders.0.transformer.` (CLIP-L) and `conditioner.embedders.1.model.` (OpenCLIP
bigG with `text_projection`), the refiner only bigG as `conditioner.embedders.0.model.`, and the
UNet's added conditioning as `label_emb`.

The mapping to diffusers' names (which sdjax's params follow) is a table generated from the
model's config: `unet_table(cfg)` lists, for every diffusers key, the original key it comes from
(and which third of a fused q/k/v). Loading and export both read the same tables.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

from sdjax.checkpoints import standard
from sdjax.checkpoints.weights import (
    WeightsError,
    read_pickle,
    read_safetensors,
    read_safetensors_metadata,
)


class SingleFileError(WeightsError):
  """A single-file checkpoint that cannot be read or is not a supported model."""


UNET_PREFIX = "model.diffusion_model."
# An inpainting UNet's input: latents (4), the mask (1), the masked image's latents (4).
INPAINTING_CHANNELS = 9
# An instruct-pix2pix UNet's: latents (4), the edited image's latents (4).
EDIT_CHANNELS = 8
# A depth-to-image UNet's: latents (4), the depth map (1).
DEPTH_CHANNELS = 5
# The x4 upscaler's: latents (4), the noised low-res image (3); its noise level a class label.
UPSCALER_CHANNELS = 7
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer.text_model."  # SD1: OpenAI CLIP-L
OPENCLIP_PREFIX = "cond_stage_model.model."  # SD2: OpenCLIP ViT-H text tower
# SGM layout (SDXL): CLIP-L and OpenCLIP bigG (the refiner: bigG only, as embedder 0).
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer.text_model."
SDXL_OPENCLIP_PREFIX = "conditioner.embedders.1.model."
SDXL_REFINER_OPENCLIP_PREFIX = "conditioner.embedders.0.model."

PICKLE_EXTENSIONS = (".ckpt", ".pt", ".pth", ".bin")
EXTENSIONS = (".safetensors", *PICKLE_EXTENSIONS)

# What real files carry beside the weights: the DDPM schedule as buffers, the EMA copy (we take
# the live weights), the VAE's training loss (LPIPS, discriminator), non-parameter buffers.
_IGNORED = re.compile(
    r"^(betas|alphas_cumprod|alphas_cumprod_prev|sqrt_alphas_cumprod|"
    r"sqrt_one_minus_alphas_cumprod|log_one_minus_alphas_cumprod|sqrt_recip_alphas_cumprod|"
    r"sqrt_recipm1_alphas_cumprod|posterior_variance|posterior_log_variance_clipped|"
    r"posterior_mean_coef1|posterior_mean_coef2|logvar|lvlb_weights)$"
    r"|^model_ema\.|^(first_stage_model\.)?loss\."
    r"|(^|\.)(position_ids|logit_scale|text_projection|attn_mask)$"
    r"|^(v_pred|ztsnr)$"  # markers, read by `scheduler_markers`
    r"|^edm_(mean|std)$"  # Playground's latent statistics, read by `playground_configs`
    r"|^edm_vpred\.sigma_(max|min)$"  # CosXL's noise range (`cosxl_marker`)
)

# Marker keys (empty tensors) that v-prediction fine-tunes carry, as ComfyUI and A1111 read them:
# `v_pred` = the model predicts v; `ztsnr` (with `v_pred`) = trained on zero-terminal-SNR betas.
V_PRED_MARKER, ZERO_SNR_MARKER = "v_pred", "ztsnr"
# EDM models mark themselves too. Playground v2.5's files carry their latents' per-channel mean
# and std (`edm_mean`, `edm_std`), which diffusers' single-file loader reads with Playground's
# fixed EDM scheduler and VAE scaling (`playground_configs`). CosXL's (`edm_vpred.*`) say their
# noise range but not the rest of their scheduler: they load with a config folder only.
PLAYGROUND_MARKERS = ("edm_mean", "edm_std")
_COSXL_MARKERS = ("edm_vpred.sigma_max", "edm_vpred.sigma_min")
# Playground v2.5's scheduler and VAE scaling, as diffusers' single-file loader sets them.
PLAYGROUND_SCHEDULER = {
    "_class_name": "EDMDPMSolverMultistepScheduler", "algorithm_type": "dpmsolver++",
    "dynamic_thresholding_ratio": 0.995, "euler_at_final": False, "final_sigmas_type": "zero",
    "lower_order_final": True, "num_train_timesteps": 1000, "prediction_type": "epsilon",
    "rho": 7.0, "sample_max_value": 1.0, "sigma_data": 0.5, "sigma_max": 80.0,
    "sigma_min": 0.002, "solver_order": 2, "solver_type": "midpoint", "thresholding": False,
}
PLAYGROUND_VAE_SCALING = 0.5


def is_single_file(source: str) -> bool:
  """Whether `source` names a checkpoint file (by extension; a missing one errors on reading),
  local or on the hub (`owner/name/file.safetensors`, or its URL)."""
  name = source.split("?", 1)[0] if "://" in source else source
  return name.lower().endswith(EXTENSIONS) and not os.path.isdir(os.path.expanduser(source))


# -- reading ----------------------------------------------------------------------------------------
_SHARD = re.compile(r"-\d{5}-of-\d{5}\.safetensors$|\.index\.json$")


def read_single_file(path: str) -> dict[str, np.ndarray]:
  """The flat state dict of a `.safetensors` or (safely unpickled) `.ckpt`/`.pt`/`.bin` file."""
  path = os.path.expanduser(path)
  if _SHARD.search(path):
    raise SingleFileError(f"{path} is one shard of a sharded checkpoint; single-file loading "
                          "needs the whole model in one file (or use the diffusers folder)")
  if not os.path.isfile(path):
    raise SingleFileError(f"checkpoint file {path} does not exist")
  if path.lower().endswith(".safetensors"):
    return _normalize(read_safetensors(path, SingleFileError))
  if path.lower().endswith(PICKLE_EXTENSIONS):
    return _normalize(read_pickle(path))
  raise SingleFileError(f"{path}: unknown checkpoint extension (use one of {', '.join(EXTENSIONS)})")


_OLD_CLIP_PREFIX = "cond_stage_model.transformer."


def _normalize(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Files saved with transformers < 4.20 lack CLIP's `text_model.` level: add it."""
  old = (_OLD_CLIP_PREFIX + "embeddings.", _OLD_CLIP_PREFIX + "encoder.")
  if not any(k.startswith(old) for k in state):
    return state
  return {CLIP_PREFIX + k[len(_OLD_CLIP_PREFIX):]
          if k.startswith(_OLD_CLIP_PREFIX) and not k.startswith(CLIP_PREFIX) else k: v
          for k, v in state.items()}


# -- families ---------------------------------------------------------------------------------------
def _has_prefix(state: Mapping[str, object], prefix: str) -> bool:
  return any(k.startswith(prefix) for k in state)


def detect_family(state: Mapping[str, np.ndarray], name: str = "checkpoint") -> str:
  """"sd1", "sd2", "sdxl" or "sdxl_refiner" from the keys and shapes; any other model is a
  one-line error naming it.

  Reads only key names and the shape of the UNet's first conv.
  """
  conv_in = state.get(UNET_PREFIX + "input_blocks.0.0.weight")
  if conv_in is None:
    raise SingleFileError(f"{name} is not a Stable Diffusion single file: {_guess_kind(state)}")
  if _has_prefix(state, "embedder.") or _has_prefix(state, "noise_augmentor."):
    raise SingleFileError(f"{name} is a Stable unCLIP checkpoint, which sdjax does not support")
  if any(k in state for k in PLAYGROUND_MARKERS) and not _has_prefix(state, SDXL_OPENCLIP_PREFIX):
    raise SingleFileError(f"{name} carries Playground's EDM latent statistics (edm_mean) but is "
                          "not an SDXL-layout model, which Playground v2.5 is")
  channels = conv_in.shape[1]
  if channels not in (4, INPAINTING_CHANNELS, EDIT_CHANNELS, DEPTH_CHANNELS, UPSCALER_CHANNELS):
    raise SingleFileError(f"{name} is an unsupported model ({channels} UNet input channels); "
                          "sdjax supports text-to-image (4 channels), inpainting (9), "
                          "instruct-pix2pix (8), depth-to-image (5) and x4 upscaler (7) models")
  if _has_prefix(state, SDXL_OPENCLIP_PREFIX):
    return "sdxl"
  if _has_prefix(state, SDXL_REFINER_OPENCLIP_PREFIX):
    return "sdxl_refiner"
  if _has_prefix(state, OPENCLIP_PREFIX):
    return "sd2"
  if _has_prefix(state, CLIP_PREFIX):
    return "sd1"
  raise SingleFileError(f"{name} has a UNet but no known text encoder (cond_stage_model.*)")


def unet_in_channels(state: Mapping[str, np.ndarray]) -> int:
  """The UNet's input channels: 4, INPAINTING_CHANNELS for an inpainting model, EDIT_CHANNELS
  for an instruct-pix2pix one, DEPTH_CHANNELS for a depth-to-image one, UPSCALER_CHANNELS for
  the x4 upscaler."""
  return int(state[UNET_PREFIX + "input_blocks.0.0.weight"].shape[1])


def _guess_kind(state: Mapping[str, np.ndarray]) -> str:
  keys = list(state)
  if any(k.startswith(("encoder.", "decoder.")) for k in keys):
    return "it looks like a VAE file (pass it as vae=... / --vae)"
  if any("lora_" in k or ".lora" in k for k in keys):
    return "it looks like a LoRA file"
  if _has_prefix(state, "down_blocks.") or _has_prefix(state, "conv_in."):
    return "it looks like one diffusers component (use the diffusers folder)"
  return f"no {UNET_PREFIX}* UNet keys (first key: {keys[0] if keys else 'none'!r})"


# ModelSpec metadata (kohya's sd-scripts and Stability write it): modelspec.prediction_type.
_MODELSPEC_PREDICTION = {"epsilon": "epsilon", "v": "v_prediction"}


def read_metadata(path: str) -> dict[str, str]:
  """A single file's safetensors header metadata ({} for pickles and files without)."""
  path = os.path.expanduser(path)
  if not path.lower().endswith(".safetensors"):
    return {}
  return read_safetensors_metadata(path, SingleFileError)


def scheduler_markers(state: Mapping[str, object],
                      metadata: Mapping[str, str] | None = None) -> dict[str, Any]:
  """The scheduler settings a file states about itself: {} when it says nothing.

  The `v_pred` marker key (with `ztsnr`: zero-terminal-SNR betas), else the ModelSpec
  `modelspec.prediction_type` metadata ("epsilon" or "v").
  """
  if V_PRED_MARKER in state:
    return {"prediction_type": "v_prediction",
            **({"rescale_betas_zero_snr": True} if ZERO_SNR_MARKER in state else {})}
  spec = (metadata or {}).get("modelspec.prediction_type")
  if spec in _MODELSPEC_PREDICTION:
    return {"prediction_type": _MODELSPEC_PREDICTION[spec]}
  return {}


def cosxl_marker(state: Mapping[str, object]) -> str | None:
  """The first of CosXL's EDM v-prediction keys a file carries, or None."""
  return next((k for k in _COSXL_MARKERS if k in state), None)


def playground_configs(state: Mapping[str, np.ndarray],
                       name: str = "checkpoint") -> dict[str, dict[str, Any]] | None:
  """{"scheduler": config, "vae": overrides} of a Playground v2.5 file (its `edm_mean` /
  `edm_std` keys), as diffusers' single-file loader builds them: Playground's EDM DPM-Solver++
  scheduler, VAE scaling 0.5 and the file's latent statistics; None for other files."""
  if not any(k in state for k in PLAYGROUND_MARKERS):
    return None
  if not all(k in state for k in PLAYGROUND_MARKERS):
    raise SingleFileError(f"{name} has one of edm_mean / edm_std (Playground's latent "
                          "statistics) but not the other")
  stats = {k: np.asarray(state[k], np.float64).ravel() for k in PLAYGROUND_MARKERS}
  if any(len(v) != 4 or not np.all(np.isfinite(v)) for v in stats.values()):
    raise SingleFileError(f"{name}: edm_mean / edm_std must hold 4 finite numbers each (one per "
                          "latent channel)")
  return {"scheduler": dict(PLAYGROUND_SCHEDULER),
          "vae": {"scaling_factor": PLAYGROUND_VAE_SCALING,
                  "latents_mean": stats["edm_mean"].tolist(),
                  "latents_std": stats["edm_std"].tolist()}}


def markers_for(scheduler_config: Mapping[str, Any], dtype=np.float32,
                vae_config=None) -> dict[str, np.ndarray]:
  """The marker keys an exported file carries for a scheduler config (see `scheduler_markers`)
  and, for a Playground-style model (EDM DPM-Solver++, latent statistics), its `edm_mean` /
  `edm_std` (see `playground_configs`)."""
  mean = getattr(vae_config, "latents_mean", None)
  std = getattr(vae_config, "latents_std", None)
  if (scheduler_config.get("_class_name") == PLAYGROUND_SCHEDULER["_class_name"]
      and mean is not None and std is not None):
    return {"edm_mean": np.asarray(mean, dtype).reshape(1, -1, 1, 1),
            "edm_std": np.asarray(std, dtype).reshape(1, -1, 1, 1)}
  if scheduler_config.get("prediction_type") != "v_prediction":
    return {}
  keys = [V_PRED_MARKER] + ([ZERO_SNR_MARKER] if scheduler_config.get("rescale_betas_zero_snr")
                            else [])
  return {k: np.zeros((0,), dtype) for k in keys}


def standard_config_name(family: str, prediction_type: str | None,
                         inpainting: bool = False, upscaler: bool = False) -> str:
  """The built-in config for a family; SD2's 768-v and 512-base differ only in prediction type
  (an SD2 inpainting or depth file, as stable-diffusion-2-inpainting and 512-depth-ema, defaults
  to 512-base: `inpainting`); an x4 upscaler file (`upscaler`, 7 UNet input channels) is
  stable-diffusion-x4-upscaler's SD2 layout."""
  if upscaler:
    if family != "sd2":
      raise SingleFileError(f"there is no standard config of an {family} x4 upscaler (the "
                            "released one is SD2's): pass a config folder of it")
    return "sd2_x4_upscaler"
  if family.startswith("sdxl"):
    return family
  if family == "sd1":  # v-prediction SD1 fine-tunes: the same config, another prediction type
    return "sd1"
  if prediction_type is None and inpainting:
    return "sd2_512_base"
  if prediction_type in (None, "v_prediction"):
    return "sd2_768_v"
  if prediction_type == "epsilon":
    return "sd2_512_base"
  raise SingleFileError(f"unknown prediction_type {prediction_type!r} "
                        "(use epsilon or v_prediction)")


def config_family(text_configs: Mapping[str, object]) -> str:
  """The family a pipeline's text encoder configs describe: SDXL has a second encoder (the
  refiner only that one); SD2's OpenCLIP uses gelu, SD1's CLIP quick_gelu."""
  if "text_encoder_2" in text_configs:
    return "sdxl" if "text_encoder" in text_configs else "sdxl_refiner"
  return "sd2" if text_configs["text_encoder"].hidden_act == "gelu" else "sd1"


# -- key tables -------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Source:
  """Where a diffusers weight lives in the original file."""

  key: str
  part: int | None = None  # which third of a fused q/k/v tensor
  conv1x1: bool = False  # stored as a [O, I, 1, 1] conv where diffusers has a [O, I] linear
  transpose: bool = False  # OpenCLIP's text_projection is applied as x @ P, diffusers' as x @ W.T


_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v",
                  "to_out.0": "proj_out"}


def _unet_modules(cfg) -> dict[str, tuple[str, dict[str, str]]]:
  """diffusers module -> (original module, renames inside it), from the UNet's block structure.

  `input_blocks` / `output_blocks` number every resnet (with its attention) and every resampler
  in order.
  """
  levels = len(cfg.block_out_channels)
  layers = (tuple(cfg.layers_per_block) if isinstance(cfg.layers_per_block, list | tuple)
            else (cfg.layers_per_block,) * levels)
  m = {
      "conv_in": ("input_blocks.0.0", {}),
      "time_embedding.linear_1": ("time_embed.0", {}),
      "time_embedding.linear_2": ("time_embed.2", {}),
      "mid_block.resnets.0": ("middle_block.0", _UNET_RESNET),
      "mid_block.attentions.0": ("middle_block.1", {}),
      "mid_block.resnets.1": ("middle_block.2", _UNET_RESNET),
      "add_embedding.linear_1": ("label_emb.0.0", {}),  # SDXL
      "add_embedding.linear_2": ("label_emb.0.2", {}),
      "class_embedding": ("label_emb", {}),  # the x4 upscaler's noise-level classes
      "conv_norm_out": ("out.0", {}),
      "conv_out": ("out.2", {}),
  }
  k = 1  # input_blocks.0 is conv_in
  for i, kind in enumerate(cfg.down_block_types):
    for j in range(layers[i]):
      m[f"down_blocks.{i}.resnets.{j}"] = (f"input_blocks.{k}.0", _UNET_RESNET)
      if kind.startswith("CrossAttn"):
        m[f"down_blocks.{i}.attentions.{j}"] = (f"input_blocks.{k}.1", {})
      k += 1
    if i < levels - 1:
      m[f"down_blocks.{i}.downsamplers.0.conv"] = (f"input_blocks.{k}.0.op", {})
      k += 1
  k = 0
  for i, kind in enumerate(cfg.up_block_types):
    attention = kind.startswith("CrossAttn")
    for j in range(layers[levels - 1 - i] + 1):  # one more resnet per level on the way up
      m[f"up_blocks.{i}.resnets.{j}"] = (f"output_blocks.{k}.0", _UNET_RESNET)
      if attention:
        m[f"up_blocks.{i}.attentions.{j}"] = (f"output_blocks.{k}.1", {})
      k += 1
    if i < levels - 1:  # the upsampler sits in the level's last output block
      m[f"up_blocks.{i}.upsamplers.0.conv"] = (f"output_blocks.{k - 1}.{2 if attention else 1}.conv",
                                               {})
  return m


def _vae_modules(cfg) -> dict[str, tuple[str, dict[str, str]]]:
  """As `_unet_modules` for the VAE; the decoder's `up` list runs in reverse order."""
  n = len(cfg.block_out_channels)
  m = {}
  for part in ("encoder", "decoder"):
    m[f"{part}.conv_norm_out"] = (f"{part}.norm_out", {})
    m[f"{part}.mid_block.resnets.0"] = (f"{part}.mid.block_1", _VAE_RESNET)
    m[f"{part}.mid_block.attentions.0"] = (f"{part}.mid.attn_1", _VAE_ATTENTION)
    m[f"{part}.mid_block.resnets.1"] = (f"{part}.mid.block_2", _VAE_RESNET)
  for i in range(n):
    for j in range(cfg.layers_per_block):
      m[f"encoder.down_blocks.{i}.resnets.{j}"] = (f"encoder.down.{i}.block.{j}", _VAE_RESNET)
    m[f"encoder.down_blocks.{i}.downsamplers.0.conv"] = (f"encoder.down.{i}.downsample.conv", {})
    for j in range(cfg.layers_per_block + 1):
      m[f"decoder.up_blocks.{i}.resnets.{j}"] = (f"decoder.up.{n - 1 - i}.block.{j}", _VAE_RESNET)
    m[f"decoder.up_blocks.{i}.upsamplers.0.conv"] = (f"decoder.up.{n - 1 - i}.upsample.conv", {})
  return m


def _rename(key: str, modules: dict[str, tuple[str, dict[str, str]]], passthrough: bool) -> str:
  """A diffusers key -> its original key, by the longest module prefix in `modules`."""
  parts = key.split(".")
  for cut in range(len(parts) - 1, 0, -1):
    module = ".".join(parts[:cut])
    if module in modules:
      original, inner = modules[module]
      rest = ".".join(parts[cut:])
      for old, new in inner.items():
        if rest.startswith(old + "."):
          rest = new + rest[len(old):]
          break
      return f"{original}.{rest}"
  if passthrough:
    return key
  raise SingleFileError(f"no original-layout name for {key!r} (unsupported architecture)")


def unet_table(cfg, keys) -> dict[str, Source]:
  modules = _unet_modules(cfg)
  return {k: Source(UNET_PREFIX + _rename(k, modules, passthrough=False)) for k in keys}


def vae_table(cfg, keys, prefix: str = VAE_PREFIX) -> dict[str, Source]:
  modules = _vae_modules(cfg)
  out = {}
  for k in keys:
    original = _rename(k, modules, passthrough=True)
    out[k] = Source(prefix + original, conv1x1=".mid.attn_1." in original and k.endswith("weight")
                    and "group_norm" not in k)
  return out


_OPENCLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
                   "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
_OPENCLIP_TOP = {"embeddings.token_embedding.weight": "token_embedding.weight",
                 "embeddings.position_embedding.weight": "positional_embedding",
                 "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias"}
_QKV = re.compile(r"^encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)$")
_LAYER = re.compile(r"^encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$")


def _openclip_source(key: str, prefix: str) -> Source:
  if key in _OPENCLIP_TOP:
    return Source(prefix + _OPENCLIP_TOP[key])
  if key == "text_projection.weight":
    return Source(prefix + "text_projection", transpose=True)
  if m := _QKV.match(key):
    layer, which, leaf = m.groups()
    return Source(f"{prefix}transformer.resblocks.{layer}.attn.in_proj_{leaf}",
                  part="qkv".index(which))
  if (m := _LAYER.match(key)) and m.group(2) in _OPENCLIP_LAYER:
    layer, module, leaf = m.groups()
    return Source(f"{prefix}transformer.resblocks.{layer}.{_OPENCLIP_LAYER[module]}.{leaf}")
  raise SingleFileError(f"no OpenCLIP name for text encoder key {key!r}")


# family -> text encoder component -> (layout, key prefix in the file)
TEXT_ENCODERS = {
    "sd1": {"text_encoder": ("clip", CLIP_PREFIX)},
    "sd2": {"text_encoder": ("openclip", OPENCLIP_PREFIX)},
    "sdxl": {"text_encoder": ("clip", SDXL_CLIP_PREFIX),
             "text_encoder_2": ("openclip", SDXL_OPENCLIP_PREFIX)},
    "sdxl_refiner": {"text_encoder_2": ("openclip", SDXL_REFINER_OPENCLIP_PREFIX)},
}


def text_table(family: str, keys, component: str = "text_encoder") -> dict[str, Source]:
  """Text encoder keys (transformers' names without `text_model.`) -> their original sources."""
  if component not in TEXT_ENCODERS[family]:
    raise SingleFileError(f"{family} single files have no {component}")
  layout, prefix = TEXT_ENCODERS[family][component]
  if layout == "openclip":
    return {k: _openclip_source(k, prefix) for k in keys}
  return {k: Source(prefix + k) for k in keys}


# -- ControlNets ------------------------------------------------------------------------------------
# lllyasviel's ControlNet files (1.0 / 1.1 `.pth`, the A1111 extension's `.safetensors`) hold the
# network under `control_model.` (1.0 files beside a whole SD model), or bare (thibaud's SD2 ones):
# the UNet's down path and mid block in its layout, plus `input_hint_block` (the control image's
# conv net: convs at even indices, SiLUs between), `zero_convs.N.0` and `middle_block_out.0`.
CONTROLNET_PREFIX = "control_model."
_HINT_CONV_IN = "input_hint_block.0.weight"
DIFFUSERS_CONTROLNET_KEY = "controlnet_cond_embedding.conv_in.weight"
_CONTROLNET_FAMILIES = {768: "sd1", 1024: "sd2"}  # the text context width; SDXL has label_emb


def controlnet_prefix(state: Mapping[str, np.ndarray], name: str) -> str | None:
  """Where a ControlNet file keeps its weights: None for diffusers' layout (one component's
  `diffusion_pytorch_model` in a file), else the original layout's prefix (maybe "")."""
  if DIFFUSERS_CONTROLNET_KEY in state:
    return None
  if CONTROL_LORA_MARKER in state:
    raise SingleFileError(f"{name} is a Control-LoRA: it is made from the model it steers "
                          "(load_controlnet(path, base=pipe); main.py does this)")
  for prefix in (CONTROLNET_PREFIX, ""):
    if prefix + _HINT_CONV_IN in state:
      return prefix
  if _has_prefix(state, UNET_PREFIX):
    kind = "a Stable Diffusion checkpoint (load it as the model)"
  else:
    kind = f"no ControlNet keys (first key: {next(iter(state), 'none')!r})"
  raise SingleFileError(f"{name} is not a ControlNet file: {kind}")


def _controlnet_key(prefix: str | None, diffusers: str, original: str) -> str:
  return diffusers if prefix is None else prefix + original


def controlnet_config(state: Mapping[str, np.ndarray], prefix: str | None,
                      name: str) -> dict[str, Any]:
  """A ControlNet file's diffusers config, without one at hand: its family's standard UNet
  config (SD1 / SD2 / SDXL, told by the cross-attention width and SDXL's added embedding) with the
  control image's channels and conv widths read from the weights."""
  inside = [k for k in state if prefix is None or k.startswith(prefix)]
  if _controlnet_key(prefix, "add_embedding.linear_1.weight", "label_emb.0.0.weight") in state:
    family = "sdxl"
  else:
    widths = {int(state[k].shape[1]) for k in inside if k.endswith("attn2.to_k.weight")}
    families = {_CONTROLNET_FAMILIES.get(w) for w in widths}
    if len(families) != 1 or None in families:
      raise SingleFileError(f"{name}: cannot tell the model family of this ControlNet (text "
                            f"context widths {sorted(widths)}); pass its diffusers config")
    family = families.pop()
  raw = dict(standard.standard_config("sd2_768_v" if family == "sd2" else family)["unet"])
  if prefix is None:
    convs = [DIFFUSERS_CONTROLNET_KEY, *_leading(
        state, (f"controlnet_cond_embedding.blocks.{i}.weight" for i in itertools.count()))]
  else:  # the last one is conv_out
    convs = _leading(state, (f"{prefix}input_hint_block.{2 * i}.weight"
                             for i in itertools.count()))[:-1]
  # conv_in, then per level a same-width conv and a stride-2 one to the next width.
  raw["conditioning_channels"] = int(state[convs[0]].shape[1])
  raw["conditioning_embedding_out_channels"] = [int(state[k].shape[0]) for k in convs[::2]]
  if is_shuffle_file(name):
    raw["global_pool_conditions"] = True
  if prefix is None and UNION_TASK_KEY in state:
    raw.update(_union_options(state))
  return raw


# A ControlNet union's (ControlNet++) own weights, in diffusers' layout (xinsir's files are).
UNION_TASK_KEY = "task_embedding"
# Its fusing transformer's head count, which its weights do not show: diffusers' default, the
# value of xinsir's models.
UNION_HEADS = 8


def _union_options(state: Mapping[str, np.ndarray]) -> dict[str, Any]:
  """A ControlNet union file's own config options, read from its weights."""
  types, width = (int(n) for n in state[UNION_TASK_KEY].shape)
  layers = _leading(state, (f"transformer_layes.{i}.ln_1.weight" for i in itertools.count()))
  return {"_class_name": "ControlNetUnionModel", "num_control_type": types,
          "num_trans_channel": width, "num_trans_head": UNION_HEADS,
          "num_trans_layer": len(layers),
          "num_proj_channel": int(state["spatial_ch_projs.weight"].shape[0])}


def is_shuffle_file(name: str) -> bool:
  """Whether a ControlNet file is the shuffle model (`control_v11e_sd15_shuffle.pth`), whose
  pooled conditions its weights do not show: ComfyUI's rule, the name's stem ending in
  `_shuffle` (or `_shuffle_fp16`)."""
  stem = os.path.splitext(os.path.basename(name.split("?", 1)[0]))[0]
  return stem.endswith(("_shuffle", "_shuffle_fp16"))


def _leading(state: Mapping[str, object], keys: Iterable[str]) -> list[str]:
  """The keys of `keys` up to the first that `state` lacks."""
  return list(itertools.takewhile(lambda k: k in state, keys))


def _controlnet_modules(cfg) -> dict[str, tuple[str, dict[str, str]]]:
  """As `_unet_modules`, for a ControlNet: the UNet's down path and mid block, and its own."""
  m = {k: v for k, v in _unet_modules(cfg).items()
       if not k.startswith(("up_blocks.", "conv_norm_out", "conv_out"))}
  n = len(cfg.conditioning_embedding_out_channels)
  m["controlnet_cond_embedding.conv_in"] = ("input_hint_block.0", {})
  for i in range(2 * (n - 1)):
    m[f"controlnet_cond_embedding.blocks.{i}"] = (f"input_hint_block.{2 * (i + 1)}", {})
  m["controlnet_cond_embedding.conv_out"] = (f"input_hint_block.{2 * (2 * n - 1)}", {})
  for i in range(len(cfg.skip_channels)):
    m[f"controlnet_down_blocks.{i}"] = (f"zero_convs.{i}.0", {})
  m["controlnet_mid_block"] = ("middle_block_out.0", {})
  return m


def controlnet_table(cfg, keys, prefix: str = CONTROLNET_PREFIX) -> dict[str, Source]:
  modules = _controlnet_modules(cfg)
  return {k: Source(prefix + _rename(k, modules, passthrough=False)) for k in keys}


def controlnet_state(state: Mapping[str, np.ndarray], prefix: str | None, cfg, keys,
                     name: str) -> dict[str, np.ndarray]:
  """A ControlNet file's diffusers-layout state dict; in the original layout every key under
  `prefix` must be used (a 1.0 file's SD model beside it is not read)."""
  if prefix is None:
    return dict(state)
  used: set[str] = set()
  out = gather(state, controlnet_table(cfg, keys, prefix), name, used)
  check_all_used(state, used, name, lambda k: not k.startswith(prefix))
  return out


# -- Control-LoRA -----------------------------------------------------------------------------------
# Stability AI's Control-LoRAs (control-lora-canny-rank128.safetensors, ...) store a ControlNet
# as the difference from the UNet it steers: the original layout without prefix, its own parts
# (the control image's embedding, the zero convolutions) and every norm and bias in full, each
# convolution and linear weight the UNet shares as a low-rank pair `<key>.up` [O, r(, 1, 1)] and
# `<key>.down` [r, I(, kh, kw)], and a `lora_controlnet` marker. As ComfyUI builds it: the UNet's
# weight plus up @ down, or the file's own; a weight the file leaves out is the UNet's.
CONTROL_LORA_MARKER = "lora_controlnet"


def control_lora_config(state: Mapping[str, np.ndarray], unet_config: dict[str, Any],
                        name: str) -> dict[str, Any]:
  """A Control-LoRA's diffusers ControlNet config: the base UNet's, with the control image's
  channels and embedding widths read from the file."""
  convs = _leading(state, (f"input_hint_block.{2 * i}.weight" for i in itertools.count()))[:-1]
  if not convs:
    raise SingleFileError(f"{name}: a Control-LoRA without its control image embedding")
  raw = {k: v for k, v in unet_config.items() if k not in ("out_channels", "up_block_types")}
  raw["conditioning_channels"] = int(state[convs[0]].shape[1])
  raw["conditioning_embedding_out_channels"] = [int(state[k].shape[0]) for k in convs[::2]]
  return raw


def control_lora_state(state: Mapping[str, np.ndarray], cfg, keys,
                       unet_state: Mapping[str, np.ndarray], name: str) -> dict[str, np.ndarray]:
  """A Control-LoRA's ControlNet as a diffusers-layout state dict, from the base UNet's
  (`unet_state`, diffusers layout): every key of the file used."""
  out, used = {}, {CONTROL_LORA_MARKER}
  for key, src in controlnet_table(cfg, keys, prefix="").items():
    stem = src.key.removesuffix(".weight")
    if src.key in state:
      out.update(gather(state, {key: src}, name, used))
    elif src.key.endswith(".weight") and f"{stem}.up" in state and f"{stem}.down" in state:
      if key not in unet_state:
        raise SingleFileError(f"{name}: a low-rank {stem} where the base UNet has no {key}")
      up, down = (np.asarray(state[f"{stem}.{part}"], np.float32) for part in ("up", "down"))
      base = np.asarray(unet_state[key], np.float32)
      delta = up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)
      if delta.size != base.size:
        raise SingleFileError(f"{name}: {stem}.up @ .down has shape {delta.shape}, the base "
                              f"UNet's {key} {base.shape}")
      out[key] = base + delta.reshape(base.shape)
      used.update((f"{stem}.up", f"{stem}.down"))
    elif key in unet_state:
      out[key] = unet_state[key]
    else:
      raise SingleFileError(f"{name} is missing key {src.key!r} (for {key})")
  check_all_used(state, used, name)
  return out


# -- T2I-Adapters ------------------------------------------------------------------------------------
# TencentARC's original layout numbers the full adapter's resnets along one list (`body.<level *
# num_res_blocks + k>`, the level's 1x1 `in_conv` on its first) and nests the light adapter's
# (`body.<level>.body.<k>`); files of diffusers' layout (the SDXL adapters A1111 users download)
# are one `T2IAdapter` component. SD1 adapters have 4 levels and unshuffle by 8, SDXL's by 16
# (ComfyUI tells them apart the same way): a file's config is read from its weights on those
# grounds (`config=` for any other).
ADAPTER_LAYOUTS = ("diffusers", "original", "original_light")


def adapter_layout(state: Mapping[str, np.ndarray]) -> str | None:
  """Which T2I-Adapter layout a file's keys are in (`ADAPTER_LAYOUTS`), or None (not one)."""
  if "adapter.conv_in.weight" in state or "adapter.body.0.in_conv.weight" in state:
    return "diffusers"
  if "conv_in.weight" in state and "body.0.block1.weight" in state:
    return "original"
  if "body.0.in_conv.weight" in state and "body.0.body.0.block1.weight" in state:
    return "original_light"
  return None


def _adapter_levels(state, layout: str) -> list[tuple[str, list[str]]]:
  """Per level of a light adapter (any layout) or a diffusers-layout full one: (its key prefix,
  its resnets' prefixes)."""
  body, nested = ("adapter.body.", "resnets.") if layout == "diffusers" else ("body.", "body.")
  levels = []
  for i in itertools.count():
    resnets = _leading(state, (f"{body}{i}.{nested}{k}.block1.weight" for k in itertools.count()))
    if not resnets:
      return levels
    levels.append((f"{body}{i}.", [r.removesuffix("block1.weight") for r in resnets]))


def adapter_config(state: Mapping[str, np.ndarray], layout: str, name: str) -> dict[str, Any]:
  """A T2I-Adapter file's diffusers config, read from its weights."""
  light = layout == "original_light" or "adapter.body.0.out_conv.weight" in state
  if light:
    levels = _adapter_levels(state, layout)
    first = state[levels[0][0] + "in_conv.weight"]
    channels = [int(state[p + "out_conv.weight"].shape[0]) for p, _ in levels[:-1]]
    return {"_class_name": "T2IAdapter", "adapter_type": "light_adapter",
            "in_channels": int(first.shape[1]) // 64, "channels": channels,
            "num_res_blocks": len(levels[0][1]), "downscale_factor": 8}
  if layout == "original":
    blocks = _leading(state, (f"body.{i}.block1.weight" for i in itertools.count()))
    if len(blocks) % 4:
      raise SingleFileError(f"{name}: a T2I-Adapter of {len(blocks)} resnets is not 4 levels; "
                            "pass its diffusers config")
    per = len(blocks) // 4
    channels = [int(state[blocks[level * per]].shape[0]) for level in range(4)]
    conv_in = state["conv_in.weight"]
  else:
    levels = _adapter_levels(state, layout)
    per = len(levels[0][1])
    channels = [int(state[resnets[0] + "block1.weight"].shape[0]) for _, resnets in levels]
    conv_in = state["adapter.conv_in.weight"]
  inputs = int(conv_in.shape[1])  # in_channels x downscale_factor^2
  kind, factor = (("full_adapter_xl", 16) if inputs in (256, 768)
                  else ("full_adapter", 8) if inputs in (64, 192) else (None, None))
  if kind is None:
    raise SingleFileError(f"{name}: cannot tell this T2I-Adapter's input (conv_in takes "
                          f"{inputs} channels); pass its diffusers config")
  return {"_class_name": "T2IAdapter", "adapter_type": kind, "channels": channels,
          "in_channels": inputs // factor ** 2, "num_res_blocks": per,
          "downscale_factor": factor}


def adapter_state(state: Mapping[str, np.ndarray], layout: str, cfg, keys,
                  name: str) -> dict[str, np.ndarray]:
  """A T2I-Adapter file's diffusers-layout state dict (every key of the file used)."""
  if layout == "diffusers":
    return dict(state)
  table = {}
  for key in keys:
    m = re.fullmatch(r"adapter\.(conv_in|body\.(\d+)\.(in_conv|out_conv|resnets\.(\d+)\.(block\d)))"
                     r"\.(weight|bias)", key)
    if m is None:
      raise SingleFileError(f"{name}: no original T2I-Adapter key for {key}")
    whole, level, part, resnet, block, leaf = m.groups()
    if whole == "conv_in":
      original = "conv_in"
    elif layout == "original_light":
      original = (f"body.{level}.{part}" if resnet is None else
                  f"body.{level}.body.{resnet}.{block}")
    else:  # one list of resnets: the level's first holds its in_conv
      first = int(level) * cfg.num_res_blocks
      original = (f"body.{first}.in_conv" if resnet is None else
                  f"body.{first + int(resnet)}.{block}")
    table[key] = Source(f"{original}.{leaf}")
  used: set[str] = set()
  out = gather(state, table, name, used)
  check_all_used(state, used, name)
  return out


# -- original file -> diffusers-layout component state dicts ----------------------------------------
def gather(state: Mapping[str, np.ndarray], table: Mapping[str, Source], name: str,
           used: set[str]) -> dict[str, np.ndarray]:
  """The diffusers-layout state dict `table` describes, taken from original-layout `state`."""
  out = {}
  for key, src in table.items():
    if src.key not in state:
      raise SingleFileError(f"{name} is missing key {src.key!r} (for {key})")
    value = state[src.key]
    if src.part is not None:
      if value.shape[0] % 3:
        raise SingleFileError(f"{name}: fused q/k/v {src.key!r} has shape {value.shape}")
      third = value.shape[0] // 3
      value = value[src.part * third:(src.part + 1) * third]
    if src.conv1x1 and value.ndim == 4:
      if value.shape[2:] != (1, 1):
        raise SingleFileError(f"{name}: {src.key!r} has shape {value.shape}, expected a 1x1 conv")
      value = value[:, :, 0, 0]
    if src.transpose:
      value = value.T
    out[key] = value
    used.add(src.key)
  return out


def check_all_used(state: Mapping[str, np.ndarray], used: set[str], name: str,
                   ignore: Callable[[str], bool] = lambda k: False) -> None:
  """Fails on the first key the model does not use, unless it is known non-weight content."""
  unused = sorted(k for k in state if k not in used and not _IGNORED.search(k) and not ignore(k))
  if unused:
    raise SingleFileError(f"{name} has key {unused[0]!r} that the model does not use "
                          f"({len(unused)} unknown keys): wrong config or unsupported variant")


def extra_openclip_block(num_layers: int) -> Callable[[str], bool]:
  """Real SD2 files carry one resblock more than the penultimate-layer encoder uses: skip it."""
  prefix = f"{OPENCLIP_PREFIX}transformer.resblocks.{num_layers}."
  return lambda k: k.startswith(prefix)


# -- diffusers-layout component state dicts -> original file ----------------------------------------
def scatter(state: Mapping[str, np.ndarray], table: Mapping[str, Source]) -> dict[str, np.ndarray]:
  """The inverse of `gather`: fused q/k/v are concatenated, 1x1 convs get their kernel dims."""
  out, fused = {}, {}
  for key, value in state.items():
    src = table[key]
    if src.part is not None:
      fused.setdefault(src.key, [None] * 3)[src.part] = value
      continue
    if src.transpose:
      value = np.ascontiguousarray(value.T)  # safetensors writes raw buffers: no strided views
    out[src.key] = value[:, :, None, None] if src.conv1x1 and value.ndim == 2 else value
  for key, parts in fused.items():
    if any(p is None for p in parts):
      raise SingleFileError(f"cannot export {key}: q, k and v are not all present")
    out[key] = np.concatenate(parts, axis=0)
  return out


# -- whole files ------------------------------------------------------------------------------------
def split_state(state: Mapping[str, np.ndarray], family: str, unet_cfg, text_cfg, vae_cfg,
                keys: Mapping[str, list[str]], name: str) -> dict[str, dict[str, np.ndarray]]:
  """Original-layout `state` -> diffusers-layout state dicts of the components in `keys`.

  Every key of the file must be used, except the known non-weights (`_IGNORED`) and SD2's
  unused last text resblock; a UNet-less VAE swap may leave `first_stage_model.*` unused.
  """
  used: set[str] = set()
  out = {comp: gather(state, _table(comp, family, unet_cfg, vae_cfg, comp_keys), name, used)
         for comp, comp_keys in keys.items()}
  skip_block = (extra_openclip_block(text_cfg.num_hidden_layers) if family == "sd2"
                else lambda k: False)
  replaced_vae = "vae" not in keys
  check_all_used(state, used, name,
                 lambda k: skip_block(k) or (replaced_vae and k.startswith(VAE_PREFIX)))
  return out


def read_vae_file(path: str, cfg, expected) -> dict[str, np.ndarray]:
  """A single VAE file (original layout, optionally under `first_stage_model.`, or diffusers
  layout) -> the diffusers-layout VAE state dict."""
  from flax import traverse_util  # noqa: PLC0415

  from sdjax.checkpoints.weights import torch_key  # noqa: PLC0415

  state = read_single_file(path)
  if any(".down_blocks." in k or ".up_blocks." in k or ".mid_block." in k for k in state):
    return dict(state)  # already diffusers layout
  prefix = VAE_PREFIX if _has_prefix(state, VAE_PREFIX) else ""
  if not _has_prefix(state, prefix + "encoder.") and not _has_prefix(state, prefix + "decoder."):
    raise SingleFileError(f"{path} is not a VAE file (no encoder.* / decoder.* keys)")
  keys = [torch_key(p) for p in traverse_util.flatten_dict(expected)]
  used: set[str] = set()
  out = gather(state, vae_table(cfg, keys, prefix), path, used)
  check_all_used(state, used, path, lambda k: bool(prefix) and not k.startswith(prefix))
  return out


def _table(component: str, family: str, unet_cfg, vae_cfg, keys) -> dict[str, Source]:
  if component == "unet":
    return unet_table(unet_cfg, keys)
  if component == "vae":
    return vae_table(vae_cfg, keys)
  return text_table(family, keys, component)


def to_original(family: str, unet_cfg, vae_cfg, states: Mapping[str, Mapping[str, np.ndarray]]
                ) -> dict[str, np.ndarray]:
  """diffusers-layout component state dicts (unet, vae, text_encoder[_2]) -> one
  original-layout state dict (for export)."""
  out = {}
  for component, state in states.items():
    out.update(scatter(state, _table(component, family, unet_cfg, vae_cfg, state)))
  return out
