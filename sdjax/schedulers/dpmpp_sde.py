"""DPM-Solver++ (stochastic, second order, single step): A1111's "DPM++ SDE (Karras)", as
diffusers' `DPMSolverSDEScheduler`.

Each step but the last takes two model calls, interleaved as Heun's: a stochastic DPM-Solver++
step from sigma_i to the log-midpoint sigma_mid (first stage), then, from the sample the first
stage started from, the whole step to sigma_{i+1} with the data prediction made at sigma_mid
(second stage); each adds noise of scale sigma_up, as an ancestral step. The last step is an
Euler step to sigma 0. `2 * steps - 1` positions; even positions are first stages.

The noise. diffusers draws it from a Brownian motion W over sigma (torchsde's Brownian tree,
seeded per batch): the first stage takes the normalised increment over [sigma_mid, sigma_i], the
second the one over [sigma_{i+1}, sigma_i], which contains the first. sdjax draws a fresh unit
normal z at every position (from each image's seed, as every stochastic scheduler here) and
builds the same joint law: the first stage uses z_first, the second
(sqrt(sigma_i - sigma_mid) z_first + sqrt(sigma_mid - sigma_{i+1}) z_second) / sqrt(sigma_i -
sigma_{i+1}). Steps use disjoint intervals, so their noises are independent, as W's. The
pixels differ from diffusers' (another random source), the distribution does not; the
arithmetic is checked against diffusers given the same noise. diffusers' `noise_sampler_seed`
(one tree for the whole batch) is accepted and has no effect: each image's seed decides. With
generate's `brownian` the noise is that tree itself (`sdjax.brownian_tree`, one per image), each
stage taking its own query's answer (`brownian_state`).

diffusers' loop is k-diffusion's `sample_dpmpp_sde` (A1111's): `k_diffusion` changes nothing;
`comfyui` starts from ComfyUI's noise scale and feeds the UNet whole timesteps, the midpoints'
too (tests/test_k_diffusion.py).
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
  sigma_to_t,
  true_divide,
)
from sdjax.schedulers.euler import (
  ANCESTRAL_ETA,
  SigmaScheduler,
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
  SGM_NOISE_MULTIPLIER,
  ZERO_SNR,
)

_F32 = np.float32


@struct.dataclass
class DPMSolverSDEState:
  """A DPM++ SDE run; per-position arrays have one entry per model call ([2n - 1]).

  Attributes:
    timesteps: float32, the t fed to the UNet (a second stage's is its midpoint's).
    sigmas: float32, diffusers' interleaved sigmas (s0, s1, s1, ..., 0): img2img's noise level.
    init_sigma: [] float32, diffusers' `init_noise_sigma`.
    sigma_in: the noise level the model sees (sigma_i, or the midpoint at a second stage).
    input_scale, v_out, v_den: sqrt(sigma_in^2 + 1), -sigma_in / that, sigma_in^2 + 1.
    c_sample, c_x0: the update's weights, x' = c_sample * x - c_x0 * x0 (+ noise).
    sigma_up: the fresh noise's scale.
    noise_first, noise_second: a second stage's weights on the first stage's unit noise and on
      its own (first stages: 0 and 1).
    prev_sample: the sample the current step's first stage started from.
    prev_noise: the first stage's unit noise.
  """

  timesteps: jnp.ndarray
  sigmas: jnp.ndarray
  init_sigma: jnp.ndarray
  sigma_in: jnp.ndarray
  input_scale: jnp.ndarray
  v_out: jnp.ndarray
  v_den: jnp.ndarray
  c_sample: jnp.ndarray
  c_x0: jnp.ndarray
  sigma_up: jnp.ndarray
  noise_first: jnp.ndarray
  noise_second: jnp.ndarray
  prev_sample: jnp.ndarray
  prev_noise: jnp.ndarray


def _ancestral(t: np.ndarray, t_to: np.ndarray, eta: float = 1.0):
  """diffusers' step from log-time t to t_to (float32, its order of operations): (c_sample,
  c_x0, sigma_up), with x' = c_sample * x - c_x0 * x0 + sigma_up * noise; the fresh noise's
  share `eta` as k-diffusion's `get_ancestral_step` takes it (0: none)."""
  sigma_from, sigma_to = exp_f32(-t), exp_f32(-t_to)
  up = np.sqrt(sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2)
  up = np.minimum(sigma_to, up if eta == 1 else _F32(eta) * up)
  down = sigma_to if eta == 0 else np.sqrt(sigma_to**2 - up**2)
  ancestral_t = -log_f32(down)
  c_sample = exp_f32(-ancestral_t) / sigma_from
  c_x0 = np.expm1((t - ancestral_t).astype(np.float64)).astype(_F32)
  return c_sample, c_x0, up


