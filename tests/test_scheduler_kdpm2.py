"""DPM2 and DPM2-ancestral against diffusers' KDPM2DiscreteScheduler and
KDPM2AncestralDiscreteScheduler, position by position on a fake model (the ancestral form with
the same noise: diffusers draws it at second stages only, so it gets ours of those positions).

diffusers computes the midpoints' sigmas with torch's CPU float32 sqrt, log and exp, which are
not all correctly rounded (sdjax's are): compared under correctly rounded square roots, the
timesteps agree to 1e-6 relative (a midpoint's log/exp may differ by an ulp) and the
trajectories to 1e-6.
"""

from __future__ import annotations

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
from sdjax.schedulers.common import CHURN_DEFAULTS

torch.set_num_threads(1)
SD15 = dict(testing.SCHEDULER_SD15)
TOL = 1e-6
REF = {"kdpm2": diffusers.KDPM2DiscreteScheduler,
       "kdpm2_ancestral": diffusers.KDPM2AncestralDiscreteScheduler}


def _compare(name, options, steps, strength=None, sigmas=None):
  """With `sigmas`, sdjax's custom schedule against diffusers' exponential spacing made to
  place those sigmas instead."""
  cfg = dict(SD15, **options)
  ours = get_scheduler(name + "_karras" * bool(options.get("use_karras_sigmas")), cfg,
                       options=None if sigmas is None else {"sigmas": sigmas})
  state = ours.set_timesteps(steps, sample_shape=SHAPE)
  n = len(state.timesteps)
  assert n == 2 * steps - 1
  init, noises = make_noises(n)
  begin, init_sample = 0, None
  if strength is not None:
    begin = ours.begin_index(steps, strength)
    assert begin % 2 == 0  # a first stage
    init_sample = make_noises(1, seed=1)[0]
  # diffusers draws noise at second stages only: ours of those positions, in order
  ref_noises = noises if not ours.needs_noise else np.concatenate(
    [noises[:begin], noises[begin + 1::2]])
  got = sdjax_trajectory(ours, steps, init, noises, begin=begin, init_sample=init_sample)
  with correctly_rounded_sqrt():
    ref = REF[name].from_config(cfg) if sigmas is None else exponential_placing(REF[name], cfg,
                                                                                sigmas)
    want = diffusers_trajectory(ref, steps, init, ref_noises, begin=begin,
                                init_sample=init_sample)
  np.testing.assert_allclose(np.asarray(state.timesteps), ref.timesteps.numpy(), rtol=1e-6,
                             atol=1e-5)
  np.testing.assert_allclose(float(ours.init_noise_sigma(state)), float(ref.init_noise_sigma),
                             rtol=1e-6)
  err = max_rel_error(got, want)
  print(f"maxrel {name} {options} {steps} steps: {err:.3g}")
  assert err <= TOL, err


@pytest.mark.parametrize("name", list(REF))
@pytest.mark.parametrize("options,steps", [
    ({}, 10),
    ({}, 1),
    ({}, 2),
    ({"use_karras_sigmas": True}, 12),
    ({"prediction_type": "v_prediction", "timestep_spacing": "trailing"}, 8),
    ({"timestep_spacing": "leading", "steps_offset": 1}, 7),
    ({"use_exponential_sigmas": True}, 10),
    ({"use_beta_sigmas": True, "prediction_type": "v_prediction"}, 6),
    ({"beta_schedule": "squaredcos_cap_v2", "timestep_spacing": "trailing"}, 9),
], ids=["10steps", "1step", "2steps", "karras", "v-trailing", "leading", "exponential", "beta-v",
        "cosine"])
def test_trajectory_matches_diffusers(name, options, steps):
  _compare(name, options, steps)


@pytest.mark.parametrize("name", list(REF))
@pytest.mark.parametrize("options,steps,strength", [
    ({}, 10, 0.6),
    ({"use_karras_sigmas": True, "prediction_type": "v_prediction"}, 8, 0.3),
])
def test_img2img_matches_diffusers(name, options, steps, strength):
  _compare(name, options, steps, strength)


def test_names_and_config():
  for name, ref_cls in REF.items():
    ours = get_scheduler(name, SD15)
    ref = ref_cls.from_config(SD15)
    for key, value in ours.cfg.items():
      # s_noise and kdpm2's churn: k-diffusion's (off), not diffusers'
      assert ref.config[key] == value if key not in CHURN_DEFAULTS else (
          value == CHURN_DEFAULTS[key]), key
    assert ours.order == 2 and ours.needs_noise == (name == "kdpm2_ancestral")
    cfg = dict(SD15, _class_name=ref_cls.__name__)
    assert default_scheduler_name(cfg) == name
    assert default_scheduler_name(dict(cfg, use_karras_sigmas=True)) == f"{name}_karras"
    assert get_scheduler(f"{name}_karras", SD15).cfg["use_karras_sigmas"] is True
  with pytest.raises(SchedulerConfigError, match="prediction_type"):
    get_scheduler("kdpm2", dict(SD15, prediction_type="sample"))  # diffusers: NotImplemented
  with pytest.raises(ValueError, match="sample_shape"):
    get_scheduler("kdpm2", SD15).set_timesteps(10)
  with pytest.raises(ValueError, match="noise="):
    sched = get_scheduler("kdpm2_ancestral", SD15)
    state = sched.set_timesteps(3, sample_shape=SHAPE)
    sched.step(state, np.zeros(SHAPE, np.float32), 1, np.zeros(SHAPE, np.float32))


@pytest.mark.parametrize("name,options,strength", [
    ("kdpm2", {}, 0.6),
    ("kdpm2_ancestral", {"prediction_type": "v_prediction"}, None),
])
def test_custom_sigmas_match_diffusers(name, options, strength):
  _compare(name, options, 7, strength, sigmas=[14.6, 7.5, 3.9, 1.8, 0.8, 0.3, 0.07, 0.0])
