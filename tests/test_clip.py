"""The CLIP text encoder against transformers' CLIPTextModel."""

import numpy as np
import pytest
import torch
from parity import assert_close, transfer

from sdjax import testing
from sdjax.models.clip import CLIPTextConfig, CLIPTextModel
from sdjax.models.config_utils import ConfigError


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
