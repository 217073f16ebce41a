"""Euler and Euler-ancestral against diffusers' classes, step by step, on a fake model.

Trajectories agree to ~2e-7 relative, not bit for bit: torch's float32 sqrt/log/exp on CPU (MKL)
are not correctly rounded and XLA contracts a*b+c into FMAs. The order of operations is
diffusers' own (with those two effects removed the trajectories agree exactly).
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from diffusers import EulerAncestralDiscreteScheduler as RefEulerAncestral
from diffusers import EulerDiscreteScheduler as RefEuler
from scheduler_harness import (
  SHAPE,
  diffusers_trajectory,
  make_noises,
  max_rel_error,
  sdjax_trajectory,
)

from sdjax import testing
from sdjax.schedulers import SchedulerConfigError, default_scheduler_name, get_scheduler
from sdjax.schedulers.common import CHURN_DEFAULTS

SD15 = dict(testing.SCHEDULER_SD15)  # Stable Diffusion 1.5's scheduler_config.json
TOL = 1e-6
STEPS = (1, 4, 10, 20)
SPACINGS = ("leading", "trailing", "linspace")
REF = {"euler": RefEuler, "euler_ancestral": RefEulerAncestral}


def _grid(name, prediction_types, karras_options):
  """Every prediction type x spacing x karras, cycling step counts and steps_offset through."""
  cases = []
  combos = itertools.product(prediction_types, SPACINGS, karras_options)
  for idx, (pred, spacing, karras) in enumerate(combos):
    steps, offset = STEPS[idx % len(STEPS)], (idx // 2) % 2
    case_id = f"{name}-{pred}-{spacing}-karras{int(karras)}-{steps}steps-offset{offset}"
    cases.append(pytest.param(name, pred, spacing, karras, steps, offset, id=case_id))
  return cases


def _compare(name, cfg, steps, *, strength=None):
  """Runs ours and diffusers' on the same fake model and noise; returns (ours, ref, error)."""
  ref = REF[name].from_config(cfg)
  ours = get_scheduler(name, cfg)
  init_noise, step_noises = make_noises(steps * ours.order)
  kwargs = {}
  if strength is not None:
    init_sample = np.random.default_rng(1).standard_normal(SHAPE).astype(np.float32)
    kwargs = {"begin": ours.begin_index(steps, strength), "init_sample": init_sample}
  ref_traj = diffusers_trajectory(ref, steps, init_noise, step_noises, **kwargs)
  our_traj = sdjax_trajectory(ours, steps, init_noise, step_noises, **kwargs)
  assert our_traj.shape == ref_traj.shape
  err = max_rel_error(our_traj, ref_traj)
  print(f"maxrel {name} {cfg.get('prediction_type', 'epsilon')} {err:.3g}")
  assert err <= TOL, err
  return ours, ref, err


def _check_schedule(ours, ref, steps, *, fractional):
  state = ours.set_timesteps(steps, sample_shape=SHAPE)
  ref_t = ref.timesteps.numpy().astype(np.float32)
  if fractional:
    # Karras timesteps interpolate log-sigma, where torch's last-bit sqrt differences show.
    np.testing.assert_allclose(np.asarray(state.timesteps), ref_t, rtol=1e-6, atol=0)
  else:
    np.testing.assert_array_equal(np.asarray(state.timesteps), ref_t)
  np.testing.assert_allclose(np.asarray(state.sigmas), ref.sigmas.numpy(), rtol=1e-6, atol=0)
  np.testing.assert_allclose(
    float(ours.init_noise_sigma(state)), float(ref.init_noise_sigma), rtol=1e-6
  )


@pytest.mark.parametrize(
  "name,pred,spacing,karras,steps,offset",
  _grid("euler", ("epsilon", "v_prediction", "sample"), (False, True))
  + _grid("euler_ancestral", ("epsilon", "v_prediction"), (False,)),
)
def test_trajectory_matches_diffusers(name, pred, spacing, karras, steps, offset):
  cfg = dict(SD15, prediction_type=pred, timestep_spacing=spacing, steps_offset=offset)
  if karras:
    cfg["use_karras_sigmas"] = True
  ours, ref, _ = _compare(name, cfg, steps)
  _check_schedule(ours, ref, steps, fractional=karras)


