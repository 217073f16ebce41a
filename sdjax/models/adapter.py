"""T2I-Adapter (Mou et al. 2023), as diffusers' `T2IAdapter`: a small conv net that turns a
control image (edges, depth, sketch, pose, colour, ...) into one feature map per UNet level, which
the UNet adds inside its down path (`UNet2DConditionModel`'s `intrablock_residuals`, diffusers'
`down_intrablock_additional_residuals`). Unlike a ControlNet it sees neither the latents nor the
timestep, so its features are computed once per image, not at every step. NHWC; diffusers'
three layouts: "full_adapter" (SD1/SD2), "full_adapter_xl" (SDXL), "light_adapter".
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sdjax.models import config_utils
from sdjax.models.layers import Dtype, conv

ADAPTER_TYPES = ("full_adapter", "full_adapter_xl", "light_adapter")


@dataclasses.dataclass(frozen=True)
class T2IAdapterConfig:
  """diffusers' `T2IAdapter` config (its names and defaults)."""

  in_channels: int = 3
  channels: tuple[int, ...] = (320, 640, 1280, 1280)
  num_res_blocks: int = 2
  downscale_factor: int = 8
  adapter_type: str = "full_adapter"

  def __post_init__(self):
    if self.adapter_type not in ADAPTER_TYPES:
      raise config_utils.ConfigError(f"T2I-Adapter adapter_type {self.adapter_type!r} is not "
                                     f"one of {', '.join(ADAPTER_TYPES)}")

  @property
  def conditioning_channels(self) -> int:
    """Channels of the control image (a ControlNet's name for it)."""
    return self.in_channels

  @property
  def global_pool_conditions(self) -> bool:  # a ControlNet option: adapters never pool
    return False

  @property
  def feature_channels(self) -> tuple[int, ...]:
    """Channels of each feature map, in the order the UNet takes them."""
    if self.adapter_type == "light_adapter":
      return (*self.channels, self.channels[-1])
    return self.channels

  @property
  def total_downscale(self) -> int:
    """How much smaller than the control image the last feature map is."""
    if self.adapter_type == "full_adapter_xl":
      return self.downscale_factor * 2
    downs = len(self.channels) if self.adapter_type == "light_adapter" else len(self.channels) - 1
    return self.downscale_factor * 2 ** downs

  @classmethod
  def from_dict(cls, raw: dict[str, Any]) -> T2IAdapterConfig:
    return config_utils.build_config(cls, raw, component="t2i_adapter", fixed={})

  def to_dict(self) -> dict[str, Any]:
    return config_utils.to_json_dict(self, "T2IAdapter")


def pixel_unshuffle(x, r: int):
  """torch's `pixel_unshuffle` in NHWC: [B, H, W, C] -> [B, H/r, W/r, C*r*r], channel c*r*r +
  i*r + j holding pixel (i, j) of each r x r block of channel c."""
  b, h, w, c = x.shape
  x = x.reshape(b, h // r, r, w // r, r, c).transpose(0, 1, 3, 5, 2, 4)
  return x.reshape(b, h // r, w // r, c * r * r)


def avg_pool_ceil(x):
  """torch's AvgPool2d(2, 2, ceil_mode=True): 2x2 means, an odd side's last window averaging the
  pixels it covers."""
  window, pad = (1, 2, 2, 1), ((0, 0), (0, x.shape[1] % 2), (0, x.shape[2] % 2), (0, 0))
  total = jax.lax.reduce_window(x, 0.0, jax.lax.add, window, window, pad)
  if not (x.shape[1] % 2 or x.shape[2] % 2):
    return total / 4
  count = jax.lax.reduce_window(jnp.ones((1, *x.shape[1:3], 1), x.dtype), 0.0, jax.lax.add,
                                window, window, pad)
  return total / count


class _ResnetBlock(nn.Module):
  """conv, ReLU, conv, plus the input (the full adapter's second conv is 1x1)."""

  channels: int
  second_kernel: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    d, pd = self.dtype, self.param_dtype
    h = nn.relu(conv(self.channels, 3, d, pd, "block1")(x))
    return conv(self.channels, self.second_kernel, d, pd, "block2")(h) + x


class _Block(nn.Module):
  """One level: an optional 2x2 average pool, an optional 1x1 conv to the level's width (the
  light adapter's to a quarter of it, and back after its resnets), the resnets."""

  in_channels: int
  out_channels: int
  num_res_blocks: int
  down: bool
  light: bool
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    d, pd = self.dtype, self.param_dtype
    if self.down:
      x = avg_pool_ceil(x)
    width = self.out_channels // 4 if self.light else self.out_channels
    if self.light or self.in_channels != self.out_channels:
      x = conv(width, 1, d, pd, "in_conv")(x)
    for k in range(self.num_res_blocks):
      x = _ResnetBlock(width, 3 if self.light else 1, d, pd, name=f"resnets_{k}")(x)
    if self.light:
      x = conv(self.out_channels, 1, d, pd, "out_conv")(x)
    return x


class _Adapter(nn.Module):
  config: T2IAdapterConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    cfg, d, pd = self.config, self.dtype, self.param_dtype
    x = pixel_unshuffle(x.astype(d), cfg.downscale_factor)
    ch, n, kind = cfg.channels, cfg.num_res_blocks, cfg.adapter_type
    if kind == "light_adapter":  # (in, out, down) per level
      levels = [(x.shape[-1], ch[0], False)]
      levels += [(ch[i], ch[i + 1], True) for i in range(len(ch) - 1)]
      levels += [(ch[-1], ch[-1], True)]
    else:
      x = conv(ch[0], 3, d, pd, "conv_in")(x)
      if kind == "full_adapter":
        levels = [(ch[0], ch[0], False)] + [(ch[i - 1], ch[i], True) for i in range(1, len(ch))]
      else:  # full_adapter_xl: one downsampling level, the third
        levels = [(ch[i - 1] if i in (1, 2) else ch[i], ch[i], i == 2) for i in range(len(ch))]
    features = []
    for i, (c_in, c_out, down) in enumerate(levels):
      x = _Block(c_in, c_out, n, down, kind == "light_adapter", d, pd, name=f"body_{i}")(x)
      features.append(x)
    return features


class T2IAdapter(nn.Module):
  """Control images [B, H, W, c] in [0, 1] -> the feature maps (a list, NHWC), one per UNet level
  (and one for the mid block with "full_adapter_xl")."""

  config: T2IAdapterConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images):
    return _Adapter(self.config, self.dtype, self.param_dtype, name="adapter")(images)
