"""Single original-layout checkpoints: load = folder bit for bit, real files for diffusers, export."""

import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

import sdjax
from sdjax import testing
from sdjax.checkpoints import single_file, standard
from sdjax.checkpoints.single_file import SingleFileError
from sdjax.models.clip import CLIPTextConfig
from sdjax.models.unet import UNetConfig
from sdjax.models.vae import VAEConfig
from sdjax.pipeline import PipelineError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DDPM_BUFFERS = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                "posterior_variance", "posterior_mean_coef1", "log_one_minus_alphas_cumprod")


def _as_real_file(state, family, num_text_layers):
  """Adds what released files carry beside the live weights, which loading must ignore."""
  state = dict(state)
  for name in DDPM_BUFFERS:
    state[name] = np.linspace(0.1, 0.9, 1000, dtype=np.float32)
  state["model_ema.diffusion_modelout2weight"] = np.full((3,), 7.0, np.float32)  # EMA: not used
  state["model_ema.decay"] = np.array(0.9999, np.float32)
  if family == "sd1":
    state[single_file.CLIP_PREFIX + "embeddings.position_ids"] = np.arange(77)[None]
  else:
    prefix = single_file.OPENCLIP_PREFIX
    width = state[prefix + "positional_embedding"].shape[1]
    state[prefix + "text_projection"] = np.eye(width, dtype=np.float32)
    state[prefix + "logit_scale"] = np.array(4.6, np.float32)
    # One more resblock than the penultimate-layer encoder uses, as in real SD2 files.
    last = f"{prefix}transformer.resblocks.{num_text_layers - 1}."
    for key in [k for k in state if k.startswith(last)]:
      state[key.replace(last, f"{prefix}transformer.resblocks.{num_text_layers}.")] = state[key] + 1
  return state


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def family_files(request, tmp_path_factory):
  """A tiny random diffusers folder, the sdjax pipeline of it, and its original-layout file."""
  torch.set_num_threads(1)
  family = request.param
  root = tmp_path_factory.mktemp(family)
  folder = str(root / "pipe")
  torch_pipe = testing.write_torch_pipeline(folder, family)
  ref = sdjax.load_pipeline(folder)
  exported = str(root / "exported.safetensors")
  ref.save_single_file(exported)
  real = str(root / "model.safetensors")
  save_file(_as_real_file(load_file(exported), family,
                          ref.text_encoder.config.num_hidden_layers), real)
  return family, folder, torch_pipe, ref, exported, real


@pytest.fixture(scope="module")
def loaded(family_files):
  """The single file loaded with the folder's configs."""
  return sdjax.load_pipeline(family_files[5], config=family_files[1])


def _assert_params_equal(got, want, cast=None):
  flat_got = jax.tree_util.tree_leaves_with_path(got)
  flat_want = jax.tree_util.tree_leaves_with_path(want)
  assert [p for p, _ in flat_got] == [p for p, _ in flat_want]
  for (path, a), (_, b) in zip(flat_got, flat_want, strict=True):
    b = np.asarray(b)
    if cast is not None:
      b = b.astype(cast).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(a), b, err_msg=jax.tree_util.keystr(path))


def test_files_are_real_for_diffusers(family_files):
  """diffusers' own converter reads the exported and the "real" file to the folder's weights."""
  import diffusers

  family, folder, torch_pipe, *_, exported, real = family_files
  for path in (exported, real):
    loaded = diffusers.StableDiffusionPipeline.from_single_file(
        path, config=folder, local_files_only=True, safety_checker=None)
    for name in ("unet", "vae", "text_encoder"):
      want = getattr(torch_pipe, name).state_dict()
      got = getattr(loaded, name).state_dict()
      assert set(got) >= {k for k in want if not k.endswith("position_ids")}, name
      for key, value in want.items():
        assert torch.equal(got[key], value), (path, name, key)


def test_single_file_equals_folder(family_files, loaded):
  family, folder, _, ref, _, real = family_files
  _assert_params_equal(loaded.params, ref.params)
  assert loaded.scheduler_config == ref.scheduler_config
  np.testing.assert_array_equal(loaded.tokenize(["a photo of a cat"]),
                                ref.tokenize(["a photo of a cat"]))


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_ckpt_reads_as_safetensors(family_files, legacy, tmp_path):
  """A Lightning .ckpt of the same weights reads to the same arrays (so the same params)."""
  real = family_files[5]
  state = load_file(real)
  path = str(tmp_path / "model.ckpt")
  torch.save({"state_dict": {k: torch.from_numpy(np.array(v)) for k, v in state.items()},
              "global_step": 875000, "epoch": 3}, path, _use_new_zipfile_serialization=not legacy)
  got = single_file.read_single_file(path)
  assert sorted(got) == sorted(state)
  for key, value in state.items():
    assert got[key].dtype == value.dtype and np.array_equal(got[key], value), key


