"""What every scheduler shares: config resolution, beta schedules, the scheduler interface.

A scheduler is a frozen (hashable) dataclass holding its resolved config; it is static under
`jax.jit`. Its per-run state is a `flax.struct.dataclass` pytree kept in float32.

The sampling loop drives every scheduler the same way, mirroring diffusers' pipeline loop
`for t in scheduler.timesteps`:

    state = sched.set_timesteps(num_inference_steps)          # host-side, numpy float64 -> f32
    x = noise * sched.init_noise_sigma(state)
    for i in range(begin, len(state.timesteps)):               # one UNet call per i (lax.scan)
        x_in = sched.scale_model_input(state, x, i)
        eps = unet(x_in, state.timesteps[i])
        x, state = sched.step(state, eps, i, x, noise_i)       # noise_i only if sched.needs_noise

`i` is the position in `state.timesteps` (a traced int32 inside scan). Schedulers with history
(multistep, PLMS, Heun's two stages) count the steps they have taken in their state, so a loop
that starts at `begin > 0` (img2img) starts with an empty history, as diffusers does after
`set_begin_index`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import jax.numpy as jnp
import numpy as np


class SchedulerConfigError(ValueError):
  """A scheduler name or option that sdjax does not implement."""


# Keys that only describe the file, never the math.
_META_KEYS = ("_class_name", "_diffusers_version", "_name_or_path")


def resolve_config(
    scheduler_name: str,
    defaults: dict[str, Any],
    user_config: dict[str, Any],
    *,
    unsupported: dict[str, Any] | None = None,
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
  """Resolves `user_config` against one diffusers class's `__init__` defaults.

  As diffusers' `SchedulerClass.from_config(config, **overrides)`: keys the class does not take
  are ignored, missing keys take the class defaults, overrides win. `unsupported` maps an option
  sdjax does not implement to the only value it accepts; any other value raises.
  """
  resolved = dict(defaults)
  for key, value in user_config.items():
    if key in defaults:
      resolved[key] = value
  resolved.update(overrides or {})
  for key, allowed in (unsupported or {}).items():
    value = resolved.get(key, allowed)
    if value != allowed and not (value is None and allowed is False):
      raise SchedulerConfigError(
          f"scheduler {scheduler_name!r}: option {key}={value!r} is not supported by sdjax"
      )
  return resolved


def _fma_f32(a, b, c) -> np.ndarray:
  """float32 fused multiply-add a * b + c, rounded once (float32 inputs, exactly)."""
  a, b, c = (np.asarray(v, dtype=np.float64) for v in (a, b, c))
  p = a * b  # exact: two 24-bit significands fit in 53 bits
  s = p + c
  pv = s - c
  err = (p - pv) + (c - (s - pv))  # TwoSum: s + err == p + c exactly
  # Round-to-odd in float64 makes the final cast to float32 a single correct rounding.
  inexact_even = (err != 0) & ((s.view(np.int64) & 1) == 0)
  s = np.where(inexact_even, np.nextafter(s, np.where(err > 0, np.inf, -np.inf)), s)
  return s.astype(np.float32)


def torch_linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
  """`torch.linspace(start, end, steps, dtype=torch.float32)` on CPU, bit for bit.

  diffusers builds its beta schedules with it. torch fills the first half forwards from `start`
  and the second half backwards from `end`, each element one fused multiply-add in float32 (as
  compiled for x86-64 AVX2/AVX-512 and arm64); `np.linspace` differs in the last bit for ~10%
  of the entries.
  """
  start32, end32 = np.float32(start), np.float32(end)
  if steps == 1:
    return np.asarray([start32], dtype=np.float32)
  step = np.float32((end32 - start32) / np.float32(steps - 1))
  idx = np.arange(steps)
  head = _fma_f32(step, idx, start32)
  tail = _fma_f32(-step, steps - 1 - idx, end32)
  return np.where(idx < steps // 2, head, tail).astype(np.float32)


def _cumprod_f32(x: np.ndarray) -> np.ndarray:
  """`torch.cumprod` of a float32 CPU tensor: torch accumulates in float64, stores float32."""
  return np.cumprod(np.asarray(x, dtype=np.float64)).astype(np.float32)


def _betas_for_alpha_bar(num_train_timesteps: int, max_beta: float = 0.999,
                         dtype=np.float32) -> np.ndarray:
  """The squaredcos_cap_v2 schedule, in float64 Python math then float32 as diffusers (or
  `dtype`)."""

  def alpha_bar(t):
    return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

  betas = []
  for i in range(num_train_timesteps):
    t1 = i / num_train_timesteps
    t2 = (i + 1) / num_train_timesteps
    betas.append(min(1 - alpha_bar(t2) / alpha_bar(t1), max_beta))
  return np.asarray(betas, dtype=dtype)


def _rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
  """Rescales betas to zero terminal SNR (arXiv:2305.08891, algorithm 1), in float32."""
  alphas_bar_sqrt = np.sqrt(_cumprod_f32(1.0 - betas))
  first, last = alphas_bar_sqrt[0].copy(), alphas_bar_sqrt[-1].copy()
  # diffusers scales in place by the 0-dim ratio, so the ratio is rounded before the product.
  alphas_bar_sqrt = (alphas_bar_sqrt - last) * (first / (first - last))
  alphas_bar = alphas_bar_sqrt**2
  alphas = alphas_bar[1:] / alphas_bar[:-1]
  alphas = np.concatenate([alphas_bar[0:1], alphas])
  return (1 - alphas).astype(np.float32)


def make_betas(config: dict[str, Any]) -> np.ndarray:
  """float32 betas [num_train_timesteps] for a resolved config, as diffusers computes them."""
  n = int(config["num_train_timesteps"])
  schedule = config["beta_schedule"]
  if config.get("trained_betas") is not None:
    betas = np.asarray(config["trained_betas"], dtype=np.float32)
  elif schedule == "linear":
    betas = torch_linspace_f32(config["beta_start"], config["beta_end"], n)
  elif schedule == "scaled_linear":
    betas = torch_linspace_f32(config["beta_start"] ** 0.5, config["beta_end"] ** 0.5, n) ** 2
  elif schedule == "squaredcos_cap_v2":
    betas = _betas_for_alpha_bar(n)
  else:
    raise SchedulerConfigError(f"beta_schedule {schedule!r} is not supported by sdjax")
  if config.get("rescale_betas_zero_snr"):
    betas = _rescale_zero_terminal_snr(betas)
  return betas


def make_alphas_cumprod(config: dict[str, Any]) -> np.ndarray:
  """float32 cumulative product of (1 - beta), [num_train_timesteps]."""
  return _cumprod_f32(1.0 - make_betas(config))


def ldm_alphas_cumprod(config: dict[str, Any]) -> np.ndarray:
  """float64 alphas_cumprod as Stable Diffusion's own code (ldm, which A1111 runs) and ComfyUI
  compute it: float64 betas and products (diffusers': float32 betas); A1111 holds it in float32.
  Not rescaled to zero terminal SNR."""
  n = int(config["num_train_timesteps"])
  schedule = config["beta_schedule"]
  if config.get("trained_betas") is not None:
    betas = np.asarray(config["trained_betas"], dtype=np.float64)
  elif schedule == "linear":
    betas = np.linspace(config["beta_start"], config["beta_end"], n, dtype=np.float64)
  elif schedule == "scaled_linear":  # ldm's "linear"
    betas = np.linspace(config["beta_start"] ** 0.5, config["beta_end"] ** 0.5, n,
                        dtype=np.float64) ** 2
  elif schedule == "squaredcos_cap_v2":
    betas = _betas_for_alpha_bar(n, dtype=np.float64)
  else:
    raise SchedulerConfigError(f"beta_schedule {schedule!r} is not supported by sdjax")
  return np.cumprod(1.0 - betas)


# The last alphas_cumprod of A1111's and ComfyUI's zero-terminal-SNR schedule (A1111's Noise
# Schedule "Zero Terminal SNR", ComfyUI's zsnr): its largest noise level is 4518.8, where diffusers'
# sigma schedulers (2^-24) reach 4096 and its DDIM (0) infinity.
ZERO_SNR_LAST = 4.8973451890853435e-08


def zero_snr_alphas_cumprod(alphas_cumprod: np.ndarray) -> np.ndarray:
  """A1111's `rescale_zero_terminal_snr_abar` (ComfyUI's, through sigmas) in the array's dtype:
  sqrt(alphas_cumprod) shifted to end at 0 and scaled to keep its start, squared, the last one
  ZERO_SNR_LAST. (diffusers rescales the betas instead.)"""
  root = np.sqrt(alphas_cumprod)
  first, last = root[0], root[-1]
  root = (root - last) * (first / (first - last))
  out = root**2
  out[-1] = ZERO_SNR_LAST
  return out


# The schedulers A1111 runs over training timesteps (its sd_samplers_timesteps), by sdjax name.
A1111_TIMESTEP_SAMPLERS = ("ddim", "pndm", "unipc", "ddim_cfg_pp")
# Their `a1111` form's state-only option for an img2img or hires run (`sampling` sets it): A1111's
# t_enc. Its sample_img2img runs them over the first t_enc timesteps of the text-to-image grid,
# the image noised to the level of the timestep after those (grid[t_enc]), one above the first
# UNet call's.
A1111_IMG2IMG = "a1111_img2img"
# The first step of its placed schedule a run of a scheduler that plans its run between its own
# ends (`plans_its_run`: DPM-Solver-Fast) starts from: its img2img and hires passes.
PLAN_START = "plan_start"
# A1111's UniPC skip types (its "UniPC skip type" setting, UniPC's `skip_type` option in its
# `a1111` form): its positions uniform in t, in sqrt(t) or in logSNR.
UNIPC_SKIP_TYPES = ("time_uniform", "time_quadratic", "logSNR")
# A1111's settings of its schedule types (its "sigma min", "sigma max" and "rho" options and Beta's
# alpha and beta, which it writes as "Schedule min sigma", ..., "Beta schedule alpha"): options of
# every scheduler that takes `schedule_type`, read where A1111's schedule functions read them
# (`sigma_schedules`): the range of Karras, Exponential, Polyexponential, KL Optimal, Beta, SGM
# Uniform and Normal levels (default: the training sigmas' extremes), Karras' and
# Polyexponential's rho (7, 1), Beta's shape (0.6, 0.6). Only the state depends on them.
SCHEDULE_SETTINGS = ("schedule_sigma_min", "schedule_sigma_max", "schedule_rho",
                     "schedule_beta_alpha", "schedule_beta_beta")


# k-diffusion's `s_noise` (A1111's "Sigma noise" setting, ComfyUI's sampler nodes' s_noise): the
# factor on each fresh draw of its stochastic samplers, 1 by default. A config option (it changes
# what the compiled steps do) of the schedulers whose class lists it in `_DEFAULTS`.
S_NOISE = "s_noise"


def check_s_noise(scheduler_name: str, value) -> None:
  if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
      or value < 0):
    raise SchedulerConfigError(
      f"scheduler {scheduler_name!r}: {S_NOISE} must be a number >= 0 (the factor on each fresh "
      f"noise draw; 1: as drawn), got {value!r}")


# k-diffusion's churn (Karras et al. 2022, algorithm 2; A1111's "Sigma churn", "Sigma tmin" and
# "Sigma tmax" settings) of its Euler, Heun and DPM2 loops: before a step's first model call at a
# level sigma in [s_tmin, s_tmax], the sample is noised up to sigma_hat = sigma * (1 + gamma),
# gamma = min(s_churn / steps, sqrt(2) - 1), by fresh noise times s_noise; the step then runs from
# sigma_hat. Every step draws that noise, churned or not, as k-diffusion's loops do. s_tmax 0:
# no upper bound (A1111 reads its setting's 0 so). Config options of those three samplers.
S_CHURN, S_TMIN, S_TMAX = "s_churn", "s_tmin", "s_tmax"
CHURN_DEFAULTS = {S_CHURN: 0.0, S_TMIN: 0.0, S_TMAX: 0.0, S_NOISE: 1.0}
CHURN_SAMPLERS = ("euler", "heun", "kdpm2")


def check_churn(scheduler_name: str, config: dict[str, Any]) -> None:
  for key in (S_CHURN, S_TMIN, S_TMAX):
    value = config.get(key, 0.0)
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value)
        or value < 0):
      raise SchedulerConfigError(
        f"scheduler {scheduler_name!r}: {key} must be a number >= 0 (k-diffusion's churn: "
        f"{S_CHURN} 0 is none; {S_TMAX} 0 is no upper bound), got {value!r}")
  check_s_noise(scheduler_name, config.get(S_NOISE, 1.0))


def churn_levels(config: dict[str, Any], sigmas: np.ndarray,
                 steps: int) -> tuple[np.ndarray, np.ndarray]:
  """float32 (sigma_hat, the churn noise's scale sqrt(sigma_hat^2 - sigma^2)) at each of the
  float32 levels `sigmas` a step starts from, in a loop of `steps` steps, as k-diffusion's loops
  compute them in torch (gamma a Python float, the rest float32); (sigmas, 0) without churn."""
  sigmas = np.asarray(sigmas, np.float32)
  churn = float(config.get(S_CHURN, 0.0))
  if churn <= 0:
    return sigmas, np.zeros_like(sigmas)
  low, high = np.float32(config.get(S_TMIN, 0.0)), float(config.get(S_TMAX, 0.0)) or math.inf
  gamma = min(churn / steps, 2**0.5 - 1)
  inside = (low <= sigmas) & (sigmas <= np.float32(high))
  sigma_hat = np.where(inside, sigmas * np.float32(gamma + 1), sigmas).astype(np.float32)
  scale = np.sqrt(sigma_hat * sigma_hat - sigmas * sigmas).astype(np.float32)
  return sigma_hat, np.where(inside, scale, np.float32(0)).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class Scheduler:
  """Base of every scheduler. Subclasses are frozen dataclasses (hashable, jit-static).

  Attributes:
    config: the resolved diffusers-style config, as a tuple of (key, value) pairs so that the
      dataclass stays hashable; `self.cfg` gives it as a dict.
  """

  config: tuple[tuple[str, Any], ...]

  name: ClassVar[str] = ""
  order: ClassVar[int] = 1  # model calls per inference step (2 for Heun)
  needs_noise: ClassVar[bool] = False  # whether `step` consumes fresh noise
  # Whether diffusers draws that noise from the pipeline's generator (not a noise source of its
  # own): what a run of torch's generator (`sampling.RNGS`) reproduces.
  generator_noise: ClassVar[bool] = True
  # Whether it plans its calls between the ends of the levels it runs over: img2img and hires
  # passes plan over the levels they keep (`planned_from`), no refiner handoff.
  plans_its_run: ClassVar[bool] = False
  # Whether it runs its own loop of model calls (`run(state, x, model)`), not steps at positions
  # (DPM adaptive: as many calls as its error control takes).
  adaptive: ClassVar[bool] = False
  # Whether `step` also takes the unconditional model output (`uncond=`): CFG++ samplers, which
  # renoise along it (classifier-free guidance is then always on).
  takes_uncond: ClassVar[bool] = False
  # What the guidance scale is divided by before guidance (A1111's DDIM CFG++: 12.5, mapping its
  # CFG scale's usual range onto CFG++'s 0 to 1).
  guidance_divisor: ClassVar[float] = 1.0
  # sdjax options beside diffusers' config whose values live only in the state `set_timesteps`
  # returns: the noise levels' placement (`sigma_schedules`), an ancestral sampler's eta.
  schedule_options: ClassVar[tuple[str, ...]] = ()

  @property
  def cfg(self) -> dict[str, Any]:
    return dict(self.config)

  @property
  def prediction_type(self) -> str:
    return self.cfg["prediction_type"]

  def set_timesteps(self, num_inference_steps: int, sample_shape: tuple[int, ...] | None = None):
    """Returns the state for a run (host-side numpy, arrays stored as float32 / int32).

    `sample_shape` is the latent's shape; schedulers with a history of model outputs need it to
    allocate fixed-shape buffers.
    """
    raise NotImplementedError

  def init_noise_sigma(self, state):
    """The factor that scales unit Gaussian noise into the first latent."""
    raise NotImplementedError

  def scale_model_input(self, state, sample, i):
    """What the UNet sees at position `i` (identity for DDIM-like schedulers)."""
    del state, i
    return sample

  def step(self, state, model_output, i, sample, noise=None):
    """One update at position `i`; returns (prev_sample, new_state)."""
    raise NotImplementedError

  @property
  def churns(self) -> bool:
    """Whether the sample is noised before the model call (`churn`: k-diffusion's churn)."""
    return False

  def churn(self, state, sample, i, noise):
    """The sample the model sees at position `i`, from the one the last step left: with churn,
    `noise` (a step's fresh draw, `step_noise`'s) times the position's churn scale added."""
    del state, i, noise
    return sample

  def step_noise(self, noise):
    """A step's fresh draw as `step` takes it: times k-diffusion's `s_noise` (the `S_NOISE`
    option of the samplers that have it), each draw multiplied first, as k-diffusion's
    `noise_sampler(...) * s_noise * ...` rounds; at 1 (or without the option), as drawn."""
    scale = float(self.cfg.get(S_NOISE, 1.0))
    if noise is None or scale == 1.0:
      return noise
    return rounded(rounded(noise.astype(jnp.float32)) * np.float32(scale))

  @classmethod
  def option_names(cls, overrides: dict[str, Any]) -> set[str]:
    """The options a scheduler of this class takes under `overrides` (its registry name's and
    the caller's): its config's and its schedule options."""
    del overrides
    return set(cls._DEFAULTS) | set(cls.state_options())

  @classmethod
  def state_options(cls) -> tuple[str, ...]:
    """`schedule_options`, with A1111's schedule settings (`SCHEDULE_SETTINGS`) where the
    scheduler takes schedule types."""
    return (*cls.schedule_options,
            *(SCHEDULE_SETTINGS if "schedule_type" in cls.schedule_options else ()))

  def a1111_levels(self, state) -> np.ndarray:
    """float32 [positions]: what A1111's CFG denoiser sees as `sigma` at each model call (and
    compares with its Negative Guidance minimum sigma): the timestep for the samplers it runs over
    training timesteps (DDIM, PLMS, UniPC: `A1111_TIMESTEP_SAMPLERS`), else `call_sigmas`."""
    if self.name in A1111_TIMESTEP_SAMPLERS:
      return np.asarray(state.timesteps, np.float32)
    return np.asarray(self.call_sigmas(state))

  def call_sigmas(self, state):
    """float32 [positions], traceable: the noise level (k-diffusion's sigma) of each model
    call's input: the state's per-call levels, else sqrt((1 - a) / a) of the training
    alphas_cumprod at each (rounded) timestep."""
    n = len(state.timesteps)
    for name in ("sigma_in", "sigmas"):  # per model call; `sigmas` may end in one more
      if hasattr(state, name):
        return jnp.asarray(getattr(state, name))[:n].astype(jnp.float32)
    alphas = jnp.asarray(make_alphas_cumprod(self.cfg), jnp.float32)
    ab = alphas[jnp.rint(jnp.asarray(state.timesteps)).astype(jnp.int32)]
    return jnp.sqrt((1 - ab) / ab)

  def brownian_queries(self, state) -> list[tuple[np.float32, np.float32] | None] | None:
    """k-diffusion's Brownian-tree noise sampler calls (`brownian_tree`), one per position:
    (sigma, sigma_next) float32 as its loop passes them, or None where the step adds no noise;
    None for a scheduler whose noise is not a Brownian increment."""
    del state
    return None

  def brownian_state(self, state):
    """`state` for a run whose step noise is the Brownian tree's answers."""
    return state

  def noise_draw(self, i, positions: int):
    """How many fresh-noise draws a run's steps take before position `i` (the index of the one
    `step` takes there) in a schedule of `positions`, as diffusers' scheduler draws them from
    the pipeline's generator (`i` may be traced)."""
    del positions
    return i

  def add_noise(self, state, original_samples, noise, i):
    """Noises a clean sample to the level of position `i` (img2img's starting latent)."""
    raise NotImplementedError

  def img2img_noise(self, state, original_samples, noise, i):
    """The starting latent of an img2img or hires run whose first position is `i`: the clean
    sample noised to that position's level (`add_noise`), or A1111's own level in its `a1111`
    form (its DDIM, PLMS and UniPC noise to the timestep above their first call's)."""
    return self.add_noise(state, original_samples, noise, i)

  def program(self) -> Scheduler:
    """The scheduler as the compiled sampling program sees it (its jit-static part).

    Options whose value lives only in the state `set_timesteps` returns (DDIM's eta, the noise
    levels of `schedule_options`) are normalised here, so that changing them does not compile a
    new program.
    """
    config, options = self.cfg, self.state_options()
    if not any(key in config for key in options):
      return self
    config = {k: v for k, v in config.items() if k not in options}
    return dataclasses.replace(self, config=hashable_config(config))

  def img2img_steps(self, num_inference_steps: int, strength: float) -> tuple[int, int]:
    """(steps the schedule is placed for, the first of them run) of an img2img run of n steps at
    `strength`: diffusers' (the last int(n * strength) of n: its img2img `get_timesteps`); in
    the `k_diffusion` form A1111's, one more (the last int(min(strength, 0.999) * n) + 1 of n:
    its sd_samplers_common.setup_img2img_steps); in the `comfyui` form ComfyUI's (the last n of
    int(n / strength): its KSampler.set_steps). A list of sigmas or timesteps: diffusers'."""
    n, config = num_inference_steps, self.cfg
    if config.get(A1111_IMG2IMG) is not None:  # A1111's own loops: its img2img positions only
      return n, 0
    if all(config.get(key) is None for key in ("sigmas", "timesteps")):
      if config.get("comfyui"):
        total = int(n / strength) if strength <= 0.9999 else n
        return total, total - n
      if config.get("k_diffusion"):
        return n, n - int(min(strength, 0.999) * n) - 1
    return n, self.begin_index(n, strength) // self.order

  def planned_from(self, first_step: int) -> tuple[Scheduler, int]:
    """(the scheduler, its first step) of an img2img or hires run from step `first_step` of its
    placed schedule: itself, or one that plans its run over the levels from there
    (`plans_its_run`), from its first step."""
    if not self.plans_its_run:
      return self, first_step
    return dataclasses.replace(self, config=hashable_config(
      {**self.cfg, PLAN_START: int(first_step)})), 0

  def step_position(self, state, step: int) -> int:
    """The position (model call) where step `step` of `state`'s schedule starts: `order` calls a
    step, the last step's one call after them."""
    del state
    return step * self.order

  def starts_step(self, state, position: int) -> bool:
    """Whether a run may start at `position`: the first call of a step, not between a step's
    calls."""
    del state
    return position % self.order == 0

  def begin_index(self, num_inference_steps: int, strength: float) -> int:
    """First position of an img2img run, as diffusers' img2img `get_timesteps`."""
    init_timestep = min(int(num_inference_steps * strength), num_inference_steps)
    t_start = max(num_inference_steps - init_timestep, 0)
    return t_start * self.order


def hashable_config(config: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
  """Freezes a resolved config so a scheduler dataclass can be a jit static argument."""

  def freeze(value):
    if isinstance(value, (list, np.ndarray)):
      return tuple(np.asarray(value).tolist())
    return value

  return tuple(sorted((k, freeze(v)) for k, v in config.items() if k not in _META_KEYS))


def karras_sigmas(sigma_min: float, sigma_max: float, num_inference_steps: int,
                  rho: float = 7.0) -> np.ndarray:
  """Karras et al. (2022) noise levels (rho 7 by default), float64 as diffusers'
  `_convert_to_karras`."""
  ramp = np.linspace(0, 1, num_inference_steps)
  min_inv_rho = sigma_min ** (1 / rho)
  max_inv_rho = sigma_max ** (1 / rho)
  return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


# diffusers' sigma spacings beside the schedule's own (options use_<kind>_sigmas; at most one).
SIGMA_SPACINGS = ("karras", "exponential", "beta")


def sigma_spacing(scheduler_name: str, config: dict[str, Any]) -> str | None:
  """Which of diffusers' `use_karras_sigmas` / `use_exponential_sigmas` / `use_beta_sigmas` the
  config sets (None: the schedule's own sigmas); more than one is an error, as in diffusers."""
  chosen = [kind for kind in SIGMA_SPACINGS if config.get(f"use_{kind}_sigmas")]
  if len(chosen) > 1:
    raise SchedulerConfigError(
      f"scheduler {scheduler_name!r}: only one of "
      f"{', '.join(f'use_{kind}_sigmas' for kind in chosen)} can be set (as in diffusers)")
  return chosen[0] if chosen else None


def spaced_sigmas(kind: str, sigma_min: float, sigma_max: float,
                  num_inference_steps: int, k_diffusion: bool = False, rho: float | None = None,
                  beta: tuple[float, float] | None = None) -> np.ndarray:
  """float64 descending noise levels from sigma_max to sigma_min, as diffusers'
  `_convert_to_karras` (rho 7), `_convert_to_exponential` (even in log sigma) and
  `_convert_to_beta` (the quantiles of Beta(0.6, 0.6) at evenly spaced levels; "Beta Sampling is
  All You Need", Lee et al. 2024) place them. `k_diffusion`: Karras and Exponential levels as
  k-diffusion's get_sigmas_karras / get_sigmas_exponential (A1111's, ComfyUI's) compute them, in
  float32: its (...) ** 7 lands up to ~30 ulps off the float64 levels, which a zero-terminal-SNR
  run's first step (from 4518.8) shows. `rho` (Karras', default 7) and `beta` (Beta's alpha and
  beta, default 0.6 each): A1111's settings (`common.SCHEDULE_SETTINGS`)."""
  n = num_inference_steps
  rho = 7.0 if rho is None else float(rho)
  if k_diffusion and kind == "karras":
    ramp = torch_linspace_f32(0.0, 1.0, n)
    min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    levels = np.float32(max_inv_rho) + ramp * np.float32(min_inv_rho - max_inv_rho)
    return (levels ** np.float32(rho)).astype(np.float64)
  if k_diffusion and kind == "exponential":
    return exp_f32(torch_linspace_f32(math.log(sigma_max), math.log(sigma_min), n)).astype(
      np.float64)
  if kind == "karras":
    return karras_sigmas(sigma_min, sigma_max, num_inference_steps, rho)
  if kind == "exponential":
    return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), num_inference_steps))
  if kind == "beta":
    from scipy import stats  # noqa: PLC0415  (a dependency of jax; only this option needs it)

    ppf = stats.beta.ppf(1 - np.linspace(0, 1, num_inference_steps), *(beta or (0.6, 0.6)))
    return sigma_min + ppf * (sigma_max - sigma_min)
  raise ValueError(f"unknown sigma spacing {kind!r}")


