"""A1111 images' samplers as A1111 ran them: k-diffusion's loops over its noise levels.

`infotext.reproduce` sets an A1111 image's k-diffusion sampler to `timestep_spacing: linspace`
and its Automatic schedule type to Uniform (`k_diffusion_reference`: k-diffusion's get_sigmas and
Karras levels, its loops written out in torch). With those options sdjax's schedulers step as
k-diffusion's, from noise of the first level, on SD1.5's "leading" config, where diffusers' own
placement differs. DPM++ 2M (diffusers' DPM-Solver++ form) also takes sdjax's `k_diffusion`
option: without it, it starts from unit noise, sqrt(1 + 1 / sigma_max^2) more than k-diffusion's
start (0.23% for SD1.5), and its UNet sees integer timesteps; with those two, its steps are
k-diffusion's.
"""

from __future__ import annotations

import functools
import json
import math
import types
from unittest import mock

import jax
import jax.numpy as jnp
import k_diffusion_reference as kd
import numpy as np
import pytest
import scheduler_harness
import torch
from scheduler_harness import (
  SHAPE,
  correctly_rounded,
  correctly_rounded_math,
  correctly_rounded_sqrt,
  diffusers_trajectory,
  fake_model,
  make_noises,
  max_rel_error,
  sdjax_trajectory,
)

from sdjax import infotext, outputs, sampling, testing
from sdjax.schedulers import SCHEDULERS, SchedulerConfigError, get_scheduler, takes_option
from sdjax.schedulers.euler import train_alphas_cumprod, train_sigmas

torch.set_num_threads(1)
SD15 = dict(testing.SCHEDULER_SD15)
COMFY15 = {**SD15, "comfyui": True}  # the references' ComfyUI schedule (computed in float64)
TOL = 1e-6
SD1_UNET, SDXL_UNET = (types.SimpleNamespace(is_sdxl=sdxl) for sdxl in (False, True))
SAMPLERS = {"Euler": kd.sample_euler, "Euler a": kd.sample_euler_ancestral,
            "Heun": kd.sample_heun, "LMS": kd.sample_lms,
            "DPM++ 2S a": kd.sample_dpmpp_2s_ancestral, "DPM++ 2M": kd.sample_dpmpp_2m,
            "DPM2": kd.sample_dpm_2, "DPM2 a": kd.sample_dpm_2_ancestral,
            "DPM++ 2M SDE": kd.sample_dpmpp_2m_sde, "DPM++ 3M SDE": kd.sample_dpmpp_3m_sde,
            "iPNDM": kd.sample_ipndm, "iPNDM_v": kd.sample_ipndm_v,
            "Res Multistep": kd.sample_res_multistep,
            "Res Multistep a": lambda *a: kd.sample_res_multistep(*a, eta=1.0),
            "ER SDE": kd.sample_er_sde,
            "Gradient Estimation": kd.sample_gradient_estimation, "DEIS": kd.sample_deis,
            "SEEDS 2": kd.sample_seeds, "SEEDS 3": lambda *a: kd.sample_seeds(*a, stages=3),
            "HeunPP2": kd.sample_heunpp2, "dpm_fast": kd.sample_dpm_fast,
            "k_ddpm": kd.sample_ddpm, "sa_solver": kd.sample_sa_solver,
            "sa_solver_pece": lambda *a: kd.sample_sa_solver(*a, pece=True),
            "DPM fast": lambda *a: kd.sample_dpm_fast(*a, eta=1.0, extremes=True)}
# A1111's samplers that place the levels of one step more and drop the penultimate one.
DISCARDING = ("DPM2", "DPM2 a")


def _as_a1111_ran_it(sampler, label, steps, k_diffusion=True, extra="", config=SD15,
                     version="v1.10.1"):
  """sdjax's scheduler with the options `reproduce` reads from an A1111 image (less DPM-Solver's
  `k_diffusion`, when not `k_diffusion`; `extra`: more of its fields), its state and its
  trajectory on the fake model; the image's noise levels (k-diffusion's, of `config`) and
  noises."""
  typed = f", Schedule type: {label}" if label else ""
  flags = infotext.reproduce(f"a cat\nSteps: {steps}, Sampler: {sampler}{typed}, CFG scale: 7, "
                             f"Seed: 1, {extra}Version: {version}").flags
  options = {**json.loads(flags["scheduler_options"]),
             **outputs.schedule_type_options(flags["schedule_type"])}
  options = sampling.model_schedule(SD1_UNET, options)  # an older A1111's downcast, for SD1
  if not k_diffusion:
    options.pop("k_diffusion")
  ours = get_scheduler(outputs.scheduler_name(flags["scheduler"]), SD15, options=options)
  state = ours.set_timesteps(steps, sample_shape=SHAPE)
  init, noises = make_noises(len(state.timesteps))
  got = sdjax_trajectory(ours, steps, init, noises)
  # Automatic: A1111's Uniform (get_sigmas), or Karras where that is the sampler's own choice.
  kind = flags["schedule_type"].lower()
  placed = kd.get_sigmas if kind == "uniform" else kd.get_sigmas_karras
  if sampler in DISCARDING:
    sigmas = kd.discard_penultimate(placed(config, steps + 1))
  else:
    sigmas = placed(config, steps)
  return ours, state, got, sigmas, init, noises


def _brownian(plain):
  """`plain` stepping as a --brownian run does: each stage given its own noise, as the Brownian
  tree answers (`brownian_state`)."""

  class Brownian(type(plain)):  # noqa: D101
    def set_timesteps(self, n, sample_shape=None):
      return self.brownian_state(super().set_timesteps(n, sample_shape))

  return Brownian(config=plain.config)


@pytest.mark.parametrize("label", [None, "Automatic", "Karras"])
@pytest.mark.parametrize("sampler", ["Euler", "Euler a", "Heun", "LMS", "DPM++ 2S a",
                                     "DPM++ 2M", "DPM2", "DPM2 a", "DPM fast"])
def test_steps_as_k_diffusion(sampler, label):
  ours, state, got, sigmas, init, noises = _as_a1111_ran_it(sampler, label, 10)
  start = float(sigmas[0]) / (1 + float(sigmas[0]) ** 2) ** 0.5 if sampler == "DPM++ 2M" else (
      float(sigmas[0]))  # k-diffusion's first level, in the scheduler's own form
  np.testing.assert_allclose(float(ours.init_noise_sigma(state)), start, rtol=1e-6)
  with correctly_rounded_sqrt():
    want = SAMPLERS[sampler](SD15, sigmas, torch.from_numpy(init) * sigmas[0],
                             [torch.from_numpy(n) for n in noises])
  if sampler == "DPM++ 2M":  # diffusers' form: x / sqrt(sigma^2 + 1)
    want = want / np.sqrt(sigmas[1:].numpy().astype(np.float64) ** 2 + 1)[:, None, None, None,
                                                                           None]
    want = want.astype(np.float32)
  err = max_rel_error(got, want)
  print(f"maxrel {sampler} {label} vs k-diffusion: {err:.3g}")
  assert err <= TOL, err


def test_the_noise_level_tables_are_a1111s_and_comfyuis():
  """The k_diffusion form's table is A1111's (its model's float32 alphas_cumprod of Stable
  Diffusion's float64 schedule), the comfyui form's ComfyUI's (float64 levels stored in float32),
  bit for bit; diffusers' float32 betas put the smallest levels up to 1e-5 from either."""
  for options, config in (({"k_diffusion": True}, SD15),
                          ({"k_diffusion": True, "comfyui": True}, COMFY15)):
    with correctly_rounded_sqrt():
      want = kd.train_sigmas(config).numpy()
    np.testing.assert_array_equal(train_sigmas(train_alphas_cumprod({**SD15, **options})), want)
    assert max_rel_error(train_sigmas(train_alphas_cumprod(SD15)), want) > 5e-6


def _comfyui_denoiser(config, timesteps=None):
  """x0 as ComfyUI's KSampler makes it around the fake UNet: the input scaled by the call's
  sigma, the UNet at the training timestep nearest that sigma in float32 log sigma
  (`ModelSamplingDiscrete.timestep`: a whole number)."""
  del timesteps
  log_sigmas = kd.train_log_sigmas(config).float()

  def denoise(x, sigma):
    c_in = 1 / (sigma**2 + 1) ** 0.5
    t = float((sigma.float().log() - log_sigmas).abs().argmin())
    return x + torch.from_numpy(kd.fake_model((x * c_in).numpy(), t)) * -sigma

  return denoise


def _comfyui_beta(n: int, alpha: float = 0.6, beta: float = 0.6) -> torch.Tensor:
  """ComfyUI's beta_scheduler (its KSampler's alpha = beta = 0.6) over its table, written from its
  loop: the levels at the rounded Beta quantiles of the timesteps, a repeat dropped, then 0."""
  from scipy import stats  # noqa: PLC0415

  table = kd.train_sigmas(COMFY15)
  ts = np.rint(stats.beta.ppf(1 - np.linspace(0, 1, n, endpoint=False), alpha, beta)
               * (len(table) - 1))
  levels, last = [], -1
  for t in ts:
    if t != last:
      levels.append(float(table[int(t)]))
    last = t
  return torch.FloatTensor([*levels, 0.0])


def _comfyui_kl_optimal(n: int) -> torch.Tensor:
  """ComfyUI's kl_optimal_scheduler: n levels even in arctan sigma, in float32 torch, then 0."""
  table = kd.train_sigmas(COMFY15)
  steps = torch.arange(n, dtype=torch.float).div_(n - 1)
  levels = steps.new_zeros(n + 1)
  angles = steps * math.atan(float(table[0])) + (1 - steps) * math.atan(float(table[-1]))
  # its float32 tan_, correctly rounded as sdjax's (torch's own misses the last bit of 18% of
  # inputs on an AMD EPYC Zen 4; these levels it made exactly on the machine this was written on)
  levels[:-1] = correctly_rounded("tan", angles)
  return levels


_COMFYUI_SCHEDULES = {"Uniform": lambda n: kd.get_sigmas(COMFY15, n),
                      "Karras": lambda n: kd.get_sigmas_karras(COMFY15, n),
                      "Beta": _comfyui_beta, "KL Optimal": _comfyui_kl_optimal}


@pytest.mark.parametrize("label", ["Uniform", "Karras", "Beta", "KL Optimal"])
@pytest.mark.parametrize("sampler", ["Euler", "Euler a", "Heun", "LMS", "DPM++ 2M",
                                     "DPM++ 2M SDE", "iPNDM", "iPNDM_v", "Res Multistep",
                                     "Res Multistep a", "Gradient Estimation", "ER SDE",
                                     "DEIS", "SEEDS 2", "SEEDS 3", "DPM2", "DPM2 a",
                                     "DPM++ 2S a", "HeunPP2", "dpm_fast", "k_ddpm",
                                     "sa_solver", "sa_solver_pece"])
def test_steps_as_comfyui(sampler, label, monkeypatch):
  """The `comfyui` option: k-diffusion's loop as ComfyUI's KSampler runs it, from its noise
  times sqrt(1 + sigma_max^2), the UNet at whole timesteps, over its scheduler's levels (its beta
  and kl_optimal, not A1111's Beta and KL Optimal). Where a run starts below the largest
  training sigma (a second pass), its noise times the first level."""
  # DPM-Solver's variance-preserving form: x / sqrt(s^2 + 1)
  vp = outputs.scheduler_name(sampler).startswith(("dpmpp_2m", "dpmpp_3m"))
  options = {"timestep_spacing": "linspace", "k_diffusion": True, "comfyui": True,
             **outputs.schedule_type_options(label)}
  ours = get_scheduler(outputs.scheduler_name(sampler), SD15, options=options)
  state = ours.set_timesteps(10, sample_shape=SHAPE)
  assert np.array_equal(state.timesteps, np.round(state.timesteps))
  init, noises = make_noises(len(state.timesteps))
  got = sdjax_trajectory(ours, 10, init, noises)
  sigmas = _COMFYUI_SCHEDULES[label](10)
  start = float(torch.sqrt(1.0 + sigmas[0] ** 2.0))  # ComfyUI's, in float32
  form = 1 / (1 + float(sigmas[0]) ** 2) ** 0.5 if vp else 1.0
  np.testing.assert_allclose(float(ours.init_noise_sigma(state)), start * form, rtol=1e-6)
  monkeypatch.setattr(kd, "denoiser", _comfyui_denoiser)
  with correctly_rounded_sqrt():
    want = SAMPLERS[sampler](COMFY15, sigmas, torch.from_numpy(init) * start,
                             [torch.from_numpy(n) for n in noises])
  if vp:
    want = (want / np.sqrt(sigmas[1:].numpy().astype(np.float64) ** 2 + 1)[
        :, None, None, None, None]).astype(np.float32)
  err = max_rel_error(got, want)
  print(f"maxrel {sampler} {label} vs ComfyUI's loop: {err:.3g}")
  assert err <= TOL, err
  # Fractional timesteps (A1111's) or sigma_max's start: another trajectory. (A1111's KL Optimal
  # ends at the smallest level, which only its Euler samplers take.)
  if label != "KL Optimal" or sampler in ("Euler", "Euler a"):
    a1111 = sdjax_trajectory(get_scheduler(outputs.scheduler_name(sampler), SD15, options={
        k: v for k, v in options.items() if k != "comfyui"}), 10, init, noises)
    assert max_rel_error(a1111, want) > 100 * max(err, 1e-7)
  # A pass starting lower (custom levels below sigma_max): noise times its first level.
  lower = get_scheduler(outputs.scheduler_name(sampler), SD15, options={
      "timestep_spacing": "linspace", "k_diffusion": True, "comfyui": True,
      "sigmas": [5.0, 2.0, 0.5, 0.0]})
  state = lower.set_timesteps(3, sample_shape=SHAPE)
  np.testing.assert_allclose(float(lower.init_noise_sigma(state)),
                             5.0 / (26.0**0.5 if vp else 1.0), rtol=1e-6)


@pytest.mark.parametrize("sampler", ["iPNDM", "iPNDM_v", "Res Multistep", "Res Multistep a",
                                     "Gradient Estimation", "ER SDE", "DEIS", "SEEDS 2",
                                     "SEEDS 3", "HeunPP2", "LMS", "sa_solver",
                                     "sa_solver_pece", "dpm_fast"])
