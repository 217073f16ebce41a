"""Noise-level schedules a user picks beside the scheduler: a list of sigmas, or A1111's named ones.

diffusers' sigma schedulers place their noise levels by `timestep_spacing` or one of the
`use_karras/exponential/beta_sigmas` spacings (`common.spaced_sigmas`). Three sdjax options of
those schedulers replace that placement (one at a time; not with a spacing):

- `sigmas`: the n + 1 descending noise levels of an n-step run, the last one where the final step
  lands (0 to end on a clean image), as diffusers' `pipe(sigmas=...)` takes them for Euler.
- `timesteps` (euler, euler_ancestral, heun and the dpmpp family, as diffusers' `pipe(timesteps=
  ...)` for the first three and DPM-Solver): the n training timesteps of an n-step run, their
  sigmas read off the training schedule and the final one the scheduler's own (diffusers' Align
  Your Steps recipe passes NVIDIA's timesteps this way). DDPM, LCM and TCD, which step between
  timesteps rather than sigmas, take the option too (as integers, as diffusers).
- `schedule_type`: one of AUTOMATIC1111's schedule types that diffusers does not have
  (`SCHEDULE_TYPES`), computed for the run's step count from the model's training noise levels;
  A1111's Karras, Exponential and Beta are diffusers' spacings, which `schedule_type` also names
  (`SPACING_TYPES`, turned into `use_<kind>_sigmas` by `get_scheduler`).
  Align Your Steps (Sabour et al. 2024) interpolates NVIDIA's optimised 10-step levels in log sigma
  (SD1.5's, or SDXL's for `align_your_steps_sdxl`), as do Forge's GITS and 32-step variants
  (`align_your_steps_gits`, `align_your_steps_32`, each with its `_sdxl` form); Forge's Turbo
  takes the training levels at n timesteps evenly strided from the last; SGM Uniform, Normal
  and Uniform space timesteps evenly and read their sigmas off the training schedule
  interpolated in log sigma; Simple takes every (N/n)-th training sigma; KL Optimal is even in arctan sigma and ends at the smallest
  training sigma rather than at 0. In the `comfyui` form Beta and KL Optimal are ComfyUI's
  schedulers of those names, not A1111's: its beta takes the training levels at the Beta(0.6, 0.6)
  quantile timesteps (rounded), its kl_optimal n levels even in arctan sigma from the largest
  training sigma to the smallest, then 0.

They only feed `set_timesteps`: the compiled sampling program does not depend on them (see
`Scheduler.program`). With sigmas, each timestep is the training timestep of its sigma
(`common.sigma_to_t`).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from sdjax.schedulers.common import (
  SCHEDULE_SETTINGS,
  SchedulerConfigError,
  exp_f32,
  ldm_alphas_cumprod,
  make_alphas_cumprod,
  sigma_spacing,
  sigma_to_t,
  torch_linspace_f32,
  zero_snr_alphas_cumprod,
)

# Options of the sigma schedulers that place the noise levels themselves (not diffusers config);
# those that diffusers also gives custom timesteps take TIMESTEPS_OPTIONS.
SCHEDULE_OPTIONS = ("sigmas", "schedule_type")
TIMESTEPS_OPTIONS = (*SCHEDULE_OPTIONS, "timesteps")
# sdjax's option to step as AUTOMATIC1111 runs the sampler through k-diffusion (`infotext` sets it
# for A1111's images): DPM2 and DPM2 a then feed the UNet fractional Karras timesteps and drop
# the penultimate level (`kdpm2`), DPM-Solver++ starts and steps as k-diffusion's (`dpmpp`, where
# it is a config option: it changes the compiled program); Euler, Euler a, Heun, LMS and DPM++ 2S
# a step as k-diffusion's already (tests/test_k_diffusion). Every form reads its levels off
# A1111's own table (`form_alphas_cumprod`) and places Karras / Exponential ones in k-diffusion's
# float32 operations (`common.spaced_sigmas`); an img2img run takes A1111's steps, one more than
# diffusers' (`Scheduler.img2img_steps`).
K_DIFFUSION = "k_diffusion"
# sdjax's option to step as ComfyUI's KSampler runs these k-diffusion samplers (`comfyui` sets it
# for its workflows): the UNet sees the whole training timestep nearest each level in log sigma
# (`common.nearest_t`), and a run from the largest training sigma starts from its noise times
# sqrt(1 + sigma^2) rather than sigma (`common.first_noise_scale`), and an img2img run (a
# denoise below 1) the last n steps of int(n / denoise) (`Scheduler.img2img_steps`). Euler,
# Euler a, Heun, LMS, DPM2, DPM2 a, DPM++ 2S a, DPM++ SDE, ComfyUI's own samplers and the DPM++
# multistep family (with k_diffusion) take it.
COMFYUI = "comfyui"
# A1111's "SGM noise multiplier" setting (for SDXL, as Stability's sgm code): a text-to-image run of
# these samplers starts from its noise times sqrt(1 + sigma_0^2) rather than sigma_0
# (`common.first_noise_scale`); the same schedulers take it.
SGM_NOISE_MULTIPLIER = "sgm_noise_multiplier"
# A1111's "Downcast alphas_cumprod" (before A1111 1.7.0-225 always so for a float16 model, whose
# half() took the alphas_cumprod buffer along; a setting since): the model's training schedule
# held in float16, and k-diffusion's table of its noise levels and their logs computed from it in
# float16, op by op (`euler.train_alphas_cumprod`). The smallest level moves by 7% (0.0292 ->
# 0.0313 for SD1.5), so every level a schedule places between the extremes moves too. The sigma
# schedulers and A1111's own DDIM / PLMS / UniPC loops (`a1111`) take it. Its value DOWNCAST_SD1_SD2
# (what an older A1111's Version implies) is true for SD1/SD2 models only: A1111 held an SDXL
# model's alphas_cumprod apart from half(), in float32 (`sampling.model_schedule` resolves it).
DOWNCAST_ALPHAS_CUMPROD = "downcast_alphas_cumprod"
DOWNCAST_SD1_SD2 = "sd1_sd2"
# A1111's "Always discard next-to-last sigma" setting (its images say "Discard penultimate sigma:
# True"; always so for its DPM2, DPM2 a and DPM++ 3M SDE, which sdjax's `k_diffusion` forms do
# themselves) and ComfyUI's KSampler for dpm_2, dpm_2_ancestral, uni_pc and uni_pc_bh2 (not its
# custom sampling nodes): the levels placed for one step more, the next-to-last dropped
# (`euler.sigma_schedule`; not a list of the run's own `sigmas` or `timesteps`).
DISCARD_PENULTIMATE = "discard_penultimate_sigma"
# diffusers' zero-terminal-SNR option, which sdjax's sigma schedulers and PNDM take even where
# diffusers' have none (Heun, LMS, KDPM2, DPMSolverSDE, PNDM): A1111 and ComfyUI rescale the
# model's schedule whatever the sampler (`form_alphas_cumprod`), and their forms read a model's
# (its scheduler config's) into any sampler (`schedulers.get_scheduler`).
ZERO_SNR = "rescale_betas_zero_snr"


def form_alphas_cumprod(config: dict[str, Any], form: str | None) -> np.ndarray:
  """The training schedule's alphas_cumprod as a run of `config` reads it.

  diffusers' (`form` None): float32 from float32 betas. A1111's (`form` "a1111", its k-diffusion
  samplers and its DDIM / PLMS / UniPC) and ComfyUI's ("comfyui") start from Stable Diffusion's own
  float64 schedule (`common.ldm_alphas_cumprod`): A1111's model holds it in float32, ComfyUI
  computes its noise levels in float64 (returned in float64: `euler.train_sigmas` stores them in
  float32, as ComfyUI). Near t = 0, where 1 - alphas_cumprod is small, the two float32 schedules
  put the levels 1e-5 apart. `downcast_alphas_cumprod` rounds the schedule to float16 (A1111's
  does not exist in ComfyUI). Zero terminal SNR (`rescale_betas_zero_snr`) rescales diffusers'
  betas, or in A1111's and ComfyUI's forms alphas_cumprod itself (`common.
  zero_snr_alphas_cumprod`), after any downcast, in the schedule's dtype."""
  zero_snr = bool(config.get(ZERO_SNR))
  if form not in ("a1111", "comfyui"):
    alphas_cumprod = make_alphas_cumprod(config)
    if config.get(DOWNCAST_ALPHAS_CUMPROD):
      alphas_cumprod = alphas_cumprod.astype(np.float16)
    return alphas_cumprod
  alphas_cumprod = ldm_alphas_cumprod(config)
  if form == "a1111":
    alphas_cumprod = alphas_cumprod.astype(
      np.float16 if config.get(DOWNCAST_ALPHAS_CUMPROD) else np.float32)
  return zero_snr_alphas_cumprod(alphas_cumprod) if zero_snr else alphas_cumprod

