"""The whole UNet against diffusers' UNet2DConditionModel, for both SD families."""

import numpy as np
import pytest
import torch
from parity import assert_close, nchw, nhwc, randn, transfer

from sdjax import testing
from sdjax.models.config_utils import ConfigError
from sdjax.models.unet import UNet2DConditionModel, UNetConfig

torch.set_num_threads(1)


@pytest.mark.parametrize("family,conv", [("sd1", None), ("sd2", None), ("sd1", "matmul")])
def test_unet_matches_diffusers(family, conv, monkeypatch):
  """conv: a convolution form forced into every 3x3 layer (the CPU's matmul form is chosen
  only for wide layers, which these tiny networks lack)."""
  if conv:
    monkeypatch.setenv("SDJAX_CONV", conv)
  config = testing.FAMILIES[family][0]
  tm = testing.torch_unet(config, seed=3)
  fm = UNet2DConditionModel(UNetConfig.from_dict(dict(tm.config)))
  x, ctx = randn(2, 8, 8, 4), randn(2, 77, config["cross_attention_dim"], seed=1)
  t = np.array([3.0, 801.0], np.float32)
  params = transfer(tm, fm, x, t, ctx)
  ours = fm.apply({"params": params}, x, t, ctx)
  with torch.no_grad():
    ref = tm(nchw(x), torch.from_numpy(t), torch.from_numpy(ctx)).sample
  assert_close(ours, nhwc(ref))


def test_class_labels_match_diffusers():
  """The x4 upscaler's layout: class labels (its noise level) embedded into the time vector,
  cross-attention-only blocks, 7 input channels."""
  tm = testing.torch_unet(testing.UNET_X4, seed=6)
  fm = UNet2DConditionModel(UNetConfig.from_dict(dict(tm.config)))
  x, ctx = randn(2, 8, 12, 7), randn(2, 9, testing.UNET_X4["cross_attention_dim"], seed=1)
  t, labels = np.array([3.0, 801.0], np.float32), np.array([20, 350], np.int32)
  params = transfer(tm, fm, x, t, ctx, class_labels=labels)
  ours = fm.apply({"params": params}, x, t, ctx, class_labels=labels)
  with torch.no_grad():
    ref = tm(nchw(x), torch.from_numpy(t), torch.from_numpy(ctx),
             class_labels=torch.from_numpy(labels).long()).sample
  assert_close(ours, nhwc(ref))
  other = fm.apply({"params": params}, x, t, ctx, class_labels=labels[::-1])
  assert not np.allclose(other, ours, atol=1e-3)
  with pytest.raises(ValueError, match="needs class_labels"):
    fm.apply({"params": params}, x, t, ctx)


SDXL_CONFIGS = {"base": testing.UNET_SDXL, "refiner": testing.UNET_SDXL_REFINER,
                "distilled": testing.UNET_SDXL_DISTILLED}


@pytest.mark.parametrize("name", list(SDXL_CONFIGS))
def test_sdxl_unet_matches_diffusers(name):
  """text_time added conditioning, levels without attention, non-uniform / per-layer depths."""
  config = SDXL_CONFIGS[name]
  tm = testing.torch_unet(config, seed=5)
  fm = UNet2DConditionModel(UNetConfig.from_dict(dict(tm.config)))
  n_ids = (config["projection_class_embeddings_input_dim"] - 20) // testing.SDXL_TIME_EMBED_DIM
  x, ctx = randn(2, 8, 12, 4), randn(2, 77, config["cross_attention_dim"], seed=1)
  text_embeds = randn(2, 20, seed=2)
  time_ids = np.array([[1024, 768, 0, 32, 1024, 1024, 6][:n_ids],
                       [512, 640, 16, 0, 768, 896, 2.5][:n_ids]], np.float32)
  t = np.array([3.0, 801.0], np.float32)
  params = transfer(tm, fm, x, t, ctx, text_embeds, time_ids)
  ours = fm.apply({"params": params}, x, t, ctx, text_embeds, time_ids)
  with torch.no_grad():
    ref = tm(nchw(x), torch.from_numpy(t), torch.from_numpy(ctx), added_cond_kwargs={
        "text_embeds": torch.from_numpy(text_embeds), "time_ids": torch.from_numpy(time_ids)})
  err = assert_close(ours, nhwc(ref.sample))
  print(f"\nsdxl unet {name}: {err:.2e}")
  with pytest.raises(ValueError, match="needs text_embeds and time_ids"):
    fm.apply({"params": params}, x, t, ctx)


@pytest.mark.parametrize("mid_block_type", [None, "UNetMidBlock2D"])
def test_unet_mid_block_variants_match_diffusers(mid_block_type):
  """No mid block (block-removed distillations such as BK-SDM small/tiny), or one resnet."""
  config = {**testing.UNET_SD2, "mid_block_type": mid_block_type, "mid_block_scale_factor": 1.4}
  tm = testing.torch_unet(config, seed=4)
  fm = UNet2DConditionModel(UNetConfig.from_dict(dict(tm.config)))
  x, ctx = randn(2, 8, 12, 4), randn(2, 7, config["cross_attention_dim"], seed=1)
  t = np.array([3.0, 801.0], np.float32)
  params = transfer(tm, fm, x, t, ctx)
  assert ("mid_block" in params) == (mid_block_type is not None)
  ours = fm.apply({"params": params}, x, t, ctx)
  with torch.no_grad():
    ref = tm(nchw(x), torch.from_numpy(t), torch.from_numpy(ctx)).sample
  assert_close(ours, nhwc(ref))


def test_unet_scalar_timestep_broadcasts():
  tm = testing.torch_unet(testing.UNET_SD1)
  fm = UNet2DConditionModel(UNetConfig.from_dict(dict(tm.config)))
  x, ctx = randn(2, 8, 8, 4), randn(2, 5, 32, seed=1)
  params = transfer(tm, fm, x, np.zeros(2, np.float32), ctx)
  ours = fm.apply({"params": params}, x, 250, ctx)
  with torch.no_grad():
    ref = tm(nchw(x), 250, torch.from_numpy(ctx)).sample
  assert_close(ours, nhwc(ref))


def test_unknown_option_is_named():
  with pytest.raises(ConfigError, match="unknown option 'fancy_new_thing'"):
    UNetConfig.from_dict({**testing.UNET_SD1, "fancy_new_thing": 3})


@pytest.mark.parametrize("key,value", [("class_embed_type", "timestep"),
                                       ("addition_embed_type", "image"),
                                       ("resnet_time_scale_shift", "scale_shift"),
                                       ("num_attention_heads", 8)])
def test_unsupported_option_value_is_named(key, value):
  with pytest.raises(ConfigError, match=f"option {key}="):
    UNetConfig.from_dict({**testing.UNET_SD1, key: value})


def test_unsupported_block_type_is_named():
  cfg = {**testing.UNET_SD1, "down_block_types": ["SimpleCrossAttnDownBlock2D", "DownBlock2D"]}
  with pytest.raises(ConfigError, match="SimpleCrossAttnDownBlock2D"):
    UNetConfig.from_dict(cfg)


def test_diffusers_saved_config_is_accepted():
  """Every key diffusers writes for a default-architecture UNet is known to us."""
  tm = testing.torch_unet(testing.UNET_SD2)
  cfg = UNetConfig.from_dict(dict(tm.config))
  assert cfg.use_linear_projection and cfg.attention_head_dim == (2, 4, 4)
