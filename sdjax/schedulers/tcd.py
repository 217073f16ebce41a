"""Trajectory consistency distillation sampling (Zheng et al. 2024), as diffusers' `TCDScheduler`.

The sampler of TCD-LoRA and Hyper-SD: LCM's timesteps (`lcm.lcm_timesteps`), but each step
predicts x0 and the noise, moves deterministically to an intermediate timestep
s = floor((1 - gamma) * t_prev), and with gamma > 0 noises from s forward to t_prev (not after the
last step). gamma is diffusers' `step(eta=...)`, sdjax's `eta` option (0 by default, as
diffusers' pipelines pass it; TCD's authors suggest 0.3). Per-position scalars on the host in
float32 numpy, as in `ddim.py`.
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
  rounded,
)
from sdjax.schedulers.ddim import EtaInState, add_noise_vp, f32, predict_original_and_noise
from sdjax.schedulers.lcm import LCMScheduler, lcm_timesteps, resolve_lcm_config


@struct.dataclass
class TCDState:
  """A TCD run: per-position coefficients.

  Attributes:
    timesteps: [n] int32, the t fed to the UNet at each position.
    sqrt_alpha, sqrt_one_minus_alpha: [n] roots of alpha_prod_t and 1 - alpha_prod_t.
    sqrt_alpha_s, sqrt_one_minus_alpha_s: [n] the same at the intermediate timestep s.
    forward_coeff, noise_std: [n] sqrt(alpha_prev / alpha_s) and sqrt(1 - alpha_prev / alpha_s),
      from s forward to the next timestep (1 and 0 where no noise is added: gamma 0, the end).
  """

  timesteps: jnp.ndarray
  sqrt_alpha: jnp.ndarray
  sqrt_one_minus_alpha: jnp.ndarray
  sqrt_alpha_s: jnp.ndarray
  sqrt_one_minus_alpha_s: jnp.ndarray
  forward_coeff: jnp.ndarray
  noise_std: jnp.ndarray


@dataclasses.dataclass(frozen=True)
class TCDScheduler(EtaInState, Scheduler):
  """diffusers' `TCDScheduler` (without thresholding); `eta` is its gamma."""

  name = "tcd"
  schedule_options = ("timesteps",)  # diffusers' pipe(timesteps=...)
  order = 1

  _DEFAULTS = LCMScheduler._DEFAULTS  # the same config as LCM's
  _UNSUPPORTED = LCMScheduler._UNSUPPORTED

  @classmethod
  def from_config(cls, scheduler_config: dict[str, Any], **overrides):
    # eta (gamma) is an argument of diffusers' step, not of its config: only an override sets it.
    eta = float(overrides.pop("eta", 0.0))
    if not 0 <= eta <= 1:
      raise SchedulerConfigError(f"scheduler {cls.name!r}: eta (gamma) must be in [0, 1], "
                                 f"got {eta}")
    config = resolve_lcm_config(cls, scheduler_config, overrides)
    config["eta"] = eta
    return cls(config=hashable_config(config))

  def set_timesteps(self, num_inference_steps: int, sample_shape: tuple[int, ...] | None = None):
    del sample_shape  # no history
    config = self.cfg
    eta = config["eta"]
    timesteps = lcm_timesteps(config, num_inference_steps, self.name)
    alphas_cumprod = make_alphas_cumprod(config)
    prev = np.concatenate([timesteps[1:], [0]])  # diffusers: t = 0 after the last
    s = np.floor(prev.astype(np.float32) * np.float32(1 - eta)).astype(np.int64)
    alpha, alpha_s, alpha_prev = alphas_cumprod[timesteps], alphas_cumprod[s], alphas_cumprod[prev]
    ratio = alpha_prev / alpha_s
    noised = (np.arange(len(timesteps)) < len(timesteps) - 1) & (eta > 0)
    return TCDState(
      timesteps=jnp.asarray(timesteps.astype(np.int32)),
      sqrt_alpha=f32(np.sqrt(alpha)),
      sqrt_one_minus_alpha=f32(np.sqrt(1 - alpha)),
      sqrt_alpha_s=f32(np.sqrt(alpha_s)),
      sqrt_one_minus_alpha_s=f32(np.sqrt(1 - alpha_s)),
      forward_coeff=f32(np.where(noised, np.sqrt(ratio), 1)),
      noise_std=f32(np.where(noised, np.sqrt(1 - ratio), 0)),
    )

  def init_noise_sigma(self, state):
    del state
    return 1.0

  def step(self, state, model_output, i, sample, noise=None):
    config = self.cfg
    x = sample.astype(jnp.float32)
    out = model_output.astype(jnp.float32)
    pred_original, pred_epsilon = predict_original_and_noise(
      config["prediction_type"], x, out, state.sqrt_alpha[i], state.sqrt_one_minus_alpha[i])
    noised = rounded(state.sqrt_alpha_s[i] * pred_original) + rounded(
      state.sqrt_one_minus_alpha_s[i] * pred_epsilon)
    if self.needs_noise:
      if noise is None:
        raise ValueError("tcd with eta > 0 needs `noise` (unit Gaussian, sample shape) each step")
      # The last position: 1 * x_s + 0 * noise, x_s exactly.
      noised = rounded(state.forward_coeff[i] * noised) + rounded(
        state.noise_std[i] * noise.astype(jnp.float32))
    return noised.astype(sample.dtype), state

  add_noise = add_noise_vp