# NVIDIA's Align Your Steps noise levels (research.nvidia.com/labs/toronto-ai/AlignYourSteps),
# as AUTOMATIC1111 ends them: at 0.029, then 0. Forge's schedule types add NVIDIA's GITS levels
# ("Align Your Steps GITS") and its 32-step levels ("Align Your Steps 32", ending at 0.015),
# interpolated alike; its "Align Your Steps 11" is the first table again.
_AYS_SIGMAS = {
  "align_your_steps": (14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152,
                       0.029),
  "align_your_steps_sdxl": (14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234,
                            0.113, 0.029),
  "align_your_steps_gits": (14.615, 4.617, 2.507, 1.236, 0.702, 0.402, 0.240, 0.156, 0.104,
                            0.094, 0.029),
  "align_your_steps_gits_sdxl": (14.615, 4.734, 2.567, 1.529, 0.987, 0.652, 0.418, 0.268, 0.179,
                                 0.127, 0.029),
  "align_your_steps_32": (
    14.615, 11.23951352, 8.64363081, 6.64729424, 5.57250862, 4.71648546, 3.99196065, 3.5195609,
    3.13490466, 2.79228788, 2.48773628, 2.21663865, 1.97508351, 1.7793172, 1.61475335,
    1.46540953, 1.314849, 1.16642497, 1.03475547, 0.91573744, 0.80748169, 0.71202361, 0.621739,
    0.53065202, 0.4529096, 0.37491455, 0.27461819, 0.2011529, 0.14105873, 0.06682881, 0.03166121,
    0.015),
  "align_your_steps_32_sdxl": (
    14.615, 11.1491618, 8.50522127, 6.48827151, 5.43707402, 4.60398619, 3.89854704, 3.27407457,
    2.74396527, 2.29968659, 1.95448514, 1.67108715, 1.42878152, 1.23181009, 1.06789649,
    0.92579443, 0.80290886, 0.69660121, 0.60436903, 0.52852552, 0.46773344, 0.41393379,
    0.36258186, 0.31008517, 0.26518925, 0.22326461, 0.17653877, 0.13959192, 0.10587381,
    0.05519369, 0.02877334, 0.015),
}
# The tables an SDXL model takes in their `_sdxl` form (`sampling.model_schedule`).
MODEL_TABLES = tuple(name for name in _AYS_SIGMAS if f"{name}_sdxl" in _AYS_SIGMAS)

