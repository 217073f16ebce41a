"""The VAE against diffusers' AutoencoderKL: encode (mean, log-variance), sample, decode."""

import jax
import numpy as np
import pytest
import torch
from parity import assert_close, nchw, nhwc, randn, transfer

from sdjax import testing
from sdjax.models.config_utils import ConfigError
from sdjax.models.vae import AutoencoderKL, VAEConfig


@pytest.fixture(scope="module")
def models():
  tm = testing.torch_vae(testing.VAE, seed=5)
  fm = AutoencoderKL(VAEConfig.from_dict(dict(tm.config)))
  params = transfer(tm, fm, randn(1, 16, 16, 3))
  return tm, fm, params


def test_encode(models):
  tm, fm, params = models
  x = randn(2, 16, 16, 3)
  post = fm.apply({"params": params}, x, method=AutoencoderKL.encode)
  with torch.no_grad():
    ref = tm.encode(nchw(x)).latent_dist
  assert_close(post.mean, nhwc(ref.mean))
  assert_close(post.logvar, nhwc(ref.logvar))
  assert_close(post.std, nhwc(ref.std))
  noise = randn(2, 8, 8, 4, seed=2)
  key = jax.random.key(0)
  ours = post.sample(key)
  expected_noise = np.asarray(jax.random.normal(key, post.mean.shape))
  assert_close(ours, nhwc(ref.mean) + nhwc(ref.std) * expected_noise)
  del noise


def test_decode(models):
  tm, fm, params = models
  z = randn(2, 8, 8, 4)
  ours = fm.apply({"params": params}, z, method=AutoencoderKL.decode)
  with torch.no_grad():
    ref = tm.decode(nchw(z)).sample
  assert_close(ours, nhwc(ref))


def test_without_quant_convs_and_mid_attention():
  cfg = {**testing.VAE, "use_quant_conv": False, "use_post_quant_conv": False,
         "mid_block_add_attention": False}
  tm = testing.torch_vae(cfg)
  fm = AutoencoderKL(VAEConfig.from_dict(dict(tm.config)))
  x = randn(2, 16, 16, 3)
  params = transfer(tm, fm, x)
  ours, _ = fm.apply({"params": params}, x)
  with torch.no_grad():
    ref = tm(nchw(x)).sample
  assert_close(ours, nhwc(ref))


def test_unsupported_shift_factor():
  with pytest.raises(ConfigError, match="shift_factor"):
    VAEConfig.from_dict({**testing.VAE, "shift_factor": 0.1159})


def test_sdxl_latent_statistics_and_upcast():
  """latents_mean / latents_std as diffusers' SDXL pipelines apply them; force_upcast."""
  tm = testing.torch_vae(testing.VAE_SDXL, seed=1)
  cfg = VAEConfig.from_dict(dict(tm.config))
  mean = np.asarray(testing.VAE_SDXL["latents_mean"], np.float32)
  std = np.asarray(testing.VAE_SDXL["latents_std"], np.float32)
  x = randn(2, 4, 6, 4)
  np.testing.assert_allclose(cfg.from_diffusion_latents(x), x * std / 0.13025 + mean, rtol=1e-6)
  np.testing.assert_allclose(cfg.to_diffusion_latents(cfg.from_diffusion_latents(x)), x,
                             rtol=1e-5, atol=1e-5)
  plain = VAEConfig.from_dict(dict(testing.torch_vae(testing.VAE).config))
  np.testing.assert_allclose(plain.from_diffusion_latents(x), x / 0.5)
  assert cfg.compute_dtype(np.float16) == np.float32
  assert cfg.compute_dtype(jax.numpy.bfloat16) == jax.numpy.bfloat16
  with pytest.raises(ConfigError, match="latents_mean needs one entry per latent channel"):
    VAEConfig.from_dict({**testing.VAE_SDXL, "latents_mean": [0.0, 1.0]})
