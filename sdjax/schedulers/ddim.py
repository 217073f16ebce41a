"""DDIM (Song et al. 2020), as diffusers' `DDIMScheduler`.

Also home of what the discrete-timestep schedulers (DDIM, DDPM, PNDM) share: the integer
timestep spacings and the checks of their common options.

Every per-position scalar (square roots of alpha products, the update's coefficients) is computed
once on the host in numpy float32, with the same operations in the same order as diffusers' 0-dim
float32 tensors, so `step` is only the elementwise update. (torch on CPU takes its square roots
from MKL, which is faithful but not always correctly rounded; numpy's are, so a coefficient can
differ from diffusers' CPU value in the last bit.)
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import struct

from sdjax.schedulers.common import (
  A1111_IMG2IMG,
  Scheduler,
  SchedulerConfigError,
  hashable_config,
  make_betas,
  resolve_config,
  rounded,
  true_divide,
)
from sdjax.schedulers.euler import check_choice
from sdjax.schedulers.sigma_schedules import DOWNCAST_ALPHAS_CUMPROD, form_alphas_cumprod

SPACINGS = ("leading", "trailing", "linspace")
# sdjax's option to step as AUTOMATIC1111 (1.6+) runs DDIM
# (modules/sd_samplers_timesteps_impl.ddim): over the timesteps range(0, 1000, 1000 // steps) + 1,
# from the last down to the second, each step to the one before it: one UNet call fewer than
# the timesteps (19 for 20 steps; 30 for 30, whose spacing 33 makes 31), ending at timestep 1's
# level rather than at alphas_cumprod[0]; in img2img over the first t_enc of them
# (`A1111_IMG2IMG`). `infotext` sets it for A1111's DDIM images.
A1111 = "a1111"


def schedule_alphas(config: dict[str, Any]) -> np.ndarray:
  """float32 alphas_cumprod of DDIM and PNDM: diffusers', or with the `a1111` form A1111's
  (`sigma_schedules.form_alphas_cumprod`: its float16 and zero-terminal-SNR schedules)."""
  return form_alphas_cumprod(config, "a1111" if config.get(A1111) else None).astype(np.float32)


def sqrt_one_minus(config: dict[str, Any], alpha: np.ndarray) -> np.ndarray:
  """sqrt(1 - alpha): A1111's `sqrt_one_minus_alphas`, in float16 arithmetic where its
  alphas_cumprod is float16 (`downcast_alphas`); the other coefficients take float16 alphas'
  values into float32 (or float64) arithmetic, as A1111's loops do."""
  if config.get(DOWNCAST_ALPHAS_CUMPROD):
    return np.sqrt(1 - alpha.astype(np.float16)).astype(np.float32)
  return np.sqrt(1 - alpha)


def check_discrete(
  scheduler_name: str, config: dict[str, Any], prediction_types: tuple[str, ...]
) -> None:
  """Validates the options DDIM, DDPM and PNDM share."""
  check_choice(scheduler_name, "prediction_type", config["prediction_type"], prediction_types)
  check_choice(scheduler_name, "timestep_spacing", config["timestep_spacing"], SPACINGS)
  make_betas(config)  # an unsupported beta_schedule raises here rather than at set_timesteps


def discrete_timesteps(config: dict[str, Any], num_inference_steps: int) -> np.ndarray:
  """Descending int64 timesteps of DDIM / DDPM (PNDM's are these, ascending)."""
  n_train = int(config["num_train_timesteps"])
  if num_inference_steps > n_train:
    raise ValueError(
      f"num_inference_steps={num_inference_steps} cannot exceed num_train_timesteps={n_train}"
    )
  if num_inference_steps < 1:
    raise ValueError(f"num_inference_steps must be positive, got {num_inference_steps}")
  spacing = config["timestep_spacing"]
  if spacing == "linspace":
    timesteps = np.linspace(0, n_train - 1, num_inference_steps).round()[::-1].astype(np.int64)
  elif spacing == "leading":
    step_ratio = n_train // num_inference_steps
    timesteps = (np.arange(0, num_inference_steps) * step_ratio).round()[::-1].astype(np.int64)
    timesteps = timesteps + int(config["steps_offset"])
  elif spacing == "trailing":
    step_ratio = n_train / num_inference_steps
    timesteps = np.round(np.arange(n_train, 0, -step_ratio)).astype(np.int64) - 1
  else:
    raise SchedulerConfigError(f"timestep_spacing {spacing!r} is not supported by sdjax")
  if timesteps.max() >= n_train:  # diffusers fails at its first step (an index error)
    raise ValueError(
      f"timestep {timesteps.max()} is past num_train_timesteps={n_train} "
      f"(steps_offset={config['steps_offset']} with {num_inference_steps} leading steps)"
    )
  return timesteps