def _tree_points(s: np.ndarray, s_next: np.ndarray):
  """float32 (sigma, sigma_next, sigma_mid) of each two-stage step from s to s_next as
  k-diffusion's and diffusers' loops call the noise sampler with them: exp(-t) of log-times."""
  with np.errstate(divide="ignore", invalid="ignore"):
    t, t_next = -log_f32(s), -log_f32(s_next)
    t_mid = t + (t_next - t) * _F32(0.5)
    return exp_f32(-t), exp_f32(-t_next), exp_f32(-t_mid)


@dataclasses.dataclass(frozen=True)
class DPMSolverSDEScheduler(SigmaScheduler):
  """diffusers' `DPMSolverSDEScheduler` (A1111's "DPM++ SDE"), with a Brownian-consistent noise
  of sdjax's own (see the module docstring)."""

  name = "dpmpp_sde"
  order = 2
  needs_noise = True
  generator_noise = False  # diffusers' Brownian tree takes `noise_sampler_seed`, or a random one
  # k_diffusion changes nothing (diffusers' loop is k-diffusion's, tests/test_k_diffusion.py);
  # comfyui: ComfyUI's start and whole timesteps, the midpoints' too
  schedule_options = (*SCHEDULE_OPTIONS, K_DIFFUSION, COMFYUI, SGM_NOISE_MULTIPLIER,
                      DOWNCAST_ALPHAS_CUMPROD, ANCESTRAL_ETA, ZERO_SNR, DISCARD_PENULTIMATE)

  _DEFAULTS = {
    S_NOISE: 1.0,  # k-diffusion's (`common.S_NOISE`), not diffusers'
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "linear",
    "trained_betas": None,
    "prediction_type": "epsilon",
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "noise_sampler_seed": None,
    "timestep_spacing": "linspace",
    "steps_offset": 0,
  }
  # diffusers raises NotImplementedError for "sample".
  _PREDICTION_TYPES = ("epsilon", "v_prediction")

  @classmethod
  def _validate(cls, config: dict[str, Any]) -> None:
    super()._validate(config)
    check_ancestral_eta(cls.name, config)

  def set_timesteps(self, num_inference_steps: int, sample_shape: tuple[int, ...] | None = None):
    if sample_shape is None:
      raise ValueError(
        "dpmpp_sde keeps the first stage's sample for the second: pass "
        "set_timesteps(num_inference_steps, sample_shape=latents.shape)")
    config = self.cfg
    n = num_inference_steps
    alphas_cumprod = train_alphas_cumprod(config)
    timesteps, sigmas64 = sigma_schedule(config, n, alphas_cumprod, name=self.name)
    # The midpoints' timesteps, from the float64 sigmas as diffusers' `_second_order_timesteps`.
    with np.errstate(divide="ignore"):
      lt = -np.log(sigmas64[:-1])
    log_sigmas = np.log(train_sigmas(alphas_cumprod))
    mid_t = sigma_to_t(np.exp(-(lt[:-1] + np.diff(lt) * 0.5)), log_sigmas)
    sigmas = sigmas64.astype(_F32)
    s, s_next = sigmas[:n - 1], sigmas[1:n]  # the two-stage steps (all but the last)
    with np.errstate(divide="ignore", invalid="ignore"):
      t, t_next = -log_f32(s), -log_f32(s_next)
      t_mid = t + (t_next - t) * _F32(0.5)
      mid = exp_f32(-t_mid)
      eta = config.get(ANCESTRAL_ETA, 1.0)
      first = _ancestral(t, t_mid, eta)
      second = _ancestral(t, t_next, eta)
      # the Brownian increments, over the sigmas diffusers' noise sampler is called with
      hi, lo, md = (x.astype(np.float64) for x in _tree_points(s, s_next))
      w_first = np.sqrt((hi - md) / (hi - lo)).astype(_F32)
      w_second = np.sqrt((md - lo) / (hi - lo)).astype(_F32)
    p = 2 * n - 1

    def positions(even, odd, last):
      out = np.empty(p, _F32)
      out[0:-1:2], out[1::2], out[-1] = even, odd, last
      return out

    sigma_in = positions(s, mid, sigmas[n - 1])
    scale = input_scales(sigma_in)
    if config.get(COMFYUI):  # the whole timestep nearest the sigma ComfyUI calls the model at
      mid_t = nearest_t(mid, log_sigmas)
    t_all = np.empty(p, np.float64)
    t_all[0::2], t_all[1::2] = timesteps, mid_t
    return DPMSolverSDEState(
      timesteps=jnp.asarray(t_all.astype(_F32)),
      sigmas=jnp.asarray(np.concatenate([sigmas[:1], np.repeat(sigmas[1:-1], 2), sigmas[-1:]])),
      init_sigma=jnp.asarray(init_sigma(config, sigmas)),
      sigma_in=jnp.asarray(sigma_in),
      input_scale=jnp.asarray(scale),
      v_out=jnp.asarray(-sigma_in / scale),
      v_den=jnp.asarray(sigma_in**2 + 1),
      c_sample=jnp.asarray(positions(first[0], second[0], 0)),
      c_x0=jnp.asarray(positions(first[1], second[1], 0)),
      sigma_up=jnp.asarray(positions(first[2], second[2], 0)),
      noise_first=jnp.asarray(positions(0, w_first, 0)),
      noise_second=jnp.asarray(positions(1, w_second, 0)),
      prev_sample=jnp.zeros(sample_shape, jnp.float32),
      prev_noise=jnp.zeros(sample_shape, jnp.float32),
    )

  def brownian_queries(self, state):
    sigmas = np.asarray(state.sigmas, _F32)  # s0, s1, s1, ..., s_{n-1}, s_{n-1}, 0
    levels = np.concatenate([sigmas[:1], sigmas[1:-1:2]])  # s0 .. s_{n-1}
    hi, lo, md = _tree_points(levels[:-1], levels[1:])
    queries = []
    for k in range(len(levels) - 1):  # a step's stages: to its midpoint, then to its end
      queries += [(hi[k], md[k]), (hi[k], lo[k])]
    return queries + [None]  # the last step (to 0) adds none

  def brownian_state(self, state):
    # each stage takes its own query's answer, not a mix of the first stage's and its own
    return state.replace(noise_first=jnp.zeros_like(state.noise_first),
                         noise_second=jnp.ones_like(state.noise_second))

  def step(self, state, model_output, i, sample, noise=None):
    if noise is None:
      raise ValueError("dpmpp_sde adds fresh noise every step: pass noise=")
    sample32, noise32 = as_f32(sample), as_f32(noise)
    sigma = state.sigma_in[i]
    x0 = predict_original(self.prediction_type, as_f32(model_output), sample32, sigma,
                          state.v_out[i], state.v_den[i])
    first = i % 2 == 0
    start = jnp.where(first, sample32, state.prev_sample)
    unit = rounded(state.noise_first[i] * state.prev_noise) + rounded(
      state.noise_second[i] * noise32)
    prev_sample = rounded(state.c_sample[i] * start) - rounded(state.c_x0[i] * x0)
    prev_sample = prev_sample + rounded(unit * state.sigma_up[i])
    # The last step (to sigma 0): Euler, no noise.
    last = i == state.timesteps.shape[0] - 1
    euler = sample32 + rounded(true_divide(sample32 - x0, sigma) * -sigma)
    prev_sample = jnp.where(last, euler, prev_sample)
    new_state = state.replace(prev_sample=jnp.where(first, sample32, state.prev_sample),
                              prev_noise=jnp.where(first, noise32, state.prev_noise))
    return prev_sample.astype(sample.dtype), new_state
