"""DEIS multistep (Zhang and Chen 2023), as diffusers' `DEISMultistepScheduler`: its log-rho
multistep form ("logrho", the only one diffusers has).

The solver integrates the noise prediction eps (recovered from the model's x0, whatever its
prediction type) over rho = sigma_t / alpha_t: order 1 is DDIM's step, orders 2 and 3 weigh the
current and the one or two earlier eps by the integrals of their Lagrange polynomials in log rho
(diffusers' `ind_fn`). Orders as diffusers: the run's first step is first order, the second at
most second order, and below 15 steps the last two steps drop to first and second order
(`lower_order_final`). The noise levels are diffusers' DPM-Solver's (spacings, Karras /
exponential / beta sigmas), ending at the smallest training level, never at 0 (DEIS's log rho is
undefined there).

Every coefficient depends only on the position, so the host computes them in float32 in
diffusers' order of operations (its logs are numpy's float32 ones, as diffusers' `np.log` of
torch scalars); the device only combines arrays.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import struct

from sdjax.schedulers.common import (
  Scheduler,
  exp_f32,
  hashable_config,
  log_f32,
  resolve_config,
  rounded,
  sigma_spacing,
  true_divide,
  vp_alpha_sigma,
)
from sdjax.schedulers.dpmpp import VPDataPrediction, multistep_sigmas, multistep_timesteps
from sdjax.schedulers.euler import (
  as_f32,
  check_choice,
  check_common,
  train_alphas_cumprod,
  train_sigmas,
)

_F32 = np.float32


@struct.dataclass
class DEISState:
  """A DEIS run. Positions i = 0..n-1; per-position arrays are float32 [n] unless noted.

  Attributes:
    timesteps: [n] float32, the (whole) t fed to the UNet at each position.
    sigmas: [n + 1] float32 noise levels, the last one after the last step.
    alpha_t: [n + 1] 1 / sqrt(sigma^2 + 1).
    sigma_t: [n + 1] sigma * alpha_t.
    c1: [n, 2] the first-order step's weights: alpha_t[i+1] / alpha_t[i] on the sample,
      sigma_t[i+1] (e^h - 1) on eps.
    c2: [n, 2] the second-order step's weights on the current and the previous eps.
    c3: [n, 3] the third-order step's, on the current and the two previous eps.
    model_outputs: [solver_order - 1, *sample_shape] float32, earlier eps, newest last.
    lower_order_nums: [] int32, steps taken in this run, capped at solver_order.
  """

  timesteps: jnp.ndarray
  sigmas: jnp.ndarray
  alpha_t: jnp.ndarray
  sigma_t: jnp.ndarray
  c1: jnp.ndarray
  c2: jnp.ndarray
  c3: jnp.ndarray
  model_outputs: jnp.ndarray
  lower_order_nums: jnp.ndarray


def _log(x) -> np.float32:
  """numpy's float32 log, as diffusers' `np.log` of a float32 torch scalar."""
  return np.log(np.asarray(x, _F32))


def _ind2(t, b, c):
  """diffusers' second-order `ind_fn`: t (log t - log c - 1) / (log b - log c), in float32."""
  return t * (-_log(c) + _log(t) - _F32(1)) / (_log(b) - _log(c))


def _ind3(t, b, c, d):
  """diffusers' third-order `ind_fn`, in float32, its operations in its order."""
  log_t = _log(t)  # squared as torch squares (exactly; numpy's float32 ** 2 is not)
  numerator = t * (_log(c) * (_log(d) - log_t + _F32(1)) - _log(d) * log_t + _log(d)
                   + log_t * log_t - _F32(2) * log_t + _F32(2))
  denominator = (_log(b) - _log(c)) * (_log(b) - _log(d))
  return numerator / denominator


