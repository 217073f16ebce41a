"""DEIS against diffusers' DEISMultistepScheduler, step by step, on a fake model: as is and with
torch's square roots correctly rounded (`correctly_rounded_sqrt`); parity is held against
the latter (the former depends on the CPU: `scheduler_harness.PLAIN_TOL`)."""

from __future__ import annotations

import pytest
from diffusers import DEISMultistepScheduler as RefDEIS
from scheduler_harness import PLAIN_TOL, integer_timestep_parity

from sdjax import testing
from sdjax.schedulers import SchedulerConfigError, default_scheduler_name, get_scheduler

SD15 = dict(testing.SCHEDULER_SD15)
TOL = 1e-6


@pytest.mark.parametrize("options,steps,strength", [
  ({}, 10, None),  # lower_order_final: the last two steps first and second order
  ({}, 20, None),
  ({"solver_order": 3}, 16, None),
  ({"solver_order": 3, "timestep_spacing": "leading", "steps_offset": 1}, 20, 0.6),
  ({"solver_order": 1, "timestep_spacing": "trailing"}, 8, None),
  ({"prediction_type": "v_prediction", "solver_order": 3}, 12, None),
  ({"prediction_type": "sample", "solver_order": 3}, 16, None),
  ({"use_karras_sigmas": True}, 10, None),
  ({"use_exponential_sigmas": True, "solver_order": 3}, 20, None),
  ({"use_beta_sigmas": True}, 10, None),
  ({"lower_order_final": False, "solver_order": 3}, 8, None),
  ({}, 20, 0.5),
], ids=["10steps", "20steps", "order3-16steps", "order3-leading-img2img", "order1-trailing",
        "v-order3", "sample-order3", "karras", "exponential-order3", "beta",
        "no_lower_order_final", "img2img"])
def test_matches_diffusers(options, steps, strength):
  cfg = dict(SD15, **options)
  ours = get_scheduler("deis", cfg)
  errors, ref = integer_timestep_parity(ours, lambda: RefDEIS.from_config(cfg), steps,
                                        strength=strength)
  print(f"deis {options}: {errors}")
  plain, exact = errors
  assert exact <= TOL and plain <= PLAIN_TOL, errors


def test_config_resolves_as_diffusers():
  """A checkpoint shipping DEIS gets it; diffusers' substitutions of the other algorithm and
  solver names; what sdjax lacks is an error, not ignored."""
  config = dict(SD15, _class_name="DEISMultistepScheduler")
  assert default_scheduler_name(config) == "deis"
  ours = get_scheduler(None, dict(config, algorithm_type="dpmsolver++", solver_type="midpoint"))
  ref = RefDEIS.from_config(dict(config, algorithm_type="dpmsolver++", solver_type="midpoint"))
  assert (ours.cfg["algorithm_type"], ours.cfg["solver_type"]) == (
    ref.config.algorithm_type, ref.config.solver_type) == ("deis", "logrho")
  for bad in ({"thresholding": True}, {"use_flow_sigmas": True}, {"solver_order": 4},
              {"use_karras_sigmas": True, "use_beta_sigmas": True}):
    with pytest.raises(SchedulerConfigError):
      get_scheduler("deis", dict(SD15, **bad))
  with pytest.raises(SchedulerConfigError, match="places its own noise levels"):
    get_scheduler("deis", SD15, options={"schedule_type": "sgm_uniform"})
  with pytest.raises(ValueError, match="sample_shape"):
    get_scheduler("deis", SD15).set_timesteps(10)
