"""Latent consistency sampling (Luo et al. 2023), as diffusers' `LCMScheduler`.

The sampler of LCM-LoRA (any SD1.5 / SDXL model in 2-8 steps) and of LCM-distilled models. Each
step maps x_t to a denoised sample through the consistency boundary condition,
`c_out * x0_pred + c_skip * x_t`, then noises it afresh to the next timestep (not after the last).
Its timesteps are spread over the `original_inference_steps` timesteps the model was distilled on
(every `num_train_timesteps // original_inference_steps`-th), whatever the checkpoint's
`timestep_spacing` says. As in `ddim.py`, the per-position scalars are computed on the host in
float32 numpy, in diffusers' order of operations.

sdjax's `k_diffusion` option makes it AUTOMATIC1111's "LCM" sampler (its sd_samplers_lcm, which
`infotext` reads an A1111 image's "Sampler: LCM" as): k-diffusion's loop over the noise levels of
the distillation timesteps alone (a table of `original_inference_steps` levels from A1111's own
schedule, `sigma_schedules.form_alphas_cumprod`), placed by its schedule type (Automatic and
Uniform: evenly in that table's index, interpolated in log sigma); the UNet sees the distillation
timestep nearest each level and x / sqrt(sigma^2 + 1); the step takes the same boundary condition
of the noise-predicted x0 and of x, here in k-diffusion's scale (x0 + sigma * noise), and adds
sigma_next times fresh noise. It is the same step as diffusers' with the coefficients of that
scale (sqrt(alpha) 1, sqrt(1 - alpha) sigma), so only the state differs. With `comfyui` too it
is ComfyUI's lcm sampler over a model a ModelSamplingDiscrete node samples as "lcm" (its
ModelSamplingDiscreteDistilled): the same loop over ComfyUI's table (its float64 levels at the
distillation timesteps, in float32), by its schedulers, from its noise times sqrt(1 + sigma^2) at
the largest level (ComfyUI divides the UNet's input by that root: an ulp from our product).
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
  first_noise_scale,
  hashable_config,
  log_f32,
  make_alphas_cumprod,
  make_betas,
  nearest_t,
  resolve_config,
  rounded,
  spaced_sigmas,
  torch_linspace_f32,
)
from sdjax.schedulers.ddim import add_noise_vp, f32, predict_original_and_noise
from sdjax.schedulers.euler import check_choice
from sdjax.schedulers.sigma_schedules import (
  COMFYUI,
  DISCARD_PENULTIMATE,
  DOWNCAST_ALPHAS_CUMPROD,
  K_DIFFUSION,
  SGM_NOISE_MULTIPLIER,
  SPACING_TYPES,
  custom_timesteps,
  form_alphas_cumprod,
  schedule_range,
  schedule_sigmas,
  spacing_shape,
)
from sdjax.schedulers.sigma_schedules import check_options as check_schedule_options

_SIGMA_DATA = np.float32(0.5)


@struct.dataclass
class LCMState:
  """An LCM run: per-position coefficients.

  Attributes:
    timesteps: [n] int32, the t fed to the UNet at each position.
    sqrt_alpha, sqrt_one_minus_alpha: [n] roots of alpha_prod_t and 1 - alpha_prod_t.
    c_skip, c_out: [n] the boundary condition's weights of x_t and of the predicted x0.
    sqrt_alpha_prev, noise_std: [n] roots of alpha_prod and 1 - alpha_prod of the next timestep,
      the weights of the denoised sample and of fresh noise (1 and 0 at the last position).
    input_scale: [n] what the UNet's input is multiplied by (1; the `k_diffusion` form's
      1 / sqrt(sigma^2 + 1)).
    sigma_in: [n] the noise level of each call's input (`Scheduler.a1111_levels`).
    init_sigma: the scale of unit noise into the first latent.
  In the `k_diffusion` form sqrt_alpha, sqrt_alpha_prev are 1 and sqrt_one_minus_alpha,
  noise_std the level and the next one (0 after the last).
  """

  timesteps: jnp.ndarray
  sqrt_alpha: jnp.ndarray
  sqrt_one_minus_alpha: jnp.ndarray
  c_skip: jnp.ndarray
  c_out: jnp.ndarray
  sqrt_alpha_prev: jnp.ndarray
  noise_std: jnp.ndarray
  input_scale: jnp.ndarray
  sigma_in: jnp.ndarray
  init_sigma: jnp.ndarray


def lcm_timesteps(config: dict[str, Any], num_inference_steps: int,
                  name: str = "lcm") -> np.ndarray:
  """Descending int64 timesteps: `num_inference_steps` evenly spaced indices into the
  distillation schedule (k - 1, 2k - 1, ..., with k = num_train // original_inference_steps), or
  the `timesteps` option's (as diffusers' custom timesteps, taken as integers)."""
  custom = custom_timesteps(config, num_inference_steps)
  if custom is not None:
    return custom.astype(np.int64)
  n_train, original = int(config["num_train_timesteps"]), int(config["original_inference_steps"])
  if original > n_train:
    raise ValueError(f"original_inference_steps={original} cannot exceed "
                     f"num_train_timesteps={n_train}")
  if not 1 <= num_inference_steps <= original:
    raise ValueError(f"{name} takes 1 to original_inference_steps={original} steps, got "
                     f"{num_inference_steps}")
  k = n_train // original
  origin = (np.arange(1, original + 1) * k - 1)[::-1]
  indices = np.floor(np.linspace(0, len(origin), num=num_inference_steps, endpoint=False))
  return origin[indices.astype(np.int64)].astype(np.int64)


def resolve_lcm_config(cls, scheduler_config: dict[str, Any],
                       overrides: dict[str, Any]) -> dict[str, Any]:
  """The config of LCM or of a scheduler sharing its options (TCD), resolved and checked."""
  config = resolve_config(
    cls.name, cls._DEFAULTS, scheduler_config, unsupported=cls._UNSUPPORTED, overrides=overrides
  )
  check_choice(cls.name, "prediction_type", config["prediction_type"],
               ("epsilon", "sample", "v_prediction"))
  make_betas(config)  # an unsupported beta_schedule raises here rather than at set_timesteps
  if int(config["original_inference_steps"]) < 1:
    raise SchedulerConfigError(f"scheduler {cls.name!r}: original_inference_steps must be "
                               f">= 1, got {config['original_inference_steps']}")
  k_form = config.get(K_DIFFUSION)
  # Karras, Exponential and Beta are schedule types of A1111's LCM form (there is no diffusers
  # spacing option to carry them)
  spaced = k_form and config.get("schedule_type") in SPACING_TYPES
  check_schedule_options(cls.name, {**config, "schedule_type": None} if spaced else config)
  for option in ("schedule_type", COMFYUI, SGM_NOISE_MULTIPLIER, DOWNCAST_ALPHAS_CUMPROD,
                 DISCARD_PENULTIMATE):
    if config.get(option) and not k_form:
      raise SchedulerConfigError(f"scheduler {cls.name!r}: {option} is A1111's LCM sampler's: "
                                 "set k_diffusion too")
  if k_form and config.get("timesteps") is not None:
    raise SchedulerConfigError(f"scheduler {cls.name!r}: A1111's LCM sampler (k_diffusion) "
                               "places its own levels: give schedule_type, not timesteps")
  if k_form and config["prediction_type"] != "epsilon":
    raise SchedulerConfigError(f"scheduler {cls.name!r}: A1111's LCM sampler (k_diffusion) "
                               "reads the model's output as noise: an epsilon model only, not "
                               f"{config['prediction_type']}")
  return config


def _a1111_levels(config: dict[str, Any], num_inference_steps: int):
  """A1111's LCM sampler (`k_diffusion`): (float32 levels [n + 1] ending in 0, int64 distillation
  timesteps [n] the UNet sees), as its LCMCompVisDenoiser places and reads them; with `comfyui`,
  as ComfyUI's ModelSamplingDiscreteDistilled (a ModelSamplingDiscrete node's "lcm"); with
  `discard_penultimate_sigma` those of n + 1 steps less the next-to-last."""
  if config.get(DISCARD_PENULTIMATE):
    levels, timesteps = _a1111_levels({**config, DISCARD_PENULTIMATE: False},
                                      num_inference_steps + 1)
    return np.delete(levels, -2), timesteps[:-1]
  n_train, original = int(config["num_train_timesteps"]), int(config["original_inference_steps"])
  if original > n_train:
    raise ValueError(f"original_inference_steps={original} cannot exceed "
                     f"num_train_timesteps={n_train}")
  skip = n_train // original
  # Its table, ascending in t: the model's alphas_cumprod (float16 where A1111 downcast it) at the
  # distillation timesteps, held in float32, their levels and logs in float32; ComfyUI's: its
  # float64 levels there, stored in float32, their logs in float32.
  valid = n_train - 1 - skip * np.arange(original)[::-1]
  if config.get(COMFYUI):
    alphas = form_alphas_cumprod(config, "comfyui")
    table = np.sqrt((1 - alphas) / alphas).astype(np.float32)[valid]
  else:
    alphas = form_alphas_cumprod(config, "a1111").astype(np.float32)[valid]
    table = np.sqrt((np.float32(1) - alphas) / alphas).astype(np.float32)
  log_table = log_f32(table)
  kind = config.get("schedule_type")
  if kind in (None, "uniform", "normal", "sgm_uniform"):
    # get_sigmas (Automatic, Uniform; Normal too, which reads the extremes' timesteps, these
    # same): timesteps evenly from the table's last to its first (SGM Uniform: n of n + 1)
    last, first = (original - 1) * skip + skip - 1, skip - 1
    extra = kind == "sgm_uniform"
    t = torch_linspace_f32(last, first, num_inference_steps + extra)[:num_inference_steps]
    t = np.clip((t - np.float32(skip - 1)) / np.float32(skip), 0, original - 1).astype(np.float32)
    low, high = np.floor(t).astype(np.int64), np.ceil(t).astype(np.int64)
    w = (t - np.floor(t)).astype(np.float32)
    levels = exp_f32((np.float32(1) - w) * log_table[low] + w * log_table[high])
    levels = np.append(levels, np.float32(0))
  elif kind in SPACING_TYPES and not (kind == "beta" and config.get(COMFYUI)):
    # between the table's extremes, as A1111's Karras ... call them
    levels = np.append(spaced_sigmas(kind, *schedule_range(config, float(table[0]),
                                                           float(table[-1])),
                                     num_inference_steps, k_diffusion=True,
                                     **spacing_shape(config)).astype(np.float32), np.float32(0))
  else:  # the other schedule types between the table's extremes, or over its levels
    levels = schedule_sigmas(kind, num_inference_steps, table, comfyui=bool(config.get(COMFYUI)),
                             settings=config).astype(np.float32)
  timesteps = nearest_t(levels[:-1], log_table).astype(np.int64) * skip + (skip - 1)
  return levels, timesteps


@dataclasses.dataclass(frozen=True)
class LCMScheduler(Scheduler):
  """diffusers' `LCMScheduler` (without thresholding)."""

  name = "lcm"
  # diffusers' pipe(timesteps=...); A1111's LCM sampler (`k_diffusion`) and its settings
  # (`comfyui`: ComfyUI's lcm sampler over a ModelSamplingDiscrete "lcm" model)
  schedule_options = ("timesteps", K_DIFFUSION, COMFYUI, "schedule_type", SGM_NOISE_MULTIPLIER,
                      DOWNCAST_ALPHAS_CUMPROD, DISCARD_PENULTIMATE)
  order = 1
  needs_noise = True

  _DEFAULTS = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "trained_betas": None,
    "original_inference_steps": 50,
    "clip_sample": False,
    "clip_sample_range": 1.0,
    "set_alpha_to_one": True,
    "steps_offset": 0,
    "prediction_type": "epsilon",
    "thresholding": False,
    "dynamic_thresholding_ratio": 0.995,
    "sample_max_value": 1.0,
    "timestep_spacing": "leading",
    "timestep_scaling": 10.0,
    "rescale_betas_zero_snr": False,
  }
  _UNSUPPORTED = {"thresholding": False}

  @classmethod
  def from_config(cls, scheduler_config: dict[str, Any], **overrides):
    return cls(config=hashable_config(resolve_lcm_config(cls, scheduler_config, overrides)))

  def set_timesteps(self, num_inference_steps: int, sample_shape: tuple[int, ...] | None = None):
    del sample_shape  # no history
    config = self.cfg
    if config.get(K_DIFFUSION):
      return self._a1111_state(num_inference_steps)
    timesteps = lcm_timesteps(config, num_inference_steps)
    alphas_cumprod = make_alphas_cumprod(config)
    alpha = alphas_cumprod[timesteps]
    # The next position's alpha_prod; the last position keeps its denoised sample as it is.
    alpha_prev = alphas_cumprod[np.concatenate([timesteps[1:], timesteps[-1:]])]
    last = np.arange(len(timesteps)) == len(timesteps) - 1
    scaled = timesteps.astype(np.float32) * np.float32(config["timestep_scaling"])
    denominator = scaled * scaled + _SIGMA_DATA * _SIGMA_DATA
    with np.errstate(divide="ignore"):  # a zero-SNR schedule's first level is infinite
      sigma_in = np.sqrt((1 - alpha) / alpha)
    return LCMState(
      timesteps=jnp.asarray(timesteps.astype(np.int32)),
      sqrt_alpha=f32(np.sqrt(alpha)),
      sqrt_one_minus_alpha=f32(np.sqrt(1 - alpha)),
      c_skip=f32(_SIGMA_DATA * _SIGMA_DATA / denominator),
      c_out=f32(scaled / np.sqrt(denominator)),
      sqrt_alpha_prev=f32(np.where(last, 1, np.sqrt(alpha_prev))),
      noise_std=f32(np.where(last, 0, np.sqrt(1 - alpha_prev))),
      input_scale=f32(np.ones(len(timesteps))),
      sigma_in=f32(sigma_in),
      init_sigma=jnp.float32(1.0),
    )

  def _a1111_state(self, num_inference_steps: int) -> LCMState:
    """A1111's LCM sampler (`k_diffusion`): k-diffusion's scale, its levels and timesteps."""
    config = self.cfg
    levels, timesteps = _a1111_levels(config, num_inference_steps)
    sigma, sigma_next = levels[:-1], levels[1:]
    scaled = timesteps.astype(np.float32) * np.float32(config["timestep_scaling"])
    denominator = scaled * scaled + _SIGMA_DATA * _SIGMA_DATA
    one = np.ones(len(sigma), np.float32)
    init = first_noise_scale(config, levels)
    return LCMState(
      timesteps=jnp.asarray(timesteps.astype(np.int32)),
      sqrt_alpha=f32(one),
      sqrt_one_minus_alpha=f32(sigma),
      c_skip=f32(_SIGMA_DATA * _SIGMA_DATA / denominator),
      c_out=f32(scaled / np.sqrt(denominator)),
      sqrt_alpha_prev=f32(one),
      noise_std=f32(sigma_next),
      input_scale=f32(one / np.sqrt(sigma * sigma + one)),
      sigma_in=f32(sigma),
      init_sigma=jnp.float32(sigma[0] if init is None else init),
    )

  def init_noise_sigma(self, state):
    return state.init_sigma

  def scale_model_input(self, state, sample, i):
    return (sample.astype(jnp.float32) * state.input_scale[i]).astype(sample.dtype)

  def step(self, state, model_output, i, sample, noise=None):
    if noise is None:
      raise ValueError("lcm needs `noise` (unit Gaussian, sample shape) at every step")
    config = self.cfg
    x = sample.astype(jnp.float32)
    out = model_output.astype(jnp.float32)
    pred_original, _ = predict_original_and_noise(
      config["prediction_type"], x, out, state.sqrt_alpha[i], state.sqrt_one_minus_alpha[i])
    if config["clip_sample"] and not config.get(K_DIFFUSION):  # A1111's does not clip
      limit = config["clip_sample_range"]
      pred_original = jnp.clip(pred_original, -limit, limit)
    denoised = rounded(state.c_out[i] * pred_original) + rounded(state.c_skip[i] * x)
    # The last position: 1 * denoised + 0 * noise, denoised exactly.
    prev = rounded(state.sqrt_alpha_prev[i] * denoised) + rounded(
      state.noise_std[i] * noise.astype(jnp.float32))
    return prev.astype(sample.dtype), state

  add_noise = add_noise_vp
