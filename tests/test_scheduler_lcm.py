"""sdjax's LCM against diffusers' `LCMScheduler` (v0.42), step by step on a fake model.

LCM noises its denoised sample afresh at every step but the last; the harness hands both sides
the same unit-noise draws.
"""

from __future__ import annotations

import diffusers
import jax.numpy as jnp
import numpy as np
import pytest
from scheduler_harness import PLAIN_TOL, SHAPE, make_noises, parity_errors

from sdjax import testing
from sdjax.schedulers import SchedulerConfigError, default_scheduler_name, get_scheduler
from sdjax.schedulers.common import make_alphas_cumprod
from sdjax.schedulers.lcm import LCMScheduler

TOL = 1e-6
SD15 = dict(testing.SCHEDULER_SD15)  # Stable Diffusion 1.5's scheduler_config.json


def _case(overrides, steps, strength=None):
  parts = [f"{k}={v}" for k, v in overrides.items()] + [f"steps={steps}"]
  parts += [f"strength={strength}"] if strength is not None else []
  return pytest.param(overrides, steps, strength, id=",".join(parts))


CASES = (
  # LCM-LoRA's usual 2-8 steps; 1 step (no fresh noise at all); the whole distillation schedule.
  [_case({}, n) for n in (1, 2, 4, 8, 50)]
  + [_case({"prediction_type": p}, 4) for p in ("v_prediction", "sample")]
  # Other distillation schedules and boundary-condition scalings; 7 does not divide 50 or 1000.
  + [_case({"original_inference_steps": 25}, 7), _case({"original_inference_steps": 7}, 3)]
  + [_case({"timestep_scaling": 1.0}, 4), _case({"clip_sample": True}, 6)]
  + [_case({"rescale_betas_zero_snr": True, "prediction_type": "v_prediction"}, 4)]
  # img2img: the run starts part-way, from add_noise, as StableDiffusionImg2ImgPipeline does.
  + [_case({}, 8, strength=0.5), _case({}, 4, strength=0.3)]
)


@pytest.mark.parametrize("overrides,steps,strength", CASES)
def test_matches_diffusers(overrides, steps, strength):
  config = {**SD15, **overrides}
  parity = parity_errors(
    get_scheduler("lcm", config),
    lambda: diffusers.LCMScheduler.from_config(config),
    steps,
    strength=strength,
  )
  assert parity.exact_sqrt <= TOL
  assert parity.plain <= PLAIN_TOL and parity.plain_timesteps_equal


def test_from_config_resolves_like_diffusers():
  config = {**SD15, "unknown_key": 3, "original_inference_steps": 20}
  ours = get_scheduler("lcm", config)
  ref = diffusers.LCMScheduler.from_config(config)
  for key in LCMScheduler._DEFAULTS:
    assert ours.cfg[key] == ref.config[key], key
  assert "unknown_key" not in ours.cfg
  assert default_scheduler_name(dict(ref.config)) == "lcm"  # an LCM checkpoint's own


@pytest.mark.parametrize("steps", [0, 51])
def test_steps_beyond_the_distillation_schedule_raise(steps):
  state_error = "lcm takes 1 to original_inference_steps=50 steps"
  with pytest.raises(ValueError, match=state_error):
    get_scheduler("lcm", SD15).set_timesteps(steps)


@pytest.mark.parametrize("option", [{"thresholding": True}, {"prediction_type": "flow"},
                                    {"beta_schedule": "sigmoid"}],
                         ids=lambda o: "=".join(map(str, next(iter(o.items())))))
def test_unsupported_options_raise(option):
  with pytest.raises(SchedulerConfigError, match=next(iter(option))):
    get_scheduler("lcm", {**SD15, **option})


def test_true_noise_model_lands_on_the_clean_sample():
  """A model that knows the noise of x_t around x0 predicts x0 exactly, and the boundary
  condition keeps little of x_t (c_skip = 1 / (400 t^2 + 1): 4e-8 at the last t = 259), so with
  no fresh noise the last step lands on x0."""
  sched = get_scheduler("lcm", SD15)
  state = sched.set_timesteps(4, SHAPE)
  clean, noise = make_noises(1, seed=3)
  clean, noise = jnp.asarray(clean), jnp.asarray(noise[0])
  alphas_cumprod = make_alphas_cumprod(sched.cfg)
  x = sched.add_noise(state, clean, noise, 0)
  for i in range(len(state.timesteps)):
    a = np.float32(alphas_cumprod[int(state.timesteps[i])])
    true_noise = (x - np.sqrt(a) * clean) / np.sqrt(1 - a)
    x, state = sched.step(state, true_noise, i, x, jnp.zeros(SHAPE))
  np.testing.assert_allclose(np.asarray(x), np.asarray(clean), rtol=0, atol=1e-4)
