"""Custom noise levels (the `sigmas` option), custom timesteps (`timesteps`) and A1111's schedule
types (`schedule_type`).

Parity: diffusers takes custom sigmas directly only in Euler (`set_timesteps(sigmas=...)`); for
the other sigma schedulers its exponential spacing is made to place the same sigmas
(`exponential_placing`), after which diffusers maps them to timesteps and steps as it does for
its own spacings. Custom timesteps go in as diffusers' `set_timesteps(timesteps=...)` (Euler,
Heun, DPM-Solver). Euler ancestral, which takes neither in diffusers, runs diffusers' steps over
the sigmas and timesteps Euler builds from the list. DPM++ SDE's and DPM2's sigma cases are in
their own files (they need those files' noise injection).
The named schedule types have no oracle here (A1111 cannot be installed): their tests check
the definitions' landmarks (published levels, endpoints, training sigmas hit exactly).
"""

from __future__ import annotations

import math

import diffusers
import numpy as np
import pytest
import torch
from diffusers.schedulers import AysSchedules
from scheduler_harness import (
  SHAPE,
  correctly_rounded_sqrt,
  diffusers_trajectory,
  exponential_placing,
  make_noises,
  max_rel_error,
  sdjax_trajectory,
)

from sdjax import testing
from sdjax.schedulers import SchedulerConfigError, get_scheduler
from sdjax.schedulers.euler import train_alphas_cumprod, train_sigmas
from sdjax.schedulers.sigma_schedules import SCHEDULE_TYPES, schedule_sigmas

torch.set_num_threads(1)
SD15 = dict(testing.SCHEDULER_SD15)
TOL = 1e-6
TRAIN_SIGMAS = train_sigmas(train_alphas_cumprod(SD15)).astype(np.float64)
# A hand-made 7-step list, and Align Your Steps' SD1.5 levels interpolated to 8 steps.
HAND = [14.6, 7.5, 3.9, 1.8, 0.8, 0.3, 0.07, 0.0]
AYS8 = schedule_sigmas("align_your_steps", 8, TRAIN_SIGMAS).tolist()


def _run(ours, ref, steps, strength=None):
  """Max relative error of the trajectories (diffusers under correctly rounded square roots);
  asserts that the UNet's timesteps and the sigmas agree."""
  state = ours.set_timesteps(steps, sample_shape=SHAPE)
  init, noises = make_noises(len(state.timesteps))
  begin, init_sample = 0, None
  if strength is not None:
    begin = ours.begin_index(steps, strength)
    init_sample = make_noises(1, seed=1)[0]
  got = sdjax_trajectory(ours, steps, init, noises, begin=begin, init_sample=init_sample)
  with correctly_rounded_sqrt():
    want = diffusers_trajectory(ref, steps, init, noises, begin=begin, init_sample=init_sample)
  np.testing.assert_allclose(np.asarray(state.timesteps), ref.timesteps.numpy(), rtol=1e-6,
                             atol=1e-5)
  if hasattr(state, "sigmas"):
    np.testing.assert_allclose(np.asarray(state.sigmas), ref.sigmas.numpy(), rtol=1e-6, atol=0)
  elif hasattr(state, "sigma_t"):  # UniPC keeps the noise levels as VP coefficients
    np.testing.assert_allclose(np.asarray(state.sigma_t) / np.asarray(state.alpha_t),
                               ref.sigmas.numpy(), rtol=1e-6, atol=0)
  np.testing.assert_allclose(float(ours.init_noise_sigma(state)), float(ref.init_noise_sigma),
                             rtol=1e-6)
  return max_rel_error(got, want)


def _custom(ref, **schedule):
  """`ref`, its set_timesteps(n) taking `sigmas=` or `timesteps=` instead, as diffusers'
  pipelines pass them."""
  set_timesteps = ref.set_timesteps
  ref.set_timesteps = lambda steps, device=None: set_timesteps(device=device, **schedule)
  return ref


