"""DPM-Solver++(2S) ancestral (Lu et al. 2022; k-diffusion's `sample_dpmpp_2s_ancestral`, A1111's
"DPM++ 2S a"), which diffusers does not have.

Its steps are DPM2-ancestral's (`kdpm2`): two model calls per step but the last, the first at
sigma_i, the second at the log-midpoint s of sigma_i and sigma_down, then fresh noise of scale
sigma_up. The first stage is the same move in both (the exponential integrator's step to s,
(s / sigma_i) x + (1 - s / sigma_i) x0, is the Euler step to s); the second differs: DPM++ goes
from x to sigma_down along the line through x and the midpoint's denoised x0(s),
(sigma_down / sigma_i) x + (1 - sigma_down / sigma_i) x0(s), where DPM2 takes the slope measured
at the midpoint sample. The last step (sigma_down = 0) is one Euler step to the denoised image.

The noise levels are placed as Euler's (its spacing options; A1111's schedule types), the
midpoints' timesteps unrounded as k-diffusion's denoiser reads them.

`dpmpp_2s_ancestral_cfg_pp` is ComfyUI's CFG++ form (`takes_uncond`): each stage moves x shifted
by the guided minus the unconditional x0, (sigma_s / sigma_i) (x + x0 - x0_uncond) - expm1(-h/2)
x0, its second stage shifting by the first call's guided x0 minus the second call's
unconditional one (as its loop reads them), its coefficients ComfyUI's float32 scalars.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
from flax import struct

from sdjax.schedulers.common import exp_f32, expm1_f32, log_f32, rounded, true_divide
from sdjax.schedulers.euler import as_f32, predict_original
from sdjax.schedulers.kdpm2 import KDPM2AncestralDiscreteScheduler, KDPM2State


@dataclasses.dataclass(frozen=True)
class DPMSolver2SAncestralScheduler(KDPM2AncestralDiscreteScheduler):
  """DPM++ 2S a over DPM2-ancestral's positions (see the module docstring)."""

  name = "dpmpp_2s_ancestral"
  round_karras_timesteps = False
  a1111_discards = False  # A1111's DPM++ 2S a keeps every level: k_diffusion changes nothing

  def step(self, state, model_output, i, sample, noise=None):
    if noise is None:
      raise ValueError(f"{self.name} adds fresh noise every step: pass noise=")
    sample32 = as_f32(sample)
    pred_original = predict_original(self.prediction_type, as_f32(model_output), sample32,
                                     state.sigma_in[i], state.v_out[i], state.v_den[i])
    first = i % 2 == 0
    # A first stage moves its own sample; a second, the step's start (prev_sample, at the
    # sigma its first stage saw) towards the midpoint's x0.
    start = jnp.where(first, sample32, state.prev_sample)
    sigma = state.sigma_in[jnp.where(first, i, i - 1)]
    derivative = true_divide(start - pred_original, sigma)
    prev_sample = start + rounded(derivative * state.dt[i])
    prev_sample = prev_sample + rounded(as_f32(noise) * state.sigma_up[i])
    new_state = state.replace(prev_sample=start)
    return prev_sample.astype(sample.dtype), new_state


@struct.dataclass
class CFGPP2SState(KDPM2State):
  """`KDPM2State` and the CFG++ form's per-position weights [P, 3] (on the shifted sample, on
  x0, and 1 where the call is the last step's, which lands on x0), and the step's first x0."""

  weights: jnp.ndarray
  first_x0: jnp.ndarray


@dataclasses.dataclass(frozen=True)
class DPMSolver2SAncestralCFGPPScheduler(DPMSolver2SAncestralScheduler):
  """ComfyUI's `dpmpp_2s_ancestral_cfg_pp` (see the module docstring)."""

  name = "dpmpp_2s_ancestral_cfg_pp"
  takes_uncond = True

  def _ends(self, sigmas: np.ndarray):
    """Per step (float32): t = -log sigma, t at sigma_down, and the midpoint t + h / 2."""
    _, down, _ = super()._stages(sigmas)
    with np.errstate(divide="ignore", invalid="ignore"):
      t, t_next = -log_f32(sigmas), -log_f32(down)
      return t, t_next, t + np.float32(0.5) * (t_next - t), down

  def _stages(self, sigmas: np.ndarray):
    """Its midpoint: exp(-(t + h / 2)), as its loop computes it."""
    mid, down, up = super()._stages(sigmas)
    _, _, s, _ = self._ends(sigmas)
    with np.errstate(over="ignore"):
      mid = np.where(np.isfinite(s), exp_f32(-s), mid).astype(np.float32)
    return mid, down, up

  def set_timesteps(self, num_inference_steps: int, sample_shape: tuple[int, ...] | None = None):
    base = super().set_timesteps(num_inference_steps, sample_shape)
    _, sigmas, _ = self._schedule(num_inference_steps)
    t, t_next, s, down = self._ends(sigmas)
    n = len(sigmas) - 1
    weights = np.zeros((2 * n - 1, 3), np.float32)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
      start = exp_f32(-t)
      h = t_next - t
      for k in range(n):
        if down[k] == 0:  # its Euler step to 0: x0
          weights[2 * k] = (0, 0, 1)
          continue
        weights[2 * k] = (exp_f32(-s[k]) / start[k], expm1_f32(-h[k] * np.float32(0.5)), 0)
        weights[2 * k + 1] = (exp_f32(-t_next[k]) / start[k], expm1_f32(-h[k]), 0)
    return CFGPP2SState(**{k: getattr(base, k) for k in base.__dataclass_fields__},
                        weights=jnp.asarray(weights),
                        first_x0=jnp.zeros(sample_shape, jnp.float32))

  def step(self, state, model_output, i, sample, noise=None, uncond=None):
    if noise is None:
      raise ValueError(f"{self.name} adds fresh noise every step: pass noise=")
    if uncond is None:
      raise ValueError(f"{self.name} shifts along the unconditional prediction: pass `uncond`")
    x = as_f32(sample)
    sigma = state.sigma_in[i]
    x0 = predict_original(self.prediction_type, as_f32(model_output), x, sigma, state.v_out[i],
                          state.v_den[i])
    x0_uncond = predict_original(self.prediction_type, as_f32(uncond), x, sigma,
                                 state.v_out[i], state.v_den[i])
    first = i % 2 == 0
    start = jnp.where(first, x, state.prev_sample)
    first_x0 = jnp.where(first, x0, state.first_x0)
    on_shifted, on_x0, last = (state.weights[i][k] for k in range(3))
    moved = rounded(on_shifted * (start + rounded(first_x0 - x0_uncond))) - rounded(on_x0 * x0)
    prev = jnp.where(last > 0, x0, moved) + rounded(as_f32(noise) * state.sigma_up[i])
    return prev.astype(sample.dtype), state.replace(prev_sample=start, first_x0=first_x0)
