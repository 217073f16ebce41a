"""ControlNet (Zhang et al. 2023), as diffusers' `ControlNetModel`: a copy of the UNet's time
embedding, input convolution, down blocks and mid block, whose input also gets a small conv net's
embedding of the control image (edges, pose, depth, ...), and whose skips and mid output go through
zero-initialised 1x1 convolutions into residuals the UNet adds to its own (`UNet2DConditionModel`'s
`down_residuals`, `mid_residual`). NHWC; SD1/SD2 and SDXL layouts (the UNet's options).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from sdjax.models import config_utils
from sdjax.models.attention import dot_product_attention
from sdjax.models.layers import Dtype, LoadedParams, conv, dense, layer_norm, timestep_embedding
from sdjax.models.unet import _FIXED_OPTIONS, TimestepEmbedding, UNet2DConditionModel, UNetConfig

_CHANNEL_ORDERS = ("rgb", "bgr")


@dataclasses.dataclass(frozen=True)
class ControlNetConfig(UNetConfig):
  """The UNet options a ControlNet shares (its up path unused) and its own (diffusers' names)."""

  conditioning_channels: int = 3
  conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 96, 256)
  global_pool_conditions: bool = False
  controlnet_conditioning_channel_order: str = "rgb"

  def __post_init__(self):
    super().__post_init__()
    if self.controlnet_conditioning_channel_order not in _CHANNEL_ORDERS:
      raise config_utils.ConfigError(
          f"controlnet_conditioning_channel_order "
          f"{self.controlnet_conditioning_channel_order!r} is not one of {_CHANNEL_ORDERS}")

  @property
  def downscale_control(self) -> int:
    """How much smaller than the control image the latents are."""
    return 2 ** (len(self.conditioning_embedding_out_channels) - 1)

  @classmethod
  def from_dict(cls, raw: dict[str, Any]) -> ControlNetConfig:
    raw = dict(raw)
    down = raw.get("down_block_types", UNetConfig.down_block_types)
    # No up path; UNetConfig's checks want one block type per level: the UNet's mirror.
    raw["up_block_types"] = [t.replace("Down", "Up") for t in reversed(down)]
    return config_utils.build_config(cls, raw, component="controlnet", fixed=_FIXED_OPTIONS)


class ControlNetConditioningEmbedding(nn.Module):
  """The control image [B, H, W, c] -> features at the latents' size: 3x3 convolutions with SiLU,
  each level a same-size one and a stride-2 one, then one to the UNet's first width."""

  out_channels: int
  channels: tuple[int, ...]
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    d, pd = self.dtype, self.param_dtype
    x = nn.silu(conv(self.channels[0], 3, d, pd, "conv_in")(x))
    for i in range(len(self.channels) - 1):
      x = nn.silu(conv(self.channels[i], 3, d, pd, f"blocks_{2 * i}")(x))
      x = nn.silu(conv(self.channels[i + 1], 3, d, pd, f"blocks_{2 * i + 1}", stride=2)(x))
    return conv(self.out_channels, 3, d, pd, "conv_out")(x)


class ControlNetModel(UNet2DConditionModel):
  """(down residuals, mid residual) for latents x [B, h, w, C] at timesteps t [B], context,
  and a control image [B, 8h, 8w, c] in [0, 1], each scaled by `conditioning_scale`; with
  `guess_mode` (diffusers'; static), the residuals from the first to the mid one are further
  scaled from 0.1 to 1, log-evenly (not for pooled conditions)."""

  config: ControlNetConfig

  @nn.compact
  def __call__(self, sample, timesteps, context, controlnet_cond, conditioning_scale=1.0,
               text_embeds=None, time_ids=None, context_bias=None, timestep_cond=None,
               guess_mode: bool = False):
    cfg, d, pd = self.config, self.dtype, self.param_dtype
    temb = self._time_embedding(sample, timesteps, text_embeds, time_ids, timestep_cond)
    x = self._conv_in(sample)
    control = controlnet_cond.astype(d)
    if cfg.controlnet_conditioning_channel_order == "bgr":
      control = control[..., ::-1]
    x = x + ControlNetConditioningEmbedding(
        cfg.block_out_channels[0], cfg.conditioning_embedding_out_channels, d, pd,
        name="controlnet_cond_embedding")(control)
    return self._residuals(x, temb, context, context_bias, conditioning_scale, guess_mode)

  def _residuals(self, x, temb, context, context_bias, conditioning_scale, guess_mode: bool,
                 scale_residuals: bool = True):
    """The down path and mid block from input features x, through the zero convolutions, as
    diffusers scales them: by `conditioning_scale` (unless not `scale_residuals`: a union's
    several images, already weighed), in guess mode also from 0.1 to 1; pooled conditions
    averaged."""
    cfg, d, pd = self.config, self.dtype, self.param_dtype
    x, skips = self._down_and_mid(x, temb, context.astype(d), context_bias)
    down = [conv(s.shape[-1], 1, d, pd, f"controlnet_down_blocks_{k}")(s)
            for k, s in enumerate(skips)]
    mid = conv(x.shape[-1], 1, d, pd, "controlnet_mid_block")(x)
    if guess_mode and not cfg.global_pool_conditions:
      scales = jnp.logspace(-1.0, 0.0, len(down) + 1, dtype=jnp.float32)
      scales = (scales * conditioning_scale if scale_residuals else scales).astype(d)
      down, mid = [r * scales[k] for k, r in enumerate(down)], mid * scales[-1]
    elif scale_residuals:
      scale = jnp.asarray(conditioning_scale, d)
      down, mid = [r * scale for r in down], mid * scale
    if cfg.global_pool_conditions:
      down = [jnp.mean(r, axis=(1, 2), keepdims=True) for r in down]
      mid = jnp.mean(mid, axis=(1, 2), keepdims=True)
    return down, mid


