"""LoRA files merged into a pipeline's weights: kohya/A1111, LoCon, LyCORIS, PEFT, DoRA.

A LoRA changes some linear and conv weights by a low-rank (or Hadamard / Kronecker) product.
sdjax merges it once, `W + scale * alpha / rank * up @ down`, so sampling costs nothing extra;
several LoRAs add. A DoRA layer (weight-decomposed LoRA) also sets the norms of the changed
weight, per output or per input channel, to the magnitudes it carries; see `Dora`. LyCORIS'
full modules carry the whole change (`diff`, and `diff_b` for the bias), its norm modules the
change of a norm layer's weight and bias (`w_norm`, `b_norm`), its IA3 modules a per-channel
scaling of a linear weight (`weight`, `on_input`; see `Ia3`), and OFT / BOFT modules (kohya's and
LyCORIS' `oft_blocks`, older LyCORIS `oft_diag`, `rescale`) an orthogonal rotation of a layer's
output channels (see `Oft`). Key naming:

- kohya / A1111 / LyCORIS: `lora_unet_<module>`, `lora_te_<module>` (SDXL: `lora_te1_`,
  `lora_te2_`), where `<module>` is the diffusers module name with `.` -> `_`, followed by
  `.lora_down.weight`, `.lora_up.weight`, `.lora_mid.weight`, `.alpha`, `.hada_*`, `.lokr_*`,
  `.dora_scale`, `.diff`, `.diff_b`, `.w_norm`, `.b_norm`, `.weight` and `.on_input` (IA3),
  `.oft_blocks`, `.oft_diag` and `.rescale` (OFT).
  kohya's SDXL files name UNet modules as the original (SGM) UNet does (`input_blocks_4_1_...`):
  they resolve through the single-file key table of the model's UNet config.
- diffusers / PEFT: `unet.<module>.lora_A.weight` / `.lora_B.weight` (`text_encoder.`,
  `text_encoder_2.`; older files `.lora.down.weight` or `processor.to_q_lora.down.weight`;
  DoRA `.lora_magnitude_vector`), alpha
  from the `lora_adapter_metadata` safetensors header (`unet.lora_alpha`, `unet.r`, patterns) or
  from `<module>.alpha` tensors; without either, alpha = rank.

A key that names no layer of the model, or a delta whose shape does not fit its layer, is a
`LoraError` naming it: nothing is dropped silently.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from sdjax.checkpoints import hub, safe_pickle, single_file
from sdjax.checkpoints.weights import (
    TEXT_PREFIX,
    read_safetensors,
    read_safetensors_metadata,
    torch_key,
)


class LoraError(ValueError):
  """A LoRA file that cannot be merged into this model: one line saying why."""


# kohya key prefix -> pipeline component.
_KOHYA_PREFIXES = {
    "lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
    "lora_te2_": "text_encoder_2",
}
# diffusers / PEFT key prefix -> pipeline component.
_DIFFUSERS_PREFIXES = {"unet.": "unet", "text_encoder.": "text_encoder",
                       "text_encoder_2.": "text_encoder_2"}
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
_KOHYA_SUFFIXES = (
    "lora_down.weight", "lora_up.weight", "lora_mid.weight", "alpha", "scale",
    "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2",
    "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2",
    "dora_scale", "diff", "diff_b", "w_norm", "b_norm", "weight", "on_input",
    "oft_blocks", "oft_diag", "rescale",
)
_OFT_KEYS = ("oft_blocks", "oft_diag", "alpha", "rescale")
_MAGNITUDES = ("dora_scale", "lora_magnitude_vector")
# Older diffusers names of the same two factors.
_DIFFUSERS_FACTORS = (
    (re.compile(r"^(.*)\.lora_A(?:\.[\w-]+)?\.weight$"), "lora_down.weight"),
    (re.compile(r"^(.*)\.lora_B(?:\.[\w-]+)?\.weight$"), "lora_up.weight"),
    (re.compile(r"^(.*)\.(?:lora|lora_linear_layer)\.down\.weight$"), "lora_down.weight"),
    (re.compile(r"^(.*)\.(?:lora|lora_linear_layer)\.up\.weight$"), "lora_up.weight"),
    (re.compile(r"^(.*)\.lora_magnitude_vector(?:\.[\w-]+)?(?:\.weight)?$"), "lora_magnitude_vector"),
    (re.compile(r"^(.*)\.alpha$"), "alpha"),
)
_PEFT_MODEL_PREFIX = "base_model.model."  # PEFT's own save_pretrained of a wrapped model
_PROCESSOR = re.compile(r"\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")
_SGM_NAMES = re.compile(r"^lora_unet_(input_blocks|middle_block|output_blocks)_")


@dataclasses.dataclass(frozen=True)
class Dora:
  """One DoRA layer: its delta, and the norms the changed weight is rescaled to.

  With V = W + delta, DoRA's weight is `magnitude * V / ||V||`, the norm taken per output
  channel (over the kernel's other axes) or, in older LyCORIS files, per input channel. The
  user's scale k enters as the tool the file's naming comes from applies it:
  - kohya / LyCORIS `dora_scale` (A1111, ComfyUI): W + k * (DoRA weight - W);
  - diffusers / PEFT `lora_magnitude_vector` (PEFT's fuse and adapter weights): k scales the
    delta inside, V = W + k * delta.
  At k = 1 the two agree.
  """

  delta: np.ndarray  # Flax layout, alpha / rank included
  magnitude: np.ndarray  # broadcasts against the kernel: size 1 on the normed axes
  axes: tuple[int, ...]  # the kernel axes each norm runs over
  scale_inside: bool

  def change(self, w: jax.Array, scale: float) -> np.ndarray:
    """What merging this layer at `scale` adds to its weight `w` (float32)."""
    inside = np.float32(scale if self.scale_inside else 1.0)
    outside = np.float32(1.0 if self.scale_inside else scale)
    return np.asarray(_dora_change(w, self.delta, self.magnitude, inside, outside, self.axes))


@dataclasses.dataclass(frozen=True)
class Ia3:
  """A LyCORIS IA3 layer: the weight scaled per output channel (or per input, `on_input`).

  Merging at scale k adds `k * W * vector`, as A1111 applies it (a linear layer's only).
  """

  vector: np.ndarray  # float32, broadcasts against the Flax kernel (in, out)

  def change(self, w: jax.Array, scale: float) -> np.ndarray:
    """What merging this layer at `scale` adds to its weight `w` (float32)."""
    return np.asarray(_ia3_change(w, self.vector, np.float32(scale)))


@jax.jit
def _ia3_change(w, vector, scale):
  return (w.astype(jnp.float32) * vector) * scale


@dataclasses.dataclass(frozen=True)
class Oft:
  """An OFT layer (orthogonal finetuning): the weight's output channels mixed by a block-diagonal
  orthogonal matrix, or for BOFT by a product of such matrices between butterfly permutations.

  The rotation R comes from the file's blocks B by Cayley's map, R = (I + Q)(I - Q)^-1 with
  Q = B - B^T, Q's norm (over all blocks) clipped to `constraint` (kohya / LyCORIS `alpha` times
  the output channels; no clip without alpha); older LyCORIS `oft_diag` blocks are R itself.
  OFT's rotated weight has per block W'_k = R_k^T W_k (W_k: that block's output rows), BOFT's
  stage i regroups the output channels by its butterfly, applies each R_i block as R W_k, and
  ungroups; LyCORIS' `rescale` then scales each output channel. Merging at scale k adds
  `k * (W' - W)`, as A1111 applies it.
  """

  rotations: np.ndarray  # float32 [k, n, n] (OFT) or [stages, k, n, n] (BOFT)
  rescale: np.ndarray | None  # float32 [out] or None

  def change(self, w: jax.Array, scale: float) -> np.ndarray:
    """What merging this layer at `scale` adds to its weight `w` (float32)."""
    return np.asarray(_oft_change(w, self.rotations, self.rescale, np.float32(scale)))


def _butterfly(size: int, group: int) -> np.ndarray:
  """The channel order of one BOFT stage: channels `(c, g, j)` (g of 2, j of `group`) taken in
  the order `(c, j, g)`, so that a block of consecutive positions pairs channels `group` apart."""
  return np.arange(size).reshape(-1, 2, group).transpose(0, 2, 1).reshape(-1)


@jax.jit
def _oft_change(w, rotations, rescale, scale):
  w = w.astype(jnp.float32)
  out = w.shape[-1]  # Flax kernels: output channels last
  if rotations.ndim == 3:  # OFT: W'_k = R_k^T W_k
    k, n = rotations.shape[:2]
    rotated = jnp.einsum("...kn,knm->...km", w.reshape(*w.shape[:-1], k, n), rotations,
                         precision=jax.lax.Precision.HIGHEST)
    rotated = rotated.reshape(w.shape)
  else:  # BOFT: stage by stage, each R block applied within its butterfly group
    rotated = w
    n = rotations.shape[-1]
    for stage in range(rotations.shape[0]):
      order = _butterfly(out, 2**stage * (n // 2))
      grouped = rotated[..., order].reshape(*w.shape[:-1], out // n, n)
      turned = jnp.einsum("kij,...kj->...ki", rotations[stage], grouped,
                          precision=jax.lax.Precision.HIGHEST).reshape(w.shape)
      rotated = turned[..., np.argsort(order)]
  if rescale is not None:
    rotated = rotated * rescale
  return (rotated - w) * scale


def _oft(w: Mapping[str, np.ndarray], kernel_shape: tuple[int, ...], where: str,
         name: str) -> Oft:
  """An OFT / BOFT layer: its rotations from the file's blocks, checked against the layer."""
  extra = sorted(set(w) - set(_OFT_KEYS))
  if extra:
    raise LoraError(f"LoRA {name}: {where} mixes OFT blocks with {', '.join(extra)}")
  out = kernel_shape[-1]
  blocks = np.asarray(w["oft_blocks"] if "oft_blocks" in w else w["oft_diag"], np.float32)
  n = blocks.shape[-1]
  boft = blocks.ndim == 4
  fits = blocks.ndim in (3, 4) and blocks.shape[-2] == n and blocks.shape[-3] * n == out
  if fits and boft:  # every stage's butterfly group must tile the channels
    fits = n % 2 == 0 and out % (2 ** (blocks.shape[0] - 1) * n) == 0
  if not fits:
    raise LoraError(f"LoRA {name}: {where} has OFT blocks of shape {blocks.shape} for a layer "
                    f"with {out} output channels")
  if "oft_blocks" in w:  # Cayley: skew-symmetric Q -> orthogonal R
    q = blocks - np.swapaxes(blocks, -1, -2)
    alpha = float(np.asarray(w["alpha"]).reshape(-1)[0]) if "alpha" in w else 0.0
    if alpha:
      norm, limit = np.float32(np.linalg.norm(q)), np.float32(alpha * out)
      q = q * ((min(norm, limit) + np.float32(1e-8)) / (norm + np.float32(1e-8)))
    eye = np.eye(n, dtype=np.float32)
    blocks = np.matmul(eye + q, np.linalg.inv(eye - q)).astype(np.float32)
  rescale = None
  if "rescale" in w:
    rescale = np.asarray(w["rescale"], np.float32).reshape(-1)
    if rescale.size != out:
      raise LoraError(f"LoRA {name}: {where} has an OFT rescale of size {rescale.size} for a "
                      f"layer with {out} output channels")
  return Oft(blocks, rescale)


@dataclasses.dataclass(frozen=True)
class Lora:
  """A LoRA file resolved against one model: per component, flax param path -> its change.

  Each delta (of a kernel, bias or norm scale) has its param's Flax layout and already includes
  alpha / rank; merging adds `scale * delta`. Layers whose change depends on the weight it is
  merged into (`Dora`, `Ia3`, `Oft`) are in `weighted` instead.
  """

  name: str
  deltas: Mapping[str, Mapping[tuple[str, ...], np.ndarray]]
  weighted: Mapping[str, Mapping[tuple[str, ...], Dora | Ia3 | Oft]] = dataclasses.field(
      default_factory=dict)


# -- reading files ---------------------------------------------------------------------------------
def read_tensors(path: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """A flat tensor file's tensors (float32) and its safetensors metadata header."""
  if not os.path.isfile(path):
    raise LoraError(f"no such file: {path}")
  if path.endswith(".safetensors"):  # (any dtype sdjax reads: bfloat16, float8 too)
    tensors = read_safetensors(path, LoraError)
    return ({k: np.asarray(v, np.float32) for k, v in tensors.items()},
            read_safetensors_metadata(path, LoraError))
  raw = read_pickle(path)
  if not isinstance(raw, Mapping) or not all(isinstance(v, np.ndarray) for v in raw.values()):
    raise LoraError(f"{path} is not a flat dict of tensors")
  return {k: np.asarray(v, np.float32) for k, v in raw.items()}, {}


def read_pickle(path: str) -> Any:
  """A `.pt` / `.bin` / `.ckpt` pickle through sdjax's allowlisting unpickler (no code runs)."""
  return safe_pickle.load(path)


def resolve_file(source: str, kind: str, preferred: Sequence[str] = ()) -> str:
  """A local path for `source`: a file, or a hub file (see `hub.resolve_file`)."""
  try:
    return hub.resolve_file(source, kind, preferred)
  except hub.HubError as e:
    raise LoraError(str(e)) from None


def lora_file(source: str) -> str:
  """The local file of a LoRA `source` (a path, or a hub file)."""
  return resolve_file(source, "LoRA", ("pytorch_lora_weights.safetensors",))


# -- grouping keys into modules --------------------------------------------------------------------
def _split_kohya(key: str) -> tuple[str, str, str] | None:
  for prefix, component in _KOHYA_PREFIXES.items():
    if key.startswith(prefix) and "." in key:
      module, suffix = key[len(prefix):].split(".", 1)
      return component, module, suffix
  return None


def _split_diffusers(key: str) -> tuple[str, str, str] | None:
  component = "unet"
  key = key.removeprefix(_PEFT_MODEL_PREFIX)
  for prefix, name in _DIFFUSERS_PREFIXES.items():
    if key.startswith(prefix):
      component, key = name, key[len(prefix):]
      break
  else:
    if key.startswith(TEXT_PREFIX):
      component = "text_encoder"
  m = _PROCESSOR.search(key)
  if m:  # diffusers' attention-processor LoRA: `attn1.processor.to_q_lora.down.weight`
    proj = "to_out.0" if m.group(1) == "to_out" else m.group(1)
    return component, f"{key[:m.start()]}.{proj}", f"lora_{m.group(2)}.weight"
  for pattern, suffix in _DIFFUSERS_FACTORS:
    m = pattern.match(key)
    if m:
      return component, m.group(1), suffix
  return None


def group_modules(tensors: Mapping[str, np.ndarray], name: str):
  """Keys -> {(component, module name, naming): {suffix: tensor}}; unknown keys are errors."""
  modules: dict[tuple[str, str, str], dict[str, np.ndarray]] = {}
  for key, value in tensors.items():
    split = _split_kohya(key)
    naming = "kohya"
    if split is None:
      split, naming = _split_diffusers(key), "diffusers"
    if split is None or (naming == "kohya" and split[2] not in _KOHYA_SUFFIXES):
      kind = key.rsplit(".", 1)[-1] if split is None else split[2]
      raise LoraError(f"LoRA {name}: key {key!r} is not a LoRA weight sdjax knows ({kind!r})")
    component, module, suffix = split
    modules.setdefault((component, module, naming), {})[suffix] = value
  return modules


# -- the weight delta of one module (PyTorch layout) ------------------------------------------------
def _as_2d(x: np.ndarray) -> np.ndarray:
  return x.reshape(x.shape[0], -1)


def _cp_weight(t: np.ndarray, wa: np.ndarray, wb: np.ndarray) -> np.ndarray:
  """LyCORIS' Tucker rebuild: core t [i, j, kh, kw] with factors wa [i, p], wb [j, r]."""
  return np.einsum("ijkl,jr,ip->prkl", t, wb, wa)  # p, r, kh, kw


def _lora_delta(w: Mapping[str, np.ndarray]) -> tuple[np.ndarray, int]:
  up, down = w["lora_up.weight"], w["lora_down.weight"]
  rank = down.shape[0]
  if "lora_mid.weight" in w:  # LoCon with a Tucker core
    mid = w["lora_mid.weight"]
    return np.einsum("nmkl,in,mj->ijkl", mid, _as_2d(up), _as_2d(down)), rank  # O, I, kh, kw
  delta = _as_2d(up) @ _as_2d(down)  # O, I*kh*kw
  if down.ndim == 4:
    delta = delta.reshape(up.shape[0], *down.shape[1:])  # O, I, kh, kw
  return delta, rank


def _loha_delta(w: Mapping[str, np.ndarray]) -> tuple[np.ndarray, int]:
  w1a, w1b, w2a, w2b = (w[f"hada_w{i}_{ab}"] for i in (1, 2) for ab in "ab")
  if "hada_t1" in w and "hada_t2" in w:
    return _cp_weight(w["hada_t1"], w1a, w1b) * _cp_weight(w["hada_t2"], w2a, w2b), w1b.shape[0]
  return (_as_2d(w1a) @ _as_2d(w1b)) * (_as_2d(w2a) @ _as_2d(w2b)), w1b.shape[0]


def _lokr_delta(w: Mapping[str, np.ndarray]) -> tuple[np.ndarray, int | None]:
  rank = None
  if "lokr_w1" in w:
    w1 = w["lokr_w1"]
  else:
    w1, rank = w["lokr_w1_a"] @ w["lokr_w1_b"], w["lokr_w1_b"].shape[0]
  if "lokr_w2" in w:
    w2 = w["lokr_w2"]
  elif "lokr_t2" in w:
    w2, rank = _cp_weight(w["lokr_t2"], w["lokr_w2_a"], w["lokr_w2_b"]), w["lokr_w2_b"].shape[0]
  else:
    w2, rank = _as_2d(w["lokr_w2_a"]) @ _as_2d(w["lokr_w2_b"]), w["lokr_w2_b"].shape[0]
  if w2.ndim == 4:
    w1 = w1[:, :, None, None]
  return np.kron(w1, w2), rank


_KINDS = (
    (("lora_up.weight", "lora_down.weight"), _lora_delta),
    (("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"), _loha_delta),
    (("lokr_w1|lokr_w1_a+lokr_w1_b", "lokr_w2|lokr_w2_a+lokr_w2_b"), _lokr_delta),
    (("diff",), lambda w: (w["diff"], None)),  # LyCORIS full: the change itself, no rank
)


def _has(w: Mapping[str, np.ndarray], need: str) -> bool:
  return any(all(k in w for k in alt.split("+")) for alt in need.split("|"))


def module_delta(w: Mapping[str, np.ndarray], alpha: float | None) -> np.ndarray:
  """The unscaled-by-user weight change of one module: delta * alpha / rank (A1111's rule)."""
  for needs, fn in _KINDS:
    if all(_has(w, n) for n in needs):
      delta, rank = fn(w)
      break
  else:
    raise KeyError(", ".join(sorted(w)))
  if "scale" in w:
    return delta * float(w["scale"])
  if alpha is not None and rank:
    return delta * (alpha / rank)
  return delta


# -- alpha of diffusers / PEFT files ----------------------------------------------------------------
def _peft_configs(metadata: Mapping[str, str]) -> dict[str, dict[str, Any]]:
  """`lora_adapter_metadata` header -> {component: {r, lora_alpha, rank_pattern, ...}}."""
  raw = metadata.get("lora_adapter_metadata")
  if not raw:
    return {}
  out: dict[str, dict[str, Any]] = {}
  for key, value in json.loads(raw).items():
    component, _, field = key.partition(".")
    out.setdefault(component, {})[field] = value
  return out


def _pattern_value(patterns: Mapping[str, Any], module: str):
  for pattern, value in (patterns or {}).items():
    if re.match(rf"(.*\.)?({pattern})$", module):
      return value
  return None


def _peft_alpha(config: Mapping[str, Any], module: str, rank: int) -> float | None:
  """alpha such that alpha / rank is PEFT's scaling for `module` (rs-LoRA: alpha / sqrt(r))."""
  if not config:
    return None
  r = _pattern_value(config.get("rank_pattern"), module) or config.get("r", rank)
  alpha = _pattern_value(config.get("alpha_pattern"), module) or config.get("lora_alpha", r)
  scaling = alpha / np.sqrt(r) if config.get("use_rslora") else alpha / r
  return scaling * rank


# -- resolving module names against the model ------------------------------------------------------
# SDXL's added-conditioning MLP, which the original-layout UNet table does not name.
_SGM_EXTRA = {"add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}


def _sgm_name(module: str, unet_config) -> str | None:
  """The SGM/LDM (original layout) name of a diffusers UNet module, as kohya's SDXL files use."""
  if module in _SGM_EXTRA:
    return _SGM_EXTRA[module]
  try:
    key = single_file.unet_table(unet_config, [module + ".weight"])[module + ".weight"].key
  except (single_file.SingleFileError, AttributeError, TypeError):
    return None
  return key[len(single_file.UNET_PREFIX):].rsplit(".", 1)[0]


def _module_index(params: Mapping[str, Any], unet_config=None):
  """Per component: module name -> the layer's param path (its kernel's or norm scale's parent).

  Names as diffusers spells them, dotted and underscored (kohya), and for the UNet, given its
  config, the underscored original-layout (SGM) names too.
  """
  index: dict[str, dict[str, tuple[str, ...]]] = {}
  for component in ("unet", *TEXT_ENCODERS):
    if component not in params:
      continue
    names = index.setdefault(component, {})
    for path in traverse_util.flatten_dict(params[component]):
      if path[-1] not in ("kernel", "scale"):
        continue
      module, path = torch_key(path).rsplit(".", 1)[0], path[:-1]
      names[module] = names[module.replace(".", "_")] = path
      sgm = _sgm_name(module, unet_config) if component == "unet" and unet_config else None
      if sgm is not None:
        names.setdefault(sgm.replace(".", "_"), path)
  return index


def _strip_text_prefix(module: str, naming: str) -> str:
  prefix = TEXT_PREFIX if naming == "diffusers" else TEXT_PREFIX.replace(".", "_")
  return module[len(prefix):] if module.startswith(prefix) else module


def _find_layer(index, component: str, module: str, naming: str, name: str):
  if component not in index:
    raise LoraError(f"LoRA {name} has {component} weights but this model has no {component} "
                    "(a LoRA for another model family?)")
  if component in TEXT_ENCODERS:
    module = _strip_text_prefix(module, naming)
  path = index[component].get(module)
  if path is None:
    shown = f"lora_unet_{module}" if naming == "kohya" and component == "unet" else module
    if _SGM_NAMES.match(shown):
      raise LoraError(f"LoRA {name}: SGM/LDM-named UNet module {shown!r} matches no layer of "
                      "this model (a LoRA for another model family?)")
    raise LoraError(f"LoRA {name}: {component} module {module!r} matches no layer of this model")
  return path


def _to_flax(delta: np.ndarray, kernel_shape: tuple[int, ...], where: str, name: str):
  """A PyTorch-layout delta -> the Flax kernel layout (linear (in, out); conv HWIO)."""
  torch_shape = ((kernel_shape[3], kernel_shape[2], *kernel_shape[:2]) if len(kernel_shape) == 4
                 else kernel_shape[::-1])
  if delta.shape[0] != torch_shape[0] or delta.size != np.prod(torch_shape):
    raise LoraError(
        f"LoRA {name}: {where} gives a weight change of shape {delta.shape} for a layer of shape "
        f"{tuple(torch_shape)}: the LoRA was made for another model family"
    )
  delta = delta.reshape(torch_shape)
  return delta.transpose(2, 3, 1, 0) if delta.ndim == 4 else delta.T  # kh, kw, I, O / in, out


def _ia3(w: Mapping[str, np.ndarray], kernel_shape: tuple[int, ...], where: str,
         name: str) -> Ia3:
  """An IA3 layer: its per-channel `weight`, per input where `on_input` is set."""
  if len(kernel_shape) != 2:
    raise LoraError(f"LoRA {name}: {where} has IA3 weights for a convolution; sdjax merges IA3 "
                    "into linear layers only")
  on_input = bool(np.asarray(w.get("on_input", 0.0)).reshape(-1)[0])
  vector = np.asarray(w["weight"], np.float32).reshape(-1)
  axis = 0 if on_input else 1  # Flax kernel: (in, out)
  if vector.size != kernel_shape[axis]:
    raise LoraError(f"LoRA {name}: {where} has IA3 weights of size {vector.size} for a layer "
                    f"with {kernel_shape[axis]} {'inputs' if on_input else 'outputs'}")
  return Ia3(vector.reshape((-1, 1) if on_input else (1, -1)))


def _vector(value: np.ndarray, key: str, shape: tuple[int, ...] | None, where: str,
            name: str) -> np.ndarray:
  """A bias or norm-weight change (`key`), checked against its param's `shape` (None: absent)."""
  if shape is None:
    what = "bias" if key in ("diff_b", "b_norm") else "norm weight"
    raise LoraError(f"LoRA {name}: {where} changes a {what} ({key}) this layer does not have")
  if value.size != int(np.prod(shape)):
    raise LoraError(f"LoRA {name}: {where} gives {key} of shape {value.shape} for a param of "
                    f"shape {tuple(shape)}: the LoRA was made for another model family")
  return value.reshape(shape).astype(np.float32)


def _dora(delta: np.ndarray, key: str, magnitude: np.ndarray, kernel_shape: tuple[int, ...],
          where: str, name: str) -> Dora:
  """A DoRA layer from its Flax-layout delta and its magnitudes (`key` names their format).

  PEFT's `lora_magnitude_vector` is per output channel ([out], convs [1, out, 1, 1]). LyCORIS'
  `dora_scale` keeps the normed axes as 1s: [out, 1, ...] per output, [1, in, ...] per input
  (older files; A1111's DoRA reads only these).
  """
  conv = len(kernel_shape) == 4
  out, inn = kernel_shape[-1], kernel_shape[-2 if conv else 0]
  m, shape = magnitude.reshape(-1), magnitude.shape
  per_output = None
  if key == "lora_magnitude_vector":
    per_output = True if m.size == out else None
  elif len(shape) == 1:
    per_output = True if m.size == out else False if m.size == inn else None
  elif shape[0] == out and m.size == out:
    per_output = True
  elif shape[0] == 1 and shape[1] == inn and m.size == inn:
    per_output = False
  if per_output is None:
    raise LoraError(f"LoRA {name}: {where} has DoRA magnitudes of shape {shape} for a layer with "
                    f"{out} outputs and {inn} inputs")
  # Flax kernels: linear (in, out), conv (kh, kw, in, out).
  channel = len(kernel_shape) - 1 if per_output else len(kernel_shape) - 2
  broadcast = [1] * len(kernel_shape)
  broadcast[channel] = m.size
  axes = tuple(a for a in range(len(kernel_shape)) if a != channel)
  return Dora(delta, m.reshape(broadcast).astype(np.float32), axes,
              scale_inside=key == "lora_magnitude_vector")


@functools.partial(jax.jit, static_argnums=5)
def _dora_change(w, delta, magnitude, inside, outside, axes):
  w = w.astype(jnp.float32)
  v = w + inside * delta
  norm = jnp.sqrt(jnp.sum(jnp.square(v), axis=axes, keepdims=True))
  return outside * (magnitude / norm * v - w)


def resolve_lora(tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str], params,
                 name: str = "lora", unet_config=None) -> Lora:
  """Resolves a LoRA state dict against `params` ({component: tree}) into Flax-layout deltas.

  `unet_config` (the UNet's `UNetConfig`) lets SGM-named UNet keys resolve too.
  """
  index = _module_index(params, unet_config)
  shapes = {c: {p: np.shape(v) for p, v in traverse_util.flatten_dict(params[c]).items()}
            for c in index}
  peft = _peft_configs(metadata)
  deltas: dict[str, dict[tuple[str, ...], np.ndarray]] = {}
  weighted: dict[str, dict[tuple[str, ...], Dora | Ia3 | Oft]] = {}
  for (component, module, naming), w in group_modules(tensors, name).items():
    layer = _find_layer(index, component, module, naming, name)
    where, shape = f"{component} module {module!r}", shapes[component].get
    comp = deltas.setdefault(component, {})
    changes = []  # (param path, change)
    if "w_norm" in w or "b_norm" in w:  # LyCORIS norm module: a norm layer's weight and bias
      norm_scale = float(w["scale"]) if "scale" in w else 1.0
      for key, leaf, factor in (("w_norm", "scale", norm_scale), ("b_norm", "bias", 1.0)):
        if key in w:
          changes.append((layer + (leaf,),
                          factor * _vector(w[key], key, shape(layer + (leaf,)), where, name)))
    else:
      path = layer + ("kernel",)
      if shape(path) is None:
        raise LoraError(f"LoRA {name}: {where} is a norm layer, which only w_norm / b_norm change")
      if "weight" in w:  # LyCORIS IA3 (nothing else in its module)
        weighted.setdefault(component, {})[path] = _ia3(w, shape(path), where, name)
        continue
      if "oft_blocks" in w or "oft_diag" in w:
        weighted.setdefault(component, {})[path] = _oft(w, shape(path), where, name)
        continue
      if "diff_b" in w:  # LyCORIS full module's bias
        changes.append((layer + ("bias",),
                        _vector(w["diff_b"], "diff_b", shape(layer + ("bias",)), where, name)))
      alpha = float(w["alpha"]) if "alpha" in w else None
      if naming == "diffusers" and alpha is None and "lora_down.weight" in w:
        alpha = _peft_alpha(peft.get(component, {}), module, w["lora_down.weight"].shape[0])
      try:
        delta = module_delta(w, alpha)
      except KeyError as e:
        raise LoraError(f"LoRA {name}: module {module!r} has an incomplete or unsupported set "
                        f"of weights ({e.args[0]})") from None
      flax_delta = _to_flax(delta.astype(np.float32), shape(path), where, name)
      magnitude = next(((k, w[k]) for k in _MAGNITUDES if k in w), None)
      if magnitude is None:
        changes.append((path, flax_delta))
      else:
        weighted.setdefault(component, {})[path] = _dora(flax_delta, *magnitude, shape(path),
                                                         where, name)
    for path, change in changes:
      comp[path] = comp[path] + change if path in comp else change
  return Lora(name, deltas, weighted)


def read_lora(source: str, params, unet_config=None) -> Lora:
  """Reads a LoRA file (or hub file, see `hub.resolve_file`) and resolves it against `params`."""
  path = lora_file(source)
  tensors, metadata = read_tensors(path)
  if not tensors:
    raise LoraError(f"LoRA {source} holds no tensors")
  return resolve_lora(tensors, metadata, params, os.path.basename(path), unet_config)


# -- merging ---------------------------------------------------------------------------------------
def _normalize_entry(entry) -> tuple[Any, float, float]:
  """`path`, `(path, scale)` or `(path, unet_scale, te_scale)` -> (path, unet, te)."""
  if isinstance(entry, (str, os.PathLike, Lora)):
    return entry, 1.0, 1.0
  entry = tuple(entry)
  if len(entry) == 2:
    return entry[0], float(entry[1]), float(entry[1])
  if len(entry) == 3:
    return entry[0], float(entry[1]), float(entry[2])
  raise LoraError(f"a LoRA is path, (path, scale) or (path, unet_scale, te_scale), got {entry!r}")


@jax.jit
def _add(w, delta):
  return (w.astype(jnp.float32) + delta).astype(w.dtype)


def merge_loras(params, loras, unet_config=None) -> dict[str, Any]:
  """New params with LoRAs merged; `params` is left as it was.

  Args:
    params: {component: param tree}, as `Pipeline.params`.
    loras: entries `path | Lora`, `(path, scale)` or `(path, unet_scale, te_scale)`.
    unet_config: the UNet's config, for SGM-named UNet keys (kohya's SDXL files).
  """
  total: dict[str, dict[tuple[str, ...], np.ndarray]] = {}
  for entry in loras:
    source, unet_scale, te_scale = _normalize_entry(entry)
    lora = (source if isinstance(source, Lora)
            else read_lora(os.fspath(source), params, unet_config))
    for component, deltas in lora.deltas.items():
      scale = te_scale if component in TEXT_ENCODERS else unet_scale
      comp = total.setdefault(component, {})
      for path, delta in deltas.items():
        comp[path] = comp.get(path, 0.0) + np.float32(scale) * delta
    for component, layers in lora.weighted.items():
      scale = te_scale if component in TEXT_ENCODERS else unet_scale
      comp = total.setdefault(component, {})
      flat = traverse_util.flatten_dict(params[component])
      for path, layer in layers.items():  # each against the weights it is merged into
        comp[path] = comp.get(path, 0.0) + layer.change(flat[path], scale)
  out = dict(params)
  for component, deltas in total.items():
    flat = dict(traverse_util.flatten_dict(params[component]))
    for path, delta in deltas.items():
      flat[path] = _add(flat[path], jnp.asarray(delta))
    out[component] = traverse_util.unflatten_dict(flat)
  return out


def apply_loras(pipe, loras):
  """`pipe.params` with LoRAs merged (the pipeline is not changed): see `merge_loras`."""
  return merge_loras(pipe.params, loras, pipe.unet.config)
