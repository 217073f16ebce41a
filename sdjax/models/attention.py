"""Scaled dot-product attention kernels, chosen per backend by measurement.

All take q [B, N, H, D], k and v [B, M, H, D] and return [B, N, H, D]. The softmax always runs in
float32; `upcast` also computes the scores from float32 q and k (diffusers' `upcast_attention`).

Measured on a 2-core CPU (B=2, N=M=4096, H=8, D=40, float32, median of 3): plain einsum 2.18 s,
queries in chunks of 512 1.81 s, of 1024 1.88 s, XLA's `jax.nn.dot_product_attention` 3.73 s. So
long sequences attend in query chunks, which also bounds the score matrix's memory for large
images; the result is the same per query, only evaluated in slices.

On GPUs, XLA's fused attention is used, with cuDNN's flash kernel for 16-bit inputs where
head dims allow (see BENCHMARKS.md for the measurements). `SDJAX_ATTENTION` (einsum, chunked,
xla, cudnn) forces one kernel, for benchmarking.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp

QUERY_CHUNK = 512  # queries per slice once a sequence is long
CHUNK_FROM = 2048  # sequences at least this long attend in slices


def _einsum_attention(q, k, v, upcast: bool):
  dtype = q.dtype
  scale = q.shape[-1] ** -0.5
  if upcast:
    q, k = q.astype(jnp.float32), k.astype(jnp.float32)
  scores = jnp.einsum("bnhd,bmhd->bhnm", q * jnp.asarray(scale, q.dtype), k)  # B, H, N, M
  probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(v.dtype)
  return jnp.einsum("bhnm,bmhd->bnhd", probs, v).astype(dtype)  # B, N, H, D


def _chunked_attention(q, k, v, upcast: bool, chunk: int):
  b, n, h, d = q.shape
  slices = q.reshape(b, n // chunk, chunk, h, d).transpose(1, 0, 2, 3, 4)  # S, B, chunk, H, D
  out = jax.lax.map(lambda qs: _einsum_attention(qs, k, v, upcast), slices)
  return out.transpose(1, 0, 2, 3, 4).reshape(b, n, h, -1)  # B, N, H, D


def _xla_attention(q, k, v, upcast: bool, implementation: str | None):
  dtype = q.dtype
  if upcast:
    q, k, v = q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32)
  return jax.nn.dot_product_attention(q, k, v, implementation=implementation).astype(dtype)


def _cudnn_ok(q, upcast: bool) -> bool:
  d = q.shape[-1]
  return not upcast and q.dtype in (jnp.bfloat16, jnp.float16) and d <= 128 and d % 8 == 0


def choose_kernel(q, upcast: bool = False, chunk: int = QUERY_CHUNK,
                  chunk_from: int = CHUNK_FROM) -> str:
  """Which kernel attends for q [B, N, H, D] on the default backend."""
  n = q.shape[1]
  forced = os.environ.get("SDJAX_ATTENTION")
  if forced == "cudnn" and not _cudnn_ok(q, upcast):
    forced = "xla"
  if forced == "chunked" and n % chunk:
    forced = "einsum"
  if forced:
    return forced
  if jax.default_backend() == "gpu":
    return "cudnn" if _cudnn_ok(q, upcast) else "xla"
  return "chunked" if n >= chunk_from and n % chunk == 0 else "einsum"


def dot_product_attention(q, k, v, *, upcast: bool = False, chunk: int = QUERY_CHUNK,
                          chunk_from: int = CHUNK_FROM):
  """Attention with the kernel that measured fastest for this shape and backend."""
  kernel = choose_kernel(q, upcast, chunk, chunk_from)
  if kernel == "chunked":
    return _chunked_attention(q, k, v, upcast, chunk)
  if kernel == "xla":
    return _xla_attention(q, k, v, upcast, None)
  if kernel == "cudnn":
    return _xla_attention(q, k, v, upcast, "cudnn")
  if kernel != "einsum":
    raise ValueError(f"unknown attention kernel {kernel!r} (einsum, chunked, xla, cudnn)")
  return _einsum_attention(q, k, v, upcast)
