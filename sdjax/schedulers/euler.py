"""Euler and Euler-ancestral samplers (Karras et al. 2022, k-diffusion), as diffusers' classes.

Both walk a descending sigma schedule in the variance-exploding parametrisation x = x0 + sigma*eps
and share its construction, the input scaling and `add_noise`. The schedule and validation
helpers here are also used by Heun (`heun.py`) and DPM-Solver++ (`dpmpp.py`). EDM Euler (CosXL's
scheduler) walks EDM's own noise levels with its preconditioned model input and output.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import jax.numpy as jnp
import numpy as np
from flax import struct

from sdjax.schedulers.common import (
  CHURN_DEFAULTS,
  CHURN_SAMPLERS,
  S_CHURN,
  S_NOISE,
  Scheduler,
  SchedulerConfigError,
  check_churn,
  churn_levels,
  edm_noise_range,
  edm_precondition,
  exp_f32,
  first_noise_scale,
  hashable_config,
  log_f32,
  make_betas,
  nearest_t,
  resolve_config,
  rounded,
  sigma_spacing,
  sigma_to_t,
  spaced_sigmas,
  torch_linspace_f32,
  true_divide,
)
from sdjax.schedulers.sigma_schedules import (
  COMFYUI,
  DISCARD_PENULTIMATE,
  DOWNCAST_ALPHAS_CUMPROD,
  K_DIFFUSION,
  SCHEDULE_OPTIONS,
  SGM_NOISE_MULTIPLIER,
  TIMESTEPS_OPTIONS,
  ZERO_SNR,
  custom_sigmas,
  custom_timesteps,
  form_alphas_cumprod,
  schedule_range,
  spacing_shape,
)
from sdjax.schedulers.sigma_schedules import check_options as check_schedule_options

_SPACINGS = ("linspace", "leading", "trailing")


def check_choice(scheduler_name: str, key: str, value: Any, allowed: tuple[Any, ...]) -> None:
  """Raises SchedulerConfigError naming `key` unless `value` is one of `allowed`."""
  if value not in allowed:
    raise SchedulerConfigError(
      f"scheduler {scheduler_name!r}: option {key}={value!r} is not supported by sdjax "
      f"(supported: {', '.join(map(repr, allowed))})"
    )


def check_common(scheduler_name: str, config: dict[str, Any], prediction_types: tuple[str, ...]):
  """Validates what every sigma scheduler shares: prediction type, spacing, beta schedule."""
  check_choice(scheduler_name, "prediction_type", config["prediction_type"], prediction_types)
  check_choice(scheduler_name, "timestep_spacing", config["timestep_spacing"], _SPACINGS)
  sigma_spacing(scheduler_name, config)
  check_schedule_options(scheduler_name, config)
  make_betas(config)  # an unsupported beta_schedule raises here rather than at set_timesteps


def train_alphas_cumprod(config: dict[str, Any]) -> np.ndarray:
  """float32 alphas_cumprod as the sigma schedulers hold it; float16 with the
  `downcast_alphas_cumprod` option (what follows from it is then float16 too, as in torch). Zero
  terminal SNR: A1111's and ComfyUI's in their forms (`k_diffusion`, `comfyui`), else diffusers'."""
  form = "comfyui" if config.get(COMFYUI) else "a1111" if config.get(K_DIFFUSION) else None
  alphas_cumprod = form_alphas_cumprod(config, form)
  if config.get(ZERO_SNR) and form is None:
    # Zero terminal SNR would make the first sigma infinite; diffusers substitutes the smallest
    # float16 subnormal.
    alphas_cumprod[-1] = 2.0**-24
  return alphas_cumprod


def train_sigmas(alphas_cumprod: np.ndarray) -> np.ndarray:
  """sigmas of the training timesteps, ascending in t, in the dtype of `alphas_cumprod`: each
  operation rounded to float16 for a float16 schedule, as torch's half arithmetic rounds it
  (numpy's float16 ufuncs compute in float32 and round once, as torch's); ComfyUI's float64
  schedule's computed in float64 and stored in float32, as its table."""
  sigmas = np.sqrt((1 - alphas_cumprod) / alphas_cumprod)
  return sigmas.astype(np.float32) if sigmas.dtype == np.float64 else sigmas