@dataclasses.dataclass(frozen=True)
class DEISMultistepScheduler(VPDataPrediction, Scheduler):
  """diffusers' `DEISMultistepScheduler` (algorithm_type "deis", solver_type "logrho")."""

  name = "deis"

  _DEFAULTS = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "solver_order": 2,
    "prediction_type": "epsilon",
    "thresholding": False,
    "dynamic_thresholding_ratio": 0.995,
    "sample_max_value": 1.0,
    "algorithm_type": "deis",
    "solver_type": "logrho",
    "lower_order_final": True,
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "use_flow_sigmas": False,
    "flow_shift": 1.0,
    "timestep_spacing": "linspace",
    "steps_offset": 0,
    "use_dynamic_shifting": False,
    "time_shift_type": "exponential",
  }
  _UNSUPPORTED = {"thresholding": False, "use_flow_sigmas": False, "use_dynamic_shifting": False}

  @classmethod
  def from_config(cls, scheduler_config: dict[str, Any], **overrides):
    config = resolve_config(cls.name, cls._DEFAULTS, scheduler_config,
                            unsupported=cls._UNSUPPORTED, overrides=overrides)
    check_common(cls.name, config, ("epsilon", "v_prediction", "sample"))
    # diffusers' own substitutions: its DEIS has one algorithm and one solver type
    if config["algorithm_type"] in ("dpmsolver", "dpmsolver++"):
      config["algorithm_type"] = "deis"
    if config["solver_type"] in ("midpoint", "heun", "bh1", "bh2"):
      config["solver_type"] = "logrho"
    check_choice(cls.name, "algorithm_type", config["algorithm_type"], ("deis",))
    check_choice(cls.name, "solver_type", config["solver_type"], ("logrho",))
    check_choice(cls.name, "solver_order", config["solver_order"], (1, 2, 3))
    return cls(config=hashable_config(config))

  def _schedule(self, num_inference_steps: int) -> tuple[np.ndarray, np.ndarray]:
    """(float32 whole timesteps [n], float32 sigmas [n + 1]) as diffusers' set_timesteps."""
    config = self.cfg
    alphas_cumprod = train_alphas_cumprod(config)
    timesteps = multistep_timesteps(config, num_inference_steps,
                                    int(config["num_train_timesteps"]))
    timesteps, sigmas = multistep_sigmas(self.name, config, timesteps,
                                         train_sigmas(alphas_cumprod), num_inference_steps,
                                         round_karras=True)
    # ending at the last spaced level, repeated, or at the smallest training level
    last = (sigmas[-1] if sigma_spacing(self.name, config)
            else np.sqrt((1 - alphas_cumprod[0]) / alphas_cumprod[0]))
    sigmas = np.concatenate([sigmas, [last]])
    return timesteps.astype(np.int64).astype(_F32), sigmas.astype(_F32)

  def set_timesteps(self, num_inference_steps: int, sample_shape: tuple[int, ...] | None = None):
    solver_order = int(self.cfg["solver_order"])
    if solver_order > 1 and sample_shape is None:
      raise ValueError(
        f"deis with solver_order={solver_order} keeps earlier model outputs: pass "
        "set_timesteps(num_inference_steps, sample_shape=latents.shape)")
    timesteps, sigmas = self._schedule(num_inference_steps)
    n = len(timesteps)
    alpha_t, sigma_t = vp_alpha_sigma(sigmas)
    lambdas = log_f32(alpha_t) - log_f32(sigma_t)
    h = lambdas[1:] - lambdas[:-1]
    c1 = np.stack([alpha_t[1:] / alpha_t[:-1], sigma_t[1:] * (exp_f32(h) - _F32(1))], axis=1)
    rho = sigma_t / alpha_t
    c2 = np.zeros((n, 2), _F32)
    c3 = np.zeros((n, 3), _F32)
    for i in range(1, n):
      t, s0, s1 = rho[i + 1], rho[i], rho[i - 1]
      c2[i] = (_ind2(t, s0, s1) - _ind2(s0, s0, s1), _ind2(t, s1, s0) - _ind2(s0, s1, s0))
      if i >= 2:
        s2 = rho[i - 2]
        c3[i] = (_ind3(t, s0, s1, s2) - _ind3(s0, s0, s1, s2),
                 _ind3(t, s1, s2, s0) - _ind3(s0, s1, s2, s0),
                 _ind3(t, s2, s0, s1) - _ind3(s0, s2, s0, s1))
    return DEISState(
      timesteps=jnp.asarray(timesteps),
      sigmas=jnp.asarray(sigmas),
      alpha_t=jnp.asarray(alpha_t),
      sigma_t=jnp.asarray(sigma_t),
      c1=jnp.asarray(c1),
      c2=jnp.asarray(c2),
      c3=jnp.asarray(c3),
      model_outputs=jnp.zeros((solver_order - 1, *(sample_shape or ())), jnp.float32),
      lower_order_nums=jnp.zeros((), jnp.int32),
    )

  def _eps(self, state, model_output, sample, i):
    """diffusers' `convert_model_output`: x0 from the prediction, then eps from x0."""
    x0 = self._x0(state, model_output, sample, i)
    return true_divide(sample - rounded(state.alpha_t[i] * x0), state.sigma_t[i])

  def step(self, state, model_output, i, sample, noise=None):
    del noise
    solver_order = int(self.cfg["solver_order"])
    n = state.timesteps.shape[0]  # static
    x = as_f32(sample)
    m0 = self._eps(state, as_f32(model_output), x, i)
    count = state.lower_order_nums
    lower_final = bool(self.cfg["lower_order_final"]) and n < 15
    use_first = (count < 1) | ((i == n - 1) & lower_final)
    use_second = (count < 2) | ((i == n - 2) & lower_final)
    prev = rounded(state.c1[i, 0] * x) - rounded(state.c1[i, 1] * m0)
    if solver_order >= 2:
      m1 = state.model_outputs[-1]
      base = true_divide(x, state.alpha_t[i])
      second = base + rounded(state.c2[i, 0] * m0) + rounded(state.c2[i, 1] * m1)
      if solver_order >= 3:
        m2 = state.model_outputs[-2]
        third = (base + rounded(state.c3[i, 0] * m0) + rounded(state.c3[i, 1] * m1)
                 + rounded(state.c3[i, 2] * m2))
        second = jnp.where(use_second, second, third)
      multistep = rounded(state.alpha_t[i + 1] * rounded(second))
      prev = jnp.where(use_first, prev, multistep)
      model_outputs = jnp.concatenate([state.model_outputs[1:], m0[None]], axis=0)
    else:
      model_outputs = state.model_outputs
    new_state = state.replace(model_outputs=model_outputs,
                              lower_order_nums=jnp.minimum(count + 1, solver_order)
                              .astype(jnp.int32))
    return prev.astype(sample.dtype), new_state
