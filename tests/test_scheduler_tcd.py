"""sdjax's TCD against diffusers' `TCDScheduler` (v0.42), step by step on a fake model.

TCD's gamma is diffusers' `step(eta=...)`: the harness's reference passes it to every step, and
hands both sides the same unit-noise draws (none after the last step, none at gamma 0).
"""

from __future__ import annotations

import functools

import diffusers
import pytest
from scheduler_harness import PLAIN_TOL, parity_errors

from sdjax import testing
from sdjax.schedulers import SchedulerConfigError, get_scheduler

TOL = 1e-6
SD15 = dict(testing.SCHEDULER_SD15)  # Stable Diffusion 1.5's scheduler_config.json


class _GammaTCD(diffusers.TCDScheduler):
  """diffusers' TCDScheduler with a fixed gamma, as a pipeline passes `eta` to every step."""

  gamma = 0.0

  def step(self, *args, **kwargs):
    return super().step(*args, eta=self.gamma, **kwargs)


def _reference(config, gamma):
  # In diffusers' module, where the harness hands `randn_tensor` our draws.
  cls = type("TCD", (_GammaTCD,), {"gamma": gamma, "__module__": diffusers.TCDScheduler.__module__})
  return cls.from_config(config)


def _case(overrides, steps, gamma, strength=None):
  parts = [f"{k}={v}" for k, v in overrides.items()] + [f"steps={steps}", f"gamma={gamma}"]
  parts += [f"strength={strength}"] if strength is not None else []
  return pytest.param(overrides, steps, gamma, strength, id=",".join(parts))


CASES = (
  [_case({}, n, g) for n in (1, 2, 4, 8) for g in (0.0, 0.3)]
  + [_case({}, 4, 1.0), _case({}, 50, 0.5)]
  + [_case({"prediction_type": p}, 4, 0.3) for p in ("v_prediction", "sample")]
  + [_case({"original_inference_steps": 25}, 7, 0.3), _case({"clip_sample": True}, 4, 0.0)]
  + [_case({}, 8, 0.3, strength=0.5), _case({}, 4, 0.0, strength=0.6)]
)


def test_custom_timesteps_match_diffusers():
  """diffusers' `set_timesteps(timesteps=...)` (the `timesteps` option; one compiled program
  for any list of a length)."""
  timesteps = [999, 759, 499, 259]

  def reference():
    ref = _reference(SD15, 0.3)
    set_timesteps = ref.set_timesteps
    ref.set_timesteps = lambda steps, device=None: set_timesteps(timesteps=timesteps,
                                                                 device=device)
    return ref

  ours = get_scheduler("tcd", SD15, eta=0.3, options={"timesteps": timesteps})
  parity = parity_errors(ours, reference, len(timesteps))
  assert parity.exact_sqrt <= TOL and parity.plain <= PLAIN_TOL
  assert ours.program() == get_scheduler("tcd", SD15, eta=0.5).program()


@pytest.mark.parametrize("overrides,steps,gamma,strength", CASES)
def test_matches_diffusers(overrides, steps, gamma, strength):
  config = {**SD15, **overrides}
  parity = parity_errors(get_scheduler("tcd", config, eta=gamma),
                         functools.partial(_reference, config, gamma), steps, strength=strength)
  assert parity.exact_sqrt <= TOL
  assert parity.plain <= PLAIN_TOL and parity.plain_timesteps_equal


def test_gamma_shares_one_program():
  """gamma's value is in the state: every gamma > 0 compiles one program (as DDIM's eta)."""
  a, b = (get_scheduler("tcd", SD15, eta=g) for g in (0.3, 0.7))
  assert a.program() == b.program() and a.needs_noise
  assert not get_scheduler("tcd", SD15).needs_noise


@pytest.mark.parametrize("eta", [-0.1, 1.5])
def test_gamma_out_of_range_raises(eta):
  with pytest.raises(SchedulerConfigError, match=r"eta \(gamma\) must be in \[0, 1\]"):
    get_scheduler("tcd", SD15, eta=eta)