def spaced_timesteps(config: dict[str, Any], num_inference_steps: int) -> np.ndarray:
  """float32 descending timesteps of the sigma schedulers (Euler, Heun, LMS in diffusers)."""
  n_train = int(config["num_train_timesteps"])
  spacing = config["timestep_spacing"]
  if spacing == "linspace":
    return np.linspace(0, n_train - 1, num_inference_steps, dtype=np.float32)[::-1].copy()
  if spacing == "leading":
    step_ratio = n_train // num_inference_steps
    timesteps = (np.arange(0, num_inference_steps) * step_ratio).round()[::-1].astype(np.float32)
    return timesteps + np.float32(config["steps_offset"])
  if spacing == "trailing":
    step_ratio = n_train / num_inference_steps
    timesteps = np.arange(n_train, 0, -step_ratio).round().astype(np.float32)
    return timesteps - np.float32(1)
  raise SchedulerConfigError(f"timestep_spacing {spacing!r} is not supported by sdjax")


def sigma_schedule(
  config: dict[str, Any], num_inference_steps: int, alphas_cumprod: np.ndarray, final=0.0, *,
  name: str = "", any_final: bool = False
) -> tuple[np.ndarray, np.ndarray]:
  """(timesteps float64/float32 [n], sigmas float64 [n + 1] ending in `final`).

  Mirrors diffusers: sigmas are linearly interpolated (in t) from the float32 training sigmas,
  in float64; Karras, exponential or beta sigmas are then placed between the first and last of
  those (or the config's `sigma_min` / `sigma_max`) and mapped back to fractional timesteps. The
  `sigmas` / `schedule_type` options give all n + 1 sigmas themselves (`sigma_schedules`; a
  last one above 0 only where `any_final`); the `timesteps` option, the timesteps. With
  `discard_penultimate_sigma` the levels of n + 1 steps less the next-to-last (and its timestep).
  """
  if config.get(DISCARD_PENULTIMATE) and all(config.get(key) is None
                                             for key in ("sigmas", "timesteps")):
    timesteps, sigmas = sigma_schedule({**config, DISCARD_PENULTIMATE: False},
                                       num_inference_steps + 1, alphas_cumprod, final, name=name,
                                       any_final=any_final)
    return timesteps[:-1], np.delete(sigmas, -2)
  sigmas_train = train_sigmas(alphas_cumprod)
  log_sigmas = np.log(sigmas_train)
  custom = custom_sigmas(name, config, num_inference_steps, sigmas_train, any_final=any_final)
  if config.get(COMFYUI) and custom is not None:  # its schedulers' levels, at whole timesteps
    return nearest_t(custom[:-1], log_sigmas), custom
  if config.get(COMFYUI):  # ComfyUI's whole timesteps
    timesteps, sigmas = sigma_schedule({**config, COMFYUI: False}, num_inference_steps,
                                       alphas_cumprod, final, name=name, any_final=any_final)
    return nearest_t(sigmas[:-1], log_sigmas), sigmas
  if custom is not None:
    return sigma_to_t(custom[:-1], log_sigmas), custom
  timesteps = custom_timesteps(config, num_inference_steps)
  if timesteps is None:
    timesteps = spaced_timesteps(config, num_inference_steps)
  sigmas = np.interp(timesteps, np.arange(0, len(sigmas_train)), sigmas_train)
  kind = sigma_spacing("", config)
  if kind:
    sigma_min = config.get("sigma_min")
    sigma_max = config.get("sigma_max")
    sigma_min = sigma_min if sigma_min is not None else sigmas[-1].item()
    sigma_max = sigma_max if sigma_max is not None else sigmas[0].item()
    sigmas = spaced_sigmas(kind, *schedule_range(config, sigma_min, sigma_max),
                           num_inference_steps,
                           k_diffusion=bool(config.get(K_DIFFUSION) or config.get(COMFYUI)),
                           **spacing_shape(config))
    timesteps = sigma_to_t(sigmas, log_sigmas)
  return timesteps, np.append(sigmas, np.float64(final))


