"""The KL autoencoder that maps images to latents and back, as diffusers' `AutoencoderKL`."""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from sdjax.models import config_utils
from sdjax.models.layers import (
    Attention,
    Downsample2D,
    ResnetBlock2D,
    Upsample2D,
    conv,
    group_norm,
)

Dtype = Any
_EPS = 1e-6  # every norm of diffusers' VAE uses this epsilon


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  """The options of `AutoencoderKL` that sdjax implements (diffusers' names)."""

  in_channels: int = 3
  out_channels: int = 3
  down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)
  up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",)
  block_out_channels: tuple[int, ...] = (64,)
  layers_per_block: int = 1
  act_fn: str = "silu"
  latent_channels: int = 4
  norm_num_groups: int = 32
  sample_size: int = 32
  scaling_factor: float = 0.18215
  force_upcast: bool = True  # float16 networks run this VAE in float32 (bfloat16 needs no upcast)
  latents_mean: tuple[float, ...] | None = None  # per-channel latent statistics (both or neither)
  latents_std: tuple[float, ...] | None = None
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  mid_block_add_attention: bool = True

  def __post_init__(self):
    if any(t != "DownEncoderBlock2D" for t in self.down_block_types) or any(
        t != "UpDecoderBlock2D" for t in self.up_block_types
    ):
      raise config_utils.ConfigError("vae block types other than Down/UpEncoderBlock2D are not supported")
    if self.act_fn != "silu":
      raise config_utils.ConfigError(f"vae act_fn {self.act_fn!r} is not supported by sdjax")
    n = len(self.block_out_channels)
    if len(self.down_block_types) != n or len(self.up_block_types) != n:
      raise config_utils.ConfigError("vae block types and block_out_channels differ in length")
    for name in ("latents_mean", "latents_std"):
      value = getattr(self, name)
      if value is not None and len(value) != self.latent_channels:
        raise config_utils.ConfigError(f"vae {name} needs one entry per latent channel")

  @property
  def downscale(self) -> int:
    """Image pixels per latent pixel along each side."""
    return 2 ** (len(self.block_out_channels) - 1)

  @classmethod
  def from_dict(cls, raw: dict[str, Any]) -> VAEConfig:
    return config_utils.build_config(
        cls, raw, component="vae", fixed={"shift_factor": None},
    )

  @property
  def has_latents_stats(self) -> bool:
    return self.latents_mean is not None and self.latents_std is not None

  def compute_dtype(self, dtype):
    """The dtype this VAE runs in when the networks run in `dtype` (diffusers' force_upcast)."""
    return jnp.float32 if self.force_upcast and jnp.dtype(dtype) == jnp.float16 else dtype

  def to_diffusion_latents(self, z):
    """VAE latents [B, h, w, C] -> the scaled latents diffusion runs on."""
    if self.has_latents_stats:
      mean, std = jnp.asarray(self.latents_mean), jnp.asarray(self.latents_std)
      return (z - mean) * self.scaling_factor / std
    return z * self.scaling_factor

  def from_diffusion_latents(self, x):
    """The inverse: what the decoder takes, as diffusers' SDXL pipelines undo the scaling."""
    if self.has_latents_stats:
      mean, std = jnp.asarray(self.latents_mean), jnp.asarray(self.latents_std)
      return x * std / self.scaling_factor + mean
    return x / self.scaling_factor

  def to_dict(self) -> dict[str, Any]:
    return config_utils.to_json_dict(self, "AutoencoderKL")


class _MidBlock(nn.Module):
  """resnet, single-head spatial self-attention, resnet."""

  config: VAEConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    cfg, d, pd = self.config, self.dtype, self.param_dtype
    c = x.shape[-1]
    x = ResnetBlock2D(c, cfg.norm_num_groups, _EPS, dtype=d, param_dtype=pd, name="resnets_0")(x)
    if cfg.mid_block_add_attention:
      b, h, w, _ = x.shape
      attn = Attention(
          heads=1, head_dim=c, qkv_bias=True, upcast=True, norm_groups=cfg.norm_num_groups,
          norm_eps=_EPS, dtype=d, param_dtype=pd, name="attentions_0",
      )
      x = attn(x.reshape(b, h * w, c)).reshape(b, h, w, c)  # B, H, W, C
    return ResnetBlock2D(c, cfg.norm_num_groups, _EPS, dtype=d, param_dtype=pd, name="resnets_1")(x)


