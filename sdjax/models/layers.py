"""Building blocks shared by the UNet and the VAE, named as in diffusers.

Submodule names mirror diffusers' state-dict keys (`norm1`, `conv1`, `to_q`, `to_out_0` for
`to_out.0`) so that weight conversion is a mechanical rename plus a layout change. Everything is
NHWC. `dtype` is the compute dtype; `param_dtype` the dtype parameters are created in.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import os
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from sdjax import interpolate
from sdjax.models import attention, token_merging

Dtype = Any


class LoadedParams:
  """Mixin for a module's `param`: created as flax creates it (same initializer, same random
  stream) but, when the weights are given, returned without flax's shape check. That check
  traces the initializer at every parameter of every apply (a few thousand traces per sampler
  program, ~15% of building one); loading already checked every shape (`torch_to_flax`) and
  `init` makes them."""

  def param(self, name, init_fn, *init_args, unbox=True, **init_kwargs):
    def init():
      return init_fn(self.make_rng("params"), *init_args, **init_kwargs)

    return self.variable("params", name, init, unbox=unbox).value


class GroupNorm(LoadedParams, nn.GroupNorm):
  pass


class LayerNorm(LoadedParams, nn.LayerNorm):
  pass


class Dense(LoadedParams, nn.Dense):
  pass


class Embed(LoadedParams, nn.Embed):
  pass


def group_norm(groups: int, eps: float, dtype: Dtype, param_dtype: Dtype, name: str):
  # use_fast_variance=False: E[(x-mean)^2] as torch computes it, not E[x^2]-mean^2.
  return GroupNorm(
      num_groups=groups,
      epsilon=eps,
      dtype=dtype,
      param_dtype=param_dtype,
      use_fast_variance=False,
      name=name,
  )


def layer_norm(eps: float, dtype: Dtype, param_dtype: Dtype, name: str):
  return LayerNorm(
      epsilon=eps, dtype=dtype, param_dtype=param_dtype, use_fast_variance=False, name=name
  )


def conv(features: int, kernel: int, dtype, param_dtype, name: str, stride: int = 1, padding=None):
  pad = kernel // 2 if padding is None else padding
  return Conv(features, kernel, stride, ((pad, pad), (pad, pad)) if isinstance(pad, int) else pad,
              dtype=dtype, param_dtype=param_dtype, name=name)


# A1111's "Tiling" (seamless images): every convolution of the UNet and the VAE pads circularly
# (torch's padding_mode="circular", as A1111 sets it on each Conv2d) along the axes this names
# ("xy", or "x" / "y" alone: the asymmetric-tiling extension's horizontal or vertical wrap, zeros
# along the other); "": zeros. Read when a program is traced: callers set it from a static
# setting (`circular_padding`).
_CIRCULAR = contextvars.ContextVar("sdjax_circular_padding", default="")
TILING_AXES = ("xy", "x", "y")


def trace_settings() -> tuple:
  """What the networks read when traced besides their inputs and configs: the circular padding
  in force, token merging's setting, the kernels SDJAX_ATTENTION / SDJAX_CONV force. A cached
  trace (`conditioning.apply`) is keyed on it."""
  return (_CIRCULAR.get(), token_merging.setting(), os.environ.get("SDJAX_ATTENTION"),
          os.environ.get("SDJAX_CONV"))


@contextlib.contextmanager
def circular_padding(axes: str):
  """Convolutions traced inside pad circularly along `axes` ("xy", "x", "y"; "": none)."""
  if axes not in ("", *TILING_AXES):
    raise ValueError(f"tiling axes must be one of {', '.join(TILING_AXES)}, got {axes!r}")
  token = _CIRCULAR.set(axes)
  try:
    yield
  finally:
    _CIRCULAR.reset(token)


def _pad_for_tiling(x, padding, axes: str):
  """x padded by `padding` ((top, bottom), (left, right)): circularly along `axes`, with zeros
  along the other (width first, then height, as the asymmetric-tiling extension pads)."""
  (top, bottom), (left, right) = padding
  x = jnp.pad(x, ((0, 0), (0, 0), (left, right), (0, 0)),
              mode="wrap" if "x" in axes else "constant")
  return jnp.pad(x, ((0, 0), (top, bottom), (0, 0), (0, 0)),
                 mode="wrap" if "y" in axes else "constant")


# CPU: a 3x3 convolution with at most this many output pixels in the whole batch, and at least
# CONV_MATMUL_CHANNELS input channels, runs as one matmul over the 9 shifted copies of its input
# (XLA:CPU's convolution is 1.5-2.5x slower on such short, wide problems; BENCHMARKS.md).
CONV_MATMUL_PIXELS = 512
CONV_MATMUL_CHANNELS = 256
CONV_FORMS = ("xla", "matmul")


class Conv(LoadedParams, nn.Module):
  """nn.Conv's parameters (`kernel` HWIO, `bias`) and arithmetic, NHWC, with the convolution
  form chosen per backend and shape (`conv2d`)."""

  features: int
  kernel_size: int
  stride: int = 1
  padding: Any = ((1, 1), (1, 1))
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  use_bias: bool = True

  @nn.compact
  def __call__(self, x):
    k = self.kernel_size
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (k, k, x.shape[-1], self.features), self.param_dtype)
    padding, axes = self.padding, _CIRCULAR.get()
    if axes and any(p for pair in padding for p in pair):  # see circular_padding
      x, padding = _pad_for_tiling(x, padding, axes), ((0, 0), (0, 0))
    if not self.use_bias:
      x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
      return conv2d(x, kernel, self.stride, padding)
    bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), self.param_dtype)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    return conv2d(x, kernel, self.stride, padding) + bias


def choose_conv_form(x, kernel, stride: int, padding) -> str:
  """Which form computes this convolution on the default backend (`SDJAX_CONV` forces one)."""
  forced = os.environ.get("SDJAX_CONV")
  b, h, w, c = x.shape
  pad_one = tuple(map(tuple, padding)) == ((1, 1), (1, 1))
  fits = kernel.shape[:2] == (3, 3) and stride == 1 and pad_one
  if forced:
    return forced if fits else "xla"
  small = b * h * w <= CONV_MATMUL_PIXELS and c >= CONV_MATMUL_CHANNELS
  return "matmul" if fits and small and jax.default_backend() == "cpu" else "xla"


def conv2d(x, kernel, stride: int, padding, form: str | None = None):
  """x [B, H, W, C] convolved with kernel [kh, kw, C, O]; `padding` ((top, bottom), (left,
  right)). `form`: one of CONV_FORMS (default: `choose_conv_form`'s choice)."""
  form = form or choose_conv_form(x, kernel, stride, padding)
  if form == "matmul":
    return matmul_conv3x3(x, kernel)
  if form != "xla":
    raise ValueError(f"unknown convolution form {form!r} ({', '.join(CONV_FORMS)})")
  return jax.lax.conv_general_dilated(x, kernel, (stride, stride), padding,
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


def matmul_conv3x3(x, kernel, block_pixels: int | None = None):
  """A stride-1, pad-1 3x3 convolution as one [B*H*W, 9C] x [9C, O] matmul, or with
  `block_pixels` one per block of rows of about that many pixels (whose 9 shifted copies stay
  in cache)."""
  b, h, w, c = x.shape
  padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  step = h if block_pixels is None else max(1, block_pixels // (b * w))
  out = []
  for top in range(0, h, step):
    n = min(step, h - top)
    # The 9 shifted copies in the kernel's (row, column, channel) order: B, n, W, 9C.
    cols = jnp.concatenate([padded[:, top + i:top + i + n, j:j + w]
                            for i in range(3) for j in range(3)], -1)
    out.append(jnp.dot(cols.reshape(b * n * w, 9 * c), kernel.reshape(9 * c, -1)).reshape(
        b, n, w, -1))
  return out[0] if len(out) == 1 else jnp.concatenate(out, 1)


def dense(features: int, dtype, param_dtype, name: str, use_bias: bool = True):
  return Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, name=name)


def timestep_embedding(
    timesteps: jax.Array, dim: int, flip_sin_to_cos: bool, freq_shift: float,
    max_period: float = 10000.0,
) -> jax.Array:
  """Sinusoidal embedding of (possibly fractional) timesteps [B] -> [B, dim], in float32."""
  half = dim // 2
  exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
  args = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]  # B, half
  emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
  if flip_sin_to_cos:
    emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


class ResnetBlock2D(nn.Module):
  """GroupNorm-SiLU-conv twice, with an optional time embedding added in between."""

  out_channels: int
  groups: int
  eps: float
  output_scale_factor: float = 1.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, temb=None):
    d, pd = self.dtype, self.param_dtype
    h = nn.silu(group_norm(self.groups, self.eps, d, pd, "norm1")(x))
    h = conv(self.out_channels, 3, d, pd, "conv1")(h)
    if temb is not None:
      t = dense(self.out_channels, d, pd, "time_emb_proj")(nn.silu(temb))
      h = h + t[:, None, None, :]
    h = nn.silu(group_norm(self.groups, self.eps, d, pd, "norm2")(h))
    h = conv(self.out_channels, 3, d, pd, "conv2")(h)
    if x.shape[-1] != self.out_channels:
      x = conv(self.out_channels, 1, d, pd, "conv_shortcut")(x)
    return (x + h) / self.output_scale_factor