def sigma_to_t(sigmas: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
  """Fractional training timesteps of `sigmas`, interpolating in log-sigma (float64).

  diffusers' `_sigma_to_t`, vectorised over `sigmas`; `log_sigmas` is the float32 log of the
  training sigmas in ascending-t order, and its float32 differences stay float32 as there.
  """
  log_sigma = np.log(np.maximum(np.asarray(sigmas, dtype=np.float64), 1e-10))
  dists = log_sigma[np.newaxis, :] - log_sigmas[:, np.newaxis]
  low_idx = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
  high_idx = low_idx + 1
  low, high = log_sigmas[low_idx], log_sigmas[high_idx]
  w = np.clip((low - log_sigma) / (low - high), 0, 1)
  return (1 - w) * low_idx + w * high_idx


def nearest_t(sigmas: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
  """float32 whole training timesteps nearest to `sigmas` in float32 log sigma (the first of
  equals): ComfyUI's `ModelSamplingDiscrete.timestep`, what its UNet sees."""
  with np.errstate(divide="ignore"):
    log_sigma = np.log(np.asarray(sigmas, np.float32))
  dists = np.abs(log_sigma[np.newaxis, :] - np.asarray(log_sigmas, np.float32)[:, np.newaxis])
  return dists.argmin(axis=0).astype(np.float32)


def first_noise_scale(config: dict[str, Any], sigmas: np.ndarray) -> np.float32 | None:
  """The scale of unit noise into a run's first latent that the `comfyui` or
  `sgm_noise_multiplier` option sets (float32, as torch), else None. ComfyUI's
  (`EPS.noise_scaling`): sqrt(1 + sigma_0^2) where the run starts at the largest training sigma
  (or above), else sigma_0; A1111's SGM noise multiplier: sqrt(1 + sigma_0^2)."""
  first = np.float32(sigmas[0])
  if config.get("sgm_noise_multiplier"):
    return np.sqrt(np.float32(1.0) + first * first)
  if not config.get("comfyui"):
    return None
  from sdjax.schedulers.euler import train_alphas_cumprod  # noqa: PLC0415  (euler imports us)

  alphas_cumprod = train_alphas_cumprod(config).astype(np.float32)
  sigma_max = np.float32(np.sqrt((1 - alphas_cumprod[-1]) / alphas_cumprod[-1]))
  if math.isclose(float(sigma_max), float(first), rel_tol=1e-5) or first > sigma_max:
    return np.sqrt(np.float32(1.0) + first * first)
  return first


def edm_noise_range(config: dict[str, Any], defaults: dict[str, Any]) -> None:
  """EDM schedulers: a `sigma_min` / `sigma_max` / `sigma_data` of None (as other schedulers'
  configs carry them: Euler's) takes the class default, in place. (diffusers fails on it.)"""
  for key in ("sigma_min", "sigma_max", "sigma_data"):
    if config[key] is None:
      config[key] = defaults[key]


def edm_precondition(sigmas: np.ndarray, sigma_data: float, prediction_type: str) -> np.ndarray:
  """[3, n] float32 (c_in, c_skip, c_out) of Karras et al.'s EDM formulation at float32 `sigmas`,
  in diffusers' order of operations: the model sees c_in * x, and x0 = c_skip * x + c_out *
  output (c_out negated for v-prediction)."""
  var = sigmas**2 + np.float32(sigma_data**2)
  root = np.sqrt(var)
  sign = np.float32(1.0 if prediction_type == "epsilon" else -1.0)
  c_out = (sign * sigmas) * np.float32(sigma_data) / root
  return np.stack([np.float32(1.0) / root, np.float32(sigma_data**2) / var, c_out])


def log_f32(x: np.ndarray) -> np.ndarray:
  """float32 natural log, correctly rounded (via float64) so it is the same on every host."""
  with np.errstate(divide="ignore"):
    return np.log(np.asarray(x, np.float64)).astype(np.float32)


def exp_f32(x: np.ndarray) -> np.ndarray:
  """float32 exp, correctly rounded (via float64)."""
  return np.exp(np.asarray(x, np.float64)).astype(np.float32)


def expm1_f32(x: np.ndarray) -> np.ndarray:
  """float32 exp(x) - 1, correctly rounded (via float64)."""
  return np.expm1(np.asarray(x, np.float64)).astype(np.float32)


def vp_alpha_sigma(sigmas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(alpha_t, sigma_t) of the variance-preserving process at VE noise levels `sigmas`."""
  alpha_t = 1 / np.sqrt(sigmas**2 + 1)
  return alpha_t, sigmas * alpha_t


def rounded(x):
  """`x`, rounded to its dtype before whatever consumes it: keeps `a * b + c` two roundings.

  XLA's LLVM backends always allow contracting a product and a sum into one fused multiply-add;
  torch rounds each op, and where a step cancels (v-prediction, few steps) the difference grows
  past float32 parity. The select is opaque to that contraction and passes every value through.
  """
  return jnp.where(jnp.isnan(x), jnp.nan, x)


def true_divide(x, divisor):
  """`x / divisor`, correctly rounded also when `divisor` is a scalar or a constant.

  XLA rewrites division by a broadcast scalar into multiplication by its reciprocal (off by an
  ulp for about a quarter of the elements); dividing by a same-shape array keeps the division.
  """
  return x / jnp.where(jnp.isnan(x), x, divisor)
