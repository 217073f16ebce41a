"""ControlNet union (ControlNet++, diffusers' `ControlNetUnionModel`) against diffusers: the
network, generate() against `StableDiffusionXLControlNetUnionPipeline` (one control type, two
in one model, two unions), loading (folder, single file), main.py's --control_type.

diffusers' union runs its fusing transformer's `MultiheadAttention` on [B, L, C] tokens without
`batch_first`, so there tokens attend across the batch; sdjax attends within each image (as
ComfyUI and Forge do), so the reference here is diffusers with `batch_first` set on those
layers: the same weights and arithmetic, attention over each image's own tokens."""

import dataclasses
import inspect

import diffusers
import numpy as np
import pytest
import torch
from diffusers.models.controlnets.multicontrolnet_union import MultiControlNetUnionModel
from parity import assert_close, nchw, nhwc, one_image_run, randn, transfer

from sdjax import testing
from sdjax.models.controlnet import ControlNetUnionConfig, ControlNetUnionModel

torch.set_num_threads(1)

TYPES = 8  # as xinsir's promax model


def torch_union(seed: int, per_image: bool = True, **kwargs):
  """A random diffusers ControlNet union for the tiny SDXL UNet (its zero convolutions and the
  fusing projection perturbed too, so that every part acts); `per_image`: its attention over
  each image's tokens (see the module docstring)."""
  names = inspect.signature(diffusers.ControlNetUnionModel.__init__).parameters
  torch.manual_seed(seed)
  options = {"num_trans_channel": 16, "num_trans_head": 2, "num_proj_channel": 16,
             "num_trans_layer": 1, "conditioning_embedding_out_channels": (8, 16),
             "num_control_type": TYPES, **kwargs}
  model = diffusers.ControlNetUnionModel(
      **{k: v for k, v in testing.UNET_SDXL.items() if k in names}, **options).eval()
  testing.perturb_(model, seed + 1)
  gen = torch.Generator().manual_seed(seed + 2)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.startswith(("controlnet_down_blocks", "controlnet_mid_block", "spatial_ch_projs",
                          "controlnet_cond_embedding.conv_out")) and name.endswith("weight"):
        p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
  for layer in model.transformer_layes:
    layer.attn.batch_first = per_image
  return model


def test_union_matches_diffusers():
  """The network: one control type, two (features scaled, residuals not), two as one of
  several models (`from_multi`), three in guess mode; two fusing layers. diffusers' own
  attention across the batch gives other residuals (the difference is real)."""
  tm = torch_union(7, num_trans_layer=2, num_control_type=5)
  cfg = ControlNetUnionConfig.from_dict(dict(tm.config))
  assert (cfg.num_control_type, cfg.num_trans_layer, cfg.num_trans_head) == (5, 2, 2)
  x, ctx = randn(2, 8, 8, 4), randn(2, 77, 64, seed=1)
  t, scale = np.array([3.0, 801.0], np.float32), 0.7
  text_embeds = randn(2, 20, seed=3)
  time_ids = np.tile(np.float32([[64, 64, 0, 0, 64, 64]]), (2, 1))
  added = {"text_embeds": torch.from_numpy(text_embeds), "time_ids": torch.from_numpy(time_ids)}
  params, errs = None, []
  for types, multi, guess in [((3,), False, False), ((1, 4), False, False),
                              ((1, 4), True, False), ((0, 2, 4), False, True)]:
    fm = ControlNetUnionModel(cfg, control_types=types, from_multi=multi)
    conds = [np.random.default_rng(2 + j).uniform(size=(2, 16, 16, 3)).astype(np.float32)
             for j in range(len(types))]
    args = (x, t, ctx, np.concatenate(conds, -1), scale, text_embeds, time_ids)
    params = params or transfer(tm, fm, *args)
    down, mid = fm.apply({"params": params}, *args, None, None, guess)
    hot = torch.zeros(5)
    hot[list(types)] = 1
    with torch.no_grad():
      ref_down, ref_mid = tm(nchw(x), torch.from_numpy(t), torch.from_numpy(ctx),
                             [nchw(c) for c in conds], control_type=hot[None].repeat(2, 1),
                             control_type_idx=list(types), conditioning_scale=[scale] * len(types),
                             from_multi=multi, guess_mode=guess, added_cond_kwargs=added,
                             return_dict=False)
    errs += [assert_close(a, nhwc(b)) for a, b in zip([*down, mid], [*ref_down, ref_mid],
                                                       strict=True)]
    assert all(float(np.std(np.asarray(r))) > 1e-3 for r in [*down, mid])
  for layer in tm.transformer_layes:
    layer.attn.batch_first = False
  with torch.no_grad():
    across = tm(nchw(x), torch.from_numpy(t), torch.from_numpy(ctx), [nchw(conds[0])],
                control_type=torch.eye(5)[[0, 0]], control_type_idx=[0],
                conditioning_scale=[scale], added_cond_kwargs=added, return_dict=False)[1]
  fm = ControlNetUnionModel(cfg, control_types=(0,))
  _, ours = fm.apply({"params": params}, x, t, ctx, conds[0], scale, text_embeds, time_ids)
  assert np.abs(np.asarray(ours) - nhwc(across)).max() > 1e-3
  print(f"\ncontrolnet union: worst residual {max(errs):.2e}")