def test_half_precision_file(family_files, tmp_path):
  """fp16 .safetensors (SD1) and bf16 .ckpt (SD2) load, equal to the folder rounded alike."""
  import ml_dtypes

  family, folder, _, ref, exported, _ = family_files
  state = load_file(exported)
  if family == "sd1":  # also with CLIP keys as transformers < 4.20 saved them (no text_model.)
    state = {k.replace(single_file.CLIP_PREFIX, "cond_stage_model.transformer."): v
             for k, v in state.items()}
    path, cast = str(tmp_path / "model-fp16.safetensors"), np.float16
    save_file({k: v.astype(np.float16) for k, v in state.items()}, path)
  else:  # bf16 as torch writes it
    path, cast = str(tmp_path / "model-bf16.ckpt"), ml_dtypes.bfloat16
    torch.save({k: torch.from_numpy(v).bfloat16() for k, v in state.items()}, path)
  pipe = sdjax.load_pipeline(path, config=folder)
  _assert_params_equal(pipe.params, ref.params, cast=cast)


@pytest.mark.parametrize("form", ["safetensors", "ckpt"])
def test_float8_file(family_files, form, tmp_path):
  """A float8 checkpoint (the UNet's weights in torch's float8_e4m3fn, .ckpt's in float8_e5m2,
  the rest float16, as ComfyUI's and Forge's fp8 saves) loads equal to the folder rounded alike,
  which is what diffusers' from_single_file makes of the same file (float32 weights)."""
  import diffusers
  import ml_dtypes
  from safetensors.torch import save_file as save_torch

  family, folder, torch_pipe, ref, exported, _ = family_files
  eight = torch.float8_e4m3fn if form == "safetensors" else torch.float8_e5m2
  unet_cast = ml_dtypes.float8_e4m3fn if form == "safetensors" else ml_dtypes.float8_e5m2
  state = {k: torch.from_numpy(v).to(eight if k.startswith(single_file.UNET_PREFIX)
                                     else torch.float16) for k, v in load_file(exported).items()}
  path = str(tmp_path / f"model-fp8.{form}")
  if form == "safetensors":
    save_torch(state, path)
  else:  # torch saves float8 with _rebuild_tensor_v3 over untyped storages
    torch.save({"state_dict": state}, path)
  pipe = sdjax.load_pipeline(path, config=folder)
  for name in ("unet", "vae", "text_encoder"):
    _assert_params_equal(pipe.params[name], ref.params[name],
                         cast=unet_cast if name == "unet" else np.float16)
  if family == "sd1" and form == "safetensors":  # (the rounding is diffusers', once is enough)
    theirs = diffusers.StableDiffusionPipeline.from_single_file(
        path, config=folder, local_files_only=True, safety_checker=None)
    for name, dtype in (("unet", eight), ("vae", torch.float16)):
      for key, value in getattr(torch_pipe, name).state_dict().items():
        assert torch.equal(getattr(theirs, name).state_dict()[key], value.to(dtype).float()), key


def test_export_round_trip(family_files, loaded, tmp_path):
  """Exporting the loaded file again writes the same tensors under the same names."""
  exported = family_files[4]
  again = str(tmp_path / "again.safetensors")
  loaded.save_single_file(again)
  a, b = load_file(exported), load_file(again)
  assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)
  half = str(tmp_path / "half.safetensors")
  loaded.save_single_file(half, dtype="float16")
  c = load_file(half)
  assert sorted(c) == sorted(a)
  assert all(c[k].dtype == np.float16 and np.array_equal(c[k], a[k].astype(np.float16)) for k in a)


def _vae_original_file(torch_vae, path, prefix):
  """A diffusers VAE written in the original layout (the tables' inverse), as ft-MSE files are."""
  from sdjax.checkpoints.weights import normalize_keys

  cfg = VAEConfig.from_dict(testing.VAE)
  state = {k: v.numpy() for k, v in torch_vae.state_dict().items()}
  original = single_file.scatter(normalize_keys(state),
                                 single_file.vae_table(cfg, state, prefix=prefix))
  original[prefix + "loss.logvar"] = np.zeros((), np.float32)  # training loss: ignored
  save_file(original, path)


def test_vae_swap(family_files, tmp_path, monkeypatch):
  import diffusers
  import huggingface_hub

  family, folder, torch_pipe, ref, exported, _ = family_files
  if family != "sd1":
    pytest.skip("the VAE is family-independent")
  other = testing.torch_vae(testing.VAE, seed=77)
  vae_dir = str(tmp_path / "vae_folder")
  other.save_pretrained(vae_dir)
  # A hub VAE repo (config.json + weights at its root) downloads only those files.
  seen = {}
  monkeypatch.setattr(huggingface_hub, "list_repo_files",
                      lambda repo, revision=None: sorted(os.listdir(vae_dir)) + ["README.md"])

  def snapshot(repo, revision=None, allow_patterns=None):
    seen["allow"] = allow_patterns
    return vae_dir

  monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot)
  want = sdjax.load_pipeline(folder, vae="someone/sd-vae")
  assert seen["allow"] == ["config.json", "diffusion_pytorch_model.safetensors"]
  assert not np.array_equal(np.asarray(want.params["vae"]["decoder"]["conv_out"]["kernel"]),
                            np.asarray(ref.params["vae"]["decoder"]["conv_out"]["kernel"]))
  _assert_params_equal(want.params["unet"], ref.params["unet"])
  # An original-layout VAE file on a folder, and one under `first_stage_model.` on a single file.
  for prefix, source in (("", folder), ("first_stage_model.", exported)):
    path = str(tmp_path / f"vae{len(prefix)}.safetensors")
    _vae_original_file(other, path, prefix)
    if not prefix:  # the file is real: diffusers reads it to the same weights
      from_file = diffusers.AutoencoderKL.from_single_file(
          path, config=folder, subfolder="vae", local_files_only=True)
      for key, value in other.state_dict().items():
        assert torch.equal(from_file.state_dict()[key], value), key
    pipe = sdjax.load_pipeline(source, config=None if source == folder else folder, vae=path)
    _assert_params_equal(pipe.params["vae"], want.params["vae"])
    _assert_params_equal(pipe.params["text_encoder"], ref.params["text_encoder"])
    assert "vae" in pipe.name
  with pytest.raises(SingleFileError, match="not a VAE file"):
    sdjax.load_pipeline(folder, vae=_write(tmp_path / "x.safetensors", {"w": np.ones(2)}))


