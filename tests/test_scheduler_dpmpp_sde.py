"""DPM++ SDE against diffusers' DPMSolverSDEScheduler.

Arithmetic: position by position on a fake model, diffusers' Brownian-tree noise sampler
replaced by one that returns sdjax's noise of each position (the first stage's unit normal, the
second stage's combination of both), under correctly rounded square roots: 1e-6.
Noise: sdjax's construction has the joint law of torchsde's Brownian tree, which diffusers
samples: checked on the moments of a large draw from the tree itself.
"""

from __future__ import annotations

import contextlib
from unittest import mock

import diffusers
import numpy as np
import pytest
import torch
from scheduler_harness import (
  SHAPE,
  correctly_rounded_sqrt,
  diffusers_trajectory,
  exponential_placing,
  make_noises,
  max_rel_error,
  sdjax_trajectory,
)

from sdjax import testing
from sdjax.schedulers import SchedulerConfigError, default_scheduler_name, get_scheduler

torch.set_num_threads(1)
SD15 = dict(testing.SCHEDULER_SD15)
TOL = 1e-6
MODULE = "diffusers.schedulers.scheduling_dpmsolver_sde"


def _to_torch(x):
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


@contextlib.contextmanager
def _our_noise(state, noises, begin):
  """diffusers' noise sampler, returning the unit noise sdjax uses at each position."""
  first = np.asarray(state.noise_first)
  second = np.asarray(state.noise_second)
  position = iter(range(begin, len(noises)))
  last = {}

  def sample(sigma, sigma_next):
    p = next(position)
    unit = noises[p] if p % 2 == 0 else first[p] * last["z"] + second[p] * noises[p]
    last["z"] = noises[p]
    return _to_torch(unit.astype(np.float32))

  with mock.patch(f"{MODULE}.BrownianTreeNoiseSampler", lambda *a, **k: sample):
    yield


def _compare(options, steps, strength=None, sigmas=None):
  """With `sigmas`, sdjax's custom schedule against diffusers' exponential spacing made to
  place those sigmas instead (the custom list's only route into this class)."""
  cfg = dict(SD15, **options)
  ours = get_scheduler("dpmpp_sde_karras" if options.get("use_karras_sigmas") else "dpmpp_sde",
                       cfg, options=None if sigmas is None else {"sigmas": sigmas})
  state = ours.set_timesteps(steps, sample_shape=SHAPE)
  n = len(state.timesteps)
  assert n == 2 * steps - 1
  init, noises = make_noises(n)
  begin, init_sample = 0, None
  if strength is not None:
    begin = ours.begin_index(steps, strength)
    init_sample = make_noises(1, seed=1)[0]
  got = sdjax_trajectory(ours, steps, init, noises, begin=begin, init_sample=init_sample)
  with correctly_rounded_sqrt(), _our_noise(state, noises, begin):
    if sigmas is None:
      ref = diffusers.DPMSolverSDEScheduler.from_config(cfg)
    else:
      ref = exponential_placing(diffusers.DPMSolverSDEScheduler, cfg, sigmas)
    want = diffusers_trajectory(ref, steps, init, noises, begin=begin, init_sample=init_sample)
  np.testing.assert_allclose(np.asarray(state.timesteps), ref.timesteps.numpy(), rtol=1e-6,
                             atol=1e-5)
  np.testing.assert_allclose(float(ours.init_noise_sigma(state)), float(ref.init_noise_sigma),
                             rtol=1e-6)
  err = max_rel_error(got, want)
  print(f"maxrel dpmpp_sde {options} {steps} steps: {err:.3g}")
  assert err <= TOL, err


@pytest.mark.parametrize("options,steps", [
    ({}, 10),
    ({}, 1),
    ({}, 2),
    ({"use_karras_sigmas": True}, 12),
    ({"prediction_type": "v_prediction", "timestep_spacing": "trailing"}, 8),
    ({"timestep_spacing": "leading", "steps_offset": 1}, 7),
    ({"use_exponential_sigmas": True}, 10),
    ({"use_beta_sigmas": True, "prediction_type": "v_prediction"}, 6),
], ids=["10steps", "1step", "2steps", "karras", "v-trailing", "leading", "exponential", "beta-v"])
def test_trajectory_matches_diffusers(options, steps):
  _compare(options, steps)


@pytest.mark.parametrize("options,steps,strength", [
    ({}, 10, 0.6),
    ({"use_karras_sigmas": True, "prediction_type": "v_prediction"}, 8, 0.3),
])
def test_img2img_matches_diffusers(options, steps, strength):
  _compare(options, steps, strength)


@pytest.mark.parametrize("options,strength", [({}, None), ({"prediction_type": "v_prediction"},
                                                             0.5)])
def test_custom_sigmas_match_diffusers(options, strength):
  _compare(options, 6, strength, sigmas=[14.6, 5.0, 2.1, 0.9, 0.35, 0.05, 0.0])


def test_noise_has_the_brownian_trees_law():
  """diffusers' sampler (torchsde's Brownian interval) over a step's two calls, on 400k
  independent entries: its second-stage noise less the first's share is a unit normal
  independent of the first, as sdjax builds it; the next step's noises are independent."""
  from diffusers.schedulers.scheduling_dpmsolver_sde import BrownianTreeNoiseSampler  # noqa: PLC0415

  state = get_scheduler("dpmpp_sde_karras", SD15).set_timesteps(4, sample_shape=(1,))
  sig = np.asarray(state.sigma_in, np.float64)
  x = torch.zeros(400_000)
  tree = BrownianTreeNoiseSampler(x, float(sig[-1]), float(sig[0]), seed=7)
  draws = []
  for k in range(2):  # steps 0 and 1: (sigma_k, midpoint), then (sigma_k, sigma_{k+1})
    s, mid, nxt = sig[2 * k], sig[2 * k + 1], sig[2 * k + 2]
    n1 = tree(torch.tensor(s), torch.tensor(mid)).double().numpy()
    n2 = tree(torch.tensor(s), torch.tensor(nxt)).double().numpy()
    a, b = (float(np.asarray(w)[2 * k + 1]) for w in (state.noise_first, state.noise_second))
    z2 = (n2 - a * n1) / b
    draws += [n1, z2]
  stack = np.stack(draws)
  np.testing.assert_allclose(stack.mean(1), 0, atol=0.01)
  np.testing.assert_allclose(stack.std(1), 1, atol=0.01)
  corr = np.corrcoef(stack)
  np.testing.assert_allclose(corr, np.eye(4), atol=0.01)


def test_names_and_config():
  ours = get_scheduler("dpmpp_sde", SD15)
  ref = diffusers.DPMSolverSDEScheduler.from_config(SD15)
  for key, value in ours.cfg.items():
    # s_noise: k-diffusion's (each draw as it is), not diffusers'
    assert ref.config[key] == value if key != "s_noise" else value == 1.0, key
  assert ours.order == 2 and ours.needs_noise
  cfg = dict(SD15, _class_name="DPMSolverSDEScheduler")
  assert default_scheduler_name(cfg) == "dpmpp_sde"
  assert default_scheduler_name(dict(cfg, use_karras_sigmas=True)) == "dpmpp_sde_karras"
  with pytest.raises(SchedulerConfigError, match="prediction_type"):
    get_scheduler("dpmpp_sde", dict(SD15, prediction_type="sample"))
  with pytest.raises(ValueError, match="sample_shape"):
    ours.set_timesteps(10)
