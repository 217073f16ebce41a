"""Weight conversion between PyTorch-layout state dicts and sdjax's Flax params, both ways.

The mapping is explicit and per layer: a Flax path names its PyTorch key by a fixed rename
(`resnets_0` <-> `resnets.0` for the list containers below; `kernel`/`scale`/`embedding` <->
`weight`), and each leaf kind has one layout rule (conv OIHW <-> HWIO, linear (out, in) <->
(in, out)). Conversion is strict: the result must equal the model's expected tree key for key and
shape for shape, or a `WeightsError` names the first offending key.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import re
import struct
from collections.abc import Mapping
from typing import Any

import ml_dtypes
import numpy as np
from flax import traverse_util


class WeightsError(ValueError):
  """Missing, corrupt or mismatched checkpoint weights."""


# diffusers / transformers ModuleList attributes: `name.N` in PyTorch, `name_N` in Flax.
_LIST_CONTAINERS = (
    "down_blocks", "up_blocks", "resnets", "attentions", "transformer_blocks",
    "downsamplers", "upsamplers", "layers", "to_out", "net",
    "controlnet_down_blocks", "blocks",  # ControlNet's residual convs, its image embedding's
    "body",  # T2I-Adapter's levels
    "transformer_layes",  # a ControlNet union's (diffusers' spelling)
)
_FLAX_LIST = re.compile(rf"^({'|'.join(_LIST_CONTAINERS)})_(\d+)$")
_TORCH_LIST = re.compile(rf"(^|\.)({'|'.join(_LIST_CONTAINERS)})\.(\d+)(?=\.|$)")

# Older diffusers VAE checkpoints name the mid-block attention differently.
_LEGACY_RENAMES = (
    (".query.", ".to_q."), (".key.", ".to_k."), (".value.", ".to_v."),
    (".proj_attn.", ".to_out.0."),
)
# Buffers some checkpoints carry that are not parameters.
_BUFFERS = re.compile(r"(^|\.)position_ids$")
# transformers' base-model prefix: present in most text encoder checkpoints, absent in others.
TEXT_PREFIX = "text_model."

_LEAF_TO_TORCH = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}


def torch_key(flax_path: tuple[str, ...]) -> str:
  """The PyTorch state-dict key of a Flax param path."""
  parts = []
  for part in flax_path[:-1]:
    m = _FLAX_LIST.match(part)
    parts.extend([m.group(1), m.group(2)] if m else [part])
  parts.append(_LEAF_TO_TORCH.get(flax_path[-1], flax_path[-1]))  # a bare param: its own name
  return ".".join(parts)


def _to_flax_layout(name: str, leaf: str, value: np.ndarray, want: tuple[int, ...]) -> np.ndarray:
  if leaf == "kernel" and len(want) == 4:
    if value.ndim != 4:
      raise WeightsError(f"checkpoint key {name} has shape {value.shape}, expected a conv weight")
    return value.transpose(2, 3, 1, 0)  # O, I, kh, kw -> kh, kw, I, O
  if leaf == "kernel" and len(want) == 2:
    if value.ndim == 4 and value.shape[2:] == (1, 1):  # a 1x1 conv stored where we use a linear
      value = value[:, :, 0, 0]
    if value.ndim != 2:
      raise WeightsError(f"checkpoint key {name} has shape {value.shape}, expected a linear weight")
    return value.T  # out, in -> in, out
  return value


def _to_torch_layout(leaf: str, value: np.ndarray) -> np.ndarray:
  if leaf == "kernel" and value.ndim == 4:
    return value.transpose(3, 2, 0, 1)  # kh, kw, I, O -> O, I, kh, kw
  if leaf == "kernel" and value.ndim == 2:
    return value.T
  return value


def normalize_keys(state_dict: Mapping[str, Any]) -> dict[str, Any]:
  """Undoes naming differences between checkpoint generations (text prefix, legacy VAE)."""
  out = {}
  for key, value in state_dict.items():
    if _BUFFERS.search(key):
      continue
    if key.startswith(TEXT_PREFIX):
      key = key[len(TEXT_PREFIX):]
    for old, new in _LEGACY_RENAMES:
      if "attentions" in key:
        key = key.replace(old, new)
    out[key] = value
  return out


def torch_to_flax(state_dict: Mapping[str, Any], expected, component: str, dtype=None):
  """Converts a PyTorch-layout state dict into Flax params matching `expected`.

  Args:
    state_dict: key -> array (numpy, or anything `np.asarray` takes).
    expected: the model's param tree (arrays or `jax.ShapeDtypeStruct`), e.g. from
      `jax.eval_shape(model.init, ...)["params"]`.
    component: name for error messages ("unet", "vae", "text_encoder").
    dtype: dtype of the returned arrays (default: the checkpoint's, float16 widened to float32).

  Raises:
    WeightsError: naming the first key that is missing, unused, or of the wrong shape.
  """
  flat = {}
  for path, value in _flax_layout_views(state_dict, expected, component).items():
    target = dtype or (np.float32 if value.dtype == np.float16 else value.dtype)
    flat[path] = np.ascontiguousarray(value, dtype=target)
  return traverse_util.unflatten_dict(flat)


def check_state(state_dict: Mapping[str, Any], expected, component: str) -> None:
  """`torch_to_flax`'s checks (every key present and used, every shape as `expected` says)
  without copying a weight: a WeightsError naming the first mismatch."""
  _flax_layout_views(state_dict, expected, component)


def _flax_layout_views(state_dict: Mapping[str, Any], expected,
                       component: str) -> dict[tuple[str, ...], np.ndarray]:
  """Flax param path -> the state dict's array in Flax layout (a view where it can be)."""
  remaining = normalize_keys(state_dict)
  flat = {}
  for path, spec in sorted(traverse_util.flatten_dict(expected).items()):
    name = torch_key(path)
    if name not in remaining:
      raise WeightsError(f"{component} checkpoint is missing key {name!r}")
    value = np.asarray(remaining.pop(name))
    value = _to_flax_layout(name, path[-1], value, tuple(spec.shape))
    if value.shape != tuple(spec.shape):
      raise WeightsError(
          f"{component} checkpoint key {name!r} has shape {value.shape} (in Flax layout), "
          f"the config expects {tuple(spec.shape)}"
      )
    flat[path] = value
  if remaining:
    first = sorted(remaining)[0]
    raise WeightsError(
        f"{component} checkpoint has key {first!r} that its config does not use "
        f"({len(remaining)} unused keys): the weights do not match config.json"
    )
  return flat


def flax_to_torch(params, prefix: str = "") -> dict[str, np.ndarray]:
  """The inverse: Flax params -> PyTorch-layout numpy state dict (keys prefixed by `prefix`)."""
  out = {}
  for path, value in traverse_util.flatten_dict(params).items():
    value = np.asarray(value)
    out[prefix + torch_key(path)] = np.ascontiguousarray(_to_torch_layout(path[-1], value))
  return out


# ---------------------------------------------------------------------------------------------
# Reading and writing checkpoint files.

WEIGHT_STEMS = {
    "unet": "diffusion_pytorch_model",
    "controlnet": "diffusion_pytorch_model",
    "vae": "diffusion_pytorch_model",
    "text_encoder": "model",
    "text_encoder_2": "model",
    "image_encoder": "model",  # an IP-Adapter's (transformers' CLIPVisionModelWithProjection)
    "safety_checker": "model",  # SD1.x's (diffusers' StableDiffusionSafetyChecker)
}
_PICKLE_STEMS = {"diffusion_pytorch_model": "diffusion_pytorch_model", "model": "pytorch_model"}


def _add_variant(name: str, variant: str | None) -> str:
  """`a.b.ext` -> `a.b.<variant>.ext`, as diffusers names variant files."""
  if not variant:
    return name
  head, ext = name.rsplit(".", 1)
  return f"{head}.{variant}.{ext}"


def weight_candidates(stem: str, variant: str | None) -> list[str]:
  """File names a component's weights may have, in order of preference."""
  bases = [f"{stem}.safetensors", f"{stem}.safetensors.index.json", f"{_PICKLE_STEMS[stem]}.bin"]
  variants = ([variant] if variant else []) + [None]
  return [_add_variant(b, v) for b in bases for v in variants]


_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    # float8 checkpoints (ComfyUI's and Forge's fp8 saves): torch's float8_e4m3fn / e5m2
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}


