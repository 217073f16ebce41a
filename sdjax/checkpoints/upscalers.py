"""ESRGAN-family upscaler files (`.pth`, `.pt`, `.safetensors`): the RRDBNet weights A1111 keeps
in `models/ESRGAN` and `models/RealESRGAN`, in any of the three layouts they were published in,
and Real-ESRGAN's compact SRVGGNet (`body.N`: realesr-general-x4v3.pth, realesr-animevideov3.pth):

  BasicSR / Real-ESRGAN  conv_first, body.N.rdbK.convJ, conv_body, conv_upI, conv_hr, conv_last
                         (often inside `params_ema` or `params`): RealESRGAN_x4plus.pth, ...
  BSRGAN / RealSR        conv_first, RRDB_trunk.N.RDBK.convJ, trunk_conv, upconvI, HRconv,
                         conv_last
  ESRGAN (original)      model.0, model.1.sub.N.RDBK.convJ.0, model.1.sub.<blocks>, then per
                         upsampling model.3, model.6, ...; conv_hr and conv_last after them:
                         4x-UltraSharp.pth, 4x_foolhardy_Remacri.pth, ...

Pickles are read by the allowlisting unpickler; nothing in a file runs. The architecture's sizes
(blocks, widths, upsamplings, Real-ESRGAN's pixel-unshuffle for its 2x and 1x models; the compact
net's depth and pixel shuffle) are read from the weights' shapes, so a file needs no config.
"""

from __future__ import annotations

import math
import os
import re

import jax
import jax.numpy as jnp
import numpy as np

from sdjax.checkpoints import safe_pickle
from sdjax.checkpoints.weights import WeightsError, read_safetensors, torch_to_flax
from sdjax.models.esrgan import RRDBNetConfig, SRVGGNetConfig, network

UPSCALER_EXTENSIONS = (".pth", ".pt", ".safetensors")
# Where trainers nest the weights (BasicSR: params_ema, params; others a state_dict).
_WRAPPERS = ("params_ema", "params-ema", "params", "state_dict", "model_state_dict", "model",
             "net")
_PREFIXES = ("module.", "netG.")


class UpscalerError(ValueError):
  """An upscaler file that cannot be read or is not an RRDBNet (one line, naming the file)."""


def read_upscaler_state(path: str) -> dict[str, np.ndarray]:
  """The file's weights, unwrapped from a trainer's dict and common prefixes."""
  if not os.path.isfile(path):
    raise UpscalerError(f"upscaler file {path} does not exist")
  if not path.endswith(UPSCALER_EXTENSIONS):
    raise UpscalerError(f"upscaler file {path}: expected one of {', '.join(UPSCALER_EXTENSIONS)}")
  try:
    if path.endswith(".safetensors"):
      obj = read_safetensors(path, error=UpscalerError)
    else:
      obj = safe_pickle.load(path)
  except (safe_pickle.UnsafePickleError, WeightsError) as e:
    raise UpscalerError(str(e)) from None
  if not isinstance(obj, dict):
    raise UpscalerError(f"{path} does not hold a state dict (found {type(obj).__name__})")
  for key in _WRAPPERS:
    if isinstance(obj.get(key), dict):
      obj = obj[key]
      break
  state = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, np.ndarray)}
  for prefix in _PREFIXES:
    if state and all(k.startswith(prefix) for k in state):
      state = {k[len(prefix):]: v for k, v in state.items()}
  return state


def _rename(state: dict[str, np.ndarray], path: str) -> dict[str, np.ndarray]:
  """Any of the three layouts, in BasicSR's names."""
  if "conv_first.weight" in state and "body.0.rdb1.conv1.weight" in state:
    return dict(state)
  if "conv_first.weight" in state and "RRDB_trunk.0.RDB1.conv1.weight" in state:
    out = {}
    for key, value in state.items():
      key = re.sub(r"^RRDB_trunk\.(\d+)\.RDB(\d)\.", r"body.\1.rdb\2.", key)
      key = re.sub(r"^trunk_conv\.", "conv_body.", key)
      key = re.sub(r"^upconv(\d)\.", r"conv_up\1.", key)
      out[re.sub(r"^HRconv\.", "conv_hr.", key)] = value
    return out
  if "model.0.weight" in state and "model.1.sub.0.RDB1.conv1.0.weight" in state:
    return _rename_original(state, path)
  if _is_compact(state):
    return dict(state)
  if any(".conv1x1." in k for k in state):
    raise UpscalerError(f"{path}: an ESRGAN+ model (its dense blocks' 1x1 convs): not supported")
  raise UpscalerError(f"{path} is not an ESRGAN / Real-ESRGAN (RRDBNet) upscaler; sdjax runs "
                      "those only")