@pytest.mark.parametrize("name,ref_cls,options,sigmas,strength", [
  ("heun", diffusers.HeunDiscreteScheduler, {}, HAND, None),
  ("lms", diffusers.LMSDiscreteScheduler, {"prediction_type": "v_prediction"}, AYS8, None),
  ("dpmpp_2m", diffusers.DPMSolverMultistepScheduler, {}, AYS8, None),
  ("dpmpp_2m", diffusers.DPMSolverMultistepScheduler,
   {"final_sigmas_type": "sigma_min", "prediction_type": "v_prediction"}, HAND, 0.5),
  ("dpmpp_3m_sde", diffusers.DPMSolverMultistepScheduler,
   {"algorithm_type": "sde-dpmsolver++", "solver_order": 3}, AYS8, None),
  ("unipc", diffusers.UniPCMultistepScheduler, {}, AYS8, None),
  ("unipc", diffusers.UniPCMultistepScheduler, {"prediction_type": "v_prediction"}, HAND, 0.7),
], ids=["heun", "lms-v", "dpmpp_2m", "dpmpp_2m-sigma_min-v-img2img",
        "dpmpp_3m_sde", "unipc", "unipc-v-img2img"])
def test_custom_sigmas_match_diffusers(name, ref_cls, options, sigmas, strength):
  cfg = dict(SD15, **options)
  ours = get_scheduler(name, cfg, options={"sigmas": sigmas})
  # A custom schedule ends at 0, so the multistep solvers' last step is diffusers' for "zero".
  ref_cfg = dict(cfg, final_sigmas_type="zero") if "final_sigmas_type" in options else cfg
  err = _run(ours, exponential_placing(ref_cls, ref_cfg, sigmas), len(sigmas) - 1, strength)
  print(f"maxrel {name} {options} custom sigmas: {err:.3g}")
  assert err <= TOL, err


@pytest.mark.parametrize("options,sigmas,strength", [
  ({}, AYS8, None),
  ({"prediction_type": "v_prediction", "timestep_spacing": "leading"}, HAND, None),
  ({}, HAND, 0.5),
], ids=["ays", "v-leading", "img2img"])
def test_euler_takes_sigmas_as_diffusers(options, sigmas, strength):
  cfg = dict(SD15, **options)
  ref = _custom(diffusers.EulerDiscreteScheduler.from_config(cfg), sigmas=sigmas)
  err = _run(get_scheduler("euler", cfg, options={"sigmas": sigmas}), ref, len(sigmas) - 1,
             strength)
  print(f"maxrel euler {options} custom sigmas: {err:.3g}")
  assert err <= TOL, err


def test_euler_schedules_may_end_above_zero():
  """KL Optimal ends at the smallest training sigma; Euler (and Euler a) step to it, as
  diffusers' Euler does with such a list."""
  ours = get_scheduler("euler", SD15, options={"schedule_type": "kl_optimal"})
  sigmas = [float(x) for x in np.asarray(ours.set_timesteps(5).sigmas)]
  assert sigmas[-1] == pytest.approx(TRAIN_SIGMAS[0], rel=1e-6)
  ref = _custom(diffusers.EulerDiscreteScheduler.from_config(SD15), sigmas=sigmas)
  assert _run(ours, ref, 5) <= TOL
  state = get_scheduler("euler_ancestral", SD15,
                        options={"schedule_type": "kl_optimal"}).set_timesteps(5)
  assert float(state.sigmas[-1]) == sigmas[-1] and np.all(np.isfinite(np.asarray(state.dt)))


AYS_TIMESTEPS = AysSchedules["StableDiffusionTimesteps"]  # diffusers' Align Your Steps recipe




@pytest.mark.parametrize("name,ref_cls,options,timesteps,strength", [
  ("euler", diffusers.EulerDiscreteScheduler, {}, AYS_TIMESTEPS, None),
  ("euler", diffusers.EulerDiscreteScheduler, {"prediction_type": "v_prediction"},
   [900.5, 700.25, 420.0, 99.0, 3.0], 0.6),
  ("heun", diffusers.HeunDiscreteScheduler, {}, [999, 700, 400, 150, 10], None),
  ("dpmpp_2m", diffusers.DPMSolverMultistepScheduler, {}, AYS_TIMESTEPS, None),
  ("dpmpp_2m_sde", diffusers.DPMSolverMultistepScheduler,
   {"algorithm_type": "sde-dpmsolver++", "final_sigmas_type": "sigma_min"}, AYS_TIMESTEPS, 0.5),
  ("dpmpp_3m_sde", diffusers.DPMSolverMultistepScheduler,
   {"algorithm_type": "sde-dpmsolver++", "solver_order": 3, "prediction_type": "v_prediction"},
   [998.7, 800, 620, 400, 250, 120, 40], None),
  ("lcm", diffusers.LCMScheduler, {}, [999, 759, 499, 259], None),
  ("lcm", diffusers.LCMScheduler, {"prediction_type": "v_prediction"}, [999, 700, 380, 90, 12],
   0.5),
  ("ddpm", diffusers.DDPMScheduler, {}, [980, 800, 500, 300, 120, 30], None),
  ("ddpm", diffusers.DDPMScheduler, {"variance_type": "fixed_large"}, [999, 600, 250, 0], 0.5),
], ids=["euler-ays", "euler-v-fractional-img2img", "heun", "dpmpp_2m-ays",
        "dpmpp_2m_sde-sigma_min-img2img", "dpmpp_3m_sde-v-fractional", "lcm", "lcm-v-img2img",
        "ddpm", "ddpm-fixed_large-img2img"])
