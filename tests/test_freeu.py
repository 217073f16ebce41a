"""FreeU against diffusers' `enable_freeu`: the Fourier filter, the UNet (SD1 and SDXL layouts,
sizes that are not powers of two), generate() against StableDiffusionPipeline, main.py's
--freeu."""

import dataclasses
import json

import diffusers
import numpy as np
import pytest
import torch
from diffusers.utils.torch_utils import fourier_filter as torch_fourier_filter
from parity import assert_close, nchw, nhwc, one_image_run, randn, transfer

from sdjax import testing
from sdjax.models.unet import UNet2DConditionModel, UNetConfig, fourier_filter

torch.set_num_threads(1)

SD15 = (0.9, 0.2, 1.5, 1.6)  # FreeU's authors' SD1.5 values (s1, s2, b1, b2)


@pytest.mark.parametrize("shape", [(2, 8, 8, 3), (1, 5, 6, 4), (1, 3, 7, 2), (1, 1, 2, 2)])
def test_fourier_filter_matches_diffusers(shape):
  x = randn(*shape, seed=sum(shape))
  ours = fourier_filter(x, 1, 0.3)
  ref = nhwc(torch_fourier_filter(nchw(x), threshold=1, scale=0.3))
  assert_close(ours, ref)
  assert np.abs(np.asarray(ours) - x).max() > 1e-3  # the filter changed something


def _unet_inputs(name, config, height, width):
  """A CFG pair's latents, timesteps, context and (SDXL) added conditions, for both UNets."""
  x, ctx = randn(2, height, width, 4), randn(2, 77, config["cross_attention_dim"], seed=1)
  t = np.array([3.0, 801.0], np.float32)
  if name != "sdxl":
    return x, t, ctx, (), {}
  text_embeds = randn(2, 20, seed=3)
  time_ids = np.tile(np.float32([[64, 96, 0, 0, 64, 96]]), (2, 1))
  return x, t, ctx, (text_embeds, time_ids), {"added_cond_kwargs": {
      "text_embeds": torch.from_numpy(text_embeds), "time_ids": torch.from_numpy(time_ids)}}


@pytest.mark.parametrize("name", ["sd1", "sdxl"])
def test_unet_matches_diffusers(name):
  """The UNet with FreeU on (the first two up blocks; SDXL's are attention blocks) against
  diffusers' after `enable_freeu`, at latents 8x12 (the skips' FFTs 8x12 and 4x6)."""
  config = {"sd1": testing.UNET_SD1, "sdxl": testing.UNET_SDXL}[name]
  tm = testing.torch_unet(config, seed=3)
  fm = UNet2DConditionModel(UNetConfig.from_dict(dict(tm.config)), freeu=SD15)
  x, t, ctx, extra, torch_extra = _unet_inputs(name, config, 8, 12)
  params = transfer(tm, fm, x, t, ctx, *extra)
  tm.enable_freeu(s1=SD15[0], s2=SD15[1], b1=SD15[2], b2=SD15[3])
  with torch.no_grad():
    ref = nhwc(tm(nchw(x), torch.from_numpy(t), torch.from_numpy(ctx), **torch_extra).sample)
  err = assert_close(fm.apply({"params": params}, x, t, ctx, *extra), ref)
  plain = fm.clone(freeu=None).apply({"params": params}, x, t, ctx, *extra)
  assert np.abs(np.asarray(plain) - ref).max() > 1e-2
  print(f"\nFreeU UNet {name}: {err:.2e}")