def a1111_grid(config: dict[str, Any], num_inference_steps: int):
  """A1111's timesteps for its timestep samplers, ascending (int64; its get_timesteps:
  range(0, 1000, 1000 // steps) + 1), and the timestep its img2img noises to (None in
  text-to-image); with `A1111_IMG2IMG` in `config`, the first t_enc of them only."""
  n_train = int(config["num_train_timesteps"])
  if not 1 <= num_inference_steps <= n_train:
    raise ValueError(f"num_inference_steps must be in [1, {n_train}], got {num_inference_steps}")
  grid = np.clip(np.arange(0, n_train, n_train // num_inference_steps) + 1, 0, n_train - 1)
  t_enc = config.get(A1111_IMG2IMG)
  if t_enc is None:
    return grid.astype(np.int64), None
  if not 0 < t_enc < len(grid):
    raise ValueError(f"A1111's img2img of {num_inference_steps} steps keeps t_enc = {t_enc} "
                     f"timesteps (1 to {len(grid) - 1}): give a higher strength or more steps")
  return grid[:t_enc].astype(np.int64), int(grid[t_enc])


def a1111_timesteps(config: dict[str, Any], num_inference_steps: int):
  """A1111's DDIM positions: (int64 timesteps of its UNet calls, each step's previous timestep),
  descending."""
  grid, _ = a1111_grid(config, num_inference_steps)
  if len(grid) < 2:
    raise ValueError("A1111's DDIM and PLMS make one UNet call fewer than their timesteps: give "
                     "at least 2 steps" + (" (of img2img: a higher strength)"
                                           if config.get(A1111_IMG2IMG) is not None else ""))
  return grid[1:][::-1].astype(np.int64), grid[:-1][::-1].astype(np.int64)


def a1111_start(config: dict[str, Any], alphas_cumprod: np.ndarray, num_inference_steps: int):
  """float32 (sqrt(alpha), sqrt(1 - alpha)) of A1111's img2img noising (`A1111_IMG2IMG`), its
  torch.sqrt of its model's alphas_cumprod (float16 where `downcast_alphas_cumprod`), or None."""
  _, t = a1111_grid(config, num_inference_steps)
  if t is None:
    return None
  alpha = alphas_cumprod[t:t + 1]
  if config.get(DOWNCAST_ALPHAS_CUMPROD):
    root = np.sqrt(alpha.astype(np.float16)).astype(np.float32)
  else:
    root = np.sqrt(alpha)
  return f32(root[0]), f32(sqrt_one_minus(config, alpha)[0])


class A1111Start:
  """For the schedulers of A1111's own loops (DDIM, PLMS, UniPC), whose state's `start` is None or
  A1111's img2img noising (`a1111_start`): the image noised to that level."""

  def img2img_noise(self, state, original_samples, noise, i):
    if state.start is None:
      return super().img2img_noise(state, original_samples, noise, i)
    original = original_samples.astype(jnp.float32)
    noise = noise.astype(jnp.float32)
    noisy = rounded(state.start[0] * original) + rounded(state.start[1] * noise)
    return noisy.astype(original_samples.dtype)


def alpha_prod_at(alphas_cumprod: np.ndarray, timesteps: np.ndarray, final: np.float32):
  """alphas_cumprod[t] (float32) where t >= 0, else `final` (diffusers' step past t = 0)."""
  safe = np.clip(timesteps, 0, len(alphas_cumprod) - 1)
  return np.where(timesteps >= 0, alphas_cumprod[safe], final).astype(np.float32)


def f32(x) -> jnp.ndarray:
  return jnp.asarray(np.asarray(x, dtype=np.float32))


def predict_original_and_noise(prediction_type: str, x, out, sqrt_alpha, sqrt_beta):
  """(x0, noise) predicted from x_t and the model output `out` (float32), in diffusers' order of
  operations; `sqrt_alpha`, `sqrt_beta` are the roots of alpha_prod_t and 1 - alpha_prod_t."""
  if prediction_type == "epsilon":
    return true_divide(x - rounded(sqrt_beta * out), sqrt_alpha), out
  if prediction_type == "sample":
    return out, true_divide(x - rounded(sqrt_alpha * out), sqrt_beta)
  # v_prediction
  return (rounded(sqrt_alpha * x) - rounded(sqrt_beta * out),
          rounded(sqrt_alpha * out) + rounded(sqrt_beta * x))


def add_noise_vp(self, state, original_samples, noise, i):
  """`Scheduler.add_noise` of a state with `sqrt_alpha` and `sqrt_one_minus_alpha` per position
  (DDIM, DDPM, LCM, TCD): sqrt(alpha_prod_t) x0 + sqrt(1 - alpha_prod_t) noise."""
  del self
  original = original_samples.astype(jnp.float32)
  noise = noise.astype(jnp.float32)
  noisy = rounded(state.sqrt_alpha[i] * original) + rounded(state.sqrt_one_minus_alpha[i] * noise)
  return noisy.astype(original_samples.dtype)


@struct.dataclass
class DDIMState:
  """A DDIM run: per-position coefficients of the update.

  Attributes:
    timesteps: [n] int32, the t fed to the UNet at each position.
    sqrt_alpha: [n] sqrt(alpha_prod_t).
    sqrt_one_minus_alpha: [n] sqrt(1 - alpha_prod_t).
    sqrt_alpha_prev: [n] sqrt(alpha_prod_{t_prev}).
    direction_coeff: [n] sqrt(1 - alpha_prod_{t_prev} - std^2), the weight of the predicted noise.
    noise_std: [n] eta * sigma_t, the weight of fresh noise (0 when eta = 0).
    start: None, or A1111's img2img noising (`a1111_start`).
  """

  timesteps: jnp.ndarray
  sqrt_alpha: jnp.ndarray
  sqrt_one_minus_alpha: jnp.ndarray
  sqrt_alpha_prev: jnp.ndarray
  direction_coeff: jnp.ndarray
  noise_std: jnp.ndarray
  start: tuple[jnp.ndarray, jnp.ndarray] | None = None


class EtaInState:
  """For schedulers whose `eta` (DDIM's; TCD's gamma) scales only their state's coefficients:
  `step` depends only on whether it is 0, so one program serves every eta > 0."""

  @property
  def needs_noise(self) -> bool:
    return self.cfg["eta"] > 0

  def program(self):
    base = super().program()  # without what only the state holds (custom timesteps)
    config = {**base.cfg, "eta": 1.0 if self.needs_noise else 0.0}
    return dataclasses.replace(self, config=hashable_config(config))


@dataclasses.dataclass(frozen=True)
class DDIMScheduler(A1111Start, EtaInState, Scheduler):
  """diffusers' `DDIMScheduler`, with diffusers' `step(eta=...)` as the sdjax option `eta`.

  `from_config(config, eta=0.3)` makes it stochastic (it then needs noise at every step), as
  passing `eta` to diffusers' pipeline does; eta = 0 (the default) is deterministic DDIM.
  """

  name = "ddim"
  order = 1
  schedule_options = (A1111, A1111_IMG2IMG, DOWNCAST_ALPHAS_CUMPROD)

  _DEFAULTS = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "clip_sample": True,
    "set_alpha_to_one": True,
    "steps_offset": 0,
    "prediction_type": "epsilon",
    "thresholding": False,
    "dynamic_thresholding_ratio": 0.995,
    "clip_sample_range": 1.0,
    "sample_max_value": 1.0,
    "timestep_spacing": "leading",
    "rescale_betas_zero_snr": False,
  }
  _UNSUPPORTED = {"thresholding": False}

  @classmethod
  def from_config(cls, scheduler_config: dict[str, Any], **overrides):
    # eta is an argument of diffusers' step, not of its config: only an override sets it.
    eta = float(overrides.pop("eta", 0.0))
    if not eta >= 0:
      raise SchedulerConfigError(f"scheduler {cls.name!r}: eta must be >= 0, got {eta}")
    config = resolve_config(
      cls.name, cls._DEFAULTS, scheduler_config, unsupported=cls._UNSUPPORTED, overrides=overrides
    )
    check_discrete(cls.name, config, ("epsilon", "sample", "v_prediction"))
    config["eta"] = eta
    return cls(config=hashable_config(config))

  def set_timesteps(self, num_inference_steps: int, sample_shape: tuple[int, ...] | None = None):
    del sample_shape  # no history
    config = self.cfg
    alphas_cumprod = schedule_alphas(config)
    final = np.float32(1.0) if config["set_alpha_to_one"] else alphas_cumprod[0]
    if config.get(A1111):
      timesteps, prev_timesteps = a1111_timesteps(config, num_inference_steps)
    else:
      timesteps = discrete_timesteps(config, num_inference_steps)
      # diffusers steps back by the leading ratio whatever the spacing.
      prev_timesteps = timesteps - int(config["num_train_timesteps"]) // num_inference_steps
    alpha = alphas_cumprod[timesteps]
    alpha_prev = alpha_prod_at(alphas_cumprod, prev_timesteps, final)
    beta, beta_prev = 1 - alpha, 1 - alpha_prev
    variance = (beta_prev / beta) * (1 - alpha / alpha_prev)
    std = np.float32(config["eta"]) * np.sqrt(variance)
    return DDIMState(
      timesteps=jnp.asarray(timesteps.astype(np.int32)),
      sqrt_alpha=f32(np.sqrt(alpha)),
      sqrt_one_minus_alpha=f32(sqrt_one_minus(config, alpha)),
      sqrt_alpha_prev=f32(np.sqrt(alpha_prev)),
      direction_coeff=f32(np.sqrt(1 - alpha_prev - std * std)),
      noise_std=f32(std),
      start=a1111_start(config, alphas_cumprod, num_inference_steps) if config.get(A1111)
      else None,
    )

  def init_noise_sigma(self, state):
    del state
    return 1.0

  def step(self, state, model_output, i, sample, noise=None):
    config = self.cfg
    x = sample.astype(jnp.float32)
    out = model_output.astype(jnp.float32)
    pred_original, pred_epsilon = predict_original_and_noise(
      config["prediction_type"], x, out, state.sqrt_alpha[i], state.sqrt_one_minus_alpha[i])
    if config["clip_sample"]:
      limit = config["clip_sample_range"]
      pred_original = jnp.clip(pred_original, -limit, limit)
    prev = rounded(state.sqrt_alpha_prev[i] * pred_original) + rounded(
      state.direction_coeff[i] * pred_epsilon
    )
    if self.needs_noise:
      if noise is None:
        raise ValueError("ddim with eta > 0 needs `noise` (unit Gaussian, sample shape) each step")
      prev = prev + rounded(state.noise_std[i] * noise.astype(jnp.float32))
    return prev.astype(sample.dtype), state

  add_noise = add_noise_vp


@dataclasses.dataclass(frozen=True)
class DDIMCFGPPScheduler(DDIMScheduler):
  """A1111's "DDIM CFG++" (its sd_samplers_timesteps `ddim_cfgpp`, CFG++: Chung et al. 2024):
  DDIM whose x0 is the guided prediction's and whose direction to the next timestep is the
  unconditional noise prediction's, the CFG scale divided by 12.5 (A1111's mapping of its usual
  range onto CFG++'s 0 to 1); in the `a1111` form its own loop's timesteps, as its DDIM."""

  name = "ddim_cfg_pp"
  takes_uncond = True
  guidance_divisor = 12.5

  def step(self, state, model_output, i, sample, noise=None, uncond=None):
    if uncond is None:
      raise ValueError(f"{self.name} steps along the unconditional prediction: pass `uncond`")
    config = self.cfg
    x = sample.astype(jnp.float32)
    pred_original, _ = predict_original_and_noise(
      config["prediction_type"], x, model_output.astype(jnp.float32), state.sqrt_alpha[i],
      state.sqrt_one_minus_alpha[i])
    _, uncond_epsilon = predict_original_and_noise(
      config["prediction_type"], x, uncond.astype(jnp.float32), state.sqrt_alpha[i],
      state.sqrt_one_minus_alpha[i])
    if config["clip_sample"]:
      limit = config["clip_sample_range"]
      pred_original = jnp.clip(pred_original, -limit, limit)
    prev = rounded(state.sqrt_alpha_prev[i] * pred_original) + rounded(
      state.direction_coeff[i] * uncond_epsilon)
    if self.needs_noise:
      if noise is None:
        raise ValueError(f"{self.name} with eta > 0 needs `noise` (unit Gaussian) each step")
      prev = prev + rounded(state.noise_std[i] * noise.astype(jnp.float32))
    return prev.astype(sample.dtype), state