def test_custom_timesteps_match_diffusers(name, ref_cls, options, timesteps, strength):
  """diffusers' `timesteps=` (DPM-Solver, DDPM and LCM take them as integers, Euler and Heun as
  they are; TCD's case is in its own file); the final sigma stays the scheduler's own."""
  cfg = dict(SD15, **options)
  ours = get_scheduler(name, cfg, options={"timesteps": timesteps})
  err = _run(ours, _custom(ref_cls.from_config(cfg), timesteps=timesteps), len(timesteps),
             strength)
  print(f"maxrel {name} {options} custom timesteps: {err:.3g}")
  assert err <= TOL, err


@pytest.mark.parametrize("option,strength", [("sigmas", None), ("sigmas", 0.6),
                                             ("timesteps", None)])
def test_euler_ancestral_follows_eulers_mapping(option, strength):
  """diffusers' Euler a takes no custom schedule: its steps run over the sigmas and timesteps
  its Euler builds from the list (the same mapping)."""
  values = AYS8 if option == "sigmas" else AYS_TIMESTEPS
  euler = diffusers.EulerDiscreteScheduler.from_config(SD15)
  euler.set_timesteps(**{option: values})
  ref = diffusers.EulerAncestralDiscreteScheduler.from_config(SD15)
  set_timesteps = ref.set_timesteps

  def custom(steps, device=None):
    set_timesteps(steps, device=device)
    ref.timesteps, ref.sigmas = euler.timesteps.clone(), euler.sigmas.clone()

  ref.set_timesteps = custom
  ours = get_scheduler("euler_ancestral", SD15, options={option: values})
  err = _run(ours, ref, len(euler.timesteps), strength)
  print(f"maxrel euler_ancestral custom {option}: {err:.3g}")
  assert err <= TOL, err


@pytest.mark.parametrize("kind", ["karras", "exponential", "beta"])
def test_spacing_types_are_diffusers_spacings(kind):
  """A1111's Karras, Exponential and Beta as `schedule_type` are diffusers' spacing options
  (sdjax gives Euler a Euler's, which diffusers' Euler a lacks)."""
  for name in ("euler", "euler_ancestral", "dpmpp_2m", "unipc"):
    typed = get_scheduler(name, SD15, options={"schedule_type": kind})
    spaced = get_scheduler(name, SD15, options={f"use_{kind}_sigmas": True})
    assert typed == spaced, name


@pytest.mark.parametrize("kind,strength", [("karras", None), ("karras", 0.6),
                                           ("exponential", None), ("beta", None)])
def test_euler_ancestral_spacings_follow_eulers(kind, strength):
  """A1111's "Euler a" with Schedule type Karras (Exponential, Beta): Euler a's steps over the
  sigmas and timesteps diffusers' Euler places with that spacing."""
  euler = diffusers.EulerDiscreteScheduler.from_config(SD15, **{f"use_{kind}_sigmas": True})
  euler.set_timesteps(12)
  ref = diffusers.EulerAncestralDiscreteScheduler.from_config(SD15)
  set_timesteps = ref.set_timesteps

  def spaced(steps, device=None):
    set_timesteps(steps, device=device)
    ref.timesteps, ref.sigmas = euler.timesteps.clone(), euler.sigmas.clone()

  ref.set_timesteps = spaced
  ours = get_scheduler("euler_ancestral", SD15, options={"schedule_type": kind})
  err = _run(ours, ref, 12, strength)
  print(f"maxrel euler_ancestral {kind} spacing: {err:.3g}")
  assert err <= TOL, err


