"""torch's interpolate as matrices (sdjax/interpolate.py): A1111's latent upscalers; PIL's
8-bit resize in integer arithmetic: its pixel ones."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from parity import nchw
from PIL import Image

from sdjax import interpolate, sampling, upscaling


@pytest.mark.parametrize("upscaler", list(sampling.LATENT_UPSCALERS))
def test_hires_upscalers_are_torch_interpolate(upscaler):
  """A1111's latent upscalers are torch's `interpolate` (align_corners=False) in its modes,
  enlarging and shrinking, with and without antialiasing."""
  mode, antialias = sampling.LATENT_UPSCALERS[upscaler]
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


PIL_SHAPES = (((16, 24), (24, 36)), ((24, 36), (16, 24)), ((13, 7), (40, 21)),
              ((64, 64), (48, 80)), ((50, 30), (7, 9)), ((20, 20), (30, 30)), ((9, 40), (9, 13)))


@pytest.mark.parametrize("resample", (*interpolate.PIL_FILTERS, "bicubic"))
def test_pil_resize_is_pils(resample):
  """PIL's resize of 8-bit RGB images, level for level, enlarging and shrinking each side. PIL
  up to 12 (A1111 pins 9.5) runs Lanczos's horizontal pass first, so the oracle is PIL's two
  one-axis resizes in that order (Pillow 13 runs some shapes' vertical pass first: one pass's
  rounding, not the arithmetic, differs); NEAREST is one PIL resize."""
  rng = np.random.default_rng(7)
  pil = {"lanczos": Image.LANCZOS, "nearest": Image.NEAREST, "bicubic": Image.BICUBIC}[resample]
  for (h0, w0), (h, w) in PIL_SHAPES:
    levels = rng.integers(0, 256, (2, h0, w0, 3), np.uint8)
    want = []
    for image in levels:
      image = Image.fromarray(image)
      if resample != "nearest":  # one axis at a time: one pass each
        want.append(np.asarray(image.resize((w, h0), pil).resize((w, h), pil)))
      else:
        want.append(np.asarray(image.resize((w, h), pil)))
    got = np.asarray(interpolate.pil_resize(jnp.asarray(levels), (h, w), resample))
    np.testing.assert_array_equal(got, np.stack(want), err_msg=f"{(h0, w0)} -> {(h, w)}")
  with pytest.raises(ValueError, match="unknown PIL filter 'box'"):
    interpolate.pil_resize(jnp.zeros((1, 4, 4, 3), jnp.int32), (8, 8), "box")


def test_pixel_upscale_steps_are_a1111s():
  """A1111's resize_image("Just resize") with its Lanczos / Nearest upscaler: the upscaler by
  the larger side's factor, then Lanczos to that size rounded down to 8, then to the target."""
  steps = upscaling.resize_steps
  assert steps("lanczos", (512, 512), (1024, 1024)) == (((1024, 1024), "lanczos"),)
  assert steps("nearest", (512, 768), (768, 1152)) == (((768, 1152), "nearest"),)
  assert steps("nearest", (100, 100), (150, 150)) == (
      ((150, 150), "nearest"), ((144, 144), "lanczos"), ((150, 150), "lanczos"))
  assert steps("nearest", (512, 768), (1024, 1024)) == (  # covers, then to the target
      ((1024, 1536), "nearest"), ((1024, 1024), "lanczos"))
  assert steps("nearest", (16, 16), (12, 12)) == (((12, 12), "lanczos"),)  # shrinking: Lanczos
  assert steps("none", (100, 100), (150, 150)) == (((150, 150), "lanczos"),)  # A1111's None
