"""A1111's NGMS and Skip Early CFG (`sampling.CfgSkip`): guidance leaves the negative prompt out of
some UNet calls. Checked against diffusers' UNet and schedulers in a loop guided as A1111 1.10's
CFGDenoiser.forward guides (its skip rule restated here from its source)."""

import dataclasses
import json

import diffusers
import numpy as np
import pytest
import torch
from parity import assert_close, nchw, nhwc, one_image_run, reference_pipelines, rel_err

from sdjax import outputs, run, sampling

GUIDANCE = 3.0


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
  torch.set_num_threads(1)
  ref, pipe, _ = reference_pipelines(tmp_path_factory, "sd1", seed=5)
  return ref, pipe


def a1111_skips(levels, total, s_min_uncond=0.0, s_min_uncond_all=False, skip_early_cond=0.0):
  """A1111's rule per denoiser call k (its `self.step`): Skip Early CFG where k / total <=
  skip_early_cond (0: off), else NGMS at odd k (any k with s_min_uncond_all) whose sigma (a
  float32 tensor; the timestep for DDIM) is below s_min_uncond."""
  return [bool((skip_early_cond != 0 and k / total <= skip_early_cond)
               or ((k % 2 or s_min_uncond_all) and s_min_uncond > 0
                   and np.float32(level) < np.float32(s_min_uncond)))
          for k, level in enumerate(levels)]


def _scheduler(ref, name, steps):
  sched = getattr(diffusers, name).from_config(ref.scheduler.config)
  sched.set_timesteps(steps)
  calls = len(sched.timesteps)
  levels = sched.timesteps if name == "DDIMScheduler" else sched.sigmas[:calls]
  return sched, np.asarray(levels, np.float32)


def _encode(ref, text):
  ids = ref.tokenizer(text, padding="max_length", max_length=77, return_tensors="pt").input_ids
  with torch.no_grad():
    return ref.text_encoder(ids)[0]


def _loop(ref, sched, latents, parts, weights, uncond, skips):
  """diffusers' UNet and scheduler, guided as A1111: uncond + sum (part - uncond) * (w * scale);
  at a skipped call no uncond row is made, the first part stands in for it and the scale is 1."""
  x = nchw(latents) * sched.init_noise_sigma
  with torch.no_grad():
    for call, t in enumerate(sched.timesteps):
      x_in = sched.scale_model_input(x, t)
      outs = [ref.unet(x_in, t, encoder_hidden_states=c).sample for c in parts]
      if skips[call]:
        u, scale = outs[0], 1.0
      else:
        u, scale = ref.unet(x_in, t, encoder_hidden_states=uncond).sample, GUIDANCE
      eps = u.clone()
      for out, w in zip(outs, weights, strict=True):
        eps += (out - u) * (w * scale)
      x = sched.step(eps, t, x).prev_sample
    images = ref.vae.decode(x / ref.vae.config.scaling_factor).sample
  return nhwc((images / 2 + 0.5).clamp(0, 1))


@pytest.mark.parametrize("name,scheduler,steps,options", [
    ("EulerDiscreteScheduler", "euler", 4, dict(s_min_uncond=2.0)),
    # second order: A1111 counts 2 calls a step, 6 for 3 steps (5 made)
    ("HeunDiscreteScheduler", "heun", 3, dict(skip_early_cond=0.4)),
    # a timestep sampler: NGMS compares the timestep
    ("DDIMScheduler", "ddim", 4, dict(s_min_uncond=600.0, s_min_uncond_all=True)),
    ("EulerDiscreteScheduler", "euler", 5, dict(s_min_uncond=3.0, skip_early_cond=0.2)),
])
def test_skips_match_a1111_denoiser(sd, name, scheduler, steps, options):
  ref, pipe = sd
  sched, levels = _scheduler(ref, name, steps)
  order = 2 if scheduler == "heun" else 1
  skips = a1111_skips(levels, steps * order, **options)
  assert any(skips) and not all(skips), skips  # the case tests both kinds of call
  latents = np.random.default_rng(3).standard_normal((1, 8, 8, 4)).astype(np.float32)
  kw = dict(steps=steps, scheduler=scheduler, guidance_scale=GUIDANCE, height=16, width=16,
            negative_prompts="blue", latents=latents)
  ours = pipe.generate("a red circle", **options, **kw)
  cond, uncond = _encode(ref, "a red circle"), _encode(ref, "blue")
  expected = _loop(ref, sched, latents, [cond], [1.0], uncond, skips)
  err = assert_close(ours, expected, 1e-4)
  unskipped = _loop(ref, _scheduler(ref, name, steps)[0], latents, [cond], [1.0], uncond,
                    [False] * len(skips))
  print(f"\n{scheduler} {options}: skips {skips}, rel err {err:.2e} (all guided: "
        f"{rel_err(unskipped, expected):.2e})")
  assert rel_err(unskipped, expected) > 100 * err
  np.testing.assert_allclose(pipe.generate("a red circle", **kw), unskipped, atol=1e-4)