def test_one_program_for_every_schedule():
  """The noise levels live in the state: any list or type of the same length compiles once."""
  base = get_scheduler("dpmpp_2m", SD15)
  for options in ({"sigmas": HAND}, {"schedule_type": "align_your_steps"},
                  {"schedule_type": "sgm_uniform"}, {"timesteps": AYS_TIMESTEPS}):
    assert get_scheduler("dpmpp_2m", SD15, options=options).program() == base.program()
  assert get_scheduler("euler", SD15, options={"sigmas": HAND}).program() == get_scheduler(
    "euler", SD15).program()


def test_align_your_steps_levels():
  """NVIDIA's levels as A1111 uses them: taken as they are for 11 steps, else interpolated in
  log sigma over evenly spaced positions; 0 after them."""
  sd15 = schedule_sigmas("align_your_steps", 11, TRAIN_SIGMAS)
  assert sd15.tolist() == [14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399,
                           0.152, 0.029, 0.0]
  sdxl = schedule_sigmas("align_your_steps_sdxl", 11, TRAIN_SIGMAS)
  assert sdxl[3] == 2.181 and sdxl[-2] == 0.029
  for n in (4, 10, 21):
    levels = schedule_sigmas("align_your_steps", n, TRAIN_SIGMAS)
    assert len(levels) == n + 1 and levels[-1] == 0
    np.testing.assert_allclose(levels[[0, -2]], [14.615, 0.029], rtol=1e-12)
    assert np.all(np.diff(levels) < 0)
  # 21 points over 11 levels: every other point is one of the levels themselves.
  np.testing.assert_allclose(schedule_sigmas("align_your_steps", 21, TRAIN_SIGMAS)[:-1:2],
                             sd15[:-1], rtol=1e-12)
  # between two levels, the geometric mean
  np.testing.assert_allclose(schedule_sigmas("align_your_steps", 21, TRAIN_SIGMAS)[1],
                             np.sqrt(14.615 * 6.475), rtol=1e-12)


def test_forge_align_your_steps_variants():
  """Forge's GITS and 32-step tables: taken as they are at their own step counts (11, 32), else
  interpolated in log sigma as Align Your Steps (at 2k - 1 steps every other point is one of
  the k levels, the points between their geometric means); 0 after them."""
  gits = schedule_sigmas("align_your_steps_gits", 11, TRAIN_SIGMAS)
  assert gits.tolist() == [14.615, 4.617, 2.507, 1.236, 0.702, 0.402, 0.240, 0.156, 0.104,
                           0.094, 0.029, 0.0]
  assert schedule_sigmas("align_your_steps_gits_sdxl", 11, TRAIN_SIGMAS)[3] == 1.529
  for kind, k, last in (("align_your_steps_32", 32, 0.015), ("align_your_steps_32_sdxl", 32,
                                                             0.015), ("align_your_steps_gits", 11,
                                                                      0.029)):
    table = schedule_sigmas(kind, k, TRAIN_SIGMAS)
    assert len(table) == k + 1 and table[0] == 14.615 and table[-2:].tolist() == [last, 0.0]
    assert np.all(np.diff(table) < 0)
    twice = schedule_sigmas(kind, 2 * k - 1, TRAIN_SIGMAS)
    np.testing.assert_allclose(twice[:-1:2], table[:-1], rtol=1e-12)
    np.testing.assert_allclose(twice[1:-1:2], np.sqrt(table[:-2] * table[1:-1]), rtol=1e-12)
  assert schedule_sigmas("align_your_steps_32", 32, TRAIN_SIGMAS)[1] == 11.23951352
  assert schedule_sigmas("align_your_steps_32_sdxl", 32, TRAIN_SIGMAS)[1] == 11.1491618


@pytest.mark.parametrize("n", [3, 4, 16, 30])
def test_forge_turbo_levels(n):
  """Forge's Turbo: n timesteps 1000 / n apart ending at 999, in torch's float32 and rounded half
  to even (16 steps: 61.5 -> 62, 186.5 -> 186), the training levels there, then 0."""
  t = torch.flip(torch.arange(1, n + 1) * float(1000 / n) - 1, (0,)).round().long().clip(0, 999)
  got = schedule_sigmas("turbo", n, TRAIN_SIGMAS)
  np.testing.assert_array_equal(got, np.append(TRAIN_SIGMAS[t.numpy()], 0.0))
  if n == 16:
    assert t[-1] == 62 and t[-3] == 186 and t[-5] == 312
  if n == 3:
    assert t.tolist() == [999, 666, 332]