def test_comfyui_multistep_img2img(sampler, monkeypatch):
  """ComfyUI's own multistep samplers at denoise 0.6: its loop over the kept levels, whose
  history starts there (the first step Euler's, iPNDM's orders counted from it; dpm_fast's plan
  between the kept levels' ends)."""
  steps, denoise = 5, 0.6
  ours = get_scheduler(outputs.scheduler_name(sampler), SD15, options={
      "timestep_spacing": "linspace", "k_diffusion": True, "comfyui": True,
      "schedule_type": "karras"})
  total, begin = ours.img2img_steps(steps, denoise)
  assert (total, begin) == (int(steps / denoise), int(steps / denoise) - steps)
  ours, start = ours.planned_from(begin)  # dpm_fast: its plan from there, from its first step
  state = ours.set_timesteps(total, sample_shape=SHAPE)
  first = ours.step_position(state, start)  # a step's first call (SEEDS, Heun++: several)
  init, noises = make_noises(len(state.timesteps))
  image = np.random.default_rng(5).standard_normal(SHAPE).astype(np.float32)
  got = sdjax_trajectory(ours, total, init, noises, begin=first, init_sample=image)
  sigmas = kd.get_sigmas_karras(COMFY15, total)[begin:]
  monkeypatch.setattr(kd, "denoiser", _comfyui_denoiser)
  with correctly_rounded_sqrt():
    want = SAMPLERS[sampler](COMFY15, sigmas, torch.from_numpy(image) + torch.from_numpy(init)
                             * sigmas[0], [torch.from_numpy(n) for n in noises[first:]])
  err = max_rel_error(got, want)
  print(f"maxrel ComfyUI {sampler} img2img: {err:.3g}")
  assert err <= TOL, err


@pytest.mark.parametrize(("sampler", "label"), [("DPM2", "Karras"), ("DPM2 a", "Uniform"),
                                              ("Euler a", "Beta")])
def test_discard_penultimate_sigma(sampler, label, monkeypatch):
  """discard_penultimate_sigma (ComfyUI's KSampler for dpm_2 / dpm_2_ancestral, A1111's Always
  discard next-to-last sigma for any sampler): the levels of one step more less the next-to-last,
  its loop over them within float rounding."""
  options = {"timestep_spacing": "linspace", "k_diffusion": True, "comfyui": True,
             "discard_penultimate_sigma": True, **outputs.schedule_type_options(label)}
  ours = get_scheduler(outputs.scheduler_name(sampler), SD15, options=options)
  state = ours.set_timesteps(8, sample_shape=SHAPE)
  init, noises = make_noises(len(state.timesteps))
  got = sdjax_trajectory(ours, 8, init, noises)
  placed = _COMFYUI_SCHEDULES[label](9)
  sigmas = torch.cat([placed[:-2], placed[-1:]])
  monkeypatch.setattr(kd, "denoiser", _comfyui_denoiser)
  with correctly_rounded_sqrt():
    want = SAMPLERS[sampler](COMFY15, sigmas, torch.from_numpy(init) * torch.sqrt(
        1.0 + sigmas[0] ** 2.0), [torch.from_numpy(n) for n in noises])
  err = max_rel_error(got, want)
  print(f"maxrel {sampler} {label} discarding: {err:.3g}")
  assert err <= TOL, err
  kept = sdjax_trajectory(get_scheduler(outputs.scheduler_name(sampler), SD15, options={
      **options, "discard_penultimate_sigma": False}), 8, init, noises)
  assert max_rel_error(kept, want) > 100 * max(err, 1e-7)


@pytest.mark.parametrize(("sampler", "steps", "extra", "options"), [
    ("Euler", 30, "", {}),  # 31 levels above 0: 30 does not divide 1000
    ("DPM2", 30, "", {"discard": True}),  # A1111's DPM2 drops the next-to-last of 31 steps'
    ("Euler a", 20, "Noise Schedule: Zero Terminal SNR, ", {"zero_snr": True}),
    ("DPM++ 2M", 25, "Downcast alphas_cumprod: True, ", {"downcast": True}),
    ("Heun", 40, "Discard penultimate sigma: True, ", {"discard": True})])
def test_a1111_ddim_schedule_type(sampler, steps, extra, options):
  """A1111's DDIM schedule type: every (1000 // steps)-th level of k-diffusion's table from the
  second, then 0, becomes the run's --sigmas, steps as many as they make."""
  found = infotext.reproduce(f"a cat\nSteps: {steps}, Sampler: {sampler}, Schedule type: DDIM, "
                             f"CFG scale: 7, Seed: 1, {extra}Version: v1.10.1")
  config = {**SD15, "rescale_betas_zero_snr": options.get("zero_snr", False),
            "downcast_alphas_cumprod": options.get("downcast", False)}
  n = steps + options.get("discard", False)
  with correctly_rounded_sqrt():
    table = kd.train_sigmas(config).float()
  want = [*table[1::1000 // n].flip(0).tolist(), 0.0]
  if options.get("discard"):
    want = want[:-2] + want[-1:]
  assert [float(v) for v in found.flags["sigmas"]] == want
  assert found.flags["steps"] == str(len(want) - 1) and "schedule_type" not in found.flags
  options = json.loads(found.flags["scheduler_options"])
  assert options["k_diffusion"] and "discard_penultimate_sigma" not in options  # in the levels
  state = get_scheduler(outputs.scheduler_name(found.flags["scheduler"]), SD15, options={
      **options, "sigmas": found.flags["sigmas"]}).set_timesteps(len(want) - 1,
                                                                 sample_shape=SHAPE)
  assert len(state.timesteps) >= len(want) - 1


def test_runs_start_at_a_step():
  """img2img, hires and refiner runs start at a step's first call: Heun's every second call,
  SEEDS 3's every third, Heun++'s every third until its last two steps (two calls, then one)."""
  for name, starts in (("heun", [0, 2, 4, 6, 8]), ("seeds_3", [0, 3, 6, 9, 12]),
                       ("heunpp2", [0, 3, 6, 9, 11]), ("euler", [0, 1, 2, 3, 4])):
    ours = get_scheduler(name, SD15, options={"k_diffusion": True})
    state = ours.set_timesteps(5, sample_shape=SHAPE)
    assert [ours.step_position(state, k) for k in range(5)] == starts
    assert [p for p in range(len(state.timesteps)) if ours.starts_step(state, p)] == starts
    for fraction in (0.2, 0.5, 0.75, 0.9):
      assert sampling.denoising_start_index(ours, state, fraction) in starts


def test_lcm_discards_penultimate_sigma():
  """A1111's LCM sampler (k_diffusion) under its "Always discard next-to-last sigma": the levels
  (and distillation timesteps) of one step more less the next-to-last."""
  options = {"k_diffusion": True, "schedule_type": "karras"}
  dropped = get_scheduler("lcm", SD15, options={**options, "discard_penultimate_sigma": True}
                          ).set_timesteps(6)
  more = get_scheduler("lcm", SD15, options=options).set_timesteps(7)
  np.testing.assert_array_equal(np.asarray(dropped.timesteps), np.asarray(more.timesteps)[:-1])
  np.testing.assert_array_equal(np.asarray(dropped.sigma_in), np.asarray(more.sigma_in)[:-1])
  assert np.asarray(dropped.noise_std)[-1] == 0  # the last step lands on x0, as the full run's
  with pytest.raises(SchedulerConfigError, match="k_diffusion"):
    get_scheduler("lcm", SD15, options={"discard_penultimate_sigma": True})


@pytest.mark.parametrize("steps", [2, 9, 30])
def test_comfyui_beta_and_kl_optimal_levels(steps):
  """The comfyui form's beta and kl_optimal are ComfyUI's schedulers bit for bit (A1111's Beta
  and KL Optimal, of the same names, place other levels); a step count at which ComfyUI's beta
  repeats a timestep (and runs fewer steps) is refused."""
  for kind, reference in (("beta", _comfyui_beta), ("kl_optimal", _comfyui_kl_optimal)):
    options = {"timestep_spacing": "linspace", "k_diffusion": True, "schedule_type": kind}
    ours = get_scheduler("euler", SD15, options={**options, "comfyui": True})
    levels = np.asarray(ours.set_timesteps(steps).sigmas)
    np.testing.assert_array_equal(levels, reference(steps).numpy())
    a1111 = np.asarray(get_scheduler("euler", SD15, options=options).set_timesteps(steps).sigmas)
    assert np.abs(a1111[:steps] - levels[:steps]).max() > 0.1
  shaped = get_scheduler("euler", SD15, options={  # its BetaSamplingScheduler node's shape
      **options, "comfyui": True, "schedule_type": "beta", "schedule_beta_alpha": 0.5,
      "schedule_beta_beta": 0.7}).set_timesteps(steps).sigmas
  np.testing.assert_array_equal(np.asarray(shaped), _comfyui_beta(steps, 0.5, 0.7).numpy())
  with pytest.raises(SchedulerConfigError, match="repeats a timestep at 139 steps"):
    get_scheduler("euler", SD15, options={**options, "comfyui": True,
                                          "schedule_type": "beta"}).set_timesteps(139)


@pytest.mark.parametrize(("sampler", "label", "version"), [
    ("Euler a", None, "v1.6.0"), ("DPM++ 2M", "Karras", "v1.7.0-224-g1a2b3c4"),
    ("DPM2", "Automatic", "v1.5.1"), ("Heun", "Karras", "v1.10.1")])
def test_downcast_alphas_cumprod(sampler, label, version):
  """An A1111 image made before 1.7.0-225 (or with its Downcast alphas_cumprod setting since):
  the float16 model's alphas_cumprod were float16, and so were k-diffusion's table of noise
  levels and their logs. sdjax's `downcast_alphas_cumprod` steps on that table as k-diffusion
  did; the float32 table's run is far off."""
  extra = "Downcast alphas_cumprod: True, " if version == "v1.10.1" else ""
  half = {**SD15, "downcast_alphas_cumprod": True}
  ours, state, got, sigmas, init, noises = _as_a1111_ran_it(sampler, label, 10, extra=extra,
                                                            config=half, version=version)
  assert ours.cfg["downcast_alphas_cumprod"] is True
  # an older A1111 held an SDXL model's alphas_cumprod apart from half(), in float32
  implied = json.loads(infotext.reproduce(f"a cat\nSteps: 10, Sampler: {sampler}, {extra}"
                                          f"Version: {version}").flags["scheduler_options"])
  assert sampling.model_schedule(SDXL_UNET, implied)["downcast_alphas_cumprod"] is (
      version == "v1.10.1")
  assert kd.train_sigmas(half).dtype == torch.float16
  start = float(sigmas[0]) / (1 + float(sigmas[0]) ** 2) ** 0.5 if sampler == "DPM++ 2M" else (
      float(sigmas[0]))
  np.testing.assert_allclose(float(ours.init_noise_sigma(state)), start, rtol=1e-6)
  with correctly_rounded_sqrt():
    want = SAMPLERS[sampler](half, sigmas, torch.from_numpy(init) * sigmas[0],
                             [torch.from_numpy(n) for n in noises])
  if sampler == "DPM++ 2M":
    want = (want / np.sqrt(sigmas[1:].numpy().astype(np.float64) ** 2 + 1)[
        :, None, None, None, None]).astype(np.float32)
  err = max_rel_error(got, want)
  print(f"maxrel {sampler} {label} on the float16 table: {err:.3g}")
  assert err <= TOL, err
  _, _, float32_run, float32_sigmas, _, _ = _as_a1111_ran_it(sampler, label, 10)
  assert not np.allclose(sigmas.numpy(), float32_sigmas.numpy(), rtol=1e-3)
  assert max_rel_error(got, float32_run) > 100 * TOL


@pytest.mark.parametrize(("sampler", "label"), [("Euler a", "Automatic"), ("DPM++ 2M", "Karras"),
                                               ("Euler", "Karras"), ("Heun", "Karras")])
def test_zero_terminal_snr(sampler, label):
  """A1111's Noise Schedule "Zero Terminal SNR" (a v-prediction model's): alphas_cumprod
  rescaled as A1111 rescales them, ending at 4.9e-8 (largest level 4518.8; diffusers' sigma
  schedulers end at 2^-24: 4096), the samplers' `rescale_betas_zero_snr` in their A1111 form.
  The table is A1111's to the bit and the levels placed on it to an ulp (k-diffusion's float32
  operations); a step from 4518.8 down to ~12 is so ill-conditioned (an ancestral step's
  sigma_down cancels to ~0.03) that an ulp of a level moves the image by 1e-5, so the loop is
  compared on sdjax's levels."""
  vpred = {**SD15, "prediction_type": "v_prediction"}
  zero_snr = {**vpred, "rescale_betas_zero_snr": True}
  flags = infotext.reproduce(f"a cat\nSteps: 8, Sampler: {sampler}, Schedule type: {label}, "
                             "CFG scale: 7, Seed: 1, Noise Schedule: Zero Terminal SNR, "
                             "Version: v1.10.1").flags
  options = {**json.loads(flags["scheduler_options"]),
             **outputs.schedule_type_options(flags["schedule_type"])}
  assert options["rescale_betas_zero_snr"] is True
  ours = get_scheduler(outputs.scheduler_name(flags["scheduler"]), vpred, options=options)
  state = ours.set_timesteps(8, sample_shape=SHAPE)
  init, noises = make_noises(len(state.timesteps))
  got = sdjax_trajectory(ours, 8, init, noises)
  with correctly_rounded_sqrt():  # as CUDA's: the rescale's cancellations show torch CPU's
    np.testing.assert_array_equal(kd.train_sigmas(zero_snr).numpy(),
                                  train_sigmas(train_alphas_cumprod(ours.cfg)))
    placed = (kd.get_sigmas if label == "Automatic" else kd.get_sigmas_karras)(zero_snr, 8)
    sigmas = torch.from_numpy(np.unique(np.asarray(state.sigmas))[::-1].copy())  # the levels
    # k-diffusion's levels in its float32 operations (its pow and exp against numpy's: an ulp)
    np.testing.assert_allclose(sigmas.numpy(), placed.numpy(), rtol=2.4e-7)
    want = SAMPLERS[sampler](zero_snr, sigmas, torch.from_numpy(init) * sigmas[0],
                             [torch.from_numpy(n) for n in noises])
  if sampler == "DPM++ 2M":
    want = (want / np.sqrt(sigmas[1:].numpy().astype(np.float64) ** 2 + 1)[
        :, None, None, None, None]).astype(np.float32)
  np.testing.assert_allclose(float(sigmas[0]), 4518.8, rtol=1e-4)
  err = max_rel_error(got, want)
  print(f"maxrel {sampler} {label} zero terminal SNR vs k-diffusion: {err:.3g}")
  assert err <= TOL, err
  name = outputs.scheduler_name(flags["scheduler"])
  if sampler == "Heun":  # diffusers' Heun ignores a model's zero-SNR config; A1111's form reads it
    assert "rescale_betas_zero_snr" not in get_scheduler(name, zero_snr).cfg
    form = {k: v for k, v in options.items() if k != "rescale_betas_zero_snr"}
    assert get_scheduler(name, zero_snr, options=form).cfg["rescale_betas_zero_snr"] is True
    return
  diffusers_form = get_scheduler(name, zero_snr,
                                 options={k: v for k, v in options.items() if k != "k_diffusion"}
                                 if sampler != "DPM++ 2M" else options | {"k_diffusion": False})
  assert float(np.max(diffusers_form.set_timesteps(8, sample_shape=SHAPE).sigmas)) == (
      pytest.approx(4096.0, rel=1e-4))


def test_zero_terminal_snr_as_comfyui():
  """ComfyUI's zsnr (a ModelSamplingDiscrete node's, or a checkpoint's ztsnr key): its table,
  rescaled in float64 through sigmas (comfy/model_sampling.py), to float32 rounding (sdjax keeps
  float32 alphas_cumprod); its KSampler's start at sigma_max, sqrt(1 + 4518.8^2) times noise."""
  graph = {"3": {"class_type": "KSampler", "inputs": {
               "seed": 1, "steps": 8, "cfg": 7.0, "sampler_name": "euler", "scheduler": "karras",
               "denoise": 1.0, "model": ["10", 0], "positive": ["6", 0], "negative": ["6", 0],
               "latent_image": ["5", 0]}},
           "10": {"class_type": "ModelSamplingDiscrete",
                  "inputs": {"model": ["4", 0], "sampling": "v_prediction", "zsnr": True}},
           "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "noob.ckpt"}},
           "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64}},
           "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat", "clip": ["4", 1]}}}
  flags = infotext.reproduce(json.dumps(graph)).flags
  options = {**json.loads(flags["scheduler_options"]),
             **outputs.schedule_type_options(flags["schedule_type"])}
  assert options["comfyui"] is True and options["rescale_betas_zero_snr"] is True
  vpred = {**SD15, "prediction_type": "v_prediction"}
  ours = get_scheduler("euler", vpred, options=options)
  betas = torch.linspace(SD15["beta_start"] ** 0.5, SD15["beta_end"] ** 0.5, 1000,
                         dtype=torch.float64) ** 2
  alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
  sigmas = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5
  root = (1 / (sigmas * sigmas + 1)).sqrt()  # rescale_zero_terminal_snr_sigmas
  first, last = root[0].clone(), root[-1].clone()
  root = (root - last) * (first / (first - last))
  alphas_bar = root**2
  alphas_bar[-1] = 4.8973451890853435e-08
  want = (((1 - alphas_bar) / alphas_bar) ** 0.5).float().numpy()
  np.testing.assert_allclose(train_sigmas(train_alphas_cumprod(ours.cfg)), want, rtol=2.4e-7)
  state = ours.set_timesteps(8, sample_shape=SHAPE)
  np.testing.assert_allclose(float(ours.init_noise_sigma(state)), (1 + 4518.8**2) ** 0.5,
                             rtol=1e-4)