class Downsample2D(nn.Module):
  """Strided 3x3 conv. `padding=0` pads right/bottom only, as diffusers' VAE encoder."""

  out_channels: int
  padding: int = 1
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    if self.padding == 0:
      x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
    pad = self.padding
    return conv(self.out_channels, 3, self.dtype, self.param_dtype, "conv", stride=2, padding=pad)(x)


class Upsample2D(nn.Module):
  """Nearest-neighbour 2x upsampling followed by a 3x3 conv."""

  out_channels: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)  # B, 2H, 2W, C
    return conv(self.out_channels, 3, self.dtype, self.param_dtype, "conv")(x)


class Attention(nn.Module):
  """Multi-head attention over tokens [B, N, C], as diffusers' `Attention`.

  With `norm_groups`, a GroupNorm precedes the projections and the input is added back (the VAE's
  spatial self-attention).
  """

  heads: int
  head_dim: int
  qkv_bias: bool = False
  upcast: bool = False
  norm_groups: int | None = None
  norm_eps: float = 1e-6
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, context=None, bias=None, ip=None, perturb: int = 0):
    """`bias`: optional additive attention bias [B, 1, 1, M] (e.g. -inf on padded context).
    `perturb` (static): the last `perturb` rows attend each query to itself alone (their output
    is the values' projection), perturbed-attention guidance's identity attention.
    `ip`: IP-Adapters' image tokens, per adapter (tokens [B, T, C], scale [B], mask): the
    queries attend to each through keys and values of its own (params `to_k_ip_<a>`,
    `to_v_ip_<a>`), and that output, times the scale and the layer's `ip_scale_<a>`, is added
    to the text's before the output projection (diffusers' IPAdapterAttnProcessor). With a mask
    [B, K, H, W] (0/1 at the image's size) the tokens are K images' (T = K * tokens), each
    attended to on its own and its output kept where its mask, downsampled to the queries as
    diffusers' `IPAdapterMaskProcessor.downsample` does, is (diffusers' `ip_adapter_masks`)."""
    d, pd = self.dtype, self.param_dtype
    residual = x
    if self.norm_groups is not None:
      x = group_norm(self.norm_groups, self.norm_eps, d, pd, "group_norm")(x)
    context = x if context is None else context
    inner = self.heads * self.head_dim
    b, n = x.shape[:2]
    q = dense(inner, d, pd, "to_q", self.qkv_bias)(x).reshape(b, n, self.heads, self.head_dim)
    k = dense(inner, d, pd, "to_k", self.qkv_bias)(context)
    v = dense(inner, d, pd, "to_v", self.qkv_bias)(context)
    k = k.reshape(b, -1, self.heads, self.head_dim)  # B, M, H, D
    v = v.reshape(b, -1, self.heads, self.head_dim)  # B, M, H, D
    if perturb:  # diffusers' PAG identity processors: attention on the others only
      kept = b - perturb
      out = attention.dot_product_attention(q[:kept], k[:kept], v[:kept], bias,
                                            upcast=self.upcast)
      out = jnp.concatenate([out, v[kept:].astype(out.dtype)])
    else:
      out = attention.dot_product_attention(q, k, v, bias, upcast=self.upcast)  # B, N, H, D
    for a, (tokens, scale, *mask) in enumerate(ip or ()):
      mask = mask[0] if mask else None
      images = 1 if mask is None else mask.shape[1]
      k = dense(inner, d, pd, f"to_k_ip_{a}", False)(tokens).reshape(b, images, -1, self.heads,
                                                                     self.head_dim)
      v = dense(inner, d, pd, f"to_v_ip_{a}", False)(tokens).reshape(b, images, -1, self.heads,
                                                                     self.head_dim)
      layer_scale = self.param(f"ip_scale_{a}", nn.initializers.ones, (), jnp.float32)
      weight = (scale.astype(jnp.float32) * layer_scale).astype(out.dtype).reshape(b, 1, 1, 1)
      if mask is None:
        out = out + weight * attention.dot_product_attention(q, k[:, 0], v[:, 0],
                                                             upcast=self.upcast)
        continue
      keep = ip_mask_queries(mask, n).astype(out.dtype)  # B, N, K
      for i in range(images):
        image = attention.dot_product_attention(q, k[:, i], v[:, i], upcast=self.upcast)
        out = out + weight * (image * keep[:, :, i, None, None])
    out = dense(x.shape[-1], d, pd, "to_out_0")(out.reshape(b, n, inner))
    if self.norm_groups is not None:
      out = out + residual
    return out


