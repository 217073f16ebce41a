"""DPM-Solver singlestep (Lu et al. 2022), as diffusers' `DPMSolverSinglestepScheduler`.

A k-th order singlestep update spans k positions: it starts from the sample of the group's first
position, which a first-order step stores, and weighs the model outputs of the group's positions
(the intermediate samples are only where the model is called). The orders cycle 1, 2 (, 3) by
diffusers' `get_order_list`, ending lower where `lower_order_final` says (which diffusers turns
on for a zero final sigma or a step count the order does not divide); a run that starts part-way
(img2img) lowers a step's order to the model outputs it has, as diffusers does.

Implemented: algorithm_type "dpmsolver++", "sde-dpmsolver++" (fresh noise every step) and
"dpmsolver" (on eps; diffusers requires final_sigmas_type "sigma_min" for it), solver_type
"midpoint" / "heun", orders 1-3, Karras / exponential / beta sigmas, final_sigmas_type,
lambda_min_clipped. Every coefficient depends only on the position and the order, so the host
computes them in float32 in diffusers' order of operations; the device only combines arrays.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import struct

from sdjax.schedulers.common import (
  Scheduler,
  SchedulerConfigError,
  exp_f32,
  hashable_config,
  log_f32,
  resolve_config,
  rounded,
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
# The per-position, per-order weights (`SinglestepState.weights`' last axis).
_SAMPLE, _D0, _D1, _D2, _NOISE, _INV_R0, _INV_R1, _R0, _R1, _R0_R1 = range(10)


@struct.dataclass
class SinglestepState:
  """A singlestep DPM-Solver run. Positions i = 0..n-1.

  Attributes:
    timesteps: [n] float32, the (whole) t fed to the UNet at each position.
    sigmas: [n + 1] float32 noise levels, the last one after the last step.
    alpha_t: [n + 1] 1 / sqrt(sigma^2 + 1).
    sigma_t: [n + 1] sigma * alpha_t.
    orders: [n] int32, diffusers' order list.
    weights: [n, 3, 10] float32, for each order: the update's signed weights on the group's
      first sample, D0, D1, D2 and the fresh noise, then 1 / r0, 1 / r1, r0, r1, r0 - r1.
    model_outputs: [solver_order - 1, *sample_shape] float32, earlier outputs, newest last.
    sample: [*sample_shape] float32, the sample of the current group's first position.
    count: [] int32, the steps this run has taken.
  """

  timesteps: jnp.ndarray
  sigmas: jnp.ndarray
  alpha_t: jnp.ndarray
  sigma_t: jnp.ndarray
  orders: jnp.ndarray
  weights: jnp.ndarray
  model_outputs: jnp.ndarray
  sample: jnp.ndarray
  count: jnp.ndarray


def order_list(steps: int, order: int, lower_order_final: bool, final_zero: bool) -> list[int]:
  """diffusers' `get_order_list`: each position's order for a run of `steps`."""
  if lower_order_final:
    if order == 3:
      orders = ([1, 2, 3] * (steps // 3 - 1) + [1, 2] + [1] if steps % 3 == 0 else
                [1, 2, 3] * (steps // 3) + [1] if steps % 3 == 1 else
                [1, 2, 3] * (steps // 3) + [1, 2])
    elif order == 2:
      orders = [1, 2] * (steps // 2 - 1) + [1, 1] if steps % 2 == 0 else [1, 2] * (steps // 2) + [1]
    else:
      orders = [1] * steps
  else:
    orders = {3: [1, 2, 3] * (steps // 3), 2: [1, 2] * (steps // 2), 1: [1] * steps}[order]
  if final_zero:
    orders[-1] = 1
  return orders


@dataclasses.dataclass(frozen=True)
class DPMSolverSinglestepScheduler(VPDataPrediction, Scheduler):
  """diffusers' `DPMSolverSinglestepScheduler`."""

  name = "dpmpp_2s"

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
    "algorithm_type": "dpmsolver++",
    "solver_type": "midpoint",
    "lower_order_final": False,
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "use_flow_sigmas": False,
    "flow_shift": 1.0,
    "final_sigmas_type": "zero",
    "lambda_min_clipped": -float("inf"),
    "variance_type": None,
    "use_dynamic_shifting": False,
    "time_shift_type": "exponential",
  }
  _UNSUPPORTED = {"thresholding": False, "use_flow_sigmas": False, "variance_type": None,
                  "use_dynamic_shifting": False}

  @property
  def needs_noise(self) -> bool:  # type: ignore[override]
    return self.cfg["algorithm_type"] == "sde-dpmsolver++"

  @classmethod
  def from_config(cls, scheduler_config: dict[str, Any], **overrides):
    config = resolve_config(cls.name, cls._DEFAULTS, scheduler_config,
                            unsupported=cls._UNSUPPORTED, overrides=overrides)
    check_common(cls.name, dict(config, timestep_spacing="linspace"),
                 ("epsilon", "v_prediction", "sample"))
    if config["algorithm_type"] == "deis":
      config["algorithm_type"] = "dpmsolver++"  # diffusers' own substitution
    check_choice(cls.name, "algorithm_type", config["algorithm_type"],
                 ("dpmsolver++", "sde-dpmsolver++", "dpmsolver"))
    if config["solver_type"] in ("logrho", "bh1", "bh2"):
      config["solver_type"] = "midpoint"
    check_choice(cls.name, "solver_type", config["solver_type"], ("midpoint", "heun"))
    check_choice(cls.name, "solver_order", config["solver_order"], (1, 2, 3))
    check_choice(cls.name, "final_sigmas_type", config["final_sigmas_type"], ("zero", "sigma_min"))
    if config["algorithm_type"] == "dpmsolver" and config["final_sigmas_type"] == "zero":
      raise SchedulerConfigError(
        f"scheduler {cls.name!r}: algorithm_type 'dpmsolver' needs final_sigmas_type "
        "'sigma_min' (as in diffusers)")
    return cls(config=hashable_config(config))

  def _schedule(self, num_inference_steps: int) -> tuple[np.ndarray, np.ndarray]:
    """(float32 whole timesteps [n], float32 sigmas [n + 1]) as diffusers' set_timesteps."""
    config = self.cfg
    alphas_cumprod = train_alphas_cumprod(config)
    n_train = int(config["num_train_timesteps"])
    lambda_t = log_f32(np.sqrt(alphas_cumprod)) - log_f32(np.sqrt(1 - alphas_cumprod))
    clipped = int(np.searchsorted(lambda_t[::-1], config["lambda_min_clipped"], side="left"))
    timesteps = multistep_timesteps(dict(config, timestep_spacing="linspace"),
                                    num_inference_steps, n_train - clipped)
    timesteps, sigmas = multistep_sigmas(self.name, config, timesteps,
                                         train_sigmas(alphas_cumprod), num_inference_steps,
                                         round_karras=True)
    last = (np.sqrt((1 - alphas_cumprod[0]) / alphas_cumprod[0])
            if config["final_sigmas_type"] == "sigma_min" else 0.0)
    sigmas = np.concatenate([sigmas, [last]])
    return timesteps.astype(np.int64).astype(_F32), sigmas.astype(_F32)

  def orders(self, num_inference_steps: int) -> list[int]:
    """Each position's order, as diffusers' set_timesteps leaves its `order_list` (it turns
    lower_order_final on for a zero final sigma or a step count the order does not divide)."""
    config = self.cfg
    order, n = int(config["solver_order"]), num_inference_steps
    final_zero = config["final_sigmas_type"] == "zero"
    lower = bool(config["lower_order_final"]) or n % order != 0 or final_zero
    return order_list(n, order, lower, final_zero)

  def _weights(self, sigmas: np.ndarray) -> np.ndarray:
    """float32 [n, 3, 10]: `SinglestepState.weights`, each scalar as diffusers' float32 ones."""
    config, f = self.cfg, _F32
    algorithm, heun = config["algorithm_type"], config["solver_type"] == "heun"
    n = len(sigmas) - 1
    out = np.zeros((n, 3, 10), f)
    alpha, sigma = vp_alpha_sigma(sigmas)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
      lam = log_f32(alpha) - log_f32(sigma)
      for i in range(n):
        a_t, s_t, lam_t = alpha[i + 1], sigma[i + 1], lam[i + 1]
        for k in range(min(i + 1, 3)):  # order k + 1: from position i - k
          start = i - k
          h = f(lam_t - lam[start])
          w = out[i, k]
          if algorithm == "dpmsolver":
            e_h = exp_f32(h) - f(1)
            w[_SAMPLE], w[_D0] = a_t / alpha[start], -(s_t * e_h)
            mid = -(f(0.5) * (s_t * e_h))
            first = -(s_t * (e_h / h - f(1)))
            w[_D2] = -(s_t * ((exp_f32(h) - f(1) - h) / (h * h) - f(0.5)))
          else:
            sde = algorithm == "sde-dpmsolver++"
            decay, neg_2h = f(1) - exp_f32(f(-2.0) * h), f(-2.0) * h
            w[_SAMPLE] = s_t / sigma[start] * (exp_f32(-h) if sde else f(1))
            w[_D0] = a_t * decay if sde else -(a_t * (exp_f32(-h) - f(1)))
            mid = f(0.5) * w[_D0]
            first = (a_t * (decay / neg_2h + f(1)) if sde
                     else a_t * ((exp_f32(-h) - f(1)) / h + f(1)))
            w[_D2] = (a_t * ((decay + neg_2h) / (neg_2h * neg_2h) - f(0.5)) if sde
                      else -(a_t * ((exp_f32(-h) - f(1) + h) / (h * h) - f(0.5))))
            w[_NOISE] = s_t * np.sqrt(decay) if sde else 0
          w[_D1] = mid if k == 1 and not heun else first
          if k >= 1:
            r0 = f(f(lam[i] - lam[start]) / h)
            w[_INV_R0], w[_R0] = f(1) / r0, r0
          if k == 2:
            r1 = f(f(lam[i - 1] - lam[start]) / h)
            w[_INV_R1], w[_R1], w[_R0_R1] = f(1) / r1, r1, r0 - r1
    return out

  def set_timesteps(self, num_inference_steps: int, sample_shape: tuple[int, ...] | None = None):
    solver_order = int(self.cfg["solver_order"])
    if sample_shape is None:
      raise ValueError(f"{self.name} keeps the sample a group of steps starts from: pass "
                       "set_timesteps(num_inference_steps, sample_shape=latents.shape)")
    timesteps, sigmas = self._schedule(num_inference_steps)
    alpha_t, sigma_t = vp_alpha_sigma(sigmas)
    return SinglestepState(
      timesteps=jnp.asarray(timesteps),
      sigmas=jnp.asarray(sigmas),
      alpha_t=jnp.asarray(alpha_t),
      sigma_t=jnp.asarray(sigma_t),
      orders=jnp.asarray(self.orders(len(timesteps)), jnp.int32),
      weights=jnp.asarray(self._weights(sigmas)),
      model_outputs=jnp.zeros((solver_order - 1, *sample_shape), jnp.float32),
      sample=jnp.zeros(sample_shape, jnp.float32),
      count=jnp.zeros((), jnp.int32),
    )

  def _converted(self, state, model_output, sample, i):
    """diffusers' `convert_model_output`: x0 (dpmsolver++ forms) or eps (dpmsolver)."""
    if self.cfg["algorithm_type"] != "dpmsolver":
      return self._x0(state, model_output, sample, i)
    if self.prediction_type == "epsilon":
      return model_output
    alpha, sigma = state.alpha_t[i], state.sigma_t[i]
    if self.prediction_type == "sample":
      return true_divide(sample - rounded(alpha * model_output), sigma)
    return rounded(alpha * model_output) + rounded(sigma * sample)  # v_prediction

  def step(self, state, model_output, i, sample, noise=None):
    if self.needs_noise and noise is None:
      raise ValueError("sde-dpmsolver++ takes fresh noise every step: pass noise=")
    solver_order = int(self.cfg["solver_order"])
    heun = self.cfg["solver_type"] == "heun"
    x = as_f32(sample)
    m0 = self._converted(state, as_f32(model_output), x, i)
    # the order the outputs this run has allow: diffusers lowers it while one is missing
    order = jnp.minimum(state.orders[i], state.count + 1)
    start = jnp.where(order == 1, x, state.sample)

    def term(w, value):
      return rounded(w * value)

    w = state.weights[i]
    prev = term(w[0, _SAMPLE], start) + term(w[0, _D0], m0)
    if solver_order >= 2:
      m1 = state.model_outputs[-1]
      second = term(w[1, _SAMPLE], start) + term(w[1, _D0], m1)
      second = second + term(w[1, _D1], term(w[1, _INV_R0], m0 - m1))
      prev = jnp.where(order == 2, second, prev)
    if solver_order >= 3:
      m2 = state.model_outputs[-2]
      d1_0 = term(w[2, _INV_R1], m1 - m2)
      d1_1 = term(w[2, _INV_R0], m0 - m2)
      third = term(w[2, _SAMPLE], start) + term(w[2, _D0], m2)
      if heun:
        d1 = true_divide(term(w[2, _R0], d1_0) - term(w[2, _R1], d1_1), w[2, _R0_R1])
        d2 = true_divide(2.0 * (d1_1 - d1_0), w[2, _R0_R1])
        third = third + term(w[2, _D1], d1) + term(w[2, _D2], d2)
      else:
        third = third + term(w[2, _D1], d1_1)
      prev = jnp.where(order == 3, third, prev)
    if self.needs_noise:
      k = jnp.clip(order - 1, 0, 2)
      prev = prev + term(w[k, _NOISE], as_f32(noise))
    history = (jnp.concatenate([state.model_outputs[1:], m0[None]], axis=0)
               if solver_order >= 2 else state.model_outputs)
    new_state = state.replace(model_outputs=history, sample=start, count=state.count + 1)
    return prev.astype(sample.dtype), new_state
