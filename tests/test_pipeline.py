"""Loading diffusers-format folders, the component API, export back to diffusers, failures."""

import os
import shutil

import numpy as np
import pytest
import torch
from parity import assert_close, nchw, nhwc, randn

import sdjax
from sdjax import testing
from sdjax.checkpoints import hub
from sdjax.checkpoints.weights import WeightsError
from sdjax.models.config_utils import ConfigError
from sdjax.pipeline import PipelineError

PROMPTS = ["a red circle in the center", "a photo of a cat on the house, zebra!"]


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def loaded(request, tmp_path_factory):
  folder = str(tmp_path_factory.mktemp(request.param) / "pipe")
  ref = testing.write_torch_pipeline(folder, request.param, seed=11)
  return ref, sdjax.load_pipeline(folder), folder


def test_tokenize(loaded):
  ref, pipe, _ = loaded
  ids = pipe.tokenize(PROMPTS)
  expected = ref.tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True,
                           return_tensors="np").input_ids
  assert ids.dtype == np.int32 and ids.shape == (2, 77)
  np.testing.assert_array_equal(ids, expected)


def test_encode_text(loaded):
  ref, pipe, _ = loaded
  ids = pipe.tokenize(PROMPTS)
  with torch.no_grad():
    expected = ref.text_encoder(torch.from_numpy(ids).long()).last_hidden_state
  assert_close(pipe.encode_text(ids), expected.numpy())


def test_predict_noise(loaded):
  ref, pipe, _ = loaded
  d = ref.unet.config.cross_attention_dim
  x, ctx, t = randn(2, 8, 8, 4), randn(2, 77, d, seed=1), np.array([1, 999], np.int32)
  with torch.no_grad():
    expected = ref.unet(nchw(x), torch.from_numpy(t), torch.from_numpy(ctx)).sample
  assert_close(pipe.predict_noise(x, t, ctx), nhwc(expected))


def test_vae(loaded):
  ref, pipe, _ = loaded
  z, img = randn(2, 8, 8, 4), np.tanh(randn(2, 16, 16, 3, seed=2))
  with torch.no_grad():
    decoded = ref.vae.decode(nchw(z)).sample
    mean = ref.vae.encode(nchw(img)).latent_dist.mean
  assert_close(pipe.vae_decode(z), nhwc(decoded))
  assert_close(pipe.vae_encode(img), nhwc(mean))


def _umask():
  mask = os.umask(0)
  os.umask(mask)
  return mask


def test_export_round_trip(loaded, tmp_path):
  """sdjax -> diffusers-format folder -> diffusers loads it and gives the same outputs."""
  import diffusers

  ref, pipe, _ = loaded
  out = str(tmp_path / "exported")
  pipe.save_pretrained(out)
  weights = os.path.join(out, "unet", "diffusion_pytorch_model.safetensors")
  assert os.stat(weights).st_mode & 0o044 == 0o044 & ~_umask()  # readable as the umask allows
  back = diffusers.StableDiffusionPipeline.from_pretrained(out, safety_checker=None)
  ids = pipe.tokenize(PROMPTS)
  np.testing.assert_array_equal(ids, back.tokenizer(PROMPTS, padding="max_length", max_length=77,
                                                    truncation=True, return_tensors="np").input_ids)
  x, t = randn(2, 8, 8, 4), torch.tensor([10, 500])
  ctx = randn(2, 77, ref.unet.config.cross_attention_dim, seed=1)
  with torch.no_grad():
    for a, b in zip(ref.unet.state_dict().values(), back.unet.state_dict().values(), strict=True):
      assert torch.equal(a, b)
    assert_close(nhwc(back.unet(nchw(x), t, torch.from_numpy(ctx)).sample),
                 nhwc(ref.unet(nchw(x), t, torch.from_numpy(ctx)).sample), tol=0)
    text = back.text_encoder(torch.from_numpy(ids).long()).last_hidden_state
    assert_close(text.numpy(), np.asarray(pipe.encode_text(ids)))
    assert_close(nhwc(back.vae.decode(nchw(x)).sample), np.asarray(pipe.vae_decode(x)))
  assert type(back.scheduler).__name__ == type(ref.scheduler).__name__
  assert dict(back.scheduler.config)["prediction_type"] == ref.scheduler.config.prediction_type


