"""torch's CPU random generator on device: the unit Gaussian noise that
`torch.Generator("cpu").manual_seed(seed)` gives `torch.randn`, made inside a jitted program.

This is the noise of diffusers' pipelines given `generator=[torch.Generator().manual_seed(s) for
s in seeds]` (one generator per image) and of AUTOMATIC1111's "RNG source: CPU", so a seed from
either makes the same image here. Each image's draws (initial noise, a VAE posterior sample,
each step's noise) come one after another from its seed's single stream, as they do there.

torch's CPU generator is MT19937 (the standard 32-bit Mersenne Twister, seeded with the low 32
bits of the seed). A float32 `randn` of n >= 16 values takes n 24-bit uniforms u, then turns each
block of 16 into normals by Box-Muller, pairing u[j] and u[j + 8]; when n is not a multiple of 16
it takes 16 more uniforms and remakes the last 16 values from them.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

_N, _M = 624, 397  # MT19937's state size and middle word
_UPPER, _LOWER, _MATRIX_A = 0x80000000, 0x7FFFFFFF, 0x9908B0DF


def _seeded_state(seed) -> jax.Array:
  """MT19937's state (uint32 [624]) for a uint32 seed (the standard init_genrand)."""

  def body(i, state):
    prev = state[i - 1]
    return state.at[i].set(jnp.uint32(1812433253) * (prev ^ (prev >> 30)) + i.astype(jnp.uint32))

  state = jnp.zeros((_N,), jnp.uint32).at[0].set(jnp.asarray(seed, jnp.uint32))
  return jax.lax.fori_loop(1, _N, body, state)


def _twist(mt: jax.Array) -> jax.Array:
  """The next 624 state words. Word i takes words i + 1 and i + 397 (mod 624) as they are at
  its turn, so it runs as four vector pieces: [0, 227) from the old words, [227, 454) and
  [454, 623) from words the pieces before made, and 623 from the new word 0."""

  def words(y, far):
    y = y.astype(jnp.uint32)
    return far ^ (y >> 1) ^ jnp.where((y & 1) == 1, jnp.uint32(_MATRIX_A), jnp.uint32(0))

  def mix(hi, lo):
    return (hi & jnp.uint32(_UPPER)) | (lo & jnp.uint32(_LOWER))

  k = _N - _M  # 227
  a = words(mix(mt[:k], mt[1:k + 1]), mt[_M:])
  b = words(mix(mt[k:2 * k], mt[k + 1:2 * k + 1]), a)
  c = words(mix(mt[2 * k:_N - 1], mt[2 * k + 1:_N]), b[:_N - 1 - 2 * k])
  d = words(mix(mt[_N - 1:], a[:1]), b[_M - 1 - k:_M - k])  # word 396 = b[169]
  return jnp.concatenate([a, b, c, d])


def _temper(y: jax.Array) -> jax.Array:
  y = y ^ (y >> 11)
  y = y ^ ((y << 7) & jnp.uint32(0x9D2C5680))
  y = y ^ ((y << 15) & jnp.uint32(0xEFC60000))
  return y ^ (y >> 18)


def seeded_state(seed) -> jax.Array:
  """MT19937's state (uint32 [624]) seeded with `seed` (a uint32 scalar; vmap it for many)."""
  return _seeded_state(seed)