def final_sigma(config: dict[str, Any], alphas_cumprod: np.ndarray):
  """The sigma after the last step: 0, or the smallest training sigma (float32)."""
  kind = config.get("final_sigmas_type", "zero")
  if kind == "zero":
    return 0
  if kind == "sigma_min":
    return np.sqrt((1 - alphas_cumprod[0]) / alphas_cumprod[0])
  raise SchedulerConfigError(f"final_sigmas_type {kind!r} is not supported by sdjax")


def init_sigma(config: dict[str, Any], sigmas: np.ndarray) -> np.float32:
  """diffusers' `init_noise_sigma` for the sigma schedulers (depends on the spacing); with the
  `comfyui` or `sgm_noise_multiplier` option, theirs."""
  scale = first_noise_scale(config, sigmas)
  if scale is not None:
    return scale
  max_sigma = sigmas.max()
  if config["timestep_spacing"] in ("linspace", "trailing"):
    return max_sigma
  return np.sqrt(max_sigma**2 + 1)


def input_scales(sigmas: np.ndarray) -> np.ndarray:
  """float32 sqrt(sigma^2 + 1): the UNet sees sample / scale (unit variance)."""
  return np.sqrt(sigmas**2 + 1)


def as_f32(x: jnp.ndarray) -> jnp.ndarray:
  """A caller's array in float32, rounded before our arithmetic uses it.

  Without the `rounded` a product the caller computed in the same jit (noise * init_noise_sigma,
  a guidance mix) could fuse with our first sum into one FMA, which torch never does.
  """
  return rounded(x.astype(jnp.float32))


# sdjax's option of the ancestral samplers (euler_ancestral, kdpm2_ancestral, dpmpp_2s_ancestral):
# A1111's "Eta" (its eta_ancestral setting, k-diffusion's `eta`), the share of each step's noise
# that is fresh: 1 (diffusers', the default) to 0 (no fresh noise: the step lands at sigma_next).
# Above 1 (A1111's setting stops at 1) k-diffusion's steps would land at 0 midway, with fewer
# model calls than sdjax's fixed positions.
ANCESTRAL_ETA = "eta"


def check_ancestral_eta(scheduler_name: str, config: dict[str, Any]) -> None:
  eta = config.get(ANCESTRAL_ETA, 1.0)
  if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not 0 <= eta <= 1:
    raise SchedulerConfigError(
      f"scheduler {scheduler_name!r}: eta must be a number in [0, 1] (1: all of each step's "
      f"noise fresh, as in diffusers), got {eta!r}")


def ancestral_step(sigma: np.ndarray, sigma_next: np.ndarray, eta: float = 1.0):
  """float32 (sigma_down, sigma_up): a step from sigma aims at sigma_down, then adds fresh noise
  of scale sigma_up, sigma_down^2 + sigma_up^2 = sigma_next^2. diffusers' arithmetic at eta 1;
  else k-diffusion's `get_ancestral_step` (sigma_up at most sigma_next; at eta 0, none)."""
  if eta == 0:
    return sigma_next.copy(), np.zeros_like(sigma_next)
  with np.errstate(divide="ignore", invalid="ignore"):
    sigma_up = np.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2)
    if eta != 1:
      sigma_up = np.minimum(sigma_next, np.float32(eta) * sigma_up)
    return np.sqrt(sigma_next**2 - sigma_up**2), sigma_up


