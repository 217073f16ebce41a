"""DPM++ 2S a (A1111's "DPM++ 2S a") against k-diffusion's `sample_dpmpp_2s_ancestral`.

diffusers has no such scheduler, so the reference is k-diffusion's loop written out here in
torch float32, in its own arithmetic (log-time steps and `expm1`; its denoiser reads a sigma's
timestep off the training sigmas in log space, unrounded), over the noise levels diffusers'
Euler places (sdjax's placement for every sigma scheduler). Both see the same fake model and
the same noise, position by position: a midpoint's sample after a step's first model call, the
step's result after its second.
"""

from __future__ import annotations

import diffusers
import numpy as np
import pytest
import torch
from scheduler_harness import (
  SHAPE,
  correctly_rounded_sqrt,
  make_noises,
  max_rel_error,
  sdjax_trajectory,
)
from scheduler_harness import fake_model as fake_unet

from sdjax import outputs, testing
from sdjax.schedulers import get_scheduler

torch.set_num_threads(1)
SD15 = dict(testing.SCHEDULER_SD15)
TOL = 1e-6


def _nchw(x: np.ndarray) -> torch.Tensor:
  return torch.from_numpy(np.ascontiguousarray(x))


def _denoiser(config):
  """k-diffusion's CompVisDenoiser / CompVisVDenoiser around the fake UNet: x0 from (x, sigma)."""
  ref = diffusers.EulerDiscreteScheduler.from_config(config)
  log_sigmas = torch.from_numpy(np.log(((1 - ref.alphas_cumprod.numpy())
                                        / ref.alphas_cumprod.numpy()) ** 0.5))

  def sigma_to_t(sigma):
    log_sigma = sigma.log()
    dists = log_sigma - log_sigmas[:, None]
    low = dists.ge(0).cumsum(dim=0).argmax(dim=0).clamp(max=log_sigmas.shape[0] - 2)
    w = ((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1])).clamp(0, 1)
    return ((1 - w) * low + w * (low + 1)).view(sigma.shape)

  def denoise(x, sigma):
    c_in = 1 / (sigma**2 + 1) ** 0.5
    out = _nchw(fake_unet((x * c_in).numpy(), float(sigma_to_t(sigma.reshape(1)))))
    if config.get("prediction_type") == "v_prediction":
      return x / (sigma**2 + 1) + out * (-sigma * c_in)
    return x + out * -sigma

  return denoise


def k_diffusion_trajectory(config, sigmas, x, noises):
  """k-diffusion's DPM++ 2S a (eta 1, s_noise 1): the sample after each model call."""
  denoise, out = _denoiser(config), []
  for i in range(len(sigmas) - 1):
    sigma, sigma_next = sigmas[i], sigmas[i + 1]
    denoised = denoise(x, sigma)
    sigma_up = torch.minimum(sigma_next, (sigma_next**2 * (sigma**2 - sigma_next**2)
                                          / sigma**2) ** 0.5)
    sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
    if sigma_down == 0:  # Euler to the denoised image
      x = x + (x - denoised) / sigma * (sigma_down - sigma)
      out.append(x)
      continue
    t, t_next = -sigma.log(), -sigma_down.log()
    h = t_next - t
    s = t + h * 0.5
    x_2 = (s.neg().exp() / t.neg().exp()) * x - (-h * 0.5).expm1() * denoised
    out.append(x_2)
    denoised_2 = denoise(x_2, s.neg().exp())
    x = (t_next.neg().exp() / t.neg().exp()) * x - (-h).expm1() * denoised_2
    if sigma_next > 0:
      x = x + noises[2 * i + 1] * sigma_up  # ours for that position
    out.append(x)
  return np.stack([y.numpy() for y in out])


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
    want = k_diffusion_trajectory(cfg, torch.from_numpy(sigmas),
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
    want = k_diffusion_trajectory(SD15, sigmas, x, [_nchw(n) for n in noises[begin:]])
  assert max_rel_error(got, want) <= TOL


def test_a1111_names():
  assert outputs.scheduler_name("DPM++ 2S a") == "dpmpp_2s_ancestral"
  assert outputs.scheduler_name("DPM++ 2S a Karras") == "dpmpp_2s_ancestral_karras"
  typed = get_scheduler("dpmpp_2s_ancestral", SD15, options={"schedule_type": "karras"})
  assert typed == get_scheduler("dpmpp_2s_ancestral_karras", SD15)
