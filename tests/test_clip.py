"""The CLIP text encoder against transformers' CLIPTextModel."""

import numpy as np
import pytest
import torch
from parity import assert_close, transfer

from sdjax import testing
from sdjax.models.clip import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
from sdjax.models.config_utils import ConfigError

torch.set_num_threads(1)


def _models(act):
  cfg = testing.clip_config(act)
  tm = testing.torch_clip(cfg, seed=7)
  fm = CLIPTextModel(CLIPTextConfig.from_dict(tm.config.to_dict()))
  ids = np.random.default_rng(0).integers(0, cfg["vocab_size"], (2, 77)).astype(np.int32)
  return tm, fm, transfer(tm, fm, ids), ids


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_clip_matches_transformers(act):
  tm, fm, params, ids = _models(act)
  out = fm.apply({"params": params}, ids)
  with torch.no_grad():
    ref = tm(torch.from_numpy(ids).long(), output_hidden_states=True)
  assert_close(out["last_hidden_state"], ref.last_hidden_state.numpy())
  assert len(out["hidden_states"]) == len(ref.hidden_states)
  for ours, theirs in zip(out["hidden_states"], ref.hidden_states, strict=True):
    assert_close(ours, theirs.numpy())


@pytest.mark.parametrize("clip_skip", [1, 2])
def test_clip_skip_as_diffusers(clip_skip):
  tm, fm, params, ids = _models("gelu")
  ours = fm.apply({"params": params}, ids, clip_skip)["prompt_embeds"]
  with torch.no_grad():
    hidden = tm(torch.from_numpy(ids).long(), output_hidden_states=True).hidden_states
    # diffusers' StableDiffusionPipeline.encode_prompt with clip_skip:
    ref = tm.final_layer_norm(hidden[-(clip_skip + 1)])
  assert_close(ours, ref.numpy())
  assert not np.allclose(ours, fm.apply({"params": params}, ids)["prompt_embeds"])


def test_unsupported_activation():
  with pytest.raises(ConfigError, match="hidden_act 'relu'"):
    CLIPTextConfig.from_dict({**testing.clip_config(), "hidden_act": "relu"})


def test_unknown_option():
  with pytest.raises(ConfigError, match="unknown option 'rope_theta'"):
    CLIPTextConfig.from_dict({**testing.clip_config(), "rope_theta": 1e4})


@pytest.mark.parametrize("eos_token_id", [2, None])  # legacy argmax rule / first EOS position
def test_clip_with_projection_matches_transformers(eos_token_id):
  cfg = testing.sdxl_clip_configs()[1]
  if eos_token_id is None:
    eos_token_id = cfg["eos_token_id"] = 5
  tm = testing.torch_clip_with_projection(cfg, seed=9)
  fm = CLIPTextModelWithProjection(CLIPTextConfig.from_dict(tm.config.to_dict()))
  rng = np.random.default_rng(1)
  ids = rng.integers(0, cfg["vocab_size"], (3, 77)).astype(np.int32)
  ids[:, 40] = 5  # the EOS for one rule; the largest id elsewhere picks another position
  ids[:, 60] = cfg["vocab_size"] - 1
  params = transfer(tm, fm, ids)
  out = fm.apply({"params": params}, ids)
  with torch.no_grad():
    ref = tm(torch.from_numpy(ids).long(), output_hidden_states=True)
  assert_close(out["text_embeds"], ref.text_embeds.numpy())
  assert_close(out["last_hidden_state"], ref.last_hidden_state.numpy())
  assert_close(out["hidden_states"][-2], ref.hidden_states[-2].numpy())
  assert out["text_embeds"].shape == (3, 20)
