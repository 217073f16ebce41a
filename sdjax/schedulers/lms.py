"""Linear multistep (k-diffusion's LMS sampler), as diffusers' `LMSDiscreteScheduler`.

Each step integrates the Lagrange polynomial through the last (up to 4, or the `lms_order`
option: k-diffusion's and ComfyUI's `order`) ODE derivatives over the next sigma interval. The
timesteps are static, so all those integrals are computed on the host when the schedule is set,
one row of coefficients per position and order.

diffusers computes each coefficient with `scipy.integrate.quad` of an integrand evaluated in
float32 torch arithmetic. That integrand is a polynomial of degree < order in sigma, but its
float32 rounding noise makes the exact integral differ from diffusers' coefficients by up to ~4e-7
relative, which changes about half of them after the cast to float32. quad's first pass (QUADPACK's
21-point Gauss-Kronrod rule) already meets its tolerance on such an integrand, so replaying that
rule on the same float32 integrand values reproduces quad's result to the last float64 bit,
without scipy at run time.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax.numpy as jnp
import numpy as np
from flax import struct

from sdjax.schedulers.common import (
  Scheduler,
  SchedulerConfigError,
  hashable_config,
  resolve_config,
  rounded,
  true_divide,
)
from sdjax.schedulers.euler import (
  check_common,
  init_sigma,
  input_scales,
  sigma_schedule,
  train_alphas_cumprod,
)
from sdjax.schedulers.sigma_schedules import (
  COMFYUI,
  DISCARD_PENULTIMATE,
  DOWNCAST_ALPHAS_CUMPROD,
  K_DIFFUSION,
  SCHEDULE_OPTIONS,
  SGM_NOISE_MULTIPLIER,
  ZERO_SNR,
)

_MAX_ORDER = 4  # diffusers' pipelines', k-diffusion's and ComfyUI's default
# sdjax's option: how many derivatives a step integrates at most (k-diffusion's `order`, ComfyUI's
# SamplerLMS order; diffusers' `step(order=...)`, which its pipelines leave at 4). A config
# option: it sizes the history the compiled steps keep.
LMS_ORDER = "lms_order"
LMS_ORDERS = range(1, 11)


def check_lms_order(scheduler_name: str, order) -> None:
  if isinstance(order, bool) or not isinstance(order, int) or order not in LMS_ORDERS:
    raise SchedulerConfigError(
      f"scheduler {scheduler_name!r}: {LMS_ORDER} must be an integer from {LMS_ORDERS[0]} to "
      f"{LMS_ORDERS[-1]} (the most derivatives a step integrates), got {order!r}")

# QUADPACK dqk21: abscissae of the 21-point Kronrod rule on [-1, 1] (the positive half, ending with
# the centre; odd 1-based entries are the Kronrod-only nodes, even ones the 10-point Gauss nodes),
# and their Kronrod weights.
_KRONROD_NODES = np.array(
  [
    0.995657163025808080735527280689003,
    0.973906528517171720077964012084452,
    0.930157491355708226001207180059508,
    0.865063366688984510732096688423493,
    0.780817726586416897063717578345042,
    0.679409568299024406234327365114874,
    0.562757134668604683339000099272694,
    0.433395394129247190799265943165784,
    0.294392862701460198131126603103866,
    0.148874338981631210884826001129720,
    0.000000000000000000000000000000000,
  ]
)
_KRONROD_WEIGHTS = np.array(
  [
    0.011694638867371874278064396062192,
    0.032558162307964727478818972459390,
    0.054755896574351996031381300244580,
    0.075039674810919952767043140916190,
    0.093125454583697605535065465083366,
    0.109387158802297641899210590325805,
    0.123491976262065851077958109831074,
    0.134709217311473325928054001771707,
    0.142775938577060080797094273138717,
    0.147739104901338491374841515972068,
    0.149445554002916905664936468389821,
  ]
)
# QUADPACK's summation order: the centre, then the Gauss pairs, then the Kronrod-only pairs.
_PAIR_ORDER = (1, 3, 5, 7, 9, 0, 2, 4, 6, 8)


def gauss_kronrod_21(f, a: float, b: float) -> float:
  """QUADPACK's 21-point Gauss-Kronrod estimate of the integral of `f` from a to b.

  `f` maps a float64 array of abscissae to float64 values; the sum runs in QUADPACK's order so
  the result matches `scipy.integrate.quad` whenever quad stops after its first pass.
  """
  centre, half = 0.5 * (a + b), 0.5 * (b - a)
  offsets = half * _KRONROD_NODES[list(_PAIR_ORDER)]
  values = f(np.concatenate([[centre], centre - offsets, centre + offsets]))
  total = _KRONROD_WEIGHTS[10] * values[0]
  for j, node in enumerate(_PAIR_ORDER):
    total += _KRONROD_WEIGHTS[node] * (values[1 + j] + values[11 + j])
  return total * half


def lms_coefficients(sigmas: np.ndarray, max_order: int = _MAX_ORDER) -> np.ndarray:
  """[n, max_order] float32 LMS coefficients of each position (newest derivative first).

  Row p holds diffusers' `get_lms_coefficient(min(p + 1, max_order), p, k)` for
  k < min(p + 1, max_order) and zeros after. The order depends on the position, not on how many
  derivatives a run has stored (as in diffusers, where an img2img run starting at p > 0 uses the
  first of them only).
  `sigmas` is the float32 schedule including the final 0.
  """
  table = lms_coefficient_table(sigmas, max_order)
  return np.stack([table[p, min(p, max_order - 1)] for p in range(len(table))])


def lms_coefficient_table(sigmas: np.ndarray, max_order: int = _MAX_ORDER) -> np.ndarray:
  """[n, max_order, max_order] float32: row [p, o - 1] the coefficients of order o at position p
  (zeros where o > p + 1), for a run whose order counts from its own start (k-diffusion's
  `sample_lms` over a suffix of the levels: img2img, a hires pass, a handoff)."""
  sigmas = np.asarray(sigmas, dtype=np.float32)
  n = len(sigmas) - 1
  coeffs = np.zeros((n, max_order, max_order), np.float64)
  for p in range(n):
    for order in range(1, min(p + 1, max_order) + 1):
      for current in range(order):

        def basis(tau, p=p, order=order, current=current):
          # diffusers evaluates the Lagrange basis with float32 tensors: tau is rounded to
          # float32 and every factor is a float32 division, multiplied up in order.
          tau32 = tau.astype(np.float32)
          prod = np.ones_like(tau32)
          for k in range(order):
            if k != current:
              prod = prod * ((tau32 - sigmas[p - k]) / (sigmas[p - current] - sigmas[p - k]))
          return prod.astype(np.float64)

        coeffs[p, order - 1, current] = gauss_kronrod_21(basis, float(sigmas[p]),
                                                         float(sigmas[p + 1]))
  return coeffs.astype(np.float32)


@struct.dataclass
class LMSState:
  """An LMS run.

  Attributes:
    timesteps: [n] float32, the t fed to the UNet at each position.
    sigmas: [n + 1] float32, the noise level at each position and after the last one.
    init_sigma: [] float32, diffusers' `init_noise_sigma`.
    input_scale: [n] float32 sqrt(sigma^2 + 1); the UNet sees sample / input_scale.
    v_out: [n] float32 -sigma / sqrt(sigma^2 + 1), v-prediction's weight on the model output.
    v_den: [n] float32 sigma^2 + 1, v-prediction's divisor of the sample.
    lms_coeffs: [n, k, k] float32 weights of the stored derivatives, newest first, by
      position and order (`lms_coefficient_table`; k: the largest order, 4 or `lms_order`).
    derivatives: [k, *sample_shape] float32 past ODE derivatives, newest first.
    counter: int32 steps taken so far.
    run_order: [] bool, whether a run's order counts from its own start (the `k_diffusion`
      form; in the state, as the compiled program's scheduler has no form options).
  """

  timesteps: jnp.ndarray
  sigmas: jnp.ndarray
  init_sigma: jnp.ndarray
  input_scale: jnp.ndarray
  v_out: jnp.ndarray
  v_den: jnp.ndarray
  lms_coeffs: jnp.ndarray
  derivatives: jnp.ndarray
  counter: jnp.ndarray
  run_order: jnp.ndarray


@dataclasses.dataclass(frozen=True)
class LMSDiscreteScheduler(Scheduler):
  """diffusers' `LMSDiscreteScheduler` (order 4, as its pipelines call it)."""

  name = "lms"
  # k_diffusion: a run started past the first level (img2img, hires, handoff) counts its order
  # from its start, as k-diffusion's sample_lms over those levels
  schedule_options = (*SCHEDULE_OPTIONS, K_DIFFUSION, COMFYUI, SGM_NOISE_MULTIPLIER,
                      DOWNCAST_ALPHAS_CUMPROD, ZERO_SNR, DISCARD_PENULTIMATE)
  order = 1

  _DEFAULTS = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "prediction_type": "epsilon",
    "timestep_spacing": "linspace",
    "steps_offset": 0,
    LMS_ORDER: _MAX_ORDER,  # sdjax's (k-diffusion's `order`), not diffusers' config
  }
  _UNSUPPORTED: ClassVar[dict[str, Any]] = {}

  @classmethod
  def from_config(cls, scheduler_config: dict[str, Any], **overrides):
    config = resolve_config(
      cls.name, cls._DEFAULTS, scheduler_config, unsupported=cls._UNSUPPORTED, overrides=overrides
    )
    check_common(cls.name, config, ("epsilon", "v_prediction", "sample"))
    check_lms_order(cls.name, config[LMS_ORDER])
    return cls(config=hashable_config(config))

  @property
  def max_order(self) -> int:
    return int(self.cfg[LMS_ORDER])

  def set_timesteps(self, num_inference_steps: int, sample_shape: tuple[int, ...] | None = None):
    if sample_shape is None:
      raise ValueError("lms keeps a history of derivatives: set_timesteps needs sample_shape")
    config = self.cfg
    timesteps, sigmas = sigma_schedule(config, num_inference_steps, train_alphas_cumprod(config),
                                       name=self.name)
    sigmas = sigmas.astype(np.float32)
    scale = input_scales(sigmas[:-1])
    return LMSState(
      timesteps=jnp.asarray(timesteps.astype(np.float32)),
      sigmas=jnp.asarray(sigmas),
      init_sigma=jnp.asarray(init_sigma(config, sigmas)),
      input_scale=jnp.asarray(scale),
      v_out=jnp.asarray(-sigmas[:-1] / scale),
      v_den=jnp.asarray(sigmas[:-1] ** 2 + 1),
      lms_coeffs=jnp.asarray(lms_coefficient_table(sigmas, self.max_order)),
      derivatives=jnp.zeros((self.max_order,) + tuple(sample_shape), jnp.float32),
      counter=jnp.zeros([], jnp.int32),
      run_order=jnp.asarray(bool(config.get(K_DIFFUSION))),
    )

  def init_noise_sigma(self, state):
    return state.init_sigma

  def scale_model_input(self, state, sample, i):
    return true_divide(sample.astype(jnp.float32), state.input_scale[i]).astype(sample.dtype)

  def step(self, state, model_output, i, sample, noise=None):
    del noise
    x = sample.astype(jnp.float32)
    out = model_output.astype(jnp.float32)
    sigma = state.sigmas[i]
    prediction_type = self.cfg["prediction_type"]
    if prediction_type == "epsilon":
      pred_original = x - rounded(sigma * out)
    elif prediction_type == "v_prediction":
      pred_original = rounded(out * state.v_out[i]) + true_divide(x, state.v_den[i])
    else:  # sample
      pred_original = out
    derivative = true_divide(x - pred_original, sigma)
    derivatives = jnp.concatenate([derivative[None], state.derivatives[:-1]])
    # diffusers: the order of the position, only the derivatives stored so far taking part (a
    # zero weight adds an exact 0); k-diffusion: the order of the run's own step count.
    top = self.max_order
    stored = jnp.minimum(state.counter + 1, top)
    order = jnp.where(state.run_order, stored, jnp.minimum(i + 1, top))
    coeffs = jnp.where(jnp.arange(top) < stored, state.lms_coeffs[i, order - 1], 0.0)
    update = rounded(coeffs[0] * derivatives[0])
    for k in range(1, top):
      update = update + rounded(coeffs[k] * derivatives[k])
    prev = x + update
    new_state = state.replace(derivatives=derivatives, counter=state.counter + 1)
    return prev.astype(sample.dtype), new_state

  def add_noise(self, state, original_samples, noise, i):
    noisy = original_samples.astype(jnp.float32) + rounded(
      noise.astype(jnp.float32) * state.sigmas[i]
    )
    return noisy.astype(original_samples.dtype)
