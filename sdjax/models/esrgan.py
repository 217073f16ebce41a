"""The ESRGAN family's super-resolution networks, named as BasicSR's (Real-ESRGAN's) state dicts.

RRDBNet (ESRGAN, Wang et al. 2018): the network of the upscalers A1111 users run most ("R-ESRGAN
4x+", "R-ESRGAN 4x+ Anime6B", and the community's `models/ESRGAN/*.pth`, e.g. 4x-UltraSharp):
`conv_first`, `body.N.rdbK.convJ`, `conv_body`, `conv_upI`, `conv_hr`, `conv_last`; older ESRGAN
files are renamed to these by `checkpoints.upscalers`. SRVGGNetCompact (Real-ESRGAN's small
one: "R-ESRGAN General 4xV3", "R-ESRGAN General WDN 4xV3", "R-ESRGAN AnimeVideo"): `body.N`, a
chain of 3x3 convs and PReLUs ending in a pixel shuffle, added to the nearest enlargement.

The input is an RGB image [B, H, W, C] in [0, 1]; the output is `scale` times larger. Real-ESRGAN's
2x and 1x models run their 4x network on a pixel-unshuffled input (each s x s patch as s*s
channels), reflect-padded to a multiple of s first and cropped back after (as spandrel, A1111's
loader, runs them).
"""

from __future__ import annotations

import dataclasses
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sdjax.models.layers import LoadedParams, conv, conv2d, matmul_conv3x3

_SLOPE = 0.2  # LeakyReLU's negative slope, everywhere in the network
_RESIDUAL = 0.2  # each dense block's and each RRDB's residual scale


@dataclasses.dataclass(frozen=True)
class RRDBNetConfig:
  num_blocks: int = 23  # RRDBs in the body (R-ESRGAN 4x+: 23; its Anime6B: 6)
  num_feat: int = 64
  num_grow: int = 32  # channels each dense-block conv adds
  num_upsample: int = 2  # nearest x2 + conv, each; the network's own factor is 2**this
  unshuffle: int = 1  # the input's pixel-unshuffle factor (Real-ESRGAN x2: 2, x1: 4)
  in_channels: int = 3  # image channels, before unshuffling
  out_channels: int = 3

  @property
  def scale(self) -> int:
    """How many times larger the output is than the input."""
    return 2 ** self.num_upsample // self.unshuffle


def _lrelu(x):
  return nn.leaky_relu(x, _SLOPE)


# How a dense block's convolutions run (`SDJAX_ESRGAN_DENSE` forces one): "concat", each conv on
# the concatenation of the features before it (as written); "incremental", each feature, once
# made, convolved with its slices of all later convs' kernels in one wide matmul over its 9
# shifted copies (a block of rows at a time, which stays in cache), the later convs' outputs
# summed from those parts. The same MACs. On CPU (2 cores, R-ESRGAN 4x+'s widths) one dense block
# took 10.3 / 5.7 ms (concat / incremental) at 2x32x32, 41 / 25 at 2x64x64, but 59 / 69 at
# 1x128x128 and 145 / 164 at 1x192x192 (torch: 5.0, 22.5, 45, 116; incremental in blocks of
# 1024-2048 pixels, one matmul over all rows was 38 ms at 2x64x64 and 220 at 1x192x192):
# incremental up to INCREMENTAL_PIXELS, concat above and on GPUs (cuDNN's; not measured yet).
DENSE_FORMS = ("concat", "incremental")
INCREMENTAL_PIXELS = 8192
_MATMUL_ROWS_PIXELS = 2048  # pixels per block of rows in the incremental form


def dense_form(pixels: int) -> str:
  """The form for a block on `pixels` pixels (batch x height x width) on the default backend."""
  forced = os.environ.get("SDJAX_ESRGAN_DENSE")
  if forced:
    if forced not in DENSE_FORMS:
      raise ValueError(f"SDJAX_ESRGAN_DENSE must be one of {', '.join(DENSE_FORMS)}, got "
                       f"{forced!r}")
    return forced
  small = pixels <= INCREMENTAL_PIXELS
  return "incremental" if small and jax.default_backend() == "cpu" else "concat"


class _ConvWeights(LoadedParams, nn.Module):
  """A 3x3 convolution's parameters (kernel HWIO, bias), for arithmetic done by its block."""

  features: int
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, in_features: int):
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (3, 3, in_features, self.features), self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), self.param_dtype)
    return kernel, bias


class ResidualDenseBlock(nn.Module):
  """Five 3x3 convs, each seeing the block's input and every earlier conv's output."""

  num_feat: int
  num_grow: int
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    widths = [self.num_feat] + [self.num_grow] * 4  # the features: x, x1 .. x4
    outs = [self.num_grow] * 4 + [self.num_feat]  # conv1 .. conv5
    weights = [_ConvWeights(outs[j], self.param_dtype, name=f"conv{j + 1}")(sum(widths[:j + 1]))
               for j in range(5)]
    weights = [(k.astype(self.dtype), b.astype(self.dtype)) for k, b in weights]
    x = x.astype(self.dtype)
    if dense_form(x.shape[0] * x.shape[1] * x.shape[2]) == "concat":
      features = [x]
      for j, (kernel, bias) in enumerate(weights):
        y = conv2d(jnp.concatenate(features, -1), kernel, 1, ((1, 1), (1, 1))) + bias
        features.append(_lrelu(y) if j < 4 else y)
      return features[-1] * _RESIDUAL + x
    pending, feature, start = [b for _, b in weights], x, 0
    for j, width in enumerate(widths):
      # this feature's slices of the kernels of conv j+1 .. conv5, side by side: O = their outs
      kernel = jnp.concatenate([k[:, :, start:start + width] for k, _ in weights[j:]], -1)
      parts = jnp.split(matmul_conv3x3(feature, kernel, _MATMUL_ROWS_PIXELS),
                        np.cumsum(outs[j:-1]), -1)
      pending[j:] = [p + part for p, part in zip(pending[j:], parts, strict=True)]
      start += width
      if j < 4:
        feature = _lrelu(pending[j])
    return pending[4] * _RESIDUAL + x