def test_both_tokenizer_layouts(loaded, tmp_path):
  """tokenizer.json (what transformers v5 saves) and vocab.json + merges.txt tokenize the same."""
  ref, pipe, folder = loaded
  assert os.path.isfile(os.path.join(folder, "tokenizer", "tokenizer.json"))
  copy = str(tmp_path / "copy")
  shutil.copytree(folder, copy)
  tok_dir = os.path.join(copy, "tokenizer")
  shutil.rmtree(tok_dir)
  testing.write_tokenizer(tok_dir, pad_token=ref.tokenizer.pad_token)
  assert sorted(os.listdir(tok_dir)) == ["merges.txt", "tokenizer_config.json", "vocab.json"]
  again = sdjax.load_pipeline(copy)
  np.testing.assert_array_equal(again.tokenize(PROMPTS), pipe.tokenize(PROMPTS))


def test_bfloat16_pipeline(loaded):
  _, pipe, folder = loaded
  half = sdjax.load_pipeline(folder, dtype="bfloat16")
  assert str(half.params["unet"]["conv_in"]["kernel"].dtype) == "bfloat16"
  x, t = randn(2, 8, 8, 4), np.array([10, 500])
  ctx = np.asarray(half.encode_text(half.tokenize(PROMPTS)))
  out = np.asarray(half.predict_noise(x, t, ctx), np.float32)
  assert np.isfinite(out).all()
  ref = np.asarray(pipe.predict_noise(x, t, ctx.astype(np.float32)))
  assert np.linalg.norm(out - ref) / np.linalg.norm(ref) < 5e-2
  mixed = sdjax.load_pipeline(folder, dtype="bfloat16", param_dtype="float32")
  assert mixed.params["unet"]["conv_in"]["kernel"].dtype == np.float32


# -- failures: one clear error naming the problem -------------------------------------------------
@pytest.fixture(scope="module")
def sd1_folder(tmp_path_factory):
  folder = str(tmp_path_factory.mktemp("fail") / "pipe")
  testing.write_torch_pipeline(folder, "sd1", seed=2)
  return folder


def _copy(folder, tmp_path):
  copy = str(tmp_path / "copy")
  shutil.copytree(folder, copy)
  return copy


def _edit_weights(path, fn):
  from safetensors.numpy import load_file, save_file

  sd = load_file(path)
  fn(sd)
  save_file(sd, path)


def test_missing_key(sd1_folder, tmp_path):
  folder = _copy(sd1_folder, tmp_path)
  path = os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors")
  _edit_weights(path, lambda sd: sd.pop("mid_block.attentions.0.proj_in.weight"))
  with pytest.raises(WeightsError, match="missing key 'mid_block.attentions.0.proj_in.weight'"):
    sdjax.load_pipeline(folder)


def test_model_folder_extras(sd1_folder, tmp_path):
  """sdjax_defaults.json (sampling defaults) and sdjax_training.json's prompt grammar."""
  import json

  from sdjax import sampling

  folder = _copy(sd1_folder, tmp_path)
  plain = sdjax.load_pipeline(folder)
  assert plain.sampling_defaults == {} and plain.prompt_grammar is None
  assert sampling.resolve_settings(plain, None, None, None) == (50, 7.5, None)
  with open(os.path.join(folder, "sdjax_defaults.json"), "w") as f:
    json.dump({"steps": 12, "guidance_scale": 3.5, "scheduler": "euler"}, f)
  with open(os.path.join(folder, "sdjax_training.json"), "w") as f:
    json.dump({"prompt_grammar": "a {color} thing"}, f)
  pipe = sdjax.load_pipeline(folder)
  assert pipe.prompt_grammar == "a {color} thing"
  assert sampling.resolve_settings(pipe, None, None, None) == (12, 3.5, "euler")
  assert sampling.resolve_settings(pipe, 3, 1.0, "ddim") == (3, 1.0, "ddim")
  for bad in ({"steps": "20"}, {"stepz": 20}, [20]):
    with open(os.path.join(folder, "sdjax_defaults.json"), "w") as f:
      json.dump(bad, f)
    with pytest.raises(PipelineError, match="sdjax_defaults.json"):
      sdjax.load_pipeline(folder)