# The control types of xinsir's ControlNet++ union models (controlnet-union-sdxl-1.0; the first
# six in the original, all eight in promax), as their model card numbers them; several names
# share a type (the preprocessors a type was trained on).
UNION_CONTROL_TYPES = {
    "openpose": 0, "depth": 1, "hed": 2, "pidi": 2, "scribble": 2, "ted": 2, "softedge": 2,
    "canny": 3, "lineart": 3, "anime_lineart": 3, "mlsd": 3, "normal": 4, "segment": 5,
    "tile": 6, "repaint": 7, "inpaint": 7,
}


@dataclasses.dataclass(frozen=True)
class ControlNetUnionConfig(ControlNetConfig):
  """diffusers' `ControlNetUnionModel` (ControlNet++): a ControlNet whose control images each
  come with a control type (a learned task embedding, and all types in the time vector), fused
  by a small transformer before the down path. SDXL layout."""

  conditioning_embedding_out_channels: tuple[int, ...] = (48, 96, 192, 384)
  num_control_type: int = 6
  num_trans_channel: int = 320
  num_trans_head: int = 8
  num_trans_layer: int = 1
  num_proj_channel: int = 320

  def __post_init__(self):
    super().__post_init__()
    width = self.block_out_channels[0]
    if self.controlnet_conditioning_channel_order != "rgb":
      raise config_utils.ConfigError("a ControlNet union takes rgb control images only")
    if self.num_trans_channel != width or self.num_proj_channel != width:
      raise config_utils.ConfigError(
          f"ControlNet union num_trans_channel ({self.num_trans_channel}) and num_proj_channel "
          f"({self.num_proj_channel}) must be the first block's width ({width})")
    if self.num_trans_channel % self.num_trans_head:
      raise config_utils.ConfigError(
          f"ControlNet union num_trans_head ({self.num_trans_head}) must divide "
          f"num_trans_channel ({self.num_trans_channel})")
    if not self.addition_time_embed_dim:
      raise config_utils.ConfigError("a ControlNet union needs addition_time_embed_dim")


def union_control_type(value: int | str, num_control_type: int) -> int:
  """A control type's index: an int, or a name of `UNION_CONTROL_TYPES` (or its digits)."""
  if isinstance(value, str):
    name = value.strip().lower().replace("-", "_").replace(" ", "_")
    if name.isdigit():
      index = int(name)
    elif name in UNION_CONTROL_TYPES:
      index = UNION_CONTROL_TYPES[name]
    else:
      raise ValueError(f"unknown ControlNet union control type {value!r} (a number below "
                       f"{num_control_type}, or one of {', '.join(UNION_CONTROL_TYPES)})")
  else:
    index = int(value)
  if not 0 <= index < num_control_type:
    raise ValueError(f"ControlNet union control type {value!r} is {index}: this model has "
                     f"types 0 to {num_control_type - 1}")
  return index


class _QuickGeluMlp(nn.Module):
  """CLIP's MLP: linear, x * sigmoid(1.702 x), linear."""

  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    h = dense(4 * c, self.dtype, self.param_dtype, "c_fc")(x)
    return dense(c, self.dtype, self.param_dtype, "c_proj")(h * nn.sigmoid(1.702 * h))