def _hub_cache(monkeypatch, root, repo, files):
  """An offline Hugging Face cache holding `files` ({path in repo: local file}) of `repo` at
  main, as hf_hub_download leaves it: what a download finds on its second run."""
  import huggingface_hub

  commit = "0123456789abcdef0123456789abcdef01234567"
  base = root / f"models--{repo.replace('/', '--')}"
  (base / "refs").mkdir(parents=True)
  (base / "refs" / "main").write_text(commit)
  for name, local in files.items():
    target = base / "snapshots" / commit / name
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(local, target)
  monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(root))
  monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def test_hub_single_file(family_files, loaded, monkeypatch, tmp_path):
  """A checkpoint (and a VAE file) on the hub, named `owner/name/path/file` or by its URL,
  downloaded through huggingface_hub: the local file's weights, name and A1111 hash."""
  from sdjax import outputs, run

  family, folder, _, ref, exported, real = family_files
  if family != "sd1":
    pytest.skip("family-independent")
  vae = str(tmp_path / "vae.safetensors")
  _vae_original_file(testing.torch_vae(testing.VAE, seed=5), vae, "")
  _hub_cache(monkeypatch, tmp_path / "hub", "someone/models",
             {"sd/model.safetensors": real, "vae.safetensors": vae})
  want_vae = sdjax.load_pipeline(real, config=folder, vae=vae)
  for source in ("someone/models/sd/model.safetensors",
                 "https://huggingface.co/someone/models/blob/main/sd/model.safetensors",
                 "https://huggingface.co/someone/models/resolve/main/sd/model.safetensors"
                 "?download=true"):
    pipe = sdjax.load_pipeline(source, config=folder)
    _assert_params_equal(pipe.params, loaded.params)
    assert pipe.name.startswith(f"{source} (config ")
    assert run.model_identity(source) == ("model", outputs.short_hash(real))
  pipe = sdjax.load_pipeline(real, config=folder, vae="someone/models/vae.safetensors")
  _assert_params_equal(pipe.params["vae"], want_vae.params["vae"])
  # PNGs name a --vae file by its file name (no path) and its A1111 hash, as A1111 does.
  for source in ("someone/models/vae.safetensors", vae):
    assert run.vae_identity(source) == ("vae.safetensors", outputs.short_hash(vae))
  for source in ("someone/models/other.safetensors",
                 "https://huggingface.co/someone/models/blob/v2/sd/model.safetensors"):
    with pytest.raises(ValueError, match="is no local file and cannot be downloaded") as e:
      sdjax.load_pipeline(source, config=folder)
    assert "\n" not in str(e.value)
  with pytest.raises(SingleFileError, match="checkpoint file .*nothere.ckpt does not exist"):
    sdjax.load_pipeline("models/nothere.ckpt")  # owner/name without a file: a local path


def _write(path, state):
  save_file({k: np.asarray(v, np.float32) for k, v in state.items()}, str(path))
  return str(path)