class _ResampleBlock(nn.Module):
  """`DownEncoderBlock2D` / `UpDecoderBlock2D`: resnets, then an optional resampler."""

  out_channels: int
  num_layers: int
  resample: bool
  up: bool
  groups: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    d, pd = self.dtype, self.param_dtype
    for j in range(self.num_layers):
      x = ResnetBlock2D(
          self.out_channels, self.groups, _EPS, dtype=d, param_dtype=pd, name=f"resnets_{j}"
      )(x)
    if self.resample and self.up:
      x = Upsample2D(self.out_channels, d, pd, name="upsamplers_0")(x)
    elif self.resample:
      x = Downsample2D(self.out_channels, 0, d, pd, name="downsamplers_0")(x)
    return x


class Encoder(nn.Module):
  config: VAEConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    cfg, d, pd = self.config, self.dtype, self.param_dtype
    channels = cfg.block_out_channels
    x = conv(channels[0], 3, d, pd, "conv_in")(x)
    for i, c in enumerate(channels):
      x = _ResampleBlock(
          c, cfg.layers_per_block, i < len(channels) - 1, False, cfg.norm_num_groups, d, pd,
          name=f"down_blocks_{i}",
      )(x)
    x = _MidBlock(cfg, d, pd, name="mid_block")(x)
    x = nn.silu(group_norm(cfg.norm_num_groups, _EPS, d, pd, "conv_norm_out")(x))
    return conv(2 * cfg.latent_channels, 3, d, pd, "conv_out")(x)  # mean and log-variance


class Decoder(nn.Module):
  config: VAEConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, z):
    cfg, d, pd = self.config, self.dtype, self.param_dtype
    channels = cfg.block_out_channels[::-1]
    x = conv(channels[0], 3, d, pd, "conv_in")(z)
    x = _MidBlock(cfg, d, pd, name="mid_block")(x)
    for i, c in enumerate(channels):
      x = _ResampleBlock(
          c, cfg.layers_per_block + 1, i < len(channels) - 1, True, cfg.norm_num_groups, d, pd,
          name=f"up_blocks_{i}",
      )(x)
    x = nn.silu(group_norm(cfg.norm_num_groups, _EPS, d, pd, "conv_norm_out")(x))
    return conv(cfg.out_channels, 3, d, pd, "conv_out")(x)


@flax.struct.dataclass
class DiagonalGaussian:
  """The encoder's posterior: independent Gaussians per latent element."""

  mean: jax.Array
  logvar: jax.Array

  @property
  def std(self):
    return jnp.exp(0.5 * self.logvar)

  def sample(self, key):
    noise = jax.random.normal(key, self.mean.shape, jnp.float32).astype(self.mean.dtype)
    return self.mean + self.std * noise

  def kl(self):
    """KL divergence to the unit Gaussian, summed over latent elements: [B]."""
    m, lv = self.mean.astype(jnp.float32), self.logvar.astype(jnp.float32)
    return 0.5 * jnp.sum(m**2 + jnp.exp(lv) - 1.0 - lv, axis=(1, 2, 3))


class AutoencoderKL(nn.Module):
  """`encode(x [B,H,W,3]) -> DiagonalGaussian [B,h,w,C]`, `decode(z) -> [B,H,W,3]` (unscaled)."""

  config: VAEConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    cfg, d, pd = self.config, self.dtype, self.param_dtype
    self.encoder = Encoder(cfg, d, pd)
    self.decoder = Decoder(cfg, d, pd)
    if cfg.use_quant_conv:
      self.quant_conv = conv(2 * cfg.latent_channels, 1, d, pd, "quant_conv")
    if cfg.use_post_quant_conv:
      self.post_quant_conv = conv(cfg.latent_channels, 1, d, pd, "post_quant_conv")

  def encode(self, x) -> DiagonalGaussian:
    moments = self.encoder(x.astype(self.dtype))
    if self.config.use_quant_conv:
      moments = self.quant_conv(moments)
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return DiagonalGaussian(mean, jnp.clip(logvar, -30.0, 20.0))

  def decode(self, z):
    z = z.astype(self.dtype)
    if self.config.use_post_quant_conv:
      z = self.post_quant_conv(z)
    return self.decoder(z)

  def __call__(self, x, key=None):
    """Reconstruction: the posterior mean (or a sample when `key` is given), decoded."""
    posterior = self.encode(x)
    z = posterior.mean if key is None else posterior.sample(key)
    return self.decode(z), posterior
