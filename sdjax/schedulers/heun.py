"""Heun's second-order sampler (Karras et al. 2022, algorithm 1), as diffusers' class.

diffusers interleaves the schedule so that each inference step but the last takes two model
calls: positions alternate between an Euler predictor (first stage) and a trapezoidal corrector
(second stage) that restarts from the sample the predictor started from. `2 * steps - 1`
positions in all; the state remembers which stage comes next.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
from flax import struct

from sdjax.schedulers.common import rounded, true_divide
from sdjax.schedulers.euler import (
  FirstStageChurn,
  SigmaScheduler,
  as_f32,
  init_sigma,
  input_scales,
  predict_original,
  sigma_schedule,
  train_alphas_cumprod,
  train_sigmas,
)
from sdjax.schedulers.sigma_schedules import (
  COMFYUI,
  DISCARD_PENULTIMATE,
  DOWNCAST_ALPHAS_CUMPROD,
  K_DIFFUSION,
  SGM_NOISE_MULTIPLIER,
  TIMESTEPS_OPTIONS,
  ZERO_SNR,
)


@struct.dataclass
class HeunState:
  """A Heun run. Per-position scalars are precomputed in float32 on the host.

  Attributes:
    timesteps: [2n - 1] float32, the t fed to the UNet at each position.
    sigmas: [2n] float32, interleaved noise levels: s0, s1, s1, ..., s_{n-1}, s_{n-1}, 0.
    init_sigma: [] float32, diffusers' `init_noise_sigma`.
    input_scale: [2n - 1] sqrt(sigma_i^2 + 1).
    v_out: [2n - 1] -sigma_i / sqrt(sigma_i^2 + 1).
    v_den: [2n - 1] sigma_i^2 + 1.
    dt: [2n - 1] sigma_{i+1} - sigma_i, the step a first stage at position i takes.
    sigma_in: [2n - 1] the level the model sees: sigma_i, or with churn a first stage's
      sigma_hat (`common.churn_levels`), from which its step starts; the arrays above are its.
    churn: [2n - 1] the churn noise's scale (first stages with churn; else 0).
    first_order: [] bool, whether the next step is a first (predictor) stage.
    prev_derivative: the predictor's derivative, for the corrector (sample shape, float32).
    prev_dt: [] the predictor's step.
    prev_sample: the sample the predictor started from (sample shape, float32).
  """

  timesteps: jnp.ndarray
  sigmas: jnp.ndarray
  init_sigma: jnp.ndarray
  input_scale: jnp.ndarray
  v_out: jnp.ndarray
  v_den: jnp.ndarray
  dt: jnp.ndarray
  first_order: jnp.ndarray
  prev_derivative: jnp.ndarray
  prev_dt: jnp.ndarray
  prev_sample: jnp.ndarray
  sigma_in: jnp.ndarray
  churn: jnp.ndarray


@dataclasses.dataclass(frozen=True)
class HeunDiscreteScheduler(FirstStageChurn, SigmaScheduler):
  """diffusers' `HeunDiscreteScheduler`. Scaling, add_noise and init sigma are Euler's. With the
  s_churn option k-diffusion's `sample_heun` churn (`common.S_CHURN`: A1111's Heun), at each
  step's first stage."""

  name = "heun"
  # diffusers' pipe(timesteps=...) too; k_diffusion changes nothing (`sigma_schedules`)
  schedule_options = (*TIMESTEPS_OPTIONS, K_DIFFUSION, COMFYUI, SGM_NOISE_MULTIPLIER,
                      DOWNCAST_ALPHAS_CUMPROD, ZERO_SNR, DISCARD_PENULTIMATE)
  order = 2

  _DEFAULTS = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "linear",
    "trained_betas": None,
    "prediction_type": "epsilon",
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "clip_sample": False,
    "clip_sample_range": 1.0,
    "timestep_spacing": "linspace",
    "steps_offset": 0,
  }
  _PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")

  def set_timesteps(self, num_inference_steps: int, sample_shape: tuple[int, ...] | None = None):
    if sample_shape is None:
      raise ValueError(
        "heun keeps the predictor's sample between its two stages: pass "
        "set_timesteps(num_inference_steps, sample_shape=latents.shape)"
      )
    config = self.cfg
    alphas_cumprod = train_alphas_cumprod(config)
    timesteps, sigmas = sigma_schedule(config, num_inference_steps, alphas_cumprod,
                                       name=self.name)
    sigmas = sigmas.astype(np.float32)
    hat, churn, hat_t = self._churned(config, sigmas[:-1], len(sigmas) - 1, timesteps,
                                      np.log(train_sigmas(alphas_cumprod)))
    sigmas = np.concatenate([sigmas[:1], np.repeat(sigmas[1:-1], 2), sigmas[-1:]])
    timesteps = timesteps.astype(np.float32)
    timesteps = np.concatenate([timesteps[:1], np.repeat(timesteps[1:], 2)])
    # Both stages at position i evaluate x0 at sigma_i: the predictor's sigma_hat is sigmas[i]
    # (with churn its own, first stages only) and the corrector's sigma_next is sigmas[i] too.
    sigma = sigmas[:-1].copy()
    sigma[0::2], timesteps[0::2] = hat, hat_t
    scale = input_scales(sigma)
    zeros = jnp.zeros(sample_shape, jnp.float32)
    return HeunState(
      timesteps=jnp.asarray(timesteps),
      sigmas=jnp.asarray(sigmas),
      init_sigma=jnp.asarray(init_sigma(config, sigmas)),
      input_scale=jnp.asarray(scale),
      v_out=jnp.asarray(-sigma / scale),
      v_den=jnp.asarray(sigma**2 + 1),
      dt=jnp.asarray(sigmas[1:] - sigma),
      first_order=jnp.asarray(True),
      prev_derivative=zeros,
      prev_dt=jnp.zeros((), jnp.float32),
      prev_sample=zeros,
      sigma_in=jnp.asarray(sigma),
      churn=jnp.asarray(self.first_stages(churn)),
    )

  def step(self, state, model_output, i, sample, noise=None):
    del noise
    config = self.cfg
    sample32 = as_f32(sample)
    sigma = state.sigma_in[i]
    pred_original = predict_original(
      config["prediction_type"],
      as_f32(model_output),
      sample32,
      sigma,
      state.v_out[i],
      state.v_den[i],
    )
    if config["clip_sample"]:
      limit = config["clip_sample_range"]
      pred_original = jnp.clip(pred_original, -limit, limit)
    derivative = true_divide(sample32 - pred_original, sigma)
    first = state.first_order
    # The corrector averages its slope with the predictor's and redoes the predictor's step.
    slope = jnp.where(first, derivative, (state.prev_derivative + derivative) / 2)
    dt = jnp.where(first, state.dt[i], state.prev_dt)
    start = jnp.where(first, sample32, state.prev_sample)
    prev_sample = start + rounded(slope * dt)
    new_state = state.replace(
      first_order=jnp.logical_not(first),
      prev_derivative=derivative,
      prev_dt=state.dt[i],
      prev_sample=sample32,
    )
    return prev_sample.astype(sample.dtype), new_state