def test_wrong_shape(sd1_folder, tmp_path):
  folder = _copy(sd1_folder, tmp_path)
  path = os.path.join(folder, "vae", "diffusion_pytorch_model.safetensors")
  _edit_weights(path, lambda sd: sd.update({"decoder.conv_in.bias": np.zeros(7, np.float32)}))
  with pytest.raises(WeightsError, match="'decoder.conv_in.bias' has shape"):
    sdjax.load_pipeline(folder)


def test_unused_key(sd1_folder, tmp_path):
  folder = _copy(sd1_folder, tmp_path)
  path = os.path.join(folder, "text_encoder", "model.safetensors")
  _edit_weights(path, lambda sd: sd.update({"text_model.extra.weight": np.zeros(3, np.float32)}))
  with pytest.raises(WeightsError, match="'extra.weight' that its config does not use"):
    sdjax.load_pipeline(folder)


def test_config_does_not_match_weights(sd1_folder, tmp_path):
  folder = _copy(sd1_folder, tmp_path)
  cfg_path = os.path.join(folder, "unet", "config.json")
  import json

  with open(cfg_path) as f:
    cfg = json.load(f)
  cfg["layers_per_block"] = 1
  with open(cfg_path, "w") as f:
    json.dump(cfg, f)
  with pytest.raises(WeightsError, match="unet checkpoint key .* has shape"):
    sdjax.load_pipeline(folder)


def test_unknown_config_option(sd1_folder, tmp_path):
  folder = _copy(sd1_folder, tmp_path)
  cfg_path = os.path.join(folder, "vae", "config.json")
  with open(cfg_path) as f:
    text = f.read()
  with open(cfg_path, "w") as f:
    f.write(text.replace('"act_fn"', '"wavelet_mode": true, "act_fn"'))
  with pytest.raises(ConfigError, match="unknown option 'wavelet_mode'"):
    sdjax.load_pipeline(folder)


def test_bin_pickle_loads_safely(sd1_folder, tmp_path):
  folder = _copy(sd1_folder, tmp_path)
  vae_dir = os.path.join(folder, "vae")
  from safetensors.torch import load_file

  sd = load_file(os.path.join(vae_dir, "diffusion_pytorch_model.safetensors"))
  torch.save(sd, os.path.join(vae_dir, "diffusion_pytorch_model.bin"))
  os.remove(os.path.join(vae_dir, "diffusion_pytorch_model.safetensors"))
  pipe = sdjax.load_pipeline(folder)  # no opt-in: nothing in the pickle runs
  ref = sdjax.load_pipeline(sd1_folder)
  z = randn(1, 8, 8, 4)
  np.testing.assert_array_equal(np.asarray(pipe.vae_decode(z)), np.asarray(ref.vae_decode(z)))


def test_corrupt_weights(sd1_folder, tmp_path):
  folder = _copy(sd1_folder, tmp_path)
  with open(os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors"), "wb") as f:
    f.write(b"not a safetensors file")
  with pytest.raises(WeightsError, match="cannot read weights"):
    sdjax.load_pipeline(folder)


@pytest.mark.parametrize("component", ["unet", "vae", "text_encoder", "tokenizer", "scheduler"])
def test_missing_component_folder(sd1_folder, tmp_path, component):
  folder = _copy(sd1_folder, tmp_path)
  shutil.rmtree(os.path.join(folder, component))
  with pytest.raises(PipelineError, match=f"no {component}/ folder"):
    sdjax.load_pipeline(folder)


def test_not_a_pipeline_folder(tmp_path):
  with pytest.raises(PipelineError, match="no model_index.json"):
    sdjax.load_pipeline(str(tmp_path))
  with pytest.raises(hub.HubError, match="does not exist"):
    sdjax.load_pipeline(str(tmp_path / "nowhere"))


def test_legacy_vae_attention_names(sd1_folder, tmp_path):
  """Older checkpoints name the VAE mid-block attention query/key/value/proj_attn."""
  folder = _copy(sd1_folder, tmp_path)
  path = os.path.join(folder, "vae", "diffusion_pytorch_model.safetensors")
  renames = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}

  def rename(sd):
    for key in list(sd):
      new = key
      for a, b in renames.items():
        new = new.replace(a, b)
      if new != key:
        sd[new] = sd.pop(key)
  _edit_weights(path, rename)
  z = randn(1, 8, 8, 4)
  np.testing.assert_array_equal(np.asarray(sdjax.load_pipeline(folder).vae_decode(z)),
                                np.asarray(sdjax.load_pipeline(sd1_folder).vae_decode(z)))