def predict_original(prediction_type: str, model_output, sample, sigma, v_out, v_den):
  """x0 from the model output as the sigma schedulers compute it (float32 operands).

  `v_out` = -sigma / sqrt(sigma^2 + 1) and `v_den` = sigma^2 + 1 come precomputed from the host,
  rounded as diffusers rounds them, so only elementwise array arithmetic runs on the device; each
  op rounds on its own as in torch (`rounded`, `true_divide`), since x0 feeds cancelling sums.
  """
  if prediction_type in ("sample", "original_sample"):
    return model_output
  if prediction_type == "epsilon":
    return sample - rounded(sigma * model_output)
  if prediction_type == "v_prediction":
    return rounded(model_output * v_out) + true_divide(sample, v_den)
  raise SchedulerConfigError(f"prediction_type {prediction_type!r} is not supported by sdjax")


@struct.dataclass
class SigmaState:
  """A run of Euler / Euler-ancestral; per-position scalars are precomputed in float32.

  Attributes:
    timesteps: [n] float32, the t fed to the UNet at each position.
    sigmas: [n + 1] float32, the noise level at each position and after the last one.
    init_sigma: [] float32, diffusers' `init_noise_sigma`.
    input_scale: [n] sqrt(sigma_i^2 + 1).
    v_out: [n] -sigma_i / sqrt(sigma_i^2 + 1), v-prediction's weight on the model output.
    v_den: [n] sigma_i^2 + 1, v-prediction's divisor of the sample.
    dt: [n] the Euler step in sigma (to sigma_{i+1}, or to sigma_down when ancestral).
    sigma_up: [n] the fresh noise's scale (0 unless ancestral).
  """

  timesteps: jnp.ndarray
  sigmas: jnp.ndarray
  init_sigma: jnp.ndarray
  input_scale: jnp.ndarray
  v_out: jnp.ndarray
  v_den: jnp.ndarray
  dt: jnp.ndarray
  sigma_up: jnp.ndarray


@struct.dataclass
class ChurnState(SigmaState):
  """A run of Euler with k-diffusion's churn (`common.churn_levels`).

  Attributes:
    sigma_in: [n] the level the model sees and the step starts from: sigma_hat_i (sigma_i where
      the step is not churned); timesteps, input_scale, v_out, v_den and dt are its.
    churn: [n] the churn noise's scale (0 where the step is not churned).
  """

  sigma_in: jnp.ndarray
  churn: jnp.ndarray