def test_timestep_spaced_types():
  n, top = 4, TRAIN_SIGMAS[-1]
  sgm = schedule_sigmas("sgm_uniform", n, TRAIN_SIGMAS)
  # timesteps 999, 749.25, 499.5, 249.75: log sigma interpolated between training timesteps
  t = 749.25
  want = np.exp(0.75 * np.log(TRAIN_SIGMAS[749]) + 0.25 * np.log(TRAIN_SIGMAS[750]))
  np.testing.assert_allclose(sgm, [top, want, sgm[2], sgm[3], 0.0], rtol=1e-12)
  assert t == np.linspace(999, 0, n + 1)[1]
  normal = schedule_sigmas("normal", n, TRAIN_SIGMAS)  # timesteps 999, 666, 333, 0
  np.testing.assert_allclose(normal, [top, TRAIN_SIGMAS[666], TRAIN_SIGMAS[333],
                                      TRAIN_SIGMAS[0], 0.0], rtol=1e-12)
  assert schedule_sigmas("uniform", n, TRAIN_SIGMAS).tolist() == normal.tolist()
  simple = schedule_sigmas("simple", n, TRAIN_SIGMAS)  # every 250th training sigma from the top
  np.testing.assert_allclose(simple, [top, TRAIN_SIGMAS[749], TRAIN_SIGMAS[499],
                                      TRAIN_SIGMAS[249], 0.0], rtol=1e-12)


def test_kl_optimal_is_even_in_arctan():
  levels = schedule_sigmas("kl_optimal", 6, TRAIN_SIGMAS)
  angles = np.arctan(levels)
  np.testing.assert_allclose(np.diff(angles), np.diff(angles)[0], rtol=1e-9)
  np.testing.assert_allclose(levels[[0, -1]], TRAIN_SIGMAS[[-1, 0]], rtol=1e-12)


def _a1111_levels(kind: str, n: int, sigmas: torch.Tensor) -> torch.Tensor:
  """A1111's schedule type `kind` (modules/sd_schedulers.py) over k-diffusion's table of
  training `sigmas` (float32, or float16 where A1111 downcast alphas_cumprod), in torch as
  there: its interpolation reads the table's logs, in the table's dtype."""
  log_sigmas = sigmas.log()

  def sigma_to_t(sigma):
    dists = sigma.log() - log_sigmas[:, None]
    low = dists.ge(0).cumsum(dim=0).argmax(dim=0).clamp(max=len(log_sigmas) - 2)
    w = ((log_sigmas[low] - sigma.log()) / (log_sigmas[low] - log_sigmas[low + 1])).clamp(0, 1)
    return (1 - w) * low + w * (low + 1)

  def t_to_sigma(t):
    t = t.float()
    low, high, w = t.floor().long(), t.ceil().long(), t.frac()
    return ((1 - w) * log_sigmas[low] + w * log_sigmas[high]).exp()

  sigma_min, sigma_max = sigmas[0].item(), sigmas[-1].item()
  if kind == "uniform":  # k-diffusion's get_sigmas
    levels = t_to_sigma(torch.linspace(len(sigmas) - 1, 0, n))
  elif kind in ("sgm_uniform", "normal"):
    start = sigma_to_t(torch.tensor([sigma_max]))[0]
    end = sigma_to_t(torch.tensor([sigma_min]))[0]
    ts = torch.linspace(start, end, n + 1)[:-1] if kind == "sgm_uniform" else torch.linspace(
      start, end, n)
    levels = torch.stack([t_to_sigma(t) for t in ts])
  elif kind == "simple":
    stride = len(sigmas) / n
    levels = torch.tensor([float(sigmas[-(1 + int(x * stride))]) for x in range(n)])
  elif kind == "polyexponential":  # k-diffusion's get_sigmas_polyexponential at A1111's rho 1
    ramp = torch.linspace(1, 0, n) ** 1.0
    levels = torch.exp(ramp * (math.log(sigma_max) - math.log(sigma_min)) + math.log(sigma_min))
  else:  # KL Optimal, which ends at the smallest level
    low, high = torch.arctan(torch.tensor(sigma_min)), torch.arctan(torch.tensor(sigma_max))
    step = torch.arange(n + 1)
    return torch.tan(step / n * low + (1.0 - step / n) * high)
  return torch.cat([levels.float(), torch.zeros(1)])