def _safetensors_header(path: str, error) -> tuple[mmap.mmap, int, dict[str, Any]]:
  """(the file memory-mapped, its header's length, the header)."""
  try:
    with open(path, "rb") as f:
      data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    (n,) = struct.unpack("<Q", data[:8])
    if not 2 <= n <= len(data) - 8:
      raise ValueError(f"header length {n} exceeds the file ({len(data)} bytes)")
    header = json.loads(data[8:8 + n])
    if not isinstance(header, dict):
      raise ValueError("the header is not a JSON object")
  except (OSError, ValueError, struct.error) as e:
    raise error(f"cannot read weights {path} (truncated or corrupt?): {e}") from None
  return data, n, header


def read_safetensors_metadata(path: str, error=WeightsError) -> dict[str, str]:
  """A safetensors file's `__metadata__` strings (modelspec.*, ss_*, ...); {} if it has none."""
  metadata = _safetensors_header(path, error)[2].get("__metadata__")
  return {str(k): str(v) for k, v in metadata.items()} if isinstance(metadata, dict) else {}


def read_safetensors(path: str, error=WeightsError) -> dict[str, np.ndarray]:
  """A safetensors file as read-only numpy arrays over a memory map (bfloat16 as
  `ml_dtypes.bfloat16`, which safetensors' numpy reader lacks); sizes checked against the file."""
  data, n, header = _safetensors_header(path, error)
  body = memoryview(data)[8 + n:]
  out = {}
  for key, info in header.items():
    if key == "__metadata__":
      continue
    try:
      dtype = np.dtype(_SAFETENSORS_DTYPES[info["dtype"]])
      start, end = info["data_offsets"]
      shape = tuple(int(d) for d in info["shape"])
    except (KeyError, TypeError, ValueError):
      raise error(f"cannot read weights {path}: tensor {key!r} has an unsupported or bad "
                  f"entry {str(info)[:80]}") from None
    if not 0 <= start <= end <= len(body) or end - start != math.prod(shape) * dtype.itemsize:
      raise error(f"cannot read weights {path}: truncated or corrupt (tensor {key!r} lies "
                  "outside the file)")
    out[key] = np.frombuffer(body[start:end], dtype).reshape(shape)
  return out


