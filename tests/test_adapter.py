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


@pytest.fixture(scope="module")
def sd1_adapter(tmp_path_factory):
  """(diffusers' StableDiffusionAdapterPipeline, sdjax pipeline, sdjax Adapter, the torch
  adapter) of tiny random SD1 networks; the adapter saved as a diffusers folder."""
  import sdjax  # noqa: PLC0415

  folder = str(tmp_path_factory.mktemp("adapter") / "pipe")
  base = testing.write_torch_pipeline(folder, "sd1", seed=11)
  adapter = torch_adapter("sd1", 13)
  adapter.save_pretrained(folder + "_adapter", safe_serialization=True)
  pipe = sdjax.load_pipeline(folder)
  ref = diffusers.StableDiffusionAdapterPipeline(
      vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer, unet=base.unet,
      adapter=adapter, scheduler=diffusers.EulerDiscreteScheduler.from_config(
          pipe.scheduler_config), safety_checker=None, feature_extractor=None,
      requires_safety_checker=False)
  ref.set_progress_bar_config(disable=True)
  return ref, pipe, sdjax.load_controlnet(folder + "_adapter"), adapter


PROMPTS = ["a red circle in the center", "a photo of a cat"]


def test_generate_matches_diffusers(sd1_adapter, tmp_path):
  """Text-to-image steered by a T2I-Adapter (loaded by load_controlnet from its folder), with
  classifier-free guidance (also split, cfg_parallel) and a conditioning scale; then two adapters (diffusers'
  MultiAdapter: features weighted by the scales, summed), the second's one image serving both
  prompts."""
  import sdjax  # noqa: PLC0415

  ref, pipe, adapter, torch_first = sd1_adapter
  assert isinstance(adapter, sdjax.Adapter)
  rng = np.random.default_rng(4)
  control = rng.uniform(size=(2, 16, 16, 3)).astype(np.float32)
  latents = randn(2, 8, 8, 4, seed=5)
  kw = dict(num_inference_steps=4, guidance_scale=3.0, height=16, width=16)
  ours_kw = dict(steps=4, guidance_scale=3.0, height=16, width=16, scheduler="euler",
                 latents=latents)
  with torch.no_grad():
    expected = ref(PROMPTS, image=nchw(control), latents=nchw(latents), output_type="np",
                   adapter_conditioning_scale=1.4, **kw).images
  plain = pipe.generate(PROMPTS, **ours_kw)
  change = float(np.linalg.norm(plain - expected) / np.linalg.norm(expected))
  for split in (False, True):  # cfg_parallel: the split program (here on one device)
    ours = pipe.generate(PROMPTS, controlnet=adapter, control_images=control,
                         controlnet_conditioning_scale=1.4, cfg_parallel=split, **ours_kw)
    err = float(np.linalg.norm(ours - expected) / np.linalg.norm(expected))
    print(f"\nt2i-adapter generate, cfg_parallel={split}: {err:.2e} (without it: {change:.2e})")
    assert err <= 1e-4 and change > 100 * err

  torch_second = torch_adapter("sd1", 17)
  torch_second.save_pretrained(str(tmp_path / "second"), safe_serialization=True)
  multi = diffusers.StableDiffusionAdapterPipeline(
      **{**ref.components, "adapter": diffusers.MultiAdapter([torch_first, torch_second])})
  multi.set_progress_bar_config(disable=True)
  second = rng.uniform(size=(1, 16, 16, 3)).astype(np.float32)
  with torch.no_grad():
    expected = multi(PROMPTS, image=[nchw(control), nchw(np.repeat(second, 2, 0))],
                     latents=nchw(latents), output_type="np",
                     adapter_conditioning_scale=[0.8, 1.5], **kw).images
  ours = pipe.generate(PROMPTS, controlnet=[adapter, sdjax.load_adapter(str(tmp_path / "second"))],
                       control_images=[control, second], controlnet_conditioning_scale=[0.8, 1.5],
                       **ours_kw)
  err = float(np.linalg.norm(ours - expected) / np.linalg.norm(expected))
  print(f"two t2i-adapters: {err:.2e}")
  assert err <= 1e-4


def test_composable_prompt_takes_the_features_per_part(sd1_adapter):
  """A1111's composable prompts run the UNet on [uncond, part rows]: the adapter's feature maps
  go with each row's image. One part of weight 1 (`:1`) is the plain guided image, to rounding."""
  _, pipe, adapter, _ = sd1_adapter
  control = np.random.default_rng(7).uniform(size=(2, 16, 16, 3)).astype(np.float32)
  kw = dict(steps=3, guidance_scale=3.0, height=16, width=16, scheduler="euler", seed=3,
            controlnet=adapter, control_images=control, prompt_syntax="a1111")
  plain = pipe.generate(PROMPTS, **kw)
  parts = pipe.generate([p + " :1" for p in PROMPTS], **kw)
  err = float(np.linalg.norm(parts - plain) / np.linalg.norm(plain))
  print(f"\nt2i-adapter, composable prompt of one part: {err:.2e}")
  assert err <= 1e-5