@pytest.mark.parametrize("sampler", ["Euler", "DPM++ 2M", "DPM2"])
def test_sgm_noise_multiplier(sampler):
  """A1111's SGM noise multiplier (an image's `SGM noise multiplier: True`): k-diffusion's loop
  from its noise times sqrt(1 + sigma_0^2); a sampler without the option gets a note."""
  ours, state, got, sigmas, init, noises = _as_a1111_ran_it(
      sampler, "Karras", 10, extra="SGM noise multiplier: True, ")
  if sampler == "DPM2":
    assert "sgm_noise_multiplier" not in ours.cfg
    found = infotext.reproduce("a cat\nSteps: 10, Sampler: DPM2, CFG scale: 7, Seed: 1, "
                               "SGM noise multiplier: True")
    assert "SGM noise multiplier" in dict(found.notes)["scheduler"]
    return
  start = float(torch.sqrt(1.0 + sigmas[0] ** 2.0))
  form = 1 / (1 + float(sigmas[0]) ** 2) ** 0.5 if sampler == "DPM++ 2M" else 1.0
  np.testing.assert_allclose(float(ours.init_noise_sigma(state)), start * form, rtol=1e-6)
  with correctly_rounded_sqrt():
    want = SAMPLERS[sampler](SD15, sigmas, torch.from_numpy(init) * start,
                             [torch.from_numpy(n) for n in noises])
  if sampler == "DPM++ 2M":
    want = (want / np.sqrt(sigmas[1:].numpy().astype(np.float64) ** 2 + 1)[
        :, None, None, None, None]).astype(np.float32)
  err = max_rel_error(got, want)
  print(f"maxrel {sampler} with the SGM noise multiplier: {err:.3g}")
  assert err <= TOL, err


@pytest.mark.parametrize("label", [None, "Karras"])
def test_dpmpp_2m_differs_in_its_start_and_timesteps(label):
  """Without `k_diffusion`, diffusers' DPM-Solver++ works on x / sqrt(sigma^2 + 1) from unit
  noise, its UNet at integer timesteps: k-diffusion's loop from that start (in k-diffusion's x),
  its UNet at those timesteps, makes the same samples."""
  _, state, got, sigmas, init, _ = _as_a1111_ran_it("DPM++ 2M", label, 10, k_diffusion=False)
  assert np.array_equal(state.timesteps, np.round(state.timesteps))
  start = torch.from_numpy(init) * (sigmas[0]**2 + 1) ** 0.5
  with correctly_rounded_sqrt():
    want = kd.sample_dpmpp_2m(SD15, sigmas, start, None, timesteps=np.asarray(state.timesteps))
  want = want / np.sqrt(sigmas[1:].numpy().astype(np.float64) ** 2 + 1)[:, None, None, None, None]
  err = max_rel_error(got, want.astype(np.float32))
  print(f"maxrel DPM++ 2M {label} vs k-diffusion from unit noise: {err:.3g}")
  assert err <= TOL, err


@pytest.mark.parametrize("k_diffusion", [False, True])
def test_dpmpp_3m_sde_drops_the_penultimate_level(k_diffusion):
  """A1111 places DPM++ 3M SDE's levels (Exponential, its Automatic) for one step more and drops
  the last above 0; with `k_diffusion` sdjax's do too."""
  flags = infotext.reproduce("a cat\nSteps: 10, Sampler: DPM++ 3M SDE, Schedule type: Automatic, "
                             "CFG scale: 7, Seed: 1").flags
  options = {**json.loads(flags["scheduler_options"]),
             **outputs.schedule_type_options(flags["schedule_type"])}
  assert options.pop("k_diffusion") is True
  ours = get_scheduler("dpmpp_3m_sde", SD15, options={**options, "k_diffusion": k_diffusion})
  state = ours.set_timesteps(10, sample_shape=SHAPE)
  if k_diffusion:
    want = kd.discard_penultimate(kd.get_sigmas_exponential(SD15, 11))
  else:  # diffusers' own: the levels of a 10-step run
    want = kd.get_sigmas_exponential(SD15, 10)
  np.testing.assert_allclose(np.asarray(state.sigmas), want.numpy(), rtol=1e-6)
  assert len(state.timesteps) == 10


def test_k_diffusion_stays_only_where_a_sampler_takes_it():
  """The option (and an ancestral sampler's eta) follows the run to a hires or prompt line's
  scheduler only where that scheduler has that A1111 form; every scheduler that takes it builds
  with it."""
  options = {"timestep_spacing": "linspace", "k_diffusion": True}
  takers = [name for name in SCHEDULERS if takes_option(name, "k_diffusion")]
  assert {"euler", "euler_ancestral", "heun", "lms", "kdpm2_ancestral_karras",
          "dpmpp_2s_ancestral", "dpmpp_2m", "dpmpp_3m_sde_karras"} <= set(takers)
  for name in takers:
    get_scheduler(name, SD15, options=options).set_timesteps(4, sample_shape=SHAPE)
    assert sampling.a1111_form_for(name, options) == options
  assert sampling.a1111_form_for("restart", options) == {"timestep_spacing": "linspace"}
  assert sampling.a1111_form_for("ddim", {"k_diffusion": True}) is None
  # An ancestral sampler's eta (A1111's Eta) follows only to another ancestral sampler.
  eta = {**options, "eta": 0.5}
  assert sampling.a1111_form_for("kdpm2_ancestral", eta) == eta
  for name in ("dpmpp_2m", "ddim", "tcd"):
    assert "eta" not in sampling.a1111_form_for(name, eta)
  assert sampling.a1111_form_for("dpmpp_2m_sde", eta) == eta  # an SDE sampler's too
  # A1111's zero-terminal-SNR schedule follows to any sampler but EDM's (its own levels).
  zero_snr = {**options, "rescale_betas_zero_snr": True}
  for name in ("heun", "lms", "kdpm2", "dpmpp_sde", "restart", "pndm", "unipc"):
    assert sampling.a1111_form_for(name, zero_snr).get("rescale_betas_zero_snr") is True
  assert "rescale_betas_zero_snr" not in (sampling.a1111_form_for("edm_euler", zero_snr) or {})
  # A1111's "Always discard next-to-last sigma" follows to its k-diffusion samplers (and a
  # ComfyUI run's uni_pc), not to its own DDIM / PLMS / UniPC loops; every taker builds with it.
  discard = {**options, "discard_penultimate_sigma": True}
  for name in takers:
    get_scheduler(name, SD15, options=discard).set_timesteps(4, sample_shape=SHAPE)
    assert sampling.a1111_form_for(name, discard) == discard
  for name in ("ddim", "pndm", "unipc", "restart"):
    assert "discard_penultimate_sigma" not in (sampling.a1111_form_for(name, discard) or {})
  assert sampling.a1111_form_for("unipc", {"comfyui": True, "discard_penultimate_sigma": True})
  assert sampling.schedule_type_for(None, "unipc", options) == {"timestep_spacing": "linspace"}


@pytest.mark.parametrize("eta", [0.0, 0.4])
@pytest.mark.parametrize("sampler", ["Euler a", "DPM2 a", "DPM++ 2S a"])
def test_ancestral_eta(sampler, eta):
  """A1111's `Eta` of its ancestral samplers (k-diffusion's eta: the share of each step's noise
  that is fresh; 0: none) is their `eta` option."""
  ours, state, got, sigmas, init, noises = _as_a1111_ran_it(sampler, "Karras", 6,
                                                            extra=f"Eta: {eta}, ")
  assert ours.cfg["eta"] == eta
  with correctly_rounded_sqrt():
    want = SAMPLERS[sampler](SD15, sigmas, torch.from_numpy(init) * sigmas[0],
                             [torch.from_numpy(n) for n in noises], eta=eta)
  err = max_rel_error(got, want)
  print(f"maxrel {sampler} eta {eta} vs k-diffusion: {err:.3g}")
  assert err <= TOL, err


@pytest.mark.parametrize("sampler", ["DPM2 a", "DPM++ 2S a", "DPM++ 2M SDE", "DPM++ 3M SDE",
                                     "DPM fast"])
def test_sigma_noise(sampler):
  """A1111's `Sigma noise` (its s_noise setting, written for the samplers whose k-diffusion
  function takes it) is their `s_noise` option: each fresh draw times it, as k-diffusion's
  `noise_sampler(...) * s_noise * ...` multiplies first (the references take the draws so)."""
  ours, state, got, sigmas, init, noises = _as_a1111_ran_it(sampler, "Karras", 6,
                                                            extra="Sigma noise: 0.7, ")
  assert ours.cfg["s_noise"] == 0.7
  if sampler == "DPM++ 3M SDE":  # A1111's drops the penultimate level of one step more
    sigmas = kd.discard_penultimate(kd.get_sigmas_karras(SD15, 7))
  with correctly_rounded_sqrt():
    want = SAMPLERS[sampler](SD15, sigmas, torch.from_numpy(init) * sigmas[0],
                             [torch.from_numpy(n) * 0.7 for n in noises])
  if sampler in ("DPM++ 2M SDE", "DPM++ 3M SDE"):  # diffusers' form: x / sqrt(s^2 + 1)
    want = (want / np.sqrt(sigmas[1:].numpy().astype(np.float64) ** 2 + 1)[
        :, None, None, None, None]).astype(np.float32)
  err = max_rel_error(got, want)
  print(f"maxrel {sampler} Sigma noise 0.7 vs k-diffusion: {err:.3g}")
  assert err <= TOL, err
  plain = sdjax_trajectory(get_scheduler(ours.name, SD15, options={
      k: v for k, v in json.loads(infotext.reproduce(
          f"a cat\nSteps: 6, Sampler: {sampler}, Schedule type: Karras, CFG scale: 7, Seed: 1, "
          "Version: v1.10.1").flags["scheduler_options"]).items()}), 6, init, noises)
  assert max_rel_error(plain, want) > 100 * max(err, 1e-7)


CHURN = "Sigma churn: 3, Sigma tmin: 0.5, Sigma tmax: 8, Sigma noise: 0.9, "


@pytest.mark.parametrize("label", [None, "Karras"])
@pytest.mark.parametrize("sampler", ["Euler", "Heun", "DPM2"])
def test_churn_as_k_diffusion(sampler, label):
  """A1111's Sigma churn, tmin, tmax and noise (its Euler's, Heun's and DPM2's k-diffusion churn):
  the steps that start in [tmin, tmax] are noised up to sigma_hat by their draw (every step
  draws one) before their first call, which sees sigma_hat, as k-diffusion's loops do."""
  ours, state, got, sigmas, init, noises = _as_a1111_ran_it(sampler, label, 10, extra=CHURN)
  assert ours.churns and ours.needs_noise
  churned = np.count_nonzero(np.asarray(state.churn))
  assert 0 < churned < 10  # [tmin, tmax] leaves steps at both ends alone
  with correctly_rounded_sqrt():
    want = SAMPLERS[sampler](SD15, sigmas, torch.from_numpy(init) * sigmas[0],
                             [torch.from_numpy(n) for n in noises], churn=(3.0, 0.5, 8.0, 0.9))
    plain = SAMPLERS[sampler](SD15, sigmas, torch.from_numpy(init) * sigmas[0],
                              [torch.from_numpy(n) for n in noises])
  err = max_rel_error(got, want)
  print(f"maxrel {sampler} {label} churn vs k-diffusion: {err:.3g} ({churned} steps churned)")
  assert err <= TOL, err
  assert max_rel_error(got, plain) > 100 * max(err, 1e-7)


