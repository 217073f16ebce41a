"""DPM-Solver-2 (Karras et al. 2022's "DPM2" sampler, A1111's "DPM2" / "DPM2 a"), as diffusers'
`KDPM2DiscreteScheduler` and `KDPM2AncestralDiscreteScheduler`.

Each step but the last takes two model calls, interleaved as diffusers interleaves them (like
Heun's): an Euler step from sigma_i to the log-midpoint sigma_mid (first stage), then, from the
sample the first stage started from, the whole step with the slope measured at sigma_mid
(second stage). The ancestral form aims the second stage at sigma_down and adds fresh noise of
scale sigma_up, as Euler-ancestral does; its midpoint lies between sigma_i and sigma_down. The
last step is the first stage alone: an Euler step to sigma 0. `2 * steps - 1` positions in all;
even positions are first stages (img2img starts at one).

Every per-position scalar is computed on the host in float32, in diffusers' order of operations
(its log-midpoint is torch's `lerp` at weight 0.5: end - (end - start) * 0.5).

sdjax's `k_diffusion` option makes them A1111's DPM2 and DPM2 a, which run k-diffusion's loops:
the UNet sees fractional Karras timesteps (diffusers rounds them), and the levels are those of
one step more less the last above 0 (A1111's `discard_next_to_last_sigma`, always on for these
two), unless the `sigmas` option gives them. The `comfyui` option makes them ComfyUI's dpm_2,
dpm_2_ancestral (and dpmpp_2s_ancestral's): its levels, start and whole timesteps, the midpoints'
too, the penultimate level dropped only with `discard_penultimate_sigma` (its KSampler's).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import struct

from sdjax.schedulers.common import (
  S_NOISE,
  exp_f32,
  log_f32,
  nearest_t,
  rounded,
  sigma_spacing,
  sigma_to_t,
  true_divide,
)
from sdjax.schedulers.euler import (
  ANCESTRAL_ETA,
  FirstStageChurn,
  SigmaScheduler,
  ancestral_step,
  as_f32,
  check_ancestral_eta,
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
  SCHEDULE_OPTIONS,
  ZERO_SNR,
)

_F32 = np.float32


@struct.dataclass
class KDPM2State:
  """A DPM2 run; per-position arrays have one entry per model call ([2n - 1]).

  Attributes:
    timesteps: float32, the t fed to the UNet (a second stage's is its midpoint's).
    sigmas: float32, diffusers' interleaved sigmas (s0, s1, s1, ...): img2img's noise level.
    init_sigma: [] float32, diffusers' `init_noise_sigma`.
    sigma_in: the noise level the model sees at each position (sigma_i, or the midpoint).
    input_scale: sqrt(sigma_in^2 + 1).
    v_out: -sigma_in / input_scale.
    v_den: sigma_in^2 + 1.
    dt: the step a position takes in sigma (first stage: to the midpoint; second: the whole
      step, to sigma_{i+1} or sigma_down).
    sigma_up: the fresh noise's scale (a second stage of the ancestral form; else 0).
    prev_sample: the sample the current step's first stage started from (sample shape).
    churn: the churn noise's scale (first stages with churn, `common.churn_levels`: their
      sigma_in is sigma_hat, from which the step and its midpoint start; else 0).
  """

  timesteps: jnp.ndarray
  sigmas: jnp.ndarray
  init_sigma: jnp.ndarray
  sigma_in: jnp.ndarray
  input_scale: jnp.ndarray
  v_out: jnp.ndarray
  v_den: jnp.ndarray
  dt: jnp.ndarray
  sigma_up: jnp.ndarray
  prev_sample: jnp.ndarray
  churn: jnp.ndarray


def _log_midpoint(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """exp(torch.lerp(log a, log b, 0.5)) in float32 (NaN where both ends are infinite)."""
  with np.errstate(invalid="ignore", over="ignore"):
    start, end = log_f32(a), log_f32(b)
    return exp_f32(end - (end - start) * _F32(0.5))


def _interleave(x: np.ndarray) -> np.ndarray:
  """diffusers' `cat([x[:1], x[1:].repeat_interleave(2), x[-1:]])`."""
  return np.concatenate([x[:1], np.repeat(x[1:], 2), x[-1:]])


