"""A1111's model upscalers (the ESRGAN family: "R-ESRGAN 4x+", "4x-UltraSharp", ...) as its hires
fix runs them, on device.

A1111 (1.10, `modules/upscaler_utils.py`, `modules/images.py`) runs one upscaler pass on an 8-bit
image like this, and sdjax does the same arithmetic in one compiled program:
- the image is cut into tiles of `tile` pixels (default 192; 0: the whole image) overlapping by
  at least `overlap` (default 8), spread evenly: per axis ceil((n - overlap) / (tile - overlap))
  tiles at int(i * (n - tile) / (count - 1)), the last moved back to end at the edge (an image
  smaller than a tile gives one tile, black where it passes the image's top-left corner);
- each tile goes through the network as BGR in [0, 1] (the original ESRGAN's channel order,
  which A1111 gives every model), and comes back clipped, times 255, rounded to 8 bits;
- the enlarged tiles are pasted back in order, each row left to right, then the rows top to
  bottom: a tile's first `overlap * scale` columns (rows) blend over what is there with a linear
  8-bit ramp (PIL's `paste` with an "L" mask: (old * (255 - m) + new * m) / 255, rounded as PIL
  rounds), the rest of it overwrites.
Its hires fix repeats passes (at most 3) until the image reaches the target rounded down to 8,
then resizes with Lanczos (`resize_steps`). A1111 runs its R-ESRGAN models in
float16 on CUDA by default and files from models/ESRGAN in float32; sdjax runs both in float32.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sdjax import aot, interpolate
from sdjax.checkpoints import upscalers as upscaler_files
from sdjax.models import esrgan

# A1111's settings "Tile size for ESRGAN upscalers" / "Tile overlap for ESRGAN upscalers".
DEFAULT_TILE = 192
DEFAULT_OVERLAP = 8
# A1111's pixel upscalers with PIL (Lanczos, Nearest; None: only the final Lanczos resize) -> the
# filter `interpolate.pil_resize` applies.
PIXEL_UPSCALERS = {"lanczos": "lanczos", "nearest": "nearest", "none": None}
# A1111's names of its Real-ESRGAN models (the "Hires upscaler" it writes) -> their files, as its
# realesrgan_model.py downloads them; other files are named by their stem, as A1111 names them.
A1111_MODEL_FILES = {
    "R-ESRGAN 4x+": "RealESRGAN_x4plus.pth",
    "R-ESRGAN 4x+ Anime6B": "RealESRGAN_x4plus_anime_6B.pth",
    "R-ESRGAN 2x+": "RealESRGAN_x2plus.pth",
    "R-ESRGAN General 4xV3": "realesr-general-x4v3.pth",  # these three: the compact network
    "R-ESRGAN General WDN 4xV3": "realesr-general-wdn-x4v3.pth",
    "R-ESRGAN AnimeVideo": "realesr-animevideov3.pth",
    "ESRGAN_4x": "ESRGAN_4x.pth",
}


@dataclasses.dataclass(frozen=True)
class ModelUpscaler:
  """What a compiled program needs of a model upscaler (jit-static; its weights travel apart,
  as params["upscaler"])."""

  name: str  # A1111's name for it ("R-ESRGAN 4x+", or the file's stem)
  config: esrgan.RRDBNetConfig | esrgan.SRVGGNetConfig
  tile: int = DEFAULT_TILE
  overlap: int = DEFAULT_OVERLAP

  @property
  def scale(self) -> int:
    return self.config.scale


@dataclasses.dataclass(frozen=True, eq=False)
class Upscaler:
  """A loaded model upscaler: `spec` and its Flax params."""

  spec: ModelUpscaler
  params: Any
  path: str
  # id(pipeline params) -> (those params, them with ours): the same dict for the same params, so
  # what is kept per params dict (cfg_split's replicated weights) is kept across calls.
  _merged: dict = dataclasses.field(default_factory=dict, repr=False)

  @property
  def name(self) -> str:
    return self.spec.name

  def with_params(self, params: dict) -> dict:
    """A pipeline's `params` with this upscaler's weights as params["upscaler"]."""
    entry = self._merged.get(id(params))
    if entry is None or entry[0] is not params:
      if len(self._merged) >= 2:
        self._merged.pop(next(iter(self._merged)))
      entry = self._merged[id(params)] = (params, {**params, "upscaler": self.params})
    return entry[1]

  def upscale(self, images, size: tuple[int, int] | None = None) -> np.ndarray:
    """8-bit images [B, H, W, 3] enlarged to `size` (height, width; default: by the network's
    own factor) as A1111's `resize_image` enlarges them with this upscaler (its hires fix's
    step; its Extras tab stops at the size rounded down to 8): passes of the network until
    that size is covered, then Lanczos to it and to `size`. uint8 [B, *size, 3]."""
    levels = np.asarray(images)
    if levels.ndim != 4 or levels.shape[-1] != 3 or levels.dtype != np.uint8:
      raise ValueError(f"upscale takes uint8 images [B, H, W, 3], got {levels.dtype} "
                       f"{levels.shape}")
    h, w = levels.shape[1:3]
    size = size or (h * self.spec.scale, w * self.spec.scale)
    steps = resize_steps(self.spec, (h, w), tuple(size))
    return np.asarray(_upscale_levels(self.spec, steps, self.params, jnp.asarray(levels)),
                      np.uint8)


def load_upscaler(path: str, tile: int = DEFAULT_TILE, overlap: int = DEFAULT_OVERLAP,
                  name: str | None = None) -> Upscaler:
  """An ESRGAN-family upscaler file (`checkpoints.upscalers`), with A1111's tiling settings.
  `name`: how images name it (default: A1111's: its Real-ESRGAN label, else the file's stem)."""
  check_tiling(tile, overlap)
  config, params = upscaler_files.load_network(path)
  return Upscaler(ModelUpscaler(name or a1111_name(path), config, tile, overlap), params, path)


def a1111_name(path: str) -> str:
  """The name A1111 gives an upscaler file."""
  base = os.path.basename(path)
  for label, file in A1111_MODEL_FILES.items():
    if base == file:
      return label
  return os.path.splitext(base)[0]


def find_upscaler_file(name: str, folder: str | None) -> str | None:
  """The file of an upscaler named as A1111 names them (or by file name) in `folder`; a path to
  a file is itself. None when there is none."""
  if os.path.isfile(name):
    return name
  if not folder or not os.path.isdir(folder):
    return None
  wanted = [A1111_MODEL_FILES[name]] if name in A1111_MODEL_FILES else []
  wanted += [name] + [name + ext for ext in upscaler_files.UPSCALER_EXTENSIONS]
  for root, _, files in sorted(os.walk(folder)):
    for file in wanted:
      if file in files:
        return os.path.join(root, file)
  return None


def check_tiling(tile: int, overlap: int) -> None:
  if not (isinstance(tile, int) and tile >= 0 and isinstance(overlap, int) and overlap >= 0):
    raise ValueError(f"upscaler tile and overlap must be integers >= 0, got {tile}, {overlap}")
  if tile and overlap >= tile:
    raise ValueError(f"the upscaler tile overlap ({overlap}) must be smaller than the tile "
                     f"({tile})")


def resize_steps(upscaler, size: tuple[int, int],
                 target: tuple[int, int]) -> tuple[tuple[tuple[int, int], str], ...]:
  """The steps ((height, width), "lanczos" / "nearest" / "model"), in order, that A1111's
  `resize_image` ("Just resize") makes of an image of `size` (height, width) to `target` with
  `upscaler` (one of PIXEL_UPSCALERS, or a ModelUpscaler): when enlarging, passes of the
  upscaler until the target rounded down to 8 is covered (at most 3: Lanczos and Nearest resize
  by the larger side's factor in one, a model enlarges by its own, a 1x model makes one), then
  Lanczos to that size and to the target where they differ; with "None", Lanczos straight to
  the target. PIL's Lanczos and Nearest are `interpolate.pil_resize`'s, a model's `model_pass`."""
  (h, w), (th, tw) = size, target
  steps, current = [], (h, w)
  scale = max(tw / w, th / h)
  model = isinstance(upscaler, ModelUpscaler)
  if scale > 1.0 and (model or PIXEL_UPSCALERS[upscaler] is not None):
    dest = (int((h * scale) // 8 * 8), int((w * scale) // 8 * 8))
    for _ in range(3):  # A1111's Upscaler.upscale
      if current[0] >= dest[0] and current[1] >= dest[1]:
        break
      if model:
        enlarged, kind = (current[0] * upscaler.scale, current[1] * upscaler.scale), "model"
      else:
        enlarged, kind = (int(h * scale), int(w * scale)), PIXEL_UPSCALERS[upscaler]
      if enlarged != current or model:  # PIL's resize to the same size changes nothing
        steps.append((enlarged, kind))
      if enlarged == current:
        break
      current = enlarged
    if current != dest:
      steps.append((dest, "lanczos"))
      current = dest
  if current != (th, tw):
    steps.append(((th, tw), "lanczos"))
  return tuple(steps)


def tile_origins(n: int, tile: int, overlap: int) -> list[int]:
  """A1111's `split_grid` along one axis of n pixels: where each tile starts."""
  count = math.ceil((n - overlap) / (tile - overlap))
  step = (n - tile) / (count - 1) if count > 1 else 0
  origins = []
  for i in range(count):
    start = int(i * step)
    origins.append(n - tile if start + tile >= n else start)
  return origins


def blend_ramp(overlap: int) -> np.ndarray:
  """A1111's mask across an overlap: int(i * 255 / overlap) as float32 arithmetic, i < overlap."""
  ramp = np.arange(overlap, dtype=np.float32) * np.float32(255) / np.float32(overlap)
  return ramp.astype(np.uint8).astype(np.int32)


def model_pass(spec: ModelUpscaler, params, levels: jax.Array) -> jax.Array:
  """One A1111 upscaler pass: int32 levels [B, H, W, 3] -> [B, H*s, W*s, 3], tiled."""
  b, h, w, _ = levels.shape
  s = spec.scale
  if not spec.tile:
    return _network(spec.config, params, levels)
  t, ov = spec.tile, spec.overlap
  ys, xs = tile_origins(h, t, ov), tile_origins(w, t, ov)
  if not ys or not xs:  # no larger than the overlap: A1111's grid has no tile (and it fails)
    return _network(spec.config, params, levels)
  # Crops past the image's top-left corner (an image smaller than a tile) are black, as PIL's.
  top, left = max(0, -min(ys)), max(0, -min(xs))
  padded = jnp.pad(levels, ((0, 0), (top, 0), (left, 0), (0, 0)))
  tiles = jnp.stack([padded[:, y + top:y + top + t, x + left:x + left + t]
                     for y in ys for x in xs])  # T, B, t, t, 3
  enlarged = jax.lax.map(lambda tile: _network(spec.config, params, tile), tiles)
  enlarged = enlarged.reshape(len(ys), len(xs), *enlarged.shape[1:])  # rows, cols, B, ts, ts, 3
  out = jnp.zeros((b, h * s, w * s, 3), jnp.int32)
  row_ramp = blend_ramp(ov * s)
  for r, y in enumerate(ys):
    row = jnp.zeros((b, t * s, w * s, 3), jnp.int32)
    for c, x in enumerate(xs):
      row = _paste_tile(row, enlarged[r, c], x * s, ov * s, row_ramp, axis=2)
    out = _paste_tile(out, row, y * s, ov * s, row_ramp, axis=1)
  return out


def _network(config, params, levels: jax.Array) -> jax.Array:
  """The network on 8-bit RGB levels, as A1111 feeds it: BGR in [0, 1] in, 8-bit RGB out."""
  x = levels[..., ::-1].astype(jnp.float32) / jnp.float32(255)
  y = esrgan.network(config).apply({"params": params}, x)
  y = jnp.round(jnp.clip(y.astype(jnp.float32), 0.0, 1.0) * jnp.float32(255))
  return y.astype(jnp.int32)[..., ::-1]


def _paste_tile(canvas, tile, at: int, overlap: int, ramp: np.ndarray, axis: int):
  """A1111's `combine_grid` step along `axis` (2: a tile into its row, 1: a row into the
  image): at 0 the tile is pasted whole; elsewhere its first `overlap` lines blend in with the
  ramp and the rest overwrite. What falls outside the canvas is dropped, as PIL's paste drops
  it."""
  if at == 0:
    return _paste(canvas, tile, 0, axis)
  lead = jax.lax.slice_in_dim(tile, 0, overlap, axis=axis)
  under = _window(canvas, at, overlap, axis)
  if under is not None:
    lo, hi = under
    lead = jax.lax.slice_in_dim(lead, lo - at, hi - at, axis=axis)
    m = jnp.asarray(ramp[lo - at:hi - at]).reshape([-1 if a == axis else 1 for a in range(4)])
    mixed = _div255(jax.lax.slice_in_dim(canvas, lo, hi, axis=axis) * (255 - m) + lead * m)
    canvas = jax.lax.dynamic_update_slice_in_dim(canvas, mixed, lo, axis=axis)
  rest = jax.lax.slice_in_dim(tile, overlap, tile.shape[axis], axis=axis)
  return _paste(canvas, rest, at + overlap, axis)


def _window(canvas, at: int, length: int, axis: int):
  """(first, end) of the canvas lines [at, at + length) that exist; None if none do."""
  lo, hi = max(at, 0), min(at + length, canvas.shape[axis])
  return None if lo >= hi else (lo, hi)


def _paste(canvas, piece, at: int, axis: int):
  """`piece` written over `canvas` from line `at` along `axis`, clipped to the canvas; the other
  axis (rows: the row's height, the image's width) is the canvas's from 0."""
  other = 2 if axis == 1 else 1
  piece = jax.lax.slice_in_dim(piece, 0, min(piece.shape[other], canvas.shape[other]),
                               axis=other)
  window = _window(canvas, at, piece.shape[axis], axis)
  if window is None:
    return canvas
  lo, hi = window
  piece = jax.lax.slice_in_dim(piece, lo - at, hi - at, axis=axis)
  start = [0, 0, 0, 0]
  start[axis] = lo
  return jax.lax.dynamic_update_slice(canvas, piece, start)


def _div255(a):
  """PIL's rounded division by 255 of a blend's sum (its DIV255 macro)."""
  a = a + 128
  return ((a >> 8) + a) >> 8


@functools.partial(aot.bounded_jit, static_argnums=(0, 1))
def _upscale_levels(spec: ModelUpscaler, steps, params, levels):
  levels = levels.astype(jnp.int32)
  for size, resample in steps:
    levels = model_pass(spec, params, levels) if resample == "model" else (
        interpolate.pil_resize(levels, size, resample))
  return levels