def test_churn_options():
  """The churn options are Euler's, Heun's and DPM2's only (their `_karras` names' too), numbers
  >= 0; s_churn 0 is the plain sampler (no draws, the same program); s_tmax 0 no upper bound."""
  for name in ("euler", "heun", "kdpm2_karras"):
    for option in ("s_churn", "s_tmin", "s_tmax", "s_noise"):
      assert takes_option(name, option), (name, option)
    for bad in (-1, "x", True, float("nan")):
      with pytest.raises(ValueError, match=f"s_churn must be a number >= 0.*got {bad!r}"):
        get_scheduler(name, SD15, options={"s_churn": bad})
    zero = get_scheduler(name, SD15, options={"s_churn": 0.0, "s_tmin": 1.0})
    assert not zero.churns and not zero.needs_noise
    assert zero.set_timesteps(6, sample_shape=SHAPE).timesteps.tolist() == get_scheduler(
        name, SD15).set_timesteps(6, sample_shape=SHAPE).timesteps.tolist()
  for name in ("euler_ancestral", "kdpm2_ancestral", "lms", "seeds_2", "ipndm", "euler_cfg_pp"):
    with pytest.raises(ValueError, match="has no option 's_churn'"):
      get_scheduler(name, SD15, options={"s_churn": 1.0})
  state = get_scheduler("euler", SD15, options={"s_churn": 1.0}).set_timesteps(5)
  assert np.all(np.asarray(state.churn) > 0)  # s_tmax 0: every level
  capped = get_scheduler("euler", SD15, options={"s_churn": 1.0, "s_tmax": 3.0})
  levels = np.asarray(capped.set_timesteps(5).sigmas)[:-1]
  np.testing.assert_array_equal(np.asarray(capped.set_timesteps(5).churn) > 0, levels <= 3.0)


_COMFYUI_KARRAS = {"timestep_spacing": "linspace", "k_diffusion": True, "comfyui": True,
                   "schedule_type": "karras"}


def _as_comfyui_ran_it(name, options, steps, loop, monkeypatch, draws=1.0):
  """sdjax's scheduler `name` with `options` over ComfyUI's Karras levels, its trajectory on the
  fake model, and ComfyUI's `loop` over those levels given the same noise (each draw times
  `draws`): (scheduler, ours, theirs, init, noises, levels)."""
  ours = get_scheduler(name, SD15, options={**_COMFYUI_KARRAS, **options})
  state = ours.set_timesteps(steps, sample_shape=SHAPE)
  init, noises = make_noises(len(state.timesteps))
  got = sdjax_trajectory(ours, steps, init, noises)
  sigmas = kd.get_sigmas_karras(COMFY15, steps)
  monkeypatch.setattr(kd, "denoiser", _comfyui_denoiser)
  with correctly_rounded_sqrt():
    want = loop(COMFY15, sigmas, torch.from_numpy(init) * float(torch.sqrt(1.0 + sigmas[0] ** 2.0)),
                [torch.from_numpy(n) * draws for n in noises])
  return ours, got, want, init, noises, sigmas


@pytest.mark.parametrize("sampler", ["Euler a", "Res Multistep a", "ER SDE", "sa_solver",
                                     "DPM++ 2S a", "SEEDS 2", "SEEDS 3"])
def test_s_noise_as_comfyui(sampler, monkeypatch):
  """ComfyUI's sampler nodes' s_noise (SamplerEulerAncestral, ...): the `s_noise` option, its
  loop's draws times it. It changes what the compiled steps do (a config option, not the
  state's), and only the samplers with fresh noise take it."""
  name = outputs.scheduler_name(sampler)
  ours, got, want, *_ = _as_comfyui_ran_it(name, {"s_noise": 0.6}, 7, SAMPLERS[sampler],
                                           monkeypatch, draws=0.6)
  assert ours.program() != get_scheduler(name, SD15, options={
      **_COMFYUI_KARRAS, "s_noise": 1.0}).program()
  err = max_rel_error(got, want)
  print(f"maxrel ComfyUI {sampler} s_noise 0.6: {err:.3g}")
  assert err <= TOL, err


@pytest.mark.parametrize("order", [1, 2, 3, 6])
def test_lms_order(order, monkeypatch):
  """ComfyUI's SamplerLMS order (k-diffusion's `order`) is lms's `lms_order` option: each step
  integrates at most that many derivatives; a run from a lower level counts its own steps."""
  ours, got, want, init, noises, sigmas = _as_comfyui_ran_it(
      "lms", {"lms_order": order}, 9, functools.partial(kd.sample_lms, order=order), monkeypatch)
  err = max_rel_error(got, want)
  image = np.random.default_rng(5).standard_normal(SHAPE).astype(np.float32)
  lower = sdjax_trajectory(ours, 9, init, noises, begin=3, init_sample=image)
  with correctly_rounded_sqrt():
    want_lower = kd.sample_lms(COMFY15, sigmas[3:], torch.from_numpy(image) + torch.from_numpy(
        init) * sigmas[3], None, order=order)
  err = max(err, max_rel_error(lower, want_lower))
  print(f"maxrel ComfyUI LMS order {order}: {err:.3g}")
  assert err <= TOL, err
  four = sdjax_trajectory(get_scheduler("lms", SD15, options={**_COMFYUI_KARRAS, "lms_order": 4}),
                          9, init, noises)
  assert max_rel_error(four, want) > 100 * max(err, 1e-7)
  for bad in (0, 11, 2.5, True):
    with pytest.raises(ValueError, match="scheduler 'lms': lms_order must be an integer from 1"):
      get_scheduler("lms", SD15, options={"lms_order": bad})


def test_s_noise_option():
  """s_noise is a number >= 0, of the samplers whose steps draw fresh noise (the SDE forms of
  DPM-Solver++ only); at 1 the steps are the plain ones."""
  for bad in (-0.1, "x", True, float("inf"), float("nan")):
    with pytest.raises(ValueError, match="scheduler 'euler_ancestral': s_noise must be a number"):
      get_scheduler("euler_ancestral", SD15, options={"s_noise": bad})
  for name in ("dpmpp_2m", "ddim", "lms", "dpm_fast", "euler_cfg_pp"):
    assert not takes_option(name, "s_noise"), name
    with pytest.raises(ValueError, match="has no option 's_noise'"):
      get_scheduler(name, SD15, options={"s_noise": 0.5})
  assert takes_option("dpmpp_2m_sde_karras", "s_noise")
  ours = get_scheduler("euler_ancestral", SD15, options={"s_noise": 1.0})
  state = ours.set_timesteps(5, sample_shape=SHAPE)
  init, noises = make_noises(len(state.timesteps))
  np.testing.assert_array_equal(sdjax_trajectory(ours, 5, init, noises), sdjax_trajectory(
      get_scheduler("euler_ancestral", SD15), 5, init, noises))
  # Zero: no fresh noise at all, as ComfyUI's loops skip it.
  zero = get_scheduler("euler_ancestral", SD15, options={"s_noise": 0})
  np.testing.assert_array_equal(sdjax_trajectory(zero, 5, init, noises),
                                sdjax_trajectory(zero, 5, init, noises * 0 + 3.0))


def test_ancestral_eta_option():
  """eta is A1111's range, [0, 1]; at 1 the steps are diffusers' own; it lives in the state (one
  program for every eta)."""
  plain = get_scheduler("euler_ancestral", SD15)
  for name in ("euler_ancestral", "kdpm2_ancestral_karras", "dpmpp_2s_ancestral"):
    for bad in (1.5, -0.1, "x", True):
      with pytest.raises(ValueError, match=f"scheduler '{name.removesuffix('_karras')}': eta "):
        get_scheduler(name, SD15, options={"eta": bad})
    ours = get_scheduler(name, SD15, options={"eta": 0.3})
    assert ours.program() == get_scheduler(name, SD15).program()
  one = get_scheduler("euler_ancestral", SD15, options={"eta": 1.0})
  for a, b in zip(*(jax.tree.leaves(s.set_timesteps(7)) for s in (one, plain)), strict=True):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(ValueError, match="an ancestral sampler's .* is its scheduler option eta"):
    get_scheduler("euler_ancestral", SD15, eta=0.5)


@pytest.mark.parametrize("steps", [6, 20, 37])
@pytest.mark.parametrize("label", [None, "Uniform"])
def test_restart(steps, label):
  """A1111's Restart (Automatic, or an image older than schedule types: Karras; from 20 steps
  its restarts, with fresh noise) steps as its loop, written out in torch; more model calls than
  Heun's 2n - 1 from 20 steps."""
  ours, state, got, sigmas, init, noises = _as_a1111_ran_it("Restart", label, steps)
  with correctly_rounded_sqrt():
    want = kd.sample_restart(SD15, sigmas, torch.from_numpy(init) * sigmas[0],
                             [torch.from_numpy(n) for n in noises])
  calls = {6: 11, 20: 39, 37: 73}[steps]  # 37: 18 steps down, 2 x 9 restart steps, 2 calls each
  assert len(state.timesteps) == len(want) == calls
  err = max_rel_error(got, want)
  print(f"maxrel Restart {label} {steps} steps vs its loop: {err:.3g}")
  assert err <= TOL, err


def _planned_img2img(ours, steps: int, strength: float):
  """An A1111 img2img run of a scheduler that plans its run over the levels it keeps, on the
  fake model: (its state, trajectory, noises, steps' noises, image, the first kept level's index:
  steps - t_enc - 1, t_enc = int(min(strength, 0.999) * steps), as A1111's sample_img2img)."""
  total, first = ours.img2img_steps(steps, strength)
  planned, begin = ours.planned_from(first)
  assert begin == 0 and total == steps
  assert first == steps - int(min(strength, 0.999) * steps) - 1
  state = planned.set_timesteps(total, sample_shape=SHAPE)
  init, noises = make_noises(len(state.timesteps))
  image = np.random.default_rng(5).standard_normal(SHAPE).astype(np.float32)
  got = sdjax_trajectory(planned, total, init, noises, init_sample=image)
  return state, got, init, noises, image, first


@pytest.mark.parametrize(("steps", "strength"), [(10, 0.6), (40, 0.6)])
def test_restart_img2img(steps, strength):
  """A1111's Restart img2img (and hires pass): its sample_img2img gives the sampler the levels
  it keeps (the last t_enc + 1 and 0, t_enc = int(min(strength, 0.999) * steps)), over which
  Restart plans its walk afresh (from 20 of them, Karras levels and restarts: 40 steps keep 25),
  from the image noised to the first of them."""
  ours = get_scheduler("restart", SD15, options={"schedule_type": "karras"})
  state, got, init, noises, image, first = _planned_img2img(ours, steps, strength)
  kept = kd.get_sigmas_karras(SD15, steps)[first:]
  with correctly_rounded_sqrt():
    want = kd.sample_restart(SD15, kept, torch.from_numpy(image) + torch.from_numpy(init)
                             * kept[0], [torch.from_numpy(n) for n in noises])
  assert len(want) == len(state.timesteps) == {10: 13, 40: 49}[steps]  # 40: 16 steps down, 9 back
  err = max_rel_error(got, want)
  print(f"maxrel Restart img2img {steps} steps at {strength}: {err:.3g}")
  assert err <= TOL, err


@pytest.mark.parametrize(("label", "eta", "s_noise"), [
    ("Automatic", 1.0, 1.0), ("Exponential", 1.0, 1.0), ("Automatic", 0.6, 1.0),
    ("Automatic", 0.0, 1.0), ("Automatic", 1.0, 0.7)])
def test_dpmpp_sde_as_k_diffusion(label, eta, s_noise):
  """A1111's DPM++ SDE (its Automatic: Karras) as `reproduce` sets it: k-diffusion's loop, each
  stage given its own noise as the Brownian tree answers (`brownian_state`: main.py's --brownian,
  which the file also sets); A1111's Eta its share of fresh noise (its `eta` option), its Sigma
  noise the factor on each (`s_noise`)."""
  written = (f"Eta: {eta}, " if eta != 1 else "") + (
      f"Sigma noise: {s_noise}, " if s_noise != 1 else "")
  flags = infotext.reproduce(f"a cat\nSteps: 6, Sampler: DPM++ SDE, Schedule type: {label}, "
                             f"CFG scale: 7, Seed: 1, {written}Version: v1.10.1").flags
  assert flags["brownian"] == "nv"
  options = {**json.loads(flags["scheduler_options"]),
             **outputs.schedule_type_options(flags["schedule_type"])}
  ours = _brownian(get_scheduler(outputs.scheduler_name(flags["scheduler"]), SD15,
                                 options=options))
  state = ours.set_timesteps(6, sample_shape=SHAPE)
  init, noises = make_noises(len(state.timesteps))
  got = sdjax_trajectory(ours, 6, init, noises)
  placed = kd.get_sigmas_karras if label == "Automatic" else kd.get_sigmas_exponential
  sigmas = placed(SD15, 6)
  np.testing.assert_allclose(float(ours.init_noise_sigma(state)), float(sigmas[0]), rtol=1e-6)
  with correctly_rounded_sqrt():
    want = kd.sample_dpmpp_sde(SD15, sigmas, torch.from_numpy(init) * sigmas[0],
                               [torch.from_numpy(n) * s_noise for n in noises], eta=eta)
  err = max_rel_error(got, want)
  print(f"maxrel DPM++ SDE {label} eta {eta} s_noise {s_noise} vs k-diffusion: {err:.3g}")
  assert err <= TOL, err
  assert ours.cfg.get("eta", 1.0) == eta and ours.cfg["s_noise"] == s_noise