class _MultiheadAttention(LoadedParams, nn.Module):
  """Self-attention over tokens [B, L, C] in `torch.nn.MultiheadAttention`'s weight layout
  (`in_proj_weight` [3C, C], `in_proj_bias`, `out_proj`)."""

  heads: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    d, pd = self.dtype, self.param_dtype
    b, n, c = x.shape
    w = self.param("in_proj_weight", nn.initializers.lecun_normal(), (3 * c, c), pd)
    bias = self.param("in_proj_bias", nn.initializers.zeros, (3 * c,), pd)
    qkv = jnp.einsum("blc,oc->blo", x, w.astype(d)) + bias.astype(d)
    q, k, v = (t.reshape(b, n, self.heads, c // self.heads) for t in jnp.split(qkv, 3, -1))
    out = dot_product_attention(q, k, v, kernel="einsum").reshape(b, n, c)
    return dense(c, d, pd, "out_proj")(out)


class _UnionAttentionBlock(nn.Module):
  """A pre-norm transformer layer (QuickGELU MLP) over one image's tokens [B, L, C].

  diffusers' `ControlNetUnionModel` hands its [B, L, C] tokens to a `MultiheadAttention` that is
  not batch-first, so there each token attends across the batch (the guidance pair and the other
  prompts' rows) and an image depends on its batch-mates. Here each image's tokens attend to
  each other, as ComfyUI and Forge run these models: an image is the same in any batch and on
  any number of devices."""

  heads: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    d, pd = self.dtype, self.param_dtype
    x = x + _MultiheadAttention(self.heads, d, pd, name="attn")(layer_norm(1e-5, d, pd, "ln_1")(x))
    return x + _QuickGeluMlp(d, pd, name="mlp")(layer_norm(1e-5, d, pd, "ln_2")(x))


class ControlNetUnionModel(ControlNetModel):
  """diffusers' `ControlNetUnionModel` for control images of `control_types` (static; one
  image per type, stacked on channels [B, 8h, 8w, 3 * len(control_types)]).

  Each image's embedding (the ControlNet's conditioning embedding, shared) is pooled to a token
  and given its type's task embedding; the tokens and the latents' pooled token go through the
  transformer, which gives each image a per-channel shift; the images' embeddings plus their
  shifts are added to the latents' input features. The types are also in the time vector (a
  sinusoidal embedding of their multi-hot vector). With several images of one model, each
  image's features are scaled by `conditioning_scale` and the residuals are not, unless
  `from_multi` (the model is one of several control models, diffusers' `MultiControlNetUnionModel`):
  then, as with one image, the residuals are scaled.
  """

  config: ControlNetUnionConfig
  control_types: tuple[int, ...] = ()
  from_multi: bool = False

  @nn.compact
  def __call__(self, sample, timesteps, context, controlnet_cond, conditioning_scale=1.0,
               text_embeds=None, time_ids=None, context_bias=None, timestep_cond=None,
               guess_mode: bool = False):
    cfg, d, pd = self.config, self.dtype, self.param_dtype
    types = self.control_types
    if not types:
      raise ValueError("a ControlNet union needs its control types (with_control_type)")
    k, c = len(types), cfg.conditioning_channels
    if controlnet_cond.shape[-1] != k * c:
      raise ValueError(f"a ControlNet union of {k} control types takes {k * c} channels (one "
                       f"image per type), got {controlnet_cond.shape[-1]}")
    b = sample.shape[0]
    hot = np.zeros(cfg.num_control_type, np.float32)
    hot[list(types)] = 1
    control_emb = timestep_embedding(jnp.asarray(hot), cfg.addition_time_embed_dim,
                                     cfg.flip_sin_to_cos, cfg.freq_shift).reshape(1, -1)
    control_emb = TimestepEmbedding(cfg.block_out_channels[0] * 4, d, pd,
                                    name="control_add_embedding")(control_emb.astype(d))
    temb = self._time_embedding(sample, timesteps, text_embeds, time_ids, timestep_cond,
                                extra=jnp.broadcast_to(control_emb, (b, control_emb.shape[-1])))
    x = self._conv_in(sample)
    scaled = not (self.from_multi or k == 1)  # each image's features times the scale
    scale = jnp.asarray(conditioning_scale, d)
    embed = ControlNetConditioningEmbedding(
        cfg.block_out_channels[0], cfg.conditioning_embedding_out_channels, d, pd,
        name="controlnet_cond_embedding")
    task = self.param("task_embedding", nn.initializers.normal(cfg.num_trans_channel ** 0.5),
                      (cfg.num_control_type, cfg.num_trans_channel), pd).astype(d)
    tokens, conditions = [], []
    for j, t in enumerate(types):
      condition = embed(controlnet_cond[..., j * c:(j + 1) * c].astype(d))
      token = jnp.mean(condition, axis=(1, 2)) + task[t]
      if scaled:
        token, condition = token * scale, condition * scale
      tokens.append(token)
      conditions.append(condition)
    tokens.append(jnp.mean(x, axis=(1, 2)))
    seq = jnp.stack(tokens, axis=1)
    for i in range(cfg.num_trans_layer):
      seq = _UnionAttentionBlock(cfg.num_trans_head, d, pd, name=f"transformer_layes_{i}")(seq)
    project = dense(cfg.num_proj_channel, d, pd, "spatial_ch_projs")
    fused = x * 0.0
    for j, condition in enumerate(conditions):
      alpha = project(seq[:, j])[:, None, None, :]
      fused = fused + (condition + (alpha * scale if scaled else alpha))
    return self._residuals(x + fused, temb, context, context_bias, conditioning_scale,
                           guess_mode, scale_residuals=not scaled)
