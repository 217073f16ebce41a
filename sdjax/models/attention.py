"""Scaled dot-product attention kernels, chosen per backend by measurement.

All take q [B, N, H, D], k and v [B, M, H, D] and an optional additive `bias` broadcastable to
[B, H, N, M] (e.g. [B, 1, 1, M] with a large negative value at padded keys), and return
[B, N, H, D]. The softmax always runs in float32; `upcast` also computes the scores from float32
q and k (diffusers' `upcast_attention`).

On CPU the `blocked` kernel attends one head and one block of 256 queries at a time, with the
softmax over all keys of that block: its scores (256 x M floats, 4 MB at M = 4096) stay in cache,
where the plain einsum writes and rereads all B x H x N x M of them (1 GB at SD1.5's 64x64
latents). On a 2-core CPU (B=2, 8 heads, float32) it does 0.4x the einsum's work at 4096 tokens
and 0.55x at 1024, within 1.0-1.25x of PyTorch's fused SDPA; see BENCHMARKS.md for every kernel
and block size tried, including flash-style online softmax over key blocks (slower here: the
accumulator's rescaling costs more than the smaller blocks save).

On GPUs, XLA's fused attention is used, with cuDNN's flash kernel for 16-bit inputs where
head dims allow. `SDJAX_ATTENTION` (einsum, chunked, blocked, xla, cudnn) forces one kernel, for
benchmarking.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp

QUERY_BLOCK = 256  # blocked: queries per block (per head)
BLOCKED_FROM = 256 * 256  # blocked: from this many scores per head (N x M) on; einsum below
QUERY_CHUNK = 512  # chunked: queries per slice
KERNELS = ("einsum", "chunked", "blocked", "xla", "cudnn")


def _einsum_attention(q, k, v, upcast: bool, bias=None):
  dtype = q.dtype
  scale = q.shape[-1] ** -0.5
  if upcast:
    q, k = q.astype(jnp.float32), k.astype(jnp.float32)
  scores = jnp.einsum("bnhd,bmhd->bhnm", q * jnp.asarray(scale, q.dtype), k)  # B, H, N, M
  scores = scores.astype(jnp.float32)
  if bias is not None:
    scores = scores + bias
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  return jnp.einsum("bhnm,bmhd->bnhd", probs, v).astype(dtype)  # B, N, H, D


def _chunked_attention(q, k, v, upcast: bool, bias=None, chunk: int = QUERY_CHUNK):
  """The einsum kernel over slices of `chunk` queries (N must be a multiple of `chunk`)."""
  b, n, h, d = q.shape
  slices = q.reshape(b, n // chunk, chunk, h, d).transpose(1, 0, 2, 3, 4)  # S, B, chunk, H, D
  if bias is None or bias.shape[2] == 1:
    out = jax.lax.map(lambda qs: _einsum_attention(qs, k, v, upcast, bias), slices)
  else:
    bias = bias.reshape(*bias.shape[:2], n // chunk, chunk, -1).transpose(2, 0, 1, 3, 4)
    out = jax.lax.map(lambda a: _einsum_attention(a[0], k, v, upcast, a[1]), (slices, bias))
  return out.transpose(1, 0, 2, 3, 4).reshape(b, n, h, -1)  # B, N, H, D


def _blocked_attention(q, k, v, upcast: bool, bias=None, block: int = QUERY_BLOCK):
  """One head and `block` queries at a time, softmax over all keys; any N (queries padded)."""
  dtype = q.dtype
  b, n, h, d = q.shape
  m = k.shape[1]
  if upcast:
    q, k = q.astype(jnp.float32), k.astype(jnp.float32)
  block = min(block, n)
  blocks = -(-n // block)
  pad = blocks * block - n
  q = q * jnp.asarray(d**-0.5, q.dtype)
  q = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0))).transpose(0, 2, 1, 3)  # B, H, N', D
  q = q.reshape(b * h * blocks, block, d)  # B*H*blocks, block, D
  k = k.transpose(0, 2, 1, 3).reshape(b * h, m, d)  # B*H, M, D
  v = v.transpose(0, 2, 1, 3).reshape(b * h, m, d)  # B*H, M, D
  head = jnp.arange(b * h * blocks, dtype=jnp.int32) // blocks  # which (b, h) each block is
  bias_rows = bias is not None and bias.shape[2] > 1
  if bias is not None:
    bias = jnp.broadcast_to(bias, (b, h, bias.shape[2], m)).astype(jnp.float32)
    if bias_rows:  # B*H*blocks, block, M
      bias = jnp.pad(bias, ((0, 0), (0, 0), (0, pad), (0, 0))).reshape(-1, block, m)
    else:
      bias = bias.reshape(b * h, 1, m)  # B*H, 1, M

  def attend(xs):
    qs, i, bs = xs
    scores = jnp.einsum("nd,md->nm", qs, k[i], preferred_element_type=jnp.float32)  # block, M
    if bias is not None:
      scores = scores + (bs if bias_rows else bias[i])
    probs = jnp.exp(scores - scores.max(-1, keepdims=True))
    out = jnp.einsum("nm,md->nd", probs.astype(v.dtype), v[i],
                     preferred_element_type=jnp.float32)  # block, D
    return (out / probs.sum(-1, keepdims=True)).astype(dtype)

  out = jax.lax.map(attend, (q, head, bias if bias_rows else head))  # B*H*blocks, block, D
  out = out.reshape(b, h, blocks * block, d)[:, :, :n]  # B, H, N, D
  return out.transpose(0, 2, 1, 3)  # B, N, H, D


def _xla_attention(q, k, v, upcast: bool, bias, implementation: str | None):
  dtype = q.dtype
  if upcast:
    q, k, v = q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32)
  if bias is not None:
    bias = bias.astype(q.dtype)
  return jax.nn.dot_product_attention(q, k, v, bias,
                                      implementation=implementation).astype(dtype)


def _cudnn_ok(q, upcast: bool) -> bool:
  d = q.shape[-1]
  return not upcast and q.dtype in (jnp.bfloat16, jnp.float16) and d <= 128 and d % 8 == 0


def choose_kernel(q, k, upcast: bool = False) -> str:
  """Which kernel attends q [B, N, H, D] to k [B, M, H, D] on the default backend."""
  n, m = q.shape[1], k.shape[1]
  forced = os.environ.get("SDJAX_ATTENTION")
  if forced == "cudnn" and not _cudnn_ok(q, upcast):
    forced = "xla"
  if forced:
    return forced
  if jax.default_backend() == "gpu":
    return "cudnn" if _cudnn_ok(q, upcast) else "xla"
  return "blocked" if n * m >= BLOCKED_FROM else "einsum"


def dot_product_attention(q, k, v, bias=None, *, upcast: bool = False, kernel: str | None = None,
                          block: int = QUERY_BLOCK, chunk: int = QUERY_CHUNK):
  """Attention with `kernel`, or the one that measured fastest for this shape and backend.

  Args:
    q: [B, N, H, D]; k, v: [B, M, H, D].
    bias: None, or additive float [B or 1, H or 1, N or 1, M] (added to the scaled scores).
    upcast: compute the scores from float32 q and k.
    kernel: one of KERNELS; None chooses (`SDJAX_ATTENTION` overrides the choice).
    block: the blocked kernel's queries per block.
    chunk: the chunked kernel's queries per slice (N not a multiple of it: blocked instead).
  """
  if bias is not None:
    bias = jnp.asarray(bias)
    if bias.ndim != 4:
      raise ValueError(f"attention bias must be 4-D [B, H, N, M], got shape {bias.shape}")
  kernel = kernel or choose_kernel(q, k, upcast)
  if kernel == "chunked" and q.shape[1] % chunk:
    kernel = "blocked"
  if kernel == "blocked":
    return _blocked_attention(q, k, v, upcast, bias, block)
  if kernel == "chunked":
    return _chunked_attention(q, k, v, upcast, bias, chunk)
  if kernel == "xla":
    return _xla_attention(q, k, v, upcast, bias, None)
  if kernel == "cudnn":
    return _xla_attention(q, k, v, upcast, bias, "cudnn")
  if kernel != "einsum":
    raise ValueError(f"unknown attention kernel {kernel!r} ({', '.join(KERNELS)})")
  return _einsum_attention(q, k, v, upcast, bias)