def ip_mask_queries(mask: jax.Array, queries: int) -> jax.Array:
  """IP-Adapter masks [B, K, H, W] -> [B, queries, K], as diffusers'
  `IPAdapterMaskProcessor.downsample`: the mask resized (torch's bicubic) to the grid of about
  `queries` cells with its aspect, flattened, then cut or zero-padded to `queries`."""
  h, w = mask.shape[2:]
  grid_h = int(math.sqrt(queries / (w / h)))
  grid_h += int(queries % grid_h != 0)
  grid_w = queries // grid_h
  cells = interpolate.resize(mask.transpose(0, 2, 3, 1), (grid_h, grid_w), "bicubic")
  cells = cells.reshape(mask.shape[0], grid_h * grid_w, mask.shape[1])[:, :queries]
  return jnp.pad(cells, ((0, 0), (0, queries - cells.shape[1]), (0, 0)))


class GEGLU(nn.Module):
  """Linear projection to twice the width; one half gates the other through GELU."""

  inner_dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    h = dense(self.inner_dim * 2, self.dtype, self.param_dtype, "proj")(x)
    h, gate = jnp.split(h, 2, axis=-1)
    return h * nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
  dim: int
  mult: int = 4
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    h = GEGLU(self.dim * self.mult, self.dtype, self.param_dtype, name="net_0")(x)
    return dense(self.dim, self.dtype, self.param_dtype, "net_2")(h)