@pytest.mark.parametrize("downcast", [False, True])
@pytest.mark.parametrize("kind", ["uniform", "sgm_uniform", "normal", "simple", "kl_optimal",
                                  "polyexponential"])
def test_table_types_as_a1111(kind, downcast):
  """The types A1111 reads off k-diffusion's table, on its float32 table and on the float16 one
  of a downcast alphas_cumprod (`downcast_alphas_cumprod`), whose logs it interpolates."""
  config = {**SD15, "downcast_alphas_cumprod": downcast}
  table = train_sigmas(train_alphas_cumprod(config))
  assert table.dtype == (np.float16 if downcast else np.float32)
  alphas = torch.from_numpy(train_alphas_cumprod(SD15))
  alphas = alphas.half() if downcast else alphas
  want = _a1111_levels(kind, 9, ((1 - alphas) / alphas) ** 0.5).numpy()
  got = schedule_sigmas(kind, 9, table)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  if downcast:  # the float32 table's levels are off by float16's rounding, or far more
    assert not np.allclose(schedule_sigmas(kind, 9, TRAIN_SIGMAS), want, rtol=1e-5)


@pytest.mark.parametrize("kind", SCHEDULE_TYPES)
def test_every_type_makes_a_sane_schedule(kind):
  for name in ("euler", "dpmpp_2m") if kind != "kl_optimal" else ("euler",):
    state = get_scheduler(name, SD15, options={"schedule_type": kind}).set_timesteps(
      7, sample_shape=SHAPE)
    sigmas = np.asarray(state.sigmas)
    assert len(state.timesteps) == 7 and np.all(np.diff(sigmas) < 0), (kind, sigmas)
    assert np.all((np.asarray(state.timesteps) >= 0) & (np.asarray(state.timesteps) <= 999))


@pytest.mark.parametrize("name,options,match", [
  ("dpmpp_2m", {"sigmas": HAND}, "make 7 steps, not 5"),
  ("euler", {"sigmas": [3.0, 5.0, 0.0]}, "decrease strictly"),
  ("euler", {"sigmas": [3.0]}, "at least 2 finite numbers"),
  ("euler", {"sigmas": "14,0"}, "at least 2 finite numbers"),
  ("euler", {"sigmas": [3.0, float("nan"), 0.0]}, "finite"),
  ("euler", {"sigmas": [3.0, 1.0, -1.0]}, "end at 0 or above"),
  ("euler", {"sigmas": HAND, "schedule_type": "simple"}, "set one of sigmas, schedule_type, not 2"),
  ("euler", {"schedule_type": "align"}, "unknown schedule_type 'align'"),
  ("dpmpp_2m_karras", {"schedule_type": "simple"}, "not dpmpp_2m_karras"),
  ("dpmpp_2m", {"schedule_type": "kl_optimal"}, "end at 0.*euler_ancestral take it"),
  ("heun", {"sigmas": [3.0, 1.0, 0.7, 0.5, 0.2, 0.1]}, "end at 0"),
  ("euler", {"timesteps": [999, 500, 500]}, "timesteps must decrease strictly and lie in "),
  ("euler", {"timesteps": [1000, 500]}, r"lie in \[0, 999\]"),
  ("euler", {"timesteps": []}, "at least 1 finite number, got"),
  ("dpmpp_2m", {"timesteps": [999, 500]}, "2 timesteps make 2 steps, not 5"),
  ("euler", {"timesteps": AYS_TIMESTEPS, "use_karras_sigmas": True}, "timesteps replaces the "),
  ("lms", {"timesteps": AYS_TIMESTEPS}, "timesteps is an option of ddpm, euler, euler_ancestral, "),
  ("lcm", {"sigmas": HAND}, "sigmas is an option of lms, euler, "),
  ("ddpm", {"timesteps": [999, 999]}, "timesteps must decrease strictly"),
  ("ddim", {"sigmas": HAND}, "places its own noise levels: sigmas is an option of lms, euler, "),
  ("edm_euler", {"schedule_type": "simple"}, "schedule_type is an option of .*unipc, lcm, "),
])
def test_bad_schedules_are_refused(name, options, match):
  with pytest.raises(SchedulerConfigError, match=match):
    get_scheduler(name, SD15, options=options).set_timesteps(5, sample_shape=SHAPE)