def test_bad_files(family_files, tmp_path):
  family, folder, _, _, exported, real = family_files
  state = load_file(real)
  other = str(tmp_path / "other")  # the same folder, but its text encoder says the other family
  shutil.copytree(folder, other)
  cfg_path = os.path.join(other, "text_encoder", "config.json")
  acts = ('"quick_gelu"', '"gelu"') if family == "sd1" else ('"gelu"', '"quick_gelu"')
  with open(cfg_path) as f:
    text = f.read().replace(*acts)
  with open(cfg_path, "w") as f:
    f.write(text)
  other_family = "SD2" if family == "sd1" else "SD1"
  with pytest.raises(PipelineError, match=f"is an {family.upper()} checkpoint but config .* is "
                     f"{other_family}"):
    sdjax.load_pipeline(real, config=other)
  if family != "sd1":
    return  # the rest is family-independent
  unknown = _write(tmp_path / "unknown.safetensors",
                   {**state, "model.diffusion_model.extra_block.weight": np.ones(3)})
  with pytest.raises(SingleFileError, match="'model.diffusion_model.extra_block.weight' that the"):
    sdjax.load_pipeline(unknown, config=folder)
  missing = dict(state)
  del missing["model.diffusion_model.middle_block.1.proj_out.weight"]
  with pytest.raises(SingleFileError, match="missing key 'model.diffusion_model.middle_block.1"):
    sdjax.load_pipeline(_write(tmp_path / "missing.safetensors", missing), config=folder)
  # (inpainting files, 9 channels, load: test_inpaint; pix2pix, 8, and depth, 5: their tests)
  upscaler = dict(state)
  w = upscaler["model.diffusion_model.input_blocks.0.0.weight"]
  upscaler["model.diffusion_model.input_blocks.0.0.weight"] = np.concatenate([w, w[:, :3]], 1)
  with pytest.raises(sdjax.PipelineError, match="is an x4 upscaler .7 UNet input channels. but "
                                                "config .* is not one"):
    sdjax.load_pipeline(_write(tmp_path / "upscaler.safetensors", upscaler), config=folder)
  data = open(real, "rb").read()
  truncated = tmp_path / "truncated.safetensors"
  truncated.write_bytes(data[: len(data) // 2])
  with pytest.raises(SingleFileError, match="truncated"):
    sdjax.load_pipeline(str(truncated), config=folder)
  with pytest.raises(SingleFileError, match="checkpoint file .*nothere.ckpt does not exist"):
    sdjax.load_pipeline(str(tmp_path / "nothere.ckpt"))
  shard = tmp_path / "model-00001-of-00002.safetensors"
  shutil.copy(real, shard)
  with pytest.raises(SingleFileError, match="one shard of a sharded checkpoint"):
    sdjax.load_pipeline(str(shard), config=folder)


def test_missing_config_offline(family_files, monkeypatch):
  import huggingface_hub

  family, folder, *_, real = family_files
  if family != "sd1":
    pytest.skip("family-independent")

  def offline(*args, **kwargs):
    raise OSError("network unreachable")

  monkeypatch.setattr(huggingface_hub, "list_repo_files", offline)
  with pytest.raises(ValueError, match="cannot download model 'someone/config-repo'") as e:
    sdjax.load_pipeline(real, config="someone/config-repo")
  assert "\n" not in str(e.value)
  with pytest.raises(ValueError, match="model folder '/nonexistent/cfg' does not exist"):
    sdjax.load_pipeline(real, config="/nonexistent/cfg")


def test_main_bad_file_exits_2(family_files, tmp_path):
  family, folder, *_, real = family_files
  if family != "sd1":
    pytest.skip("family-independent")
  truncated = tmp_path / "cut.safetensors"
  truncated.write_bytes(open(real, "rb").read()[:1000])
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, "main.py"), "--model", str(truncated),
       "--model_config", folder, "--prompt", "a cat", "--output_dir", str(tmp_path / "o")],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr
  errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and "cut.safetensors" in errors[0] and "truncated" in errors[0]


# -- built-in standard configs ----------------------------------------------------------------------
def _fake_state(family, in_channels=4):
  """Only the keys detection reads (names, and the shape of the UNet's first conv)."""
  state = {"model.diffusion_model.input_blocks.0.0.weight": np.zeros((320, in_channels, 3, 3))}
  text = {"sd1": single_file.CLIP_PREFIX + "final_layer_norm.weight",
          "sd2": single_file.OPENCLIP_PREFIX + "ln_final.weight",
          "sdxl": single_file.SDXL_OPENCLIP_PREFIX + "ln_final.weight",
          "sdxl_refiner": single_file.SDXL_REFINER_OPENCLIP_PREFIX + "ln_final.weight"}[family]
  state[text] = np.zeros((8,))
  return state


def test_standard_configs_parse():
  for name in standard.STANDARD_CONFIGS:
    raw = standard.standard_config(name)
    UNetConfig.from_dict(raw["unet"])
    VAEConfig.from_dict(raw["vae"])
    text = {n: CLIPTextConfig.from_dict(raw[n]) for n in ("text_encoder", "text_encoder_2")
            if n in raw}
    family = single_file.config_family(text)
    assert name.startswith(family), name
    assert all(tok in raw for tok in ("tokenizer", "tokenizer_2")
               if tok.replace("tokenizer", "text_encoder") in raw), name


def test_family_detection_picks_standard_config():
  pick = single_file.standard_config_name
  assert pick(single_file.detect_family(_fake_state("sd1")), None) == "sd1"
  assert pick(single_file.detect_family(_fake_state("sd2")), None) == "sd2_768_v"
  assert pick(single_file.detect_family(_fake_state("sd2")), "v_prediction") == "sd2_768_v"
  assert pick(single_file.detect_family(_fake_state("sd2")), "epsilon") == "sd2_512_base"
  assert pick(single_file.detect_family(_fake_state("sdxl")), None) == "sdxl"
  assert pick(single_file.detect_family(_fake_state("sdxl_refiner")), None) == "sdxl_refiner"
  assert single_file.detect_family(_fake_state("sdxl")) == "sdxl"
  assert single_file.detect_family(_fake_state("sdxl_refiner")) == "sdxl_refiner"
  assert single_file.detect_family(_fake_state("sd1", in_channels=9)) == "sd1"  # inpainting
  assert pick("sd2", None, inpainting=True) == "sd2_512_base"  # as stable-diffusion-2-inpainting
  for channels in (8, 5):  # instruct-pix2pix, depth-to-image
    assert single_file.detect_family(_fake_state("sd2", in_channels=channels)) == "sd2"
  assert single_file.detect_family(_fake_state("sd2", in_channels=7)) == "sd2"  # x4 upscaler
  for prediction in (None, "v_prediction", "epsilon"):  # prediction_type overrides it later
    assert pick("sd2", prediction, upscaler=True) == "sd2_x4_upscaler"
  with pytest.raises(SingleFileError, match="no standard config of an sd1 x4 upscaler"):
    pick("sd1", None, upscaler=True)
  with pytest.raises(SingleFileError, match="an unsupported model .6 UNet input channels"):
    single_file.detect_family(_fake_state("sd1", in_channels=6))
  with pytest.raises(SingleFileError, match="looks like a VAE file"):
    single_file.detect_family({"encoder.conv_in.weight": np.zeros(1)})