@pytest.mark.parametrize(("steps", "eta"), [(6, 1.0), (20, 1.0), (6, 0.4), (20, 0.0)])
@pytest.mark.parametrize("sampler", ["DPM++ 2M SDE", "DPM++ 2M SDE Heun"])
def test_dpmpp_2m_sde_as_k_diffusion(sampler, steps, eta):
  """A1111's DPM++ 2M SDE (Heun) with its Automatic schedule (Exponential) as `reproduce` sets
  it: k-diffusion's loop given each step's noise (the Brownian tree's answer under --brownian),
  in DPM-Solver's variance-preserving form; A1111's Eta the share of fresh noise."""
  ours, state, got, _, init, noises = _as_a1111_ran_it(
      sampler, "Automatic", steps, extra=f"Eta: {eta}, " if eta != 1 else "")
  sigmas = kd.get_sigmas_exponential(SD15, steps)
  with correctly_rounded_sqrt():
    want = kd.sample_dpmpp_2m_sde(SD15, sigmas, torch.from_numpy(init) * sigmas[0],
                                  [torch.from_numpy(n) for n in noises], eta=eta,
                                  solver_type="heun" if sampler.endswith("Heun") else "midpoint")
  want = (want / np.sqrt(sigmas[1:].numpy().astype(np.float64) ** 2 + 1)[:, None, None, None,
                                                                          None]).astype(np.float32)
  err = max_rel_error(got, want)
  print(f"maxrel {sampler} {steps} steps eta {eta} vs k-diffusion: {err:.3g}")
  assert err <= TOL, err


@pytest.mark.parametrize(("steps", "eta"), [(6, 1.0), (20, 1.0), (20, 0.5)])
def test_dpmpp_3m_sde_as_k_diffusion(steps, eta):
  """A1111's DPM++ 3M SDE (Automatic: Exponential levels of one step more, the penultimate
  dropped) as `reproduce` sets it: k-diffusion's loop given each step's noise; Eta its share of
  fresh noise (k-diffusion's form only: diffusers' 3M SDE has none)."""
  ours, state, got, _, init, noises = _as_a1111_ran_it(
      "DPM++ 3M SDE", "Automatic", steps, extra=f"Eta: {eta}, " if eta != 1 else "")
  sigmas = kd.discard_penultimate(kd.get_sigmas_exponential(SD15, steps + 1))
  with correctly_rounded_sqrt():
    want = kd.sample_dpmpp_3m_sde(SD15, sigmas, torch.from_numpy(init) * sigmas[0],
                                  [torch.from_numpy(n) for n in noises], eta=eta)
  want = (want / np.sqrt(sigmas[1:].numpy().astype(np.float64) ** 2 + 1)[:, None, None, None,
                                                                          None]).astype(np.float32)
  err = max_rel_error(got, want)
  print(f"maxrel DPM++ 3M SDE {steps} steps eta {eta} vs k-diffusion: {err:.3g}")
  assert err <= TOL, err
  if eta != 1:
    with pytest.raises(SchedulerConfigError, match="set k_diffusion too"):
      get_scheduler("dpmpp_3m_sde", SD15, options={"eta": eta})


@pytest.mark.parametrize("label", ["Uniform", "Karras"])
def test_dpmpp_3m_sde_as_comfyui(label, monkeypatch):
  """ComfyUI's DPM++ 3M SDE (the `comfyui` option): k-diffusion's loop over its levels as they
  are (A1111 drops the penultimate, ComfyUI does not). Its third-order step divides differences
  of x0 predictions by step ratios (0.2 at the last step of these 10), which brings any float32
  rounding back ~10x in both loops; so both are held to k-diffusion's loop in float64 (around
  the float32 model): sdjax's error within 3x k-diffusion's own float32 error."""
  options = {"timestep_spacing": "linspace", "k_diffusion": True, "comfyui": True,
             **outputs.schedule_type_options(label)}
  ours = get_scheduler("dpmpp_3m_sde", SD15, options=options)
  state = ours.set_timesteps(10, sample_shape=SHAPE)
  sigmas = (kd.get_sigmas if label == "Uniform" else kd.get_sigmas_karras)(COMFY15, 10)
  np.testing.assert_allclose(np.asarray(state.sigmas), sigmas.numpy(), rtol=1e-6)
  init, noises = make_noises(len(state.timesteps))
  got = sdjax_trajectory(ours, 10, init, noises)
  monkeypatch.setattr(kd, "denoiser", _comfyui_denoiser)
  start = torch.sqrt(1.0 + sigmas[0] ** 2.0)
  scale = np.sqrt(sigmas[1:].numpy().astype(np.float64) ** 2 + 1)[:, None, None, None, None]

  def loop(dtype):
    return kd.sample_dpmpp_3m_sde(COMFY15, sigmas.to(dtype), torch.from_numpy(init).to(dtype) * (
        start.to(dtype)), [torch.from_numpy(n).to(dtype) for n in noises]) / scale

  with correctly_rounded_sqrt():
    single = loop(torch.float32)
  exact = loop(torch.float64)
  err, own = max_rel_error(got, exact), max_rel_error(single, exact)
  print(f"maxrel DPM++ 3M SDE {label} vs ComfyUI's loop in float64: {err:.3g} (its float32 "
        f"loop: {own:.3g})")
  assert err <= 3 * own, (err, own)


@pytest.mark.parametrize("label", ["Uniform", "Karras"])
def test_dpmpp_sde_as_comfyui(label, monkeypatch):
  """ComfyUI's dpmpp_sde (the `comfyui` option): k-diffusion's loop from its noise times
  sqrt(1 + sigma_max^2), the UNet at the whole timestep nearest each call's sigma (the
  midpoints' too), each stage given its own noise (the Brownian state)."""
  options = {"timestep_spacing": "linspace", "k_diffusion": True, "comfyui": True,
             **outputs.schedule_type_options(label)}
  plain = get_scheduler("dpmpp_sde", SD15, options=options)

  class Brownian(type(plain)):  # noqa: D101  the state a --brownian run steps with
    def set_timesteps(self, n, sample_shape=None):
      return self.brownian_state(super().set_timesteps(n, sample_shape))

  ours = Brownian(config=plain.config)
  state = ours.set_timesteps(6, sample_shape=SHAPE)
  assert np.array_equal(state.timesteps, np.round(state.timesteps))
  init, noises = make_noises(len(state.timesteps))
  got = sdjax_trajectory(ours, 6, init, noises)
  sigmas = (kd.get_sigmas if label == "Uniform" else kd.get_sigmas_karras)(COMFY15, 6)
  start = float(torch.sqrt(1.0 + sigmas[0] ** 2.0))
  np.testing.assert_allclose(float(ours.init_noise_sigma(state)), start, rtol=1e-6)
  monkeypatch.setattr(kd, "denoiser", _comfyui_denoiser)
  with correctly_rounded_sqrt():
    want = kd.sample_dpmpp_sde(COMFY15, sigmas, torch.from_numpy(init) * start,
                               [torch.from_numpy(n) for n in noises])
  err = max_rel_error(got, want)
  print(f"maxrel DPM++ SDE {label} vs ComfyUI's loop: {err:.3g}")
  assert err <= TOL, err


def _simple_levels(table, n):
  """The Simple schedule over a table: its own levels, every len / n-th from the top, then 0."""
  return torch.tensor([table[-(1 + int(x * len(table) / n))].item() for x in range(n)] + [0.0])


def _against_lcm_loop(ours, state, config, sigmas, start, init, noises, got) -> float:
  """Checks the start's scale and returns (asserting it within TOL) our trajectory's error
  against the LCM loop over `sigmas` from the noise times `start` (its math correctly rounded:
  the timestep it snaps each level to is found in log sigma)."""
  np.testing.assert_allclose(float(ours.init_noise_sigma(state)), float(start), rtol=1e-6)
  with correctly_rounded_math():
    want = kd.sample_lcm(config, sigmas, torch.from_numpy(init) * start,
                         [torch.from_numpy(n) for n in noises])
  err = max_rel_error(got, want)
  assert err <= TOL, err
  return err


@pytest.mark.parametrize("label,steps,extra", [
    (None, 4, ""), ("Automatic", 1, ""), ("Automatic", 2, ""), ("Uniform", 8, ""),
    ("Automatic", 60, ""), ("Karras", 6, ""), ("Exponential", 5, ""), ("Simple", 7, ""),
    ("Automatic", 4, "SGM noise multiplier: True, "),
    ("Automatic", 5, "v1.6.0")])
def test_lcm_as_a1111(label, steps, extra):
  """A1111's LCM sampler (an image's "Sampler: LCM"): lcm in its k_diffusion form runs A1111's
  sample_lcm over its LCMCompVisDenoiser (`k_diffusion_reference.sample_lcm`): the levels of the
  50 distillation timesteps alone, placed by the schedule type (Automatic: evenly in that table,
  timesteps 999 -> 19 for any step count; Karras, Exponential between its extremes; Simple its
  own levels), the UNet at the nearest
  distillation timestep; from an A1111 before 1.7, its float16 alphas_cumprod's table. (Normal
  and SGM Uniform place in the table's index, which A1111 reaches through its timesteps.)"""
  version = extra if extra.startswith("v") else "v1.10.1"
  extra = "" if extra.startswith("v") else extra
  ours, state, got, _, init, noises = _as_a1111_ran_it("LCM", label, steps, extra=extra,
                                                       version=version)
  assert ours.cfg["k_diffusion"] and ours.name == "lcm"
  config = {**SD15, "downcast_alphas_cumprod": version == "v1.6.0"}
  assert bool(ours.cfg.get("downcast_alphas_cumprod")) == config["downcast_alphas_cumprod"]
  table = kd.lcm_sigmas(config)
  if label == "Karras":
    sigmas = kd._karras(steps, table[0].item(), table[-1].item())
  elif label == "Exponential":
    levels = torch.linspace(math.log(table[-1].item()), math.log(table[0].item()), steps).exp()
    sigmas = torch.cat([levels, levels.new_zeros([1])])
  elif label == "Simple":
    sigmas = _simple_levels(table, steps)
  else:
    sigmas = kd.get_sigmas_lcm(config, steps)
  start = torch.sqrt(1.0 + sigmas[0] ** 2.0) if extra else sigmas[0]
  err = _against_lcm_loop(ours, state, config, sigmas, start, init, noises, got)
  print(f"maxrel A1111 LCM {label} {steps} {extra}{version} vs its loop: {err:.3g}")
  if steps == 4 and not extra:  # its timesteps: distillation ones, not diffusers' LCM's
    assert list(np.asarray(state.timesteps)) == [999, 679, 339, 19]


@pytest.mark.parametrize("scheduler,steps", [("normal", 4), ("sgm_uniform", 6), ("karras", 5),
                                             ("simple", 3)])
def test_lcm_as_comfyui(scheduler, steps):
  """ComfyUI's lcm sampler over a ModelSamplingDiscrete "lcm" model (`comfyui.reproduce` sets lcm's
  comfyui form): A1111's loop over ComfyUI's table of the distillation levels (float64 levels in
  float32), its schedulers there (normal: the timesteps 999 -> 19 evenly), from its noise times
  sqrt(1 + sigma_max^2)."""
  ours = get_scheduler("lcm", SD15, options={"k_diffusion": True, "comfyui": True,
                                             "schedule_type": scheduler})
  state = ours.set_timesteps(steps)
  init, noises = make_noises(steps)
  got = sdjax_trajectory(ours, steps, init, noises)
  # sgm_uniform's level at timestep 509, halfway between distillation timesteps 499 and 519,
  # snaps to the one the last bit of its log picks: ComfyUI's choice is its torch's, so the
  # reference's exp and log are correctly rounded, as sdjax's are
  with correctly_rounded_math():
    table = kd.lcm_sigmas(COMFY15)
    if scheduler in ("normal", "sgm_uniform"):
      levels = kd.get_sigmas_lcm(COMFY15, steps + (scheduler == "sgm_uniform"))[:steps]
      sigmas = torch.cat([levels, levels.new_zeros([1])])
    elif scheduler == "karras":
      sigmas = kd._karras(steps, table[0].item(), table[-1].item())
    else:
      sigmas = _simple_levels(table, steps)
  # a run from the largest level (to ComfyUI's rel_tol): its max_denoise start
  assert math.isclose(sigmas[0].item(), table[-1].item(), rel_tol=1e-5)
  start = torch.sqrt(1.0 + sigmas[0] ** 2.0)
  err = _against_lcm_loop(ours, state, COMFY15, sigmas, start, init, noises, got)
  print(f"maxrel ComfyUI lcm {scheduler} {steps} vs its loop: {err:.3g}")
  a1111 = get_scheduler("lcm", SD15, options={"k_diffusion": True}).set_timesteps(steps)
  assert np.abs(np.asarray(a1111.sigma_in) - np.asarray(state.sigma_in)).max() > 0


@pytest.mark.parametrize("strength", [0.5, 0.3])
def test_lcm_img2img_as_a1111(strength):
  """A1111's LCM img2img: k-diffusion's img2img steps (the last int(min(strength, 0.999) * n)
  + 1 of n), the image noised to the first of them by a plain sigma times the noise."""
  steps = 8
  ours = get_scheduler("lcm", SD15, options={"k_diffusion": True})
  total, begin = ours.img2img_steps(steps, strength)
  assert (total, begin) == (steps, steps - int(strength * steps) - 1)
  init, noises = make_noises(steps)
  image = np.random.default_rng(3).standard_normal(SHAPE).astype(np.float32)
  got = sdjax_trajectory(ours, steps, init, noises, begin=begin, init_sample=image)
  sigmas = kd.get_sigmas_lcm(SD15, steps)[begin:]
  with correctly_rounded_sqrt():
    want = kd.sample_lcm(SD15, sigmas, torch.from_numpy(image) + torch.from_numpy(init) * sigmas[0],
                         [torch.from_numpy(n) for n in noises[begin:]])
  err = max_rel_error(got, want)
  print(f"maxrel A1111 LCM img2img {strength}: {err:.3g}")
  assert err <= TOL, err


def test_lcm_k_diffusion_options():
  """What only A1111's LCM form takes is refused without it; its form takes epsilon models only
  (it reads the output as noise) and places its own levels."""
  for options, match in (({"schedule_type": "simple"}, "set k_diffusion too"),
                         ({"schedule_type": "karras"}, "has no karras spacing"),
                         ({"sgm_noise_multiplier": True}, "set k_diffusion too"),
                         ({"k_diffusion": True, "timesteps": [999, 499]}, "not timesteps"),
                         ({"k_diffusion": True, "prediction_type": "v_prediction"},
                          "an epsilon model only")):
    with pytest.raises(SchedulerConfigError, match=match):
      get_scheduler("lcm", SD15, options=options)
  diffusers_form = get_scheduler("lcm", SD15).set_timesteps(4)
  assert list(np.asarray(diffusers_form.timesteps)) == [999, 759, 499, 259]
  assert float(diffusers_form.init_sigma) == 1.0
  np.testing.assert_array_equal(np.asarray(diffusers_form.input_scale), 1.0)


