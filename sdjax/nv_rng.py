"""A1111's "NV" random source on device: the unit Gaussian noise that torch's CUDA generator gives
`torch.randn` on NVIDIA GPUs (A1111's default "GPU" source on those), made inside a jitted
program, so that A1111 images made on NVIDIA GPUs can be made again anywhere.

A1111 imitates that generator on the CPU (its `modules/rng_philox.py`, the "NV" setting): the
k-th `randn` of n values of a generator seeded s takes, for value i, Philox4x32-10 (Salmon et al.
2011, the Random123 counter-based generator CUDA's curand implements) with key (the low and high
32-bit words of s) and counter (k, 0, i, 0), and turns the first two output words x, y into one
normal by Box-Muller: sqrt(-2 ln u) sin(v), u = (x + 1/2) 2^-32, v = (y + 1/2) 2^-32 2pi (the
last two constants rounded to float32; the arithmetic in float64, the result rounded to float32).

Here the integer part is exact (uint32 arithmetic; the 64-bit products in 16-bit limbs) and the
transform runs in float32 arranged to stay within a few float32 ulps of that float64 result:
ln u from u's distance to 1 where u is near 1 (`log1p`), and v as the exact sum of six float32
products (y and the constant split into pieces of at most 12 bits) carried as a pair of floats.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

_M = (0xD2511F53, 0xCD9E8D57)  # Philox4x32's multipliers
_W = (0x9E3779B9, 0xBB67AE85)  # its key schedule's increments (the golden ratio, sqrt(3) - 1)
ROUNDS = 10
# A1111's float32 constants: 2^-32 (exactly) and 2^-32 * 2pi.
_TWO_PI_2POW32 = float(np.float32(2.3283064e-10 * 6.2831855))


def _u32(value) -> jax.Array:
  return jnp.asarray(value, jnp.uint32)


def _mulhilo(a: jax.Array, m: int) -> tuple[jax.Array, jax.Array]:
  """(high, low) 32-bit words of the 64-bit product of uint32 `a` and the constant `m`."""
  a_lo, a_hi = a & _u32(0xFFFF), a >> 16
  m_lo, m_hi = _u32(m & 0xFFFF), _u32(m >> 16)
  t = a_lo * m_lo
  u = a_hi * m_lo + (t >> 16)  # each partial sum stays below 2^32
  v = a_lo * m_hi + (u & _u32(0xFFFF))
  return a_hi * m_hi + (u >> 16) + (v >> 16), a * _u32(m)


def philox4x32(counter, key, rounds: int = ROUNDS) -> tuple[jax.Array, ...]:
  """Philox4x32-`rounds` of `counter` (four uint32 arrays) under `key` (two): four uint32 arrays,
  as Random123's philox4x32 (and curand's)."""
  c0, c1, c2, c3 = (_u32(c) for c in counter)
  k0, k1 = (_u32(k) for k in key)
  for r in range(rounds):
    if r:
      k0, k1 = k0 + _u32(_W[0]), k1 + _u32(_W[1])
    hi0, lo0 = _mulhilo(c0, _M[0])
    hi1, lo1 = _mulhilo(c2, _M[1])
    c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
  return c0, c1, c2, c3


def _two_sum(a, b):
  s = a + b
  bb = s - a
  return s, (a - (s - bb)) + (b - bb)


def _split12(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """float32 x as high + low parts of at most 12 significant bits each (exactly)."""
  high = jax.lax.bitcast_convert_type(
      jax.lax.bitcast_convert_type(x, jnp.uint32) & _u32(0xFFFFF000), jnp.float32)
  return high, x - high


def box_muller(x: jax.Array, y: jax.Array) -> jax.Array:
  """float32 sqrt(-2 ln u) sin(v) of uint32 words x, y (u, v as the module says)."""
  # ln u, u = (x + 1/2) 2^-32: directly where u < 1/2, else from 1 - u = (2^32 - 1 - x + 1/2) 2^-32.
  near_one = x >= _u32(2**31)
  far = jnp.log((x.astype(jnp.float32) + 0.5) * jnp.float32(2.0**-32))
  gap = ((_u32(0xFFFFFFFF) - x).astype(jnp.float32) + 0.5) * jnp.float32(2.0**-32)
  log_u = jnp.where(near_one, jnp.log1p(-gap), far)
  radius = jnp.sqrt(-2.0 * log_u)
  # v = (y + 1/2) c, c the float32 constant: y = a 2^20 + b 2^8 + d, c = c_hi + c_lo, and the six
  # products of (a 2^20, b 2^8, d + 1/2) and (c_hi, c_lo) are exact in float32.
  pieces = [((y >> 20) << 20).astype(jnp.float32),
            (((y >> 8) & _u32(0xFFF)) << 8).astype(jnp.float32),
            (y & _u32(0xFF)).astype(jnp.float32) + 0.5]
  c_hi, c_lo = _split12(jnp.float32(_TWO_PI_2POW32))
  terms = [p * c for p in pieces for c in (c_hi, c_lo)]
  high, low = terms[0], jnp.zeros_like(terms[0])
  for t in terms[1:]:
    high, err = _two_sum(high, t)
    low = low + err
  high, low = _two_sum(high, low)
  sin_v = jnp.sin(high) + jnp.cos(high) * low
  return (radius * sin_v).astype(jnp.float32)


def randn(seed_lo, seed_hi, draws: int, n: int) -> jax.Array:
  """float32 [draws, n]: the first `draws` `randn` calls of n values of A1111's NV generator
  seeded (seed_hi << 32) | seed_lo (uint32 scalars; vmap them for a batch)."""
  k = jnp.arange(draws, dtype=jnp.uint32)[:, None]
  i = jnp.arange(n, dtype=jnp.uint32)[None, :]
  zero = jnp.zeros((draws, n), jnp.uint32)
  x, y, _, _ = philox4x32((k + zero, zero, i + zero, zero), (seed_lo, seed_hi))
  return box_muller(x, y)


def randn_nchw(seeds, draws: int, shape: tuple[int, int, int], seeds_hi=None) -> jax.Array:
  """float32 [B, draws, h, w, C] (NHWC): for each seed, `draws` successive `randn(C, h, w)` of
  its own NV generator (A1111's latent layout). `seeds`: their low words (uint32 [B]);
  `seeds_hi`: their high words (default 0)."""
  h, w, c = shape
  lo = jnp.asarray(seeds, jnp.uint32)
  hi = jnp.zeros_like(lo) if seeds_hi is None else jnp.asarray(seeds_hi, jnp.uint32)
  out = jax.vmap(lambda a, b: randn(a, b, draws, c * h * w))(lo, hi)
  return jnp.transpose(out.reshape(-1, draws, c, h, w), (0, 1, 3, 4, 2))  # B, draws, h, w, C


def randn_nhwc_at(seeds, seeds_hi, draws, shape: tuple[int, int, int]) -> jax.Array:
  """float32 [B, h, w, C] (NHWC): for each seed, draw `draws[b]` (traced int32 [B]: its k-th
  `randn(C, h, w)`, counted from 0) of its own NV generator, computed directly (the generator is
  counter-based). `seeds`: the low words (uint32 [B]); `seeds_hi`: the high words (or None: 0)."""
  h, w, c = shape
  n = c * h * w
  lo = jnp.asarray(seeds, jnp.uint32)
  hi = jnp.zeros_like(lo) if seeds_hi is None else jnp.asarray(seeds_hi, jnp.uint32)

  def one(a, b, k):
    i = jnp.arange(n, dtype=jnp.uint32)
    zero = jnp.zeros((n,), jnp.uint32)
    x, y, _, _ = philox4x32((jnp.asarray(k, jnp.uint32) + zero, zero, i, zero), (a, b))
    return box_muller(x, y)

  out = jax.vmap(one)(lo, hi, jnp.asarray(draws, jnp.int32))
  return jnp.transpose(out.reshape(-1, c, h, w), (0, 2, 3, 1))