# -- the hub: only the needed files -----------------------------------------------------------------
REPO_FILES = [
    "model_index.json", "README.md", "v1-5-pruned.ckpt", "v1-5-pruned.safetensors",
    "unet/config.json", "unet/diffusion_pytorch_model.bin",
    "unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.fp16.safetensors",
    "vae/config.json", "vae/diffusion_pytorch_model.bin", "vae/diffusion_pytorch_model.fp16.bin",
    "text_encoder/config.json", "text_encoder/model.safetensors",
    "text_encoder/model.fp16.safetensors", "text_encoder/pytorch_model.bin",
    "tokenizer/vocab.json", "tokenizer/merges.txt", "tokenizer/tokenizer_config.json",
    "tokenizer/special_tokens_map.json", "scheduler/scheduler_config.json",
    "safety_checker/model.safetensors", "feature_extractor/preprocessor_config.json",
]


def test_select_files_prefers_safetensors():
  files = hub.select_files(REPO_FILES)
  assert "unet/diffusion_pytorch_model.safetensors" in files
  assert "text_encoder/model.safetensors" in files
  assert "vae/diffusion_pytorch_model.bin" in files  # the only format the vae has here
  assert not any(f.endswith(".ckpt") or "safety_checker" in f or "fp16" in f for f in files)
  assert "scheduler/scheduler_config.json" in files and "tokenizer/merges.txt" in files


def test_select_files_variant_and_shards():
  files = hub.select_files(REPO_FILES + [
      "unet/diffusion_pytorch_model.safetensors.index.json",
      "unet/diffusion_pytorch_model-00001-of-00002.safetensors",
      "unet/diffusion_pytorch_model-00002-of-00002.safetensors",
  ], variant="fp16")
  assert "unet/diffusion_pytorch_model.fp16.safetensors" in files
  assert "text_encoder/model.fp16.safetensors" in files
  assert "vae/diffusion_pytorch_model.fp16.bin" in files
  assert not any("-0000" in f for f in files)
  sharded = hub.select_files([f for f in REPO_FILES if not f.startswith("unet/diffusion")] + [
      "unet/diffusion_pytorch_model.safetensors.index.json",
      "unet/diffusion_pytorch_model-00001-of-00002.safetensors",
      "unet/diffusion_pytorch_model-00002-of-00002.safetensors",
  ])
  assert sum("-0000" in f for f in sharded) == 2


def test_hub_id_unreachable_is_one_line(monkeypatch):
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")

  def offline(*args, **kwargs):
    raise OSError("network unreachable")

  import huggingface_hub

  monkeypatch.setattr(huggingface_hub, "list_repo_files", offline)
  with pytest.raises(hub.HubError, match="cannot download model 'someone/some-model'"):
    sdjax.load_pipeline("someone/some-model")


def test_hub_download_requests_only_selected_files(monkeypatch, tmp_path, sd1_folder):
  import huggingface_hub

  seen = {}
  monkeypatch.setattr(huggingface_hub, "list_repo_files", lambda repo, revision=None: REPO_FILES)

  def fake_snapshot(repo, revision=None, allow_patterns=None):
    seen["allow"] = allow_patterns
    return sd1_folder

  monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
  pipe = sdjax.load_pipeline("someone/some-model")
  assert pipe.name == "someone/some-model"
  assert seen["allow"] == hub.select_files(REPO_FILES)