class PerturbedLayers(NamedTuple):
  """Perturbed-attention guidance's layers (static): the BasicTransformerBlocks (module paths
  in the UNet) whose self-attention is the identity for the last `rows` rows."""

  blocks: frozenset
  rows: int


class BasicTransformerBlock(nn.Module):
  """Self-attention, cross-attention and a GEGLU feed-forward, each pre-LayerNorm + residual."""

  dim: int
  heads: int
  head_dim: int
  only_cross_attention: bool = False
  upcast_attention: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, context, context_bias=None, ip=None, pag=None):
    """`pag`: a `PerturbedLayers`; if it names this block's self-attention, its last rows
    take identity attention there."""
    d, pd = self.dtype, self.param_dtype
    perturb = pag.rows if pag is not None and self.scope.path in pag.blocks else 0

    def attn(name):
      return Attention(
          self.heads, self.head_dim, upcast=self.upcast_attention, dtype=d, param_dtype=pd,
          name=name,
      )

    h = layer_norm(1e-5, d, pd, "norm1")(x)
    tome = token_merging.merging(x)  # ToMe: the self-attention over fewer tokens
    if tome is not None:
      h = tome[0](h)
    if self.only_cross_attention:
      h = attn("attn1")(h, context, context_bias)
    else:
      h = attn("attn1")(h, perturb=perturb)
    x = x + (h if tome is None else tome[1](h))
    h = layer_norm(1e-5, d, pd, "norm2")(x)
    x = x + attn("attn2")(h, context, context_bias, ip)
    h = layer_norm(1e-5, d, pd, "norm3")(x)
    return x + FeedForward(self.dim, dtype=d, param_dtype=pd, name="ff")(h)


class Transformer2DModel(nn.Module):
  """Spatial transformer: GroupNorm, project in, transformer blocks, project out, residual."""

  heads: int
  head_dim: int
  num_layers: int
  groups: int
  use_linear_projection: bool = False
  only_cross_attention: bool = False
  upcast_attention: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, context, context_bias=None, ip=None, pag=None):
    d, pd = self.dtype, self.param_dtype
    b, hh, ww, c = x.shape
    inner = self.heads * self.head_dim
    residual = x
    x = group_norm(self.groups, 1e-6, d, pd, "norm")(x)
    # A 1x1 conv and a linear layer are the same map; the checkpoint decides which holds it.
    if self.use_linear_projection:
      x = dense(inner, d, pd, "proj_in")(x.reshape(b, hh * ww, c))  # B, H*W, inner
    else:
      x = conv(inner, 1, d, pd, "proj_in")(x).reshape(b, hh * ww, inner)  # B, H*W, inner
    for i in range(self.num_layers):
      x = BasicTransformerBlock(
          inner, self.heads, self.head_dim, self.only_cross_attention, self.upcast_attention,
          dtype=d, param_dtype=pd, name=f"transformer_blocks_{i}",
      )(x, context, context_bias, ip, pag)
    if self.use_linear_projection:
      x = dense(c, d, pd, "proj_out")(x).reshape(b, hh, ww, c)  # B, H, W, C
    else:
      x = conv(c, 1, d, pd, "proj_out")(x.reshape(b, hh, ww, inner))  # B, H, W, C
    return x + residual
