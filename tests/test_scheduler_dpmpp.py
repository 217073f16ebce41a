"""DPM-Solver++ against diffusers' DPMSolverMultistepScheduler, step by step, on a fake model
(the SDE form with the same noise injected into both).

Parity is held against diffusers with torch's CPU float32 sqrt, log and exp correctly rounded
(`correctly_rounded_math`); as is, they miss last bits, which ones depending on the CPU
(`scheduler_harness.PLAIN_TOL`).
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from diffusers import DPMSolverMultistepScheduler as RefDPM
from scheduler_harness import (
  PLAIN_TOL,
  SHAPE,
  correctly_rounded_math,
  diffusers_trajectory,
  make_noises,
  max_rel_error,
  sdjax_trajectory,
)

from sdjax import testing
from sdjax.schedulers import SchedulerConfigError, default_scheduler_name, get_scheduler

SD15 = dict(testing.SCHEDULER_SD15)  # Stable Diffusion 1.5's scheduler_config.json
TOL = 1e-6
# lower_order_final applies below 15 steps only.
STEPS = (1, 4, 10, 14, 15, 20)
SPACINGS = ("leading", "trailing", "linspace")


def _grid():
  """Every prediction type x spacing x karras, cycling step counts and steps_offset through."""
  cases = []
  combos = itertools.product(("epsilon", "v_prediction", "sample"), SPACINGS, (False, True))
  for idx, (pred, spacing, karras) in enumerate(combos):
    steps, offset = STEPS[(idx + idx // 6) % len(STEPS)], (idx // 2) % 2
    case_id = f"{pred}-{spacing}-karras{int(karras)}-{steps}steps-offset{offset}"
    cases.append(pytest.param(pred, spacing, karras, steps, offset, id=case_id))
  return cases


def _compare(cfg, steps, *, karras=False, strength=None):
  ref = RefDPM.from_config(cfg, use_karras_sigmas=karras)
  ours = get_scheduler("dpmpp_2m_karras" if karras else "dpmpp_2m", cfg)
  init_noise, step_noises = make_noises(steps)
  kwargs = {}
  if strength is not None:
    init_sample = np.random.default_rng(1).standard_normal(SHAPE).astype(np.float32)
    kwargs = {"begin": ours.begin_index(steps, strength), "init_sample": init_sample}
  plain_traj = diffusers_trajectory(ref, steps, init_noise, step_noises, **kwargs)
  with correctly_rounded_math():
    ref_traj = diffusers_trajectory(RefDPM.from_config(cfg, use_karras_sigmas=karras), steps,
                                    init_noise, step_noises, **kwargs)
  our_traj = sdjax_trajectory(ours, steps, init_noise, step_noises, **kwargs)
  assert our_traj.shape == ref_traj.shape
  err, plain = max_rel_error(our_traj, ref_traj), max_rel_error(our_traj, plain_traj)
  print(f"maxrel dpmpp {cfg.get('prediction_type', 'epsilon')} {err:.3g} (as is {plain:.3g})")
  assert err <= TOL and plain <= PLAIN_TOL, (err, plain)
  state = ours.set_timesteps(steps, sample_shape=SHAPE)
  np.testing.assert_array_equal(np.asarray(state.timesteps), ref.timesteps.numpy())
  np.testing.assert_allclose(np.asarray(state.sigmas), ref.sigmas.numpy(), rtol=1e-6, atol=0)
  assert float(ours.init_noise_sigma(state)) == ref.init_noise_sigma
  return ours, ref


@pytest.mark.parametrize("pred,spacing,karras,steps,offset", _grid())
def test_trajectory_matches_diffusers(pred, spacing, karras, steps, offset):
  cfg = dict(SD15, prediction_type=pred, timestep_spacing=spacing, steps_offset=offset)
  _compare(cfg, steps, karras=karras)


@pytest.mark.parametrize(
  "options,steps",
  [
    ({"solver_order": 1}, 10),
    ({"solver_order": 3}, 10),
    ({"solver_order": 3, "prediction_type": "v_prediction"}, 20),
    ({"solver_type": "heun"}, 14),
    ({"final_sigmas_type": "sigma_min"}, 15),
    ({"final_sigmas_type": "sigma_min", "lower_order_final": False}, 8),
    ({"final_sigmas_type": "sigma_min", "lower_order_final": False, "euler_at_final": True}, 8),
    ({"lambda_min_clipped": -2.0, "timestep_spacing": "linspace"}, 10),
    ({"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}, 10),
    ({"algorithm_type": "deis", "final_sigmas_type": "sigma_min"}, 10),
    ({"algorithm_type": "sde-dpmsolver++"}, 10),
    ({"algorithm_type": "sde-dpmsolver++"}, 20),
    ({"algorithm_type": "sde-dpmsolver++", "solver_order": 1}, 8),
    ({"algorithm_type": "sde-dpmsolver++", "solver_order": 3, "prediction_type": "v_prediction"},
     20),
    ({"algorithm_type": "sde-dpmsolver++", "solver_type": "heun"}, 14),
    ({"algorithm_type": "sde-dpmsolver++", "final_sigmas_type": "sigma_min",
      "lower_order_final": False}, 8),
    ({"algorithm_type": "sde-dpmsolver++", "rescale_betas_zero_snr": True,
      "timestep_spacing": "trailing", "prediction_type": "v_prediction"}, 10),
    ({"use_exponential_sigmas": True}, 10),
    ({"use_exponential_sigmas": True, "algorithm_type": "sde-dpmsolver++", "solver_order": 3},
     20),
    ({"use_beta_sigmas": True, "final_sigmas_type": "sigma_min"}, 12),
    ({"use_beta_sigmas": True, "prediction_type": "v_prediction"}, 10),
    # the eps forms (diffusers allows them with a sigma_min final level only)
    ({"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"}, 10),
    ({"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min", "solver_order": 3,
      "prediction_type": "sample"}, 16),
    ({"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min", "solver_type": "heun",
      "prediction_type": "v_prediction"}, 12),
    ({"algorithm_type": "sde-dpmsolver", "final_sigmas_type": "sigma_min"}, 10),
    ({"algorithm_type": "sde-dpmsolver", "final_sigmas_type": "sigma_min",
      "solver_type": "heun", "prediction_type": "v_prediction"}, 14),
  ],
  ids=[
    "order1",
    "order3-10steps",
    "order3-20steps-v",
    "heun-14steps",
    "sigma_min-15steps",
    "sigma_min-no_lower_order_final",
    "euler_at_final",
    "lambda_min_clipped",
    "zero_snr",
    "deis",
    "sde-10steps",
    "sde-20steps",
    "sde-order1",
    "sde-order3-v",
    "sde-heun",
    "sde-sigma_min",
    "sde-zero_snr-v",
    "exponential",
    "exponential-sde-order3",
    "beta-sigma_min",
    "beta-v",
    "eps",
    "eps-order3-sample",
    "eps-heun-v",
    "sde-eps",
    "sde-eps-heun-v",
  ],
)
def test_options_match_diffusers(options, steps):
  _compare(dict(SD15, **options), steps)


def test_cosine_karras_schedule_matches_diffusers():
  # squaredcos_cap_v2 leaves Karras timesteps unrounded before diffusers' int64 cast. They
  # repeat (998, 998, ...), which trips diffusers' own timestep lookup in a plain loop, so only
  # the schedule is compared here.
  cfg = dict(SD15, beta_schedule="squaredcos_cap_v2")
  ref = RefDPM.from_config(cfg, use_karras_sigmas=True)
  ref.set_timesteps(10)
  state = get_scheduler("dpmpp_2m_karras", cfg).set_timesteps(10, sample_shape=SHAPE)
  np.testing.assert_array_equal(np.asarray(state.timesteps), ref.timesteps.numpy())
  np.testing.assert_allclose(np.asarray(state.sigmas), ref.sigmas.numpy(), rtol=1e-6, atol=0)


@pytest.mark.parametrize(
  "options,karras,steps,strength",
  [
    ({"prediction_type": "epsilon"}, False, 20, 0.6),
    ({"prediction_type": "v_prediction", "timestep_spacing": "trailing"}, True, 10, 0.75),
    ({"solver_order": 3}, False, 12, 0.5),
    ({"algorithm_type": "sde-dpmsolver++"}, True, 10, 0.6),
  ],
)
def test_img2img_matches_diffusers(options, karras, steps, strength):
  # Starting mid-schedule the history is empty: the first step is first order, as diffusers'.
  _compare(dict(SD15, **options), steps, karras=karras, strength=strength)


def test_config_resolves_as_diffusers():
  ours = get_scheduler("dpmpp_2m", SD15)
  ref = RefDPM.from_config(SD15)
  for key, value in ours.cfg.items():
    if key == "k_diffusion":  # sdjax's own option (k-diffusion's conventions): off
      assert key not in ref.config and value is False
    elif key == "s_noise":  # k-diffusion's, of the SDE forms: each draw as it is
      assert key not in ref.config and value == 1.0
    else:
      assert ref.config[key] == value, key
  assert "skip_prk_steps" not in ours.cfg
  assert ours.cfg["timestep_spacing"] == "linspace"
  # The registry's override wins over the checkpoint's own setting.
  karras_cfg = dict(SD15, _class_name="DPMSolverMultistepScheduler", use_karras_sigmas=True)
  assert get_scheduler("dpmpp_2m", karras_cfg).cfg["use_karras_sigmas"] is False
  assert get_scheduler("dpmpp_2m_karras", SD15).cfg["use_karras_sigmas"] is True
  assert default_scheduler_name(karras_cfg) == "dpmpp_2m_karras"
  # DPM++ 2M SDE (Karras): the stochastic form, by name or from a checkpoint's config.
  sde = get_scheduler("dpmpp_2m_sde_karras", SD15)
  assert sde.cfg["algorithm_type"] == "sde-dpmsolver++" and sde.cfg["use_karras_sigmas"]
  assert sde.needs_noise and not get_scheduler("dpmpp_2m", SD15).needs_noise
  sde_cfg = dict(karras_cfg, algorithm_type="sde-dpmsolver++")
  assert default_scheduler_name(sde_cfg) == "dpmpp_2m_sde_karras"
  assert default_scheduler_name(dict(sde_cfg, use_karras_sigmas=False)) == "dpmpp_2m_sde"
  assert default_scheduler_name(dict(sde_cfg, solver_order=3)) == "dpmpp_3m_sde_karras"
  assert default_scheduler_name(dict(sde_cfg, solver_order=3, use_karras_sigmas=False)) == (
    "dpmpp_3m_sde")
  assert default_scheduler_name(dict(karras_cfg, solver_order=3)) == "dpmpp_2m_karras"
  assert default_scheduler_name(dict(sde_cfg, solver_type="heun")) == "dpmpp_2m_sde_heun_karras"


@pytest.mark.parametrize("name,options", [
    ("dpmpp_3m_sde", {"solver_order": 3}),
    ("dpmpp_3m_sde_karras", {"solver_order": 3, "use_karras_sigmas": True}),
    ("dpmpp_2m_sde_heun", {"solver_type": "heun"}),
    ("dpmpp_2m_sde_heun_karras", {"solver_type": "heun", "use_karras_sigmas": True}),
])
def test_named_sde_forms_match_diffusers(name, options):
  """A1111's "DPM++ 3M SDE (Karras)" and "DPM++ 2M SDE Heun (Karras)": diffusers'
  sde-dpmsolver++ at third order, or with its heun solver type, by name."""
  ref = RefDPM.from_config(SD15, algorithm_type="sde-dpmsolver++", **options)
  # the name sets the order and the solver type over the checkpoint's
  ours = get_scheduler(name, dict(SD15, solver_order=2, solver_type="midpoint"))
  assert all(ours.cfg[k] == v for k, v in options.items()) and ours.needs_noise
  init_noise, step_noises = make_noises(20)
  err = max_rel_error(sdjax_trajectory(ours, 20, init_noise, step_noises),
                      diffusers_trajectory(ref, 20, init_noise, step_noises))
  print(f"maxrel {name} {err:.3g}")
  assert err <= TOL, err


@pytest.mark.parametrize(
  "options,option",
  [
    ({"algorithm_type": "sde-dpmsolver"}, "algorithm_type"),  # eps forms: not to sigma 0
    ({"algorithm_type": "dpmsolver"}, "algorithm_type"),
    ({"algorithm_type": "sde-dpmsolver", "final_sigmas_type": "sigma_min", "solver_order": 3},
     "third order"),
    ({"algorithm_type": "deis"}, "algorithm_type"),  # diffusers refuses it with a zero sigma
    ({"thresholding": True}, "thresholding"),
    ({"solver_order": 4}, "solver_order"),
    ({"solver_type": "bogacki"}, "solver_type"),
    ({"use_lu_lambdas": True}, "use_lu_lambdas"),
    ({"use_exponential_sigmas": True, "use_beta_sigmas": True}, "only one of"),
    ({"use_flow_sigmas": True}, "use_flow_sigmas"),
    ({"use_dynamic_shifting": True}, "use_dynamic_shifting"),
    ({"variance_type": "learned_range"}, "variance_type"),
    ({"prediction_type": "flow_prediction"}, "prediction_type"),
    ({"final_sigmas_type": "one"}, "final_sigmas_type"),
    ({"timestep_spacing": "uniform"}, "timestep_spacing"),
  ],
)
def test_unsupported_options_raise(options, option):
  with pytest.raises(SchedulerConfigError, match=option):
    get_scheduler("dpmpp_2m", dict(SD15, **options))


def test_needs_sample_shape_for_history():
  with pytest.raises(ValueError, match="sample_shape"):
    get_scheduler("dpmpp_2m", SD15).set_timesteps(10)
  state = get_scheduler("dpmpp_2m", dict(SD15, solver_order=1)).set_timesteps(10)
  assert state.model_outputs.shape[0] == 0


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction", "sample"])
def test_true_noise_model_recovers_x0(pred):
  # With the true x0 every step (first, second order alike: D1 = 0) lands exactly on
  # alpha_next * x0 + sigma_next * eps, and the last step (sigma = 0) on x0.
  sched = get_scheduler("dpmpp_2m", dict(SD15, prediction_type=pred))
  state = sched.set_timesteps(12, sample_shape=SHAPE)
  rng = np.random.default_rng(3)
  x0 = rng.standard_normal(SHAPE).astype(np.float32)
  eps = rng.standard_normal(SHAPE).astype(np.float32)
  x = sched.add_noise(state, jnp.asarray(x0), jnp.asarray(eps), 0)
  sigmas = np.asarray(state.sigmas, np.float64)
  for i in range(len(state.timesteps)):
    alpha = 1 / np.sqrt(sigmas[i] ** 2 + 1)
    out = {"epsilon": eps, "sample": x0, "v_prediction": alpha * eps - sigmas[i] * alpha * x0}
    x, state = sched.step(state, jnp.asarray(out[pred], jnp.float32), i, x)
  bound = 16 * len(state.timesteps) * np.finfo(np.float32).eps * np.abs(eps).max()
  assert np.abs(np.asarray(x) - x0).max() <= bound


def test_bfloat16_sample_keeps_dtype_and_float32_math():
  sched = get_scheduler("dpmpp_2m", SD15)
  state = sched.set_timesteps(4, sample_shape=SHAPE)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal(SHAPE), jnp.bfloat16)
  out = jnp.asarray(rng.standard_normal(SHAPE), jnp.bfloat16)
  for i in range(2):  # a first-order step, then a second-order one using the history
    prev, new_state = sched.step(state, out, i, x)
    ref, _ = sched.step(state, out.astype(jnp.float32), i, x.astype(jnp.float32))
    assert prev.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(prev), np.asarray(ref.astype(jnp.bfloat16)))
    assert jax.tree.map(lambda a: a.dtype, new_state) == jax.tree.map(lambda a: a.dtype, state)
    state, x = new_state, prev
  assert int(state.lower_order_nums) == 2
  assert sched.add_noise(state, x, out, 1).dtype == jnp.bfloat16


@pytest.mark.parametrize("options,steps,strength", [
    ({}, 10, None),
    ({}, 1, None),
    ({"prediction_type": "v_prediction"}, 12, None),
    ({"sigma_schedule": "exponential"}, 10, None),
    ({"solver_order": 3, "final_sigmas_type": "sigma_min"}, 20, None),
    ({"algorithm_type": "sde-dpmsolver++", "solver_type": "heun"}, 10, None),
    ({"sigma_data": 1.0, "sigma_max": 120.0, "sigma_min": 0.01, "rho": 5.0}, 8, None),
    ({}, 10, 0.6),
    ({"prediction_type": "v_prediction", "algorithm_type": "sde-dpmsolver++"}, 8, 0.4),
], ids=["10steps", "1step", "v", "exponential", "order3-sigma_min", "sde-heun", "other-range",
        "img2img", "img2img-v-sde"])
def test_edm_matches_diffusers(options, steps, strength):
  """EDMDPMSolverMultistepScheduler (Playground v2.5's): EDM preconditioning around the same
  solver, under correctly rounded square roots."""
  from diffusers import EDMDPMSolverMultistepScheduler  # noqa: PLC0415
  from scheduler_harness import edm_parity  # noqa: PLC0415

  # (the SD betas in the config are ignored)
  err = edm_parity("edm_dpmpp_2m", EDMDPMSolverMultistepScheduler, dict(SD15, **options), steps,
                   strength)
  assert err <= TOL, err


def test_edm_config():
  cfg = {"_class_name": "EDMDPMSolverMultistepScheduler", "sigma_max": 80.0, "sigma_min": 0.002,
         "sigma_data": 0.5, "prediction_type": "epsilon"}
  assert default_scheduler_name(cfg) == "edm_dpmpp_2m"
  ours = get_scheduler(None, cfg)
  assert ours.cfg["sigma_schedule"] == "karras" and not ours.needs_noise
  assert get_scheduler(None, dict(cfg, algorithm_type="sde-dpmsolver++")).needs_noise
  # Euler's config carries sigma_min / sigma_max: None; picked by name, EDM takes its defaults
  euler = get_scheduler("edm_dpmpp_2m", {"sigma_min": None, "sigma_max": None})
  assert (euler.cfg["sigma_min"], euler.cfg["sigma_max"]) == (0.002, 80.0)
  for bad, key in [({"prediction_type": "sample"}, "prediction_type"),
                   ({"sigma_schedule": "linear"}, "sigma_schedule"),
                   ({"thresholding": True}, "thresholding")]:
    with pytest.raises(SchedulerConfigError, match=key):
      get_scheduler(None, dict(cfg, **bad))