def _comfyui_freeu(model_channels, s1, s2, b1, b2, v2):
  """ComfyUI's FreeU (v2: FreeU_V2) node's output block patch, as comfy_extras/nodes_freelunch.py
  computes it (NCHW torch), in the form of diffusers' `apply_freeu`, which diffusers' up blocks
  call before each layer: by the backbone's channels, in every up block."""
  scales = {model_channels * 4: (b1, s1), model_channels * 2: (b2, s2)}

  def patch(resolution_idx, h, hsp, **unused):
    scale = scales.get(int(h.shape[1]))
    if scale is None:
      return h, hsp
    h = h.clone()
    if v2:
      hidden_mean = h.mean(1).unsqueeze(1)
      b = hidden_mean.shape[0]
      hidden_max, _ = torch.max(hidden_mean.view(b, -1), dim=-1, keepdim=True)
      hidden_min, _ = torch.min(hidden_mean.view(b, -1), dim=-1, keepdim=True)
      hidden_mean = (hidden_mean - hidden_min.unsqueeze(2).unsqueeze(3)) / (
          hidden_max - hidden_min).unsqueeze(2).unsqueeze(3)
      h[:, :h.shape[1] // 2] = h[:, :h.shape[1] // 2] * ((scale[0] - 1) * hidden_mean + 1)
    else:
      h[:, :h.shape[1] // 2] = h[:, :h.shape[1] // 2] * scale[0]
    return h, torch_fourier_filter(hsp, threshold=1, scale=scale[1])

  return patch


@pytest.mark.parametrize(("name", "form"), [("sd1", "comfyui_v2"), ("sdxl", "comfyui")])
def test_unet_matches_comfyuis_nodes(name, form, monkeypatch):
  """`freeu_form` "comfyui" / "comfyui_v2": ComfyUI's FreeU / FreeU_V2 nodes, which patch every
  output block whose backbone input has 4 or 2 times the model's first channels (V2 scaling by
  the backbone's normalised channel mean), against diffusers' UNet with that patch in place of
  its own `apply_freeu`; not diffusers' FreeU (which patches the first two up blocks only).
  Channels in SD1.5's and SDXL's ratios (1, 2, 4, 4 and 1, 2, 4), so that both of the node's
  scales apply."""
  from diffusers.models.unets import unet_2d_blocks

  config = {"sd1": {**testing.UNET_SD1, "block_out_channels": [8, 16, 32, 32],
                    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3},
            "sdxl": {**testing.UNET_SDXL, "block_out_channels": [8, 16, 32]}}[name]
  tm = testing.torch_unet(config, seed=3)
  fm = UNet2DConditionModel(UNetConfig.from_dict(dict(tm.config)), freeu=SD15, freeu_form=form)
  x, t, ctx, extra, torch_extra = _unet_inputs(name, config, 16, 16)
  params = transfer(tm, fm, x, t, ctx, *extra)
  tm.enable_freeu(s1=SD15[0], s2=SD15[1], b1=SD15[2], b2=SD15[3])
  patch = _comfyui_freeu(tm.config.block_out_channels[0], *SD15, v2=form == "comfyui_v2")
  applied = []
  monkeypatch.setattr(unet_2d_blocks, "apply_freeu", lambda i, h, hsp, **kw: (
      applied.append(h.shape[1]), patch(i, h, hsp))[1])
  with torch.no_grad():
    ref = nhwc(tm(nchw(x), torch.from_numpy(t), torch.from_numpy(ctx), **torch_extra).sample)
  assert {32, 16} <= set(applied) and 8 in applied  # both scales, and a layer of neither
  err = assert_close(fm.apply({"params": params}, x, t, ctx, *extra), ref)
  diffusers_form = fm.clone(freeu_form="diffusers").apply({"params": params}, x, t, ctx, *extra)
  assert np.abs(np.asarray(diffusers_form) - ref).max() > 1e-2
  print(f"\nFreeU UNet {name} as ComfyUI's {form}: {err:.2e}")


def test_generate_matches_diffusers(sd1):
  """generate(freeu=) against StableDiffusionPipeline after `enable_freeu` (a dict or the
  four numbers in enable_freeu's order give the same images)."""
  base, pipe = sd1
  ref = diffusers.StableDiffusionPipeline(**{
      **base.components, "scheduler": diffusers.EulerDiscreteScheduler.from_config(
          pipe.scheduler_config)})
  ref.set_progress_bar_config(disable=True)
  latents = randn(2, 8, 8, 4, seed=6)
  prompts = ["a red circle in the center", "a photo of a cat"]
  ref.enable_freeu(s1=0.6, s2=0.4, b1=1.1, b2=1.2)
  try:
    with torch.no_grad():
      expected = ref(prompts, latents=nchw(latents), output_type="np", num_inference_steps=3,
                     guidance_scale=3.0, height=16, width=16).images
  finally:
    ref.disable_freeu()
  common = dict(steps=3, guidance_scale=3.0, height=16, width=16, scheduler="euler",
                latents=latents)
  ours = pipe.generate(prompts, freeu={"s1": 0.6, "s2": 0.4, "b1": 1.1, "b2": 1.2}, **common)
  err = float(np.linalg.norm(ours - expected) / np.linalg.norm(expected))
  print(f"\nFreeU generate: {err:.2e}")
  assert err <= 1e-4
  np.testing.assert_array_equal(pipe.generate(prompts, freeu=(0.6, 0.4, 1.1, 1.2), **common),
                                ours)
  assert np.abs(pipe.generate(prompts, **common) - ours).max() > 1e-2
  with pytest.raises(ValueError, match="freeu takes s1, s2, b1 and b2"):
    pipe.generate(prompts, freeu={"s1": 0.6}, **common)


def test_run_with_freeu(sd1, tmp_path):
  """main.py --freeu: the image is generate()'s; run.json and PNG parameters name it; a bad
  value is a one-line error. --freeu_form comfyui_v2 (ComfyUI's FreeU_V2 node): generate()'s
  image of that form, `FreeU form: ComfyUI FreeU_V2` in the PNG, read back."""
  from sdjax import infotext, outputs, run  # noqa: PLC0415

  _, pipe = sd1
  cfg, _, png, kw = one_image_run(pipe, tmp_path / "out", freeu=SD15)
  expected = pipe.generate("a cat", freeu=SD15, **kw)
  assert np.abs(np.asarray(png, np.float32) - expected[0] * 255).max() <= 1.0
  params = outputs.parse_a1111_parameters(png.text["parameters"])
  assert params["FreeU"] == "s1=0.9, s2=0.2, b1=1.5, b2=1.6"
  assert json.load(open(tmp_path / "out" / "run.json"))["freeu"] == list(SD15)
  assert "FreeU form" not in params and "freeu_form" not in json.load(
      open(tmp_path / "out" / "run.json"))
  diffusers_form = np.asarray(png, np.float32)
  cfg, _, png, kw = one_image_run(pipe, tmp_path / "v2", freeu=SD15, freeu_form="comfyui_v2")
  expected = pipe.generate("a cat", freeu=SD15, freeu_form="comfyui_v2", **kw)
  assert np.abs(np.asarray(png, np.float32) - expected[0] * 255).max() <= 1.0
  assert np.abs(np.asarray(png, np.float32) - diffusers_form).max() > 4
  params = outputs.parse_a1111_parameters(png.text["parameters"])
  assert params["FreeU form"] == "ComfyUI FreeU_V2"
  assert json.load(open(tmp_path / "v2" / "run.json"))["freeu_form"] == "comfyui_v2"
  flags = infotext.reproduce(png.text["parameters"]).flags
  assert flags["freeu"] == ["0.9", "0.2", "1.5", "1.6"] and flags["freeu_form"] == "comfyui_v2"
  with pytest.raises(run.RunError, match="--freeu: freeu takes four numbers"):
    run.generate_run(dataclasses.replace(cfg, freeu=(1.0, 2.0),
                                         output_dir=str(tmp_path / "bad")))
  with pytest.raises(run.RunError, match="^--freeu_form must be one of diffusers, comfyui, "):
    run.generate_run(dataclasses.replace(cfg, freeu_form="v2", output_dir=str(tmp_path / "b")))
  with pytest.raises(run.RunError, match="^--freeu_form is FreeU's: give --freeu too$"):
    run.generate_run(dataclasses.replace(cfg, freeu=None, output_dir=str(tmp_path / "b")))
