"""Token merging for Stable Diffusion (ToMe SD, Bolya & Hoffman 2023) as A1111 applies it.

A1111's "Token merging ratio" setting patches the UNet's transformer blocks with tomesd's
`apply_patch(ratio, use_rand=False, merge_attn=True, merge_crossattn=False, merge_mlp=False)`
(strides sx = sy = 2, max_downsample 1). In each transformer block at the latents' full
resolution, before the self-attention, the block's tokens are split into destinations (the
top-left token of every 2 x 2 cell) and sources (the rest); the `int(N * ratio)` sources most
similar to a destination (cosine similarity of the block's input tokens) are averaged into it;
the self-attention runs over the fewer tokens left, and its output is spread back: a merged
source takes its destination's output. Cross-attention and the feed-forward see every token.
Fewer tokens make the self-attention cheaper (quadratically) and change the image a little.

The UNet traces its blocks inside `applied(ratio, latent_size)`; blocks read it at trace time
(`merging`), so every compiled program has its token counts fixed. The matching is computed in
float32 whatever the networks' dtype (tomesd: in theirs).
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

# tomesd's defaults, which A1111 keeps: one destination per 2 x 2 cell, full resolution only.
STRIDE = 2
MAX_DOWNSAMPLE = 1

_SETTING = contextvars.ContextVar("sdjax_token_merging", default=None)


def check_ratio(name: str, value) -> float:
  """A ratio of tokens to merge, a number in [0, 1) (A1111's setting's range is [0, 0.9])."""
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
    raise ValueError(f"{name} must be a number from 0 (off) to below 1 (the share of a block's "
                     f"tokens merged), got {value!r}")
  return float(value)


@contextlib.contextmanager
def applied(ratio: float, latent_size: tuple[int, int]):
  """Transformer blocks traced inside merge `ratio` of their tokens (0: none); `latent_size`
  (h, w): the UNet's input, whose resolution the merging blocks have."""
  token = _SETTING.set((float(ratio), tuple(latent_size)) if ratio > 0 else None)
  try:
    yield
  finally:
    _SETTING.reset(token)


def setting() -> tuple[float, tuple[int, int]] | None:
  """The (ratio, latent size) transformer blocks traced now merge with (None: off)."""
  return _SETTING.get()


def merging(x: jax.Array) -> tuple[Callable, Callable] | None:
  """(merge, unmerge) for a transformer block whose input tokens are `x` [B, N, C], as tomesd's
  `compute_merge` decides them; None where the block keeps its tokens."""
  setting = _SETTING.get()
  if setting is None:
    return None
  ratio, (height, width) = setting
  n = x.shape[1]
  downsample = int(math.ceil(math.sqrt((height * width) // n)))
  if downsample > MAX_DOWNSAMPLE:
    return None
  w, h = int(math.ceil(width / downsample)), int(math.ceil(height / downsample))
  r = int(n * ratio)
  if r <= 0:
    return None
  return bipartite_matching(x, w, h, r)


def _partition(w: int, h: int) -> tuple[np.ndarray, np.ndarray]:
  """(sources, destinations): token indices (row-major over h x w) of tomesd's split without
  randomness: the top-left token of each full 2 x 2 cell is a destination; tokens past the last
  full cell's row or column are sources."""
  dst = np.zeros((h, w), bool)
  dst[:(h // STRIDE) * STRIDE:STRIDE, :(w // STRIDE) * STRIDE:STRIDE] = True
  flat = dst.reshape(-1)
  return np.flatnonzero(~flat), np.flatnonzero(flat)


def bipartite_matching(metric: jax.Array, w: int, h: int, r: int):
  """tomesd's `bipartite_soft_matching_random2d` (no_rand): (merge, unmerge) that take away the
  `r` sources most similar to a destination (each its most similar one) and give them back."""
  n = metric.shape[1]
  a_idx, b_idx = _partition(w, h)
  if len(a_idx) + len(b_idx) != n:
    raise ValueError(f"token merging: {n} tokens are not a {h} x {w} grid")
  r = min(len(a_idx), r)
  m = metric.astype(jnp.float32)
  m = m / jnp.linalg.norm(m, axis=-1, keepdims=True)
  scores = jnp.einsum("bic,bjc->bij", m[:, a_idx], m[:, b_idx],
                      precision=jax.lax.Precision.HIGHEST)
  node_max, node_idx = scores.max(axis=-1), scores.argmax(axis=-1)
  edge_idx = jnp.argsort(-node_max, axis=-1)  # most similar first
  unm_idx, src_idx = edge_idx[:, r:], edge_idx[:, :r]
  dst_idx = jnp.take_along_axis(node_idx, src_idx, axis=-1)  # [B, r]: each merged one's target
  n_dst = len(b_idx)

  def merge(x):
    src, dst = x[:, a_idx], x[:, b_idx]
    unm = jnp.take_along_axis(src, unm_idx[..., None], axis=1)
    moved = jnp.take_along_axis(src, src_idx[..., None], axis=1)

    def mean_into(dst_row, moved_row, targets):  # torch's scatter_reduce "mean", self included
      sums = dst_row.at[targets].add(moved_row)
      counts = jnp.ones((n_dst,), x.dtype).at[targets].add(1)
      return sums / counts[:, None]

    return jnp.concatenate([unm, jax.vmap(mean_into)(dst, moved, dst_idx)], axis=1)

  def unmerge(y):
    kept = unm_idx.shape[1]
    unm, dst = y[:, :kept], y[:, kept:]
    moved = jnp.take_along_axis(dst, dst_idx[..., None], axis=1)
    a = jnp.asarray(a_idx)

    def place(unm_row, dst_row, moved_row, unm_at, src_at):
      out = jnp.zeros((n, y.shape[-1]), y.dtype).at[b_idx].set(dst_row)
      return out.at[a[unm_at]].set(unm_row).at[a[src_at]].set(moved_row)

    return jax.vmap(place)(unm, dst, moved, unm_idx, src_idx)

  return merge, unmerge