def _rename_original(state: dict[str, np.ndarray], path: str) -> dict[str, np.ndarray]:
  """The original ESRGAN's one `model` sequence: conv, the shortcut over the body (its RRDBs then
  its conv at index <blocks>), one (upsample, conv, lrelu) triple per upsampling, then conv_hr,
  lrelu, conv_last."""
  blocks = {int(m.group(1)) for k in state if (m := re.match(r"model\.1\.sub\.(\d+)\.RDB", k))}
  top = sorted({int(m.group(1)) for k in state if (m := re.match(r"model\.(\d+)\.", k))})
  ups = [3 * i for i in range(1, len(top) - 3)]
  expected = [0, 1, *ups, 3 * len(ups) + 2, 3 * len(ups) + 4]
  if top != expected or sorted(blocks) != list(range(len(blocks))):
    raise UpscalerError(f"{path}: an ESRGAN layout sdjax does not know (top-level layers {top})")
  out = {}
  names = {0: "conv_first", **{u: f"conv_up{n}" for n, u in enumerate(ups, 1)},
           expected[-2]: "conv_hr", expected[-1]: "conv_last"}
  for key, value in state.items():
    if m := re.match(r"model\.1\.sub\.(\d+)\.RDB(\d)\.conv(\d)\.0\.(weight|bias)$", key):
      out[f"body.{m.group(1)}.rdb{m.group(2)}.conv{m.group(3)}.{m.group(4)}"] = value
    elif m := re.match(rf"model\.1\.sub\.{len(blocks)}\.(weight|bias)$", key):
      out[f"conv_body.{m.group(1)}"] = value
    elif (m := re.match(r"model\.(\d+)\.(weight|bias)$", key)) and int(m.group(1)) in names:
      out[f"{names[int(m.group(1))]}.{m.group(2)}"] = value
    else:
      raise UpscalerError(f"{path}: unexpected key {key} for an ESRGAN model")
  return out


def _is_compact(state) -> bool:
  """SRVGGNetCompact's `body.N` chain: convs at even indices, PReLU slopes (1-D) at odd ones."""
  return ("body.0.weight" in state and "body.1.weight" in state
          and np.ndim(state["body.1.weight"]) == 1 and "conv_first.weight" not in state)


def compact_config(state: dict[str, np.ndarray], path: str) -> SRVGGNetConfig:
  """The compact network BasicSR-named weights describe (the last conv's channels are the
  output's times the pixel shuffle's factor squared)."""
  last = max(int(m.group(1)) for k in state if (m := re.match(r"body\.(\d+)\.", k)))
  first, shuffle = state["body.0.weight"], state[f"body.{last}.weight"].shape[0]
  channels = first.shape[1]
  scale = int(round(math.sqrt(shuffle / channels)))
  if last % 2 or last < 2 or scale * scale * channels != shuffle:
    raise UpscalerError(f"{path}: a compact (SRVGGNet) layout sdjax does not know (last layer "
                        f"body.{last}, {shuffle} channels)")
  return SRVGGNetConfig(num_feat=first.shape[0], num_conv=(last - 2) // 2, upscale=scale,
                        in_channels=channels, out_channels=channels)


def rrdbnet_config(state: dict[str, np.ndarray], path: str) -> RRDBNetConfig:
  """The architecture BasicSR-named weights describe."""
  try:
    first, last = state["conv_first.weight"], state["conv_last.weight"]
    grow = state["body.0.rdb1.conv1.weight"].shape[0]
  except KeyError as e:
    raise UpscalerError(f"{path}: no {e.args[0]} in an ESRGAN model") from None
  blocks = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"body\.(\d+)\.", k)))
  ups = sum(1 for k in state if re.fullmatch(r"conv_up\d+\.weight", k))
  in_channels, out_channels = first.shape[1], last.shape[0]
  unshuffle = 1
  for s in (2, 4):  # Real-ESRGAN x2 / x1: the 4x network on an s x s pixel-unshuffled input
    if in_channels == out_channels * s * s:
      unshuffle, in_channels = s, out_channels
  return RRDBNetConfig(num_blocks=blocks, num_feat=first.shape[0], num_grow=grow,
                       num_upsample=ups, unshuffle=unshuffle, in_channels=in_channels,
                       out_channels=out_channels)


def load_network(path: str, dtype=jnp.float32) -> tuple[RRDBNetConfig | SRVGGNetConfig, dict]:
  """(config, Flax params) of an upscaler file: an RRDBNet or a compact SRVGGNet. Raises
  UpscalerError (one line)."""
  state = _rename(read_upscaler_state(path), path)
  config = compact_config(state, path) if _is_compact(state) else rrdbnet_config(state, path)
  if config.out_channels != 3 or config.in_channels != 3:
    raise UpscalerError(f"{path}: a network of {config.in_channels} -> {config.out_channels} "
                        "channels; an upscaler maps RGB to RGB")
  x = jax.ShapeDtypeStruct((1, 8, 8, 3), jnp.float32)
  expected = jax.eval_shape(lambda x: network(config).init(jax.random.key(0), x), x)["params"]
  try:
    params = torch_to_flax(state, expected, "upscaler", dtype=np.dtype(dtype))
  except WeightsError as e:
    raise UpscalerError(f"{path}: {e}") from None
  return config, params
