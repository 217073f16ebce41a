"""IP-Adapter files (Tencent AI Lab's `ip-adapter*.bin` / `.safetensors`) and their image encoders.

A file holds two parts: `image_proj` (the projection of CLIP image features to tokens; its keys
tell which kind, see `models.ip_adapter`) and `ip_adapter` (per cross-attention layer of the
UNet, `<n>.to_k_ip.weight` and `<n>.to_v_ip.weight`, numbered 1, 3, 5, ... over the UNet's
attention layers in diffusers' module order: down blocks, up blocks, then the mid block). The
`.bin` files nest the two parts as dicts; `.safetensors` ones prefix the keys `image_proj.` and
`ip_adapter.`. The image encoder is a transformers `CLIPVisionModelWithProjection` folder
(`image_encoder/` beside the files in h94/IP-Adapter), or one file of its weights as A1111 and
ComfyUI keep them (`clip_vision/*.safetensors`), whose architecture its weights show.
"""

from __future__ import annotations

import os
import re
from typing import Any

import numpy as np

from sdjax.checkpoints import safe_pickle
from sdjax.checkpoints.weights import WeightsError, read_safetensors
from sdjax.models.ip_adapter import IPAdapterConfig

PARTS = ("image_proj", "ip_adapter")
_LAYER_KEY = re.compile(r"^(\d+)\.to_([kv])_ip\.weight$")
_PLUS_LAYER = re.compile(r"^layers\.(\d+)\.(\d)\.(.+)$")
_PLUS_RENAMES = {"0.norm1": "ln0", "0.norm2": "ln1", "0.to_q": "to_q", "0.to_out": "to_out.0",
                 "1.0": "ff_norm", "1.1": "ff_in", "1.3": "ff_out"}
_FULL_RENAMES = {"proj.0": "ff_in", "proj.2": "ff_out", "proj.3": "norm"}


def read_file(path: str) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
  """(image_proj state, ip_adapter state) of an IP-Adapter file (pickles read safely)."""
  if not os.path.isfile(path):
    raise WeightsError(f"IP-Adapter file {path} does not exist")
  if path.lower().endswith(".safetensors"):
    flat = read_safetensors(path)
  else:
    try:
      obj = safe_pickle.load(path)
    except safe_pickle.UnsafePickleError as e:
      raise WeightsError(str(e)) from None
    if not isinstance(obj, dict):
      raise WeightsError(f"{path} does not hold an IP-Adapter (found {type(obj).__name__})")
    flat = {}
    for part, value in obj.items():
      if isinstance(value, dict):
        flat.update({f"{part}.{k}": v for k, v in value.items()})
  parts = {part: {k[len(part) + 1:]: np.asarray(v) for k, v in flat.items()
                  if k.startswith(part + ".")} for part in PARTS}
  if not all(parts.values()):
    first = next(iter(flat), "none")
    raise WeightsError(f"{path} is not an IP-Adapter file (it needs image_proj and ip_adapter "
                       f"weights; first key: {first!r})")
  return parts["image_proj"], parts["ip_adapter"]


