"""sdjax's LMS against diffusers' `LMSDiscreteScheduler` (v0.42), step by step on a fake model."""

from __future__ import annotations

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scheduler_harness import (
  PLAIN_TOL,
  SHAPE,
  correctly_rounded_sqrt,
  make_noises,
  parity_errors,
)

from sdjax import testing
from sdjax.schedulers import SchedulerConfigError, default_scheduler_name, get_scheduler
from sdjax.schedulers.lms import LMSDiscreteScheduler, gauss_kronrod_21, lms_coefficients

TOL = 1e-6
SD15 = dict(testing.SCHEDULER_SD15)  # Stable Diffusion 1.5's scheduler_config.json
LINEAR = {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02, "steps_offset": 0}
PREDICTIONS = ("epsilon", "v_prediction", "sample")
SPACINGS = ("leading", "trailing", "linspace")


def _case(overrides, steps, strength=None):
  parts = [f"{k}={v}" for k, v in overrides.items()] + [f"steps={steps}"]
  parts += [f"strength={strength}"] if strength is not None else []
  return pytest.param(overrides, steps, strength, id=",".join(parts))


# With sample-prediction each step takes sample - (sample - model_output) / sigma * d_sigma, which
# cancels ~sigma_max / |x0| ~ 30-fold, and torch's CPU sqrt (MKL, not correctly rounded) moves a
# few of diffusers' float32 sigmas by one bit: those cases exceed 1e-6 against plain diffusers on
# some CPUs (about 1.1e-6), as others may elsewhere. Every case is held to diffusers with
# correctly rounded square roots; plain diffusers to `PLAIN_TOL`.
CASES = (
  [
    _case({"prediction_type": p, "timestep_spacing": s}, 10)
    for p in PREDICTIONS
    for s in SPACINGS
  ]
  + [_case({"prediction_type": "v_prediction"}, 1)]
  + [_case({"prediction_type": p}, 25) for p in ("epsilon", "v_prediction")]
  + [_case({"prediction_type": "sample"}, n) for n in (1, 25)]
  + [_case({}, 4)]
  + [_case({**LINEAR, "prediction_type": p}, 10) for p in ("epsilon", "v_prediction")]
  + [_case({**LINEAR, "timestep_spacing": "leading", "prediction_type": "sample"}, 4)]
  + [_case({"use_karras_sigmas": True}, 10)]
  + [_case({"use_karras_sigmas": True, "prediction_type": "v_prediction"}, 10)]
  + [_case({"use_exponential_sigmas": True}, 10)]
  + [_case({"use_beta_sigmas": True, "prediction_type": "v_prediction"}, 10)]
  # img2img: the run starts part-way, its first steps with a short history but diffusers'
  # higher-order coefficients of that position.
  + [_case({}, 10, strength=0.6)]
  + [_case({"timestep_spacing": "trailing", "prediction_type": "v_prediction"}, 10, strength=0.3)]
  + [_case({"timestep_spacing": "leading", "prediction_type": "sample"}, 10, 0.5)]
)


@pytest.mark.parametrize("overrides,steps,strength", CASES)
def test_matches_diffusers(overrides, steps, strength):
  config = {**SD15, **overrides}
  parity = parity_errors(
    get_scheduler("lms_karras" if overrides.get("use_karras_sigmas") else "lms", config),
    lambda: diffusers.LMSDiscreteScheduler.from_config(config),
    steps,
    strength=strength,
  )
  assert parity.exact_sqrt <= TOL and parity.plain <= PLAIN_TOL, parity
  # Karras (exponential, beta) timesteps are interpolated in log of the training sigmas, so the last bit of torch's
  # sqrt reaches them too; parity_errors asserts them equal under correctly rounded sqrt.
  assert parity.plain_timesteps_equal or any(
    overrides.get(f"use_{kind}_sigmas") for kind in ("karras", "exponential", "beta"))


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="bit-exactness is checked on CPU")
def test_bit_exact_with_correctly_rounded_sqrt():
  """With torch's square roots correctly rounded, the trajectories agree to the last bit."""
  config = {**SD15, "prediction_type": "sample", "timestep_spacing": "trailing"}
  parity = parity_errors(
    get_scheduler("lms", config), lambda: diffusers.LMSDiscreteScheduler.from_config(config), 25
  )
  assert parity.exact_sqrt == 0.0, parity


