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
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from sdjax.schedulers.common import rounded, true_divide
from sdjax.schedulers.euler import as_f32, predict_original
from sdjax.schedulers.kdpm2 import KDPM2AncestralDiscreteScheduler


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