def _beta_levels(n, low, high, alpha, beta):
  """A1111's beta_scheduler: levels at Beta(alpha, beta) quantiles between low and high, then 0."""
  from scipy import stats  # noqa: PLC0415

  levels = [low + x * (high - low) for x in stats.beta.ppf(1 - np.linspace(0, 1, n), alpha, beta)]
  return torch.FloatTensor([*levels, 0.0])


def _timestep_levels(n, low, high, sgm):
  """A1111's SGM Uniform (`sgm`) or Normal between `low` and `high`, written out: k-diffusion's
  sigma_to_t of each end and t_to_sigma of n (SGM: the first n of n + 1) timesteps evenly
  between, in float32, then 0."""
  log_sigmas = kd.train_log_sigmas(SD15).float()

  def to_t(sigma):
    log_sigma = torch.tensor(sigma, dtype=torch.float32).log()
    below = (log_sigma - log_sigmas[:, None]).ge(0).cumsum(dim=0).argmax(dim=0)
    low_idx = below.clamp(max=log_sigmas.shape[0] - 2)
    lo, hi = log_sigmas[low_idx], log_sigmas[low_idx + 1]
    w = ((lo - log_sigma) / (lo - hi)).clamp(0, 1)
    return ((1 - w) * low_idx + w * (low_idx + 1)).reshape(())

  t = torch.linspace(to_t(high), to_t(low), n + sgm)[:n]
  w = t.frac()
  levels = ((1 - w) * log_sigmas[t.floor().long()] + w * log_sigmas[t.ceil().long()]).exp()
  return torch.cat([levels, torch.zeros(1)])


@pytest.mark.parametrize(("label", "extra"), [
    ("Karras", "Schedule min sigma: 0.1, Schedule max sigma: 10.0, Schedule rho: 5.0, "),
    ("Polyexponential", "Schedule max sigma: 8.0, Schedule rho: 2.0, "),
    ("Exponential", "Schedule min sigma: 0.05, "),
    ("Beta", "Beta schedule alpha: 0.5, Beta schedule beta: 0.7, Schedule max sigma: 12.0, "),
    ("SGM Uniform", "Schedule min sigma: 0.1, Schedule max sigma: 10.0, "),
    ("Normal", "Schedule min sigma: 0.2, Schedule max sigma: 8.0, "),
])
@pytest.mark.parametrize("sampler", ["Euler", "DPM++ 2M"])
def test_a1111_schedule_settings(sampler, label, extra):
  """A1111's schedule settings (its sigma min / max, rho, Beta's alpha and beta; the image's
  Schedule min sigma, ...): the schedule options of the same meaning, which place the levels as
  k-diffusion's and A1111's schedule functions do with them."""
  flags = infotext.reproduce(f"a cat\nSteps: 8, Sampler: {sampler}, Schedule type: {label}, "
                             f"CFG scale: 7, Seed: 1, {extra}Version: v1.10.1").flags
  options = {**json.loads(flags["scheduler_options"]),
             **outputs.schedule_type_options(flags["schedule_type"])}
  ours = get_scheduler(outputs.scheduler_name(sampler), SD15, options=options)
  levels = ours.a1111_levels(ours.set_timesteps(8, sample_shape=SHAPE))
  table = kd.train_sigmas(SD15)
  low, high = options.get("schedule_sigma_min", table[0].item()), options.get(
      "schedule_sigma_max", table[-1].item())
  rho = options.get("schedule_rho")
  if label == "Karras":
    want = kd._karras(8, low, high, rho)
  elif label == "Polyexponential":
    ramp = torch.linspace(1, 0, 8) ** rho
    want = torch.exp(ramp * (math.log(high) - math.log(low)) + math.log(low))
  elif label == "Exponential":
    want = torch.linspace(math.log(high), math.log(low), 8).exp()
  elif label == "Beta":
    want = _beta_levels(8, low, high, 0.5, 0.7)
  else:  # the ends' timesteps off the table, evenly between, their levels
    want = _timestep_levels(8, low, high, label == "SGM Uniform")
  np.testing.assert_allclose(levels, want.numpy()[:8], rtol=1e-6)
  default = get_scheduler(outputs.scheduler_name(sampler), SD15, options={
      k: v for k, v in options.items() if not k.startswith("schedule_") or k == "schedule_type"})
  assert np.abs(default.a1111_levels(default.set_timesteps(8, sample_shape=SHAPE))
                - levels).max() > 1e-3


def test_a1111_schedule_settings_notes_and_checks():
  """Beta's default shape (A1111 writes it always) sets nothing; a sampler without schedule types
  (DDIM) gets a note; bad values are refused."""
  found = infotext.reproduce("a cat\nSteps: 8, Sampler: Euler, Schedule type: Beta, CFG scale: 7, "
                             "Seed: 1, Beta schedule alpha: 0.6, Beta schedule beta: 0.6")
  assert not [k for k in json.loads(found.flags["scheduler_options"]) if k.startswith("schedule_")]
  assert not [t for _, t in found.notes if "Beta schedule" in t]
  found = infotext.reproduce("a cat\nSteps: 8, Sampler: DDIM, CFG scale: 7, Seed: 1, Schedule rho: "
                             "5.0")
  assert "Schedule rho: 5.0: sdjax's ddim places its noise levels without them" in dict(
      found.notes)["scheduler"]
  for bad, match in (({"schedule_rho": 0}, "schedule_rho must be a number > 0"),
                     ({"schedule_sigma_min": 5.0, "schedule_sigma_max": 1.0}, "must be below")):
    with pytest.raises(SchedulerConfigError, match=match):
      get_scheduler("euler", SD15, options={"schedule_type": "karras", **bad})
  with pytest.raises(SchedulerConfigError, match="no option 'schedule_rho'"):
    get_scheduler("ddim", SD15, options={"schedule_rho": 5.0})


@pytest.mark.parametrize("sampler", ["Euler", "Euler a", "Heun", "LMS", "DPM++ 2M", "DPM2",
                                     "DPM++ 2S a", "DPM++ 2M SDE", "DPM++ 3M SDE", "iPNDM",
                                     "iPNDM_v", "Res Multistep", "DEIS", "SEEDS 2", "ER SDE",
                                     "Gradient Estimation", "k_ddpm"])
def test_comfyui_handoff_at_a_step(sampler, monkeypatch):
  """A run handed on after step k (an SDXL base to its refiner, `refiner_start=k`): ComfyUI's
  pair of KSamplerAdvanced, the first over levels 0..k (its end_at_step, leftover noise kept),
  the second over levels k.. from those latents as they are (start_at_step, add_noise off), each
  loop's history its own (LMS's order counted from its start). Not Heun++ (its steps depend on
  where its run ends) nor UniPC (its lower orders too): `comfyui.reproduce` says so."""
  steps, k = 10, 6
  vp = outputs.scheduler_name(sampler).startswith(("dpmpp_2m", "dpmpp_3m"))
  ours = get_scheduler(outputs.scheduler_name(sampler), SD15, options={
      "timestep_spacing": "linspace", "k_diffusion": True, "comfyui": True,
      "schedule_type": "karras"})
  state = ours.set_timesteps(steps, sample_shape=SHAPE)
  switch = ours.step_position(state, k)
  init, noises = make_noises(len(state.timesteps))
  first = sdjax_trajectory(ours, steps, init, noises, end=switch)
  got = sdjax_trajectory(ours, steps, init, noises, begin=switch, init_latents=first[-1])
  sigmas = kd.get_sigmas_karras(COMFY15, steps)
  monkeypatch.setattr(kd, "denoiser", _comfyui_denoiser)
  noises = [torch.from_numpy(n) for n in noises]
  with correctly_rounded_sqrt():
    base = SAMPLERS[sampler](COMFY15, sigmas[:k + 1], torch.from_numpy(init) * torch.sqrt(
        1.0 + sigmas[0] ** 2.0), noises[:switch])
    want = SAMPLERS[sampler](COMFY15, sigmas[k:], torch.from_numpy(base[-1]), noises[switch:])
  if vp:
    want = (want / np.sqrt(sigmas[k + 1:].numpy().astype(np.float64) ** 2 + 1)[
        :, None, None, None, None]).astype(np.float32)
  err = max_rel_error(got, want)
  print(f"maxrel {sampler} handed on at step {k}: {err:.3g}")
  assert err <= TOL, err


@pytest.mark.parametrize("sampler", ["Euler", "DPM++ 2M", "Heun"])
@pytest.mark.parametrize("at", [0.8, 0.35, 0.97])
def test_a1111_refiner_switch_position(sampler, at):
  """A1111's refiner switch (its apply_refiner, without "by sampling steps"): the first
  denoiser call whose sigma's nearest entry t in its model's sigmas has (999 - t) / 1000 >= the
  switch in float32 (Heun's second call at the next level can switch mid-step)."""
  steps = 12
  ours, state, _, sigmas, _, _ = _as_a1111_ran_it(sampler, "Karras", steps)
  calls = []  # the sigma of each denoiser call, as k-diffusion's loops make them
  for i in range(steps):
    calls.append(sigmas[i])
    if sampler == "Heun" and sigmas[i + 1] > 0:
      calls.append(sigmas[i + 1])
  table = kd.train_sigmas(SD15)
  done = [(999 - torch.argmin((table - s).abs())) / 1000 for s in calls]
  want = next(i for i, d in enumerate(done) if not bool(d < at))
  assert sampling.a1111_switch_position(ours, state, at) == want
  assert sampling.a1111_switch_position(ours, state, 5) == ours.step_position(state, 5)


@pytest.mark.parametrize(("sampler", "eta"), [("sa_solver", 1.0), ("sa_solver", 0.0),
                                           ("sa_solver_pece", 0.7)])
def test_sa_solver_draws_where_comfyui_does(sampler, eta, monkeypatch):
  """ComfyUI's sa_solver draws step noise only for the steps to a level between the training
  levels at 20% and 80% (tau = eta > 0 there): `noise_draw` counts those draws, so a generator's
  k-th draw is the one its loop adds at its k-th such step (eta 0: an ODE, no draws; PECE: at a
  step's second call). Levels that end above 0 (a --sigmas list): no lower orders at the end,
  and the run ends, as its loop, on the last corrected sample."""
  options = {"timestep_spacing": "linspace", "k_diffusion": True, "comfyui": True, "eta": eta}
  pece = sampler == "sa_solver_pece"
  ours = get_scheduler(sampler, SD15, options={**options, "schedule_type": "karras"})
  steps = 12
  calls = len(ours.set_timesteps(steps, sample_shape=SHAPE).timesteps)
  init, draws = make_noises(calls)
  draw = [int(ours.noise_draw(i, calls)) for i in range(calls + 1)]
  assert (draw[-1] == 0) if eta == 0 else (0 < draw[-1] < steps - 1)  # some steps draw
  got = sdjax_trajectory(ours, steps, init, np.stack([draws[min(k, calls - 1)]
                                                      for k in draw[:-1]]))
  sigmas = kd.get_sigmas_karras(COMFY15, steps)
  monkeypatch.setattr(kd, "denoiser", _comfyui_denoiser)
  drawn = iter([torch.from_numpy(n) for n in draws])
  with correctly_rounded_sqrt():
    want = kd.sample_sa_solver(COMFY15, sigmas, torch.from_numpy(init) * torch.sqrt(
        1.0 + sigmas[0] ** 2.0), None, eta=eta, draws=drawn, pece=pece)
  assert len(list(drawn)) == calls - draw[-1]  # its loop drew as many
  err = max_rel_error(got, want)
  print(f"maxrel {sampler} eta {eta}: {err:.3g}")
  assert err <= TOL, err
  levels = [8.0, 3.0, 1.5, 0.7, 0.3, 0.1]  # ending above 0
  above = get_scheduler(sampler, SD15, options={**options, "sigmas": levels})
  got = sdjax_trajectory(above, 5, init, draws)
  with correctly_rounded_sqrt():
    want = kd.sample_sa_solver(COMFY15, torch.tensor(levels), torch.from_numpy(init) * 8.0,
                               [torch.from_numpy(n) for n in draws], eta=eta, pece=pece)
  err = max_rel_error(got, want)
  assert err <= TOL, err


def test_sa_solver_weights_and_comfyuis_float32_solve(monkeypatch):
  """SA-Solver's weights solve a Vandermonde system in lambda, ill-conditioned as the levels
  crowd: sdjax solves it in float64 (its loop then within 1e-6 of the exact weights'), ComfyUI
  in float32 torch, whose weights drift from them as steps grow (up to 3e-3 at 40 steps, and by
  device): its own loop within 1e-6 of sdjax's at 10 steps, 1.2e-5 at 30."""
  monkeypatch.setattr(kd, "denoiser", _comfyui_denoiser)
  ours = get_scheduler("sa_solver", SD15, options={
      "timestep_spacing": "linspace", "k_diffusion": True, "comfyui": True,
      "schedule_type": "karras"})
  for steps, bound in ((10, TOL), (30, 3e-5)):
    init, noises = make_noises(steps)
    got = sdjax_trajectory(ours, steps, init, noises)
    sigmas = kd.get_sigmas_karras(COMFY15, steps)
    errs = []
    for exact in (True, False):
      with correctly_rounded_sqrt():
        want = kd.sample_sa_solver(COMFY15, sigmas, torch.from_numpy(init) * torch.sqrt(
            1.0 + sigmas[0] ** 2.0), [torch.from_numpy(n) for n in noises], exact=exact)
      errs.append(max_rel_error(got, want))
    print(f"maxrel sa_solver {steps} steps: exact weights {errs[0]:.3g}, float32 {errs[1]:.3g}")
    assert errs[0] <= TOL and errs[1] <= bound, errs


@pytest.mark.parametrize(("steps", "eta", "label"), [(9, 0.5, "SGM Uniform"), (12, 0.0, "Karras"),
                                                   (7, 1.0, "Automatic")])