@pytest.mark.parametrize(
  "name,pred,karras,spacing",
  [
    ("euler", "epsilon", False, "leading"),
    ("euler", "v_prediction", True, "trailing"),
    ("euler_ancestral", "epsilon", False, "trailing"),
    ("euler_ancestral", "v_prediction", False, "leading"),
  ],
)
def test_img2img_matches_diffusers(name, pred, karras, spacing):
  cfg = dict(SD15, prediction_type=pred, timestep_spacing=spacing, use_karras_sigmas=karras)
  ours, _, _ = _compare(name, cfg, 10, strength=0.6)
  assert ours.begin_index(10, 0.6) == 4


@pytest.mark.parametrize(
  "options",
  [
    {"final_sigmas_type": "sigma_min", "timestep_spacing": "trailing"},
    {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"},
    {"use_karras_sigmas": True, "sigma_min": 0.1, "sigma_max": 10.0},
    {"timestep_type": "continuous", "beta_schedule": "linear", "beta_start": 0.0001},
    {"beta_schedule": "squaredcos_cap_v2", "timestep_spacing": "leading"},
    {"use_exponential_sigmas": True},
    {"use_exponential_sigmas": True, "sigma_min": 0.1, "sigma_max": 10.0,
     "timestep_spacing": "trailing", "prediction_type": "v_prediction"},
    {"use_beta_sigmas": True},
    {"use_beta_sigmas": True, "sigma_min": 0.1, "sigma_max": 10.0,
     "final_sigmas_type": "sigma_min"},
  ],
  ids=["sigma_min", "zero_snr", "karras_range", "continuous_eps", "cosine", "exponential",
       "exponential_range-v", "beta", "beta_range-sigma_min"],
)
def test_options_match_diffusers(options):
  cfg = dict(SD15, **options)
  ours, ref, _ = _compare("euler", cfg, 7)
  fractional = any(options.get(f"use_{kind}_sigmas") for kind in ("karras", "exponential", "beta"))
  _check_schedule(ours, ref, 7, fractional=fractional)


@pytest.mark.parametrize("name", ["euler", "euler_ancestral"])
def test_config_resolves_as_diffusers(name):
  ours = get_scheduler(name, SD15)
  ref = REF[name].from_config(SD15)
  # sdjax's own options of Euler a (Euler's spacings, for A1111's schedule types): off.
  own = {f"use_{kind}_sigmas" for kind in ("karras", "exponential", "beta")
         if name == "euler_ancestral"}
  for key, value in ours.cfg.items():
    if key in own:
      assert key not in ref.config and value is False, key
    elif key in CHURN_DEFAULTS:  # k-diffusion's (Euler a's s_noise, Euler's churn): off
      assert key not in ref.config and value == CHURN_DEFAULTS[key], key
    else:
      assert ref.config[key] == value, key
  assert "skip_prk_steps" not in ours.cfg  # PNDM-only keys are ignored
  assert ours.cfg["timestep_spacing"] == "linspace"  # missing keys take the class default
  assert ours.cfg["steps_offset"] == 1


@pytest.mark.parametrize(
  "name,options,option",
  [
    ("euler", {"interpolation_type": "log_linear"}, "interpolation_type"),
    ("euler", {"use_karras_sigmas": True, "use_beta_sigmas": True}, "only one of"),
    ("euler", {"timestep_spacing": "uniform"}, "timestep_spacing"),
    ("euler", {"prediction_type": "flow_prediction"}, "prediction_type"),
    ("euler", {"final_sigmas_type": "one"}, "final_sigmas_type"),
    ("euler", {"beta_schedule": "exp"}, "beta_schedule"),
    (
      "euler",
      {"timestep_type": "continuous", "prediction_type": "v_prediction"},
      "timestep_type",
    ),
    ("euler_ancestral", {"prediction_type": "sample"}, "prediction_type"),
    ("euler_ancestral", {"timestep_spacing": "karras"}, "timestep_spacing"),
  ],
)
def test_unsupported_options_raise(name, options, option):
  with pytest.raises(SchedulerConfigError, match=option):
    get_scheduler(name, dict(SD15, **options))


def _oracle_run(name, pred, steps, spacing):
  """Runs with a model that knows x0 and the noise; returns (final sample, x0, error bound)."""
  sched = get_scheduler(name, dict(SD15, prediction_type=pred, timestep_spacing=spacing))
  state = sched.set_timesteps(steps, sample_shape=SHAPE)
  rng = np.random.default_rng(3)
  x0 = rng.standard_normal(SHAPE).astype(np.float32)
  eps = rng.standard_normal(SHAPE).astype(np.float32)
  x = sched.add_noise(state, jnp.asarray(x0), jnp.asarray(eps), 0)  # x0 + sigma_0 * eps
  sigmas = np.asarray(state.sigmas, np.float64)
  bound = 0.0
  for i in range(len(state.timesteps)):
    if pred == "epsilon":
      out = eps
    else:  # v = alpha * eps - sigma_vp * x0 at this position's noise level
      s = np.sqrt(sigmas[i] ** 2 + 1)
      out = (eps / s - sigmas[i] / s * x0).astype(np.float32)
    x, state = sched.step(state, jnp.asarray(out), i, x)
    bound += 8 * np.finfo(np.float32).eps * (1 + sigmas[i]) * np.abs(eps).max()
  return np.asarray(x), x0, bound


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
def test_true_noise_model_recovers_x0(pred):
  # Each Euler step from x0 + sigma_i * eps with the true eps lands on x0 + sigma_{i+1} * eps,
  # so the last one (sigma = 0) returns x0 up to float32 rounding.
  x, x0, bound = _oracle_run("euler", pred, 10, "leading")
  assert np.abs(x - x0).max() <= bound
  assert bound < 1e-4


def test_bfloat16_sample_keeps_dtype_and_float32_math():
  for name in ("euler", "euler_ancestral"):
    sched = get_scheduler(name, SD15)
    state = sched.set_timesteps(4, sample_shape=SHAPE)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(SHAPE), jnp.bfloat16)
    out = jnp.asarray(rng.standard_normal(SHAPE), jnp.bfloat16)
    noise = jnp.asarray(rng.standard_normal(SHAPE), jnp.float32)
    prev, new_state = sched.step(state, out, 1, x, noise)
    ref, _ = sched.step(state, out.astype(jnp.float32), 1, x.astype(jnp.float32), noise)
    assert prev.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(prev), np.asarray(ref.astype(jnp.bfloat16)))
    assert sched.scale_model_input(state, x, 1).dtype == jnp.bfloat16
    assert sched.add_noise(state, x, noise, 1).dtype == jnp.bfloat16
    assert jax.tree.map(lambda a: a.dtype, new_state) == jax.tree.map(lambda a: a.dtype, state)