class SigmaScheduler(Scheduler):
  """What Euler, Euler-ancestral and Heun share; subclasses define `_DEFAULTS` and `step`."""

  _DEFAULTS: ClassVar[dict[str, Any]] = {}
  _UNSUPPORTED: ClassVar[dict[str, Any]] = {}
  _PREDICTION_TYPES: ClassVar[tuple[str, ...]] = ()
  schedule_options = (*SCHEDULE_OPTIONS, DOWNCAST_ALPHAS_CUMPROD, ZERO_SNR)

  @classmethod
  def from_config(cls, scheduler_config: dict[str, Any], **overrides):
    config = resolve_config(
      cls.name,
      cls._defaults(),
      scheduler_config,
      unsupported=cls._UNSUPPORTED,
      overrides=overrides,
    )
    cls._validate(config)
    return cls(config=hashable_config(config))

  @classmethod
  def _defaults(cls) -> dict[str, Any]:
    """`_DEFAULTS`, with k-diffusion's churn options for Euler, Heun and DPM2 (not for the
    samplers built on their classes)."""
    return {**cls._DEFAULTS, **CHURN_DEFAULTS} if cls.name in CHURN_SAMPLERS else cls._DEFAULTS

  @classmethod
  def option_names(cls, overrides: dict[str, Any]) -> set[str]:
    return super().option_names(overrides) | set(cls._defaults())

  @classmethod
  def _validate(cls, config: dict[str, Any]) -> None:
    check_common(cls.name, config, cls._PREDICTION_TYPES)
    if cls.name in CHURN_SAMPLERS:
      check_churn(cls.name, config)

  @property
  def churns(self) -> bool:
    return self.name in CHURN_SAMPLERS and float(self.cfg.get(S_CHURN, 0.0)) > 0

  def churn(self, state, sample, i, noise):
    if not self.churns:
      return sample
    return (as_f32(sample) + rounded(as_f32(noise) * state.churn[i])).astype(sample.dtype)

  def _churned(self, config, sigma: np.ndarray, steps: int, timesteps: np.ndarray,
               log_sigmas: np.ndarray):
    """(sigma_hat, churn scale, the timesteps the model sees) at levels `sigma` of a loop of
    `steps` steps (`common.churn_levels`): a churned level's timestep is read off the training
    sigmas as the loop's model wrapper reads it (ComfyUI's: the nearest whole one)."""
    sigma_hat, scale = churn_levels(config, sigma, steps)
    if not scale.any():
      return sigma_hat, scale, timesteps
    hat_t = (nearest_t if config.get(COMFYUI) else sigma_to_t)(sigma_hat, log_sigmas)
    return sigma_hat, scale, np.where(scale > 0, hat_t, timesteps)

  def set_timesteps(self, num_inference_steps: int, sample_shape: tuple[int, ...] | None = None):
    del sample_shape  # no history
    config = self.cfg
    alphas_cumprod = train_alphas_cumprod(config)
    # Each step depends only on its two sigmas, so a custom schedule may end anywhere.
    timesteps, sigmas = sigma_schedule(config, num_inference_steps, alphas_cumprod,
                                       final_sigma(config, alphas_cumprod), name=self.name,
                                       any_final=True)
    sigmas = sigmas.astype(np.float32)
    sigma_next = sigmas[1:]
    sigma, churn, timesteps = self._churned(config, sigmas[:-1], len(sigmas) - 1, timesteps,
                                            np.log(train_sigmas(alphas_cumprod)))
    scale = input_scales(sigma)
    with np.errstate(divide="ignore", invalid="ignore"):
      dt, sigma_up = self._step_sizes(sigma, sigma_next)
    fields = dict(
      timesteps=jnp.asarray(timesteps.astype(np.float32)),
      sigmas=jnp.asarray(sigmas),
      init_sigma=jnp.asarray(init_sigma(config, sigmas)),
      input_scale=jnp.asarray(scale),
      v_out=jnp.asarray(-sigma / scale),
      v_den=jnp.asarray(sigma**2 + 1),
      dt=jnp.asarray(dt),
      sigma_up=jnp.asarray(sigma_up),
    )
    if not self.churns:
      return SigmaState(**fields)
    return ChurnState(**fields, sigma_in=jnp.asarray(sigma), churn=jnp.asarray(churn))

  def _step_sizes(self, sigma: np.ndarray, sigma_next: np.ndarray):
    """float32 (dt, sigma_up) per position."""
    raise NotImplementedError

  def init_noise_sigma(self, state):
    return state.init_sigma

  def scale_model_input(self, state, sample, i):
    return true_divide(as_f32(sample), state.input_scale[i]).astype(sample.dtype)

  def add_noise(self, state, original_samples, noise, i):
    noise = rounded(as_f32(noise) * state.sigmas[i])
    noisy = as_f32(original_samples) + noise
    return noisy.astype(original_samples.dtype)

  def _euler_step(self, state, model_output, i, sample):
    """sample + (sample - x0) / sigma * dt, in float32 (sigma: sigma_hat with churn)."""
    sigma = (state.sigma_in if isinstance(state, ChurnState) else state.sigmas)[i]
    pred_original = predict_original(
      self.prediction_type, model_output, sample, sigma, state.v_out[i], state.v_den[i]
    )
    derivative = true_divide(sample - pred_original, sigma)
    return sample + rounded(derivative * state.dt[i])