@dataclasses.dataclass(frozen=True)
class KDPM2DiscreteScheduler(FirstStageChurn, SigmaScheduler):
  """diffusers' `KDPM2DiscreteScheduler` (A1111's "DPM2"); with the s_churn option (the
  non-ancestral form) k-diffusion's `sample_dpm_2` churn (`common.S_CHURN`)."""

  name = "kdpm2"
  order = 2
  ancestral = False
  round_karras_timesteps = True  # a diffusers quirk (k-diffusion's timesteps are fractional)
  a1111_discards = True  # with k_diffusion: A1111 drops the penultimate level
  schedule_options = (*SCHEDULE_OPTIONS, K_DIFFUSION, COMFYUI, DOWNCAST_ALPHAS_CUMPROD, ZERO_SNR,
                      DISCARD_PENULTIMATE)

  _DEFAULTS = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "linear",
    "trained_betas": None,
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "prediction_type": "epsilon",
    "timestep_spacing": "linspace",
    "steps_offset": 0,
  }
  # diffusers raises NotImplementedError for "sample".
  _PREDICTION_TYPES = ("epsilon", "v_prediction")

  def _schedule(self, num_inference_steps: int):
    """(float timesteps [n], float32 sigmas [n + 1] ending in 0, float32 log training sigmas)."""
    config = self.cfg
    alphas_cumprod = train_alphas_cumprod(config)
    a1111 = bool(config.get(K_DIFFUSION))
    # A1111's always drops the penultimate level; ComfyUI's only under its KSampler (the option)
    discard = (a1111 and not config.get(COMFYUI) and self.a1111_discards
               and config.get("sigmas") is None)
    if discard:
      config = {**config, DISCARD_PENULTIMATE: True}
    timesteps, sigmas = sigma_schedule(config, num_inference_steps, alphas_cumprod,
                                       name=self.name)
    if self.round_karras_timesteps and not a1111 and sigma_spacing(self.name, config) == "karras":
      timesteps = timesteps.round()  # unlike Euler's, these Karras timesteps are rounded
    return timesteps, sigmas.astype(_F32), np.log(train_sigmas(alphas_cumprod))

  def _stages(self, sigmas: np.ndarray):
    """Per step i (float32 [n + 1] each): (midpoint, second stage's target, sigma_up)."""
    return _log_midpoint(sigmas, np.roll(sigmas, 1)), sigmas[1:], np.zeros_like(sigmas)

  def set_timesteps(self, num_inference_steps: int, sample_shape: tuple[int, ...] | None = None):
    if sample_shape is None:
      raise ValueError(
        f"{self.name} keeps the first stage's sample for the second: pass "
        "set_timesteps(num_inference_steps, sample_shape=latents.shape)")
    timesteps, sigmas, log_sigmas = self._schedule(num_inference_steps)
    n = num_inference_steps
    mid, target, up = self._stages(sigmas)
    with np.errstate(divide="ignore"):  # ComfyUI's UNet: the whole timestep nearest the level
      mid_t = (nearest_t if self.cfg.get(COMFYUI) else sigma_to_t)(mid, log_sigmas)
    # Positions 2k (k = 0..n-1): first stages at sigma_k; 2k + 1 (k < n - 1): second stages at
    # the midpoint of step k. diffusers indexes its midpoints one step later in the
    # non-ancestral form (midpoint k + 1 lies between sigma_k and sigma_{k+1}).
    shift = 0 if self.ancestral else 1
    k = np.arange(n)
    s, m = sigmas[k], mid[k + shift]
    s, churn, t_first = self._churned(self.cfg, s, n, timesteps, log_sigmas)
    if churn.any():  # a churned step's midpoint: k-diffusion's, from sigma_hat (0 for the last)
      churned = churn > 0
      with np.errstate(invalid="ignore"):
        m = np.where(churned, np.where(sigmas[k + 1] > 0, _log_midpoint(s, sigmas[k + 1]), 0), m)
      m = m.astype(_F32)
      with np.errstate(divide="ignore"):
        hat_mid_t = (nearest_t if self.cfg.get(COMFYUI) else sigma_to_t)(m, log_sigmas)
      mid_t = mid_t.copy()
      mid_t[k + shift] = np.where(churned, hat_mid_t, mid_t[k + shift])
    sigma_in = np.empty(2 * n - 1, _F32)
    dt = np.empty(2 * n - 1, _F32)
    step_up = np.zeros(2 * n - 1, _F32)
    t = np.empty(2 * n - 1, np.float64)
    sigma_in[0::2], dt[0::2], t[0::2] = s, m - s, t_first
    sigma_in[1::2], dt[1::2] = m[:-1], target[:n - 1] - s[:-1]
    step_up[1::2] = up[:n - 1]
    # float32 fractional midpoint timesteps (float64 where diffusers' are: rounded Karras ones)
    t[1::2] = mid_t[k[:-1] + shift].astype(timesteps.dtype)
    scale = input_scales(sigma_in)
    return KDPM2State(
      timesteps=jnp.asarray(t.astype(_F32)),
      sigmas=jnp.asarray(_interleave(sigmas)),
      init_sigma=jnp.asarray(init_sigma(self.cfg, sigmas)),
      sigma_in=jnp.asarray(sigma_in),
      input_scale=jnp.asarray(scale),
      v_out=jnp.asarray(-sigma_in / scale),
      v_den=jnp.asarray(sigma_in**2 + 1),
      dt=jnp.asarray(dt),
      sigma_up=jnp.asarray(step_up),
      prev_sample=jnp.zeros(sample_shape, jnp.float32),
      churn=jnp.asarray(self.first_stages(churn)),
    )

  def step(self, state, model_output, i, sample, noise=None):
    if self.ancestral and noise is None:
      raise ValueError(f"{self.name} adds fresh noise every step: pass noise=")
    sample32 = as_f32(sample)
    sigma = state.sigma_in[i]
    pred_original = predict_original(self.prediction_type, as_f32(model_output), sample32,
                                     sigma, state.v_out[i], state.v_den[i])
    derivative = true_divide(sample32 - pred_original, sigma)
    first = i % 2 == 0
    start = jnp.where(first, sample32, state.prev_sample)
    prev_sample = start + rounded(derivative * state.dt[i])
    if self.ancestral:
      prev_sample = prev_sample + rounded(as_f32(noise) * state.sigma_up[i])
    new_state = state.replace(prev_sample=jnp.where(first, sample32, state.prev_sample))
    return prev_sample.astype(sample.dtype), new_state


