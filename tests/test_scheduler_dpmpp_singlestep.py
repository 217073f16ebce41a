"""DPM-Solver singlestep against diffusers' DPMSolverSinglestepScheduler, step by step, on a fake
model (its SDE form with the same noise injected into both): as is and with torch's square roots
correctly rounded (`correctly_rounded_sqrt`); parity is held against the
latter (the former depends on the CPU: `scheduler_harness.PLAIN_TOL`)."""

from __future__ import annotations

import numpy as np
import pytest
from diffusers import DPMSolverSinglestepScheduler as RefSinglestep
from scheduler_harness import PLAIN_TOL, SHAPE, integer_timestep_parity

from sdjax import testing
from sdjax.schedulers import SchedulerConfigError, default_scheduler_name, get_scheduler

SD15 = dict(testing.SCHEDULER_SD15)
TOL = 1e-6
SIGMA_MIN = {"final_sigmas_type": "sigma_min"}
EPS = {"algorithm_type": "dpmsolver", **SIGMA_MIN}
SDE = {"algorithm_type": "sde-dpmsolver++"}


@pytest.mark.parametrize("options,steps,strength", [
  ({}, 10, None),
  ({}, 9, None),  # a step count the order does not divide
  ({"solver_order": 3}, 12, None),
  ({"solver_order": 3, "solver_type": "heun"}, 13, None),
  ({"solver_order": 1}, 5, None),
  ({"prediction_type": "v_prediction"}, 12, None),
  ({"prediction_type": "sample", "solver_order": 3}, 16, None),
  ({"use_karras_sigmas": True}, 10, None),
  ({"use_exponential_sigmas": True, "solver_order": 3}, 20, None),
  ({"use_beta_sigmas": True, "solver_type": "heun"}, 10, None),
  ({"solver_order": 3, **SIGMA_MIN}, 12, None),  # no lower order at the end
  (SIGMA_MIN, 9, None),  # lower at the end: the order does not divide the steps
  ({"lambda_min_clipped": -2.0}, 10, None),
  (EPS, 10, None),
  ({**EPS, "solver_order": 3, "solver_type": "heun", "prediction_type": "v_prediction"}, 12,
   None),
  ({**EPS, "solver_order": 3, "prediction_type": "sample"}, 12, None),
  (SDE, 10, None),
  ({**SDE, "solver_order": 3, "solver_type": "heun"}, 12, None),
  ({**SDE, "solver_order": 3}, 13, None),
  ({"solver_order": 3}, 20, 0.6),  # img2img: the first steps lower their order
  ({}, 20, 0.55),
], ids=["10steps", "9steps", "order3", "order3-heun", "order1", "v", "sample-order3", "karras",
        "exponential-order3", "beta-heun", "order3-sigma_min", "sigma_min-9steps",
        "lambda_min_clipped", "eps",
        "eps-order3-heun-v", "eps-order3-sample", "sde", "sde-order3-heun", "sde-order3",
        "img2img-order3", "img2img"])
def test_matches_diffusers(options, steps, strength):
  cfg = dict(SD15, **options)
  ours = get_scheduler("dpmpp_2s_karras" if options.get("use_karras_sigmas") else "dpmpp_2s",
                       cfg)
  errors, ref = integer_timestep_parity(ours, lambda: RefSinglestep.from_config(cfg), steps,
                                        strength=strength)
  print(f"dpmpp_2s {options}: {errors}")
  plain, exact = errors
  assert exact <= TOL and plain <= PLAIN_TOL, errors
  state = ours.set_timesteps(steps, sample_shape=SHAPE)
  assert np.asarray(state.orders).tolist() == ref.order_list


def test_config_resolves_as_diffusers():
  """A checkpoint shipping the singlestep solver gets it (its Karras form too); what diffusers
  refuses or sdjax lacks is an error, not ignored."""
  config = dict(SD15, _class_name="DPMSolverSinglestepScheduler")
  assert default_scheduler_name(config) == "dpmpp_2s"
  assert default_scheduler_name(dict(config, use_karras_sigmas=True)) == "dpmpp_2s_karras"
  assert get_scheduler(None, dict(config, algorithm_type="deis")).cfg["algorithm_type"] == (
    "dpmsolver++")
  for bad in ({"algorithm_type": "dpmsolver"}, {"thresholding": True}, {"solver_order": 4},
              {"variance_type": "learned_range"}, {"algorithm_type": "sde-dpmsolver"}):
    with pytest.raises(SchedulerConfigError):
      get_scheduler("dpmpp_2s", dict(SD15, **bad))
  with pytest.raises(ValueError, match="sample_shape"):
    get_scheduler("dpmpp_2s", SD15).set_timesteps(10)