def test_control_modes_soften_the_features(sd1_adapter):
  """A1111's "My prompt is more important" scales an adapter's feature maps by 0.25, 0.62,
  0.825, 1 (the tiny one has two); "ControlNet is more important" also leaves the
  unconditional rows without them."""
  import jax.numpy as jnp  # noqa: PLC0415

  from sdjax import conditioning  # noqa: PLC0415

  _, pipe, adapter, _ = sd1_adapter
  controlled = pipe.with_controlnet(adapter)
  x, ctx = randn(4, 8, 8, 4, seed=1), randn(4, 77, 32, seed=2)
  t = np.full((4,), 501.0, np.float32)
  image = np.random.default_rng(3).uniform(size=(4, 16, 16, 3)).astype(np.float32)
  features = adapter.model.apply({"params": adapter.params}, image)
  rows = np.asarray([0.0, 0.0, 1.0, 1.0], np.float32).reshape(-1, 1, 1, 1)
  for mode in ("prompt", "controlnet"):
    got = conditioning.predict(
        controlled.networks, controlled.params, x, t, conditioning.Embeddings(ctx),
        control=conditioning.ControlInput(
            conditioning.adapter_features(controlled.networks, controlled.params, (image,)),
            jnp.asarray([1.5]), (mode,), jnp.asarray(rows[:, 0, 0, 0])))
    want = [f * 1.5 * f_ * (rows if mode == "controlnet" else 1.0)
            for f, f_ in zip(features, (0.25, 0.62), strict=True)]
    expected = pipe.unet.apply({"params": pipe.params["unet"]}, x, t, ctx,
                               intrablock_residuals=want)
    assert_close(got, expected, 1e-6)


def test_bad_adapter_arguments(sd1_adapter, tmp_path):
  import sdjax  # noqa: PLC0415

  _, pipe, adapter, _ = sd1_adapter
  kw = dict(steps=2, height=16, width=16)
  control = np.zeros((16, 16, 3), np.float32)
  with pytest.raises(ValueError, match="guess mode is a ControlNet's: not with a T2I-Adapter"):
    pipe.generate(PROMPTS, controlnet=adapter, control_images=control, guess_mode=True, **kw)
  with pytest.raises(ValueError, match="takes images whose sides are multiples of 2, got 24x17"):
    adapter.check_fits(pipe, 17, 24)
  torch_adapter("sdxl", 3).save_pretrained(str(tmp_path / "xl"), safe_serialization=True)
  with pytest.raises(ValueError, match=r"does not fit this model \(feature maps"):
    pipe.generate(PROMPTS, controlnet=sdjax.load_adapter(str(tmp_path / "xl")),
                  control_images=control, **kw)
  with pytest.raises(sdjax.PipelineError, match="cannot load T2I-Adapter .*missing"):
    sdjax.load_adapter(str(tmp_path / "missing"))
  from sdjax.checkpoints import weights  # noqa: PLC0415

  weights.write_safetensors(str(tmp_path / "other.safetensors"), {"x.weight": np.zeros(2)})
  with pytest.raises(sdjax.PipelineError, match="is not a T2I-Adapter file .first key: 'x.weight'"):
    sdjax.load_adapter(str(tmp_path / "other.safetensors"))
  state = {"conv_in.weight": np.zeros((8, 12, 3, 3), np.float32),
           "body.0.block1.weight": np.zeros((8, 8, 3, 3), np.float32)}
  weights.write_safetensors(str(tmp_path / "odd.safetensors"), state)
  with pytest.raises(sdjax.PipelineError, match="a T2I-Adapter of 1 resnets is not 4 levels"):
    sdjax.load_controlnet(str(tmp_path / "odd.safetensors"))