class RRDB(nn.Module):
  """Residual in residual dense block: three dense blocks, the sum scaled back onto the input."""

  num_feat: int
  num_grow: int
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    out = x
    for k in range(1, 4):
      out = ResidualDenseBlock(self.num_feat, self.num_grow, self.dtype, self.param_dtype,
                               name=f"rdb{k}")(out)
    return out * _RESIDUAL + x


class RRDBNet(nn.Module):
  config: RRDBNetConfig
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, images):
    """images [B, H, W, C] in [0, 1] -> [B, H * scale, W * scale, C] (not clipped)."""
    cfg, dt, pdt = self.config, self.dtype, self.param_dtype
    h, w = images.shape[1:3]
    x = _pixel_unshuffle(images.astype(dt), cfg.unshuffle)
    feat = conv(cfg.num_feat, 3, dt, pdt, "conv_first")(x)
    body = feat
    for n in range(cfg.num_blocks):
      body = RRDB(cfg.num_feat, cfg.num_grow, dt, pdt, name=f"body_{n}")(body)
    feat = feat + conv(cfg.num_feat, 3, dt, pdt, "conv_body")(body)
    for i in range(1, cfg.num_upsample + 1):
      feat = jnp.repeat(jnp.repeat(feat, 2, axis=1), 2, axis=2)  # nearest x2
      feat = _lrelu(conv(cfg.num_feat, 3, dt, pdt, f"conv_up{i}")(feat))
    out = conv(cfg.out_channels, 3, dt, pdt, "conv_last")(
        _lrelu(conv(cfg.num_feat, 3, dt, pdt, "conv_hr")(feat)))
    return out[:, :h * cfg.scale, :w * cfg.scale]


@dataclasses.dataclass(frozen=True)
class SRVGGNetConfig:
  num_feat: int = 64
  num_conv: int = 32  # 3x3 convs between the first and the last (General 4xV3: 32; AnimeVideo: 16)
  upscale: int = 4
  in_channels: int = 3
  out_channels: int = 3

  @property
  def scale(self) -> int:
    return self.upscale


class _PReLU(LoadedParams, nn.Module):
  """torch's PReLU with a slope per channel (`weight`)."""

  features: int
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    slope = self.param("weight", nn.initializers.constant(0.25), (self.features,),
                       self.param_dtype).astype(x.dtype)
    return jnp.where(x >= 0, x, slope * x)


class SRVGGNetCompact(nn.Module):
  config: SRVGGNetConfig
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, images):
    """images [B, H, W, C] in [0, 1] -> [B, H * scale, W * scale, C] (not clipped)."""
    cfg, dt, pdt = self.config, self.dtype, self.param_dtype
    x = images.astype(dt)
    out = x
    for i in range(cfg.num_conv + 1):  # body.0, 2, ...: convs; body.1, 3, ...: their PReLUs
      out = conv(cfg.num_feat, 3, dt, pdt, f"body_{2 * i}")(out)
      out = _PReLU(cfg.num_feat, pdt, name=f"body_{2 * i + 1}")(out)
    s = cfg.upscale
    out = conv(cfg.out_channels * s * s, 3, dt, pdt, f"body_{2 * cfg.num_conv + 2}")(out)
    b, h, w, _ = out.shape
    # torch's pixel_shuffle: channel c * s * s + i * s + j is pixel (i, j) of channel c's block.
    out = out.reshape(b, h, w, cfg.out_channels, s, s).transpose(0, 1, 4, 2, 5, 3)  # B,h,i,w,j,C
    out = out.reshape(b, h * s, w * s, cfg.out_channels)
    return out + jnp.repeat(jnp.repeat(x, s, axis=1), s, axis=2)  # + the nearest enlargement


def network(config):
  """The module of a config: RRDBNet or SRVGGNetCompact."""
  return SRVGGNetCompact(config) if isinstance(config, SRVGGNetConfig) else RRDBNet(config)


def _pixel_unshuffle(x, s: int):
  """[B, H, W, C] -> [B, ceil(H/s), ceil(W/s), C*s*s] in torch's pixel_unshuffle channel order
  (c, i, j), reflect-padded at the bottom and right to a multiple of s first."""
  if s == 1:
    return x
  b, h, w, c = x.shape
  ph, pw = -h % s, -w % s
  if ph or pw:
    x = jnp.pad(x, ((0, 0), (0, ph), (0, pw), (0, 0)), mode="reflect")
  h, w = h + ph, w + pw
  x = x.reshape(b, h // s, s, w // s, s, c)  # B, h, i, w, j, C
  x = x.transpose(0, 1, 3, 5, 2, 4)  # B, h, w, C, i, j
  return x.reshape(b, h // s, w // s, c * s * s)


def init_params(config, seed: int = 0, size: int = 16):
  """Random parameters of either network (tests and benchmarks)."""
  x = jnp.zeros((1, size, size, config.in_channels), jnp.float32)
  return network(config).init(jax.random.key(seed), x)["params"]
