"""Every building block against its diffusers twin, weights transferred by the real converter."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers.models import unets
from diffusers.models.attention import BasicTransformerBlock as TorchBasicTransformerBlock
from diffusers.models.attention_processor import Attention as TorchAttention
from diffusers.models.downsampling import Downsample2D as TorchDownsample2D
from diffusers.models.resnet import ResnetBlock2D as TorchResnetBlock2D
from diffusers.models.transformers.transformer_2d import Transformer2DModel as TorchTransformer2D
from diffusers.models.upsampling import Upsample2D as TorchUpsample2D
from parity import assert_close, nchw, nhwc, randn, rel_err, transfer

from sdjax import testing
from sdjax.models import attention, layers, unet, vae

blocks = unets.unet_2d_blocks


def _run(torch_module, flax_module, flax_inputs, torch_inputs, method=None):
  testing.perturb_(torch_module, seed=1)
  torch_module.eval()
  params = transfer(torch_module, flax_module, *flax_inputs, method=method)
  ours = flax_module.apply({"params": params}, *flax_inputs, method=method)
  with torch.no_grad():
    ref = torch_module(*torch_inputs)
  return ours, ref


@pytest.mark.parametrize("cin,cout,temb", [(16, 16, True), (16, 32, True), (32, 16, False)])
def test_resnet_block(cin, cout, temb):
  x, t = randn(2, 8, 8, cin), randn(2, 24, seed=1)
  tm = TorchResnetBlock2D(in_channels=cin, out_channels=cout, temb_channels=24 if temb else None,
                          groups=8, eps=1e-5)
  fm = layers.ResnetBlock2D(cout, groups=8, eps=1e-5)
  fin = (x, t) if temb else (x,)
  tin = (nchw(x), torch.from_numpy(t) if temb else None)
  ours, ref = _run(tm, fm, fin, tin)
  assert_close(ours, nhwc(ref))


@pytest.mark.parametrize("padding", [0, 1])
def test_downsample(padding):
  x = randn(2, 8, 8, 16)
  tm = TorchDownsample2D(16, use_conv=True, out_channels=16, padding=padding, name="op")
  ours, ref = _run(tm, layers.Downsample2D(16, padding), (x,), (nchw(x),))
  assert_close(ours, nhwc(ref))


def test_upsample():
  x = randn(2, 4, 4, 16)
  tm = TorchUpsample2D(16, use_conv=True, out_channels=16)
  ours, ref = _run(tm, layers.Upsample2D(16), (x,), (nchw(x),))
  assert_close(ours, nhwc(ref))


@pytest.mark.parametrize("cross,upcast", [(False, False), (True, True)])
def test_attention(cross, upcast):
  x, ctx = randn(2, 16, 32), randn(2, 7, 24, seed=1)
  tm = TorchAttention(32, cross_attention_dim=24 if cross else None, heads=4, dim_head=8,
                      upcast_attention=upcast)
  fm = layers.Attention(heads=4, head_dim=8, upcast=upcast)
  fin = (x, ctx) if cross else (x,)
  tin = (torch.from_numpy(x), torch.from_numpy(ctx)) if cross else (torch.from_numpy(x),)
  ours, ref = _run(tm, fm, fin, tin)
  assert_close(ours, ref.numpy())


def test_basic_transformer_block():
  x, ctx = randn(2, 16, 32), randn(2, 7, 24, seed=1)
  tm = TorchBasicTransformerBlock(32, 4, 8, cross_attention_dim=24, activation_fn="geglu")
  fm = layers.BasicTransformerBlock(32, 4, 8)
  ours, ref = _run(tm, fm, (x, ctx), (torch.from_numpy(x), None, torch.from_numpy(ctx)))
  assert_close(ours, ref.numpy())


@pytest.mark.parametrize("linear", [False, True])
def test_transformer_2d(linear):
  x, ctx = randn(2, 4, 4, 32), randn(2, 7, 24, seed=1)
  tm = TorchTransformer2D(num_attention_heads=4, attention_head_dim=8, in_channels=32,
                          num_layers=2, cross_attention_dim=24, norm_num_groups=8,
                          use_linear_projection=linear)
  fm = layers.Transformer2DModel(4, 8, num_layers=2, groups=8, use_linear_projection=linear)
  ours, ref = _run(tm, fm, (x, ctx), (nchw(x), torch.from_numpy(ctx)))
  assert_close(ours, nhwc(ref.sample))


def _unet_config(**kw):
  return unet.UNetConfig(
      block_out_channels=(32, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=8,
      cross_attention_dim=24, attention_head_dim=4, layers_per_block=2, **kw)


@pytest.mark.parametrize("attn", [True, False])
def test_down_blocks(attn):
  x, temb, ctx = randn(2, 8, 8, 16), randn(2, 40, seed=1), randn(2, 7, 24, seed=2)
  common = dict(num_layers=2, in_channels=16, out_channels=32, temb_channels=40, resnet_eps=1e-5,
                resnet_groups=8, downsample_padding=1, add_downsample=True)
  if attn:
    tm = blocks.CrossAttnDownBlock2D(cross_attention_dim=24, num_attention_heads=4, **common)
  else:
    tm = blocks.DownBlock2D(**common)
  fm = unet._Block(32, 2, attn, True, False, 4, (1, 1), False, _unet_config())
  tin = (nchw(x), torch.from_numpy(temb)) + ((torch.from_numpy(ctx),) if attn else ())
  ours, ref = _run(tm, fm, (x, temb, ctx), tin)
  assert_close(ours[0], nhwc(ref[0]))
  assert len(ours[1]) == len(ref[1]) == 3
  for o, r in zip(ours[1], ref[1], strict=True):
    assert_close(o, nhwc(r))


@pytest.mark.parametrize("attn", [True, False])
def test_up_blocks(attn):
  x, temb, ctx = randn(2, 4, 4, 32), randn(2, 40, seed=1), randn(2, 7, 24, seed=2)
  skips = [randn(2, 4, 4, c, seed=3 + i) for i, c in enumerate((16, 32, 32))]
  common = dict(num_layers=3, in_channels=16, out_channels=32, prev_output_channel=32,
                temb_channels=40, resnet_eps=1e-5, resnet_groups=8, add_upsample=True)
  if attn:
    tm = blocks.CrossAttnUpBlock2D(cross_attention_dim=24, num_attention_heads=4, **common)
  else:
    tm = blocks.UpBlock2D(**common)
  fm = unet._Block(32, 3, attn, True, True, 4, (1, 1, 1), False, _unet_config())
  tskips = tuple(nchw(s) for s in skips)
  if attn:
    tin = (nchw(x), tskips, torch.from_numpy(temb), torch.from_numpy(ctx))
  else:
    tin = (nchw(x), tskips, torch.from_numpy(temb))
  ours, ref = _run(tm, fm, (x, temb, ctx, tuple(skips)), tin)
  assert_close(ours[0], nhwc(ref))


def test_unet_mid_block():
  x, temb, ctx = randn(2, 4, 4, 32), randn(2, 40, seed=1), randn(2, 7, 24, seed=2)
  tm = blocks.UNetMidBlock2DCrossAttn(in_channels=32, temb_channels=40, resnet_eps=1e-5,
                                      resnet_groups=8, cross_attention_dim=24,
                                      num_attention_heads=4)
  fm = unet._MidBlock(_unet_config())
  ours, ref = _run(tm, fm, (x, temb, ctx),
                   (nchw(x), torch.from_numpy(temb), torch.from_numpy(ctx)))
  assert_close(ours, nhwc(ref))


def test_vae_blocks():
  cfg = vae.VAEConfig(block_out_channels=(16, 32), norm_num_groups=8,
                      down_block_types=("DownEncoderBlock2D",) * 2,
                      up_block_types=("UpDecoderBlock2D",) * 2)
  x = randn(2, 8, 8, 32)
  tm = blocks.UNetMidBlock2D(in_channels=32, temb_channels=None, resnet_eps=1e-6,
                             resnet_groups=8, attention_head_dim=32)
  ours, ref = _run(tm, vae._MidBlock(cfg), (x,), (nchw(x),))
  assert_close(ours, nhwc(ref))

  tm = blocks.DownEncoderBlock2D(in_channels=32, out_channels=16, num_layers=2, resnet_eps=1e-6,
                                 resnet_groups=8, downsample_padding=0)
  ours, ref = _run(tm, vae._ResampleBlock(16, 2, True, False, 8), (x,), (nchw(x),))
  assert_close(ours, nhwc(ref))

  tm = blocks.UpDecoderBlock2D(in_channels=32, out_channels=16, num_layers=2, resnet_eps=1e-6,
                               resnet_groups=8)
  ours, ref = _run(tm, vae._ResampleBlock(16, 2, True, True, 8), (x,), (nchw(x),))
  assert_close(ours, nhwc(ref))


def test_timestep_embedding_fractional_and_odd():
  from diffusers.models.embeddings import get_timestep_embedding

  t = np.array([0.0, 1.5, 999.0], np.float32)
  for flip, shift, dim in [(True, 0, 32), (False, 1, 33)]:
    ours = layers.timestep_embedding(t, dim, flip, shift)
    ref = get_timestep_embedding(torch.from_numpy(t), dim, flip, shift)
    assert_close(ours, ref.numpy())


def _attend(q, k, v, bias=None, **kwargs):
  """attention.dot_product_attention, jitted: one compile per call instead of one per op."""
  return jax.jit(functools.partial(attention.dot_product_attention, **kwargs))(q, k, v, bias)


def _qkv(n=64, m=48, dtype=np.float32):
  q, k, v = randn(2, n, 4, 8), randn(2, m, 4, 8, seed=1), randn(2, m, 4, 8, seed=2)
  return tuple(jnp.asarray(x, dtype) for x in (q, k, v))


@pytest.mark.parametrize("kernel", ["chunked", "blocked", "xla", "cudnn"])
@pytest.mark.parametrize("upcast", [False, True])
def test_forced_attention_kernels_agree(kernel, upcast, monkeypatch):
  """Every kernel SDJAX_ATTENTION can force computes the same attention (cudnn falls back to
  XLA's where it can't run: float32 here)."""
  q, k, v = _qkv()
  plain = _attend(q, k, v, upcast=upcast, kernel="einsum")
  monkeypatch.setenv("SDJAX_ATTENTION", kernel)
  got = _attend(q, k, v, upcast=upcast, chunk=16, block=16)
  assert_close(got, plain, tol=1e-6)


@pytest.mark.parametrize("n,m,block", [(64, 48, 16), (77, 77, 16), (100, 77, 32), (5, 77, 256)])
def test_blocked_attention_any_length(n, m, block):
  """Query counts that are no multiple of the block (77-token cross attention) and below it."""
  q, k, v = _qkv(n, m)
  plain = _attend(q, k, v, kernel="einsum")
  got = _attend(q, k, v, kernel="blocked", block=block)
  assert got.shape == (2, n, 4, 8)
  assert_close(got, plain, tol=1e-6)


@pytest.mark.parametrize("kernel", ["blocked", "chunked"])
def test_attention_kernels_bfloat16(kernel):
  """bfloat16 inputs: as close to the float32 answer as the einsum kernel in bfloat16 is."""
  exact = _attend(*_qkv(), kernel="einsum")
  plain = _attend(*_qkv(dtype=jnp.bfloat16), kernel="einsum")
  got = _attend(*_qkv(dtype=jnp.bfloat16), kernel=kernel, block=16,
                                        chunk=16)
  assert got.dtype == jnp.bfloat16
  assert_close(got.astype(np.float32), plain.astype(np.float32), tol=1e-2)
  assert rel_err(got.astype(np.float32), exact) <= 1.5 * rel_err(plain.astype(np.float32), exact)


@pytest.mark.parametrize("kernel", ["einsum", "chunked", "blocked", "xla"])
def test_attention_key_padding_bias(kernel):
  """A [B, 1, 1, M] bias of -1e9 at padded keys equals attending to the unpadded keys only."""
  q, k, v = _qkv(64, 48)
  keep = np.array([40, 48])  # valid keys per batch row
  bias = np.where(np.arange(48)[None, :] < keep[:, None], 0.0, -1e9).astype(np.float32)
  got = _attend(q, k, v, bias[:, None, None, :], kernel=kernel, block=16,
                                        chunk=16)
  for row, valid in enumerate(keep):
    ref = _attend(q[row:row + 1], k[row:row + 1, :valid],
                                          v[row:row + 1, :valid], kernel="einsum")
    assert_close(got[row:row + 1], ref, tol=1e-6)


@pytest.mark.parametrize("kernel", ["chunked", "blocked", "xla"])
def test_attention_full_bias(kernel):
  q, k, v = _qkv(64, 48)
  bias = jnp.asarray(randn(2, 4, 64, 48, seed=3))
  plain = _attend(q, k, v, bias, kernel="einsum")
  got = _attend(q, k, v, bias, kernel=kernel, block=24, chunk=16)
  assert_close(got, plain, tol=1e-6)


@pytest.mark.parametrize("b,h,w,c,o", [(2, 8, 8, 32, 16), (1, 5, 7, 24, 40), (3, 16, 4, 8, 8)])
def test_matmul_convolution_matches_torch(b, h, w, c, o):
  """The CPU's 3x3 convolution as one matmul (any size, non-square) against torch's Conv2d."""
  x, kernel = randn(b, h, w, c), randn(3, 3, c, o, seed=1) * 0.2
  tm = torch.nn.Conv2d(c, o, 3, padding=1, bias=False)
  with torch.no_grad():
    tm.weight.copy_(torch.from_numpy(kernel.transpose(3, 2, 0, 1)))
    ref = nhwc(tm(nchw(x)))
  pad = ((1, 1), (1, 1))
  ours = layers.conv2d(jnp.asarray(x), jnp.asarray(kernel), 1, pad, form="matmul")
  assert_close(ours, ref)
  assert_close(ours, layers.conv2d(jnp.asarray(x), jnp.asarray(kernel), 1, pad, form="xla"),
               tol=1e-6)
  half = layers.conv2d(jnp.asarray(x, jnp.bfloat16), jnp.asarray(kernel, jnp.bfloat16), 1, pad,
                       form="matmul")
  assert half.dtype == jnp.bfloat16
  assert_close(half.astype(np.float32), ref, tol=1e-2)


def test_cpu_convolution_choice(monkeypatch):
  """The matmul form where it measured faster (BENCHMARKS.md): few output pixels, many
  channels, 3x3, stride 1; XLA's convolution everywhere else. SDJAX_CONV forces a form."""
  if jax.default_backend() != "cpu":
    pytest.skip("CPU choice")
  pad, k3 = ((1, 1), (1, 1)), jnp.zeros((3, 3, 1280, 1280))
  choose = layers.choose_conv_form
  assert choose(jnp.zeros((2, 8, 8, 1280)), k3, 1, pad) == "matmul"  # SD1.5's 8x8 level
  assert choose(jnp.zeros((2, 16, 16, 1280)), k3, 1, pad) == "matmul"  # and its 16x16 level
  assert choose(jnp.zeros((2, 32, 32, 1280)), k3, 1, pad) == "xla"  # more pixels
  assert choose(jnp.zeros((2, 8, 8, 64)), jnp.zeros((3, 3, 64, 64)), 1, pad) == "xla"
  assert choose(jnp.zeros((2, 16, 16, 1280)), k3, 2, pad) == "xla"  # strided
  one = jnp.zeros((1, 1, 1280, 1280))
  assert choose(jnp.zeros((2, 8, 8, 1280)), one, 1, ((0, 0), (0, 0))) == "xla"  # 1x1
  monkeypatch.setenv("SDJAX_CONV", "matmul")
  assert choose(jnp.zeros((2, 64, 64, 4)), jnp.zeros((3, 3, 4, 8)), 1, pad) == "matmul"
  assert choose(jnp.zeros((2, 16, 16, 1280)), k3, 2, pad) == "xla"  # the form can't do it
  monkeypatch.setenv("SDJAX_CONV", "winograd")
  with pytest.raises(ValueError, match="winograd"):
    layers.conv2d(jnp.zeros((1, 4, 4, 2)), jnp.zeros((3, 3, 2, 2)), 1, pad)


def test_cpu_default_kernel():
  if jax.default_backend() != "cpu":
    pytest.skip("CPU choice")
  long, short = jnp.zeros((2, 4096, 8, 40)), jnp.zeros((2, 16, 8, 40))
  assert attention.choose_kernel(long, long) == "blocked"
  assert attention.choose_kernel(long, jnp.zeros((2, 77, 8, 40))) == "blocked"
  assert attention.choose_kernel(short, short) == "einsum"


def test_unknown_attention_kernel(monkeypatch):
  monkeypatch.setenv("SDJAX_ATTENTION", "flash9")
  with pytest.raises(ValueError, match="flash9"):
    attention.dot_product_attention(randn(1, 4, 1, 8), randn(1, 4, 1, 8), randn(1, 4, 1, 8))
  monkeypatch.delenv("SDJAX_ATTENTION")
  with pytest.raises(ValueError, match="4-D"):
    attention.dot_product_attention(randn(1, 4, 1, 8), randn(1, 4, 1, 8), randn(1, 4, 1, 8),
                                    np.zeros((4, 4), np.float32))
