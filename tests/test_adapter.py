"""T2I-Adapter against diffusers: the network (`T2IAdapter`, its three layouts), the UNet taking
its features (`down_intrablock_additional_residuals`), and generate() against
`StableDiffusionAdapterPipeline` / `StableDiffusionXLAdapterPipeline`."""

import diffusers
import numpy as np
import pytest
import torch
from parity import assert_close, nchw, nhwc, randn, transfer

from sdjax import testing
from sdjax.models.adapter import T2IAdapter, T2IAdapterConfig
from sdjax.models.unet import UNet2DConditionModel, UNetConfig

torch.set_num_threads(1)

# Tiny adapters shaped for testing's tiny UNets (whose VAE downsamples 2x): each feature map
# at the size and width of the UNet level that takes it.
ADAPTERS = {
    "sd1": (testing.UNET_SD1, dict(channels=(32, 64), num_res_blocks=2, downscale_factor=2,
                                   adapter_type="full_adapter")),
    "sd2-light": (testing.UNET_SD2, dict(channels=(16, 32), num_res_blocks=2, downscale_factor=2,
                                         adapter_type="light_adapter")),
    "sdxl": (testing.UNET_SDXL, dict(channels=(16, 32, 32, 32), num_res_blocks=2,
                                     downscale_factor=4, adapter_type="full_adapter_xl")),
}


def torch_adapter(name: str, seed: int, **overrides):
  torch.manual_seed(seed)
  model = diffusers.T2IAdapter(**{**ADAPTERS[name][1], **overrides}).eval()
  testing.perturb_(model, seed + 1)
  return model


@pytest.mark.parametrize("name,size", [("sd1", (16, 16)), ("sd2-light", (16, 24)),
                                       ("sdxl", (16, 24)), ("sd1-odd", (18, 14))])
def test_adapter_matches_diffusers(name, size):
  """Each layout's feature maps; "sd1-odd": sides whose halving leaves a remainder (torch's
  ceil-mode average pool)."""
  tm = torch_adapter(name.removesuffix("-odd"), 3)
  fm = T2IAdapter(T2IAdapterConfig.from_dict(dict(tm.config)))
  images = np.random.default_rng(1).uniform(size=(2, *size, 3)).astype(np.float32)
  params = transfer(tm, fm, images)
  ours = fm.apply({"params": params}, images)
  with torch.no_grad():
    ref = tm(nchw(images))
  assert len(ours) == len(ref) == len(fm.config.feature_channels)
  errs = [assert_close(a, nhwc(b)) for a, b in zip(ours, ref, strict=True)]
  print(f"\nt2i-adapter {name}: worst feature map {max(errs):.2e}")


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_unet_adds_the_features_as_diffusers(family):
  """SD1: the features go into a cross-attention block before its downsampler and onto the
  last block (no attention: its last skip too); SDXL: onto a block with a downsampler, into
  two with attention, and the fourth onto the mid block."""
  config = ADAPTERS[family][0]
  tm = testing.torch_unet(config, seed=3)
  fm = UNet2DConditionModel(UNetConfig.from_dict(dict(tm.config)))
  x, ctx = randn(2, 8, 12, 4), randn(2, 77, config["cross_attention_dim"], seed=1)
  t = np.array([3.0, 801.0], np.float32)
  extra, torch_extra = (), {}
  if family == "sdxl":
    text_embeds = randn(2, 20, seed=3)
    time_ids = np.tile(np.float32([[64, 64, 0, 0, 64, 64]]), (2, 1))
    extra = (text_embeds, time_ids)
    torch_extra = {"added_cond_kwargs": {"text_embeds": torch.from_numpy(text_embeds),
                                         "time_ids": torch.from_numpy(time_ids)}}
  params = transfer(tm, fm, x, t, ctx, *extra)
  shapes = {"sd1": [(8, 12, 32), (4, 6, 64)],
            "sdxl": [(4, 6, 16), (4, 6, 32), (2, 3, 32), (2, 3, 32)]}[family]
  features = [randn(2, *s, seed=10 + i) for i, s in enumerate(shapes)]
  ours = fm.apply({"params": params}, x, t, ctx, *extra, intrablock_residuals=features)
  with torch.no_grad():
    ref = tm(nchw(x), torch.from_numpy(t), torch.from_numpy(ctx),
             down_intrablock_additional_residuals=[nchw(f) for f in features],
             **torch_extra).sample
  err = assert_close(ours, nhwc(ref))
  plain = fm.apply({"params": params}, x, t, ctx, *extra)
  print(f"\nunet + t2i-adapter features {family}: {err:.2e}")
  assert np.abs(np.asarray(plain) - np.asarray(ours)).max() > 1e-2