@pytest.fixture(scope="module")
def sdxl_union(tmp_path_factory):
  """(diffusers' tiny SDXL base, sdjax's, two union folders with their torch models)."""
  import sdjax  # noqa: PLC0415

  tmp_path = tmp_path_factory.mktemp("union")
  base, _ = testing.write_torch_sdxl(str(tmp_path / "sdxl"), seed=17)
  pipe = sdjax.load_pipeline(str(tmp_path / "sdxl" / "base"))
  unions = []
  for seed in (19, 23):
    model = torch_union(seed)
    model.save_pretrained(str(tmp_path / f"union{seed}"), safe_serialization=True)
    unions.append((str(tmp_path / f"union{seed}"), model))
  return base, pipe, unions


def _reference(base, pipe, controlnet):
  ref = diffusers.StableDiffusionXLControlNetUnionPipeline(
      vae=base.vae, text_encoder=base.text_encoder, text_encoder_2=base.text_encoder_2,
      tokenizer=base.tokenizer, tokenizer_2=base.tokenizer_2, unet=base.unet,
      controlnet=controlnet, scheduler=diffusers.EulerDiscreteScheduler.from_config(
          pipe.scheduler_config), add_watermarker=False)
  ref.set_progress_bar_config(disable=True)
  return ref


PROMPTS = ["a red circle in the center", "a photo of a cat"]


def test_generate_matches_diffusers(sdxl_union):
  """generate() against StableDiffusionXLControlNetUnionPipeline (non-square, guidance): one
  control type by name; two types in one union (their images a list) acting in part of the
  steps (after it, diffusers' union still adds residuals: its scale only weighs the images);
  two unions (diffusers' MultiControlNetUnionModel), a scale each; the last's second image
  alone is the same."""
  import sdjax  # noqa: PLC0415

  base, pipe, ((first, tm1), (second, tm2)) = sdxl_union
  rng = np.random.default_rng(3)
  a, b, c = (rng.uniform(size=(2, 16, 24, 3)).astype(np.float32) for _ in range(3))
  latents = randn(2, 8, 12, 4, seed=6)
  common = {"steps": 3, "guidance_scale": 3.0, "height": 16, "width": 24, "scheduler": "euler",
            "latents": latents}
  ref_common = {"num_inference_steps": 3, "guidance_scale": 3.0, "height": 16, "width": 24,
                "latents": nchw(latents), "output_type": "np"}
  cases = [
      ("canny", tm1, {"control_image": [nchw(a)], "control_mode": [3],
                      "controlnet_conditioning_scale": 0.7},
       {"controlnet": sdjax.load_controlnet(first, control_type="canny"), "control_images": a,
        "controlnet_conditioning_scale": 0.7}),
      ("depth+tile", tm1, {"control_image": [nchw(a), nchw(b)], "control_mode": [1, 6],
                           "controlnet_conditioning_scale": 0.6, "control_guidance_end": 0.6},
       {"controlnet": sdjax.load_controlnet(first, control_type=["depth", 6]),
        "control_images": [a, b], "controlnet_conditioning_scale": 0.6,
        "control_guidance_end": 0.6}),
      ("two unions", MultiControlNetUnionModel([tm1, tm2]),
       {"control_image": [nchw(a), nchw(c)], "control_mode": [0, 5],
        "controlnet_conditioning_scale": [0.8, 0.5]},
       {"controlnet": [sdjax.load_controlnet(first, control_type="openpose"),
                       sdjax.load_controlnet(second).with_control_type("segment")],
        "control_images": [a, c], "controlnet_conditioning_scale": [0.8, 0.5]}),
  ]
  outs = []
  for name, reference, ref_kwargs, kwargs in cases:
    with torch.no_grad():
      expected = _reference(base, pipe, reference)(PROMPTS, **ref_common, **ref_kwargs).images
    ours = pipe.generate(PROMPTS, **common, **kwargs)
    err = float(np.linalg.norm(ours - expected) / np.linalg.norm(expected))
    print(f"\ncontrolnet union generate, {name}: {err:.2e}")
    assert err <= 1e-4
    outs.append(ours)
  # the controls matter (ignored, every case would give the same uncontrolled images)
  for i in range(len(outs)):
    for j in range(i):
      assert np.abs(outs[i] - outs[j]).max() > 1e-2
  # An image does not depend on its batch-mates (diffusers' attention across the batch would).
  alone = pipe.generate(PROMPTS[1:], **{**common, "latents": latents[1:]},
                        **{**kwargs, "control_images": [a[1:], c[1:]]})
  assert np.abs(alone[0] - ours[1]).max() <= 1e-5