@pytest.mark.parametrize(
  "overrides,steps",
  [({}, 50), ({"timestep_spacing": "trailing"}, 7), ({"use_karras_sigmas": True}, 25)],
  ids=["linspace-50", "trailing-7", "karras-25"],
)
def test_coefficients_are_diffusers_quad_results(overrides, steps):
  """Every coefficient equals diffusers' scipy.integrate.quad of its float32 integrand."""
  with correctly_rounded_sqrt():  # the same sigmas on both sides
    ref = diffusers.LMSDiscreteScheduler.from_config({**SD15, **overrides})
    ref.set_timesteps(steps)
    sigmas = ref.sigmas.numpy()
    want = np.zeros((steps, 4), np.float32)
    for p in range(steps):
      order = min(p + 1, 4)
      for k in range(order):
        want[p, k] = ref.get_lms_coefficient(order, p, k)
  np.testing.assert_array_equal(lms_coefficients(sigmas), want)


def test_gauss_kronrod_is_exact_for_polynomials():
  rng = np.random.default_rng(0)
  coeffs = rng.standard_normal(8)  # degree 7 << 31, the rule's degree of exactness
  a, b = 14.6, 3.2
  exact = np.polynomial.polynomial.polyval(b, np.polynomial.polynomial.polyint(coeffs))
  exact -= np.polynomial.polynomial.polyval(a, np.polynomial.polynomial.polyint(coeffs))
  got = gauss_kronrod_21(lambda t: np.polynomial.polynomial.polyval(t, coeffs), a, b)
  assert abs(got - exact) <= 1e-12 * abs(exact)


def test_karras_name():
  """A1111's "LMS Karras": lms with Karras sigmas, by name or from a checkpoint's config."""
  assert get_scheduler("lms_karras", SD15).cfg["use_karras_sigmas"] is True
  assert get_scheduler("lms", {**SD15, "use_karras_sigmas": True}).cfg["use_karras_sigmas"] is False
  config = {**SD15, "_class_name": "LMSDiscreteScheduler", "use_karras_sigmas": True}
  assert default_scheduler_name(config) == "lms_karras"


def test_from_config_resolves_like_diffusers():
  config = {**SD15, "unknown_key": 3, "timestep_spacing": "trailing"}
  ours = get_scheduler("lms", config)
  ref = diffusers.LMSDiscreteScheduler.from_config(config)
  for key in LMSDiscreteScheduler._DEFAULTS:
    if key == "lms_order":  # sdjax's (k-diffusion's order; diffusers': step's, at 4)
      assert key not in ref.config and ours.cfg[key] == 4
    else:
      assert ours.cfg[key] == ref.config[key], key
  assert "unknown_key" not in ours.cfg and "set_alpha_to_one" not in ours.cfg
  bare = LMSDiscreteScheduler.from_config({}, prediction_type="sample")
  assert bare.cfg["timestep_spacing"] == "linspace" and bare.cfg["prediction_type"] == "sample"


@pytest.mark.parametrize(
  "option",
  [
    {"prediction_type": "flow"},
    {"timestep_spacing": "karras"},
    {"beta_schedule": "sigmoid"},
  ],
  ids=lambda o: next(iter(o)),
)
def test_unsupported_options_raise(option):
  key = next(iter(option))
  with pytest.raises(SchedulerConfigError, match=key):
    get_scheduler("lms", {**SD15, **option})


def test_history_needs_the_sample_shape():
  with pytest.raises(ValueError, match="sample_shape"):
    get_scheduler("lms", SD15).set_timesteps(10)


def test_true_noise_model_recovers_the_clean_sample():
  """x = x0 + sigma * eps with eps known: the ODE derivative is constant, and the Lagrange
  weights of each step sum to its sigma interval, so every step lands on the next x."""
  sched = get_scheduler("lms", SD15)
  state = sched.set_timesteps(10, SHAPE)
  clean, noise = make_noises(1, seed=3)
  clean, noise = jnp.asarray(clean), jnp.asarray(noise[0])
  x = sched.add_noise(state, clean, noise, 0)
  for i in range(len(state.timesteps)):
    x, state = sched.step(state, noise, i, x)
  np.testing.assert_allclose(np.asarray(x), np.asarray(clean), rtol=0, atol=2e-5)


def test_bfloat16_sample_keeps_its_dtype_with_float32_math():
  sched = get_scheduler("lms", {**SD15, "prediction_type": "v_prediction"})
  state = sched.set_timesteps(10, SHAPE)
  init, steps = make_noises(3)
  for i in range(3):
    x, out = jnp.asarray(init, jnp.bfloat16), jnp.asarray(steps[i], jnp.bfloat16)
    got, state_bf16 = sched.step(state, out, i, x)
    want, state = sched.step(state, out.astype(jnp.float32), i, x.astype(jnp.float32))
    assert got.dtype == jnp.bfloat16 and state_bf16.derivatives.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want.astype(jnp.bfloat16)))
  scaled = sched.scale_model_input(state, jnp.asarray(init, jnp.bfloat16), 0)
  assert scaled.dtype == jnp.bfloat16
