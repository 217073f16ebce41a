"""DPM-Solver-12 / -23 with adaptive step size (Lu et al. 2022, arXiv:2206.00927): ComfyUI's
`dpm_adaptive` sampler, k-diffusion's `DPMSolver.dpm_solver_adaptive` (eta 0), and A1111's "DPM
adaptive" (`dpm_adaptive_ancestral`: at its Eta, with fresh noise, `DPMAdaptiveAncestralScheduler`).

Between the run's first level and its smallest above 0 (as `dpm_fast`: its KSampler's ends; an
img2img or hires pass plans over the levels it keeps) it steps in t = -log sigma: each attempt
from s to t = min(t_end, s + h) makes the order-3 pair (a DPM-Solver-2 step with r1 = 1/3 and a
DPM-Solver-3 step, sharing their model calls: 3 a try) or the order-2 pair (DPM-Solver-1 and -2,
2 calls), and a PID controller on their scaled difference (rtol, atol against the larger of the
low-order result and the last accepted one) accepts the high-order result or not and scales h
(1 + atan(factor - 1)). The run's steps set only the levels' ends, not how many calls it makes.

Unlike k-diffusion, which measures the error over the whole batch at once, each image here has
its own step sizes (its own loop; the batch's calls are made together until every image is
done), so an image is the same whatever batch or device it is made in; it equals k-diffusion's
run of that image alone (a batch of one, as ComfyUI runs a one-image batch). The controller's
arithmetic is float32 (k-diffusion's step size is a Python float): steps land within a few
float32 ulps of its. A run stops an image after `MAX_ATTEMPTS` attempts, or when its error is
not finite (where k-diffusion would loop forever).

Its calls are not positions of a schedule, so a run takes none of the features planned per
step (`sampling` refuses them): ControlNets and adapters, CFG skips, perturbed-attention
guidance, cfg_parallel, instruct-pix2pix, a refiner handoff. A1111's prompt editing and
alternation do run: its denoiser counts calls, the run's model gets that count (`run`), and
a call past the schedule's last step takes the schedule's first prompt again, as A1111's
`reconstruct_cond_batch` picks it (a run of more calls than steps edits back).
Settings (its SamplerDPMAdaptative node's, k-diffusion's defaults): `adaptive_order` (3 or 2),
`rtol` (0.05), `atol` (0.0078), `h_init` (0.05), `pcoeff` (0), `icoeff` (1), `dcoeff` (0),
`accept_safety` (0.81).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from sdjax.schedulers.comfyui_samplers import (
  DPMFastAncestralScheduler,
  DPMFastScheduler,
  _Eta,
  _per_call,
  _placed_levels,
)
from sdjax.schedulers.common import (
  PLAN_START,
  S_NOISE,
  SchedulerConfigError,
  log_f32,
  rounded,
  true_divide,
)
from sdjax.schedulers.euler import ANCESTRAL_ETA, SigmaState, predict_original, train_sigmas

ORDER, RTOL, ATOL, H_INIT = "adaptive_order", "rtol", "atol", "h_init"
PCOEFF, ICOEFF, DCOEFF, ACCEPT_SAFETY = "pcoeff", "icoeff", "dcoeff", "accept_safety"
SETTINGS = {ORDER: 3, RTOL: 0.05, ATOL: 0.0078, H_INIT: 0.05, PCOEFF: 0.0, ICOEFF: 1.0,
            DCOEFF: 0.0, ACCEPT_SAFETY: 0.81}
# Attempts an image may take (k-diffusion has no bound): SD's runs at the defaults take tens.
MAX_ATTEMPTS = 1000
_F32 = np.float32


@struct.dataclass
class DPMAdaptiveState(SigmaState):
  """`SigmaState` over the schedule's levels (its first sets the starting noise), and the
  adaptive loop's ends and the training levels (the UNet's timestep of a level, on device).

  Attributes:
    t_start, t_end: float32 -log of the first level and of the smallest above 0.
    log_sigmas: float32 [T] the training levels' logs, ascending.
    whole_t: bool []: the UNet sees the nearest whole timestep (the `comfyui` form, a state
      option, which the compiled program does not see).
    eta: float32 []: the ancestral eta (`dpm_adaptive_ancestral`'s; 0 for `dpm_adaptive`).
  """

  t_start: jnp.ndarray
  t_end: jnp.ndarray
  log_sigmas: jnp.ndarray
  whole_t: jnp.ndarray
  eta: jnp.ndarray


@dataclasses.dataclass(frozen=True)
class DPMAdaptiveScheduler(DPMFastScheduler):
  """ComfyUI's `dpm_adaptive` (see the module docstring)."""

  name = "dpm_adaptive"
  order = 1  # the schedule's positions are its levels (the run's calls are its own)
  adaptive = True
  _DEFAULTS = {**DPMFastScheduler._DEFAULTS, **SETTINGS}

  @classmethod
  def _validate(cls, config) -> None:
    super()._validate(config)
    settings = {key: config.get(key, value) for key, value in SETTINGS.items()}
    if settings[ORDER] not in (2, 3) or isinstance(settings[ORDER], bool):
      raise SchedulerConfigError(f"scheduler {cls.name!r}: {ORDER} must be 2 or 3, got "
                                 f"{settings[ORDER]!r}")
    for key in (RTOL, ATOL, H_INIT, PCOEFF, ICOEFF, DCOEFF, ACCEPT_SAFETY):
      value = settings[key]
      if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(
          value):
        raise SchedulerConfigError(f"scheduler {cls.name!r}: {key} must be a number, got "
                                   f"{value!r}")
    if settings[RTOL] < 0 or settings[ATOL] < 0 or settings[RTOL] + settings[ATOL] <= 0:
      raise SchedulerConfigError(f"scheduler {cls.name!r}: rtol and atol must be >= 0, not "
                                 "both 0")
    if settings[H_INIT] == 0 or settings[PCOEFF] + settings[ICOEFF] + settings[DCOEFF] == 0:
      raise SchedulerConfigError(f"scheduler {cls.name!r}: h_init and pcoeff + icoeff + dcoeff "
                                 "must not be 0")

  def set_timesteps(self, num_inference_steps: int, sample_shape: tuple[int, ...] | None = None):
    config = self.cfg
    alphas_cumprod, timesteps, sigmas = _placed_levels(self, num_inference_steps, sample_shape)
    start = config.get(PLAN_START, 0)
    sigmas, timesteps = sigmas[start:], np.asarray(timesteps, np.float32)[start:]
    high, low = self._range(alphas_cumprod, sigmas)
    if not (high > 0 and low > 0):
      raise ValueError(f"{self.name} runs between two levels above 0: give it more steps")
    table = train_sigmas(alphas_cumprod)  # logs as ComfyUI's (float64) and k-diffusion's
    comfyui = bool(config.get("comfyui"))
    log_sigmas = (np.log(table).astype(np.float32) if comfyui
                  else log_f32(table.astype(np.float32)))
    return DPMAdaptiveState(
      **_per_call(config, sigmas[:-1], timesteps[:len(sigmas) - 1], sigmas),
      t_start=jnp.asarray(-log_f32(_F32(high))), t_end=jnp.asarray(-log_f32(_F32(low))),
      log_sigmas=jnp.asarray(log_sigmas), whole_t=jnp.asarray(comfyui),
      eta=jnp.asarray(_F32(config.get(ANCESTRAL_ETA, 1.0) if self.needs_noise else 0.0)))

  def _firsts(self, state) -> np.ndarray:
    return np.ones(len(state.timesteps), bool)

  def step(self, state, model_output, i, sample, noise=None):
    raise ValueError(f"{self.name} runs its own loop (`run`), not steps at positions")

  def unet_timesteps(self, state, sigma):
    """float32 [B]: the UNet's timestep of each level `sigma` [B]: ComfyUI's nearest whole one
    (`whole_t`), else k-diffusion's interpolation in log sigma (its `sigma_to_t`)."""
    log_sigmas = state.log_sigmas
    log_sigma = jnp.log(sigma)
    nearest = jnp.argmin(jnp.abs(log_sigma[:, None] - log_sigmas[None, :]), axis=1)
    count = jnp.sum(log_sigmas[None, :] <= log_sigma[:, None], axis=1)
    low = jnp.clip(count - 1, 0, len(log_sigmas) - 2)
    low_log, high_log = log_sigmas[low], log_sigmas[low + 1]
    w = jnp.clip(true_divide(low_log - log_sigma, low_log - high_log), 0.0, 1.0)
    between = (rounded((1 - w) * low.astype(jnp.float32))
               + rounded(w * (low + 1).astype(jnp.float32)))
    return jnp.where(state.whole_t, nearest.astype(jnp.float32), between)

  def run(self, state, x, model, noise=None):
    """The whole run from `x` (float32 [B, ...], at the first level's noise) to the smallest
    level's: `model(x_in, t, call)` is the UNet's output (float32) for inputs x / sqrt(sigma^2 +
    1) at timesteps t [B], each row at its own level, at the run's call `call` (int32 []: the
    model calls before it, as A1111's denoiser counts them; every row that is not done yet has
    made them all); `noise(k)` (`needs_noise`) each row's k-th step draw (unit Gaussian,
    [B, ...]; k int32 [B])."""
    cfg = {key: self.cfg.get(key, value) for key, value in SETTINGS.items()}
    order = int(cfg[ORDER])
    ancestral = self.needs_noise
    if ancestral and noise is None:
      raise ValueError(f"{self.name} needs `noise` (each row's k-th step draw)")
    # The PID controller's order: 1.5 with fresh noise (eta > 0), as k-diffusion's.
    pid_order = jnp.where(state.eta > 0, _F32(1.5), _F32(order))
    b1 = true_divide(_F32(cfg[PCOEFF] + cfg[ICOEFF] + cfg[DCOEFF]), pid_order)
    b2 = true_divide(_F32(-(cfg[PCOEFF] + 2 * cfg[DCOEFF])), pid_order)
    b3 = true_divide(_F32(cfg[DCOEFF]), pid_order)
    s_noise = _F32(self.cfg.get(S_NOISE, 1.0))
    t_end = state.t_end
    stop = t_end - _F32(1e-5)
    rows = x.shape[0]
    numel = math.prod(x.shape[1:])
    per_row = (rows,) + (1,) * (x.ndim - 1)

    def sigma(t):
      return jnp.exp(-t)

    def eps_at(x_, t, call):
      """k-diffusion's DPMSolver.eps: (x - the model's x0) / sigma at levels exp(-t) [B]."""
      level = sigma(t)
      scale = jnp.sqrt(rounded(level * level) + 1.0)
      out = model(true_divide(x_, scale.reshape(per_row)), self.unet_timesteps(state, level),
                  call)
      level, scale = level.reshape(per_row), scale.reshape(per_row)
      x0 = predict_original(self.prediction_type, out.astype(jnp.float32), x_, level,
                            true_divide(-level, scale), rounded(level * level) + 1.0)
      return true_divide(x_ - x0, level)

    def col(v):
      return v.reshape(per_row)

    def attempt(carry):
      x, x_prev, s, h, errs, started, count, drawn = carry
      active = (s < stop) & jnp.isfinite(h) & (count < MAX_ATTEMPTS)
      t = jnp.minimum(t_end, s + h)
      up = jnp.zeros_like(t)
      if ancestral:  # to sigma_down (not past the end), then noise of the rest of sigma(t)'s
        down, up = ancestral_levels(sigma(s), sigma(t), state.eta)
        aim = jnp.minimum(t_end, -jnp.log(down))
        up = jnp.where(state.eta > 0, jnp.sqrt(rounded(sigma(t) * sigma(t))
                                               - rounded(sigma(aim) * sigma(aim))), 0.0)
        t, target = jnp.where(state.eta > 0, aim, t), t
      else:
        target = t
      hh = t - s
      r1 = _F32(1 / 3) if order == 3 else _F32(1 / 2)
      s1 = s + rounded(r1 * hh)
      r2 = _F32(2 / 3)
      s2 = s + rounded(r2 * hh)
      e1, e1h = jnp.expm1(rounded(r1 * hh)), jnp.expm1(hh)
      e2 = jnp.expm1(rounded(r2 * hh))
      sig_s1, sig_s2, sig_t = sigma(s1), sigma(s2), sigma(t)

      def stage(k, eps):
        """The k-th call's input and level from the calls before it (`eps` [order, ...])."""
        u1 = x - rounded(col(rounded(sig_s1 * e1)) * eps[0])
        u2 = (x - rounded(col(rounded(sig_s2 * e2)) * eps[0])) - rounded(
            col(rounded(rounded(sig_s2 * _F32(2.0)) * (true_divide(e2, rounded(r2 * hh)) - 1.0)))
            * (eps[1] - eps[0]))
        x_in = jnp.where(k == 0, x, jnp.where(k == 1, u1, u2))
        level = jnp.where(k == 0, s, jnp.where(k == 1, s1, s2))
        # Every row has made each attempt so far (a row stops attempting only when done).
        return eps.at[k].set(eps_at(x_in, level, jnp.max(count) * order + k))

      eps = jax.lax.fori_loop(0, order, stage, jnp.zeros((order, *x.shape), jnp.float32))
      whole = x - rounded(col(rounded(sig_t * e1h)) * eps[0])
      if order == 3:
        low = whole - rounded(col(rounded(true_divide(sig_t, _F32(2 * (1 / 3))) * e1h))
                              * (eps[1] - eps[0]))
        high = whole - rounded(col(rounded(true_divide(sig_t, r2) * (true_divide(e1h, hh) - 1.0)))
                               * (eps[2] - eps[0]))
      else:
        low = whole
        high = whole - rounded(col(rounded(true_divide(sig_t, _F32(2 * (1 / 2))) * e1h))
                               * (eps[1] - eps[0]))
      delta = jnp.maximum(_F32(cfg[ATOL]),
                          rounded(_F32(cfg[RTOL]) * jnp.maximum(jnp.abs(low), jnp.abs(x_prev))))
      scaled = true_divide(low - high, delta).reshape(rows, -1)
      error = true_divide(jnp.sqrt(jnp.sum(scaled * scaled, axis=1)), _F32(numel ** 0.5))
      inv = true_divide(1.0, error + _F32(1e-8))
      errs = jnp.where(started[None], errs, inv[None])
      factor = jnp.power(inv, b1) * jnp.power(errs[0], b2) * jnp.power(errs[1], b3)
      factor = 1.0 + jnp.arctan(factor - 1.0)
      accept = (factor >= _F32(cfg[ACCEPT_SAFETY])) & active
      errs = jnp.where(accept[None], jnp.stack([inv, errs[0]]), errs)
      keep = col(accept)
      if ancestral:
        high = high + rounded(col(rounded(up * s_noise)) * noise(drawn))
      return (jnp.where(keep, high, x), jnp.where(keep, low, x_prev),
              jnp.where(accept, target, s), jnp.where(active, h * factor, h), errs,
              started | active, count + active.astype(jnp.int32),
              drawn + accept.astype(jnp.int32))

    def going(carry):
      _, _, s, h, _, _, count, _ = carry
      return jnp.any((s < stop) & jnp.isfinite(h) & (count < MAX_ATTEMPTS))

    start = (x, x, jnp.full((rows,), state.t_start, jnp.float32),  # forward in t: h > 0
             jnp.full((rows,), _F32(abs(float(cfg[H_INIT]))), jnp.float32),
             jnp.ones((2, rows), jnp.float32), jnp.zeros((rows,), bool),
             jnp.zeros((rows,), jnp.int32), jnp.zeros((rows,), jnp.int32))
    return jax.lax.while_loop(going, attempt, start)[0]



def ancestral_levels(sigma, sigma_next, eta):
  """k-diffusion's get_ancestral_step on device (float32 [B] levels, traced eta > 0):
  (sigma_down, sigma_up), sigma_up = min(sigma_next, eta sqrt(sigma_next^2 (sigma^2 -
  sigma_next^2) / sigma^2))."""
  sq, sq_next = rounded(sigma * sigma), rounded(sigma_next * sigma_next)
  up = jnp.minimum(sigma_next, rounded(eta * jnp.sqrt(true_divide(rounded(sq_next * (sq - sq_next)),
                                                                  sq))))
  return jnp.sqrt(sq_next - rounded(up * up)), up


@dataclasses.dataclass(frozen=True)
class DPMAdaptiveAncestralScheduler(_Eta, DPMAdaptiveScheduler):
  """A1111's "DPM adaptive" (k-diffusion's sample_dpm_adaptive as A1111 runs it): the same loop
  at its Eta (1 by default: each accepted step to its ancestral sigma_down, not past the end,
  then fresh noise of the rest of the step's level, the controller at order 1.5), in
  text-to-image between the training schedule's extremes whatever the levels (which set only
  the starting noise), in img2img and hires passes between the levels they keep (as its "DPM
  fast"); one draw an accepted step, each image its own (the k-th of its generator's step
  draws): from jax's keys or A1111's NV generator, not torch's CPU one (drawn in sequence)."""

  name = "dpm_adaptive_ancestral"
  schedule_options = (*DPMAdaptiveScheduler.schedule_options, ANCESTRAL_ETA)
  _DEFAULTS = {**DPMAdaptiveScheduler._DEFAULTS, S_NOISE: 1.0}
  _range = DPMFastAncestralScheduler._range