SCHEDULE_TYPES = (*_AYS_SIGMAS, "sgm_uniform", "normal", "uniform", "simple", "kl_optimal",
                  "polyexponential", "turbo")
# A1111's schedule types that are diffusers' spacings: `schedule_type` names them too, and
# `spacing_options` turns them into the `use_<kind>_sigmas` option of schedulers that have it.
SPACING_TYPES = ("karras", "exponential", "beta")


def spacing_options(options: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
  """`options` with a `schedule_type` that is one of diffusers' spacings ("karras", ...) as that
  spacing's option, where the scheduler's config (`defaults`) has it; else unchanged (the
  scheduler's checks then say why not)."""
  kind = options.get("schedule_type")
  if kind not in SPACING_TYPES or f"use_{kind}_sigmas" not in defaults:
    return options
  if kind == "beta" and options.get(COMFYUI):  # ComfyUI's beta: not diffusers' (A1111's) spacing
    return options
  rest = {k: v for k, v in options.items() if k != "schedule_type"}
  return {**rest, f"use_{kind}_sigmas": True}


def schedule_range(config: dict[str, Any], sigma_min: float, sigma_max: float
                   ) -> tuple[float, float]:
  """(sigma_min, sigma_max) of a spacing or schedule type: A1111's settings where given
  (`common.SCHEDULE_SETTINGS`), else these (the training sigmas' extremes)."""
  low, high = config.get("schedule_sigma_min"), config.get("schedule_sigma_max")
  return (sigma_min if low is None else float(low)), (sigma_max if high is None else float(high))


def spacing_shape(config: dict[str, Any]) -> dict[str, Any]:
  """`common.spaced_sigmas`' rho and beta from A1111's settings (None: their defaults)."""
  alpha, beta = config.get("schedule_beta_alpha"), config.get("schedule_beta_beta")
  return {"rho": config.get("schedule_rho"),
          "beta": None if alpha is None and beta is None else
          (0.6 if alpha is None else float(alpha), 0.6 if beta is None else float(beta))}


def _check_settings(scheduler_name: str, config: dict[str, Any]) -> None:
  for key in SCHEDULE_SETTINGS:
    value = config.get(key)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)
                              or not 0 < value < math.inf):
      raise SchedulerConfigError(f"scheduler {scheduler_name!r}: {key} must be a number > 0, "
                                 f"got {value!r}")
  low, high = config.get("schedule_sigma_min"), config.get("schedule_sigma_max")
  if low is not None and high is not None and not low < high:
    raise SchedulerConfigError(f"scheduler {scheduler_name!r}: schedule_sigma_min ({low}) must "
                               f"be below schedule_sigma_max ({high})")


