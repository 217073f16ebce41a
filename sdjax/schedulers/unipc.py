"""UniPC multistep (Zhao et al. 2023), as diffusers' `UniPCMultistepScheduler`.

Each step first corrects the sample the last step predicted (UniC, with the model output just
computed at it), then predicts the next one (UniP) from the history of data predictions. Both
are linear in the history with coefficients that depend only on the positions and the order, so
the host computes them, per order, in float32 in diffusers' order of operations (including the
small linear solves for order 3), and the device only combines arrays.

Implemented: the data-prediction form (predict_x0, diffusers' default), solver orders 1-3,
solver_type "bh1" / "bh2", lower_order_final, disable_corrector, Karras sigmas, final sigma
"zero" / "sigma_min", epsilon / v / sample prediction, zero-terminal-SNR betas, img2img.

The `a1111` option steps as AUTOMATIC1111's UniPC (its modules/models/diffusion/uni_pc, the UniPC
authors' continuous-time code), which shares the updates but not the positions: continuous
times t from 1 down to 1/1000 (`skip_type`: uniform in t, its default, uniform in sqrt(t), or in
logSNR), log alpha_t interpolated linearly between the training timesteps' (t_k = (k + 1) / 1000)
and the UNet fed the fractional timestep (t - 1/1000) * 1000; one position per timestep of A1111's
timestep grid (range(0, 1000, 1000 // steps): 31 for 30 steps); the run ends at t = 1/1000, the
noise of timestep 0 left in (no final step to zero), and a v-prediction model's eps is taken
from the training timestep its fractional timestep truncates to. A1111's settings are solver_type
bh1 and solver_order 3 (`infotext` writes them as options).

The `comfyui` option steps as ComfyUI's uni_pc / uni_pc_bh2 samplers (its comfy/extra_samplers/
uni_pc, the same code on noise levels): the positions are its scheduler's levels (a final 0 moved
to 0.001), alpha_t = 1 / sqrt(sigma^2 + 1), the UNet at its whole timesteps, order 3 (its
min(3, steps - 1) is what lower_order_final gives), and the result divided by the last alpha_t
(back to its latents' scale).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import struct

from sdjax.schedulers.common import (
  A1111_IMG2IMG,
  UNIPC_SKIP_TYPES,
  Scheduler,
  SchedulerConfigError,
  exp_f32,
  first_noise_scale,
  hashable_config,
  ldm_alphas_cumprod,
  log_f32,
  resolve_config,
  rounded,
  sigma_spacing,
  sigma_to_t,
  spaced_sigmas,
  torch_linspace_f32,
  true_divide,
  vp_alpha_sigma,
)
from sdjax.schedulers.ddim import (
  A1111,
  A1111Start,
  a1111_grid,
  a1111_start,
)
from sdjax.schedulers.dpmpp import VPDataPrediction, multistep_timesteps
from sdjax.schedulers.euler import (
  as_f32,
  check_choice,
  check_common,
  sigma_schedule,
  train_alphas_cumprod,
  train_sigmas,
)
from sdjax.schedulers.sigma_schedules import (
  COMFYUI,
  DISCARD_PENULTIMATE,
  DOWNCAST_ALPHAS_CUMPROD,
  SCHEDULE_OPTIONS,
  custom_final,
  custom_sigmas,
  form_alphas_cumprod,
  schedule_range,
  spacing_shape,
)

_F32 = np.float32


@struct.dataclass
class UniPCState:
  """A UniPC run. Positions i = 0..n-1; P = solver_order.

  Attributes:
    timesteps: [n] int32, the t fed to the UNet at each position (float32 in the `a1111`
      form: fractional).
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
    v_eps: [2, n] or None: in the `a1111` form for a v-prediction model, the weights of v and of
      the sample in eps (sqrt(alphas_cumprod) and sqrt(1 - alphas_cumprod) at the truncated
      timestep, float32 of ldm's float64 buffers).
    init_scale, final_alpha: [] or None: in the `comfyui` form, the scale of unit noise into the
      first latent and the alpha_t the result is divided by.
    start: None, or in the `a1111` form's img2img A1111's noising (`ddim.a1111_start`).
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
  v_eps: jnp.ndarray | None = None
  init_scale: jnp.ndarray | None = None
  final_alpha: jnp.ndarray | None = None
  start: tuple[jnp.ndarray, jnp.ndarray] | None = None


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


def _interpolate(x: np.ndarray, xp: np.ndarray, yp: np.ndarray) -> np.ndarray:
  """uni_pc's `interpolate_fn`: y at x on the polyline through (xp, yp) (xp ascending), its end
  segments extended; float32 in its order of operations (yp may be float16, as a downcast
  schedule's logs: their differences then round to float16 first, as in torch)."""
  x = np.asarray(x, _F32)
  j = np.clip(np.searchsorted(xp, x, side="left"), 1, len(xp) - 1)
  x0, x1, y0, y1 = xp[j - 1], xp[j], yp[j - 1], yp[j]
  return (y0 + (x - x0) * (y1 - y0) / (x1 - x0)).astype(_F32)


def _marginals(log_alpha: np.ndarray):
  """uni_pc's (alpha_t, sigma_t, lambda_t) of log alpha_t: marginal_alpha / _std / _lambda,
  float32."""
  one_minus = _F32(1.0) - exp_f32(_F32(2.0) * log_alpha)
  return (exp_f32(log_alpha), np.sqrt(one_minus).astype(_F32),
          (log_alpha - _F32(0.5) * log_f32(one_minus)).astype(_F32))


class _A1111Times:
  """A1111's NoiseScheduleVP('discrete'): log alpha_t on continuous t in (0, 1], interpolated
  between the training timesteps' t_k = (k + 1) / N; float32 as its torch code."""

  def __init__(self, alphas_cumprod: np.ndarray):
    self.n = len(alphas_cumprod)
    log_alphas = np.log(alphas_cumprod.astype(np.float64)).astype(alphas_cumprod.dtype)
    self.log_alphas = (log_alphas * alphas_cumprod.dtype.type(0.5)).astype(alphas_cumprod.dtype)
    self.t = torch_linspace_f32(0.0, 1.0, self.n + 1)[1:]

  def log_alpha(self, t):
    return _interpolate(t, self.t, self.log_alphas)

  def alpha_sigma_lambda(self, t):
    return _marginals(self.log_alpha(t))

  def inverse_lambda(self, lambdas):
    log_alpha = (_F32(-0.5) * np.logaddexp(_F32(0.0), _F32(-2.0) * lambdas)).astype(_F32)
    return _interpolate(log_alpha, self.log_alphas[::-1].astype(_F32), self.t[::-1])

  def times(self, skip_type: str, steps: int, t_start: float = 1.0) -> np.ndarray:
    """The steps + 1 positions from t_start to 1 / N (`UniPC.get_time_steps`)."""
    t_end = 1.0 / self.n
    if skip_type == "time_uniform":
      return torch_linspace_f32(t_start, t_end, steps + 1)
    if skip_type == "time_quadratic":
      return np.square(torch_linspace_f32(t_start ** 0.5, t_end ** 0.5, steps + 1))
    ends = self.alpha_sigma_lambda(np.asarray([t_start, t_end], _F32))[2]
    return self.inverse_lambda(torch_linspace_f32(float(ends[0]), float(ends[1]), steps + 1))


@dataclasses.dataclass(frozen=True)
class UniPCMultistepScheduler(A1111Start, VPDataPrediction, Scheduler):
  """diffusers' `UniPCMultistepScheduler` (predict_x0, B(h) solvers)."""

  name = "unipc"
  # discard_penultimate_sigma: the comfyui form's (ComfyUI's KSampler drops it for uni_pc)
  schedule_options = (*SCHEDULE_OPTIONS, A1111_IMG2IMG, DOWNCAST_ALPHAS_CUMPROD,
                      DISCARD_PENULTIMATE)
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
    # sdjax's: A1111's and ComfyUI's forms (config options, as they change the step)
    A1111: False,
    COMFYUI: False,
    "skip_type": UNIPC_SKIP_TYPES[0],
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
    check_choice(cls.name, "skip_type", config["skip_type"], UNIPC_SKIP_TYPES)
    if config[A1111] and config[COMFYUI]:
      raise SchedulerConfigError(f"scheduler {cls.name!r}: a1111 and comfyui are two forms: "
                                 "pick one")
    if config.get(DISCARD_PENULTIMATE) and not config[COMFYUI]:
      raise SchedulerConfigError(f"scheduler {cls.name!r}: {DISCARD_PENULTIMATE} is the comfyui "
                                 "form's (ComfyUI's KSampler drops that level for uni_pc)")
    if config[A1111]:
      check_choice(cls.name, "prediction_type (a1111)", config["prediction_type"],
                   ("epsilon", "v_prediction"))
      for key in ("sigmas", "schedule_type", "use_karras_sigmas", "use_exponential_sigmas",
                  "use_beta_sigmas"):
        if config.get(key):
          raise SchedulerConfigError(f"scheduler {cls.name!r}: A1111's UniPC (a1111) places its "
                                     f"own positions: drop {key}")
    return cls(config=hashable_config(config))

  def _a1111_positions(self, num_inference_steps: int):
    """A1111's (float32 UNet timesteps [n], alpha_t, sigma_t, lambda_t [n + 1], v_eps or None,
    its img2img noising or None). Its img2img (`A1111_IMG2IMG`: t_enc) runs t_enc steps from
    the continuous time of the last timestep it keeps, grid[t_enc - 1] / 1000 + 1 / 1000, the
    image noised to grid[t_enc]'s level."""
    config = self.cfg
    grid, noise_t = a1111_grid(config, num_inference_steps)  # A1111's timestep grid
    steps = len(grid)
    if steps < int(config["solver_order"]):
      raise ValueError(f"A1111's UniPC of order {config['solver_order']} needs at least as many "
                       f"steps, got {steps}" + (" (of img2img: give a higher strength)"
                                                if noise_t is not None else ""))
    alphas_cumprod = form_alphas_cumprod(config, "a1111")
    vp = _A1111Times(alphas_cumprod)
    t_start = 1.0 if noise_t is None else float(
        np.float32(np.float32(grid[-1]) / _F32(1000.0)) + _F32(1.0 / 1000))
    t = vp.times(config["skip_type"], steps, t_start)
    alpha_t, sigma_t, lambdas = vp.alpha_sigma_lambda(t)
    timesteps = (t[:-1] - _F32(1.0 / vp.n)) * _F32(1000.0)
    v_eps = None
    if config["prediction_type"] == "v_prediction":  # ldm's float32 sqrt buffers, at int(t)
      alphas = ldm_alphas_cumprod(config)
      index = np.clip(timesteps.astype(np.int64), 0, len(alphas) - 1)  # truncated, as .to(int)
      v_eps = np.stack([np.sqrt(alphas), np.sqrt(1.0 - alphas)]).astype(_F32)[:, index]
    start = a1111_start(config, alphas_cumprod.astype(_F32), num_inference_steps)
    return timesteps.astype(_F32), alpha_t, sigma_t, lambdas, v_eps, start

  def _comfyui_positions(self, num_inference_steps: int):
    """ComfyUI's (whole UNet timesteps [n], alpha_t, sigma_t, lambda_t [n + 1], the scale of
    unit noise into the first latent, the last alpha_t)."""
    config = self.cfg
    alphas_cumprod = train_alphas_cumprod(config)
    timesteps, sigmas = sigma_schedule(config, num_inference_steps, alphas_cumprod, 0.0,
                                       name=self.name)
    sigmas = sigmas.astype(_F32)
    if len(sigmas) < 3:
      raise ValueError("ComfyUI's uni_pc runs no step at 1 step: give at least 2")
    levels = sigmas.copy()
    if levels[-1] == 0:
      levels[-1] = _F32(0.001)
    log_alpha = _F32(0.5) * log_f32(_F32(1.0) / (levels * levels + _F32(1.0)))
    alpha_t, sigma_t, lambdas = _marginals(log_alpha.astype(_F32))
    init = first_noise_scale(config, sigmas) / np.sqrt(_F32(1.0) + sigmas[0] * sigmas[0])
    return timesteps.astype(_F32), alpha_t, sigma_t, lambdas, _F32(init), alpha_t[-1]

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
      sigmas = spaced_sigmas(kind, *schedule_range(config, sigmas[0].item(), sigmas[-1].item()),
                             num_inference_steps, **spacing_shape(config))
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
    v_eps = init_scale = final_alpha = start = None
    if config[A1111]:
      timesteps, alpha_t, sigma_t, lambdas, v_eps, start = self._a1111_positions(
          num_inference_steps)
    elif config[COMFYUI]:
      timesteps, alpha_t, sigma_t, lambdas, init_scale, final_alpha = self._comfyui_positions(
          num_inference_steps)
    else:
      timesteps, sigmas = self._timesteps_and_sigmas(num_inference_steps,
                                                     train_alphas_cumprod(config))
      with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        alpha_t, sigma_t = vp_alpha_sigma(sigmas)
        lambdas = log_f32(alpha_t) - log_f32(sigma_t)  # +inf at a zero final sigma (diffusers)
    n = len(timesteps)
    bh1 = config["solver_type"] == "bh1"

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
      timesteps=jnp.asarray(timesteps.astype(_F32 if config[A1111] or config[COMFYUI]
                                             else np.int32)),
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
      v_eps=None if v_eps is None else jnp.asarray(v_eps),
      init_scale=None if init_scale is None else jnp.asarray(init_scale),
      final_alpha=None if final_alpha is None else jnp.asarray(final_alpha),
      start=start,
    )

  def init_noise_sigma(self, state):
    if state.init_scale is not None:
      return state.init_scale
    return super().init_noise_sigma(state)

  def _x0(self, state, model_output, sample, i):
    if state.v_eps is None:
      return super()._x0(state, model_output, sample, i)
    # A1111's v model: eps at the truncated timestep first, then the data prediction
    eps = rounded(state.v_eps[0, i] * model_output) + rounded(state.v_eps[1, i] * sample)
    return true_divide(sample - rounded(state.sigma_t[i] * eps), state.alpha_t[i])

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
    if state.final_alpha is not None:  # ComfyUI's result: back to its latents' scale
      last = i == state.timesteps.shape[0] - 1
      prev_sample = jnp.where(last, true_divide(prev_sample, state.final_alpha), prev_sample)

    new_state = state.replace(
      model_outputs=history,
      last_sample=sample32,
      lower_order_nums=jnp.minimum(count + 1, solver_order).astype(jnp.int32),
      last_order=this_order.astype(jnp.int32),
    )
    return prev_sample.astype(sample.dtype), new_state