def test_img2img_matches_diffusers(sdxl_union):
  """img2img steered by a union: StableDiffusionXLControlNetUnionImg2ImgPipeline given our
  draws (the init images' posterior sample, the noise)."""
  from parity import img2img_draws  # noqa: PLC0415

  import sdjax  # noqa: PLC0415

  base, pipe, ((first, tm1), _) = sdxl_union
  ref = diffusers.StableDiffusionXLControlNetUnionImg2ImgPipeline(
      vae=base.vae, text_encoder=base.text_encoder, text_encoder_2=base.text_encoder_2,
      tokenizer=base.tokenizer, tokenizer_2=base.tokenizer_2, unet=base.unet, controlnet=tm1,
      scheduler=diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler_config),
      add_watermarker=False)
  ref.set_progress_bar_config(disable=True)
  rng = np.random.default_rng(8)
  images, control = (rng.uniform(size=(2, 16, 24, 3)).astype(np.float32) for _ in range(2))
  noise, seed = randn(2, 8, 12, 4, seed=12), 3
  with img2img_draws("diffusers.pipelines.controlnet.pipeline_controlnet_union_sd_xl_img2img",
                     seed, (8, 12, 4), noise), torch.no_grad():
    expected = ref(PROMPTS, image=images, control_image=[nchw(control)], control_mode=[1],
                   strength=0.6, num_inference_steps=6, guidance_scale=3.0, height=16,
                   width=24, output_type="np", controlnet_conditioning_scale=0.8).images
  ours = pipe.generate(PROMPTS, init_images=images, strength=0.6, steps=6, guidance_scale=3.0,
                       scheduler="euler", seed=seed, latents=noise,
                       controlnet=sdjax.load_controlnet(first, control_type="depth"),
                       control_images=control, controlnet_conditioning_scale=0.8)
  err = float(np.linalg.norm(ours - expected) / np.linalg.norm(expected))
  print(f"\ncontrolnet union img2img: {err:.2e}")
  assert err <= 1e-4


