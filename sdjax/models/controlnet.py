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

from sdjax.models import config_utils
from sdjax.models.layers import Dtype, conv
from sdjax.models.unet import _FIXED_OPTIONS, UNet2DConditionModel, UNetConfig

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
    x, skips = self._down_and_mid(x, temb, context.astype(d), context_bias)
    down = [conv(s.shape[-1], 1, d, pd, f"controlnet_down_blocks_{k}")(s)
            for k, s in enumerate(skips)]
    mid = conv(x.shape[-1], 1, d, pd, "controlnet_mid_block")(x)
    if guess_mode and not cfg.global_pool_conditions:
      scales = jnp.logspace(-1.0, 0.0, len(down) + 1, dtype=jnp.float32) * conditioning_scale
      scales = scales.astype(d)
      down, mid = [r * scales[k] for k, r in enumerate(down)], mid * scales[-1]
    else:
      scale = jnp.asarray(conditioning_scale, d)
      down, mid = [r * scale for r in down], mid * scale
    if cfg.global_pool_conditions:
      down = [jnp.mean(r, axis=(1, 2), keepdims=True) for r in down]
      mid = jnp.mean(mid, axis=(1, 2), keepdims=True)
    return down, mid
