"""UniPC multistep (Zhao et al. 2023), as diffusers' `UniPCMultistepScheduler`.

Each step first corrects the sample the last step predicted (UniC, with the model output just
computed at it), then predicts the next one (UniP) from the history of data predictions. Both
are linear in the history with coefficients that depend only on the positions and the order, so
the host computes them, per order, in float32 in diffusers' order of operations (including the
small linear solves for order 3), and the device only combines arrays.

Implemented: the data-prediction form (predict_x0, diffusers' default), solver orders 1-3,
solver_type "bh1" / "bh2", lower_order_final, disable_corrector, Karras sigmas, final sigma
"zero" / "sigma_min", epsilon / v / sample prediction, zero-terminal-SNR betas, img2img.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import struct

from sdjax.schedulers.common import (
  Scheduler,
  hashable_config,
  log_f32,
  resolve_config,
  rounded,
  sigma_spacing,
  sigma_to_t,
  spaced_sigmas,
  true_divide,
  vp_alpha_sigma,
)
from sdjax.schedulers.dpmpp import VPDataPrediction, multistep_timesteps
from sdjax.schedulers.euler import (
  as_f32,
  check_choice,
  check_common,
  train_alphas_cumprod,
  train_sigmas,
)
from sdjax.schedulers.sigma_schedules import SCHEDULE_OPTIONS, custom_final, custom_sigmas

_F32 = np.float32


@struct.dataclass
class UniPCState:
  """A UniPC run. Positions i = 0..n-1; P = solver_order.

  Attributes:
    timesteps: [n] int32, the t fed to the UNet at each position.
    alpha_t, sigma_t: [n + 1] the variance-preserving coefficients of the noise levels.
    p_sample, p_m0, p_res: [n] the predictor's weights (position i to i + 1) on the sample, on
      the newest data prediction and on the weighted differences.
    p_rk: [n, P - 1] the predictor's ratios r_k = (lambda[i - k] - lambda[i]) / h.
    p_rho: [P, n, P - 1] per order p (index p - 1), the predictor's weights on the differences.
    c_sample, c_m0, c_res, c_rk: the corrector's at position i (the step from i - 1 to i).
    c_rho: [P, n, P] per order, the corrector's weights; the last one weighs the new output.
    corrector: [n] bool, whether position i corrects (diffusers' disable_corrector).
    order_cap: [n] int32, the highest order position i may use (lower_order_final).
    model_outputs: [P, *sample_shape] float32, the data predictions, newest last.
    last_sample: [*sample_shape] the sample the last prediction started from.
    lower_order_nums: [] int32, steps taken in this run, capped at P.
    last_order: [] int32, the order of the last prediction (the next correction's).
  """

  timesteps: jnp.ndarray
  alpha_t: jnp.ndarray
  sigma_t: jnp.ndarray
  p_sample: jnp.ndarray
  p_m0: jnp.ndarray
  p_res: jnp.ndarray
  p_rk: jnp.ndarray
  p_rho: jnp.ndarray
  c_sample: jnp.ndarray
  c_m0: jnp.ndarray
  c_res: jnp.ndarray
  c_rk: jnp.ndarray
  c_rho: jnp.ndarray
  corrector: jnp.ndarray
  order_cap: jnp.ndarray
  model_outputs: jnp.ndarray
  last_sample: jnp.ndarray
  lower_order_nums: jnp.ndarray
  last_order: jnp.ndarray


def _rhos(rks: np.ndarray, hh: np.float32, b_h: np.float32, order: int, corrector: bool):
  """diffusers' UniP / UniC weights for one step of `order` (float32, its operations)."""
  with np.errstate(all="ignore"):
    h_phi_1 = np.expm1(hh)
    h_phi_k = h_phi_1 / hh - _F32(1.0)
    factorial_i = 1
    rows, b = [], []
    for i in range(1, order + 1):
      rows.append(rks ** (i - 1))
      b.append(h_phi_k * _F32(factorial_i) / b_h)
      factorial_i *= i + 1
      h_phi_k = h_phi_k / hh - _F32(1.0 / factorial_i)
    r = np.stack(rows).astype(_F32)
    b = np.asarray(b, _F32)
    if corrector:
      if order == 1:
        return np.asarray([0.5], _F32)
      return _solve(r, b)
    if order <= 1:
      return np.zeros((0,), _F32)
    if order == 2:
      return np.asarray([0.5], _F32)
    return _solve(r[:-1, :-1], b[:-1])


def _solve(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """float32 solve; a singular or non-finite system (unused positions) gives NaNs."""
  if not (np.isfinite(a).all() and np.isfinite(b).all()):
    return np.full(b.shape, np.nan, _F32)
  try:
    return np.linalg.solve(a, b).astype(_F32)
  except np.linalg.LinAlgError:
    return np.full(b.shape, np.nan, _F32)


@dataclasses.dataclass(frozen=True)
class UniPCMultistepScheduler(VPDataPrediction, Scheduler):
  """diffusers' `UniPCMultistepScheduler` (predict_x0, B(h) solvers)."""

  name = "unipc"
  schedule_options = SCHEDULE_OPTIONS
  order = 1  # model calls per step; the solver's order is config["solver_order"]
  needs_noise = False

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
    "predict_x0": True,
    "solver_type": "bh2",
    "lower_order_final": True,
    "disable_corrector": [],
    "solver_p": None,
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "use_flow_sigmas": False,
    "flow_shift": 1.0,
    "timestep_spacing": "linspace",
    "steps_offset": 0,
    "final_sigmas_type": "zero",
    "rescale_betas_zero_snr": False,
    "use_dynamic_shifting": False,
    "time_shift_type": "exponential",
    "sigma_min": None,
    "sigma_max": None,
    "shift_terminal": None,
  }
  _UNSUPPORTED = {
    "thresholding": False,
    "predict_x0": True,
    "solver_p": None,
    "use_flow_sigmas": False,
    "use_dynamic_shifting": False,
    "sigma_min": None,
    "sigma_max": None,
  }

  @classmethod
  def from_config(cls, scheduler_config: dict[str, Any], **overrides):
    config = resolve_config(
      cls.name,
      cls._DEFAULTS,
      scheduler_config,
      unsupported=cls._UNSUPPORTED,
      overrides=overrides,
    )
    check_common(cls.name, config, ("epsilon", "v_prediction", "sample"))
    if config["solver_type"] in ("midpoint", "heun", "logrho"):
      config["solver_type"] = "bh2"  # diffusers' own substitution
    check_choice(cls.name, "solver_type", config["solver_type"], ("bh1", "bh2"))
    check_choice(cls.name, "solver_order", config["solver_order"], (1, 2, 3))
    check_choice(cls.name, "final_sigmas_type", config["final_sigmas_type"], ("zero", "sigma_min"))
    custom_final(config)
    config["disable_corrector"] = [int(x) for x in config["disable_corrector"] or []]
    return cls(config=hashable_config(config))

  def _timesteps_and_sigmas(self, num_inference_steps: int, alphas_cumprod: np.ndarray):
    """(int timesteps, float32 sigmas with the final one) as diffusers' set_timesteps."""
    config = self.cfg
    timesteps = multistep_timesteps(config, num_inference_steps,
                                    int(config["num_train_timesteps"]))
    sigmas = train_sigmas(alphas_cumprod)
    custom = custom_sigmas(self.name, config, num_inference_steps, sigmas)
    if custom is not None:  # ending at 0, as final_sigmas_type "zero" (`custom_final`)
      return sigma_to_t(custom[:-1], np.log(sigmas)).astype(np.int64), custom.astype(_F32)
    kind = sigma_spacing(self.name, config)
    if kind:
      log_sigmas = np.log(sigmas)
      sigmas = spaced_sigmas(kind, sigmas[0].item(), sigmas[-1].item(), num_inference_steps)
      timesteps = sigma_to_t(sigmas, log_sigmas)
      if kind == "karras":  # diffusers rounds these only
        timesteps = timesteps.round()
      sigma_last = sigmas[-1] if config["final_sigmas_type"] == "sigma_min" else 0
    else:
      sigmas = np.interp(timesteps, np.arange(0, len(sigmas)), sigmas)
      sigma_last = (np.sqrt((1 - alphas_cumprod[0]) / alphas_cumprod[0])
                    if config["final_sigmas_type"] == "sigma_min" else 0)
    sigmas = np.concatenate([sigmas, [sigma_last]]).astype(_F32)
    return timesteps.astype(np.int64), sigmas

  def set_timesteps(self, num_inference_steps: int, sample_shape: tuple[int, ...] | None = None):
    config = self.cfg
    order = int(config["solver_order"])
    if sample_shape is None:
      raise ValueError("unipc keeps earlier model outputs: pass "
                       "set_timesteps(num_inference_steps, sample_shape=latents.shape)")
    timesteps, sigmas = self._timesteps_and_sigmas(num_inference_steps,
                                                   train_alphas_cumprod(config))
    n = len(timesteps)
    bh1 = config["solver_type"] == "bh1"
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
      alpha_t, sigma_t = vp_alpha_sigma(sigmas)
      lambdas = log_f32(alpha_t) - log_f32(sigma_t)  # +inf at a zero final sigma, as in diffusers

    def weights(to: int, frm: int):
      """(sample, m0 and residual weights, r_k [P - 1], h_phi_1-based hh, B_h) of the step
      from position `frm` to `to`, with the history before `frm`."""
      with np.errstate(all="ignore"):
        h = lambdas[to] - lambdas[frm]
        hh = -h
        b_h = hh if bh1 else np.expm1(hh)
        rks = np.asarray([(lambdas[frm - k] - lambdas[frm]) / h if frm - k >= 0 else np.nan
                          for k in range(1, order)], _F32)
        return (sigma_t[to] / sigma_t[frm], alpha_t[to] * np.expm1(hh), alpha_t[to] * b_h,
                rks, hh, b_h)

    def table(corrector: bool):
      sample, m0, res = (np.full(n, np.nan, _F32) for _ in range(3))
      rk = np.full((n, max(order - 1, 1)), np.nan, _F32)
      rho = np.full((order, n, order if corrector else max(order - 1, 1)), np.nan, _F32)
      for i in range(n):
        to, frm = (i, i - 1) if corrector else (i + 1, i)
        if frm < 0:
          continue
        sample[i], m0[i], res[i], rks, hh, b_h = weights(to, frm)
        rk[i, :order - 1] = rks
        for p in range(1, order + 1):
          rhos = _rhos(np.concatenate([rks[:p - 1], [_F32(1.0)]]).astype(_F32), hh, b_h, p,
                       corrector)
          rho[p - 1, i, :len(rhos)] = rhos
      return sample, m0, res, rk, rho

    p_sample, p_m0, p_res, p_rk, p_rho = table(corrector=False)
    c_sample, c_m0, c_res, c_rk, c_rho = table(corrector=True)
    disabled = set(config["disable_corrector"])
    corrector = np.asarray([i > 0 and i - 1 not in disabled for i in range(n)])
    cap = [min(order, n - i) if config["lower_order_final"] else order for i in range(n)]
    shape = tuple(sample_shape)
    return UniPCState(
      timesteps=jnp.asarray(timesteps.astype(np.int32)),
      alpha_t=jnp.asarray(alpha_t),
      sigma_t=jnp.asarray(sigma_t),
      p_sample=jnp.asarray(p_sample), p_m0=jnp.asarray(p_m0), p_res=jnp.asarray(p_res),
      p_rk=jnp.asarray(p_rk), p_rho=jnp.asarray(p_rho),
      c_sample=jnp.asarray(c_sample), c_m0=jnp.asarray(c_m0), c_res=jnp.asarray(c_res),
      c_rk=jnp.asarray(c_rk), c_rho=jnp.asarray(c_rho),
      corrector=jnp.asarray(corrector), order_cap=jnp.asarray(cap, jnp.int32),
      model_outputs=jnp.zeros((order,) + shape, jnp.float32),
      last_sample=jnp.zeros(shape, jnp.float32),
      lower_order_nums=jnp.zeros((), jnp.int32),
      last_order=jnp.zeros((), jnp.int32),
    )

  @staticmethod
  def _weighted(rho, diffs):
    """sum_k rho[k] * diffs[k], in einsum's order (the first term alone when k = 1)."""
    total = rounded(rho[0] * diffs[0])
    for k in range(1, len(diffs)):
      total = total + rounded(rho[k] * diffs[k])
    return total

  def _by_order(self, order, branches):
    """branches[p - 1] selected where `order` == p (a traced scalar)."""
    out = branches[0]
    for p in range(2, len(branches) + 1):
      out = jnp.where(order == p, branches[p - 1], out)
    return out

  def step(self, state, model_output, i, sample, noise=None):
    del noise
    solver_order = int(self.cfg["solver_order"])
    sample32 = as_f32(sample)
    m_t = self._x0(state, as_f32(model_output), sample32, i)
    history = state.model_outputs  # oldest first; [-1] is the last step's prediction
    count = state.lower_order_nums

    # UniC: correct the sample the last step predicted, with this step's model output.
    m0 = history[-1]
    x = state.last_sample
    base = rounded(state.c_sample[i] * x) - rounded(state.c_m0[i] * m0)
    diffs = [true_divide(history[-(k + 1)] - m0, state.c_rk[i, k - 1])
             for k in range(1, solver_order)]
    d1_t = m_t - m0
    corrected = []
    for q in range(1, solver_order + 1):
      rho = state.c_rho[q - 1, i]
      inner = rounded(rho[q - 1] * d1_t)
      if q > 1:
        inner = self._weighted(rho, diffs[:q - 1]) + inner
      corrected.append(base - rounded(state.c_res[i] * inner))
    use_corrector = state.corrector[i] & (count > 0)
    sample32 = jnp.where(use_corrector, self._by_order(state.last_order, corrected), sample32)

    # UniP: predict the next sample from the history, now ending in this step's prediction.
    history = jnp.concatenate([history[1:], m_t[None]], axis=0)
    this_order = jnp.minimum(state.order_cap[i], count + 1)
    base = rounded(state.p_sample[i] * sample32) - rounded(state.p_m0[i] * m_t)
    diffs = [true_divide(history[-(k + 1)] - m_t, state.p_rk[i, k - 1])
             for k in range(1, solver_order)]
    predicted = [base]
    for p in range(2, solver_order + 1):
      res = self._weighted(state.p_rho[p - 1, i], diffs[:p - 1])
      predicted.append(base - rounded(state.p_res[i] * res))
    prev_sample = self._by_order(this_order, predicted)

    new_state = state.replace(
      model_outputs=history,
      last_sample=sample32,
      lower_order_nums=jnp.minimum(count + 1, solver_order).astype(jnp.int32),
      last_order=this_order.astype(jnp.int32),
    )
    return prev_sample.astype(sample.dtype), new_state