@dataclasses.dataclass(frozen=True)
class KDPM2AncestralDiscreteScheduler(KDPM2DiscreteScheduler):
  """diffusers' `KDPM2AncestralDiscreteScheduler` (A1111's "DPM2 a"): noise after each step's
  second stage (none after the last step's lone first stage)."""

  name = "kdpm2_ancestral"
  needs_noise = True
  ancestral = True
  _DEFAULTS = {**KDPM2DiscreteScheduler._DEFAULTS, S_NOISE: 1.0}  # k-diffusion's, not diffusers'

  schedule_options = (*SCHEDULE_OPTIONS, K_DIFFUSION, COMFYUI, ANCESTRAL_ETA,
                      DOWNCAST_ALPHAS_CUMPROD, ZERO_SNR, DISCARD_PENULTIMATE)

  @classmethod
  def _validate(cls, config: dict[str, Any]) -> None:
    super()._validate(config)
    check_ancestral_eta(cls.name, config)

  def _stages(self, sigmas: np.ndarray):
    nxt = np.roll(sigmas, -1)
    nxt[-1] = 0.0
    down, up = ancestral_step(sigmas, nxt, self.cfg.get(ANCESTRAL_ETA, 1.0))
    down[-1] = 0.0
    mid = _log_midpoint(sigmas, down)
    mid[-2:] = 0.0
    return mid, down, up

  def noise_draw(self, i, positions: int):
    del positions
    return i // 2  # one draw per step, after its second stage (odd positions)