@pytest.mark.parametrize("options,steps,strength", [
    ({}, 10, None),
    ({}, 1, None),
    ({"prediction_type": "v_prediction", "sigma_max": 120.0, "sigma_data": 1.0}, 12, None),
    ({"sigma_schedule": "exponential", "final_sigmas_type": "sigma_min"}, 10, None),
    ({"rho": 5.0, "sigma_min": 0.01}, 7, None),
    ({"prediction_type": "v_prediction"}, 10, 0.6),
], ids=["10steps", "1step", "v-range", "exponential-sigma_min", "rho", "img2img-v"])
def test_edm_euler_matches_diffusers(options, steps, strength):
  """EDMEulerScheduler (CosXL's): Euler on EDM's noise levels with its preconditioning."""
  from diffusers import EDMEulerScheduler  # noqa: PLC0415
  from scheduler_harness import edm_parity  # noqa: PLC0415

  err = edm_parity("edm_euler", EDMEulerScheduler, dict(SD15, **options), steps, strength)
  assert err <= TOL, err
  cfg = {"_class_name": "EDMEulerScheduler", "prediction_type": "v_prediction"}
  assert default_scheduler_name(cfg) == "edm_euler"
  with pytest.raises(SchedulerConfigError, match="sigma_schedule"):
    get_scheduler("edm_euler", {"sigma_schedule": "linear"})