def read_pickle(path: str) -> dict[str, np.ndarray]:
  """A torch pickle's state dict, read by the allowlisting unpickler (nothing in it runs)."""
  from sdjax.checkpoints import safe_pickle  # noqa: PLC0415

  try:
    return safe_pickle.load_state_dict(path)
  except safe_pickle.UnsafePickleError as e:
    raise WeightsError(str(e)) from None


def read_state_dict(folder: str, component: str, *, variant: str | None = None,
                    allow_pickle: bool = True) -> dict[str, np.ndarray]:
  """Reads a component folder's weights: safetensors (single or sharded), else a `.bin` pickle.

  `allow_pickle` is accepted for compatibility and ignored: pickles are read without running code.
  """
  del allow_pickle
  stem = WEIGHT_STEMS[component]
  for name in weight_candidates(stem, variant):
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
      continue
    if name.endswith(".index.json"):
      return _read_sharded(folder, path)
    if name.endswith(".safetensors"):
      return read_safetensors(path)
    return read_pickle(path)
  raise WeightsError(f"no {component} weights in {folder} (looked for {stem}.safetensors)")


def _read_sharded(folder: str, index_path: str) -> dict[str, np.ndarray]:
  try:
    with open(index_path, encoding="utf-8") as f:
      shards = sorted(set(json.load(f)["weight_map"].values()))
  except (OSError, ValueError, KeyError) as e:
    raise WeightsError(f"cannot read shard index {index_path}: {e}") from None
  out = {}
  for shard in shards:
    out.update(read_safetensors(os.path.join(folder, shard)))
  return out


def write_safetensors(path: str, state_dict: dict[str, np.ndarray]) -> None:
  """Writes a state dict atomically in the format PyTorch loaders expect."""
  from safetensors.numpy import save_file  # noqa: PLC0415

  tmp = path + ".tmp"
  # safetensors' numpy writer copies raw buffers: a strided view would be written scrambled.
  save_file({k: np.ascontiguousarray(v) for k, v in state_dict.items()}, tmp,
            metadata={"format": "pt"})
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(tmp, 0o666 & ~umask)  # safetensors creates 0600; a model folder is for sharing
  os.replace(tmp, path)