class FirstStageChurn:
  """Heun's and DPM2's churn draws (a mixin before `SigmaScheduler`): one a step, at the step's
  first stage (even positions), as their k-diffusion loops draw."""

  @property
  def needs_noise(self) -> bool:
    return self.churns  # type: ignore[attr-defined]

  def noise_draw(self, i, positions: int):
    del positions
    return (i + 1) // 2

  @staticmethod
  def first_stages(x: np.ndarray) -> np.ndarray:
    """[2n - 1]: per-step values `x` [n] at the steps' first stages (even positions), else 0."""
    out = np.zeros(2 * len(x) - 1, x.dtype)
    out[0::2] = x
    return out


@dataclasses.dataclass(frozen=True)
class EulerDiscreteScheduler(SigmaScheduler):
  """diffusers' `EulerDiscreteScheduler` (as its pipelines run it: s_churn 0); with the s_churn
  option k-diffusion's `sample_euler` churn (`common.S_CHURN`), which A1111's Euler runs."""

  name = "euler"
  # diffusers' pipe(timesteps=...) too; k_diffusion changes nothing (`sigma_schedules`)
  schedule_options = (*TIMESTEPS_OPTIONS, K_DIFFUSION, COMFYUI, SGM_NOISE_MULTIPLIER,
                      DOWNCAST_ALPHAS_CUMPROD, DISCARD_PENULTIMATE)
  order = 1

  @property
  def needs_noise(self) -> bool:  # type: ignore[override]
    return self.churns  # one draw a step, for the churn

  _DEFAULTS = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "prediction_type": "epsilon",
    "interpolation_type": "linear",
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "sigma_min": None,
    "sigma_max": None,
    "timestep_spacing": "linspace",
    "timestep_type": "discrete",
    "steps_offset": 0,
    "rescale_betas_zero_snr": False,
    "final_sigmas_type": "zero",
  }
  _UNSUPPORTED = {"interpolation_type": "linear"}
  _PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "original_sample")

  @classmethod
  def _validate(cls, config: dict[str, Any]) -> None:
    super()._validate(config)
    check_choice(cls.name, "final_sigmas_type", config["final_sigmas_type"], ("zero", "sigma_min"))
    check_choice(cls.name, "timestep_type", config["timestep_type"], ("discrete", "continuous"))
    if config["timestep_type"] == "continuous" and config["prediction_type"] == "v_prediction":
      # Only this combination changes the math (EDM-style timesteps 0.25 * log(sigma)).
      raise SchedulerConfigError(
        f"scheduler {cls.name!r}: option timestep_type='continuous' with "
        "prediction_type='v_prediction' is not supported by sdjax"
      )

  def _step_sizes(self, sigma, sigma_next):
    # diffusers' churn factor gamma is 0 with its default s_churn, so sigma_hat == sigma.
    return sigma_next - sigma, np.zeros_like(sigma)

  def step(self, state, model_output, i, sample, noise=None):
    del noise
    prev_sample = self._euler_step(state, as_f32(model_output), i, as_f32(sample))
    return prev_sample.astype(sample.dtype), state


@dataclasses.dataclass(frozen=True)
class EulerAncestralDiscreteScheduler(SigmaScheduler):
  """diffusers' `EulerAncestralDiscreteScheduler`: an Euler step to sigma_down, then fresh noise."""

  name = "euler_ancestral"
  # diffusers' pipe(timesteps=...) too; k_diffusion changes nothing (`sigma_schedules`)
  schedule_options = (*TIMESTEPS_OPTIONS, K_DIFFUSION, COMFYUI, SGM_NOISE_MULTIPLIER,
                      ANCESTRAL_ETA, DOWNCAST_ALPHAS_CUMPROD, DISCARD_PENULTIMATE)
  order = 1
  needs_noise = True

  _DEFAULTS = {
    S_NOISE: 1.0,  # k-diffusion's (`common.S_NOISE`), not diffusers'
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "prediction_type": "epsilon",
    # Not diffusers' options for Euler a: sdjax takes Euler's spacings, placed as Euler places
    # them, so that A1111's "Euler a" runs with its Karras, Exponential and Beta schedule types.
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "timestep_spacing": "linspace",
    "steps_offset": 0,
    "rescale_betas_zero_snr": False,
  }
  # diffusers raises NotImplementedError for "sample" at the first step.
  _PREDICTION_TYPES = ("epsilon", "v_prediction")

  @classmethod
  def _validate(cls, config: dict[str, Any]) -> None:
    super()._validate(config)
    check_ancestral_eta(cls.name, config)

  def _step_sizes(self, sigma, sigma_next):
    sigma_down, sigma_up = ancestral_step(sigma, sigma_next, self.cfg.get(ANCESTRAL_ETA, 1.0))
    return sigma_down - sigma, sigma_up

  def step(self, state, model_output, i, sample, noise=None):
    if noise is None:
      raise ValueError("euler_ancestral needs `noise` (unit Gaussian, sample shape) at every step")
    prev_sample = self._euler_step(state, as_f32(model_output), i, as_f32(sample))
    prev_sample = prev_sample + rounded(as_f32(noise) * state.sigma_up[i])
    return prev_sample.astype(sample.dtype), state