def projection_config(state: dict[str, np.ndarray], encoder_tokens: int) -> IPAdapterConfig:
  """The image projection's shape from its weights (`encoder_tokens`: the image encoder's
  tokens, which a "full" projection keeps)."""
  if "proj.weight" in state and "norm.weight" in state:
    width = state["norm.weight"].shape[0]
    return IPAdapterConfig("image", state["proj.weight"].shape[1], width,
                           state["proj.weight"].shape[0] // width)
  if "proj.3.weight" in state:
    return IPAdapterConfig("full", state["proj.0.weight"].shape[1],
                           state["proj.3.weight"].shape[0], encoder_tokens)
  if "latents" in state and "layers.0.0.to_q.weight" in state:
    latents = state["latents"]
    depth = 1 + max(int(m.group(1)) for k in state if (m := _PLUS_LAYER.match(k)))
    return IPAdapterConfig("plus", state["proj_in.weight"].shape[1],
                           state["proj_out.weight"].shape[0], latents.shape[1],
                           hidden_dims=latents.shape[2], depth=depth,
                           heads=state["layers.0.0.to_q.weight"].shape[0] // 64,
                           ff_dim=state["layers.0.1.1.weight"].shape[0])
  if any(k.startswith("perceiver_resampler.") for k in state) or "norm.weight" in state:
    raise WeightsError("this is a FaceID IP-Adapter: it conditions on insightface face "
                       "embeddings, which sdjax does not make; use a CLIP-image IP-Adapter")
  raise WeightsError(f"unknown IP-Adapter image projection (keys: {', '.join(sorted(state)[:4])})")


def projection_state(state: dict[str, np.ndarray], cfg: IPAdapterConfig) -> dict[str, Any]:
  """The projection's weights under the names of `models.ip_adapter.ImageProjection`'s params
  (PyTorch layout; `weights.torch_to_flax` converts them)."""
  if cfg.kind == "image":
    return dict(state)
  out = {}
  for key, value in state.items():
    if cfg.kind == "full":
      stem, _, leaf = key.rpartition(".")
      out[f"{_FULL_RENAMES.get(stem, stem)}.{leaf}"] = value
      continue
    m = _PLUS_LAYER.match(key)
    if m is None:
      out[key] = value
      continue
    i, rest = m.group(1), f"{m.group(2)}.{m.group(3)}"
    if rest == "0.to_kv.weight":
      k, v = np.split(value, 2, axis=0)
      out[f"layers.{i}.to_k.weight"], out[f"layers.{i}.to_v.weight"] = k, v
      continue
    stem, _, leaf = rest.rpartition(".")
    out[f"layers.{i}.{_PLUS_RENAMES.get(stem, stem)}.{leaf}"] = value
  return out


def cross_attention_paths(unet_params) -> list[tuple[str, ...]]:
  """The UNet's cross-attention layers (param paths ending in `attn2`) in diffusers' module
  order, which numbers an IP-Adapter's layers: down blocks, up blocks, then the mid block."""
  paths = []

  def walk(tree, path):
    for name, sub in tree.items():
      if name == "attn2":
        paths.append(path + (name,))
      elif isinstance(sub, dict):
        walk(sub, path + (name,))

  walk(unet_params, ())
  section = {"down_blocks": 0, "up_blocks": 1, "mid_block": 2}

  def order(path):
    head = re.match(r"^(down_blocks|up_blocks|mid_block)(?:_(\d+))?$", path[0])
    numbers = [int(n) for part in path[1:] for n in re.findall(r"_(\d+)$", part)]
    return (section[head.group(1)], int(head.group(2) or 0), *numbers)

  return sorted(paths, key=order)


def layer_kernels(state: dict[str, np.ndarray], dtype) -> dict[int, tuple[np.ndarray, ...]]:
  """The per-layer weights by layer number: {n: (to_k_ip kernel, to_v_ip kernel)} in Flax
  layout (in, out); `cross_attention_paths` says which UNet layer each number is."""
  unknown = [k for k in state if not _LAYER_KEY.match(k)]
  if unknown:
    raise WeightsError(f"IP-Adapter layer weights have key {unknown[0]!r}, not <n>.to_k_ip.weight")
  out = {}
  for n in sorted({int(_LAYER_KEY.match(k).group(1)) for k in state}):
    pair = []
    for kind in "kv":
      key = f"{n}.to_{kind}_ip.weight"
      if key not in state or state[key].ndim != 2:
        raise WeightsError(f"the IP-Adapter's key {key!r} is missing or not a linear weight")
      pair.append(np.ascontiguousarray(state[key].T, dtype))
    out[n] = tuple(pair)
  return out


# CLIP vision encoders by width (A1111 / ComfyUI clip_vision files carry no config): heads and
# activation of OpenAI's ViT-L/14 and OpenCLIP's ViT-H/14 and ViT-bigG/14, which IP-Adapters use.
_VISION_BY_WIDTH = {768: (12, "quick_gelu"), 1024: (16, "quick_gelu"), 1280: (16, "gelu"),
                    1664: (16, "gelu")}
VISION_PREFIX = "vision_model."


def vision_config(state: dict[str, np.ndarray], path: str) -> dict[str, Any]:
  """transformers' CLIPVisionConfig of an image encoder's weights (one file, no config)."""
  p = VISION_PREFIX
  try:
    patch = state[p + "embeddings.patch_embedding.weight"]
    positions = state[p + "embeddings.position_embedding.weight"].shape[0]
    projection = state["visual_projection.weight"]
  except KeyError as e:
    raise WeightsError(f"{path} is not a CLIP image encoder (no {e.args[0]!r})") from None
  width = patch.shape[0]
  if width not in _VISION_BY_WIDTH:
    raise WeightsError(f"{path}: a CLIP image encoder of width {width} is not one sdjax knows "
                       "(ViT-L/H/bigG); use its folder with config.json")
  heads, act = _VISION_BY_WIDTH[width]
  side = int(round((positions - 1) ** 0.5)) * patch.shape[-1]
  layers = 1 + max(int(m.group(1)) for k in state
                   if (m := re.match(rf"^{re.escape(p)}encoder\.layers\.(\d+)\.", k)))
  return {"model_type": "clip_vision_model", "hidden_size": width,
          "intermediate_size": state[p + "encoder.layers.0.mlp.fc1.weight"].shape[0],
          "num_hidden_layers": layers, "num_attention_heads": heads,
          "num_channels": patch.shape[1], "image_size": side, "patch_size": patch.shape[-1],
          "hidden_act": act, "projection_dim": projection.shape[0]}


def vision_state(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """An image encoder's weights with transformers' `vision_model.` level removed (sdjax's
  params start below it; `visual_projection` sits beside it); a whole CLIP model's text half
  (`text_model.`, `text_projection`, `logit_scale`) left out."""
  return {k[len(VISION_PREFIX):] if k.startswith(VISION_PREFIX) else k: v
          for k, v in state.items()
          if not k.startswith(("text_model.", "text_projection.", "logit_scale"))}
