"""Ancestral DDPM sampling (Ho et al. 2020), as diffusers' `DDPMScheduler`.

Each step takes the posterior mean of x_{t_prev} given the predicted x0 and x_t, then adds fresh
unit noise scaled by the posterior's standard deviation (none on the step from t = 0). As in
`ddim.py`, the per-position scalars are computed on the host in float32 numpy.
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
  make_alphas_cumprod,
  resolve_config,
  rounded,
)
from sdjax.schedulers.ddim import (
  add_noise_vp,
  alpha_prod_at,
  check_discrete,
  discrete_timesteps,
  f32,
  predict_original_and_noise,
)
from sdjax.schedulers.euler import check_choice
from sdjax.schedulers.sigma_schedules import check_options as check_schedule_options
from sdjax.schedulers.sigma_schedules import custom_timesteps

_VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large")


@struct.dataclass
class DDPMState:
  """A DDPM run.

  Attributes:
    timesteps: [n] int32, the t fed to the UNet at each position.
    sqrt_alpha, sqrt_one_minus_alpha: [n] float32 roots of alpha_prod_t and 1 - alpha_prod_t.
    original_coeff, sample_coeff: [n] float32 weights of the predicted x0 and of x_t in the
      posterior mean (DDPM paper eq. 7).
    noise_std: [n] float32 scale of the fresh noise (0 where t = 0).
  """

  timesteps: jnp.ndarray
  sqrt_alpha: jnp.ndarray
  sqrt_one_minus_alpha: jnp.ndarray
  original_coeff: jnp.ndarray
  sample_coeff: jnp.ndarray
  noise_std: jnp.ndarray


@dataclasses.dataclass(frozen=True)
class DDPMScheduler(Scheduler):
  """diffusers' `DDPMScheduler` with its fixed variance types (no learned variance)."""

  name = "ddpm"
  schedule_options = ("timesteps",)  # diffusers' pipe(timesteps=...)
  order = 1
  needs_noise = True

  _DEFAULTS = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "variance_type": "fixed_small",
    "clip_sample": True,
    "prediction_type": "epsilon",
    "thresholding": False,
    "dynamic_thresholding_ratio": 0.995,
    "clip_sample_range": 1.0,
    "sample_max_value": 1.0,
    "timestep_spacing": "leading",
    "steps_offset": 0,
    "rescale_betas_zero_snr": False,
  }
  _UNSUPPORTED = {"thresholding": False}

  @classmethod
  def from_config(cls, scheduler_config: dict[str, Any], **overrides):
    config = resolve_config(
      cls.name, cls._DEFAULTS, scheduler_config, unsupported=cls._UNSUPPORTED, overrides=overrides
    )
    check_discrete(cls.name, config, ("epsilon", "sample", "v_prediction"))
    # fixed_large_log would take the square root of a log (NaN in diffusers); the learned types
    # need a UNet that predicts its variance.
    check_choice(cls.name, "variance_type", config["variance_type"], _VARIANCE_TYPES)
    check_schedule_options(cls.name, config)
    return cls(config=hashable_config(config))

  def set_timesteps(self, num_inference_steps: int, sample_shape: tuple[int, ...] | None = None):
    del sample_shape  # no history
    config = self.cfg
    timesteps = custom_timesteps(config, num_inference_steps)
    if timesteps is None:
      timesteps = discrete_timesteps(config, num_inference_steps)
    else:  # as integers, as diffusers takes them
      timesteps = timesteps.astype(np.int64)
    alphas_cumprod = make_alphas_cumprod(config)
    # The previous timestep is the next entry of the schedule, then "-1" (alpha_prod = 1).
    prev_timesteps = np.concatenate([timesteps[1:], [-1]])
    alpha = alphas_cumprod[timesteps]
    alpha_prev = alpha_prod_at(alphas_cumprod, prev_timesteps, np.float32(1.0))
    beta, beta_prev = 1 - alpha, 1 - alpha_prev
    current_alpha = alpha / alpha_prev
    current_beta = 1 - current_alpha
    variance_type = config["variance_type"]
    with np.errstate(divide="ignore"):
      if variance_type == "fixed_large":
        std = np.sqrt(current_beta)
      else:
        variance = np.maximum((1 - alpha_prev) / (1 - alpha) * current_beta, np.float32(1e-20))
        if variance_type == "fixed_small":
          std = np.sqrt(variance)
        else:  # fixed_small_log: diffusers' exp(0.5 * log(variance)), already a std
          std = np.exp(np.float32(0.5) * np.log(variance))
    return DDPMState(
      timesteps=jnp.asarray(timesteps.astype(np.int32)),
      sqrt_alpha=f32(np.sqrt(alpha)),
      sqrt_one_minus_alpha=f32(np.sqrt(beta)),
      original_coeff=f32(np.sqrt(alpha_prev) * current_beta / beta),
      sample_coeff=f32(np.sqrt(current_alpha) * beta_prev / beta),
      noise_std=f32(np.where(timesteps > 0, std, 0)),
    )

  def init_noise_sigma(self, state):
    del state
    return 1.0

  def step(self, state, model_output, i, sample, noise=None):
    if noise is None:
      raise ValueError("ddpm needs `noise` (unit Gaussian, sample shape) at every step")
    config = self.cfg
    x = sample.astype(jnp.float32)
    out = model_output.astype(jnp.float32)
    pred_original, _ = predict_original_and_noise(
      config["prediction_type"], x, out, state.sqrt_alpha[i], state.sqrt_one_minus_alpha[i])
    if config["clip_sample"]:
      limit = config["clip_sample_range"]
      pred_original = jnp.clip(pred_original, -limit, limit)
    mean = rounded(state.original_coeff[i] * pred_original) + rounded(state.sample_coeff[i] * x)
    # At t = 0 diffusers adds nothing; a zero std adds an exact zero here.
    prev = mean + rounded(state.noise_std[i] * noise.astype(jnp.float32))
    return prev.astype(sample.dtype), state

  add_noise = add_noise_vp
