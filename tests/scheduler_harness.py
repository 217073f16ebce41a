"""Runs a diffusers scheduler and its sdjax twin on the same fake model and the same noise.

The fake model is deterministic numpy float32 math applied to each side's own sample, so both
trajectories see exactly the same kind of input and any divergence is the scheduler's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import torch

SHAPE = (2, 4, 6, 3)  # NHWC latents: B, h, w, C
# The bound on sdjax against diffusers *as is* where parity is held at 1e-6 under
# `correctly_rounded_sqrt` / `correctly_rounded_math`: torch's CPU float32 sqrt, exp and log are
# faithful, not correctly rounded, and which last bits they miss depends on the CPU (the same
# torch 2.13 wheel: within 1e-6 on the machine these tests were written on, up to 5.6e-5 on an
# AMD EPYC Zen 4 in third-order DEIS, whose coefficients cancel). The parity itself is
# checked against the correctly rounded reference, the same on every CPU.
PLAIN_TOL = 1e-4


def fake_model(sample: np.ndarray, t: float) -> np.ndarray:
  """A smooth, deterministic stand-in for the UNet (NHWC numpy float32 in and out)."""
  b, h, w, c = sample.shape
  pos = np.arange(b * h * w * c, dtype=np.float32).reshape(b, h, w, c) / (b * h * w * c)
  return (0.5 * np.tanh(sample) + 0.1 * np.cos(np.float32(t) * 0.01 + pos)).astype(np.float32)


def make_noises(num_calls: int, seed: int = 0):
  """Initial unit noise and one unit-noise draw per model call (for ancestral samplers)."""
  rng = np.random.default_rng(seed)
  init = rng.standard_normal(SHAPE).astype(np.float32)
  steps = rng.standard_normal((max(num_calls, 1),) + SHAPE).astype(np.float32)
  return init, steps


def _to_torch(x: np.ndarray) -> torch.Tensor:
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))  # NHWC -> NCHW


def _to_numpy(x: torch.Tensor) -> np.ndarray:
  return x.detach().numpy().transpose(0, 2, 3, 1)  # NCHW -> NHWC


@contextlib.contextmanager
def _injected_noise(module_name: str, step_noises: np.ndarray):
  """Makes diffusers' `randn_tensor` inside `module_name` return our noise, one draw per call."""
  draws = iter(step_noises)
  module = importlib.import_module(module_name)
  with mock.patch.object(module, "randn_tensor", lambda *a, **k: _to_torch(next(draws))):
    yield


def diffusers_trajectory(ref_scheduler, num_steps, init_noise, step_noises, *, begin=0,
                         init_sample=None):
  """Latents after each model call of diffusers' own loop (NHWC numpy), starting at `begin`.

  With `init_sample` (img2img), the start is `add_noise(init_sample, init_noise, t_begin)`.
  """
  ref_scheduler.set_timesteps(num_steps)
  timesteps = ref_scheduler.timesteps
  if init_sample is not None:
    if hasattr(ref_scheduler, "set_begin_index"):
      ref_scheduler.set_begin_index(begin)
    x = ref_scheduler.add_noise(_to_torch(init_sample), _to_torch(init_noise), timesteps[begin:begin + 1])
  else:
    x = _to_torch(init_noise) * ref_scheduler.init_noise_sigma
  module_name = type(ref_scheduler).__module__
  out = []
  has_randn = hasattr(importlib.import_module(module_name), "randn_tensor")
  ctx = _injected_noise(module_name, step_noises[begin:]) if has_randn else contextlib.nullcontext()
  with ctx:
    for t in timesteps[begin:]:
      x_in = ref_scheduler.scale_model_input(x, t)
      eps = _to_torch(fake_model(_to_numpy(x_in), float(t)))
      x = ref_scheduler.step(eps, t, x).prev_sample
      out.append(_to_numpy(x))
  return np.stack(out)


def sdjax_trajectory(scheduler, num_steps, init_noise, step_noises, *, begin=0, init_sample=None,
                     end=None, init_latents=None):
  """The same loop for an sdjax scheduler, as one jit-compiled `lax.scan`: positions `begin` to
  `end` (None: the last), from pure noise, an img2img start of `init_sample`, or `init_latents`
  as they are (a handoff's second stage)."""
  state = scheduler.set_timesteps(num_steps, sample_shape=init_noise.shape)
  n = len(state.timesteps) if end is None else end
  scheduler = scheduler.program()  # what the compiled sampler steps with (`sampling.prepare`)

  def model(x, t):
    return jax.pure_callback(
        lambda xx, tt: fake_model(np.asarray(xx), float(tt)),
        jax.ShapeDtypeStruct(x.shape, jnp.float32), x, t)

  @jax.jit
  def run(state, init_noise, step_noises):
    if init_latents is not None:
      x = jnp.asarray(init_latents)
    elif init_sample is not None:
      x = scheduler.img2img_noise(state, jnp.asarray(init_sample), init_noise, begin)
    else:
      x = init_noise * scheduler.init_noise_sigma(state)

    def body(carry, inputs):
      x, state = carry
      i, noise = inputs
      noise = scheduler.step_noise(noise) if scheduler.needs_noise else None
      if scheduler.churns:  # as sampling._denoise: before the model call
        x = scheduler.churn(state, x, i, noise)
      x_in = scheduler.scale_model_input(state, x, i)
      eps = model(x_in, state.timesteps[i])
      x, state = scheduler.step(state, eps, i, x, noise)
      return (x, state), x

    idx = jnp.arange(begin, n, dtype=jnp.int32)
    _, xs = jax.lax.scan(body, (x, state), (idx, step_noises[begin:n]))
    return xs

  return np.asarray(run(state, jnp.asarray(init_noise), jnp.asarray(step_noises)))


