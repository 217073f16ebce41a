"""Resampling as A1111's hires upscalers do it: torch's `interpolate` (align_corners=False) as two
matrix products, for its latent upscalers; PIL's 8-bit resize (below), for its pixel ones.

A1111's hires fix enlarges latents with `torch.nn.functional.interpolate` in one of six modes
("Hires upscaler": Latent, Latent (antialiased), Latent (bicubic), Latent (bicubic
antialiased), Latent (nearest), Latent (nearest-exact)). jax.image.resize matches two of them
(bilinear and nearest-exact); its cubic kernel has a = -0.5 where torch's plain bicubic has
-0.75, and its nearest is torch's nearest-exact. Every mode is separable: each axis's weights
are an [out, in] matrix built here on the host from the static sizes, with torch's formulas
(source index, border clamping, kernel, and the antialiased modes' widened, normalised
filters), and applied in the program as two contractions.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

MODES = ("bilinear", "bicubic", "nearest", "nearest-exact")
_CUBIC_A = -0.75  # torch's upsample_bicubic2d (antialiased bicubic uses -0.5, as PIL)
_CUBIC_AA_A = -0.5


def _cubic(x: np.ndarray, a: float) -> np.ndarray:
  x = np.abs(x)
  near = ((a + 2) * x - (a + 3)) * x * x + 1
  far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
  return np.where(x <= 1, near, np.where(x < 2, far, 0.0))


def _plain(in_size: int, out_size: int, mode: str) -> np.ndarray:
  scale = in_size / out_size
  dst = np.arange(out_size, dtype=np.float64)
  w = np.zeros((out_size, in_size))
  rows = np.arange(out_size)
  if mode in ("nearest", "nearest-exact"):
    # torch computes the source index in float32: floor(dst * scale) or floor((dst + .5) * scale)
    offset = np.float32(0.5 if mode == "nearest-exact" else 0.0)
    src = np.floor((dst.astype(np.float32) + offset) * np.float32(scale)).astype(np.int64)
    w[rows, np.minimum(src, in_size - 1)] = 1.0
    return w
  real = scale * (dst + 0.5) - 0.5
  if mode == "bilinear":
    real = np.maximum(real, 0.0)
    lo = np.floor(real).astype(np.int64)
    frac = real - lo
    np.add.at(w, (rows, lo), 1.0 - frac)
    np.add.at(w, (rows, np.minimum(lo + 1, in_size - 1)), frac)
    return w
  lo = np.floor(real).astype(np.int64)  # bicubic: four taps, indices clamped to the border
  frac = real - lo
  for k in range(-1, 3):
    np.add.at(w, (rows, np.clip(lo + k, 0, in_size - 1)), _cubic(frac - k, _CUBIC_A))
  return w


def _antialiased(in_size: int, out_size: int, mode: str) -> np.ndarray:
  """torch's `_upsample_{bilinear,bicubic}2d_aa`: when shrinking, the kernel widens by the
  scale; each output's taps lie inside the input and are normalised to sum to 1."""
  scale = in_size / out_size
  taps = 2 if mode == "bilinear" else 4
  support = taps / 2 * scale if scale >= 1.0 else taps / 2
  inv = 1.0 / scale if scale >= 1.0 else 1.0
  w = np.zeros((out_size, in_size))
  for i in range(out_size):
    center = scale * (i + 0.5)
    lo = max(int(center - support + 0.5), 0)
    hi = min(int(center + support + 0.5), in_size)
    x = (np.arange(lo, hi) - center + 0.5) * inv
    k = np.maximum(1.0 - np.abs(x), 0.0) if mode == "bilinear" else _cubic(x, _CUBIC_AA_A)
    total = k.sum()
    w[i, lo:hi] = k / total if total != 0 else k
  return w


@functools.lru_cache(maxsize=64)
def weights(in_size: int, out_size: int, mode: str, antialias: bool = False) -> np.ndarray:
  """float32 [out_size, in_size]: row i holds the input weights of output pixel i along one
  axis, as `torch.nn.functional.interpolate(size=..., mode=mode, antialias=antialias)` takes
  them (align_corners=False)."""
  if mode not in MODES:
    raise ValueError(f"unknown interpolation mode {mode!r}; pick one of {', '.join(MODES)}")
  if antialias and mode not in ("bilinear", "bicubic"):
    raise ValueError(f"antialias applies to bilinear and bicubic, not {mode!r}")
  if min(in_size, out_size) < 1:
    raise ValueError(f"sizes must be positive, got {in_size} -> {out_size}")
  matrix = (_antialiased if antialias else _plain)(in_size, out_size, mode)
  out = matrix.astype(np.float32)
  out.flags.writeable = False
  return out


def resize(x: jax.Array, size: tuple[int, int], mode: str, antialias: bool = False) -> jax.Array:
  """[B, H, W, C] -> [B, *size, C] as torch's interpolate of the NCHW tensor (in float32)."""
  h, w = (weights(n, m, mode, antialias) for n, m in zip(x.shape[1:3], size, strict=True))
  x = jnp.einsum("oh,bhwc->bowc", h, x.astype(jnp.float32), precision="highest")
  return jnp.einsum("pw,bowc->bopc", w, x, precision="highest")