def test_sdxl_generate_matches_diffusers(tmp_path):
  """An SDXL adapter (full_adapter_xl: its fourth feature map onto the mid block) against
  StableDiffusionXLAdapterPipeline's latents, non-square, acting in the first 60% of the steps
  (diffusers' adapter_conditioning_factor is control_guidance_end)."""
  import sdjax  # noqa: PLC0415

  folder = str(tmp_path / "sdxl")
  base, _ = testing.write_torch_sdxl(folder, seed=17)
  pipe = sdjax.load_pipeline(folder + "/base")
  adapter = torch_adapter("sdxl", 19)
  adapter.save_pretrained(str(tmp_path / "adapter"), safe_serialization=True)
  ref = diffusers.StableDiffusionXLAdapterPipeline(
      vae=base.vae, text_encoder=base.text_encoder, text_encoder_2=base.text_encoder_2,
      tokenizer=base.tokenizer, tokenizer_2=base.tokenizer_2, unet=base.unet, adapter=adapter,
      scheduler=diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler_config))
  ref.set_progress_bar_config(disable=True)
  control = np.random.default_rng(3).uniform(size=(2, 16, 24, 3)).astype(np.float32)
  latents = randn(2, 8, 12, 4, seed=6)
  with torch.no_grad():
    denoised = ref(PROMPTS, image=nchw(control), latents=nchw(latents), output_type="latent",
                   num_inference_steps=5, guidance_scale=3.0, height=16, width=24,
                   adapter_conditioning_scale=1.3, adapter_conditioning_factor=0.6).images
    # Decoded as StableDiffusionXLPipeline decodes: that pipeline leaves out the VAE's latent
    # statistics (SDXL's own VAE has none, the tiny one here does).
    vae = base.vae.config
    stats = [torch.tensor(v).view(1, -1, 1, 1) for v in (vae.latents_mean, vae.latents_std)]
    decoded = base.vae.decode(denoised * stats[1] / vae.scaling_factor + stats[0]).sample
    expected = nhwc((decoded / 2 + 0.5).clamp(0, 1))
  ours = pipe.generate(PROMPTS, steps=5, guidance_scale=3.0, height=16, width=24,
                       scheduler="euler", latents=latents,
                       controlnet=sdjax.load_adapter(str(tmp_path / "adapter")),
                       control_images=control, controlnet_conditioning_scale=1.3,
                       control_guidance_end=0.6)
  err = float(np.linalg.norm(ours - expected) / np.linalg.norm(expected))
  print(f"\nSDXL t2i-adapter generate: {err:.2e}")
  assert err <= 1e-4


def test_run_with_adapter_and_controlnet(sd1_adapter, tmp_path):
  """main.py's --controlnet takes T2I-Adapter folders (as A1111's ControlNet extension does),
  beside a ControlNet: a one-channel adapter reads its control image as grey levels; each image
  is generate()'s. A guess-mode run with an adapter is a one-line error."""
  import dataclasses  # noqa: PLC0415
  import json  # noqa: PLC0415

  from PIL import Image  # noqa: PLC0415
  from test_controlnet import torch_controlnet  # noqa: PLC0415

  import sdjax  # noqa: PLC0415
  from sdjax import outputs, run  # noqa: PLC0415

  _, pipe, adapter, _ = sd1_adapter
  torch_adapter("sd1", 23, in_channels=1).save_pretrained(str(tmp_path / "sketch"),
                                                          safe_serialization=True)
  torch_controlnet(testing.UNET_SD1, 29, conditioning_embedding_out_channels=(8, 16)
                   ).save_pretrained(str(tmp_path / "cn"), safe_serialization=True)
  rng = np.random.default_rng(5)
  for name in ("edges.png", "sketch.png", "depth.png"):
    Image.fromarray(rng.integers(0, 255, (24, 32, 3), np.uint8)).save(tmp_path / name)
  nets = (adapter.name, str(tmp_path / "sketch"), str(tmp_path / "cn"))
  files = tuple(str(tmp_path / name) for name in ("edges.png", "sketch.png", "depth.png"))
  cfg = run.RunConfig(model=pipe.name, prompts=(run.PromptLine("a cat"),
                                                run.PromptLine("a dog")),
                      steps=3, guidance_scale=3.0, scheduler="euler", height=16, width=16,
                      seed=2, batch_size=2, controlnet=nets, control_image=files,
                      controlnet_scale=(0.9, 1.2, 0.7), output_dir=str(tmp_path / "out"),
                      compilation_cache="", show_progress=False)
  assert run.generate_run(cfg).images == 2
  loaded = [sdjax.load_controlnet(n) for n in nets]
  control = [outputs.read_image(files[0], (16, 16)),
             outputs.read_image(files[1], (16, 16), "L")[..., None],
             outputs.read_image(files[2], (16, 16))]
  for record in (json.loads(x) for x in open(tmp_path / "out" / outputs.MANIFEST_NAME)):
    assert record["controlnet"] == list(nets)
    expected = pipe.generate(record["prompt"], steps=3, guidance_scale=3.0, scheduler="euler",
                             height=16, width=16, seed=record["seed"], controlnet=loaded,
                             control_images=control, controlnet_conditioning_scale=[0.9, 1.2, 0.7])
    png = np.asarray(Image.open(tmp_path / "out" / record["file"]), np.float32)
    assert np.abs(png - expected[0] * 255).max() <= 1.0
  with pytest.raises(run.RunError, match="guess mode is a ControlNet's: not with a T2I-Adapter"):
    run.generate_run(dataclasses.replace(cfg, controlnet_guess_mode=True,
                                         output_dir=str(tmp_path / "guess")))


