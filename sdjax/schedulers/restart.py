"""Restart sampling (Xu et al. 2023, "Restart Sampling for Improving Generative Processes"), as
AUTOMATIC1111's "Restart" sampler runs it; diffusers has none.

Heun steps (k-diffusion's, churn 0: an Euler guess, then the step with the two slopes' mean; the
step to 0 is Euler's alone) down a descending list of noise levels (Karras's between the
training sigmas' extremes unless a spacing or schedule option places them: A1111's Automatic
for Restart, whatever the checkpoint's timestep spacing), which now and then climbs
back: at such a restart the sample gets fresh noise of scale sqrt(sigma_high^2 - sigma_low^2) and
is denoised again from sigma_high. A1111's automatic plan: below 20 steps none (plain Heun over
the schedule's levels); from 20 steps, Karras levels for `steps - K * R` steps between the
schedule's first level and its last above 0, and, at the level nearest 0.1, R restarts up to the
level nearest 2 (K = 9, R = 1; from 36 steps K = steps // 4, R = 2), each walking K Karras levels
back down to the level it left. So a run of n steps makes more UNet calls than 2n - 1.

The whole walk is laid out on the host as positions, Heun's two per step (one for the step to
0), each with the sigma the model sees, the step in sigma, its stage, and the scale of the fresh
noise added after it (before a restart's first model call): the compiled program only reads
them. A1111 draws a restart's noise from torch's global generator, not from the image's seed, so
its Restart images are not reproducible beyond 19 steps (below, there is no restart); sdjax
draws it from the image's noise stream (a draw per position, as for its other stochastic
samplers; only a restart's is used).

An img2img run or hires pass is A1111's sample_img2img: no suffix of the text-to-image walk
(which climbs), but the same automatic plan over the levels the run keeps (`PLAN_START`: the
last t_enc + 1 of the schedule and 0; from 20 of them, restarts), from the image noised to the
first of them. No refiner handoff.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
from flax import struct

from sdjax.schedulers.common import (
  PLAN_START,
  SchedulerConfigError,
  rounded,
  sigma_spacing,
  sigma_to_t,
  true_divide,
)
from sdjax.schedulers.euler import (
  SigmaScheduler,
  as_f32,
  input_scales,
  predict_original,
  sigma_schedule,
  train_alphas_cumprod,
  train_sigmas,
)
from sdjax.schedulers.kdpm2 import KDPM2DiscreteScheduler
from sdjax.schedulers.sigma_schedules import SCHEDULE_OPTIONS

_F32 = np.float32
# Position stages.
_EULER, _PREDICT, _CORRECT = 0, 1, 2


@struct.dataclass
class RestartState:
  """A Restart run; per-position arrays have one entry per model call.

  Attributes:
    timesteps: float32, the t fed to the UNet (each sigma's own, fractional).
    sigma_in: float32, the noise level the model sees.
    input_scale, v_out, v_den: as Euler's, at sigma_in.
    dt: the step in sigma (a corrector's: its step's whole, as its predictor's).
    stage: int32, _EULER (the step to 0), _PREDICT or _CORRECT.
    noise_after: float32, the scale of fresh noise added after the position (0 but before a
      restart).
    init_sigma: [] float32, the schedule's first level (k-diffusion's start: noise x sigma_max;
      an img2img run's: the first level it keeps), which the walk's Karras replan may round.
    prev_derivative, prev_sample: the predictor's slope and start, for the corrector.
  """

  timesteps: jnp.ndarray
  sigma_in: jnp.ndarray
  input_scale: jnp.ndarray
  v_out: jnp.ndarray
  v_den: jnp.ndarray
  dt: jnp.ndarray
  stage: jnp.ndarray
  noise_after: jnp.ndarray
  init_sigma: jnp.ndarray
  prev_derivative: jnp.ndarray
  prev_sample: jnp.ndarray


def karras_f32(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> np.ndarray:
  """float32 [n + 1]: k-diffusion's `get_sigmas_karras` (its float32 arithmetic), then 0."""
  ramp = np.linspace(0, 1, n, dtype=_F32)
  min_inv, max_inv = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
  levels = (_F32(max_inv) + ramp * _F32(min_inv - max_inv)) ** _F32(rho)
  return np.append(levels.astype(_F32), _F32(0))


def restart_walk(sigmas: np.ndarray) -> list[tuple[float, float]]:
  """The (from, to) noise levels of A1111's automatic Restart plan over a schedule's `sigmas`
  (float32, [n + 1], ending in 0), in order."""
  steps = len(sigmas) - 1
  if steps < 20:
    return [(sigmas[i], sigmas[i + 1]) for i in range(steps)]
  back, times = (steps // 4, 2) if steps >= 36 else (9, 1)
  sigmas = karras_f32(steps - back * times, float(sigmas[-2]), float(sigmas[0]))
  low = int(np.argmin(np.abs(sigmas - _F32(0.1))))
  high = int(np.argmin(np.abs(sigmas - _F32(2))))
  walk = []
  for i in range(len(sigmas) - 1):
    walk.append((sigmas[i], sigmas[i + 1]))
    if i + 1 == low and high < low:
      climb = karras_f32(back + 1, float(sigmas[low]), float(sigmas[high]))[:-1]
      walk += list(zip(climb[:-1], climb[1:], strict=True)) * times
  return walk


@dataclasses.dataclass(frozen=True)
class RestartScheduler(SigmaScheduler):
  """A1111's "Restart" (see the module docstring)."""

  name = "restart"
  order = 2  # model calls per step on the way down (A1111 counts it a second-order sampler)
  needs_noise = True
  plans_its_run = True  # img2img and hires: its plan over the levels they keep
  schedule_options = (*SigmaScheduler.schedule_options, PLAN_START)

  # No diffusers class of its own: the config a sigma scheduler reads, as KDPM2's.
  _DEFAULTS = KDPM2DiscreteScheduler._DEFAULTS
  _PREDICTION_TYPES = ("epsilon", "v_prediction")

  def set_timesteps(self, num_inference_steps: int, sample_shape: tuple[int, ...] | None = None):
    if sample_shape is None:
      raise ValueError("restart keeps the predictor's sample for the corrector: pass "
                       "set_timesteps(num_inference_steps, sample_shape=latents.shape)")
    config = self.cfg
    if not (sigma_spacing(self.name, config) or any(config.get(key) is not None
                                                    for key in SCHEDULE_OPTIONS)):
      config = {**config, "use_karras_sigmas": True}  # A1111's Automatic for Restart
    alphas_cumprod = train_alphas_cumprod(config)
    _, sigmas = sigma_schedule(config, num_inference_steps, alphas_cumprod, name=self.name)
    sigmas = sigmas.astype(_F32)[config.get(PLAN_START, 0):]
    walk = restart_walk(sigmas)
    sigma_in, dt, stage, noise_after = [], [], [], []
    for k, (old, new) in enumerate(walk):
      if new == 0:  # Euler's step alone
        sigma_in += [old]
        stage += [_EULER]
      else:
        sigma_in += [old, new]
        stage += [_PREDICT, _CORRECT]
      dt += [new - old] * (len(sigma_in) - len(dt))
      after = _F32(0)
      if k + 1 < len(walk) and walk[k + 1][0] > new:  # a restart: noise back up to that level
        after = np.sqrt(walk[k + 1][0] ** 2 - new**2)
      noise_after += [_F32(0)] * (len(sigma_in) - len(noise_after) - 1) + [after]
    sigma_in = np.asarray(sigma_in, _F32)
    scale = input_scales(sigma_in)
    log_sigmas = np.log(train_sigmas(alphas_cumprod))
    zeros = jnp.zeros(sample_shape, jnp.float32)
    return RestartState(
      timesteps=jnp.asarray(sigma_to_t(sigma_in, log_sigmas).astype(_F32)),
      sigma_in=jnp.asarray(sigma_in),
      input_scale=jnp.asarray(scale),
      v_out=jnp.asarray(-sigma_in / scale),
      v_den=jnp.asarray(sigma_in**2 + 1),
      dt=jnp.asarray(np.asarray(dt, _F32)),
      stage=jnp.asarray(np.asarray(stage, np.int32)),
      noise_after=jnp.asarray(np.asarray(noise_after, _F32)),
      init_sigma=jnp.asarray(sigmas[0]),
      prev_derivative=zeros,
      prev_sample=zeros,
    )

  def step(self, state, model_output, i, sample, noise=None):
    if noise is None:
      raise ValueError("restart adds fresh noise at each restart: pass noise=")
    sample32 = as_f32(sample)
    sigma = state.sigma_in[i]
    pred_original = predict_original(self.prediction_type, as_f32(model_output), sample32, sigma,
                                     state.v_out[i], state.v_den[i])
    derivative = true_divide(sample32 - pred_original, sigma)
    correct = state.stage[i] == _CORRECT
    slope = jnp.where(correct, (state.prev_derivative + derivative) / 2, derivative)
    start = jnp.where(correct, state.prev_sample, sample32)
    prev_sample = start + rounded(slope * state.dt[i])
    prev_sample = prev_sample + rounded(as_f32(noise) * state.noise_after[i])
    new_state = state.replace(prev_derivative=derivative, prev_sample=sample32)
    return prev_sample.astype(sample.dtype), new_state

  def add_noise(self, state, original_samples, noise, i):
    """The sample noised to position i's level (the level of the sample that enters it); at 0,
    an img2img run's start (it plans its run, so it starts there): the image plus noise times
    the first level it keeps, A1111's `x + noise * sigma_sched[0]`."""
    level = jnp.where(i == 0, state.init_sigma, state.sigma_in[i])
    noisy = as_f32(original_samples) + rounded(as_f32(noise) * level)
    return noisy.astype(original_samples.dtype)

  def init_noise_sigma(self, state):
    return state.init_sigma

  def img2img_steps(self, num_inference_steps: int, strength: float) -> tuple[int, int]:
    """A1111's (Restart is its sampler): the last int(min(strength, 0.999) * n) + 1 of n levels
    above 0, as its setup_img2img_steps; `planned_from` plans the walk over them."""
    n = num_inference_steps
    return n, n - int(min(strength, 0.999) * n) - 1

  def begin_index(self, num_inference_steps: int, strength: float) -> int:
    raise SchedulerConfigError("restart plans its img2img run over the levels it keeps "
                               "(`img2img_steps`, `planned_from`), not from a position")
