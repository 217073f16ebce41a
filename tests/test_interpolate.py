"""torch's interpolate as matrices (sdjax/interpolate.py): A1111's latent upscalers."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from parity import nchw

from sdjax import interpolate, sampling


@pytest.mark.parametrize("upscaler", list(sampling.HIRES_UPSCALERS))
def test_hires_upscalers_are_torch_interpolate(upscaler):
  """A1111's latent upscalers are torch's `interpolate` (align_corners=False) in its modes,
  enlarging and shrinking, with and without antialiasing."""
  mode, antialias = sampling.HIRES_UPSCALERS[upscaler]
  x = np.random.default_rng(2).standard_normal((2, 8, 12, 4)).astype(np.float32)
  for shape in ((12, 18), (16, 24), (13, 17), (21, 31), (8, 12), (6, 9), (3, 5)):
    want = torch.nn.functional.interpolate(nchw(x), size=shape, mode=mode,
                                           antialias=antialias).numpy()
    got = np.asarray(interpolate.resize(jnp.asarray(x), shape, mode, antialias))
    # float32 weights (torch's) against ours rounded from float64: seen <= 1.2e-6 of the max
    np.testing.assert_allclose(got.transpose(0, 3, 1, 2), want, rtol=0, atol=4e-6)


def test_weights_refuse_what_torch_refuses():
  """Unknown modes, antialiasing of the nearest modes and empty sizes are one-line errors; the
  weights are cached read-only (a caller cannot change another's)."""
  with pytest.raises(ValueError, match="unknown interpolation mode 'area'"):
    interpolate.weights(4, 8, "area")
  with pytest.raises(ValueError, match="antialias applies to bilinear and bicubic, not 'nearest'"):
    interpolate.weights(4, 8, "nearest", antialias=True)
  with pytest.raises(ValueError, match="sizes must be positive, got 4 -> 0"):
    interpolate.weights(4, 0, "bilinear")
  w = interpolate.weights(4, 8, "bicubic")
  assert w.shape == (8, 4) and not w.flags.writeable
  np.testing.assert_allclose(w.sum(1), 1.0, rtol=0, atol=1e-6)  # each output a weighted mean
