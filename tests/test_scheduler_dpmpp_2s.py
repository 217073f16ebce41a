"""DPM++ 2S a (A1111's "DPM++ 2S a") against k-diffusion's `sample_dpmpp_2s_ancestral`.

diffusers has no such scheduler, so the reference is k-diffusion's loop written out in torch
float32 (`k_diffusion_reference`: its log-time steps and `expm1`; its denoiser reads a sigma's
timestep off the training sigmas in log space, unrounded), over sdjax's noise levels (diffusers'
Euler's placement, checked). Both see the same fake model and
the same noise, position by position: a midpoint's sample after a step's first model call, the
step's result after its second.
"""

from __future__ import annotations

import diffusers
import numpy as np
import pytest
import torch
from k_diffusion_reference import sample_dpmpp_2s_ancestral
from scheduler_harness import (
  SHAPE,
  correctly_rounded_sqrt,
  make_noises,
  max_rel_error,
  sdjax_trajectory,
)

from sdjax import outputs, testing
from sdjax.schedulers import get_scheduler

torch.set_num_threads(1)
SD15 = dict(testing.SCHEDULER_SD15)
TOL = 1e-6


def _nchw(x: np.ndarray) -> torch.Tensor:
  return torch.from_numpy(np.ascontiguousarray(x))


def _step_sigmas(state) -> np.ndarray:
  """The run's n + 1 noise levels: sigma_i at the first stages, then the last.

  The reference steps over ours, not diffusers' Euler's (which they match to an ulp, checked):
  with few steps sigma_down = sqrt(sigma_next^2 - sigma_up^2) cancels, and an ulp of sigma_next
  moves it by a percent.
  """
  return np.append(np.asarray(state.sigma_in)[0::2], np.asarray(state.sigmas)[-1])


@pytest.mark.parametrize("options,steps", [
    ({}, 10),
    ({}, 1),
    ({}, 2),
    ({"use_karras_sigmas": True}, 12),
    ({"prediction_type": "v_prediction", "timestep_spacing": "trailing"}, 8),
    ({"timestep_spacing": "leading", "steps_offset": 1}, 7),
    ({"use_exponential_sigmas": True}, 9),
])
def test_matches_k_diffusion(options, steps):
  cfg = dict(SD15, **options)
  name = "dpmpp_2s_ancestral" + "_karras" * bool(options.get("use_karras_sigmas"))
  ours = get_scheduler(name, cfg)
  state = ours.set_timesteps(steps, sample_shape=SHAPE)
  assert len(state.timesteps) == 2 * steps - 1
  init, noises = make_noises(len(state.timesteps))
  got = sdjax_trajectory(ours, steps, init, noises)
  euler = diffusers.EulerDiscreteScheduler.from_config(cfg)
  euler.set_timesteps(steps)
  sigmas = _step_sigmas(state)
  np.testing.assert_allclose(sigmas, euler.sigmas.numpy(), rtol=1e-6)
  with correctly_rounded_sqrt():
    want = sample_dpmpp_2s_ancestral(cfg, torch.from_numpy(sigmas),
                                  _nchw(init) * euler.init_noise_sigma,
                                  [_nchw(n) for n in noises])
  err = max_rel_error(got, want)
  print(f"maxrel dpmpp_2s_ancestral {options} {steps} steps: {err:.3g}")
  assert err <= TOL, err


def test_img2img_starts_at_a_first_stage():
  """img2img: from the noised image at the step `strength` leaves, as k-diffusion's
  img2img runs the tail of the schedule."""
  steps = 10
  ours = get_scheduler("dpmpp_2s_ancestral", SD15)
  begin = ours.begin_index(steps, 0.6)
  assert begin % 2 == 0
  init, noises = make_noises(2 * steps - 1)
  image = make_noises(1, seed=1)[0]
  got = sdjax_trajectory(ours, steps, init, noises, begin=begin, init_sample=image)
  state = ours.set_timesteps(steps, sample_shape=SHAPE)
  sigmas = torch.from_numpy(_step_sigmas(state)[begin // 2:])
  x = _nchw(image) + _nchw(init) * sigmas[0]
  with correctly_rounded_sqrt():
    want = sample_dpmpp_2s_ancestral(SD15, sigmas, x, [_nchw(n) for n in noises[begin:]])
  assert max_rel_error(got, want) <= TOL


def test_a1111_names():
  assert outputs.scheduler_name("DPM++ 2S a") == "dpmpp_2s_ancestral"
  assert outputs.scheduler_name("DPM++ 2S a Karras") == "dpmpp_2s_ancestral_karras"
  typed = get_scheduler("dpmpp_2s_ancestral", SD15, options={"schedule_type": "karras"})
  assert typed == get_scheduler("dpmpp_2s_ancestral_karras", SD15)
