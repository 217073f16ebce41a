"""PNDM (Liu et al. 2022): pseudo Runge-Kutta warm-up then PLMS, as diffusers' `PNDMScheduler`.

diffusers drives its branches with a call counter, not with the position in the schedule, so an
img2img run that starts part-way still warms up from an empty history. Here the counter and the
history live in the state, and every (counter phase, position) pair the step can meet gets its
transfer coefficients computed once on the host (float32 numpy, diffusers' order of operations).

Counter phases: with `skip_prk_steps` (Stable Diffusion's PLMS) a run makes one extra model call;
call 0 is an Euler-like step, call 1 re-evaluates the model at the next timestep and redoes that
step from the same start with the mean of both outputs, later calls use the 2-, 3- and 4-step
Adams-Bashforth combinations of the stored outputs. Without it the first 12 calls are three
4-call pseudo Runge-Kutta steps, then 4-step PLMS.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import struct

from sdjax.schedulers.common import (
  A1111_IMG2IMG,
  Scheduler,
  SchedulerConfigError,
  hashable_config,
  resolve_config,
  rounded,
  true_divide,
)
from sdjax.schedulers.ddim import (
  A1111,
  A1111Start,
  a1111_start,
  a1111_timesteps,
  alpha_prod_at,
  check_discrete,
  discrete_timesteps,
  f32,
  schedule_alphas,
  sqrt_one_minus,
)
from sdjax.schedulers.sigma_schedules import DOWNCAST_ALPHAS_CUMPROD, ZERO_SNR

_PRK_CALLS = 12  # 3 pseudo Runge-Kutta steps of 4 model calls


@struct.dataclass
class PNDMState:
  """A PNDM run.

  Attributes:
    timesteps: [n] int32, the t fed to the UNet at each position.
    sample_coeff, alpha_diff, denominator: [phases, n] float32 coefficients of the transfer from
      t to t_prev, `prev = sample_coeff * x - alpha_diff * eps / denominator` (PNDM paper eq. 9);
      row = counter phase, column = position.
    sqrt_alpha, sqrt_one_minus_alpha: [phases, n] float32 alpha roots at that t (v-prediction).
    add_noise_alpha, add_noise_sigma: [n] float32 alpha roots at each position's timestep.
    ets: [4, *sample_shape] float32 past model outputs, newest first.
    cur_sample: the sample the current multi-call step started from.
    cur_model_output: the running Runge-Kutta sum (PRK only).
    counter: int32 model calls made so far.
    start: None, or A1111's img2img noising (`ddim.a1111_start`).
  """

  timesteps: jnp.ndarray
  sample_coeff: jnp.ndarray
  alpha_diff: jnp.ndarray
  denominator: jnp.ndarray
  sqrt_alpha: jnp.ndarray
  sqrt_one_minus_alpha: jnp.ndarray
  add_noise_alpha: jnp.ndarray
  add_noise_sigma: jnp.ndarray
  ets: jnp.ndarray
  cur_sample: jnp.ndarray
  cur_model_output: jnp.ndarray
  counter: jnp.ndarray
  start: tuple[jnp.ndarray, jnp.ndarray] | None = None


@dataclasses.dataclass(frozen=True)
class PNDMScheduler(A1111Start, Scheduler):
  """diffusers' `PNDMScheduler` (both the PRK warm-up and the `skip_prk_steps` PLMS path)."""

  name = "pndm"
  order = 1
  # A1111's PLMS (modules/sd_samplers_timesteps_impl.plms): the PLMS path over A1111's DDIM
  # timesteps (`ddim.A1111`), its first step's second call at the next one, its last step to
  # timestep 1's level: one call more than those timesteps less one.
  schedule_options = (A1111, A1111_IMG2IMG, DOWNCAST_ALPHAS_CUMPROD, ZERO_SNR)

  _DEFAULTS = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "skip_prk_steps": False,
    "set_alpha_to_one": False,
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
    "steps_offset": 0,
  }

  @classmethod
  def from_config(cls, scheduler_config: dict[str, Any], **overrides):
    if overrides.get(A1111):  # A1111's PLMS never warms up by Runge-Kutta
      overrides = {**overrides, "skip_prk_steps": True}
    config = resolve_config(cls.name, cls._DEFAULTS, scheduler_config, overrides=overrides)
    check_discrete(cls.name, config, ("epsilon", "v_prediction"))
    return cls(config=hashable_config(config))

  @property
  def _skip_prk(self) -> bool:
    return bool(self.cfg["skip_prk_steps"])

  def _schedule(self, num_inference_steps: int):
    """(timesteps [n], prk_timesteps [12 or 0]) as diffusers' set_timesteps, int64."""
    config = self.cfg
    if config.get(A1111):
      ascending = a1111_timesteps(config, num_inference_steps)[0][::-1]
    else:
      ascending = discrete_timesteps(config, num_inference_steps)[::-1]
    if self._skip_prk:
      # The second-to-last training-order timestep twice: PLMS's extra warm-up call.
      plms = np.concatenate([ascending[:-1], ascending[-2:-1], ascending[-1:]])[::-1]
      return plms.astype(np.int64), np.zeros([0], np.int64)
    if num_inference_steps < 4:
      raise SchedulerConfigError(
        f"scheduler {self.name!r}: the pseudo Runge-Kutta warm-up (skip_prk_steps=False) needs "
        f"num_inference_steps >= 4, got {num_inference_steps}"
      )
    half = int(config["num_train_timesteps"]) // num_inference_steps // 2
    prk = np.repeat(ascending[-4:], 2) + np.tile(np.array([0, half]), 4)
    prk = np.repeat(prk[:-1], 2)[1:-1][::-1]
    plms = ascending[:-3][::-1]
    return np.concatenate([prk, plms]).astype(np.int64), prk.astype(np.int64)

  def set_timesteps(self, num_inference_steps: int, sample_shape: tuple[int, ...] | None = None):
    if sample_shape is None:
      raise ValueError("pndm keeps a history of model outputs: set_timesteps needs sample_shape")
    config = self.cfg
    timesteps, prk_timesteps = self._schedule(num_inference_steps)
    ratio = int(config["num_train_timesteps"]) // num_inference_steps
    n = len(timesteps)
    # (t, t_prev) per counter phase (rows) and position (columns), as diffusers' step picks them.
    if self._skip_prk:
      t_rows = [timesteps, timesteps + ratio, timesteps]
      prev_rows = [timesteps - ratio, timesteps, timesteps - ratio]
    else:
      half = ratio // 2
      t_rows, prev_rows = [], []
      for c in range(_PRK_CALLS):
        t_rows.append(np.full(n, prk_timesteps[c // 4 * 4]))
        prev_rows.append(timesteps - (0 if c % 2 else half))
      t_rows.append(timesteps)
      prev_rows.append(timesteps - ratio)
    t_table, prev_table = np.stack(t_rows), np.stack(prev_rows)

    alphas_cumprod = schedule_alphas(config)
    final = np.float32(1.0) if config["set_alpha_to_one"] else alphas_cumprod[0]
    # Phases a run never reaches at some position may index past the table; diffusers would
    # never compute them, so they are clamped rather than raised.
    alpha = alphas_cumprod[np.clip(t_table, 0, len(alphas_cumprod) - 1)]
    alpha_prev = alpha_prod_at(alphas_cumprod, prev_table, final)
    beta, beta_prev = 1 - alpha, 1 - alpha_prev
    alpha_diff = alpha_prev - alpha
    denominator = alpha * np.sqrt(beta_prev) + np.sqrt(alpha * beta * alpha_prev)
    if config.get(DOWNCAST_ALPHAS_CUMPROD):
      # A1111's update sqrt(a_prev) (x - s eps) / sqrt(a) + sqrt(1 - a_prev) eps with its float16
      # s = sqrt(1 - a) differs from diffusers' form: eps's coefficient, over a denominator of 1.
      a, a_prev = alpha.astype(np.float64), alpha_prev.astype(np.float64)
      alpha_diff = np.sqrt(a_prev / a) * sqrt_one_minus(config, alpha) - np.sqrt(1 - a_prev)
      denominator = np.ones_like(alpha)
    alpha_at_t = alphas_cumprod[timesteps]

    buffer = np.zeros(tuple(sample_shape), np.float32)
    return PNDMState(
      timesteps=jnp.asarray(timesteps.astype(np.int32)),
      sample_coeff=f32(np.sqrt(alpha_prev / alpha)),
      alpha_diff=f32(alpha_diff),
      denominator=f32(denominator),
      sqrt_alpha=f32(np.sqrt(alpha)),
      sqrt_one_minus_alpha=f32(sqrt_one_minus(config, alpha)),
      add_noise_alpha=f32(np.sqrt(alpha_at_t)),
      add_noise_sigma=f32(np.sqrt(1 - alpha_at_t)),
      ets=jnp.zeros((4,) + tuple(sample_shape), jnp.float32),
      cur_sample=jnp.asarray(buffer),
      cur_model_output=jnp.asarray(buffer),
      counter=jnp.zeros([], jnp.int32),
      start=a1111_start(config, alphas_cumprod, num_inference_steps) if config.get(A1111)
      else None,
    )

  def init_noise_sigma(self, state):
    del state
    return 1.0

  def step(self, state, model_output, i, sample, noise=None):
    del noise
    x = sample.astype(jnp.float32)
    out = model_output.astype(jnp.float32)
    c = state.counter
    ets = state.ets
    pushed = jnp.concatenate([out[None], ets[:3]])

    def adams_bashforth(e, count):
      """diffusers' PLMS combinations of the newest `count` outputs (newest first in `e`)."""
      two = (rounded(3 * e[0]) - e[1]) / 2  # a halving is exact, whatever XLA makes of it
      three = true_divide(rounded(23 * e[0]) - rounded(16 * e[1]) + rounded(5 * e[2]), 12)
      terms = [rounded(w * e[k]) for k, w in enumerate((55, 59, 37, 9))]
      four = (1 / 24) * (terms[0] - terms[1] + terms[2] - terms[3])
      return jnp.where(count == 2, two, jnp.where(count == 3, three, four))

    if self._skip_prk:
      first, second = c == 0, c == 1
      eps = jnp.where(
        first,
        out,
        jnp.where(second, (out + ets[0]) / 2, adams_bashforth(pushed, jnp.minimum(c, 4))),
      )
      # Call 1 redoes call 0's step from the same start, so it neither stores its output nor
      # moves the start.
      new_ets = jnp.where(second, ets, pushed)
      start = jnp.where(second, state.cur_sample, x)
      new_cur_sample = jnp.where(first, x, state.cur_sample)
      new_cur_output = state.cur_model_output
      phase = jnp.minimum(c, 2)
    else:
      prk = c < _PRK_CALLS
      r = c % 4
      acc = state.cur_model_output
      # Runge-Kutta weights 1/6, 1/3, 1/3, 1/6 accumulated in diffusers' order.
      new_acc = jnp.where(
        r == 0, (1 / 6) * out, jnp.where(r == 3, jnp.zeros_like(acc), acc + rounded((1 / 3) * out))
      )
      prk_eps = jnp.where(r == 3, acc + rounded((1 / 6) * out), out)
      prk_cur_sample = jnp.where(r == 0, x, state.cur_sample)
      eps = jnp.where(prk, prk_eps, adams_bashforth(pushed, 4))
      new_ets = jnp.where(prk & (r != 0), ets, pushed)
      start = jnp.where(prk, prk_cur_sample, x)
      new_cur_sample = jnp.where(prk, prk_cur_sample, state.cur_sample)
      new_cur_output = jnp.where(prk, new_acc, acc)
      phase = jnp.minimum(c, _PRK_CALLS)

    if self.cfg["prediction_type"] == "v_prediction":
      eps = rounded(state.sqrt_alpha[phase, i] * eps) + rounded(
        state.sqrt_one_minus_alpha[phase, i] * start
      )
    prev = rounded(state.sample_coeff[phase, i] * start) - true_divide(
      state.alpha_diff[phase, i] * eps, state.denominator[phase, i]
    )
    new_state = state.replace(
      ets=new_ets, cur_sample=new_cur_sample, cur_model_output=new_cur_output, counter=c + 1
    )
    return prev.astype(sample.dtype), new_state

  def add_noise(self, state, original_samples, noise, i):
    original = original_samples.astype(jnp.float32)
    noise = noise.astype(jnp.float32)
    noisy = rounded(state.add_noise_alpha[i] * original) + rounded(state.add_noise_sigma[i] * noise)
    return noisy.astype(original_samples.dtype)