def check_options(scheduler_name: str, config: dict[str, Any]) -> None:
  """Validates the `sigmas` / `schedule_type` / `timesteps` options of a resolved config (None:
  unset), and A1111's schedule settings."""
  _check_settings(scheduler_name, config)
  given = [key for key in TIMESTEPS_OPTIONS if config.get(key) is not None]
  if len(given) > 1:
    raise SchedulerConfigError(
      f"scheduler {scheduler_name!r}: set one of {', '.join(given)}, not {len(given)}")
  if not given:
    return
  if sigma_spacing(scheduler_name, config):
    raise SchedulerConfigError(
      f"scheduler {scheduler_name!r}: {given[0]} replaces the Karras, exponential or beta "
      "spacing; pick the scheduler without it (e.g. dpmpp_2m, not dpmpp_2m_karras)")
  kind, value = given[0], config[given[0]]
  if kind == "schedule_type":
    comfyui_beta = value == "beta" and config.get(COMFYUI)  # ComfyUI's beta scheduler
    # left by `spacing_options`: this scheduler lacks the spacing
    if value in SPACING_TYPES and not comfyui_beta:
      raise SchedulerConfigError(
        f"scheduler {scheduler_name!r} has no {value} spacing (diffusers' use_{value}_sigmas)")
    if value not in SCHEDULE_TYPES and not comfyui_beta:
      raise SchedulerConfigError(
        f"scheduler {scheduler_name!r}: unknown schedule_type {value!r}; pick one of "
        f"{', '.join(SCHEDULE_TYPES + SPACING_TYPES)}")
    return
  least = 2 if kind == "sigmas" else 1
  try:
    values = np.asarray(value, dtype=np.float64)
  except (TypeError, ValueError):
    values = None
  if (values is None or values.ndim != 1 or len(values) < least
      or not np.all(np.isfinite(values))):
    raise SchedulerConfigError(
      f"scheduler {scheduler_name!r}: {kind} must be a list of at least {least} finite "
      f"number{'s' * (least > 1)}, got {value!r}")
  low, high = (0, math.inf) if kind == "sigmas" else (0, int(config["num_train_timesteps"]) - 1)
  if values[-1] < low or values[0] > high or np.any(np.diff(values) >= 0):
    where = "end at 0 or above" if kind == "sigmas" else f"lie in [0, {high}]"
    raise SchedulerConfigError(
      f"scheduler {scheduler_name!r}: {kind} must decrease strictly and {where}, got "
      f"{list(value)}")