def original_layout(state: dict, light: bool, per: int) -> dict:
  """A diffusers-layout adapter state dict in TencentARC's original layout (as diffusers'
  `convert_original_t2i_adapter.py` reads it): the full adapter's resnets in one list, each
  level's in_conv on its first; the light adapter's nested."""
  import re  # noqa: PLC0415

  out = {}
  for key, value in state.items():
    key = key.removeprefix("adapter.")
    m = re.fullmatch(r"body\.(\d+)\.(?:resnets\.(\d+)\.)?(.*)", key)
    if m is not None:
      level, resnet, rest = int(m.group(1)), m.group(2), m.group(3)
      if light:
        key = f"body.{level}." + (rest if resnet is None else f"body.{resnet}.{rest}")
      else:
        key = f"body.{level * per + int(resnet or 0)}.{rest}"
    out[key] = value
  return out


@pytest.mark.parametrize("name,light", [("sd1", False), ("sd2-light", True), ("sdxl", False)])
def test_single_files_load_as_the_folder(name, light, tmp_path):
  """Adapter files as A1111 users have them: TencentARC's original layout (`.pth`, the full and
  light adapters) and one diffusers component in a file (the SDXL ones), through
  load_controlnet (main.py's --controlnet) and load_adapter, with the tiny adapters' config;
  each loads to exactly the folder's params."""
  from flax import traverse_util  # noqa: PLC0415

  import sdjax  # noqa: PLC0415
  from sdjax.checkpoints import weights  # noqa: PLC0415

  tm = torch_adapter(name, 5)
  folder = str(tmp_path / "folder")
  tm.save_pretrained(folder, safe_serialization=True)
  want = traverse_util.flatten_dict(sdjax.load_adapter(folder).params)
  state = {k: v.numpy() for k, v in tm.state_dict().items()}
  files = [str(tmp_path / "diffusers_layout.safetensors")]
  weights.write_safetensors(files[0], state)
  if name != "sdxl":  # TencentARC's own files are SD1's
    files.append(str(tmp_path / f"t2iadapter_{name}.pth"))
    torch.save({k: torch.from_numpy(v) for k, v in original_layout(
        state, light, tm.config.num_res_blocks).items()}, files[1])
  for path in files:
    for load in (sdjax.load_controlnet, sdjax.load_adapter):
      adapter = load(path, config=folder)
      assert isinstance(adapter, sdjax.Adapter)
      got = traverse_util.flatten_dict(adapter.params)
      assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize("kwargs,layout", [
    (dict(in_channels=1, adapter_type="full_adapter"), "original"),  # canny / sketch sd15v2
    (dict(in_channels=3, adapter_type="full_adapter"), "diffusers"),  # depth, as diffusers'
    (dict(channels=[320, 640, 1280], num_res_blocks=4, adapter_type="light_adapter"),
     "original_light"),  # color
    (dict(in_channels=3, adapter_type="full_adapter_xl", downscale_factor=16), "diffusers"),
    (dict(in_channels=1, adapter_type="full_adapter_xl", downscale_factor=16), "original"),
])
def test_real_files_get_their_config(kwargs, layout):
  """Without config=, a real-size file's config is read from its weights' shapes: each gives
  diffusers' config of the model that made it (shapes from torch's meta device: no memory)."""
  from sdjax.checkpoints import single_file  # noqa: PLC0415

  with torch.device("meta"):
    tm = diffusers.T2IAdapter(**kwargs)
  state = {k: np.broadcast_to(np.float32(0), tuple(v.shape)) for k, v in tm.state_dict().items()}
  if layout != "diffusers":
    state = original_layout(state, layout == "original_light", tm.config.num_res_blocks)
  assert single_file.adapter_layout(state) == layout
  raw = single_file.adapter_config(state, layout, "file")
  for key in ("in_channels", "channels", "num_res_blocks", "downscale_factor", "adapter_type"):
    assert raw[key] == (list(tm.config[key]) if key == "channels" else tm.config[key]), key