def _cfg_pp_step(self, state, model_output, i, sample, uncond, sigma_to):
  """CFG++ (Chung et al. 2024) as ComfyUI's k-diffusion loops: the guided x0, then the
  unconditional prediction's direction (x - x0_uncond) / sigma times `sigma_to`."""
  if uncond is None:
    raise ValueError(f"{self.name} renoises along the unconditional prediction: pass `uncond`")
  sigma = state.sigmas[i]
  sample = as_f32(sample)
  x0 = predict_original(self.prediction_type, as_f32(model_output), sample, sigma, state.v_out[i],
                        state.v_den[i])
  x0_uncond = predict_original(self.prediction_type, as_f32(uncond), sample, sigma,
                               state.v_out[i], state.v_den[i])
  return x0 + rounded(true_divide(sample - x0_uncond, sigma) * sigma_to)


@dataclasses.dataclass(frozen=True)
class EulerCFGPPScheduler(EulerDiscreteScheduler):
  """ComfyUI's `euler_cfg_pp` (Forge's "Euler CFG++"): x0 of the guided prediction plus the
  unconditional one's direction at the next level, x0 + d_uncond * sigma_next."""

  name = "euler_cfg_pp"
  takes_uncond = True

  def step(self, state, model_output, i, sample, noise=None, uncond=None):
    del noise
    prev_sample = _cfg_pp_step(self, state, model_output, i, sample, uncond, state.sigmas[i + 1])
    return prev_sample.astype(sample.dtype), state


@dataclasses.dataclass(frozen=True)
class EulerAncestralCFGPPScheduler(EulerAncestralDiscreteScheduler):
  """ComfyUI's `euler_ancestral_cfg_pp` (Forge's "Euler a CFG++"): x0 + d_uncond * sigma_down,
  then fresh noise of scale sigma_up."""

  name = "euler_ancestral_cfg_pp"
  takes_uncond = True

  def step(self, state, model_output, i, sample, noise=None, uncond=None):
    if noise is None:
      raise ValueError(f"{self.name} needs `noise` (unit Gaussian, sample shape) at every step")
    sigma_down = state.sigmas[i] + state.dt[i]
    prev_sample = _cfg_pp_step(self, state, model_output, i, sample, uncond, sigma_down)
    prev_sample = prev_sample + rounded(as_f32(noise) * state.sigma_up[i])
    return prev_sample.astype(sample.dtype), state


class EDMPreconditioned:
  """What the EDM schedulers share: pure noise at sqrt(sigma_max^2 + 1), the model input scaled
  by c_in, img2img noise added at sigma, x0 from c_skip and c_out (their states hold `sigmas`
  and `precondition`, `common.edm_precondition`)."""

  def init_noise_sigma(self, state):
    del state
    return jnp.float32((float(self.cfg["sigma_max"]) ** 2 + 1) ** 0.5)

  def scale_model_input(self, state, sample, i):
    return (as_f32(sample) * state.precondition[0, i]).astype(sample.dtype)

  def add_noise(self, state, original_samples, noise, i):
    noisy = as_f32(original_samples) + rounded(as_f32(noise) * state.sigmas[i])
    return noisy.astype(original_samples.dtype)

  def _x0(self, state, model_output, sample, i):
    return (rounded(state.precondition[1, i] * sample)
            + rounded(state.precondition[2, i] * model_output))


