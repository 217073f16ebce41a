"""ComfyUI's own k-diffusion samplers, which neither diffusers nor A1111 has.

Multistep loops over a descending sigma schedule in k-diffusion's scale (x = x0 +
sigma * eps), each step from the model's x0 (`euler.predict_original`) and the derivative
d = (x - x0) / sigma, with a history of earlier derivatives or x0s kept in the state:

- `ipndm`: iPNDM (Zhang and Chen 2023): Adams-Bashforth of order min(4, calls so far) on d, with
  its fixed weights (1; 3, -1 over 2; 23, -16, 5 over 12; 55, -59, 37, -9 over 24); the last
  step (to sigma 0) lands on x0.
- `ipndm_v`: the same with the variable-step weights of the levels' spacing (computed on the
  host for each position and each order, in float32 as ComfyUI's torch scalars).
- `res_multistep`: RES's second-order exponential multistep (arXiv:2308.02157, at eta 0): the
  first step and the last (to 0) Euler's, the others exp(-h) x + h (b1 x0 + b2 x0_prev).
- `res_multistep_ancestral`: the same to sigma_down, then fresh noise of scale sigma_up (eta 1,
  or the `eta` option, as Euler a's).
- `gradient_estimation`: an Euler step plus (gamma - 1) times the change of d since the last
  call (gamma 2, ComfyUI's), times the step; the last step lands on x0.
- `er_sde`: ER-SDE-Solver-3 (Cui et al. 2023): the ER-SDE's linear part in lambda = sigma /
  alpha plus the first and second divided differences of x0 (as calls allow), then fresh noise;
  options `er_sde_type` (its reverse-time SDE's noise scaler, or its ODE) and `max_stage`.
- `deis_tab`: ComfyUI's deis (tAB-DEIS, Zhang and Chen 2023, its 'tab' mode, order up to 3):
  Adams-Bashforth on d in the time of a VP process fitted to EDM's range (0.002 to 80), its
  weights the integrals of the Lagrange polynomials of the earlier times against the exponential
  integrand, each a 10000-point sum (here in float64, rounded once: ComfyUI's float32 torch sum
  lands within an ulp or so); the last step (to 0) Euler's. Forge-derived UIs call it "DEIS";
  diffusers' `deis` is the other DEIS form (log-rho).
- `seeds_2`, `seeds_3`: SEEDS-2 / SEEDS-3 (Gonzalez et al. 2023, arXiv:2305.14267, ComfyUI's
  eta 1, r 1/2 and 1/3, 2/3): stochastic exponential integrators in -log sigma with 2 or 3 model
  calls a step (the later ones at log-interpolated levels, `order` positions a step; the last
  step, to 0, one call landing on x0), each stage's noise carried into the next, decayed, plus a
  fresh draw.
- `heunpp2`: Heun++ (Forge's "HeunPP2"): three model calls a step (the Euler predictor's and a
  second Euler step's), the slopes weighed by the levels over 3 sigma_0 of the run; the
  second-to-last step Heun's with weights over 2 sigma_0, the last Euler's.
- `dpm_fast`: k-diffusion's DPM-Solver-Fast (Lu et al. 2022) as ComfyUI's KSampler runs it: the
  steps' UNet calls spent on DPM-Solver-3 steps (1 and 2 at the end) evenly spaced in -log sigma
  from the first level to the smallest above 0, whatever lies between; it ends there, at that
  level's noise (no step to 0). Its plan depends on both ends: an img2img or hires run plans
  over the levels it keeps (`PLAN_START`, `Scheduler.planned_from`); no refiner handoff.
  `dpm_fast_ancestral`: A1111's "DPM fast", the same loop between the training schedule's
  extremes at its ancestral eta (1 by default), one fresh draw a step.
- `k_ddpm`: k-diffusion's sample_ddpm (ComfyUI's `ddpm`): each step DDPM's posterior mean from
  the level's alpha_cumprod 1 / (sigma^2 + 1) to the next's, in the variance-preserving scale
  (x / sqrt(sigma^2 + 1)), plus fresh noise of the posterior's deviation (none on the last step,
  to 0). diffusers' `ddpm` steps over training timesteps instead.
- `sa_solver`: SA-Solver (Xue et al. 2023, arXiv:2309.05019) as ComfyUI's KSampler runs it:
  each call corrects the sample it was given (an Adams corrector of order up to 4 over the x0s
  in lambda = -log sigma; not at a run's first call nor its last to 0), then predicts the next
  level's (order up to 3, both lowered over the last steps of a run to 0), with fresh noise of
  tau = eta (1) where the next level lies between the training levels at 20% and 80% of its
  steps (ComfyUI draws only there: `noise_draw` counts those draws); the weights solved in
  float64 (ComfyUI's float32 solve drifts from them as the levels crowd). `sa_solver_pece`: a
  second call a step at the corrected sample (predict, evaluate, correct, evaluate), whose x0
  the predictor and the later steps take.
- CFG++ forms (`takes_uncond`: the guided x0 steps along the unconditional prediction):
  `dpmpp_2m_cfg_pp`, `res_multistep_cfg_pp`, `res_multistep_ancestral_cfg_pp`,
  `gradient_estimation_cfg_pp`.

They take Euler's config and options (spacings, schedule types, `sigmas`; `k_diffusion`;
`comfyui`, the form `sdjax.comfyui` sets: ComfyUI's levels, whole timesteps, start). A run that
starts part-way (img2img, a hires pass) starts its history there, as ComfyUI's loop over the
kept levels does. Parity: tests/test_k_diffusion.py and tests/test_cfg_pp.py against torch
transcriptions of ComfyUI's loops.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from sdjax.schedulers.common import (
  PLAN_START,
  S_NOISE,
  SchedulerConfigError,
  exp_f32,
  expm1_f32,
  log_f32,
  nearest_t,
  rounded,
  sigma_to_t,
  torch_linspace_f32,
  true_divide,
)
from sdjax.schedulers.euler import (
  ANCESTRAL_ETA,
  EulerDiscreteScheduler,
  SigmaState,
  ancestral_step,
  as_f32,
  check_ancestral_eta,
  final_sigma,
  init_sigma,
  input_scales,
  predict_original,
  sigma_schedule,
  train_alphas_cumprod,
  train_sigmas,
)

_HISTORY = 3  # earlier derivatives iPNDM keeps (its order 4)


@struct.dataclass
class HistoryState(SigmaState):
  """`SigmaState` and what the multistep samplers carry between calls.

  Attributes:
    weights: [n, 4, 4] float32 (ipndm_v): at each position, for each order 1-4, the weights of d
      and of the 3 earlier derivatives; (res_multistep) [n, 4]: exp(-h), h, b1, b2.
    history: [3, ...] float32, the latest earlier derivatives (or x0s) first.
    count: [] int32, the calls of this run so far.
  """

  weights: jnp.ndarray
  history: jnp.ndarray
  count: jnp.ndarray


def _ipndm_v_weights(sigmas: np.ndarray) -> np.ndarray:
  """float32 [n, 4, 4]: iPNDM-v's weights at each position for each order, from the float32
  level gaps, each scalar op rounded to float32 as ComfyUI's 0-dim torch tensors (Python
  evaluates these expressions in the same order)."""
  f = np.float32
  n = len(sigmas) - 1
  out = np.zeros((n, 4, 4), np.float32)
  with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
    for i in range(n):
      out[i, 0, 0] = 1
      t = [f(x) for x in sigmas]
      h0 = t[i + 1] - t[i]
      if i >= 1:
        h1 = t[i] - t[i - 1]
        out[i, 1, :2] = ((2 + (h0 / h1)) / 2, -(h0 / h1) / 2)
      if i >= 2:
        h2 = t[i - 1] - t[i - 2]
        a = (1 - h0 / (3 * (h0 + h1)) * (h0 * (h0 + h1)) / (h1 * (h1 + h2))) / 2
        out[i, 2, :3] = ((2 + (h0 / h1)) / 2 + a, -(h0 / h1) / 2 - (1 + h1 / h2) * a,
                         a * h1 / h2)
      if i >= 3:
        h3 = t[i - 2] - t[i - 3]
        a = (1 - h0 / (3 * (h0 + h1)) * (h0 * (h0 + h1)) / (h1 * (h1 + h2))) / 2
        b = (((1 - h0 / (3 * (h0 + h1))) / 2 + (1 - h0 / (2 * (h0 + h1))) * h0
              / (6 * (h0 + h1 + h2)))
             * (h0 * (h0 + h1) * (h0 + h1 + h2)) / (h1 * (h1 + h2) * (h1 + h2 + h3)))
        r = h1 * (h1 + h2) / (h2 * (h2 + h3))
        out[i, 3] = ((2 + (h0 / h1)) / 2 + a + b,
                     -(h0 / h1) / 2 - (1 + h1 / h2) * a - (1 + (h1 / h2) + r) * b,
                     a * h1 / h2 + ((h1 / h2) + r * (1 + h2 / h3)) * b,
                     -b * r * h1 / h2)
  return out


def _res_weights(sigmas: np.ndarray, downs: np.ndarray) -> np.ndarray:
  """float32 [n, 5]: RES multistep's exp(-h), h, b1, b2 and the step's target at each position
  (h in t = -log sigma
  from this level to the step's target `downs[i]`, the next level at eta 0; c2 the interval from
  the previous level to the previous step's target, over h), in float32 as ComfyUI's scalars; 0
  where the step is Euler's (the first of a run is, whatever the weights say)."""
  f = np.float32
  n = len(sigmas) - 1
  out = np.zeros((n, 5), np.float32)
  out[:, 4] = downs
  t = -log_f32(np.asarray(sigmas, np.float32))
  with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
    t_down = -log_f32(np.asarray(downs, np.float32))
    for i in range(1, n):
      if downs[i] == 0:
        continue
      h = f(t_down[i] - t[i])
      c2 = f(f(t[i - 1] - t_down[i - 1]) / h)
      phi1 = expm1_f32(-h) / -h  # expm1(-h) / -h, each rounded to float32
      phi2 = (phi1 - f(1)) / -h
      b1, b2 = f(phi1 - phi2 / c2), f(phi2 / c2)
      out[i, :4] = (np.exp(np.float64(-h)).astype(np.float32), h, np.nan_to_num(b1, nan=0.0),
                    np.nan_to_num(b2, nan=0.0))
  return out


def _placed_levels(scheduler, num_inference_steps: int, sample_shape):
  """(alphas_cumprod, timesteps, float32 sigmas) of a run of a scheduler whose steps carry a
  sample between their calls (so `set_timesteps` needs the sample's shape)."""
  if sample_shape is None:
    raise ValueError(f"{scheduler.name} carries a step's sample between its calls: "
                     "set_timesteps needs sample_shape")
  alphas_cumprod = train_alphas_cumprod(scheduler.cfg)
  timesteps, sigmas = sigma_schedule(scheduler.cfg, num_inference_steps, alphas_cumprod,
                                     name=scheduler.name)
  return alphas_cumprod, timesteps, sigmas.astype(np.float32)


def _x0_and_slope(scheduler, state, model_output, i, x):
  """(x0, (x - x0) / sigma) of the call at position `i`, at its level `state.sigmas[i]`."""
  sigma = state.sigmas[i]
  x0 = predict_original(scheduler.prediction_type, as_f32(model_output), x, sigma,
                        state.v_out[i], state.v_den[i])
  return x0, true_divide(x - x0, sigma)


class _Eta:
  """sdjax's `eta` option (A1111's Eta, ComfyUI's eta): how much of a step's noise is fresh, 1 by
  default (its class lists ANCESTRAL_ETA among its schedule options)."""

  needs_noise = True

  @classmethod
  def _validate(cls, config) -> None:
    super()._validate(config)
    check_ancestral_eta(cls.name, config)


def _drawn_before(before: np.ndarray, i):
  """`noise_draw`'s answer from its table of draws before each position: a Python int for a
  host position (a stage's draw count), a traced index for a step's."""
  return int(before[i]) if isinstance(i, int | np.integer) else jnp.asarray(before)[i]


class _StepStarts:
  """Where a step starts for samplers whose steps take varying numbers of calls
  (`_firsts(state)`: bool [P], the calls that start one)."""

  def step_position(self, state, step: int) -> int:
    firsts = self._firsts(state)
    starts = np.flatnonzero(firsts)
    return int(starts[step]) if step < len(starts) else len(firsts)

  def starts_step(self, state, position: int) -> bool:
    return bool(self._firsts(state)[position])


@dataclasses.dataclass(frozen=True)
class _MultistepScheduler(EulerDiscreteScheduler):
  """Euler's config, options and placement; a history in the state."""

  def set_timesteps(self, num_inference_steps: int, sample_shape: tuple[int, ...] | None = None):
    if sample_shape is None:
      raise ValueError(f"{self.name} keeps a history of earlier calls: set_timesteps needs "
                       "sample_shape")
    base = super().set_timesteps(num_inference_steps)
    sigmas = np.asarray(base.sigmas, np.float32)
    return HistoryState(**{k: getattr(base, k) for k in base.__dataclass_fields__},
                        weights=jnp.asarray(self._weights(sigmas)),
                        history=jnp.zeros((_HISTORY, *sample_shape), jnp.float32),
                        count=jnp.zeros([], jnp.int32))

  def _weights(self, sigmas: np.ndarray) -> np.ndarray:
    return np.zeros((len(sigmas) - 1, 1), np.float32)

  def _x0_and_d(self, state, model_output, i, x):
    return _x0_and_slope(self, state, model_output, i, x)

  def _by_order(self, state, i, x, x0, orders):
    """x plus the step of the order the run's calls so far allow (`orders[k]`: order k + 1, at
    most 4); the last step (to 0) lands on x0."""
    order = jnp.minimum(state.count, 3)
    step = orders[0]
    for k in range(1, 4):
      step = jnp.where(order == k, orders[k], step)
    return jnp.where(state.sigmas[i + 1] == 0, x0, x + step)

  def _remember(self, state, value):
    history = jnp.concatenate([value[None], state.history[:-1]])
    return state.replace(history=history, count=state.count + 1)


def _weighted(terms):
  """sum of weight * value, each product rounded, summed left to right (as torch)."""
  total = rounded(terms[0][0] * terms[0][1])
  for weight, value in terms[1:]:
    total = rounded(total + rounded(weight * value))
  return total


@dataclasses.dataclass(frozen=True)
class IPNDMScheduler(_MultistepScheduler):
  """ComfyUI's `ipndm`: Adams-Bashforth on d with iPNDM's fixed weights, order up to 4."""

  name = "ipndm"

  def step(self, state, model_output, i, sample, noise=None):
    del noise
    x = as_f32(sample)
    x0, d = self._x0_and_d(state, model_output, i, x)
    b1, b2, b3 = state.history[0], state.history[1], state.history[2]
    dt = state.dt[i]
    # ComfyUI's (integer weights * d ...) * dt / divisor, one candidate per order
    orders = [
      rounded(dt * d),
      true_divide(rounded(dt * rounded(rounded(3 * d) - b1)), 2.0),
      true_divide(rounded(dt * _weighted([(23, d), (-16, b1), (5, b2)])), 12.0),
      true_divide(rounded(dt * _weighted([(55, d), (-59, b1), (37, b2), (-9, b3)])), 24.0),
    ]
    return self._by_order(state, i, x, x0, orders).astype(sample.dtype), self._remember(state, d)


@dataclasses.dataclass(frozen=True)
class IPNDMVScheduler(_MultistepScheduler):
  """ComfyUI's `ipndm_v`: iPNDM with the variable-step weights of the levels' spacing."""

  name = "ipndm_v"

  def _weights(self, sigmas: np.ndarray) -> np.ndarray:
    return _ipndm_v_weights(sigmas)

  def step(self, state, model_output, i, sample, noise=None):
    del noise
    x = as_f32(sample)
    x0, d = self._x0_and_d(state, model_output, i, x)
    w = state.weights[i][jnp.minimum(state.count, 3)]
    values = [d, state.history[0], state.history[1], state.history[2]]
    orders = [rounded(state.dt[i] * _weighted(list(zip(w[:k + 1], values[:k + 1],
                                                      strict=True))))
              for k in range(4)]
    return self._by_order(state, i, x, x0, orders).astype(sample.dtype), self._remember(state, d)


@dataclasses.dataclass(frozen=True)
class ResMultistepScheduler(_MultistepScheduler):
  """ComfyUI's `res_multistep` (its eta 0 form): RES's second-order exponential multistep,
  Euler at the run's first step and at the last."""

  name = "res_multistep"

  def _weights(self, sigmas: np.ndarray) -> np.ndarray:
    sigma, sigma_next = sigmas[:-1], sigmas[1:]
    with np.errstate(divide="ignore", invalid="ignore"):
      downs = (ancestral_step(sigma, sigma_next, self.cfg.get(ANCESTRAL_ETA, 1.0))[0]
               if self.needs_noise else sigma_next)
    return _res_weights(sigmas, downs)

  def step(self, state, model_output, i, sample, noise=None):
    x = as_f32(sample)
    x0, d = self._x0_and_d(state, model_output, i, x)
    decay, h, b1, b2 = (state.weights[i][k] for k in range(4))
    multistep = rounded(decay * x) + rounded(h * _weighted([(b1, x0), (b2, state.history[0])]))
    euler = x + rounded(d * state.dt[i])
    return self._finish(state, i, euler, multistep, noise).astype(sample.dtype), self._remember(
      state, x0)

  def _finish(self, state, i, euler, multistep, noise):
    """Euler's step at the run's first call and the last, else the multistep; then (ancestral)
    fresh noise of scale sigma_up (0 at the last)."""
    euler_step = (state.count == 0) | (state.sigmas[i + 1] == 0)
    prev = jnp.where(euler_step, euler, multistep)
    if not self.needs_noise:
      return prev
    if noise is None:
      raise ValueError(f"{self.name} needs `noise` (unit Gaussian, sample shape) at every step")
    return prev + rounded(as_f32(noise) * state.sigma_up[i])


@dataclasses.dataclass(frozen=True)
class GradientEstimationScheduler(_MultistepScheduler):
  """ComfyUI's `gradient_estimation` (gamma 2): Euler plus the change of d since the last call,
  times the step; the last step lands on x0."""

  name = "gradient_estimation"

  def step(self, state, model_output, i, sample, noise=None):
    del noise
    x = as_f32(sample)
    x0, d = self._x0_and_d(state, model_output, i, x)
    dt = state.dt[i]
    x = x + rounded(d * dt)
    corrected = x + rounded(rounded(d - state.history[0]) * dt)  # (gamma - 1) = 1: exact
    prev = jnp.where(state.count >= 1, corrected, x)
    prev = jnp.where(state.sigmas[i + 1] == 0, x0, prev)
    return prev.astype(sample.dtype), self._remember(state, d)


def _deis_times(sigmas: np.ndarray) -> tuple[np.ndarray, np.float32, np.float32]:
  """ComfyUI's deis `edm2t`: the VP times of the float32 levels, and that process's beta_0 and
  beta_1, in float32 as its torch scalars (numpy's float32 log, as its np.log of them)."""
  f = np.float32
  low, high = f(f(0.002) * f(0.002)) + f(1), f(f(80.0) * f(80.0)) + f(1)
  log_low, log_high = np.log(np.asarray(low)), np.log(np.asarray(high))
  beta_d = f(2) * (log_low / f(1e-3) - log_high) / f(1e-3 - 1)
  beta_min = log_high - f(0.5) * beta_d
  sig = np.asarray(sigmas, f)
  with np.errstate(invalid="ignore"):
    root = np.sqrt(beta_min * beta_min + f(2) * beta_d * log_f32(sig * sig + f(1)))
  return (root - beta_min) / beta_d, beta_min, beta_d + beta_min


def _deis_weights(sigmas: np.ndarray, points: int = 10000) -> np.ndarray:
  """float32 [n, 3, 3]: at each position, tAB-DEIS's weights of d and the earlier derivatives for
  orders 2 and 3 (rows 1 and 2; row 0, Euler's, unused), each op of the integrand in float32 as
  ComfyUI's torch (its autograd's d log alpha / dt included)."""
  f = np.float32
  t, beta_0, beta_1 = _deis_times(sigmas)
  slope = beta_1 - beta_0
  n = len(sigmas) - 1
  out = np.zeros((n, 3, 3), f)
  with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
    for i in range(1, n):
      taus = torch_linspace_f32(t[i], t[i + 1], points)
      dtau = (t[i + 1] - t[i]) / f(points)
      alpha = exp_f32((f(-0.5) * (taus * taus)) * slope - taus * beta_0)
      grad = (f(1) / alpha) * alpha  # log's then exp's backward
      d_log_alpha = (-grad) * beta_0 + ((grad * slope) * f(-0.5)) * (f(2) * taus)
      integrand = (f(-0.5) * d_log_alpha) / np.sqrt(alpha * (f(1) - alpha))
      for order in (2, 3):
        if i < order - 1:
          continue
        times = t[[i - k for k in range(order)]]
        for j in range(order):
          poly = np.ones_like(taus)
          for k in range(order):
            if k != j:
              poly = poly * ((taus - times[k]) / (times[j] - times[k]))
          total = f(np.sum((integrand * poly).astype(np.float64)))
          out[i, order - 1, j] = total * dtau
  return out


@dataclasses.dataclass(frozen=True)
class DEISTabScheduler(_MultistepScheduler):
  """ComfyUI's `deis` (tAB-DEIS, order up to 3): Adams-Bashforth on d with the weights of
  `_deis_weights`; the last step Euler's."""

  name = "deis_tab"

  def _weights(self, sigmas: np.ndarray) -> np.ndarray:
    return _deis_weights(sigmas)

  def step(self, state, model_output, i, sample, noise=None):
    del noise
    x = as_f32(sample)
    _, d = self._x0_and_d(state, model_output, i, x)
    w = state.weights[i]
    euler = x + rounded(state.dt[i] * d)
    second = x + rounded(w[1, 0] * d) + rounded(w[1, 1] * state.history[0])
    third = (x + rounded(w[2, 0] * d) + rounded(w[2, 1] * state.history[0])
             + rounded(w[2, 2] * state.history[1]))
    order = jnp.where(state.sigmas[i + 1] == 0, 0, jnp.minimum(state.count, 2))
    prev = jnp.where(order == 2, third, jnp.where(order == 1, second, euler))
    return prev.astype(sample.dtype), self._remember(state, d)


# -- SEEDS (ComfyUI's seeds_2, seeds_3): `order` model calls a step at fixed positions.


@struct.dataclass
class SeedsState(SigmaState):
  """`SigmaState` over the model calls (its per-position arrays [P], `sigmas` [P + 1]: each
  call's level, then the last), and what a step carries between its calls.

  Attributes:
    stage: [P] int32, the call's place in its step (0 first; -1 the last step's lone call).
    coefficients: [P, 7] float32: the weight of the step's start sample, of the mix of x0s, the
      mix's weights on the step's first x0 and on this call's, the carried noise's decay, the
      fresh draw's weight, and the level the stage lands on (the noise's scale).
    start: the step's start sample; first_x0: its first call's x0; carried: its noise so far.
  """

  stage: jnp.ndarray
  coefficients: jnp.ndarray
  start: jnp.ndarray
  first_x0: jnp.ndarray
  carried: jnp.ndarray


def _per_call(config, levels, times, sigmas) -> dict:
  """`SigmaState`'s fields of a run whose model calls are at float32 `levels` with UNet
  `times` (several a step), the schedule's own levels `sigmas` (its last after the last call)."""
  sigma_in = np.asarray(levels, np.float32)
  scale = input_scales(sigma_in)
  return dict(timesteps=jnp.asarray(np.asarray(times, np.float32)),
              sigmas=jnp.asarray(np.append(sigma_in, sigmas[-1]).astype(np.float32)),
              init_sigma=jnp.asarray(init_sigma(config, sigmas)),
              input_scale=jnp.asarray(scale), v_out=jnp.asarray(-sigma_in / scale),
              v_den=jnp.asarray(sigma_in**2 + 1), dt=jnp.zeros(len(sigma_in), jnp.float32),
              sigma_up=jnp.zeros(len(sigma_in), jnp.float32))


def _lerp_f32(start, end, weight):
  """torch.lerp of float32 scalars at a Python weight (float32 in its kernel)."""
  f = np.float32
  w = f(weight)
  return f(start + w * f(end - start)) if w < 0.5 else f(end - f(end - start) * f(f(1) - w))


def _seeds_stages(sigma, sigma_next, stages: int):
  """Per stage of one SEEDS step from sigma to sigma_next: (level, coefficients [7]), float32
  as ComfyUI's torch scalars (eta 1: h_eta = 2h)."""
  f = np.float32
  lam_s, lam_t = -log_f32(sigma), -log_f32(sigma_next)
  h = f(lam_t - lam_s)
  h_eta = f(h * f(2))
  fractions = (0.5,) if stages == 2 else (1 / 3, 2 / 3)
  lams = [_lerp_f32(lam_s, lam_t, r) for r in fractions]
  levels = [exp_f32(-lam) for lam in lams]
  alphas = [f(level * exp_f32(lam)) for level, lam in zip(levels, lams, strict=True)]
  alpha_t = f(sigma_next * exp_f32(lam_t))
  rows = []
  r_first = fractions[0]
  # first stage: from x along the first x0 to the first interpolated level
  rows.append((levels[0], f(levels[0] / sigma) * exp_f32(f(f(-r_first) * h)),
               f(alphas[0] * expm1_f32(f(-r_first) * h_eta)), 1, 0, 0,
               np.sqrt(-expm1_f32(f(f(-2 * r_first) * h)))))
  ends = [*levels[1:], sigma_next]
  for k, target in enumerate(ends, start=1):
    r = fractions[k] if k < len(fractions) else 1.0
    phi_1 = expm1_f32(f(-r) * h_eta)
    if stages == 2:  # x0s mixed by lerp at 1 / (2r) = 1: the second's alone
      mix, weights = f(alpha_t * expm1_f32(-h_eta)), (0, 1)
    elif k == 1:
      neg = f(f(-r) * h_eta)
      second = f(f(r / fractions[0]) * f((expm1_f32(neg) - neg) / neg))
      mix, weights = alphas[1], (f(phi_1 - second), second)
    else:
      third = f(f((expm1_f32(-h_eta) + h_eta) / -h_eta) / f(fractions[1]))
      mix, weights = alpha_t, (f(expm1_f32(-h_eta) - third), third)
    decay = f(f(f(fractions[k - 1] - r) * h))
    scale = f(target / sigma) * exp_f32(f(-r) * h if r != 1.0 else -h)
    rows.append((target, scale, mix, *weights, exp_f32(decay),
                 np.sqrt(-expm1_f32(f(decay * f(2))))))
  return [(row[0], np.asarray([*row[1:], row[0]], np.float32)) for row in rows]


@dataclasses.dataclass(frozen=True)
class SEEDSScheduler(EulerDiscreteScheduler):
  """ComfyUI's `seeds_2` (and, with 3 stages, `seeds_3`): see the module docstring."""

  name = "seeds_2"
  order = 2  # model calls a step (the last step: one)
  needs_noise = True
  stages = 2
  _DEFAULTS = {**EulerDiscreteScheduler._DEFAULTS, S_NOISE: 1.0}

  def set_timesteps(self, num_inference_steps: int, sample_shape: tuple[int, ...] | None = None):
    config = self.cfg
    alphas_cumprod, timesteps, sigmas = _placed_levels(self, num_inference_steps, sample_shape)
    log_sigmas = np.log(train_sigmas(alphas_cumprod))
    to_t = nearest_t if config.get("comfyui") else sigma_to_t
    levels, times, stage, rows = [], [], [], []
    for k in range(len(sigmas) - 1):
      levels.append(sigmas[k])
      times.append(np.float32(timesteps[k]))
      if sigmas[k + 1] == 0:  # the last step: its x0
        stage.append(-1)
        rows.append(np.zeros(7, np.float32))
        continue
      for j, (target, row) in enumerate(_seeds_stages(sigmas[k], sigmas[k + 1], self.stages)):
        stage.append(j)
        rows.append(row)
        if j + 1 < self.stages:  # the next call, at the level this stage lands on
          levels.append(target)
          times.append(np.float32(to_t(np.asarray([target]), log_sigmas)[0]))
    zeros = jnp.zeros(sample_shape, jnp.float32)
    return SeedsState(
      **_per_call(config, levels, times, sigmas),
      stage=jnp.asarray(np.asarray(stage, np.int32)),
      coefficients=jnp.asarray(np.stack(rows)),
      start=zeros, first_x0=zeros, carried=zeros)

  def step(self, state, model_output, i, sample, noise=None):
    if noise is None:
      raise ValueError(f"{self.name} adds fresh noise at every call: pass noise=")
    x = as_f32(sample)
    x0 = predict_original(self.prediction_type, as_f32(model_output), x, state.sigmas[i],
                          state.v_out[i], state.v_den[i])
    stage = state.stage[i]
    scale, mix, w_first, w_own, decay, fresh, target = (state.coefficients[i][k]
                                                        for k in range(7))
    first = stage <= 0
    start = jnp.where(first, x, state.start)
    first_x0 = jnp.where(first, x0, state.first_x0)
    mixed = jnp.where(stage == 0, x0, rounded(w_first * first_x0) + rounded(w_own * x0))
    carried = jnp.where(stage == 0, 0.0, rounded(state.carried * decay)) + rounded(
      fresh * as_f32(noise))
    prev = rounded(scale * start) - rounded(mix * mixed) + rounded(carried * target)
    prev = jnp.where(stage < 0, x0, prev)
    return prev.astype(sample.dtype), state.replace(start=start, first_x0=first_x0,
                                                    carried=carried)


@dataclasses.dataclass(frozen=True)
class SEEDS3Scheduler(SEEDSScheduler):
  """ComfyUI's `seeds_3`: three calls a step."""

  name = "seeds_3"
  order = 3
  stages = 3


# -- Heun++ (ComfyUI's heunpp2): 3, 2 then 1 model calls a step, the calls at the schedule's levels.

_PP, _PP2, _PP3, _HEUN, _HEUN2, _EULER = range(6)  # a call's role in its step
_STEP_STARTS = (_PP, _HEUN, _EULER)


@struct.dataclass
class HeunPPState(SigmaState):
  """`SigmaState` over the model calls ([P] per position, `sigmas` [P + 1]), and what a step
  carries between its calls.

  Attributes:
    role: [P] int32, the call's role (`_PP` ... `_EULER`).
    coefficients: [P, 4] float32: the step's whole dt, this stage's dt, sigma_{i+1}, sigma_{i+2}.
    start: the step's start sample; slopes: [2, ...] its first two calls' derivatives.
    sigma_first: [] the run's first level (ComfyUI's sigmas[0] of the levels it runs over).
    count: [] int32, the calls of this run so far.
  """

  role: jnp.ndarray
  coefficients: jnp.ndarray
  start: jnp.ndarray
  slopes: jnp.ndarray
  sigma_first: jnp.ndarray
  count: jnp.ndarray


@dataclasses.dataclass(frozen=True)
class HeunPP2Scheduler(_StepStarts, EulerDiscreteScheduler):
  """ComfyUI's `heunpp2` (see the module docstring)."""

  name = "heunpp2"
  order = 3  # model calls a step but the last two's (`step_position`)
  needs_noise = False

  def set_timesteps(self, num_inference_steps: int, sample_shape: tuple[int, ...] | None = None):
    config = self.cfg
    _, timesteps, sigmas = _placed_levels(self, num_inference_steps, sample_shape)
    end, n = sigmas[-1], len(sigmas) - 1
    levels, times, roles, rows = [], [], [], []
    for i in range(n):
      dt = sigmas[i + 1] - sigmas[i]
      nxt = sigmas[i + 2] if i + 2 <= n else end
      if sigmas[i + 1] == end:
        calls = [(i, _EULER, dt)]
      elif nxt == end:
        calls = [(i, _HEUN, dt), (i + 1, _HEUN2, 0)]
      else:
        calls = [(i, _PP, dt), (i + 1, _PP2, nxt - sigmas[i + 1]), (i + 2, _PP3, 0)]
      for k, role, stage_dt in calls:
        levels.append(sigmas[k])
        times.append(timesteps[k])
        roles.append(role)
        rows.append((dt, stage_dt, sigmas[i + 1], nxt))
    zeros = jnp.zeros(sample_shape, jnp.float32)
    return HeunPPState(
      **_per_call(config, levels, times, sigmas),
      role=jnp.asarray(np.asarray(roles, np.int32)),
      coefficients=jnp.asarray(np.asarray(rows, np.float32)),
      start=zeros, slopes=jnp.zeros((2, *sample_shape), jnp.float32),
      sigma_first=jnp.zeros((), jnp.float32), count=jnp.zeros((), jnp.int32))

  def _firsts(self, state) -> np.ndarray:
    return np.isin(np.asarray(state.role), _STEP_STARTS)

  def step(self, state, model_output, i, sample, noise=None):
    del noise
    x = as_f32(sample)
    sigma = state.sigmas[i]
    _, d = _x0_and_slope(self, state, model_output, i, x)
    role = state.role[i]
    dt, stage_dt, sigma_1, sigma_2 = (state.coefficients[i][k] for k in range(4))
    first = jnp.where(state.count == 0, sigma, state.sigma_first)
    starting = (role == _PP) | (role == _HEUN) | (role == _EULER)
    start = jnp.where(starting, x, state.start)
    slope_0 = jnp.where(starting, d, state.slopes[0])
    slope_1 = jnp.where(role == _PP2, d, state.slopes[1])
    stage = x + rounded(d * jnp.where(role == _PP2, stage_dt, dt))  # x_2, x_3; Euler's step
    w = true_divide(sigma_1, first * 2.0)  # Heun's weight of the second slope
    heun = rounded(slope_0 * (1.0 - w)) + rounded(d * w)
    w2, w3 = true_divide(sigma_1, first * 3.0), true_divide(sigma_2, first * 3.0)
    plus = (rounded((1.0 - w2 - w3) * slope_0) + rounded(w2 * slope_1)) + rounded(w3 * d)
    whole = start + rounded(jnp.where(role == _PP3, plus, heun) * dt)
    prev = jnp.where((role == _PP3) | (role == _HEUN2), whole, stage)
    return prev.astype(sample.dtype), state.replace(
      start=start, slopes=jnp.stack([slope_0, slope_1]), sigma_first=first,
      count=state.count + 1)


# -- DPM-Solver-Fast (ComfyUI's dpm_fast): DPM-Solver-1/2/3 steps even in t = -log sigma.


@struct.dataclass
class DPMFastState(SigmaState):
  """`SigmaState` over the model calls ([P], `sigmas` [P + 1]: each call's level, then the last
  one's), and what a step carries.

  Attributes:
    coefficients: [P, 4] float32: the weight of eps at the step's first call, of the change of
      eps since it, 1 at a step's first call, and the fresh noise's scale at a step's last
      (ancestral: 0 elsewhere).
    start: the step's start sample; first_eps: its first call's eps.
  """

  coefficients: jnp.ndarray
  start: jnp.ndarray
  first_eps: jnp.ndarray


def _dpm_fast_orders(calls: int) -> list[int]:
  """The orders of dpm_solver_fast's steps for `calls` model calls: 3 but for the last (or the
  last two: 2 and 1)."""
  m = calls // 3 + 1
  return [3] * (m - 2) + [2, 1] if calls % 3 == 0 else [3] * (m - 1) + [calls % 3]


def _dpm_fast_plan(sigma_max, sigma_min, calls: int, eta: float = 0.0):
  """k-diffusion's dpm_solver_fast plan in float32 as its torch scalars: per call (the level it
  runs at, the eps weight, the eps-change weight, whether it starts a step, the fresh noise's
  scale after it), and the end level. With `eta` each step aims at its ancestral sigma_down
  (not below the end), then adds noise of the rest of the next level's variance."""
  f = np.float32
  t_start, t_end = -log_f32(f(sigma_max)), -log_f32(f(sigma_min))
  orders = _dpm_fast_orders(calls)
  ts = torch_linspace_f32(t_start, t_end, len(orders) + 1)
  rows = []
  with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
    for i, order in enumerate(orders):
      t, t_next, spread = ts[i], ts[i + 1], f(0)
      if eta:
        down, _ = ancestral_step(np.asarray([exp_f32(-t)]), np.asarray([exp_f32(-t_next)]), eta)
        aim = min(t_end, -log_f32(down[0]))
        spread = np.sqrt(f(exp_f32(-t_next) ** 2) - f(exp_f32(-aim) ** 2))
        t_next = aim
      h = f(t_next - t)
      level, end = exp_f32(-t), exp_f32(-t_next)
      whole = f(end * expm1_f32(h))
      if order == 1:
        rows.append((level, whole, 0, 1, spread))
        continue
      r1 = f(1 / 2) if order == 2 else f(1 / 3)
      s1 = f(t + r1 * h)
      rows.append((level, f(exp_f32(-s1) * expm1_f32(f(r1 * h))), 0, 1, 0))
      if order == 2:
        rows.append((exp_f32(-s1), whole, f(f(end / f(2 * (1 / 2))) * expm1_f32(h)), 0, spread))
        continue
      r2 = f(2 / 3)
      s2, r2h = f(t + r2 * h), f(r2 * h)
      rows.append((exp_f32(-s1), f(exp_f32(-s2) * expm1_f32(r2h)),
                   f(f(exp_f32(-s2) * f(2.0)) * f(expm1_f32(r2h) / r2h - f(1))), 0, 0))
      rows.append((exp_f32(-s2), whole, f(f(end / r2) * f(expm1_f32(h) / h - f(1))), 0,
                   spread))
  return rows, exp_f32(-ts[-1])


@dataclasses.dataclass(frozen=True)
class DPMFastScheduler(_StepStarts, EulerDiscreteScheduler):
  """ComfyUI's `dpm_fast` (see the module docstring). An img2img or hires run plans over the
  levels it keeps (`PLAN_START`), as ComfyUI's and A1111's run it over theirs."""

  name = "dpm_fast"
  order = 3  # model calls a step, but for its last one or two
  needs_noise = False
  plans_its_run = True  # its plan is placed between the run's own ends
  schedule_options = (*EulerDiscreteScheduler.schedule_options, PLAN_START)

  def _range(self, alphas_cumprod, sigmas: np.ndarray) -> tuple[np.float32, np.float32]:
    """The levels its plan runs from and to: the first and the smallest above 0."""
    del alphas_cumprod
    low = sigmas[-2] if sigmas[-1] == 0 and len(sigmas) > 2 else sigmas[-1]
    return sigmas[0], low

  def set_timesteps(self, num_inference_steps: int, sample_shape: tuple[int, ...] | None = None):
    config = self.cfg
    alphas_cumprod, _, sigmas = _placed_levels(self, num_inference_steps, sample_shape)
    sigmas = sigmas[config.get(PLAN_START, 0):]
    high, low = self._range(alphas_cumprod, sigmas)
    if not (high > 0 and low > 0):
      raise ValueError(f"{self.name} runs between two levels above 0: give it more steps")
    rows, end = _dpm_fast_plan(high, low, len(sigmas) - 1,
                               self.cfg.get(ANCESTRAL_ETA, 1.0) if self.needs_noise else 0.0)
    levels = np.asarray([row[0] for row in rows], np.float32)
    log_sigmas = np.log(train_sigmas(alphas_cumprod))
    times = (nearest_t if config.get("comfyui") else sigma_to_t)(levels, log_sigmas)
    zeros = jnp.zeros(sample_shape, jnp.float32)
    return DPMFastState(
      **_per_call(config, levels, times, np.asarray([sigmas[0], end], np.float32)),
      coefficients=jnp.asarray(np.asarray([row[1:] for row in rows], np.float32)),
      start=zeros, first_eps=zeros)

  def _firsts(self, state) -> np.ndarray:
    return np.asarray(state.coefficients)[:, 2] > 0

  def step(self, state, model_output, i, sample, noise=None):
    x = as_f32(sample)
    _, eps = _x0_and_slope(self, state, model_output, i, x)
    on_eps, on_change, first, spread = (state.coefficients[i][k] for k in range(4))
    starting = first > 0
    start = jnp.where(starting, x, state.start)
    first_eps = jnp.where(starting, eps, state.first_eps)
    prev = (start - rounded(on_eps * first_eps)) - rounded(on_change * rounded(eps - first_eps))
    if self.needs_noise:
      if noise is None:
        raise ValueError(f"{self.name} needs `noise` (unit Gaussian, sample shape) at every step")
      prev = prev + rounded(spread * as_f32(noise))
    return prev.astype(sample.dtype), state.replace(start=start, first_eps=first_eps)


@dataclasses.dataclass(frozen=True)
class DPMFastAncestralScheduler(_Eta, DPMFastScheduler):
  """A1111's "DPM fast" (k-diffusion's sample_dpm_fast as A1111 runs it): the same plan, in
  text-to-image between the training schedule's extremes whatever the levels (which set only the
  starting noise), in img2img and hires passes between the levels they keep; each step to its
  ancestral sigma_down at eta (its Eta, 1 by default), then fresh noise (one draw a step, after
  its last call)."""

  name = "dpm_fast_ancestral"
  schedule_options = (*DPMFastScheduler.schedule_options, ANCESTRAL_ETA)
  _DEFAULTS = {**DPMFastScheduler._DEFAULTS, S_NOISE: 1.0}

  def _range(self, alphas_cumprod, sigmas: np.ndarray) -> tuple[np.float32, np.float32]:
    if PLAN_START in self.cfg:  # img2img and hires: A1111's between the levels they keep
      # (named, not super(): A1111's DPM adaptive takes this method as its own)
      return DPMFastScheduler._range(self, alphas_cumprod, sigmas)
    table = train_sigmas(alphas_cumprod).astype(np.float32)
    return table[-1], table[0]

  def noise_draw(self, i, positions: int):
    """One draw a step, after its last call."""
    ends = np.cumsum(_dpm_fast_orders(positions)) - 1
    before = np.searchsorted(ends, np.arange(positions + 1)).astype(np.int32)
    return _drawn_before(before, i)


# -- Their CFG++ forms (Chung et al. 2024, `takes_uncond`): the guided x0 steps, renoised along
# the unconditional prediction, whose x0 is also what the history keeps.


def _x0s(self, state, i, sample, model_output, uncond):
  """(x, the guided x0, the unconditional x0) in float32."""
  if uncond is None:
    raise ValueError(f"{self.name} renoises along the unconditional prediction: pass `uncond`")
  x = as_f32(sample)
  x0, _ = self._x0_and_d(state, model_output, i, x)
  return x, x0, predict_original(self.prediction_type, as_f32(uncond), x, state.sigmas[i],
                                 state.v_out[i], state.v_den[i])


def _dpmpp_2m_weights(sigmas: np.ndarray) -> np.ndarray:
  """float32 [n, 4]: DPM++ 2M CFG++'s exp(-h), the history's weight expm1(-h) / (2 r) (r the
  previous interval over h, in t = -log sigma), 0, 0; float32 as ComfyUI's scalars."""
  f = np.float32
  n = len(sigmas) - 1
  out = np.zeros((n, 4), np.float32)
  with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
    t = -log_f32(np.asarray(sigmas, np.float32))
    for i in range(n):
      h = f(t[i + 1] - t[i])
      out[i, 0] = np.exp(np.float64(-h)).astype(np.float32)
      if i >= 1 and sigmas[i + 1] != 0:
        r = f(t[i] - t[i - 1]) / h
        out[i, 1] = expm1_f32(-h) * (f(1) / (f(2) * r))
  return out


@dataclasses.dataclass(frozen=True)
class DPMSolverMultistepCFGPPScheduler(_MultistepScheduler):
  """ComfyUI's `dpmpp_2m_cfg_pp`: DPM-Solver++(2M) whose first-order part follows the
  unconditional x0, x0 + e^-h x - e^-h x0_uncond (- expm1(-h) / (2 r) (x0 - x0_uncond_prev))."""

  name = "dpmpp_2m_cfg_pp"
  takes_uncond = True

  def _weights(self, sigmas: np.ndarray) -> np.ndarray:
    return _dpmpp_2m_weights(sigmas)

  def step(self, state, model_output, i, sample, noise=None, uncond=None):
    del noise
    x, x0, x0u = _x0s(self, state, i, sample, model_output, uncond)
    decay, weight = state.weights[i][0], state.weights[i][1]
    first = rounded(-decay * x0u)
    later = first - rounded(weight * rounded(x0 - state.history[0]))
    multistep = (state.count > 0) & (state.sigmas[i + 1] != 0)
    mix = jnp.where(multistep, later, first)
    prev = rounded(x0 + mix) + rounded(decay * x)
    return prev.astype(sample.dtype), self._remember(state, x0u)


@dataclasses.dataclass(frozen=True)
class ResMultistepCFGPPScheduler(ResMultistepScheduler):
  """ComfyUI's `res_multistep_cfg_pp`: RES multistep on the unconditional x0s after a shift by
  the guidance (x0 - x0_uncond); its Euler steps x0 + d_uncond * sigma_next."""

  name = "res_multistep_cfg_pp"
  takes_uncond = True

  def step(self, state, model_output, i, sample, noise=None, uncond=None):
    x, x0, x0u = _x0s(self, state, i, sample, model_output, uncond)
    decay, h, b1, b2, down = (state.weights[i][k] for k in range(5))
    shifted = x + rounded(x0 - x0u)
    multistep = rounded(decay * shifted) + rounded(
      h * _weighted([(b1, x0u), (b2, state.history[0])]))
    euler = x0 + rounded(true_divide(x - x0u, state.sigmas[i]) * down)
    return self._finish(state, i, euler, multistep, noise).astype(sample.dtype), self._remember(
      state, x0u)


@dataclasses.dataclass(frozen=True)
class GradientEstimationCFGPPScheduler(_MultistepScheduler):
  """ComfyUI's `gradient_estimation_cfg_pp`: x0 + d_uncond * sigma_next, plus the change of
  d_uncond since the last call times the step; the last step lands on x0."""

  name = "gradient_estimation_cfg_pp"
  takes_uncond = True

  def step(self, state, model_output, i, sample, noise=None, uncond=None):
    del noise
    x, x0, x0u = _x0s(self, state, i, sample, model_output, uncond)
    d = true_divide(x - x0u, state.sigmas[i])
    x = x0 + rounded(d * state.sigmas[i + 1])
    corrected = x + rounded(rounded(d - state.history[0]) * state.dt[i])
    prev = jnp.where(state.count >= 1, corrected, x)
    prev = jnp.where(state.sigmas[i + 1] == 0, x0, prev)
    return prev.astype(sample.dtype), self._remember(state, d)


# -- Their ancestral forms (ComfyUI's eta 1 by default, sdjax's `eta` option as A1111's Eta): each
# step aims at sigma_down, then adds fresh noise of scale sigma_up.


class _Ancestral(_Eta):
  def _step_sizes(self, sigma, sigma_next):
    sigma_down, sigma_up = ancestral_step(sigma, sigma_next, self.cfg.get(ANCESTRAL_ETA, 1.0))
    return sigma_down - sigma, sigma_up


@dataclasses.dataclass(frozen=True)
class ResMultistepAncestralScheduler(_Ancestral, ResMultistepScheduler):
  """ComfyUI's `res_multistep_ancestral`: RES multistep to sigma_down, then fresh noise."""

  name = "res_multistep_ancestral"
  schedule_options = (*ResMultistepScheduler.schedule_options, ANCESTRAL_ETA)
  _DEFAULTS = {**ResMultistepScheduler._DEFAULTS, S_NOISE: 1.0}


@dataclasses.dataclass(frozen=True)
class ResMultistepAncestralCFGPPScheduler(_Ancestral, ResMultistepCFGPPScheduler):
  """ComfyUI's `res_multistep_ancestral_cfg_pp`: its CFG++ form to sigma_down, then noise."""

  name = "res_multistep_ancestral_cfg_pp"
  schedule_options = (*ResMultistepScheduler.schedule_options, ANCESTRAL_ETA)
  _DEFAULTS = {**ResMultistepCFGPPScheduler._DEFAULTS, S_NOISE: 1.0}


# -- ER-SDE (Cui et al. 2023, arXiv:2309.06169), ComfyUI's er_sde: its VP ER-SDE-Solver-3 with
# its default noise scaler lambda (e^(lambda^0.3) + 10), over lambda = sigma / alpha (for an
# epsilon or v model, exp(log sigma) in float32: sigma to an ulp).


def _er_scaler(x: np.ndarray) -> np.ndarray:
  """ComfyUI's default ER-SDE noise scaler x (exp(x^0.3) + 10), each op rounded to float32."""
  f = np.float32
  power = np.power(np.asarray(x, np.float64), 0.3).astype(np.float32)
  return (f(x) * (np.exp(power.astype(np.float64)).astype(np.float32) + f(10))).astype(f)


def _power_scaler(power: float):
  """ComfyUI's reverse-time SDE noise scaler x^(eta + 1) (its ODE: x), rounded to float32."""
  def scale(x: np.ndarray) -> np.ndarray:
    return np.power(np.asarray(x, np.float64), power).astype(np.float32)
  return scale


def _er_sde_weights(sigmas: np.ndarray, scaler=_er_scaler) -> np.ndarray:
  """float32 [n, 8] per position: the weights of x and x0 (stage 1), of the first and second
  divided differences of x0 (stages 2, 3) and their divisors, alpha_t and the fresh noise's
  scale, from ComfyUI's float32 scalars (its 200-point sums in float64, rounded once), for the
  noise scaler `scaler` (its default's)."""
  f = np.float32
  n = len(sigmas) - 1
  out = np.zeros((n, 8), np.float32)
  sig = np.asarray(sigmas, np.float32)
  with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
    lam = np.exp(log_f32(sig).astype(np.float64)).astype(np.float32)  # exp(-(-log sigma))
    points = np.arange(200, dtype=np.float32)
    for i in range(n):
      if sig[i + 1] == 0:
        continue
      lam_s, lam_t = lam[i], lam[i + 1]
      alpha_s, alpha_t = sig[i] / lam_s, sig[i + 1] / lam_t
      r = scaler(lam_t) / scaler(lam_s)
      dt = lam_t - lam_s
      step = -dt / f(200)
      pos = lam_t + points * step
      scaled = scaler(pos)
      s = f(np.sum((f(1) / scaled).astype(np.float64))) * step
      s_u = f(np.sum(((pos - lam_s) / scaled).astype(np.float64))) * step
      out[i] = (alpha_t / alpha_s * r, alpha_t * (1 - r),
                alpha_t * (dt + s * scaler(lam_t)),
                lam_s - lam[i - 1] if i >= 1 else 1,
                alpha_t * (dt**2 / 2 + s_u * scaler(lam_t)),
                (lam_s - lam[i - 2]) / 2 if i >= 2 else 1,
                alpha_t, np.nan_to_num(np.sqrt(lam_t**2 - lam_s**2 * r**2), nan=0.0))
  return out


ER_SDE_TYPE, ER_SDE_STAGES = "er_sde_type", "max_stage"  # its SamplerER_SDE's settings
ER_SDE_TYPES = ("er_sde", "reverse_time_sde", "ode")


@dataclasses.dataclass(frozen=True)
class ERSDEScheduler(_MultistepScheduler):
  """ComfyUI's `er_sde` (3 stages): each step x0-weighted from the ER-SDE's exact linear part,
  corrected by the first and second divided differences of x0 in lambda (as calls allow), plus
  fresh noise; the last step lands on x0. Its SamplerER_SDE's settings as options:
  `er_sde_type` ("er_sde": its default noise scaler; "reverse_time_sde": lambda^(eta + 1),
  `eta` 1 by default, no noise at eta 0; "ode": lambda, no noise) and `max_stage` (1 to 3)."""

  name = "er_sde"
  schedule_options = (*_MultistepScheduler.schedule_options, ANCESTRAL_ETA)
  # config, not state options: they shape the program (its stages, whether it draws)
  _DEFAULTS = {**_MultistepScheduler._DEFAULTS, ER_SDE_TYPE: "er_sde", ER_SDE_STAGES: 3,
               S_NOISE: 1.0}

  @classmethod
  def from_config(cls, scheduler_config, **overrides):
    if overrides.get(ER_SDE_TYPE) == "reverse_time_sde" and overrides.get(ANCESTRAL_ETA) == 0:
      overrides = {**overrides, ER_SDE_TYPE: "ode"}  # ComfyUI's reverse-time SDE at eta 0
    return super().from_config(scheduler_config, **overrides)

  @classmethod
  def _validate(cls, config) -> None:
    super()._validate(config)
    kind, stages = config.get(ER_SDE_TYPE, "er_sde"), config.get(ER_SDE_STAGES, 3)
    eta = config.get(ANCESTRAL_ETA, 1.0)
    if kind not in ER_SDE_TYPES:
      raise SchedulerConfigError(f"scheduler {cls.name!r}: {ER_SDE_TYPE} must be one of "
                                 f"{', '.join(ER_SDE_TYPES)}, got {kind!r}")
    if isinstance(stages, bool) or stages not in (1, 2, 3):
      raise SchedulerConfigError(f"scheduler {cls.name!r}: {ER_SDE_STAGES} must be 1, 2 or 3, "
                                 f"got {stages!r}")
    if isinstance(eta, bool) or not isinstance(eta, int | float) or not 0 <= eta <= 100:
      raise SchedulerConfigError(f"scheduler {cls.name!r}: eta (the reverse-time SDE's) must be "
                                 f"a number in [0, 100], got {eta!r}")

  @property
  def needs_noise(self) -> bool:  # type: ignore[override]
    return self.cfg.get(ER_SDE_TYPE, "er_sde") != "ode"

  def _weights(self, sigmas: np.ndarray) -> np.ndarray:
    kind = self.cfg.get(ER_SDE_TYPE, "er_sde")
    if kind == "er_sde":
      return _er_sde_weights(sigmas)
    power = 1.0 + (self.cfg.get(ANCESTRAL_ETA, 1.0) if kind == "reverse_time_sde" else 0.0)
    return _er_sde_weights(sigmas, _power_scaler(power))

  def step(self, state, model_output, i, sample, noise=None):
    if self.needs_noise and noise is None:
      raise ValueError(f"{self.name} needs `noise` (unit Gaussian, sample shape) at every step")
    x = as_f32(sample)
    x0, _ = self._x0_and_d(state, model_output, i, x)
    keep, mix, first, first_div, second, second_div, alpha_t, spread = (
      state.weights[i][k] for k in range(8))
    old_x0, old_first = state.history[0], state.history[1]
    stage1 = rounded(keep * x) + rounded(mix * x0)
    first_diff = true_divide(rounded(x0 - old_x0), first_div)
    stage2 = stage1 + rounded(first * first_diff)
    second_diff = true_divide(rounded(first_diff - old_first), second_div)
    stage3 = stage2 + rounded(second * second_diff)
    stages = min(int(self.cfg.get(ER_SDE_STAGES, 3)), 3)
    prev = jnp.where(state.count >= 1, stage2, stage1) if stages >= 2 else stage1
    prev = jnp.where(state.count >= 2, stage3, prev) if stages == 3 else prev
    if self.needs_noise:
      prev = prev + rounded(rounded(alpha_t * as_f32(noise)) * spread)
    prev = jnp.where(state.sigmas[i + 1] == 0, x0, prev)
    history = jnp.stack([x0, jnp.where(state.count >= 1, first_diff, old_first),
                         state.history[2]])
    return prev.astype(sample.dtype), state.replace(history=history, count=state.count + 1)


# -- DDPM over noise levels (k-diffusion's sample_ddpm, ComfyUI's ddpm).


@struct.dataclass
class KDDPMState(SigmaState):
  """`SigmaState` and DDPM's per-position scalars.

  Attributes:
    coefficients: [n, 6] float32, as ComfyUI's torch scalars: 1 - alpha, sqrt(1 -
      alpha_cumprod), sqrt(1 / alpha) (alpha: alpha_cumprod over the next level's), the fresh
      noise's scale (0 on the last step), sqrt(1 + sigma^2) and sqrt(1 + sigma_next^2) (1 at 0).
  """

  coefficients: jnp.ndarray


def _ddpm_coefficients(sigmas: np.ndarray) -> np.ndarray:
  f, one = np.float32, np.float32(1)
  rows = []
  for sigma, sigma_next in zip(sigmas[:-1].astype(f), sigmas[1:].astype(f), strict=True):
    alphas = one / (sigma * sigma + one)
    alphas_next = one / (sigma_next * sigma_next + one)
    alpha = alphas / alphas_next
    spread = np.sqrt((one - alpha) * (one - alphas_next) / (one - alphas)) if sigma_next > 0 \
        else f(0)
    rows.append((one - alpha, np.sqrt(one - alphas), np.sqrt(one / alpha), spread,
                 np.sqrt(one + sigma * sigma),
                 np.sqrt(one + sigma_next * sigma_next) if sigma_next != 0 else one))
  return np.asarray(rows, np.float32)


@dataclasses.dataclass(frozen=True)
class KDDPMScheduler(EulerDiscreteScheduler):
  """k-diffusion's `sample_ddpm` (ComfyUI's `ddpm`): see the module docstring."""

  name = "k_ddpm"
  needs_noise = True

  def set_timesteps(self, num_inference_steps: int, sample_shape: tuple[int, ...] | None = None):
    base = super().set_timesteps(num_inference_steps, sample_shape)
    return KDDPMState(**{k: getattr(base, k) for k in base.__dataclass_fields__},
                      coefficients=jnp.asarray(_ddpm_coefficients(np.asarray(base.sigmas))))

  def step(self, state, model_output, i, sample, noise=None):
    if noise is None:
      raise ValueError(f"{self.name} needs `noise` (unit Gaussian, sample shape) at every step")
    x = as_f32(sample)
    _, d = _x0_and_slope(self, state, model_output, i, x)
    keep, deviation, scale, spread, scale_in, scale_out = (
      state.coefficients[i][k] for k in range(6))
    mean = rounded(scale * rounded(true_divide(x, scale_in)
                                   - true_divide(rounded(keep * d), deviation)))
    prev = rounded((mean + rounded(spread * as_f32(noise))) * scale_out)
    return prev.astype(sample.dtype), state


# -- SA-Solver (Xue et al. 2023, arXiv:2309.05019), ComfyUI's sa_solver: a stochastic Adams
# predictor-corrector over the run's x0s in lambda = -log sigma; an SDE (tau = eta) where the
# next level lies between the training schedule's levels at 20% and 80% of its steps, an ODE
# (tau = 0) elsewhere.

# Its SamplerSASolver's settings, sdjax's options of sa_solver (its KSampler's: the defaults).
SA_SETTINGS = {"predictor_order": 3, "corrector_order": 4, "sde_start_percent": 0.2,
               "sde_end_percent": 0.8, "simple_order_2": False}


def _percent_sigma(config, percent: float) -> np.float32:
  """ComfyUI's `ModelSamplingDiscrete.percent_to_sigma`: the level at training time
  (1 - percent) * 999, interpolated in float32 log sigma between its two nearest."""
  if percent <= 0 or percent >= 1:
    return np.float32(999999999.9 if percent <= 0 else 0.0)
  alphas_cumprod = train_alphas_cumprod(config)
  log_sigmas = log_f32(np.sqrt((1 - alphas_cumprod) / alphas_cumprod))
  f = np.float32
  t = np.clip(f((1.0 - percent) * 999.0), 0, len(log_sigmas) - 1)
  low, high = int(np.floor(t)), int(np.ceil(t))
  w = f(t - f(low))
  return exp_f32(f(f(f(1) - w) * log_sigmas[low]) + f(w * log_sigmas[high]))


def _sa_simple_coefficients(sigma_next, lambdas, lambda_s, lambda_t, tau: float,
                            correcting: bool) -> np.ndarray:
  """SA-Solver's simple order-2 weights (its paper's appendix D, ComfyUI's simple_order_2) of the
  two x0s at `lambdas`, in float32 as ComfyUI's torch scalars."""
  f = np.float32
  mul, h = f(1.0 + tau * tau), f(f(lambda_t) - f(lambda_s))
  alpha_t = f(f(sigma_next) * exp_f32(f(lambda_t)))
  whole = f(alpha_t * -expm1_f32(f(-h * mul)))
  if correcting:
    newer = f(alpha_t * f(f(0.5 * mul) * h))
    return np.asarray([f(whole - newer), newer], np.float32)
  older = f(f(alpha_t * f(f(0.5 * mul) * f(h * h))) / f(f(lambdas[-2]) - f(lambda_s)))
  return np.asarray([older, f(whole - older)], np.float32)


def _sa_coefficients(sigma_next, lambdas, lambda_s, lambda_t, tau: float) -> np.ndarray:
  """The stochastic Adams weights of the x0s at `lambdas` (oldest first) in a step from lambda_s
  to lambda_t (eqs. 15 and 18): sigma_next e^lambda_t times the integrals of their Lagrange basis
  polynomials against (1 + tau^2) e^((1 + tau^2)(x - lambda_t)), those of x^p by parts from
  x^(p-1)'s. In float64 from the float32 levels, rounded once: ComfyUI's float32 solve of the
  Vandermonde system loses up to 3e-3 of them at 40 steps (and differs by device)."""
  lambdas = np.asarray(lambdas, np.float64)
  order, s, t = len(lambdas), float(lambda_s), float(lambda_t)
  mul = 1.0 + tau * tau
  integrals = np.zeros(order)
  for p in range(order):
    integrals[p] = t**p - s**p * np.exp(-mul * (t - s)) - (p / mul * integrals[p - 1] if p else 0)
  basis = np.linalg.solve(np.vander(lambdas, order, increasing=True).T, integrals)
  return (float(sigma_next) * np.exp(t) * basis).astype(np.float32)


def _sa_solver_table(sigmas: np.ndarray, taus: np.ndarray, orders=(3, 4), simple=False):
  """float32 (predictor [n, P, P], corrector [n, C, C], scalars [n, 4]) at each position, for
  `orders` (P, C): the weights of each order's x0s (latest first, 0 beyond the order; with
  `simple` SA-Solver's simple ones at order 2), and the predictor's decay sigma_next / sigma
  e^(-tau^2 h), its noise's scale sqrt(1 - e^(-2 tau^2 h)) (before sigma_next) and the highest
  orders the run's end allows (ComfyUI lowers them over the last steps of a run to 0), as its
  torch scalars."""
  f = np.float32
  n = len(sigmas) - 1
  lam = -log_f32(np.asarray(sigmas, np.float32))
  predictor = np.zeros((n, orders[0], orders[0]), np.float32)
  corrector = np.zeros((n, max(orders[1], 1), max(orders[1], 1)), np.float32)
  scalars = np.zeros((n, 4), np.float32)
  to_zero = sigmas[-1] == 0

  def weights(sigma_next, levels, start, end, tau, correcting):
    if simple and len(levels) == 2:
      return _sa_simple_coefficients(sigma_next, levels, start, end, tau, correcting)
    return _sa_coefficients(sigma_next, levels, start, end, tau)

  for i in range(n):
    caps = (min(orders[0], n - 1 - i), min(orders[1], n - i)) if to_zero else orders
    scalars[i, 2:] = caps
    if sigmas[i + 1] != 0:
      tau = float(taus[i + 1])
      h = f(lam[i + 1] - lam[i])
      scalars[i, 0] = f(f(sigmas[i + 1]) / f(sigmas[i])) * exp_f32(f(-(tau * tau)) * h)
      scalars[i, 1] = np.sqrt(-expm1_f32(f(f(-2 * tau * tau) * h)))
      for k in range(1, min(orders[0], i + 1) + 1):
        predictor[i, k - 1, :k] = weights(sigmas[i + 1], lam[i - k + 1:i + 1], lam[i],
                                          lam[i + 1], tau, False)[::-1]
    if i >= 1:
      for k in range(1, min(orders[1], i + 1) + 1):
        corrector[i, k - 1, :k] = weights(sigmas[i], lam[i - k + 1:i + 1], lam[i - 1], lam[i],
                                          float(taus[i]), True)[::-1]
  return predictor, corrector, scalars


@struct.dataclass
class SASolverState(SigmaState):
  """`SigmaState` (over the model calls) and what SA-Solver carries between them.

  Attributes:
    predictor, corrector, scalars: `_sa_solver_table`'s, at each step of ComfyUI's loop.
    levels: [n + 1] float32, the levels of its loop's steps.
    loop: [P] int32, the step of its loop each call belongs to; correcting: [P] bool, PECE's
      first call of a step (evaluate, correct; the second evaluates the corrected sample).
    corrected: the last corrected sample; noise: the last predictor's scaled noise.
    history: [4, ...] float32, the earlier x0s, latest first; count: [] int32, the x0s this
      run has kept (one a step).
  """

  predictor: jnp.ndarray
  corrector: jnp.ndarray
  scalars: jnp.ndarray
  levels: jnp.ndarray
  loop: jnp.ndarray
  correcting: jnp.ndarray
  corrected: jnp.ndarray
  noise: jnp.ndarray
  history: jnp.ndarray
  count: jnp.ndarray


def _adams(weights, x0s):
  """sum of weight * x0 over the x0s (latest first), oldest first, each product rounded."""
  total = rounded(weights[-1] * x0s[-1])
  for k in range(len(x0s) - 2, -1, -1):
    total = rounded(total + rounded(weights[k] * x0s[k]))
  return total


def _sa_order(table, j, known, highest):
  """The weights of `table[j]` of the order the x0s known and the run's end allow."""
  order = jnp.minimum(known, highest).astype(jnp.int32)
  return jax.lax.dynamic_index_in_dim(table[j], jnp.maximum(order - 1, 0), keepdims=False)


@dataclasses.dataclass(frozen=True)
class SASolverScheduler(_Eta, _MultistepScheduler):
  """ComfyUI's `sa_solver` (predictor order 3, corrector 4, tau = eta, 1 by default, where the
  next level lies between the training levels at 20% and 80%): each call corrects the sample it
  was given with its x0 (not at a run's first call, nor at the last to 0), then predicts the next
  level's from the corrected one, plus fresh noise where tau > 0; the last step (to 0) lands on
  x0. A run ending above 0 ends, as ComfyUI's, on its last corrected sample. Its
  SamplerSASolver's settings are options (`SA_SETTINGS`; config, not state: they shape the
  program), eta too (it decides where ComfyUI draws)."""

  name = "sa_solver"
  pece: ClassVar[bool] = False  # a second call a step, at the corrected sample
  _DEFAULTS = {**_MultistepScheduler._DEFAULTS, ANCESTRAL_ETA: 1.0, **SA_SETTINGS, S_NOISE: 1.0}

  @classmethod
  def _validate(cls, config) -> None:
    super()._validate(config)
    for key in ("predictor_order", "corrector_order"):
      low = 1 if key == "predictor_order" or cls.pece else 0
      if isinstance(config[key], bool) or config[key] not in range(low, 7):
        raise SchedulerConfigError(f"scheduler {cls.name!r}: {key} must be an integer from "
                                   f"{low} to 6, got {config[key]!r}")
    for key in ("sde_start_percent", "sde_end_percent"):
      if isinstance(config[key], bool) or not (isinstance(config[key], int | float)
                                               and 0 <= config[key] <= 1):
        raise SchedulerConfigError(f"scheduler {cls.name!r}: {key} must be a number in [0, 1], "
                                   f"got {config[key]!r}")
    if not isinstance(config["simple_order_2"], bool):
      raise SchedulerConfigError(f"scheduler {cls.name!r}: simple_order_2 must be true or false")

  @property
  def _orders(self) -> tuple[int, int]:
    return int(self.cfg["predictor_order"]), int(self.cfg["corrector_order"])

  def _taus(self, sigmas: np.ndarray) -> np.ndarray:
    """tau at each level: eta between the levels at the start and end percents of training time
    (20% and 80%), else 0."""
    eta = float(self.cfg.get(ANCESTRAL_ETA, 1.0))
    high = _percent_sigma(self.cfg, self.cfg["sde_start_percent"])
    low = _percent_sigma(self.cfg, self.cfg["sde_end_percent"])
    sigmas = np.asarray(sigmas, np.float32)
    return np.where((sigmas <= high) & (sigmas >= low), eta, 0.0) if eta > 0 else 0 * sigmas

  def _levels(self, steps: int) -> np.ndarray:
    """float32 [steps + 1]: the levels of ComfyUI's loop (Euler's placement), on the host."""
    alphas_cumprod = train_alphas_cumprod(self.cfg)
    _, sigmas = sigma_schedule(self.cfg, steps, alphas_cumprod,
                               final_sigma(self.cfg, alphas_cumprod), name=self.name,
                               any_final=True)
    return sigmas.astype(np.float32)

  def _calls(self, steps: int) -> np.ndarray:
    """int [P]: the step of ComfyUI's loop of each model call (PECE: 1, then 2 a step)."""
    return np.arange(steps) if not self.pece else (np.arange(2 * steps - 1) + 1) // 2

  def set_timesteps(self, num_inference_steps: int, sample_shape: tuple[int, ...] | None = None):
    base = super().set_timesteps(num_inference_steps, sample_shape)
    sigmas = np.asarray(base.sigmas, np.float32)
    predictor, corrector, scalars = _sa_solver_table(sigmas, self._taus(sigmas), self._orders,
                                                     self.cfg["simple_order_2"])
    loop = self._calls(len(sigmas) - 1)
    correcting = (np.arange(len(loop)) % 2 == 1) if self.pece else np.zeros(len(loop), bool)
    fields = {k: getattr(base, k) for k in SigmaState.__dataclass_fields__}
    if self.pece:  # the levels of its calls, at the UNet's timesteps of those levels
      fields = _per_call(self.cfg, sigmas[loop], np.asarray(base.timesteps)[loop], sigmas)
    zeros = jnp.zeros(sample_shape, jnp.float32)
    return SASolverState(**fields, predictor=jnp.asarray(predictor),
                         corrector=jnp.asarray(corrector), scalars=jnp.asarray(scalars),
                         levels=jnp.asarray(sigmas), loop=jnp.asarray(loop, jnp.int32),
                         correcting=jnp.asarray(correcting), corrected=zeros, noise=zeros,
                         history=jnp.zeros((max(self._orders), *sample_shape), jnp.float32),
                         count=base.count)

  def noise_draw(self, i, positions: int):
    """ComfyUI draws only for the steps with tau > 0 (to a level above 0), at their predictor."""
    sigmas = self._levels(positions if not self.pece else (positions + 1) // 2)
    drawing = (self._taus(sigmas[1:]) > 0) & (sigmas[1:] > 0)
    before = np.concatenate([[0], np.cumsum(drawing)]).astype(np.int32)
    at = (np.arange(positions + 1) + 1) // 2 if self.pece else np.arange(positions + 1)
    before = before[np.minimum(at, len(before) - 1)]
    return _drawn_before(before, i)

  def step(self, state, model_output, i, sample, noise=None):
    if noise is None:
      raise ValueError(f"{self.name} needs `noise` (unit Gaussian, sample shape) at every step")
    x = as_f32(sample)
    x0, _ = _x0_and_slope(self, state, model_output, i, x)
    j, correcting = state.loop[i], state.correcting[i]
    sigma_next = state.levels[j + 1]
    decay, spread, max_predictor, max_corrector = (state.scalars[j][k] for k in range(4))
    # PECE's second call of a step: its x0 takes the place of the step's first's
    revisit = (~correcting) & (state.count > 0) if self.pece else jnp.bool_(False)
    predictor_order, corrector_order = self._orders
    most = max(predictor_order, corrector_order)  # the x0s ComfyUI keeps
    kept = [state.history[k] for k in range(most)]
    x0s = [x0, *(jnp.where(revisit, kept[k + 1], kept[k]) for k in range(most - 1))]
    known = jnp.minimum(state.count + jnp.where(revisit, 0, 1), most).astype(jnp.float32)
    # corrector: from the corrected sample before (PECE: at a step's first call; else at the
    # run's later calls but the last to 0)
    weights = _sa_order(state.corrector, j, known, max_corrector)
    back = state.scalars[jnp.maximum(j - 1, 0), 0]
    corrected = (rounded(back * state.corrected)
                 + _adams(weights, x0s[:max(corrector_order, 1)])) + state.noise
    fixing = correcting if self.pece else (state.count > 0) & (sigma_next != 0)
    fixing = fixing & (corrector_order > 0)
    x = jnp.where(fixing, corrected, x)
    # predictor: the next level's sample, plus fresh noise where tau > 0
    weights = _sa_order(state.predictor, j, known, max_predictor)
    fresh = rounded(rounded(as_f32(noise) * sigma_next) * spread)
    predicted = (rounded(decay * x) + _adams(weights, x0s[:predictor_order])) + fresh
    last = i == len(state.timesteps) - 1
    prev = jnp.where(sigma_next == 0, x0, jnp.where(last, x, predicted))
    prev = jnp.where(correcting, x, prev)
    history = jnp.stack([x0, *kept[:most - 1]])
    if self.pece:
      history = jnp.where(revisit, jnp.stack([x0, *kept[1:]]), history)
    return prev.astype(sample.dtype), state.replace(
      corrected=x, noise=jnp.where(correcting, state.noise, fresh), history=history,
      count=state.count + jnp.where(revisit, 0, 1))


@dataclasses.dataclass(frozen=True)
class SASolverPECEScheduler(_StepStarts, SASolverScheduler):
  """ComfyUI's `sa_solver_pece`: SA-Solver predict-evaluate-correct-evaluate, two UNet calls a
  step but the run's first (the second at the corrected sample, whose x0 the predictor takes);
  it corrects the last step too."""

  name = "sa_solver_pece"
  order = 2
  pece = True

  def _firsts(self, state) -> np.ndarray:
    return ~np.asarray(state.correcting)