def test_a1111_dpm_fast(steps, eta, label):
  """A1111's "DPM fast" at its Eta (text-to-image): k-diffusion's dpm_solver_fast from the
  training schedule's largest level to its smallest, whatever the schedule type (which sets the
  starting noise only), each step to its ancestral sigma_down, then fresh noise: one draw a step
  (`noise_draw`: the k-th after step k's last call). At Eta 0, ComfyUI's dpm_fast between the
  same levels."""
  extra = f"Eta: {eta}, " if eta != 1.0 else ""
  ours, state, got, sigmas, init, noises = _as_a1111_ran_it("DPM fast", label, steps,
                                                             extra=extra)
  with correctly_rounded_sqrt():
    want = kd.sample_dpm_fast(SD15, sigmas, torch.from_numpy(init) * sigmas[0],
                              [torch.from_numpy(n) for n in noises], eta=eta, extremes=True)
  err = max_rel_error(got, want)
  print(f"maxrel DPM fast {steps} steps eta {eta}: {err:.3g}")
  assert err <= TOL, err
  firsts = [ours.starts_step(state, i) for i in range(len(state.timesteps))]
  ends = [i for i in range(len(firsts)) if i + 1 == len(firsts) or firsts[i + 1]]
  assert [ours.noise_draw(i, steps) for i in ends] == list(range(len(ends)))
  assert ours.noise_draw(steps, steps) == len(ends) and len(ends) == steps // 3 + 1
  if eta == 0.0:  # ComfyUI's dpm_fast over levels of those ends
    table = train_sigmas(train_alphas_cumprod({**SD15, "k_diffusion": True}))
    comfy = get_scheduler("dpm_fast", SD15, options={
        "timestep_spacing": "linspace", "k_diffusion": True,
        "sigmas": [*np.geomspace(float(table[-1]), float(table[0]), steps).tolist(), 0.0]})
    assert max_rel_error(sdjax_trajectory(comfy, steps, init, noises), got) <= TOL


@pytest.mark.parametrize(("kind", "stages", "eta"), [("reverse_time_sde", 3, 1.0),
                                                     ("reverse_time_sde", 2, 0.5),
                                                     ("ode", 3, 1.0), ("er_sde", 1, 1.0),
                                                     ("reverse_time_sde", 3, 0.0)])
def test_er_sde_solver_types(kind, stages, eta, monkeypatch):
  """ComfyUI's SamplerER_SDE settings as er_sde's options: its reverse-time SDE (noise scaler
  lambda^(eta + 1)), its ODE (lambda, no noise: none drawn, as at eta 0), fewer stages."""
  ours = get_scheduler("er_sde", SD15, options={
      "timestep_spacing": "linspace", "k_diffusion": True, "comfyui": True,
      "schedule_type": "karras", "er_sde_type": kind, "max_stage": stages, "eta": eta})
  assert ours.needs_noise == (kind == "er_sde" or (kind == "reverse_time_sde" and eta > 0))
  steps = 8
  init, noises = make_noises(steps)
  got = sdjax_trajectory(ours, steps, init, noises)
  sigmas = kd.get_sigmas_karras(COMFY15, steps)
  monkeypatch.setattr(kd, "denoiser", _comfyui_denoiser)
  label = {"reverse_time_sde": "Reverse-time SDE", "ode": "ODE", "er_sde": "ER-SDE"}[kind]
  with correctly_rounded_sqrt():
    want = kd.sample_er_sde(COMFY15, sigmas, torch.from_numpy(init) * torch.sqrt(
        1.0 + sigmas[0] ** 2.0), [torch.from_numpy(n) for n in noises], solver_type=label,
        max_stage=stages, eta=eta)
  err = max_rel_error(got, want)
  print(f"maxrel er_sde {kind} stages {stages} eta {eta}: {err:.3g}")
  assert err <= TOL, err
  with pytest.raises(SchedulerConfigError, match="er_sde_type"):
    get_scheduler("er_sde", SD15, options={"er_sde_type": "sde"})
  with pytest.raises(SchedulerConfigError, match="max_stage"):
    get_scheduler("er_sde", SD15, options={"max_stage": 4})


@pytest.mark.parametrize(("strength", "eta", "label"), [(0.6, 1.0, "Karras"), (1.0, 0.5, None)])
def test_a1111_dpm_fast_img2img(strength, eta, label):
  """A1111's "DPM fast" img2img (and hires pass): its sample_img2img's plan between the levels
  it keeps (the last t_enc + 2 of the schedule, t_enc = int(min(strength, 0.999) * steps)),
  from the image noised to the first of them: not the training extremes of its text-to-image,
  even at strength 1 (`planned_from`)."""
  steps = 10
  typed = f", Schedule type: {label}" if label else ""
  flags = infotext.reproduce(f"a cat\nSteps: {steps}, Sampler: DPM fast{typed}, CFG scale: 7, "
                             f"Seed: 1, Eta: {eta}, Version: v1.10.1").flags
  options = {**json.loads(flags["scheduler_options"]),
             **outputs.schedule_type_options(flags["schedule_type"])}
  ours = get_scheduler(outputs.scheduler_name(flags["scheduler"]), SD15, options=options)
  _, got, init, noises, image, first = _planned_img2img(ours, steps, strength)
  placed = kd.get_sigmas if label is None else kd.get_sigmas_karras
  kept = placed(SD15, steps)[first:]
  with correctly_rounded_sqrt():
    want = kd.sample_dpm_fast(SD15, kept, torch.from_numpy(image) + torch.from_numpy(init)
                              * kept[0], [torch.from_numpy(n) for n in noises], eta=eta)
  err = max_rel_error(got, want)
  print(f"maxrel A1111 DPM fast img2img {strength} eta {eta}: {err:.3g}")
  assert err <= TOL, err


@pytest.mark.parametrize(("sampler", "settings"), [
    ("sa_solver", {"predictor_order": 2, "corrector_order": 2, "simple_order_2": True}),
    ("sa_solver", {"predictor_order": 5, "corrector_order": 0, "sde_start_percent": 0.1,
                   "sde_end_percent": 0.5}),
    ("sa_solver_pece", {"predictor_order": 1, "corrector_order": 6}),
])
def test_sa_solver_settings(sampler, settings, monkeypatch):
  """ComfyUI's SamplerSASolver settings as sa_solver's options (its orders, simple order-2
  weights, the SDE's interval in percents of training time), config that shapes the program."""
  ours = get_scheduler(sampler, SD15, options={
      "timestep_spacing": "linspace", "k_diffusion": True, "comfyui": True,
      "schedule_type": "karras", **settings})
  assert ours.program().cfg["predictor_order"] == settings["predictor_order"]
  steps = 10
  calls = len(ours.set_timesteps(steps, sample_shape=SHAPE).timesteps)
  init, noises = make_noises(calls)
  got = sdjax_trajectory(ours, steps, init, noises)
  sigmas = kd.get_sigmas_karras(COMFY15, steps)
  monkeypatch.setattr(kd, "denoiser", _comfyui_denoiser)
  names = {"sde_start_percent": "start", "sde_end_percent": "end"}
  with correctly_rounded_sqrt():
    want = kd.sample_sa_solver(COMFY15, sigmas, torch.from_numpy(init) * torch.sqrt(
        1.0 + sigmas[0] ** 2.0), [torch.from_numpy(n) for n in noises],
        pece=sampler == "sa_solver_pece", **{names.get(k, k): v for k, v in settings.items()})
  err = max_rel_error(got, want)
  print(f"maxrel {sampler} {settings}: {err:.3g}")
  assert err <= TOL, err
  with pytest.raises(SchedulerConfigError, match="corrector_order"):
    get_scheduler("sa_solver_pece", SD15, options={"corrector_order": 0})


def _dpm_adaptive(options: dict, steps: int, init: np.ndarray, name: str = "dpm_adaptive",
                  noises=None, strength: float | None = None, image=None):
  """sdjax's dpm_adaptive run of `init` (unit noise [B, ...]) under `options`, each row's model
  calls the fake UNet on that row alone, its k-th step draw `noises[row, k]`: (the end latents,
  the state). With `strength`, an img2img run from `image` (as `sampling` plans one)."""

  ours = get_scheduler(name, SD15, options=options)
  if strength is not None:
    total, first = ours.img2img_steps(steps, strength)
    ours, begin = ours.planned_from(first)
    assert begin == 0 and total == steps
  state = ours.set_timesteps(steps, sample_shape=init.shape)
  program = ours.program()

  def rows(x, t):
    return np.concatenate([fake_model(np.asarray(x[i:i + 1]), float(t[i]))
                           for i in range(len(x))])

  def model(x, t, call=None):
    del call  # the run's call count (prompt editing's), which the fake UNet does not take
    return jax.pure_callback(rows, jax.ShapeDtypeStruct(x.shape, np.float32), x, t)

  def noise(k):
    return jax.vmap(lambda table, i: table[i])(jnp.asarray(noises), k)

  start = 0.0 if image is None else image
  run = jax.jit(lambda state, x: program.run(state, start + x * program.init_noise_sigma(state),
                                             model, noise if noises is not None else None))
  return np.asarray(run(state, init)), state


@pytest.mark.parametrize(("form", "order", "label", "extra"), [
    ("comfyui", 3, "Karras", {}), ("comfyui", 2, "Uniform", {"rtol": 0.1, "h_init": 0.2}),
    ("a1111", 3, "Uniform", {"pcoeff": 0.3, "dcoeff": 0.1, "accept_safety": 0.9}),
    ("a1111", 3, "Karras", {"prediction_type": "v_prediction"})])
def test_dpm_adaptive_as_k_diffusion(form, order, label, extra, monkeypatch):
  """ComfyUI's dpm_adaptive: k-diffusion's dpm_solver_adaptive (eta 0) from the run's first
  level to its smallest above 0, each image alone (a batch of two here, each row its own step
  sizes, equal to k-diffusion's run of that image by itself); ComfyUI's whole timesteps and
  start, or k-diffusion's interpolated ones; its settings as options."""
  comfyui = form == "comfyui"
  config = {**(COMFY15 if comfyui else SD15),
            **{k: v for k, v in extra.items() if k == "prediction_type"}}
  settings = {k: v for k, v in extra.items() if k != "prediction_type"}
  options = {"timestep_spacing": "linspace", "k_diffusion": True, "adaptive_order": order,
             **settings, **outputs.schedule_type_options(label),
             **({"comfyui": True} if comfyui else {})}
  steps = 10
  init, _ = make_noises(1)
  got, state = _dpm_adaptive({**options, **({"prediction_type": "v_prediction"}
                                            if "prediction_type" in extra else {})}, steps, init)
  sigmas = (kd.get_sigmas_karras if label == "Karras" else kd.get_sigmas)(config, steps)
  start = float(torch.sqrt(1.0 + sigmas[0] ** 2.0)) if comfyui else float(sigmas[0])
  if comfyui:
    monkeypatch.setattr(kd, "denoiser", _comfyui_denoiser)
  worst, attempts = 0.0, []
  for row in range(len(init)):
    with correctly_rounded_sqrt():
      want, ends, rejected = kd.sample_dpm_adaptive(
          config, sigmas, torch.from_numpy(init[row:row + 1]) * start, order=order, **settings)
    attempts.append((len(ends), rejected))
    worst = max(worst, max_rel_error(got[row:row + 1][None], want.numpy()[None]))
  print(f"maxrel dpm_adaptive {form} order {order} {label}: {worst:.3g}, (steps, rejected) "
        f"{attempts}")
  assert worst <= TOL, worst
  assert min(steps for steps, _ in attempts) >= 5 and any(rejected for _, rejected in attempts)


def test_dpm_adaptive_settings_checked():
  for options, match in (({"adaptive_order": 4}, "adaptive_order must be 2 or 3"),
                         ({"rtol": 0, "atol": 0}, "not both 0"),
                         ({"h_init": "big"}, "h_init must be a number"),
                         ({"icoeff": 0}, "must not be 0")):
    with pytest.raises(SchedulerConfigError, match=match):
      get_scheduler("dpm_adaptive", SD15, options=options)
  with pytest.raises(SchedulerConfigError, match="rtol"):  # another sampler's: unknown there
    get_scheduler("dpm_fast", SD15, options={"rtol": 0.1})
  ours = get_scheduler("dpm_adaptive", SD15, options={"schedule_type": "karras"})
  with pytest.raises(ValueError, match="runs its own loop"):
    ours.step(ours.set_timesteps(4, sample_shape=SHAPE), None, 0, None)


@pytest.mark.parametrize(("eta", "label", "s_noise"), [(1.0, "Automatic", 1.0),
                                                       (0.5, "Karras", 1.2), (0.0, "Karras", 1.0)])
def test_a1111_dpm_adaptive(eta, label, s_noise):
  """A1111's "DPM adaptive" at its Eta (text-to-image): k-diffusion's dpm_solver_adaptive from
  the training schedule's largest level to its smallest, whatever the schedule type (which sets
  the starting noise only), each accepted step to its ancestral sigma_down, then fresh noise,
  the controller at order 1.5; each row its own draws (the k-th at its k-th accepted step).
  Within 5e-6, not TOL: its levels come from XLA's float32 log, exp and expm1 on device, which
  miss the correctly rounded value for 7%, 9% and 67% of inputs (torch's: under 0.1%), and the
  step-size controller carries an ulp on (2.3e-6 at Eta 0.5; the loop's float32 controller
  alone moves k-diffusion's result by 6.5e-7)."""
  steps = 8
  options = {"timestep_spacing": "linspace", "k_diffusion": True, "eta": eta, "s_noise": s_noise,
             **outputs.schedule_type_options(label)}
  init, _ = make_noises(1)
  noises = np.random.default_rng(5).standard_normal((len(init), 64, *init.shape[1:]),
                                                    np.float32)
  got, state = _dpm_adaptive(options, steps, init, "dpm_adaptive_ancestral", noises)
  sigmas = (kd.get_sigmas_karras if label == "Karras" else kd.get_sigmas)(SD15, steps)
  worst, counts = 0.0, []
  for row in range(len(init)):
    with correctly_rounded_sqrt():
      want, ends, rejected = kd.sample_dpm_adaptive(
          SD15, sigmas, torch.from_numpy(init[row:row + 1]) * sigmas[0], eta=eta,
          s_noise=s_noise, noises=[torch.from_numpy(n[None]) for n in noises[row]],
          extremes=True)
    counts.append((len(ends), rejected))
    worst = max(worst, max_rel_error(got[row:row + 1][None], want.numpy()[None]))
  print(f"maxrel A1111 DPM adaptive eta {eta} {label}: {worst:.3g}, (steps, rejected) {counts}")
  assert worst <= 5e-6, worst
  assert any(rejected for _, rejected in counts) or eta == 0
  assert outputs.scheduler_name("DPM adaptive") == "dpm_adaptive_ancestral"


