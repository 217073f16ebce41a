"""IP-Adapter image projections: CLIP image features -> tokens the UNet's cross-attention reads.

An IP-Adapter (arXiv:2308.06721) conditions the UNet on an image: a CLIP image encoder's output
is projected to a few tokens of the UNet's context width, and every cross-attention layer attends
to them with keys and values of its own (`to_k_ip`, `to_v_ip`, see `layers.Attention`), adding
`scale` times that attention's output to the text's. The projections, as diffusers names them:

- "image" (`ImageProjection`, ip-adapter_sd15, ip-adapter_sdxl): the projected image embedding
  [B, E] -> a linear layer -> `num_tokens` tokens -> LayerNorm.
- "plus" (`IPAdapterPlusImageProjection`, the ip-adapter-plus models): the encoder's penultimate
  hidden states [B, N, E] resampled by learned query tokens through perceiver-attention layers.
- "full" (`IPAdapterFullImageProjection`, ip-adapter-full-face): those hidden states through a
  GELU MLP and a LayerNorm, one token per encoder token.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sdjax.models import attention
from sdjax.models.layers import LoadedParams, dense, layer_norm

Dtype = Any

KINDS = ("image", "plus", "full")


@dataclasses.dataclass(frozen=True)
class IPAdapterConfig:
  """An image projection's shape (read from its weights: IP-Adapter files carry no config)."""

  kind: str  # one of KINDS
  image_embed_dim: int  # the image encoder's: image_embeds width ("image"), hidden width else
  cross_attention_dim: int  # the UNet's context width
  num_tokens: int  # tokens per image ("full": the image encoder's, class token included)
  # "plus": the resampler's width, layers, heads (of 64 channels) and feed-forward width.
  hidden_dims: int = 0
  depth: int = 0
  heads: int = 0
  ff_dim: int = 0
  head_dim: int = 64

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"unknown IP-Adapter projection {self.kind!r} ({', '.join(KINDS)})")

  @property
  def uses_hidden_states(self) -> bool:
    """Whether it reads the image encoder's penultimate hidden states (else its image_embeds)."""
    return self.kind != "image"


class _PerceiverBlock(nn.Module):
  """One resampler layer: the queries attend to [image features, queries], then a GELU MLP."""

  config: IPAdapterConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, latents):
    cfg, d, pd = self.config, self.dtype, self.param_dtype
    b, q = latents.shape[:2]
    inner = cfg.heads * cfg.head_dim
    features = layer_norm(1e-5, d, pd, "ln0")(x)
    queries = layer_norm(1e-5, d, pd, "ln1")(latents)
    both = jnp.concatenate([features, queries], axis=1)  # B, N + Q, H

    def proj(name, y):
      return dense(inner, d, pd, name, use_bias=False)(y).reshape(b, -1, cfg.heads, cfg.head_dim)

    out = attention.dot_product_attention(proj("to_q", queries), proj("to_k", both),
                                          proj("to_v", both), kernel="einsum")  # B, Q, h, D
    latents = latents + dense(cfg.hidden_dims, d, pd, "to_out_0", use_bias=False)(
        out.reshape(b, q, inner))
    h = layer_norm(1e-5, d, pd, "ff_norm")(latents)
    h = jax.nn.gelu(dense(cfg.ff_dim, d, pd, "ff_in", use_bias=False)(h), approximate=False)
    return latents + dense(cfg.hidden_dims, d, pd, "ff_out", use_bias=False)(h)


class ImageProjection(LoadedParams, nn.Module):
  """Image features -> context tokens [B, T, cross_attention_dim]: `image_embeds` [B, E] for
  "image", the image encoder's penultimate hidden states [B, N, E] for "plus" and "full"."""

  config: IPAdapterConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, features):
    cfg, d, pd = self.config, self.dtype, self.param_dtype
    features = features.astype(d)
    b = features.shape[0]
    if cfg.kind == "image":
      x = dense(cfg.num_tokens * cfg.cross_attention_dim, d, pd, "proj")(features)
      return layer_norm(1e-5, d, pd, "norm")(x.reshape(b, cfg.num_tokens, -1))
    if cfg.kind == "full":
      h = jax.nn.gelu(dense(cfg.image_embed_dim, d, pd, "ff_in")(features), approximate=False)
      return layer_norm(1e-5, d, pd, "norm")(dense(cfg.cross_attention_dim, d, pd, "ff_out")(h))
    latents = self.param("latents", nn.initializers.normal(cfg.hidden_dims ** -0.5),
                         (1, cfg.num_tokens, cfg.hidden_dims), pd)
    latents = jnp.broadcast_to(latents.astype(d), (b, *latents.shape[1:]))
    x = dense(cfg.hidden_dims, d, pd, "proj_in")(features)
    for i in range(cfg.depth):
      latents = _PerceiverBlock(cfg, d, pd, name=f"layers_{i}")(x, latents)
    x = dense(cfg.cross_attention_dim, d, pd, "proj_out")(latents)
    return layer_norm(1e-5, d, pd, "norm_out")(x)
