"""sdjax's DDPM against diffusers' `DDPMScheduler` (v0.42), step by step on a fake model.

DDPM adds fresh noise at every step but the one from t = 0; the harness hands both sides the same
unit-noise draws.
"""

from __future__ import annotations

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scheduler_harness import PLAIN_TOL, SHAPE, make_noises, parity_errors

from sdjax import testing
from sdjax.schedulers import SchedulerConfigError, get_scheduler
from sdjax.schedulers.common import make_alphas_cumprod
from sdjax.schedulers.ddpm import DDPMScheduler

TOL = 1e-6
SD15 = dict(testing.SCHEDULER_SD15)  # Stable Diffusion 1.5's scheduler_config.json
LINEAR = {
  "beta_schedule": "linear",
  "beta_start": 0.0001,
  "beta_end": 0.02,
  "steps_offset": 0,
  "clip_sample": True,
}
PREDICTIONS = ("epsilon", "v_prediction", "sample")
SPACINGS = ("leading", "trailing", "linspace")
V_PRED = {"prediction_type": "v_prediction"}


def _case(overrides, steps, strength=None):
  parts = [f"{k}={v}" for k, v in overrides.items()] + [f"steps={steps}"]
  parts += [f"strength={strength}"] if strength is not None else []
  return pytest.param(overrides, steps, strength, id=",".join(parts))


CASES = (
  [_case({"prediction_type": p, "timestep_spacing": s}, 10) for p in PREDICTIONS for s in SPACINGS]
  + [_case({"prediction_type": p}, 1) for p in ("epsilon", "v_prediction")]
  + [_case({"prediction_type": p}, 25) for p in PREDICTIONS]
  + [_case({}, 4)]
  # Ends on t = 0, where no noise is added.
  + [_case({**LINEAR, "prediction_type": p}, 10) for p in ("epsilon", "v_prediction")]
  + [_case({**LINEAR, "timestep_spacing": "trailing", "prediction_type": "sample"}, 4)]
  + [_case({"variance_type": "fixed_small_log"}, 10)]
  + [_case({"variance_type": "fixed_large", "prediction_type": "v_prediction"}, 10)]
  # img2img: the run starts part-way, from add_noise.
  + [_case({}, 10, strength=0.6)]
  + [_case({"timestep_spacing": "trailing", "prediction_type": "v_prediction"}, 10, strength=0.3)]
  # Zero terminal SNR (SD 2.1's recipe); epsilon would divide by alpha_prod = 0 there.
  + [_case({"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"} | V_PRED, 10)]
)


@pytest.mark.parametrize("overrides,steps,strength", CASES)
def test_matches_diffusers(overrides, steps, strength):
  config = {**SD15, **overrides}
  parity = parity_errors(
    get_scheduler("ddpm", config),
    lambda: diffusers.DDPMScheduler.from_config(config),
    steps,
    strength=strength,
  )
  assert parity.exact_sqrt <= TOL
  assert parity.plain <= PLAIN_TOL and parity.plain_timesteps_equal


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="bit-exactness is checked on CPU")
def test_bit_exact_with_correctly_rounded_sqrt():
  """With torch's CPU square roots correctly rounded, 50 noisy steps agree to the last bit."""
  config = {**SD15, "prediction_type": "v_prediction", "timestep_spacing": "linspace"}
  parity = parity_errors(
    get_scheduler("ddpm", config), lambda: diffusers.DDPMScheduler.from_config(config), 50
  )
  assert parity.exact_sqrt == 0.0, parity


def test_from_config_resolves_like_diffusers():
  config = {**SD15, "unknown_key": 3, "variance_type": "fixed_large"}
  ours = get_scheduler("ddpm", config)
  ref = diffusers.DDPMScheduler.from_config(config)
  for key in DDPMScheduler._DEFAULTS:
    assert ours.cfg[key] == ref.config[key], key
  assert "unknown_key" not in ours.cfg and "set_alpha_to_one" not in ours.cfg
  bare = DDPMScheduler.from_config({}, prediction_type="sample")
  assert bare.cfg["clip_sample"] is True and bare.cfg["prediction_type"] == "sample"


@pytest.mark.parametrize(
  "option",
  [
    {"thresholding": True},
    {"variance_type": "learned"},
    {"variance_type": "learned_range"},
    {"variance_type": "fixed_large_log"},
    {"prediction_type": "flow"},
    {"timestep_spacing": "karras"},
    {"beta_schedule": "sigmoid"},
  ],
  ids=lambda o: "=".join(map(str, next(iter(o.items())))),
)
def test_unsupported_options_raise(option):
  key = next(iter(option))
  with pytest.raises(SchedulerConfigError, match=key):
    get_scheduler("ddpm", {**SD15, **option})


def test_step_needs_noise():
  sched = get_scheduler("ddpm", SD15)
  assert sched.needs_noise
  state = sched.set_timesteps(4)
  x = jnp.zeros(SHAPE)
  with pytest.raises(ValueError, match="noise"):
    sched.step(state, x, 0, x)


def test_true_noise_model_without_fresh_noise_recovers_the_clean_sample():
  """A model that knows the noise of x_t = sqrt(a) x0 + sqrt(1 - a) eps walks DDPM to x0.

  It makes every x0 prediction exact, and the last posterior mean (to alpha_prod = 1) is x0.
  """
  sched = get_scheduler("ddpm", {**SD15, "steps_offset": 0})
  state = sched.set_timesteps(10, SHAPE)
  clean, noise = make_noises(1, seed=3)
  clean, noise = jnp.asarray(clean), jnp.asarray(noise[0])
  alphas_cumprod = make_alphas_cumprod(sched.cfg)
  x = sched.add_noise(state, clean, noise, 0)
  for i in range(len(state.timesteps)):
    a = np.float32(alphas_cumprod[int(state.timesteps[i])])
    true_noise = (x - np.sqrt(a) * clean) / np.sqrt(1 - a)
    x, state = sched.step(state, true_noise, i, x, jnp.zeros(SHAPE))
  np.testing.assert_allclose(np.asarray(x), np.asarray(clean), rtol=0, atol=2e-5)


def test_bfloat16_sample_keeps_its_dtype_with_float32_math():
  sched = get_scheduler("ddpm", {**SD15, "prediction_type": "v_prediction"})
  state = sched.set_timesteps(10, SHAPE)
  init, steps = make_noises(2)
  x, out = jnp.asarray(init, jnp.bfloat16), jnp.asarray(steps[0], jnp.bfloat16)
  noise = jnp.asarray(steps[1], jnp.bfloat16)
  got, _ = sched.step(state, out, 3, x, noise)
  f32 = jnp.float32
  want, _ = sched.step(state, out.astype(f32), 3, x.astype(f32), noise.astype(f32))
  assert got.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want.astype(jnp.bfloat16)))


def test_parallel_class_is_the_same_scheduler():
  """A checkpoint shipping diffusers' DDPMParallelScheduler (its config, its step) gets
  ddpm."""
  config = {**SD15, "_class_name": "DDPMParallelScheduler", "prediction_type": "v_prediction"}
  parity = parity_errors(get_scheduler(None, config),
                         lambda: diffusers.DDPMParallelScheduler.from_config(config), 10)
  assert parity.exact_sqrt == 0.0 and parity.plain <= PLAIN_TOL, parity