def test_composable_prompt_skips_with_its_first_part(sd):
  """AND with NGMS: at a skipped call each image's first part is A1111's `fake_uncond`."""
  ref, pipe = sd
  sched, levels = _scheduler(ref, "EulerDiscreteScheduler", 4)
  skips = a1111_skips(levels, 4, s_min_uncond=1.0, s_min_uncond_all=True)
  assert any(skips) and not all(skips), skips
  latents = np.random.default_rng(4).standard_normal((1, 8, 8, 4)).astype(np.float32)
  ours = pipe.generate("a red circle AND a green square :0.6", s_min_uncond=1.0,
                       s_min_uncond_all=True, steps=4, scheduler="euler",
                       guidance_scale=GUIDANCE, height=16, width=16, latents=latents,
                       prompt_syntax="a1111")
  parts = [_encode(ref, "a red circle"), _encode(ref, " a green square")]
  expected = _loop(ref, sched, latents, parts, [1.0, 0.6], _encode(ref, ""), skips)
  err = assert_close(ours, expected, 1e-4)
  other = _loop(ref, _scheduler(ref, "EulerDiscreteScheduler", 4)[0], latents, parts[::-1],
                [0.6, 1.0], _encode(ref, ""), skips)  # the other part standing in
  print(f"\ncomposable with NGMS rel err {err:.2e} (other stand-in {rel_err(other, expected):.2e})")
  assert rel_err(other, expected) > 100 * err


def test_cfg_parallel_skips_alike(sd):
  """The guidance pair split in two calls (--cfg_parallel; here both on one device) keeps the
  prompt's prediction at a skipped call: the image of the batched program."""
  _, pipe = sd
  kw = dict(steps=4, scheduler="euler", guidance_scale=GUIDANCE, height=16, width=16, seed=2,
            s_min_uncond=2.0)
  np.testing.assert_allclose(pipe.generate("a red circle", cfg_parallel=True, **kw),
                             pipe.generate("a red circle", **kw), atol=1e-5)


def _spec(pipe, steps, **kw):
  return sampling.prepare(pipe, 1, steps=steps, scheduler="euler", height=16, width=16,
                          guidance_scale=GUIDANCE, **kw)


def test_counts_run_on_through_a_refiner_and_restart_in_a_hires_pass(sd):
  """A base stopped at refiner_start and its refiner skip where one whole run skips (A1111's
  counter runs on through the refiner's calls); an img2img or hires pass counts its own steps."""
  _, pipe = sd
  skip = sampling.CfgSkip(s_min_uncond=3.0, skip_early_cond=0.3)
  whole = sampling.with_cfg_skip(*_spec(pipe, 10), skip, 10).uncond_skips
  base = sampling.with_cfg_skip(*_spec(pipe, 10, denoising_end=0.6), skip, 10).uncond_skips
  refiner = sampling.with_cfg_skip(*_spec(pipe, 10, denoising_start=0.6), skip, 10)
  assert base + refiner.uncond_skips == whole and len(base) == 6 and refiner.begin == 6
  spec, state = _spec(pipe, 10, img2img=True, strength=0.5)
  levels = spec.scheduler.a1111_levels(state)[spec.begin:]
  assert sampling.with_cfg_skip(spec, state, skip, 10).uncond_skips == tuple(
      a1111_skips(levels, 5, 3.0, False, 0.3))  # 5 steps run: 0, 1 early (1/5 <= 0.3)
  hires, hires_state = sampling.prepare_hires(
      pipe, 1, sampling.Hires(2.0, 4, 0.5, "latent"), steps=10, scheduler="euler", height=16,
      width=16, guidance_scale=GUIDANCE)
  levels = hires.scheduler.a1111_levels(hires_state)[hires.begin:]
  assert len(levels) == 4 and sampling.with_cfg_skip(
      hires, hires_state, skip, 4).uncond_skips == tuple(a1111_skips(levels, 4, 3.0, False, 0.3))
  # Off, or never met: the program of plain guidance.
  assert sampling.with_cfg_skip(*_spec(pipe, 10), sampling.CfgSkip(), 10).uncond_skips is None
  assert sampling.with_cfg_skip(*_spec(pipe, 10), sampling.CfgSkip(1e-6), 10).uncond_skips is None