def custom_timesteps(config: dict[str, Any], num_inference_steps: int) -> np.ndarray | None:
  """float32 [n] training timesteps the `timesteps` option sets, or None."""
  if config.get("timesteps") is None:
    return None
  timesteps = np.asarray(config["timesteps"], dtype=np.float32)
  if len(timesteps) != num_inference_steps:
    raise SchedulerConfigError(
      f"{len(timesteps)} timesteps make {len(timesteps)} steps, not {num_inference_steps}")
  return timesteps


def custom_final(config: dict[str, Any]) -> None:
  """Multistep schedulers: a custom schedule ends at 0 (`custom_sigmas`), so their config's
  final_sigmas_type, which decides the order of the last step, becomes "zero" (in place)."""
  if any(config.get(key) is not None for key in SCHEDULE_OPTIONS):  # not for `timesteps`
    config["final_sigmas_type"] = "zero"


def custom_sigmas(scheduler_name: str, config: dict[str, Any], num_inference_steps: int,
                  train_sigmas: np.ndarray, *, any_final: bool = False) -> np.ndarray | None:
  """float64 [n + 1] noise levels the `sigmas` or `schedule_type` option sets (each exactly a
  float32), or None when neither is set. `train_sigmas`: float32, ascending in t.

  Schedulers whose last step is built for a final sigma of 0 (its first-order or Euler form, as
  in diffusers) refuse another unless `any_final`.
  """
  n = num_inference_steps
  kind = config.get("schedule_type")
  if config.get("sigmas") is not None:
    sigmas = np.asarray(config["sigmas"], dtype=np.float32)
    if len(sigmas) != n + 1:
      raise SchedulerConfigError(
        f"{len(sigmas)} sigmas make {len(sigmas) - 1} steps, not {n}: give one more sigma than "
        "steps (the last is where the final step lands, usually 0)")
  elif kind is not None:
    sigmas = schedule_sigmas(kind, n, train_sigmas, comfyui=bool(config.get(COMFYUI)),
                             settings=config).astype(np.float32)
  else:
    return None
  if sigmas[-1] != 0 and not any_final:
    raise SchedulerConfigError(
      f"scheduler {scheduler_name!r} needs sigmas that end at 0 (its last step lands on a clean "
      f"sample), not at {sigmas[-1]:g}" + (f" as schedule_type {kind} does; euler and "
                                            "euler_ancestral take it" if kind else ""))
  return sigmas.astype(np.float64)