# -- PIL's Image.resize of 8-bit images (A1111's pixel-space hires upscalers) --------------------
# A1111's "Lanczos" and "Nearest" upscalers, and the Lanczos resizes around every upscaler, are
# PIL's resize of 8-bit RGB images. PIL resamples in fixed point: each axis's filter weights
# (support 3, widened by the scale when shrinking, normalised) are rounded to 22 fractional bits
# and each pass (horizontal, then vertical) rounds and clips its sums to 0..255. The same integer
# arithmetic runs here as int32 contractions, so the results are PIL's exactly; NEAREST picks
# the pixel PIL's affine scaling picks (its position accumulated step by step, in double).
PIL_FILTERS = ("lanczos", "nearest")
_PIL_PRECISION_BITS = 32 - 8 - 2  # PIL's Resample.c


def _pil_sinc(x: float) -> float:
  if x == 0.0:
    return 1.0
  x *= math.pi
  return math.sin(x) / x


def _pil_lanczos(x: float) -> float:
  return _pil_sinc(x) * _pil_sinc(x / 3.0) if -3.0 <= x < 3.0 else 0.0


def _pil_bicubic(x: float) -> float:
  a = -0.5  # PIL's
  x = abs(x)
  if x < 1.0:
    return ((a + 2.0) * x - (a + 3.0)) * x * x + 1
  if x < 2.0:
    return (((x - 5) * x + 8) * x - 4) * a
  return 0.0


_PIL_KERNELS = {"lanczos": (_pil_lanczos, 3.0), "bicubic": (_pil_bicubic, 2.0)}


@functools.lru_cache(maxsize=64)
def pil_weights(in_size: int, out_size: int, kernel: str = "lanczos") -> np.ndarray:
  """int32 [out_size, in_size]: PIL's fixed-point Lanczos (or bicubic) weights along one axis
  (its `precompute_coeffs` and `normalize_coeffs_8bpc`, in the same double arithmetic)."""
  if min(in_size, out_size) < 1:
    raise ValueError(f"sizes must be positive, got {in_size} -> {out_size}")
  fn, size = _PIL_KERNELS[kernel]
  scale = in_size / out_size
  filterscale = max(scale, 1.0)
  support, ss = size * filterscale, 1.0 / filterscale
  out = np.zeros((out_size, in_size), np.int32)
  one = float(1 << _PIL_PRECISION_BITS)
  for i in range(out_size):
    center = (i + 0.5) * scale
    lo = max(int(center - support + 0.5), 0)
    hi = min(int(center + support + 0.5), in_size)
    k = [fn((x - center + 0.5) * ss) for x in range(lo, hi)]  # PIL multiplies
    total = 0.0
    for v in k:  # in order, as PIL sums
      total += v
    for j, v in enumerate(k):
      v = v / total if total != 0.0 else v
      out[i, lo + j] = int(-0.5 + v * one) if v < 0 else int(0.5 + v * one)
  out.flags.writeable = False
  return out


@functools.lru_cache(maxsize=64)
def pil_nearest(in_size: int, out_size: int) -> np.ndarray:
  """int32 [out_size]: the input pixel PIL's NEAREST resize takes for each output pixel."""
  step = in_size / out_size
  pos = step * 0.5
  picks = []
  for _ in range(out_size):
    picks.append(min(int(pos), in_size - 1))
    pos += step
  out = np.asarray(picks, np.int32)
  out.flags.writeable = False
  return out


def _pil_pass(x: jax.Array, weights: np.ndarray, axis: str) -> jax.Array:
  spec = "oh,bhwc->bowc" if axis == "h" else "ow,bhwc->bhoc"
  acc = jnp.einsum(spec, jnp.asarray(weights), x, preferred_element_type=jnp.int32)
  acc = acc + jnp.int32(1 << (_PIL_PRECISION_BITS - 1))
  return jnp.clip(acc >> _PIL_PRECISION_BITS, 0, 255)


def pil_resize(x: jax.Array, size: tuple[int, int], resample: str) -> jax.Array:
  """int32 levels [B, H, W, C] in 0..255 -> [B, *size, C], as PIL's
  `Image.resize((w, h), LANCZOS, NEAREST or BICUBIC)` of each 8-bit image (up to Pillow 12:
  the horizontal pass first). "bicubic" (PIL's default filter) is A1111's resize of inpainting
  masks to the latents' size, not a pixel upscaler (PIL_FILTERS)."""
  if resample not in (*PIL_FILTERS, "bicubic"):
    raise ValueError(f"unknown PIL filter {resample!r}; pick one of {', '.join(PIL_FILTERS)}")
  (h0, w0), (h, w) = x.shape[1:3], size
  x = x.astype(jnp.int32)
  if resample == "nearest":
    return x[:, pil_nearest(h0, h)][:, :, pil_nearest(w0, w)]
  if w != w0:  # PIL: the horizontal pass first
    x = _pil_pass(x, pil_weights(w0, w, resample), "w")
  if h != h0:
    x = _pil_pass(x, pil_weights(h0, h, resample), "h")
  return x