def max_rel_error(ours: np.ndarray, ref: np.ndarray) -> float:
  """Worst per-step relative error ||ours - ref|| / ||ref||."""
  errs = [np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30) for a, b in zip(ours, ref, strict=True)]
  return float(max(errs))


@contextlib.contextmanager
def correctly_rounded_sqrt():
  """Makes torch's float32 CPU square roots correctly rounded while diffusers runs inside.

  torch takes `sqrt` and `x ** 0.5` on CPU from MKL's vector math, which is faithful but not
  correctly rounded (it differs from IEEE sqrt in the last bit for ~20% of inputs on some CPUs);
  sdjax, numpy, XLA and CUDA round correctly. Where a step cancels (v-/sample-prediction with few
  steps) that last bit of a coefficient shows as > 1e-6 relative error, so such cases are compared
  against diffusers' arithmetic with this one function made exact.
  """
  pow_, sqrt_ = torch.Tensor.__pow__, torch.sqrt

  def patched_pow(self, exponent):
    if isinstance(exponent, float) and exponent == 0.5 and self.dtype == torch.float32:
      return correctly_rounded("sqrt", self)
    return pow_(self, exponent)

  def patched_sqrt(x):
    return correctly_rounded("sqrt", x) if x.dtype == torch.float32 else sqrt_(x)

  with mock.patch.object(torch.Tensor, "__pow__", patched_pow), \
       mock.patch.object(torch.Tensor, "sqrt", patched_sqrt), \
       mock.patch.object(torch, "sqrt", patched_sqrt):
    yield


def correctly_rounded(fn: str, x: torch.Tensor) -> torch.Tensor:
  """torch's float32 `fn` ("sqrt", "exp", "log", "tan") of `x`, correctly rounded (through
  float64, as sdjax's `common.exp_f32` / `log_f32` compute it)."""
  with np.errstate(divide="ignore", invalid="ignore"):  # log(0) = -inf, as torch's, silently
    wide = getattr(np, fn)(x.detach().numpy().astype(np.float64))
  return torch.from_numpy(np.asarray(wide.astype(np.float32)))


@contextlib.contextmanager
def correctly_rounded_math():
  """`correctly_rounded_sqrt`, with torch's float32 CPU exp, log and tan correctly rounded too,
  for references (A1111's and ComfyUI's loops) whose result turns on their last bit: a level
  halfway between two timesteps, snapped to the nearer in log sigma (a tie that the last bit of
  `log` breaks). torch's own differ from IEEE rounding in the last bit for 1% (exp) to 18% (tan)
  of float32 inputs on an AMD EPYC (Zen 4); which inputs depends on the CPU."""

  def exact(fn, original):
    return lambda x: correctly_rounded(fn, x) if x.dtype == torch.float32 else original(x)

  with contextlib.ExitStack() as stack, correctly_rounded_sqrt():
    for fn in ("exp", "log", "tan"):
      for owner in (torch.Tensor, torch):
        stack.enter_context(mock.patch.object(owner, fn, exact(fn, getattr(owner, fn))))
    yield


@dataclasses.dataclass
class Parity:
  """How an sdjax scheduler's run compares with diffusers' (see `parity_errors`)."""

  plain: float  # max relative error against diffusers as is
  exact_sqrt: float  # ... against diffusers under `correctly_rounded_sqrt`
  plain_timesteps_equal: bool  # whether the UNet's timesteps agree with diffusers' as is