def schedule_sigmas(kind: str, n: int, train_sigmas: np.ndarray, comfyui: bool = False,
                    settings: dict[str, Any] | None = None) -> np.ndarray:
  """float64 [n + 1] noise levels of A1111 schedule type `kind` for n steps, between the training
  schedule's extremes (`train_sigmas`, ascending in t; a float16 table, `DOWNCAST_ALPHAS_CUMPROD`,
  interpolates its own float16 logs, as k-diffusion's) or A1111's settings' (in `settings`, a
  config: `common.SCHEDULE_SETTINGS`); `comfyui`: Beta and KL Optimal as ComfyUI's schedulers of
  those names."""
  train_sigmas = np.asarray(train_sigmas)
  settings = settings or {}
  low, high = schedule_range(settings, float(train_sigmas[0]), float(train_sigmas[-1]))
  if comfyui and kind in ("beta", "kl_optimal"):
    return _comfyui_schedule(kind, n, train_sigmas, settings)
  table = np.log(train_sigmas if train_sigmas.dtype == np.float16 else
                 train_sigmas.astype(np.float64))
  log_sigmas = table.astype(np.float64)
  n_train = len(log_sigmas)
  if kind in _AYS_SIGMAS:
    levels = np.asarray(_AYS_SIGMAS[kind])
    if n != len(levels):  # evenly spaced positions, linear in log sigma
      positions = np.linspace(0, 1, len(levels))
      levels = np.exp(np.interp(np.linspace(0, 1, n), positions, np.log(levels[::-1])))[::-1]
    return np.append(levels, 0.0)
  if kind in ("sgm_uniform", "normal", "uniform"):
    # Uniform: from the largest training timestep to 0; SGM Uniform and Normal from the
    # timesteps of the largest and smallest levels (the same, but for a float16 table's logs),
    # SGM Uniform dropping the last of n + 1 points.
    start, end = float(n_train - 1), 0.0
    if kind != "uniform":
      ends = np.asarray([train_sigmas[-1], train_sigmas[0]], np.float64)
      if settings.get("schedule_sigma_max") is not None or settings.get(
          "schedule_sigma_min") is not None:
        ends = np.asarray([high, low], np.float32).astype(np.float64)
      start, end = sigma_to_t(ends, table)
    t = np.linspace(start, end, n + 1)[:-1] if kind == "sgm_uniform" else np.linspace(
      start, end, n)
    return np.append(_t_to_sigma(t, log_sigmas), 0.0)
  if kind == "turbo":  # Forge's: n training timesteps a (N/n)-stride apart from the last, in
    # float32 as its torch, rounded half to even; their training levels (Forge reads them back
    # through exp(log) in float32: within 1.4e-7 of the table's on SD's schedule)
    t = np.arange(1, n + 1, dtype=np.float32) * np.float32(n_train / n) - np.float32(1)
    t = np.clip(np.rint(t[::-1]).astype(np.int64), 0, n_train - 1)
    return np.append(np.asarray(train_sigmas, np.float64)[t], 0.0)
  if kind == "simple":  # the table's own levels
    stride = n_train / n
    return np.append(train_sigmas[[-(1 + int(x * stride)) for x in range(n)]], 0.0)
  if kind == "kl_optimal":
    fraction = np.arange(n + 1) / n
    return np.tan(fraction * math.atan(low) + (1 - fraction) * math.atan(high))
  if kind == "polyexponential":  # k-diffusion's get_sigmas_polyexponential (A1111's rho 1)
    rho = np.float32(settings.get("schedule_rho") or 1.0)
    ramp = torch_linspace_f32(1.0, 0.0, n) ** rho
    return np.append(exp_f32(ramp * np.float32(math.log(high) - math.log(low))
                             + np.float32(math.log(low))), 0.0)
  raise SchedulerConfigError(f"unknown schedule_type {kind!r}")