def mt19937(seed, count: int, state=None) -> jax.Array:
  """The first `count` outputs (uint32) of MT19937 seeded with `seed` (a uint32 scalar), or
  from its `seeded_state` when given."""

  def block(mt, _):
    mt = _twist(mt)
    return mt, _temper(mt)

  state = _seeded_state(seed) if state is None else state
  _, out = jax.lax.scan(block, state, None, length=-(-count // _N))
  return out.reshape(-1)[:count]  # blocks * 624


def draw_size(n: int) -> int:
  """How many generator outputs one `torch.randn` of n values takes."""
  if n < 16:
    raise ValueError(f"torch's CPU randn of {n} < 16 values takes another path: not supported")
  return n + (16 if n % 16 else 0)


def _box_muller(u: jax.Array) -> jax.Array:
  """torch's normal_fill_16 on uniforms [..., 16]: values j and j + 8 from u[j], u[j + 8]."""
  u1, u2 = 1 - u[..., :8], u[..., 8:]
  radius = jnp.sqrt(-2 * jnp.log(u1))
  theta = jnp.float32(2 * math.pi) * u2
  return jnp.concatenate([radius * jnp.cos(theta), radius * jnp.sin(theta)], axis=-1)


def randn(seed, draws: int, n: int, state=None) -> jax.Array:
  """float32 [draws, n]: `draws` successive `torch.randn(n)` of a CPU generator seeded with
  `seed` (a uint32 scalar; vmap it for a batch), or from its `seeded_state` when given."""
  return _normals(mt19937(seed, draws * draw_size(n), state).reshape(draws, -1), n)


def randn_slice(seed, draws: int, n: int, batch: int, index) -> jax.Array:
  """float32 [draws, n]: image `index` (traced) of a batch of `batch` drawing together: slice
  `index` of each of `draws` successive `torch.randn(batch * n)` of the generator seeded with
  `seed` (ComfyUI's batch noise: one draw of the whole batch's latents from its seed)."""
  raw = mt19937(seed, draws * draw_size(batch * n)).reshape(draws, -1)
  whole = _normals(raw, batch * n)
  return jax.lax.dynamic_slice_in_dim(whole, index * n, n, axis=1)


def _normals(raw: jax.Array, n: int) -> jax.Array:
  """float32 [draws, n]: torch's CPU normal_fill of n values from each row of generator outputs
  (uint32 [draws, draw_size(n)])."""
  draws = raw.shape[0]
  u = (raw & jnp.uint32(0xFFFFFF)).astype(jnp.float32) * jnp.float32(2.0**-24)  # draws, size
  full = n // 16 * 16
  out = _box_muller(u[:, :full].reshape(draws, -1, 16)).reshape(draws, full)
  if full == n:
    return out
  # The tail: the values past the last whole block stay uniforms until the last 16 are remade.
  out = jnp.concatenate([out, u[:, full:n]], axis=1)
  return jnp.concatenate([out[:, :n - 16], _box_muller(u[:, n:])], axis=1)


def randn_nchw_after(seeds, lead: tuple[int, int, int], draws: int,
                     shape: tuple[int, int, int]) -> tuple[jax.Array, jax.Array]:
  """`randn_nchw` of `draws` at `shape` after one `torch.randn(C', h', w')` of `lead` (h', w',
  C') from each seed's generator: (that first draw [B, h', w', C'], the others [B, draws, h, w,
  C]), as a pipeline drawing something else first (the x4 upscaler's low-res noise) makes them."""
  (h0, w0, c0), (h, w, c) = lead, shape
  first, n = c0 * h0 * w0, c * h * w

  def one(seed):
    raw = mt19937(seed, draw_size(first) + draws * draw_size(n))
    return (_normals(raw[None, :draw_size(first)], first)[0],
            _normals(raw[draw_size(first):].reshape(draws, -1), n))

  lead_out, out = jax.vmap(one)(jnp.asarray(seeds, jnp.uint32))
  return (jnp.transpose(lead_out.reshape(-1, c0, h0, w0), (0, 2, 3, 1)),
          jnp.transpose(out.reshape(-1, draws, c, h, w), (0, 1, 3, 4, 2)))


def randn_nchw(seeds, draws: int, shape: tuple[int, int, int], batch=None) -> jax.Array:
  """float32 [B, draws, h, w, C] (NHWC): for each uint32 seed, `draws` successive
  `torch.randn(C, h, w)` of its own CPU generator (diffusers' and A1111's latent layout). With
  `batch` (size, int32 [B] indices): each row's slice of its seed's draws of a batch of `size`
  (`randn_slice`)."""
  h, w, c = shape
  seeds = jnp.asarray(seeds, jnp.uint32)
  if batch is None:
    out = jax.vmap(lambda s: randn(s, draws, c * h * w))(seeds)
  else:
    size, index = batch
    out = jax.vmap(lambda s, k: randn_slice(s, draws, c * h * w, size, k))(
        seeds, jnp.asarray(index, jnp.int32))
  return jnp.transpose(out.reshape(-1, draws, c, h, w), (0, 1, 3, 4, 2))  # B, draws, h, w, C

