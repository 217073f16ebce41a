"""DPM-Solver++ multistep (Lu et al. 2022), as diffusers' `DPMSolverMultistepScheduler`, and in
the EDM formulation as its `EDMDPMSolverMultistepScheduler` (see that class).

Implemented: algorithm_type "dpmsolver++" (and "deis", which diffusers maps onto it) and its
stochastic form "sde-dpmsolver++" (A1111's "DPM++ 2M SDE": fresh noise every step), the
noise-prediction forms "dpmsolver" and "sde-dpmsolver" (orders 1-2; diffusers has no third
order for it) over eps, which diffusers allows with final_sigmas_type "sigma_min" only, solver
orders 1, 2 and 3, solver_type "midpoint" / "heun", lower_order_final, euler_at_final, Karras,
exponential or beta sigmas, final_sigmas_type "zero" / "sigma_min", lambda_min_clipped,
zero-terminal-SNR betas.

With the `k_diffusion` option the 3M SDE form is k-diffusion's (A1111's, ComfyUI's): its
second-order step weighs D1 by phi_2 whatever the solver type, its third-order step weighs D2
by -phi_3 (diffusers' sign of the 0.5 in that weight is the other), and it keeps the third order
to the step before the last.

Every coefficient of the update depends only on the position in the schedule, so the host
computes them in float32 in diffusers' order of operations; the device only combines arrays. The
solver order a step uses depends on how many steps this run has taken (its history), which the
state counts, so img2img starting at a later position starts at first order as in diffusers.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import struct

from sdjax.schedulers.common import (
  S_NOISE,
  Scheduler,
  SchedulerConfigError,
  edm_noise_range,
  edm_precondition,
  exp_f32,
  expm1_f32,
  first_noise_scale,
  hashable_config,
  log_f32,
  nearest_t,
  resolve_config,
  rounded,
  sigma_spacing,
  sigma_to_t,
  spaced_sigmas,
  torch_linspace_f32,
  true_divide,
  vp_alpha_sigma,
)
from sdjax.schedulers.euler import (
  ANCESTRAL_ETA,
  EDMPreconditioned,
  as_f32,
  check_ancestral_eta,
  check_choice,
  check_common,
  train_alphas_cumprod,
  train_sigmas,
)
from sdjax.schedulers.sigma_schedules import (
  COMFYUI,
  DISCARD_PENULTIMATE,
  DOWNCAST_ALPHAS_CUMPROD,
  SGM_NOISE_MULTIPLIER,
  TIMESTEPS_OPTIONS,
  custom_final,
  custom_sigmas,
  custom_timesteps,
  schedule_range,
  spacing_shape,
)

_F32 = np.float32


def multistep_timesteps(config: dict[str, Any], num_inference_steps: int,
                        last_timestep: int) -> np.ndarray:
  """int64 descending timesteps of the multistep solvers (DPM-Solver++, UniPC) by the config's
  spacing, below `last_timestep` (DPM-Solver++'s lambda_min_clipped lowers it)."""
  n_train = int(config["num_train_timesteps"])
  spacing = config["timestep_spacing"]
  if spacing == "linspace":
    timesteps = np.linspace(0, last_timestep - 1, num_inference_steps + 1).round()[::-1][:-1]
    return timesteps.astype(np.int64)
  if spacing == "leading":
    step_ratio = last_timestep // (num_inference_steps + 1)
    timesteps = (np.arange(0, num_inference_steps + 1) * step_ratio).round()[::-1][:-1]
    return timesteps.astype(np.int64) + int(config["steps_offset"])
  if spacing == "trailing":
    step_ratio = n_train / num_inference_steps
    return np.arange(last_timestep, 0, -step_ratio).round().astype(np.int64) - 1
  raise SchedulerConfigError(f"timestep_spacing {spacing!r} is not supported by sdjax")


def multistep_sigmas(scheduler_name: str, config: dict[str, Any], timesteps: np.ndarray,
                     train: np.ndarray, num_inference_steps: int, *, round_karras: bool
                     ) -> tuple[np.ndarray, np.ndarray]:
  """(timesteps, float64 sigmas [n]) of diffusers' multistep and singlestep solvers: with one of
  its spacings (`use_karras_sigmas`, ...) the spaced levels over the whole training range and
  their fractional timesteps (Karras' rounded where `round_karras`), else the float32 training
  sigmas `train` interpolated at `timesteps`."""
  kind = sigma_spacing(scheduler_name, config)
  if not kind:
    return timesteps, np.interp(timesteps, np.arange(0, len(train)), train)
  # Unlike Euler's, these span the whole training range, whatever the spacing.
  sigmas = spaced_sigmas(kind, *schedule_range(config, train[0].item(), train[-1].item()),
                         num_inference_steps, k_diffusion=bool(config.get("k_diffusion")),
                         **spacing_shape(config))
  timesteps = sigma_to_t(sigmas, np.log(train))
  return (timesteps.round() if kind == "karras" and round_karras else timesteps), sigmas


class VPDataPrediction:
  """What the multistep solvers on the variance-preserving alpha_t / sigma_t of their state
  share (DPM-Solver++, UniPC): unit initial noise, img2img noising and the data prediction."""

  def init_noise_sigma(self, state):
    del state
    return jnp.float32(1.0)

  def add_noise(self, state, original_samples, noise, i):
    signal = rounded(state.alpha_t[i] * as_f32(original_samples))
    noisy = signal + rounded(state.sigma_t[i] * as_f32(noise))
    return noisy.astype(original_samples.dtype)

  def _x0(self, state, model_output, sample, i):
    """The data prediction x0 (these solvers integrate it, not eps)."""
    prediction_type = self.prediction_type
    if prediction_type == "epsilon":
      return true_divide(sample - rounded(state.sigma_t[i] * model_output), state.alpha_t[i])
    if prediction_type == "v_prediction":
      return rounded(state.alpha_t[i] * sample) - rounded(state.sigma_t[i] * model_output)
    return model_output  # "sample"

  def _eps(self, state, model_output, sample, i):
    """The noise prediction (the eps forms integrate it)."""
    prediction_type = self.prediction_type
    if prediction_type == "epsilon":
      return model_output
    if prediction_type == "v_prediction":
      return rounded(state.alpha_t[i] * model_output) + rounded(state.sigma_t[i] * sample)
    return true_divide(sample - rounded(state.alpha_t[i] * model_output), state.sigma_t[i])


@struct.dataclass
class DPMSolverState:
  """A DPM-Solver++ run. Positions i = 0..n-1; per-position arrays are float32 [n] unless noted.

  Attributes:
    timesteps: [n] float32, the t fed to the UNet at each position (integers, as diffusers').
    sigmas: [n + 1] float32 noise levels, the last one after the last step.
    alpha_t: [n + 1] 1 / sqrt(sigma^2 + 1).
    sigma_t: [n + 1] sigma * alpha_t.
    c_sample: sigma_t[i+1] / sigma_t[i], every order's weight on the sample (SDE: times exp(-h)).
    c_d0: alpha_t[i+1] * (exp(-h) - 1), every order's weight on the current x0 prediction (SDE:
      alpha_t[i+1] * (1 - exp(-2h)), added).
    inv_r0: 1 / r0 with r0 = h_{i-1} / h_i (second and third order).
    r0, r1: h_{i-1} / h_i and h_{i-2} / h_i themselves (k-diffusion's 3M SDE divides by them).
    c2_d1: the second-order update's weight on D1 (midpoint or heun form).
    inv_r1: 1 / r1 with r1 = h_{i-2} / h_i (third order).
    r0_frac: r0 / (r0 + r1) (third order).
    inv_r01: 1 / (r0 + r1) (third order).
    c3_d1: the third-order update's weight on D1.
    c3_d2: the third-order update's weight on D2.
    c_noise: SDE: sigma_t[i+1] * sqrt(1 - exp(-2h)), the weight on the step's fresh noise.
    model_outputs: [solver_order - 1, *sample_shape] float32, earlier x0 predictions, newest last.
    lower_order_nums: [] int32, steps taken in this run, capped at solver_order.
    precondition: EDM only: [3, n] float32 c_in, c_skip, c_out per position (the model sees
      c_in * x; its x0 is c_skip * x + c_out * output).
  """

  timesteps: jnp.ndarray
  sigmas: jnp.ndarray
  alpha_t: jnp.ndarray
  sigma_t: jnp.ndarray
  c_sample: jnp.ndarray
  c_d0: jnp.ndarray
  inv_r0: jnp.ndarray
  r0: jnp.ndarray
  r1: jnp.ndarray
  c2_d1: jnp.ndarray
  inv_r1: jnp.ndarray
  r0_frac: jnp.ndarray
  inv_r01: jnp.ndarray
  c3_d1: jnp.ndarray
  c3_d2: jnp.ndarray
  c_noise: jnp.ndarray
  model_outputs: jnp.ndarray
  lower_order_nums: jnp.ndarray
  precondition: jnp.ndarray | None = None
  # The `comfyui` or `sgm_noise_multiplier` option's scale of unit noise into the first latent
  # ([] float32); None: the form's own (`init_noise_sigma`).
  init_scale: jnp.ndarray | None = None


@dataclasses.dataclass(frozen=True)
class DPMSolverMultistepScheduler(VPDataPrediction, Scheduler):
  """diffusers' `DPMSolverMultistepScheduler` with algorithm_type "dpmsolver++" or
  "sde-dpmsolver++"."""

  name = "dpmpp_2m"
  # diffusers' pipe(timesteps=...) too
  schedule_options = (*TIMESTEPS_OPTIONS, COMFYUI, SGM_NOISE_MULTIPLIER, DOWNCAST_ALPHAS_CUMPROD,
                      ANCESTRAL_ETA, DISCARD_PENULTIMATE)

  @classmethod
  def option_names(cls, overrides: dict[str, Any]) -> set[str]:
    """eta and s_noise are the SDE form's only (`sde-dpmsolver++`)."""
    names = super().option_names(overrides)
    if overrides.get("algorithm_type") != "sde-dpmsolver++":
      names -= {ANCESTRAL_ETA, S_NOISE}
    return names
  order = 1  # model calls per step; the solver's order is config["solver_order"]

  @property
  def sde(self) -> bool:
    """Whether the steps take fresh noise (either SDE form)."""
    return self.cfg["algorithm_type"] in ("sde-dpmsolver++", "sde-dpmsolver")

  @property
  def eps_form(self) -> bool:
    """Whether the solver integrates the noise prediction (dpmsolver, sde-dpmsolver)."""
    return self.cfg["algorithm_type"] in ("dpmsolver", "sde-dpmsolver")

  @property
  def needs_noise(self) -> bool:  # type: ignore[override]
    return self.sde

  _DEFAULTS = {
    S_NOISE: 1.0,  # the SDE forms': k-diffusion's (`common.S_NOISE`), not diffusers'
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
    "lower_order_final": True,
    "euler_at_final": False,
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "use_lu_lambdas": False,
    "use_flow_sigmas": False,
    "flow_shift": 1.0,
    "final_sigmas_type": "zero",
    "lambda_min_clipped": -float("inf"),
    "variance_type": None,
    "timestep_spacing": "linspace",
    "steps_offset": 0,
    "rescale_betas_zero_snr": False,
    "use_dynamic_shifting": False,
    "time_shift_type": "exponential",
    # Not diffusers': step as k-diffusion's DPM-Solver++ (A1111's), the UNet at each level's
    # fractional timestep (diffusers' are integers), from noise of the first level (diffusers'
    # start, unit noise in this variance-preserving form, is sqrt(1 + 1 / sigma_max^2) more);
    # 3M SDE over the levels of one step more less the penultimate, as A1111 places them, with
    # k-diffusion's updates (`_k_diffusion_3m`).
    "k_diffusion": False,
  }
  _UNSUPPORTED = {
    "thresholding": False,
    "use_lu_lambdas": False,
    "use_flow_sigmas": False,
    "variance_type": None,
    "use_dynamic_shifting": False,
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
    check_choice(cls.name, "algorithm_type", config["algorithm_type"],
                 ("dpmsolver++", "sde-dpmsolver++", "deis", "dpmsolver", "sde-dpmsolver"))
    check_choice(cls.name, "final_sigmas_type", config["final_sigmas_type"], ("zero", "sigma_min"))
    if config["algorithm_type"] in ("dpmsolver", "sde-dpmsolver"):
      custom_final(config)
      if config["final_sigmas_type"] == "zero":
        raise SchedulerConfigError(
          f"scheduler {cls.name!r}: algorithm_type {config['algorithm_type']!r} needs "
          "final_sigmas_type='sigma_min' (as in diffusers; its eps is undefined at sigma 0)")
      if config["algorithm_type"] == "sde-dpmsolver" and int(config["solver_order"]) == 3:
        raise SchedulerConfigError(f"scheduler {cls.name!r}: sde-dpmsolver has no third order in "
                                   "diffusers: solver_order 1 or 2")
      if config.get("k_diffusion"):
        raise SchedulerConfigError(f"scheduler {cls.name!r}: k_diffusion steps DPM-Solver++ "
                                   f"(the x0 forms), not {config['algorithm_type']}")
    if config["algorithm_type"] == "deis":
      # diffusers rewrites deis to dpmsolver++, but only after refusing a zero final sigma.
      if config["final_sigmas_type"] == "zero":
        raise SchedulerConfigError(
          f"scheduler {cls.name!r}: option algorithm_type='deis' needs "
          "final_sigmas_type='sigma_min' (as in diffusers)"
        )
      config["algorithm_type"] = "dpmsolver++"
    custom_final(config)
    if config["solver_type"] in ("logrho", "bh1", "bh2"):
      config["solver_type"] = "midpoint"  # diffusers' own substitution
    check_choice(cls.name, "solver_type", config["solver_type"], ("midpoint", "heun"))
    check_choice(cls.name, "solver_order", config["solver_order"], (1, 2, 3))
    if config.get(ANCESTRAL_ETA, 1.0) != 1.0:
      check_ancestral_eta(cls.name, config)
      if config["algorithm_type"] != "sde-dpmsolver++":
        raise SchedulerConfigError(f"scheduler {cls.name!r}: eta is the SDE form's (its share of "
                                   "fresh noise): pick dpmpp_2m_sde or dpmpp_3m_sde")
      if int(config["solver_order"]) == 3 and not config["k_diffusion"]:
        raise SchedulerConfigError(f"scheduler {cls.name!r}: eta in the 3M SDE form is "
                                   "k-diffusion's: set k_diffusion too")
    return cls(config=hashable_config(config))

  def _timesteps_and_sigmas(self, num_inference_steps: int, alphas_cumprod: np.ndarray):
    """(float64/int timesteps, float64 sigmas) as diffusers' set_timesteps builds them."""
    config = self.cfg
    n_train = int(config["num_train_timesteps"])
    # Where lambda(t) = log(alpha_t / sigma_t) first drops below lambda_min_clipped, counted
    # from the noisy end; the default -inf clips nothing.
    lambda_t = log_f32(np.sqrt(alphas_cumprod)) - log_f32(np.sqrt(1 - alphas_cumprod))
    clipped_idx = int(np.searchsorted(lambda_t[::-1], config["lambda_min_clipped"], side="left"))
    timesteps = custom_timesteps(config, num_inference_steps)
    if timesteps is None:
      timesteps = multistep_timesteps(config, num_inference_steps, n_train - clipped_idx)
    else:  # taken as integers, as diffusers does
      timesteps = timesteps.astype(np.int64)
    sigmas = train_sigmas(alphas_cumprod)
    log_sigmas = np.log(sigmas)
    custom = custom_sigmas(self.name, config, num_inference_steps, sigmas)
    if custom is not None:  # ending at 0, as final_sigmas_type "zero" (`custom_final`)
      return sigma_to_t(custom[:-1], log_sigmas), custom[:-1]
    return multistep_sigmas(self.name, config, timesteps, sigmas, num_inference_steps,
                            round_karras=config["beta_schedule"] != "squaredcos_cap_v2")

  def set_timesteps(self, num_inference_steps: int, sample_shape: tuple[int, ...] | None = None):
    config = self.cfg
    solver_order = int(config["solver_order"])
    if solver_order > 1 and sample_shape is None:
      raise ValueError(
        f"dpmpp with solver_order={solver_order} keeps earlier model outputs: pass "
        "set_timesteps(num_inference_steps, sample_shape=latents.shape)"
      )
    timesteps, sigmas = self._schedule(num_inference_steps)
    n = len(timesteps)

    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
      alpha_t, sigma_t = self._alpha_sigma(sigmas)
      lambdas = log_f32(alpha_t) - log_f32(sigma_t)  # +inf at a zero final sigma, as in diffusers
      # h[i]: the log-SNR step from position i to i + 1; h[i - 1], h[i - 2] the earlier ones.
      h = lambdas[1:] - lambdas[:-1]
      h_0 = np.concatenate([[np.nan], h[:-1]]).astype(_F32)
      h_1 = np.concatenate([[np.nan, np.nan], h[:-2]]).astype(_F32)[:n]
      a_next = alpha_t[1:]
      r0 = h_0 / h
      r1 = h_1 / h
      c_noise = np.zeros_like(h)
      if self.eps_form:  # diffusers' dpmsolver / sde-dpmsolver updates, over eps (subtracted)
        expm1 = exp_f32(h) - _F32(1.0)
        c_sample = alpha_t[1:] / alpha_t[:-1]
        scale = _F32(2.0) if self.sde else _F32(1.0)  # the SDE form: twice the eps weights
        c_d0 = scale * (sigma_t[1:] * expm1)
        heun = -(scale * (sigma_t[1:] * (expm1 / h - _F32(1.0))))  # added: the weight negated
        if config["solver_type"] == "midpoint":
          c2_d1 = sigma_t[1:] * expm1 if self.sde else _F32(0.5) * (sigma_t[1:] * expm1)
        else:
          c2_d1 = heun
        c3_d1 = heun
        c3_d2 = sigma_t[1:] * ((expm1 - h) / (h * h) - _F32(0.5))
        if self.sde:
          c_noise = sigma_t[1:] * np.sqrt(exp_f32(_F32(2.0) * h) - _F32(1.0))
      elif self.sde:  # diffusers' sde-dpmsolver++ updates, their operations in their order
        # k-diffusion's eta (A1111's Eta; diffusers' is 1): the step keeps exp(-eta h) of its
        # noise and adds sqrt(1 - exp(-2 eta h)) fresh; h + eta h is 2h at eta 1, exactly.
        eta = float(config.get(ANCESTRAL_ETA, 1.0))
        eta_h = h * _F32(eta)
        h_total = h + eta_h
        decay = (_F32(1.0) - exp_f32(_F32(-2.0) * h) if eta == 1  # 1 - exp(-2h)
                 else expm1_f32(-h_total) * _F32(-1.0))
        c_sample = sigma_t[1:] / sigma_t[:-1] * exp_f32(-eta_h)
        c_d0 = a_next * decay
        heun = a_next * (decay / -h_total + _F32(1.0))
        c2_d1 = _F32(0.5) * c_d0 if config["solver_type"] == "midpoint" else heun
        c3_d1 = heun
        c3_d2 = a_next * ((decay - h_total) / h_total ** 2 - _F32(0.5))
        if self._k_diffusion_3m:
          # k-diffusion's, in its float32 operations (phi_3 cancels to O(h): its rounding
          # shows): the 2M step's weight is phi_2 whatever the solver type, and D2's is -phi_3
          # = (1 - e^-2h - 2h) / (2h)^2 + 0.5 (diffusers' has - 0.5)
          t_k = -log_f32(sigmas)  # k-diffusion's log-time, -log sigma, in float32
          h_k = t_k[1:] - t_k[:-1]
          r0 = np.concatenate([[np.nan], h_k[:-1]]).astype(_F32) / h_k
          r1 = np.concatenate([[np.nan, np.nan], h_k[:-2]]).astype(_F32)[:n] / h_k
          h_eta = h_k * _F32(eta + 1.0)
          phi_2 = np.expm1(-h_eta) / h_eta + _F32(1.0)
          phi_3 = phi_2 / h_eta - _F32(0.5)
          c_d0 = a_next * -np.expm1(-h_eta)
          c2_d1 = c3_d1 = a_next * phi_2
          c3_d2 = -(a_next * phi_3)
        c_noise = sigma_t[1:] * np.sqrt(decay if eta == 1 else expm1_f32(_F32(-2.0) * eta_h)
                                        * _F32(-1.0))
      else:
        expm1 = exp_f32(-h) - _F32(1.0)
        c_sample = sigma_t[1:] / sigma_t[:-1]
        c_d0 = a_next * expm1
        if config["solver_type"] == "midpoint":
          c2_d1 = _F32(0.5) * (a_next * expm1)
        else:
          c2_d1 = a_next * (expm1 / h + _F32(1.0))
        c3_d1 = a_next * (expm1 / h + _F32(1.0))
        c3_d2 = a_next * ((expm1 + h) / (h * h) - _F32(0.5))
      inv_r0 = _F32(1.0) / r0
      inv_r1 = _F32(1.0) / r1
      r0_frac = r0 / (r0 + r1)
      inv_r01 = _F32(1.0) / (r0 + r1)

    history = (solver_order - 1,) + tuple(sample_shape or ())
    return DPMSolverState(
      timesteps=jnp.asarray(timesteps),
      sigmas=jnp.asarray(sigmas),
      alpha_t=jnp.asarray(alpha_t),
      sigma_t=jnp.asarray(sigma_t),
      c_sample=jnp.asarray(c_sample),
      c_d0=jnp.asarray(c_d0),
      inv_r0=jnp.asarray(inv_r0),
      r0=jnp.asarray(r0),
      r1=jnp.asarray(r1),
      c2_d1=jnp.asarray(c2_d1),
      inv_r1=jnp.asarray(inv_r1),
      r0_frac=jnp.asarray(r0_frac),
      inv_r01=jnp.asarray(inv_r01),
      c3_d1=jnp.asarray(c3_d1),
      c3_d2=jnp.asarray(c3_d2),
      c_noise=jnp.asarray(c_noise, jnp.float32),
      model_outputs=jnp.zeros(history, jnp.float32),
      lower_order_nums=jnp.zeros((), jnp.int32),
      precondition=self._precondition(sigmas[:-1]),
      # ComfyUI's or A1111's SGM noise scale in k-diffusion's x, here x / sqrt(sigma^2 + 1)
      init_scale=(None if (scale := first_noise_scale(config, sigmas)) is None
                  else jnp.asarray(scale * alpha_t[0])),
    )

  def _schedule(self, num_inference_steps: int) -> tuple[np.ndarray, np.ndarray]:
    """(float32 timesteps [n], float32 sigmas [n + 1] with the final one) as diffusers'."""
    config = self.cfg
    alphas_cumprod = train_alphas_cumprod(config)
    # A1111's DPM++ 3M SDE places the levels of one step more and drops the last above 0
    # (ComfyUI's does not), as its "Always discard next-to-last sigma" does for any sampler.
    discard = ((self._k_diffusion_3m and not config.get(COMFYUI)
                or bool(config.get(DISCARD_PENULTIMATE)))
               and all(config.get(key) is None for key in ("sigmas", "timesteps")))
    timesteps, sigmas = self._timesteps_and_sigmas(num_inference_steps + discard, alphas_cumprod)
    if discard:
      timesteps, sigmas = timesteps[:-1], sigmas[:-1]
    if config["final_sigmas_type"] == "sigma_min":
      sigma_last = np.sqrt((1 - alphas_cumprod[0]) / alphas_cumprod[0])
    else:
      sigma_last = 0
    sigmas = np.concatenate([sigmas, [sigma_last]]).astype(_F32)
    for option in (COMFYUI, SGM_NOISE_MULTIPLIER):
      if config.get(option) and not config["k_diffusion"]:
        raise SchedulerConfigError(f"scheduler {self.name!r}: option {option} is k-diffusion's "
                                   "start: set k_diffusion too")
    if config["k_diffusion"]:  # each level's own timestep, as k-diffusion's denoiser reads it
      log_sigmas = np.log(train_sigmas(alphas_cumprod))
      to_t = nearest_t if config.get(COMFYUI) else sigma_to_t  # ComfyUI's are whole
      return to_t(sigmas[:-1], log_sigmas).astype(_F32), sigmas
    return timesteps.astype(np.int64).astype(_F32), sigmas

  @property
  def _k_diffusion_3m(self) -> bool:
    """Whether this is k-diffusion's DPM++ 3M SDE (A1111's, ComfyUI's), whose updates differ
    from diffusers' third-order SDE ones."""
    config = self.cfg
    return bool(config.get("k_diffusion")) and self.sde and int(config["solver_order"]) == 3

  def brownian_queries(self, state):
    if self.cfg["algorithm_type"] != "sde-dpmsolver++":  # k-diffusion's SDE samplers only
      return None
    sigmas = np.asarray(state.sigmas, _F32)  # k-diffusion's loop asks for (sigma_i, sigma_i+1)
    return [(sigmas[i], sigmas[i + 1]) if sigmas[i + 1] > 0 else None
            for i in range(len(sigmas) - 1)]

  def init_noise_sigma(self, state):
    if state.init_scale is not None:
      return state.init_scale
    if self.cfg["k_diffusion"]:  # sigma_max x unit noise, here x / sqrt(sigma^2 + 1)
      return state.sigma_t[0]
    return super().init_noise_sigma(state)

  def _alpha_sigma(self, sigmas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return vp_alpha_sigma(sigmas)

  def _precondition(self, sigmas: np.ndarray):
    del sigmas  # EDM's input and output scalings; the VP form has none

  def step(self, state, model_output, i, sample, noise=None):
    config = self.cfg
    sde = self.sde
    if sde and noise is None:
      raise ValueError("sde-dpmsolver++ takes fresh noise every step: pass noise=")
    solver_order = int(config["solver_order"])
    n = state.timesteps.shape[0]  # static
    sample32 = as_f32(sample)
    if self.eps_form:
      m0 = self._eps(state, as_f32(model_output), sample32, i)
    else:
      m0 = self._x0(state, as_f32(model_output), sample32, i)
    count = state.lower_order_nums

    # diffusers' lower_order_final / lower_order_second; which ones apply is static per run.
    final_first = config["euler_at_final"] or (config["lower_order_final"] and n < 15)
    final_first = final_first or config["final_sigmas_type"] == "zero"
    # k-diffusion's 3M SDE keeps the third order to the step before the last
    second_last_second = config["lower_order_final"] and n < 15 and not self._k_diffusion_3m
    use_first = (count < 1) | ((i == n - 1) & final_first)
    use_second = (count < 2) | ((i == n - 2) & second_last_second)

    # Every product is rounded before it is summed, as torch does (see `rounded`). The ODE and
    # the eps forms subtract the terms sde-dpmsolver++ adds (its coefficients carry the other
    # sign).
    def plus(a, b):
      return a + b if config["algorithm_type"] == "sde-dpmsolver++" else a - b

    prev_sample = plus(rounded(state.c_sample[i] * sample32), rounded(state.c_d0[i] * m0))
    kd3m = self._k_diffusion_3m  # k-diffusion's divisions, in its order
    if solver_order >= 2:
      m1 = state.model_outputs[-1]
      d1_0 = (true_divide(m0 - m1, state.r0[i]) if kd3m
              else rounded(state.inv_r0[i] * (m0 - m1)))
      if config["solver_type"] == "midpoint":
        second = plus(prev_sample, rounded(state.c2_d1[i] * d1_0))
      else:
        second = prev_sample + rounded(state.c2_d1[i] * d1_0)
      if solver_order >= 3:
        m2 = state.model_outputs[-2]
        if kd3m:
          r01 = state.r0[i] + state.r1[i]
          d1_1 = true_divide(m1 - m2, state.r1[i])
          d1 = d1_0 + true_divide(rounded((d1_0 - d1_1) * state.r0[i]), r01)
          d2 = true_divide(d1_0 - d1_1, r01)
        else:
          d1_1 = rounded(state.inv_r1[i] * (m1 - m2))
          d1 = d1_0 + rounded(state.r0_frac[i] * (d1_0 - d1_1))
          d2 = state.inv_r01[i] * (d1_0 - d1_1)
        third = plus(prev_sample + rounded(state.c3_d1[i] * d1), rounded(state.c3_d2[i] * d2))
        second = jnp.where(use_second, second, third)
      prev_sample = jnp.where(use_first, prev_sample, second)
      model_outputs = jnp.concatenate([state.model_outputs[1:], m0[None]], axis=0)
    else:
      model_outputs = state.model_outputs
    if sde:
      prev_sample = prev_sample + rounded(state.c_noise[i] * as_f32(noise))

    new_state = state.replace(
      model_outputs=model_outputs,
      lower_order_nums=jnp.minimum(count + 1, solver_order).astype(jnp.int32),
    )
    return prev_sample.astype(sample.dtype), new_state


@dataclasses.dataclass(frozen=True)
class EDMDPMSolverMultistepScheduler(EDMPreconditioned, DPMSolverMultistepScheduler):
  """diffusers' `EDMDPMSolverMultistepScheduler` (Playground v2.5's): DPM-Solver++ in Karras et
  al.'s EDM formulation. Noise levels run from sigma_max to sigma_min (Karras, rho 7, or
  exponential), the UNet sees c_in * x at timestep 0.25 * log(sigma), and its output becomes x0
  through c_skip and c_out with `sigma_data`; the solver steps are DPM-Solver++'s with alpha = 1
  (variance exploding). No training betas: its config has none."""

  name = "edm_dpmpp_2m"
  schedule_options = ()  # EDM's noise levels are its own

  _DEFAULTS = {
    "sigma_min": 0.002,
    "sigma_max": 80.0,
    "sigma_data": 0.5,
    "sigma_schedule": "karras",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "rho": 7.0,
    "solver_order": 2,
    "thresholding": False,
    "dynamic_thresholding_ratio": 0.995,
    "sample_max_value": 1.0,
    "algorithm_type": "dpmsolver++",
    "solver_type": "midpoint",
    "lower_order_final": True,
    "euler_at_final": False,
    "final_sigmas_type": "zero",
  }
  _UNSUPPORTED = {"thresholding": False}

  @classmethod
  def from_config(cls, scheduler_config: dict[str, Any], **overrides):
    config = resolve_config(cls.name, cls._DEFAULTS, scheduler_config,
                            unsupported=cls._UNSUPPORTED, overrides=overrides)
    edm_noise_range(config, cls._DEFAULTS)
    check_choice(cls.name, "prediction_type", config["prediction_type"],
                 ("epsilon", "v_prediction"))
    check_choice(cls.name, "sigma_schedule", config["sigma_schedule"], ("karras", "exponential"))
    if config["algorithm_type"] == "deis":
      config["algorithm_type"] = "dpmsolver++"  # diffusers' own substitution
    check_choice(cls.name, "algorithm_type", config["algorithm_type"],
                 ("dpmsolver++", "sde-dpmsolver++"))
    if config["solver_type"] in ("logrho", "bh1", "bh2"):
      config["solver_type"] = "midpoint"
    check_choice(cls.name, "solver_type", config["solver_type"], ("midpoint", "heun"))
    check_choice(cls.name, "solver_order", config["solver_order"], (1, 2, 3))
    check_choice(cls.name, "final_sigmas_type", config["final_sigmas_type"], ("zero", "sigma_min"))
    return cls(config=hashable_config(config))

  def _schedule(self, num_inference_steps: int) -> tuple[np.ndarray, np.ndarray]:
    config = self.cfg
    sigma_min, sigma_max = float(config["sigma_min"]), float(config["sigma_max"])
    ramp = torch_linspace_f32(0.0, 1.0, num_inference_steps)
    if config["sigma_schedule"] == "karras":  # in float32, as diffusers' torch arithmetic
      rho = float(config["rho"])
      min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
      base = _F32(max_inv_rho) + ramp * _F32(min_inv_rho - max_inv_rho)
      sigmas = (base.astype(np.float64) ** rho).astype(_F32)
    else:
      sigmas = exp_f32(torch_linspace_f32(math.log(sigma_min), math.log(sigma_max),
                                          num_inference_steps))[::-1]
    timesteps = _F32(0.25) * log_f32(sigmas)
    sigma_last = sigma_min if config["final_sigmas_type"] == "sigma_min" else 0.0
    return timesteps, np.concatenate([sigmas, [sigma_last]]).astype(_F32)

  def _alpha_sigma(self, sigmas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np.ones_like(sigmas), sigmas  # the UNet's input is preconditioned: alpha = 1

  def _precondition(self, sigmas: np.ndarray):
    return jnp.asarray(edm_precondition(sigmas, float(self.cfg["sigma_data"]),
                                        self.prediction_type))

