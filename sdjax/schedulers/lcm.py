"""Latent consistency sampling (Luo et al. 2023), as diffusers' `LCMScheduler`.

The sampler of LCM-LoRA (any SD1.5 / SDXL model in 2-8 steps) and of LCM-distilled models. Each
step maps x_t to a denoised sample through the consistency boundary condition,
`c_out * x0_pred + c_skip * x_t`, then noises it afresh to the next timestep (not after the last).
Its timesteps are spread over the `original_inference_steps` timesteps the model was distilled on
(every `num_train_timesteps // original_inference_steps`-th), whatever the checkpoint's
`timestep_spacing` says. As in `ddim.py`, the per-position scalars are computed on the host in
float32 numpy, in diffusers' order of operations.
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
  hashable_config,
  make_alphas_cumprod,
  make_betas,
  resolve_config,
  rounded,
)
from sdjax.schedulers.ddim import add_noise_vp, f32, predict_original_and_noise
from sdjax.schedulers.euler import check_choice
from sdjax.schedulers.sigma_schedules import check_options as check_schedule_options
from sdjax.schedulers.sigma_schedules import custom_timesteps

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
  """

  timesteps: jnp.ndarray
  sqrt_alpha: jnp.ndarray
  sqrt_one_minus_alpha: jnp.ndarray
  c_skip: jnp.ndarray
  c_out: jnp.ndarray
  sqrt_alpha_prev: jnp.ndarray
  noise_std: jnp.ndarray


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
  check_schedule_options(cls.name, config)
  return config


@dataclasses.dataclass(frozen=True)
class LCMScheduler(Scheduler):
  """diffusers' `LCMScheduler` (without thresholding)."""

  name = "lcm"
  schedule_options = ("timesteps",)  # diffusers' pipe(timesteps=...)
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
    timesteps = lcm_timesteps(config, num_inference_steps)
    alphas_cumprod = make_alphas_cumprod(config)
    alpha = alphas_cumprod[timesteps]
    # The next position's alpha_prod; the last position keeps its denoised sample as it is.
    alpha_prev = alphas_cumprod[np.concatenate([timesteps[1:], timesteps[-1:]])]
    last = np.arange(len(timesteps)) == len(timesteps) - 1
    scaled = timesteps.astype(np.float32) * np.float32(config["timestep_scaling"])
    denominator = scaled * scaled + _SIGMA_DATA * _SIGMA_DATA
    return LCMState(
      timesteps=jnp.asarray(timesteps.astype(np.int32)),
      sqrt_alpha=f32(np.sqrt(alpha)),
      sqrt_one_minus_alpha=f32(np.sqrt(1 - alpha)),
      c_skip=f32(_SIGMA_DATA * _SIGMA_DATA / denominator),
      c_out=f32(scaled / np.sqrt(denominator)),
      sqrt_alpha_prev=f32(np.where(last, 1, np.sqrt(alpha_prev))),
      noise_std=f32(np.where(last, 0, np.sqrt(1 - alpha_prev))),
    )

  def init_noise_sigma(self, state):
    del state
    return 1.0

  def step(self, state, model_output, i, sample, noise=None):
    if noise is None:
      raise ValueError("lcm needs `noise` (unit Gaussian, sample shape) at every step")
    config = self.cfg
    x = sample.astype(jnp.float32)
    out = model_output.astype(jnp.float32)
    pred_original, _ = predict_original_and_noise(
      config["prediction_type"], x, out, state.sqrt_alpha[i], state.sqrt_one_minus_alpha[i])
    if config["clip_sample"]:
      limit = config["clip_sample_range"]
      pred_original = jnp.clip(pred_original, -limit, limit)
    denoised = rounded(state.c_out[i] * pred_original) + rounded(state.c_skip[i] * x)
    # The last position: 1 * denoised + 0 * noise, denoised exactly.
    prev = rounded(state.sqrt_alpha_prev[i] * denoised) + rounded(
      state.noise_std[i] * noise.astype(jnp.float32))
    return prev.astype(sample.dtype), state

  add_noise = add_noise_vp