def test_loading_and_bad_arguments(sdxl_union, tmp_path):
  """A single file in diffusers' layout (xinsir's promax file is one): without a config, the
  union's options read from its weights (its heads xinsir's 8: the weights do not show them);
  with `config=`, the same weights as the folder's. Missing or wrong control types, and a
  union's images not one per type, are one-line errors."""
  from flax import traverse_util  # noqa: PLC0415

  import sdjax  # noqa: PLC0415
  from sdjax.checkpoints import single_file, weights  # noqa: PLC0415

  _, pipe, ((first, tm1), _) = sdxl_union
  folder = sdjax.load_controlnet(first)
  assert folder.is_union and folder.control_types == ()
  file = str(tmp_path / "diffusion_pytorch_model_promax.safetensors")
  weights.write_safetensors(file, {k: v.numpy() for k, v in tm1.state_dict().items()})
  state = {k: v.numpy() for k, v in tm1.state_dict().items()}
  raw = single_file.controlnet_config(state, single_file.controlnet_prefix(state, file), file)
  # Without a config: the standard SDXL widths (this tiny one has others) and the union's own
  # options from its weights.
  assert {k: raw[k] for k in ("_class_name", "num_control_type", "num_trans_channel",
                              "num_trans_layer", "num_trans_head", "num_proj_channel",
                              "conditioning_embedding_out_channels")} == {
      "_class_name": "ControlNetUnionModel", "num_control_type": TYPES, "num_trans_channel": 16,
      "num_trans_layer": 1, "num_trans_head": 8, "num_proj_channel": 16,
      "conditioning_embedding_out_channels": [8, 16]}
  single = sdjax.load_controlnet(file, config=first, control_type="repaint")
  assert single.control_types == (7,) and single.config == folder.config
  ours = traverse_util.flatten_dict(single.params)
  theirs = traverse_util.flatten_dict(folder.params)
  assert ours.keys() == theirs.keys()
  assert all(np.array_equal(ours[k], theirs[k]) for k in ours)
  control = np.zeros((16, 24, 3), np.float32)
  with pytest.raises(ValueError, match="is a ControlNet union: give its control type"):
    pipe.generate("a cat", steps=2, height=16, width=24, controlnet=folder,
                  control_images=control)
  with pytest.raises(sdjax.PipelineError, match="unknown ControlNet union control type 'pose'"):
    sdjax.load_controlnet(first, control_type="pose")
  with pytest.raises(ValueError, match="control type 9 is 9: this model has types 0 to 7"):
    folder.with_control_type(9)
  with pytest.raises(ValueError, match="is a list of 2 images for this ControlNet union"):
    pipe.generate("a cat", steps=2, height=16, width=24,
                  controlnet=folder.with_control_type("depth", "canny"), control_images=control)
  plain_folder = str(tmp_path / "plain")
  diffusers.ControlNetModel.from_unet(testing.torch_unet(testing.UNET_SDXL, seed=3),
                                      conditioning_embedding_out_channels=(8, 16)
                                      ).save_pretrained(plain_folder, safe_serialization=True)
  with pytest.raises(sdjax.PipelineError, match="control_type is for a ControlNet union"):
    sdjax.load_controlnet(plain_folder, control_type="canny")


def test_run_with_control_type(sdxl_union, tmp_path):
  """main.py: --controlnet union --control_type canny makes generate()'s image; the record and
  the PNG name the type; a union without --control_type is a one-line error."""
  from PIL import Image  # noqa: PLC0415

  from sdjax import outputs, run  # noqa: PLC0415

  _, pipe, ((first, _), _) = sdxl_union
  import sdjax  # noqa: PLC0415

  rng = np.random.default_rng(5)
  Image.fromarray(rng.integers(0, 255, (16, 24, 3), np.uint8)).save(tmp_path / "edges.png")
  cfg, record, png, kw = one_image_run(
      pipe, tmp_path / "out", width=24, controlnet=(first,), control_type=("canny",),
      control_image=(str(tmp_path / "edges.png"),), controlnet_scale=(0.8,))
  assert record["controlnet"] == first and record["control_type"] == "canny"
  expected = pipe.generate("a cat", controlnet=sdjax.load_controlnet(first, control_type=3),
                           control_images=outputs.read_image(str(tmp_path / "edges.png"),
                                                             (16, 24)),
                           controlnet_conditioning_scale=0.8, **kw)
  assert np.abs(np.asarray(png, np.float32) - expected[0] * 255).max() <= 1.0
  params = outputs.parse_a1111_parameters(png.text["parameters"])
  assert params["ControlNet 0"].endswith("Guidance End: 1, Union Control Type: canny")
  with pytest.raises(run.RunError, match="--controlnet: ControlNet .* is a ControlNet union: "
                                         "give its control type"):
    run.generate_run(dataclasses.replace(cfg, control_type=(),
                                         output_dir=str(tmp_path / "none")))