def _playground_folder(base: str, folder: str) -> dict:
  """A copy of an SDXL folder configured as Playground v2.5 is: its EDM scheduler, VAE scaling
  0.5 and latent statistics; returns the VAE's config."""
  import json  # noqa: PLC0415

  shutil.copytree(base, folder)
  with open(os.path.join(folder, "scheduler", "scheduler_config.json"), "w") as f:
    json.dump(single_file.PLAYGROUND_SCHEDULER, f)
  index_path = os.path.join(folder, "model_index.json")
  with open(index_path) as f:
    index = json.load(f)
  index["scheduler"] = ["diffusers", "EDMDPMSolverMultistepScheduler"]
  with open(index_path, "w") as f:
    json.dump(index, f)
  vae_path = os.path.join(folder, "vae", "config.json")
  with open(vae_path) as f:
    vae = json.load(f)
  vae.update(scaling_factor=0.5, latents_mean=[-0.3, 0.2, 0.4, -0.1],
             latents_std=[1.7, 0.6, 1.2, 0.9])
  with open(vae_path, "w") as f:
    json.dump(vae, f)
  return vae


def test_playground_single_file(tmp_path, monkeypatch):
  """A Playground v2.5 file (SDXL layout with `edm_mean` / `edm_std`) loads without a config
  folder with Playground's EDM DPM-Solver++ scheduler, VAE scaling 0.5 and the file's latent
  statistics (diffusers' single-file constants), and generates diffusers' images of it (read
  with a folder of those configs); a config folder's own configs win, as in diffusers."""
  import diffusers  # noqa: PLC0415
  from diffusers.loaders import single_file_utils  # noqa: PLC0415

  from sdjax import pipeline  # noqa: PLC0415

  torch.set_num_threads(1)
  assert single_file.PLAYGROUND_VAE_SCALING == single_file_utils.PLAYGROUND_VAE_SCALING_FACTOR
  testing.write_torch_sdxl(str(tmp_path / "sdxl"))
  base = str(tmp_path / "sdxl" / "base")
  folder = str(tmp_path / "playground")
  vae = _playground_folder(base, folder)
  ref = sdjax.load_pipeline(folder)
  path = str(tmp_path / "playground.safetensors")
  ref.save_single_file(path)  # exported with the statistics, as Playground's file has them
  state = load_file(path)
  np.testing.assert_array_equal(state["edm_mean"].ravel(), np.float32(vae["latents_mean"]))
  np.testing.assert_array_equal(state["edm_std"].ravel(), np.float32(vae["latents_std"]))
  # No config folder: the family's standard configs (here the tiny SDXL's own, which has Euler
  # and other latent statistics), then Playground's settings from the file.
  configs = pipeline._single_file_configs
  monkeypatch.setattr(pipeline, "_single_file_configs",
                      lambda family, config, *a: configs(family, config or base, *a))
  pipe = sdjax.load_pipeline(path)
  assert pipe.scheduler_config == single_file.PLAYGROUND_SCHEDULER
  assert (pipe.vae.config.scaling_factor, pipe.vae.config.latents_mean,
          pipe.vae.config.latents_std) == (0.5, tuple(np.float32(vae["latents_mean"]).tolist()),
                                           tuple(np.float32(vae["latents_std"]).tolist()))
  _assert_params_equal(pipe.params, ref.params)
  torch_pipe = diffusers.StableDiffusionXLPipeline.from_single_file(
    path, config=folder, local_files_only=True)
  assert type(torch_pipe.scheduler).__name__ == "EDMDPMSolverMultistepScheduler"
  latents = np.random.default_rng(0).standard_normal(
    (2, 32 // pipe.vae_scale, 24 // pipe.vae_scale, 4)).astype(np.float32)
  want = torch_pipe(["a red circle", "a cat"], num_inference_steps=5, height=32, width=24,
                    guidance_scale=3.0, latents=torch.from_numpy(latents.transpose(0, 3, 1, 2)),
                    output_type="np").images
  ours = pipe.generate(["a red circle", "a cat"], steps=5, height=32, width=24,
                       guidance_scale=3.0, latents=latents)
  err = float(np.linalg.norm(ours - want) / np.linalg.norm(want))
  print(f"playground single file vs diffusers: {err:.2e}")
  assert err <= 1e-4
  with_config = sdjax.load_pipeline(path, config=base)  # the folder says Euler: as diffusers
  assert with_config.scheduler_config["_class_name"] == "EulerDiscreteScheduler"
  cosxl = str(tmp_path / "cosxl.safetensors")
  save_file({**{k: v for k, v in state.items() if not k.startswith("edm_")},
             "edm_vpred.sigma_max": np.float32([120.0])}, cosxl)
  with pytest.raises(SingleFileError, match=r"EDM v-prediction model \(edm_vpred.sigma_max: "
                     r"CosXL\), whose file does not say its scheduler: pass config="):
    sdjax.load_pipeline(cosxl)
  _assert_params_equal(sdjax.load_pipeline(cosxl, config=folder).params, ref.params)
  half = str(tmp_path / "half.safetensors")
  save_file({**{k: v for k, v in state.items() if k != "edm_std"}}, half)
  with pytest.raises(SingleFileError, match="has one of edm_mean / edm_std"):
    sdjax.load_pipeline(half)


def test_marker_keys(family_files, tmp_path, monkeypatch):
  """`v_pred` (and `ztsnr`) marker keys set the scheduler (an explicit prediction_type wins);
  an EDM model's markers are a one-line refusal."""
  family, folder, _, ref, exported, _ = family_files
  state = load_file(exported)
  assert ("v_pred" in state) == (ref.scheduler_config["prediction_type"] == "v_prediction")
  state = {k: v for k, v in state.items() if k != "v_pred"}
  marked = str(tmp_path / "marked.safetensors")
  save_file({**state, "v_pred": np.zeros((0,), np.float32),
             "ztsnr": np.zeros((0,), np.float32)}, marked)
  pipe = sdjax.load_pipeline(marked, config=folder)
  assert pipe.scheduler_config == {**ref.scheduler_config, "prediction_type": "v_prediction",
                                   "rescale_betas_zero_snr": True}
  _assert_params_equal(pipe.params, ref.params)
  explicit = sdjax.load_pipeline(marked, config=folder, prediction_type="epsilon")
  assert explicit.scheduler_config["prediction_type"] == "epsilon"
  assert single_file.scheduler_markers({"ztsnr": 0}) == {}  # zero SNR only with v-prediction
  assert single_file.standard_config_name(family, "v_prediction") == (
      "sd1" if family == "sd1" else "sd2_768_v")
  # ModelSpec metadata (sd-scripts, Stability) says it too: "v" or "epsilon".
  other = "epsilon" if ref.scheduler_config["prediction_type"] == "v_prediction" else "v"
  spec = str(tmp_path / "modelspec.safetensors")
  save_file(state, spec, metadata={"modelspec.prediction_type": other})
  pipe = sdjax.load_pipeline(spec, config=folder)
  assert pipe.scheduler_config["prediction_type"] == (
      "epsilon" if other == "epsilon" else "v_prediction")
  asked = []

  class Stop(BaseException):  # not an Exception, which loaders may turn into their errors
    pass

  def standard_config(name):
    asked.append(name)
    raise Stop  # stop here: only the choice of config is under test

  monkeypatch.setattr(standard, "standard_config", standard_config)
  with pytest.raises(Stop):
    sdjax.load_pipeline(spec)
  assert asked == ["sd1" if family == "sd1" else "sd2_512_base"]
  edm = str(tmp_path / "edm.safetensors")
  save_file({**state, "edm_mean": np.zeros((1, 4, 1, 1), np.float32),
             "edm_std": np.ones((1, 4, 1, 1), np.float32)}, edm)
  with pytest.raises(SingleFileError, match=r"Playground's EDM latent statistics \(edm_mean\) "
                     "but is not an SDXL-layout model"):
    sdjax.load_pipeline(edm, config=folder)


def _standard_keys(name):
  """Original-layout key -> shape for a full-size standard config, from diffusers / transformers
  models built on the meta device (names and shapes, no weights)."""
  import diffusers
  import transformers

  from sdjax.checkpoints.weights import normalize_keys

  raw = standard.standard_config(name)
  with torch.device("meta"):
    models = {"unet": diffusers.UNet2DConditionModel(**raw["unet"]),
              "vae": diffusers.AutoencoderKL(**raw["vae"])}
    if "text_encoder" in raw:
      models["text_encoder"] = transformers.CLIPTextModel(
          transformers.CLIPTextConfig(**raw["text_encoder"]))
    if "text_encoder_2" in raw:
      models["text_encoder_2"] = transformers.CLIPTextModelWithProjection(
          transformers.CLIPTextConfig(**raw["text_encoder_2"]))
  shapes = {comp: normalize_keys({k: _zeros(tuple(v.shape)) for k, v in m.state_dict().items()})
            for comp, m in models.items()}
  text_cfgs = {n: CLIPTextConfig.from_dict(raw[n]) for n in ("text_encoder", "text_encoder_2")
               if n in raw}
  state = single_file.to_original(single_file.config_family(text_cfgs),
                                  UNetConfig.from_dict(raw["unet"]),
                                  VAEConfig.from_dict(raw["vae"]), shapes)
  return {k: v.shape for k, v in state.items()}


def _zeros(shape):
  return np.broadcast_to(np.zeros((), np.float32), shape)  # zero-strided: no memory


@pytest.mark.parametrize("name", ["sd1", "sd2_768_v", "sdxl", "sd2_x4_upscaler"])
def test_standard_configs_match_released_key_names(name):
  """The tables on the full-size configs give the key names and shapes of the released files."""
  keys = _standard_keys(name)
  if name == "sd2_x4_upscaler":
    _check_x4_upscaler_keys(keys)
    return
  unet = "model.diffusion_model."
  want = {
      unet + "input_blocks.0.0.weight": (320, 4, 3, 3),
      unet + "input_blocks.3.0.op.weight": (320, 320, 3, 3),
      unet + "input_blocks.4.0.skip_connection.weight": (640, 320, 1, 1),
      unet + "input_blocks.11.0.out_layers.3.weight": (1280, 1280, 3, 3),
      unet + "middle_block.2.emb_layers.1.weight": (1280, 1280),
      unet + "output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
      unet + "output_blocks.5.2.conv.weight": (1280, 1280, 3, 3),
      unet + "output_blocks.8.2.conv.weight": (640, 640, 3, 3),
      unet + "output_blocks.11.1.transformer_blocks.0.ff.net.2.weight": (320, 1280),
      unet + "time_embed.2.weight": (1280, 1280),
      unet + "out.2.weight": (4, 320, 3, 3),
      "first_stage_model.encoder.down.1.block.0.nin_shortcut.weight": (256, 128, 1, 1),
      "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight": (128, 256, 1, 1),
      "first_stage_model.decoder.up.3.upsample.conv.weight": (512, 512, 3, 3),
      "first_stage_model.encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
      "first_stage_model.decoder.mid.attn_1.proj_out.weight": (512, 512, 1, 1),
      "first_stage_model.post_quant_conv.weight": (4, 4, 1, 1),
  }
  if name == "sdxl":  # three levels, attention from level 1, 10 transformer blocks at the bottom
    _check_sdxl_keys(keys)
    return
  if name == "sd1":
    want[unet + "input_blocks.1.1.proj_in.weight"] = (320, 320, 1, 1)
    want[single_file.CLIP_PREFIX + "encoder.layers.11.mlp.fc2.weight"] = (768, 3072)
    assert len([k for k in keys if k.startswith(unet)]) == 686  # as in v1-5-pruned.ckpt
  else:
    want[unet + "input_blocks.1.1.proj_in.weight"] = (320, 320)  # linear projection
    clip = single_file.OPENCLIP_PREFIX
    want[clip + "transformer.resblocks.22.attn.in_proj_weight"] = (3072, 1024)
    want[clip + "positional_embedding"] = (77, 1024)
    want[clip + "token_embedding.weight"] = (49408, 1024)
  assert len([k for k in keys if k.startswith("first_stage_model.")]) == 248
  for key, shape in want.items():
    assert keys.get(key) == shape, key


def _check_sdxl_keys(keys):
  unet = "model.diffusion_model."
  want = {
      unet + "label_emb.0.0.weight": (1280, 2816),
      unet + "input_blocks.3.0.op.weight": (320, 320, 3, 3),
      unet + "input_blocks.7.1.transformer_blocks.9.attn2.to_k.weight": (1280, 2048),
      unet + "middle_block.1.transformer_blocks.9.ff.net.2.weight": (1280, 5120),
      unet + "output_blocks.2.2.conv.weight": (1280, 1280, 3, 3),
      unet + "output_blocks.5.2.conv.weight": (640, 640, 3, 3),
      unet + "output_blocks.8.0.skip_connection.weight": (320, 640, 1, 1),
      "conditioner.embedders.0.transformer.text_model.encoder.layers.11.mlp.fc1.weight":
          (3072, 768),
      "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight": (3840, 1280),
      "conditioner.embedders.1.model.text_projection": (1280, 1280),
      "first_stage_model.decoder.up.3.upsample.conv.weight": (512, 512, 3, 3),
  }
  for key, shape in want.items():
    assert keys.get(key) == shape, key
  assert unet + "input_blocks.1.1.proj_in.weight" not in keys  # no attention at level 0
  assert not any(k.startswith(unet + "input_blocks.9.") for k in keys)


def _check_x4_upscaler_keys(keys):
  """x4-upscaler-ema's layout (Stability's x4-upscaling.yaml): 256 channels times 1, 2, 2, 4,
  attention from level 1 with self-attention only at the bottom (elsewhere attn1 attends to the
  text too), noise-level classes, a three-level VAE."""
  unet = "model.diffusion_model."
  want = {
      unet + "input_blocks.0.0.weight": (256, 7, 3, 3),
      unet + "label_emb.weight": (1000, 1024),
      unet + "time_embed.0.weight": (1024, 256),
      unet + "input_blocks.4.0.skip_connection.weight": (512, 256, 1, 1),
      unet + "input_blocks.4.1.proj_in.weight": (512, 512),
      unet + "input_blocks.4.1.transformer_blocks.0.attn1.to_k.weight": (512, 1024),
      unet + "input_blocks.10.0.skip_connection.bias": (1024,),  # diffusers' detection key
      unet + "input_blocks.10.1.transformer_blocks.0.attn1.to_k.weight": (1024, 1024),
      unet + "middle_block.1.transformer_blocks.0.attn1.to_k.weight": (1024, 1024),
      unet + "output_blocks.2.2.conv.weight": (1024, 1024, 3, 3),
      unet + "output_blocks.7.1.transformer_blocks.0.attn1.to_k.weight": (512, 1024),
      unet + "output_blocks.11.0.skip_connection.weight": (256, 512, 1, 1),
      unet + "out.2.weight": (4, 256, 3, 3),
      single_file.OPENCLIP_PREFIX + "transformer.resblocks.22.attn.in_proj_weight": (3072, 1024),
      "first_stage_model.encoder.down.1.downsample.conv.weight": (256, 256, 3, 3),
      "first_stage_model.decoder.up.2.upsample.conv.weight": (512, 512, 3, 3),
      "first_stage_model.decoder.mid.attn_1.q.weight": (512, 512, 1, 1),
  }
  for key, shape in want.items():
    assert keys.get(key) == shape, key
  assert unet + "input_blocks.1.1.proj_in.weight" not in keys  # no attention at level 0
  assert not any(k.startswith("first_stage_model.decoder.up.3.") for k in keys)


def test_builtin_configs_and_tokenizer_offline(family_files, monkeypatch):
  """Without config=, a file gets its family's standard config and the shipped CLIP vocabulary."""
  family, folder, _, ref, _, real = family_files
  tok = standard.clip_tokenizer("!" if family == "sd2" else "<|endoftext|>")
  assert len(tok) == 49408
  assert tok("a photo of a cat")["input_ids"] == [49406, 320, 1125, 539, 320, 2368, 49407]
  if family != "sd1":
    return
  # The standard path end to end, with the tiny architecture standing in for the full-size one.
  import json

  tiny = {name: json.load(open(os.path.join(folder, name, file)))
          for name, file in (("unet", "config.json"), ("vae", "config.json"),
                             ("text_encoder", "config.json"),
                             ("scheduler", "scheduler_config.json"))}
  tiny["tokenizer"] = {"pad_token": "<|endoftext|>"}
  asked = []
  monkeypatch.setattr(standard, "standard_config", lambda name: asked.append(name) or tiny)
  pipe = sdjax.load_pipeline(real)
  assert asked == ["sd1"]
  _assert_params_equal(pipe.params, ref.params)
  assert len(pipe.tokenizer) == 49408


def test_hub_selects_only_what_is_needed():
  from sdjax.checkpoints import hub

  pipeline_repo = ["model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
                   "vae/config.json", "vae/diffusion_pytorch_model.safetensors",
                   "vae/diffusion_pytorch_model.bin", "text_encoder/config.json",
                   "text_encoder/model.safetensors", "tokenizer/vocab.json",
                   "tokenizer/merges.txt", "scheduler/scheduler_config.json"]
  assert hub.select_files(pipeline_repo, component="vae") == [
      "vae/config.json", "vae/diffusion_pytorch_model.safetensors"]
  vae_repo = ["config.json", "diffusion_pytorch_model.bin", "diffusion_pytorch_model.fp16.safetensors",
              "diffusion_pytorch_model.safetensors", "vae-ft-mse-840000-ema-pruned.ckpt"]
  assert hub.select_files(vae_repo, component="vae") == [
      "config.json", "diffusion_pytorch_model.safetensors"]
  assert hub.select_files(vae_repo, component="vae", variant="fp16")[1] == (
      "diffusion_pytorch_model.fp16.safetensors")
  configs = hub.select_files(pipeline_repo, configs_only=True)
  assert "tokenizer/vocab.json" in configs and "unet/config.json" in configs
  assert not any(f.endswith((".safetensors", ".bin")) for f in configs)


# -- SDXL --------------------------------------------------------------------------------------------
def test_sdxl_single_files(tmp_path):
  """SDXL base and refiner: the exported file is real for diffusers (same weights) and loads back
  into sdjax equal to the folder bit for bit."""
  import diffusers

  from sdjax.checkpoints.weights import normalize_keys

  torch.set_num_threads(1)
  torch_pipes = testing.write_torch_sdxl(str(tmp_path / "sdxl"))
  for torch_pipe, kind, cls in zip(
      torch_pipes, ("base", "refiner"),
      (diffusers.StableDiffusionXLPipeline, diffusers.StableDiffusionXLImg2ImgPipeline),
      strict=True):
    folder = str(tmp_path / "sdxl" / kind)
    ref = sdjax.load_pipeline(folder)
    path = str(tmp_path / f"{kind}.safetensors")
    ref.save_single_file(path)
    state = single_file.read_single_file(path)
    family = "sdxl" if kind == "base" else "sdxl_refiner"
    assert single_file.detect_family(state) == family
    assert any(k.startswith(f"{single_file.UNET_PREFIX}label_emb.0.0.") for k in state)
    loaded = cls.from_single_file(path, config=folder, local_files_only=True)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
      if getattr(torch_pipe, name) is None:
        continue
      want = normalize_keys(getattr(torch_pipe, name).state_dict())
      got = normalize_keys(getattr(loaded, name).state_dict())
      assert sorted(got) == sorted(want), name
      for key, value in want.items():
        assert torch.equal(got[key], value), (kind, name, key)
    pipe = sdjax.load_pipeline(path, config=folder)
    _assert_params_equal(pipe.params, ref.params)
    assert pipe.is_sdxl and (pipe.text_encoder is None) == (kind == "refiner")
    assert (pipe.force_zeros_for_empty_prompt, pipe.requires_aesthetics_score) == (
        ref.force_zeros_for_empty_prompt, ref.requires_aesthetics_score)
    ids = ref.tokenize_2(["a photo of a cat"])
    np.testing.assert_array_equal(pipe.tokenize_2(["a photo of a cat"]), ids)