@struct.dataclass
class EDMEulerState:
  """An EDM Euler run.

  Attributes:
    timesteps: [n] float32, 0.25 * log(sigma_i), the UNet's timestep.
    sigmas: [n + 1] float32 noise levels, the last one after the last step.
    precondition: [3, n] float32 c_in, c_skip, c_out (`common.edm_precondition`).
    dt: [n] sigma_{i+1} - sigma_i.
  """

  timesteps: jnp.ndarray
  sigmas: jnp.ndarray
  precondition: jnp.ndarray
  dt: jnp.ndarray


@dataclasses.dataclass(frozen=True)
class EDMEulerScheduler(EDMPreconditioned, Scheduler):
  """diffusers' `EDMEulerScheduler` (CosXL's; deterministic: s_churn = 0): Euler steps in sigma
  between EDM's Karras (or exponential) noise levels, the UNet's input and output
  preconditioned as EDM's (`sigma_data`)."""

  name = "edm_euler"
  order = 1
  needs_noise = False

  _DEFAULTS: ClassVar[dict[str, Any]] = {
    "sigma_min": 0.002,
    "sigma_max": 80.0,
    "sigma_data": 0.5,
    "sigma_schedule": "karras",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "rho": 7.0,
    "final_sigmas_type": "zero",
  }

  @classmethod
  def from_config(cls, scheduler_config: dict[str, Any], **overrides):
    config = resolve_config(cls.name, cls._DEFAULTS, scheduler_config, overrides=overrides)
    edm_noise_range(config, cls._DEFAULTS)
    check_choice(cls.name, "prediction_type", config["prediction_type"],
                 ("epsilon", "v_prediction"))
    check_choice(cls.name, "sigma_schedule", config["sigma_schedule"], ("karras", "exponential"))
    check_choice(cls.name, "final_sigmas_type", config["final_sigmas_type"], ("zero", "sigma_min"))
    return cls(config=hashable_config(config))

  def set_timesteps(self, num_inference_steps: int, sample_shape: tuple[int, ...] | None = None):
    del sample_shape  # no history
    config = self.cfg
    sigma_min, sigma_max = float(config["sigma_min"]), float(config["sigma_max"])
    if config["sigma_schedule"] == "karras":  # in float64, then float32, as diffusers
      rho = float(config["rho"])
      ramp = np.linspace(0, 1, num_inference_steps)
      min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
      sigmas = ((max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho).astype(np.float32)
    else:  # torch's default float32 linspace
      sigmas = exp_f32(torch_linspace_f32(math.log(sigma_min), math.log(sigma_max),
                                          num_inference_steps))[::-1]
    last = sigmas[-1] if config["final_sigmas_type"] == "sigma_min" else 0.0
    all_sigmas = np.concatenate([sigmas, [last]]).astype(np.float32)
    return EDMEulerState(
      timesteps=jnp.asarray(np.float32(0.25) * log_f32(sigmas)),
      sigmas=jnp.asarray(all_sigmas),
      precondition=jnp.asarray(edm_precondition(sigmas, float(config["sigma_data"]),
                                                self.prediction_type)),
      dt=jnp.asarray(all_sigmas[1:] - sigmas),
    )

  def step(self, state, model_output, i, sample, noise=None):
    del noise
    sample32 = as_f32(sample)
    x0 = self._x0(state, as_f32(model_output), sample32, i)
    derivative = true_divide(sample32 - x0, state.sigmas[i])
    prev_sample = sample32 + rounded(derivative * state.dt[i])
    return prev_sample.astype(sample.dtype), state
