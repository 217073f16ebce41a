"""Heun against diffusers' HeunDiscreteScheduler, model call by model call, on a fake model.

Residual differences (~2e-7 relative) come from torch's CPU float32 sqrt (MKL, not correctly
rounded) in the sigma schedule; with a correctly rounded sqrt the trajectories agree bit for bit.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from diffusers import HeunDiscreteScheduler as RefHeun
from scheduler_harness import (
  SHAPE,
  diffusers_trajectory,
  make_noises,
  max_rel_error,
  sdjax_trajectory,
)

from sdjax import testing
from sdjax.schedulers import SchedulerConfigError, get_scheduler
from sdjax.schedulers.common import CHURN_DEFAULTS

SD15 = dict(testing.SCHEDULER_SD15)  # Stable Diffusion 1.5's scheduler_config.json
TOL = 1e-6
STEPS = (1, 4, 10, 20)
SPACINGS = ("leading", "trailing", "linspace")


def _grid():
  """Every prediction type x spacing x karras, cycling step counts and steps_offset through."""
  cases = []
  combos = itertools.product(("epsilon", "v_prediction", "sample"), SPACINGS, (False, True))
  for idx, (pred, spacing, karras) in enumerate(combos):
    steps, offset = STEPS[idx % len(STEPS)], (idx // 2) % 2
    case_id = f"{pred}-{spacing}-karras{int(karras)}-{steps}steps-offset{offset}"
    cases.append(pytest.param(pred, spacing, karras, steps, offset, id=case_id))
  return cases


def _compare(cfg, steps, *, strength=None):
  ref = RefHeun.from_config(cfg)
  ours = get_scheduler("heun", cfg)
  init_noise, step_noises = make_noises(2 * steps)
  kwargs = {}
  if strength is not None:
    init_sample = np.random.default_rng(1).standard_normal(SHAPE).astype(np.float32)
    kwargs = {"begin": ours.begin_index(steps, strength), "init_sample": init_sample}
  ref_traj = diffusers_trajectory(ref, steps, init_noise, step_noises, **kwargs)
  our_traj = sdjax_trajectory(ours, steps, init_noise, step_noises, **kwargs)
  assert our_traj.shape == ref_traj.shape
  err = max_rel_error(our_traj, ref_traj)
  print(f"maxrel heun {cfg.get('prediction_type', 'epsilon')} {err:.3g}")
  assert err <= TOL, err
  return ours, ref


@pytest.mark.parametrize("pred,spacing,karras,steps,offset", _grid())
def test_trajectory_matches_diffusers(pred, spacing, karras, steps, offset):
  cfg = dict(
    SD15,
    prediction_type=pred,
    timestep_spacing=spacing,
    steps_offset=offset,
    use_karras_sigmas=karras,
  )
  ours, ref = _compare(cfg, steps)
  state = ours.set_timesteps(steps, sample_shape=SHAPE)
  assert len(state.timesteps) == 2 * steps - 1
  ref_t = ref.timesteps.numpy()
  if karras:
    # Karras timesteps interpolate log-sigma, where torch's last-bit sqrt differences show.
    np.testing.assert_allclose(np.asarray(state.timesteps), ref_t, rtol=1e-6, atol=0)
  else:
    np.testing.assert_array_equal(np.asarray(state.timesteps), ref_t)
  np.testing.assert_allclose(np.asarray(state.sigmas), ref.sigmas.numpy(), rtol=1e-6, atol=0)
  np.testing.assert_allclose(
    float(ours.init_noise_sigma(state)), float(ref.init_noise_sigma), rtol=1e-6
  )


@pytest.mark.parametrize(
  "pred,karras,spacing,strength",
  [
    ("epsilon", False, "leading", 0.6),
    ("v_prediction", True, "trailing", 0.75),
  ],
)
def test_img2img_matches_diffusers(pred, karras, spacing, strength):
  cfg = dict(SD15, prediction_type=pred, timestep_spacing=spacing, use_karras_sigmas=karras)
  ours, _ = _compare(cfg, 8, strength=strength)
  assert ours.begin_index(8, strength) % 2 == 0  # img2img starts at a first (predictor) stage


@pytest.mark.parametrize(
  "options",
  [
    {"prediction_type": "sample", "clip_sample": True, "clip_sample_range": 0.3},
    {"beta_schedule": "squaredcos_cap_v2", "timestep_spacing": "trailing"},
    {"use_exponential_sigmas": True},
    {"use_beta_sigmas": True, "prediction_type": "v_prediction"},
  ],
  ids=["clip_sample", "cosine", "exponential", "beta-v"],
)
def test_options_match_diffusers(options):
  _compare(dict(SD15, **options), 6)


def test_config_resolves_as_diffusers():
  ours = get_scheduler("heun", SD15)
  ref = RefHeun.from_config(SD15)
  for key, value in ours.cfg.items():
    if key in CHURN_DEFAULTS:  # k-diffusion's churn, not diffusers' config: off
      assert key not in ref.config and value == CHURN_DEFAULTS[key], key
    else:
      assert ref.config[key] == value, key
  assert "set_alpha_to_one" not in ours.cfg
  assert ours.cfg["timestep_spacing"] == "linspace"


@pytest.mark.parametrize(
  "options,option",
  [
    ({"use_exponential_sigmas": True, "use_beta_sigmas": True}, "only one of"),
    ({"timestep_spacing": "uniform"}, "timestep_spacing"),
    ({"prediction_type": "flow_prediction"}, "prediction_type"),
    ({"beta_schedule": "exp"}, "beta_schedule"),
  ],
)
def test_unsupported_options_raise(options, option):
  with pytest.raises(SchedulerConfigError, match=option):
    get_scheduler("heun", dict(SD15, **options))


def test_needs_sample_shape():
  with pytest.raises(ValueError, match="sample_shape"):
    get_scheduler("heun", SD15).set_timesteps(10)


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
def test_true_noise_model_recovers_x0(pred):
  # From x0 + sigma * eps with the true eps both stages see slope eps, so every full step lands
  # on x0 + sigma_next * eps and the last returns x0 up to float32 rounding.
  sched = get_scheduler("heun", dict(SD15, prediction_type=pred))
  state = sched.set_timesteps(6, sample_shape=SHAPE)
  rng = np.random.default_rng(3)
  x0 = rng.standard_normal(SHAPE).astype(np.float32)
  eps = rng.standard_normal(SHAPE).astype(np.float32)
  x = sched.add_noise(state, jnp.asarray(x0), jnp.asarray(eps), 0)
  sigmas = np.asarray(state.sigmas, np.float64)
  bound = 0.0
  for i in range(len(state.timesteps)):
    s = np.sqrt(sigmas[i] ** 2 + 1)
    out = eps if pred == "epsilon" else (eps / s - sigmas[i] / s * x0).astype(np.float32)
    x, state = sched.step(state, jnp.asarray(out), i, x)
    bound += 8 * np.finfo(np.float32).eps * (1 + sigmas[i]) * np.abs(eps).max()
  assert np.abs(np.asarray(x) - x0).max() <= bound
  assert bound < 1e-4


def test_bfloat16_sample_keeps_dtype_and_float32_math():
  sched = get_scheduler("heun", SD15)
  state = sched.set_timesteps(4, sample_shape=SHAPE)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal(SHAPE), jnp.bfloat16)
  out = jnp.asarray(rng.standard_normal(SHAPE), jnp.bfloat16)
  for _ in range(2):  # a predictor, then a corrector stage
    prev, new_state = sched.step(state, out, 1, x)
    ref, _ = sched.step(state, out.astype(jnp.float32), 1, x.astype(jnp.float32))
    assert prev.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(prev), np.asarray(ref.astype(jnp.bfloat16)))
    assert jax.tree.map(lambda a: a.dtype, new_state) == jax.tree.map(lambda a: a.dtype, state)
    state = new_state
  assert sched.scale_model_input(state, x, 1).dtype == jnp.bfloat16