def test_a1111_dpm_adaptive_img2img():
  """A1111's "DPM adaptive" img2img (and hires pass) at Eta 1: between the levels it keeps (its
  sample_img2img's, as DPM fast's), from the image noised to the first of them. (It used to
  fail here: the method it shares with DPM fast called super() of DPM fast's class.)"""
  steps, strength = 10, 0.6
  options = {"timestep_spacing": "linspace", "k_diffusion": True, "eta": 1.0,
             **outputs.schedule_type_options("Karras")}
  init, _ = make_noises(1)
  noises = np.random.default_rng(5).standard_normal((len(init), 64, *init.shape[1:]),
                                                    np.float32)
  image = np.random.default_rng(6).standard_normal(init.shape).astype(np.float32)
  got, _ = _dpm_adaptive(options, steps, init, "dpm_adaptive_ancestral", noises, strength, image)
  t_enc = int(min(strength, 0.999) * steps)
  kept = kd.get_sigmas_karras(SD15, steps)[steps - t_enc - 1:]
  worst = 0.0
  for row in range(len(init)):
    with correctly_rounded_sqrt():
      want, ends, _ = kd.sample_dpm_adaptive(
          SD15, kept, torch.from_numpy(image[row:row + 1] + init[row:row + 1] * float(kept[0])),
          eta=1.0, noises=[torch.from_numpy(n[None]) for n in noises[row]])
    worst = max(worst, max_rel_error(got[row:row + 1][None], want.numpy()[None]))
  print(f"maxrel A1111 DPM adaptive img2img: {worst:.3g}, {len(ends)} steps")
  assert worst <= 5e-6, worst


def _blended_trajectory(sched, blend, state, x, step_noises, first: int = 0) -> np.ndarray:
  """The program's scheduler `sched` on the fake model from sample x at position `first`, each
  call's input and output through inpainting `blend` (`sampling._A1111Blend`'s kinds), as
  sampling._denoise runs them; the samples after each step."""

  def model(x, t):
    return jax.pure_callback(lambda xx, tt: fake_model(np.asarray(xx), float(tt)),
                             jax.ShapeDtypeStruct(x.shape, jnp.float32), x, t)

  @jax.jit
  def run(state, x, step_noises):
    def body(carry, inputs):
      x, state = carry
      i, noise = inputs
      noise = sched.step_noise(noise) if sched.needs_noise else None
      if sched.churns:
        x = sched.churn(state, x, i, noise)
      out = model(blend.model_input(state, sched.scale_model_input(state, x, i), i),
                  state.timesteps[i])
      if not blend.into_input:
        out = blend.output(state, x, out, i)
      x, state = sched.step(state, out, i, x, noise)
      return (x, state), x

    idx = jnp.arange(first, len(state.timesteps))
    return jax.lax.scan(body, (x, state), (idx, step_noises[first:]))[1]

  return np.asarray(run(state, x, jnp.asarray(step_noises)))


@pytest.mark.parametrize("sampler", ["Euler", "Euler a", "Heun", "LMS", "DPM2", "DPM2 a",
                                     "DPM++ 2S a", "DPM++ 2M", "DPM++ 2M SDE", "DPM++ 3M SDE",
                                     "Restart", "iPNDM", "Res Multistep", "DEIS", "HeunPP2",
                                     "SEEDS 2", "ER SDE", "Gradient Estimation", "DPM fast",
                                     "DPM++ SDE", "iPNDM_v", "Res Multistep a", "SEEDS 3",
                                     "k_ddpm", "sa_solver", "sa_solver_pece"])
def test_a1111_inpaint_blend_of_each_family(sampler):
  """A1111's inpainting blend (`sampling._A1111Blend`: inpaint_blend="a1111"): each call's
  denoised prediction, in k-diffusion's x at the call's level, blended with the image's latents
  outside the mask, is k-diffusion's loop with A1111's CFG denoiser blending its output, for the
  sampler's form in sdjax (k-diffusion's, or diffusers' VP form of DPM-Solver; Restart with its
  restarts, from 20 steps; DPM++ SDE with the Brownian tree's stage noises)."""
  steps = 20 if sampler == "Restart" else 10
  ours, state, plain, sigmas, init, noises = _as_a1111_ran_it(
      sampler, None if sampler == "Restart" else "Karras", steps)
  if sampler == "DPM++ SDE":
    ours = _brownian(ours)
    state = ours.set_timesteps(steps, sample_shape=SHAPE)
    plain = sdjax_trajectory(ours, steps, init, noises)
  if sampler == "DPM++ 3M SDE":  # A1111's drops the penultimate level of one step more
    sigmas = kd.discard_penultimate(kd.get_sigmas_karras(SD15, steps + 1))
  rng = np.random.default_rng(0)
  image = rng.standard_normal(SHAPE).astype(np.float32)
  nmask = np.broadcast_to(rng.uniform(size=(*SHAPE[:-1], 1)) > 0.5, SHAPE).astype(np.float32)
  sched = ours.program()
  blend = sampling._A1111Blend(sched, jnp.asarray(nmask), jnp.asarray(image))  # noqa: SLF001
  got = _blended_trajectory(sched, blend, state, jnp.asarray(init) * sched.init_noise_sigma(state),
                            noises)
  inner = kd.denoiser

  def blending(config, timesteps=None):
    denoise = inner(config, timesteps)
    return lambda x, sigma: denoise(x, sigma) * nmask + torch.from_numpy(image) * (1 - nmask)

  with mock.patch.object(kd, "denoiser", blending), correctly_rounded_sqrt():
    want = {**SAMPLERS, "DPM++ SDE": kd.sample_dpmpp_sde}.get(sampler, kd.sample_restart)(
        SD15, sigmas, torch.from_numpy(init) * sigmas[0], [torch.from_numpy(n) for n in noises])
  if sampler in ("DPM++ 2M", "DPM++ 2M SDE", "DPM++ 3M SDE"):  # diffusers' form: x / sqrt(s^2 + 1)
    want = (want / np.sqrt(sigmas[1:].numpy().astype(np.float64) ** 2 + 1)[
        :, None, None, None, None]).astype(np.float32)
  err = max_rel_error(got, want)
  print(f"maxrel {sampler} with A1111's blend vs k-diffusion's: {err:.3g}")
  assert err <= TOL
  assert max_rel_error(plain, want) > 1e-2  # the blend matters


@pytest.mark.parametrize("sampler", ["Euler", "Euler a", "Heun", "DPM2", "DPM++ 2M",
                                     "DPM++ 2M SDE", "DPM++ 2S a", "LMS"])
@pytest.mark.parametrize("denoise", [1.0, 0.6])
def test_comfyui_inpaint_blend(sampler, denoise):
  """inpaint_blend="comfyui" (`sampling._ComfyUIBlend`) is ComfyUI's KSampler over a latent with
  a noise mask, written from its KSamplerX0Inpaint: at each call the input outside the (soft)
  mask is the image's latents plus the call's sigma times the initial noise, the denoised
  prediction of that input is blended with the image's latents, nothing after the loop; the run
  starts at the latents plus the noise times ComfyUI's first level (at denoise 1, sqrt(1 +
  sigma_max^2)). Its loop over its levels, the fake UNet at whole timesteps (`comfyui`)."""
  steps = 8
  options = {"timestep_spacing": "linspace", "k_diffusion": True, "comfyui": True,
             "schedule_type": "karras"}
  ours = get_scheduler(outputs.scheduler_name(sampler), SD15, options=options)
  total, begin = ours.img2img_steps(steps, denoise) if denoise < 1 else (steps, 0)
  state = ours.set_timesteps(total, sample_shape=SHAPE)
  first = ours.step_position(state, begin)
  init, noises = make_noises(len(state.timesteps))
  rng = np.random.default_rng(0)
  image = rng.standard_normal(SHAPE).astype(np.float32)
  m = np.broadcast_to(rng.uniform(size=(*SHAPE[:-1], 1)), SHAPE).astype(np.float32)
  sched = ours.program()
  blend = sampling._ComfyUIBlend(sched, jnp.asarray(m), jnp.asarray(image), jnp.asarray(init))  # noqa: SLF001
  if begin:
    start = sched.img2img_noise(state, jnp.asarray(image), jnp.asarray(init), first)
  else:
    start = (jnp.asarray(init) * sched.init_noise_sigma(state)
             + jnp.asarray(image) * blend.sample_scale(state, 0))
  got = _blended_trajectory(sched, blend, state, start, noises, first)
  sigmas = kd.get_sigmas_karras(COMFY15, total)[begin:]
  first_level = torch.sqrt(1.0 + sigmas[0] ** 2.0) if begin == 0 else sigmas[0]
  n, latent, mask = (torch.from_numpy(a) for a in (init, image, m))

  def inpainting(config, timesteps=None):
    denoise_ = _comfyui_denoiser(config, timesteps)

    def call(x, sigma):
      x = x * mask + (latent + n * sigma) * (1 - mask)
      return denoise_(x, sigma) * mask + latent * (1 - mask)

    return call

  with mock.patch.object(kd, "denoiser", inpainting), correctly_rounded_sqrt():
    want = SAMPLERS[sampler](COMFY15, sigmas, latent + n * first_level,
                             [torch.from_numpy(x) for x in noises[first:]])
  if sampler.startswith("DPM++ 2M"):  # diffusers' form: x / sqrt(s^2 + 1)
    want = (want / np.sqrt(sigmas[1:].numpy().astype(np.float64) ** 2 + 1)[
        :, None, None, None, None]).astype(np.float32)
  err = max_rel_error(got, want)
  print(f"maxrel {sampler} at denoise {denoise} with ComfyUI's inpaint blend: {err:.3g}")
  assert err <= TOL


@pytest.mark.parametrize(("name", "reference"), [
    ("deis", "DEISMultistepScheduler"), ("dpmpp_2s", "DPMSolverSinglestepScheduler"),
    ("dpmpp_2m", "DPMSolverMultistepScheduler"), ("unipc", "UniPCMultistepScheduler"),
    ("ddim", "DDIMScheduler"), ("pndm", "PNDMScheduler")])
def test_a1111_inpaint_blend_of_diffusers_forms(name, reference):
  """A1111's blend on diffusers' own schedulers: diffusers' loop whose model output's x0 (a VP
  sample's, at the timestep's alphas_cumprod) is blended with the image outside the mask; for
  DDIM, PLMS (pndm) and UniPC, A1111's timestep samplers, the model's input instead."""
  import diffusers  # noqa: PLC0415

  ref = getattr(diffusers, reference).from_config(SD15)
  ours = get_scheduler(name, SD15)
  state = ours.set_timesteps(10, sample_shape=SHAPE)
  init, noises = make_noises(len(state.timesteps))
  rng = np.random.default_rng(0)
  image = rng.standard_normal(SHAPE).astype(np.float32)
  nmask = np.broadcast_to(rng.uniform(size=(*SHAPE[:-1], 1)) > 0.5, SHAPE).astype(np.float32)
  sched = ours.program()
  blend = sampling._A1111Blend(sched, jnp.asarray(nmask), jnp.asarray(image))  # noqa: SLF001
  assert blend.into_input == (name in ("unipc", "ddim", "pndm"))

  def model(x, t):
    return jax.pure_callback(lambda xx, tt: fake_model(np.asarray(xx), float(tt)),
                             jax.ShapeDtypeStruct(x.shape, jnp.float32), x, t)

  @jax.jit
  def run(state, x):
    def body(carry, i):
      x, state = carry
      x_in = sched.scale_model_input(state, x, i)
      if blend.into_input:
        x_in = blend.keep(x_in)
      out = model(x_in, state.timesteps[i])
      if not blend.into_input:
        out = blend.output(state, x, out, i)
      x, state = sched.step(state, out, i, x, None)
      return (x, state), x

    return jax.lax.scan(body, (x, state), jnp.arange(len(state.timesteps)))[1]

  got = np.asarray(run(state, jnp.asarray(init) * sched.init_noise_sigma(state)))
  alphas = ref.alphas_cumprod.numpy().astype(np.float64)

  def blending(x, t):
    if blend.into_input:
      return fake_model((x * nmask + image * (1 - nmask)).astype(np.float32), t)
    a = alphas[round(t)]
    eps = fake_model(x, t).astype(np.float64)
    x0 = (x - np.sqrt(1 - a) * eps) / np.sqrt(a)
    x0 = x0 * nmask + image * (1 - nmask)
    return ((x - np.sqrt(a) * x0) / np.sqrt(1 - a)).astype(np.float32)

  with mock.patch.object(scheduler_harness, "fake_model", blending), correctly_rounded_sqrt():
    want = diffusers_trajectory(ref, 10, init, noises)
  err = max_rel_error(got, want)
  print(f"maxrel diffusers' {name} with A1111's blend: {err:.3g}")
  assert err <= TOL
  assert max_rel_error(sdjax_trajectory(ours, 10, init, noises), want) > 1e-2


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_a1111_inpaint_blend_keeps_the_prediction_type(prediction_type):
  """The blended model output is the one whose x0, as the scheduler computes it (Euler, in
  k-diffusion's x; DPM-Solver++, a VP sample), is the output's x0 blended with the image."""
  from sdjax.schedulers.euler import predict_original  # noqa: PLC0415

  rng = np.random.default_rng(3)
  x, out, image = (jnp.asarray(rng.standard_normal(SHAPE), jnp.float32) for _ in range(3))
  nmask = jnp.asarray(np.broadcast_to(rng.uniform(size=(*SHAPE[:-1], 1)) > 0.5, SHAPE),
                      jnp.float32)
  config = {**SD15, "prediction_type": prediction_type}
  for name in ("euler", "dpmpp_2m"):
    sched = get_scheduler(name, config, options={"k_diffusion": True}).program()
    state = sched.set_timesteps(6, sample_shape=SHAPE)
    blend = sampling._A1111Blend(sched, nmask, image)  # noqa: SLF001
    for i in (0, 3):
      sigma = float(sched.call_sigmas(state)[i])
      xk = x if name == "euler" else x * np.float32((sigma**2 + 1) ** 0.5)
      v_out, v_den = -sigma / (sigma**2 + 1) ** 0.5, sigma**2 + 1

      def x0(o, xk=xk, sigma=sigma, v_out=v_out, v_den=v_den):
        return predict_original(prediction_type, o, xk, sigma, v_out, v_den)

      np.testing.assert_allclose(x0(blend.output(state, x, out, i)),
                                 x0(out) * nmask + image * (1 - nmask), rtol=0, atol=2e-5)
