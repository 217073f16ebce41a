"""Opt-in (SDJAX_FULLSIZE=1; several GB of memory, minutes): a full SD1.5-shaped UNet.

860M random parameters converted from diffusers and run once at 64x64 latents, batch 2.
"""

import os
import time

import numpy as np
import pytest
import torch
from parity import assert_close, nchw, nhwc, randn, transfer

from sdjax.models.unet import UNet2DConditionModel, UNetConfig

pytestmark = pytest.mark.skipif(os.environ.get("SDJAX_FULLSIZE") != "1",
                                reason="full-size check: set SDJAX_FULLSIZE=1")

SD15_UNET = {"cross_attention_dim": 768, "sample_size": 64}  # everything else: diffusers defaults


def test_sd15_unet_full_size():
  from diffusers import UNet2DConditionModel as TorchUNet

  torch.manual_seed(0)
  tm = TorchUNet(**SD15_UNET).eval()
  n_params = sum(p.numel() for p in tm.parameters())
  assert 855e6 < n_params < 865e6, n_params
  fm = UNet2DConditionModel(UNetConfig.from_dict(dict(tm.config)))
  x, ctx = randn(2, 64, 64, 4), randn(2, 77, 768, seed=1)
  t = np.array([981.0, 981.0], np.float32)
  params = transfer(tm, fm, x[:1, :8, :8], t[:1], ctx[:1])
  with torch.no_grad():
    start = time.perf_counter()
    ref = nhwc(tm(nchw(x), torch.from_numpy(t), torch.from_numpy(ctx)).sample)
    torch_s = time.perf_counter() - start
  del tm
  start = time.perf_counter()
  ours = np.asarray(fm.apply({"params": params}, x, t, ctx))
  jax_s = time.perf_counter() - start
  err = assert_close(ours, ref, tol=1e-4)
  print(f"\nSD1.5 UNet: {n_params / 1e6:.1f}M params, rel err {err:.3g}, "
        f"diffusers {torch_s:.1f}s, sdjax (incl. compile) {jax_s:.1f}s")