def _comfyui_schedule(kind: str, n: int, train_sigmas: np.ndarray,
                      settings: dict[str, Any]) -> np.ndarray:
  """ComfyUI's beta_scheduler (its BetaSamplingScheduler node's alpha and beta: the settings',
  default 0.6 each) and kl_optimal_scheduler over its float32 table."""
  if kind == "beta":  # the table's levels at Beta(alpha, beta) quantiles of the timesteps, rounded
    from scipy import stats  # noqa: PLC0415  (a dependency of jax; only this option needs it)

    shape = spacing_shape(settings)["beta"] or (0.6, 0.6)
    t = np.rint(stats.beta.ppf(1 - np.linspace(0, 1, n, endpoint=False), *shape)
                * (len(train_sigmas) - 1)).astype(np.int64)
    if np.any(t[1:] == t[:-1]):  # ComfyUI drops the repeats and runs fewer steps
      raise SchedulerConfigError(
        f"ComfyUI's beta scheduler repeats a timestep at {n} steps (it would run "
        f"{len(set(t.tolist()))}): give that many steps")
    return np.append(np.asarray(train_sigmas, np.float32)[t], 0.0).astype(np.float64)
  if n < 2:  # its 0 / 0
    raise SchedulerConfigError("ComfyUI's kl_optimal scheduler needs 2 steps or more")
  low = np.float32(math.atan(float(train_sigmas[0])))
  high = np.float32(math.atan(float(train_sigmas[-1])))
  fraction = np.arange(n, dtype=np.float32) / np.float32(n - 1)  # float32, as its torch
  angles = fraction * low + (np.float32(1) - fraction) * high
  return np.append(np.tan(angles.astype(np.float64)).astype(np.float32), 0.0).astype(np.float64)


def _t_to_sigma(t: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
  """The noise level at fractional training timesteps, interpolating linearly in log sigma
  (k-diffusion's discrete schedule; the inverse of `common.sigma_to_t`)."""
  low = np.floor(t).astype(np.int64)
  high = np.ceil(t).astype(np.int64)
  w = t - low
  return np.exp((1 - w) * log_sigmas[low] + w * log_sigmas[high])


# SD1 / SD2 / SDXL's training schedule: where a UI's levels are read off it without the model at
# hand (`table_levels`).
SD_SCHEDULE = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
               "beta_schedule": "scaled_linear"}


def table_levels(kind: str, steps, form: str, *, zero_snr: bool = False, downcast: bool = False,
                 discard: bool = False) -> list[float] | None:
  """The float32 levels (ending in 0) that A1111's (`form` "a1111") or ComfyUI's ("comfyui")
  table of Stable Diffusion's schedule makes for `steps` by `kind`, where no schedule type
  places them (their count is not always steps + 1): "ddim" (A1111's DDIM, ComfyUI's
  ddim_uniform: every (1000 // steps)-th level from the second up, then 0; 30 steps make 31) or
  "linear_quadratic" (ComfyUI's: linear then quadratic in 1 - sigma / sigma_max, in Python
  floats, times its float32 largest level). The table zero-terminal-SNR rescaled or in float16
  as the options say; `discard`: the levels of steps + 1 less the next-to-last. None for a step
  count below 1."""
  from sdjax.schedulers.euler import train_sigmas  # noqa: PLC0415  (euler imports us)

  if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
    return None
  if discard:
    levels = table_levels(kind, steps + 1, form, zero_snr=zero_snr, downcast=downcast)
    return levels[:-2] + levels[-1:]
  config = {**SD_SCHEDULE, ZERO_SNR: zero_snr, DOWNCAST_ALPHAS_CUMPROD: downcast}
  table = np.asarray(train_sigmas(form_alphas_cumprod(config, form)), np.float32)
  if kind == "ddim":
    levels = [*table[1::max(len(table) // steps, 1)][::-1].tolist(), 0.0]
  elif kind == "linear_quadratic":
    ramp = [1.0, 0.0]
    if steps > 1:
      linear = steps // 2
      diff = linear - 0.025 * steps
      quad, rest = diff / (linear * (steps - linear) ** 2), steps - linear
      slope = 0.025 / linear - 2 * diff / rest**2
      ramp = [1.0 - v for v in [i * 0.025 / linear for i in range(linear)]
              + [quad * i**2 + slope * i + quad * linear**2 for i in range(linear, steps)] + [1.0]]
    levels = (np.asarray(ramp, np.float32) * table[-1]).tolist()
  else:
    raise SchedulerConfigError(f"unknown table schedule {kind!r}")
  return [float(np.float32(v)) for v in levels]