@pytest.mark.parametrize("kwargs,match", [
    (dict(s_min_uncond=-1.0), "s_min_uncond .* >= 0"),
    (dict(skip_early_cond=1.5), r"skip_early_cond must be in \[0, 1\]"),
    (dict(s_min_uncond=5.0, pag_scale=2.0), "perturbed-attention guidance"),
    (dict(pad_cond_uncond=True), "prompt_syntax='a1111'"),
])
def test_bad_arguments(sd, kwargs, match):
  with pytest.raises(ValueError, match=match):
    sd[1].generate("a cat", steps=2, height=16, width=16, **kwargs)


def test_run_with_ngms(sd, tmp_path):
  """main.py --s_min_uncond / --skip_early_cond: generate()'s image; run.json, the manifest and
  the PNG (A1111's NGMS, Skip Early CFG fields) name them; the PNG's text gives the flags back."""
  from sdjax import infotext  # noqa: PLC0415

  _, pipe = sd
  options = dict(s_min_uncond=2.0, s_min_uncond_all=True, skip_early_cond=0.25)
  cfg, record, png, kw = one_image_run(pipe, tmp_path / "out", steps=4, **options)
  expected = pipe.generate("a cat", **options, **kw)
  assert np.abs(np.asarray(png, np.float32) - expected[0] * 255).max() <= 1.0
  params = outputs.parse_a1111_parameters(png.text["parameters"])
  assert (params["NGMS"], params["NGMS all steps"], params["Skip Early CFG"]) == (
      "2.0", "True", "0.25")
  assert {k: record[k] for k in options} == options
  assert {k: json.load(open(tmp_path / "out" / "run.json"))[k] for k in options} == options
  flags = infotext.reproduce(png.text["parameters"]).flags
  assert (flags["s_min_uncond"], flags["s_min_uncond_all"], flags["skip_early_cond"]) == (
      "2.0", "true", "0.25")
  with pytest.raises(run.RunError, match="--skip_early_cond must be in"):
    run.generate_run(dataclasses.replace(cfg, skip_early_cond=2.0,
                                         output_dir=str(tmp_path / "bad")))


def test_run_with_pad_conds(sd, tmp_path):
  """main.py --pad_cond_uncond: generate()'s image, A1111's `Pad conds` field (read back as the
  flag); without --prompt_syntax a1111 it is a one-line error."""
  from sdjax import infotext  # noqa: PLC0415

  _, pipe = sd
  cfg, record, png, kw = one_image_run(pipe, tmp_path / "out", prompt_syntax="a1111",
                                       negative_prompt="blue BREAK green",
                                       pad_cond_uncond_v0=True,
                                       old_prompt_editing_timelines=True)
  expected = pipe.generate("a cat", negative_prompts="blue BREAK green", prompt_syntax="a1111",
                           pad_cond_uncond_v0=True, **kw)
  assert np.abs(np.asarray(png, np.float32) - expected[0] * 255).max() <= 1.0
  assert record["pad_cond_uncond_v0"] is True
  assert outputs.parse_a1111_parameters(png.text["parameters"])["Pad conds v0"] == "True"
  assert infotext.reproduce(png.text["parameters"]).flags["pad_cond_uncond_v0"] == "true"
  # and A1111's Old prompt editing timelines, a setting of the same kind
  assert record["old_prompt_editing_timelines"] is True
  assert infotext.reproduce(png.text["parameters"]).flags["old_prompt_editing_timelines"] == (
      "true")
  with pytest.raises(run.RunError, match="--pad_cond_uncond pads A1111-syntax prompts"):
    run.generate_run(dataclasses.replace(cfg, prompt_syntax="plain",
                                         output_dir=str(tmp_path / "bad")))
  with pytest.raises(run.RunError, match="--old_prompt_editing_timelines counts A1111 prompt"):
    run.generate_run(dataclasses.replace(cfg, prompt_syntax="plain", pad_cond_uncond_v0=False,
                                         output_dir=str(tmp_path / "bad")))