def parity_errors(scheduler, make_reference, num_steps, *, strength=None, seed=0) -> Parity:
  """Compares an sdjax `scheduler` with its diffusers twin, built by `make_reference()`.

  Asserts that the UNet's timesteps agree exactly with diffusers' under `correctly_rounded_sqrt`
  (as is, they can differ in the last bit where they derive from square roots: Karras sigmas).
  With `strength`, an img2img run: it starts at `scheduler.begin_index(num_steps, strength)` from
  a noised clean sample.
  """
  state = scheduler.set_timesteps(num_steps, sample_shape=SHAPE)
  ours_timesteps = np.asarray(state.timesteps)
  init_noise, step_noises = make_noises(len(ours_timesteps), seed)
  begin, init_sample = 0, None
  if strength is not None:
    begin = scheduler.begin_index(num_steps, strength)
    init_sample = make_noises(1, seed + 1)[0]
  got = sdjax_trajectory(
      scheduler, num_steps, init_noise, step_noises, begin=begin, init_sample=init_sample)
  results = []
  for exact_sqrt in (False, True):
    with correctly_rounded_sqrt() if exact_sqrt else contextlib.nullcontext():
      ref = make_reference()
      want = diffusers_trajectory(
          ref, num_steps, init_noise, step_noises, begin=begin, init_sample=init_sample)
    ref_timesteps = ref.timesteps.numpy()
    assert ours_timesteps.dtype.kind == ref_timesteps.dtype.kind, ref_timesteps.dtype
    timesteps_equal = np.array_equal(ours_timesteps, ref_timesteps)
    if exact_sqrt:
      np.testing.assert_array_equal(ours_timesteps, ref_timesteps)
    assert got.shape == want.shape, (got.shape, want.shape)
    results.append((max_rel_error(got, want), timesteps_equal))
  (plain, plain_timesteps_equal), (exact, _) = results
  return Parity(plain=plain, exact_sqrt=exact, plain_timesteps_equal=plain_timesteps_equal)


def integer_timestep_parity(scheduler, make_reference, num_steps, *, strength=None):
  """Compares an sdjax `scheduler` with its diffusers twin whose timesteps are integers (DEIS,
  singlestep DPM-Solver), as is and under `correctly_rounded_sqrt`: returns the two max relative
  errors and the last reference (set for `num_steps`), after asserting its timesteps and sigmas
  are ours exactly. With `strength`, an img2img run as `parity_errors`'."""
  init_noise, step_noises = make_noises(num_steps)
  kwargs = {}
  if strength is not None:
    kwargs = {"begin": scheduler.begin_index(num_steps, strength),
              "init_sample": make_noises(1, 1)[0]}
  got = sdjax_trajectory(scheduler, num_steps, init_noise, step_noises, **kwargs)
  errors = []
  for exact_sqrt in (False, True):
    with correctly_rounded_sqrt() if exact_sqrt else contextlib.nullcontext():
      ref = make_reference()
      errors.append(max_rel_error(
        got, diffusers_trajectory(ref, num_steps, init_noise, step_noises, **kwargs)))
  state = scheduler.set_timesteps(num_steps, sample_shape=SHAPE)
  np.testing.assert_array_equal(np.asarray(state.timesteps), ref.timesteps.numpy())
  np.testing.assert_array_equal(np.asarray(state.sigmas), ref.sigmas.numpy())
  return errors, ref


def edm_parity(name: str, ref_cls, config: dict, steps: int, strength=None) -> float:
  """An EDM scheduler against its diffusers class (under `correctly_rounded_sqrt`): asserts the
  timesteps, sigmas and initial noise scale agree; returns the trajectories' max relative
  error (text-to-image, or img2img at `strength`)."""
  from sdjax.schedulers import get_scheduler  # noqa: PLC0415

  ours = get_scheduler(name, config)
  state = ours.set_timesteps(steps, sample_shape=SHAPE)
  init_noise, step_noises = make_noises(steps)
  kwargs = {}
  if strength is not None:
    init_sample = np.random.default_rng(1).standard_normal(SHAPE).astype(np.float32)
    kwargs = {"begin": ours.begin_index(steps, strength), "init_sample": init_sample}
  got = sdjax_trajectory(ours, steps, init_noise, step_noises, **kwargs)
  with correctly_rounded_sqrt():
    ref = ref_cls.from_config(config)
    want = diffusers_trajectory(ref, steps, init_noise, step_noises, **kwargs)
  np.testing.assert_allclose(np.asarray(state.timesteps), ref.timesteps.numpy(), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(state.sigmas), ref.sigmas.numpy(), rtol=1e-6)
  assert float(ours.init_noise_sigma(state)) == np.float32(ref.init_noise_sigma)
  err = max_rel_error(got, want)
  print(f"maxrel {name} {steps} steps: {err:.3g}")
  return err


def exponential_placing(ref_cls, config: dict, sigmas):
  """diffusers scheduler `ref_cls` whose exponential spacing places `sigmas` (n + 1 of them,
  ending at 0) instead: diffusers maps them to timesteps and runs its steps as for its own
  spacings, which is what sdjax's `sigmas` option does."""
  ref = ref_cls.from_config(config, use_exponential_sigmas=True)
  ref._convert_to_exponential = lambda *a, **k: np.asarray(sigmas[:-1], np.float32).astype(
      np.float64)
  assert sigmas[-1] == 0
  return ref
