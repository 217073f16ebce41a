"""sdjax's PNDM against diffusers' `PNDMScheduler` (v0.42), step by step on a fake model.

Both of diffusers' paths: PLMS with `skip_prk_steps` (Stable Diffusion's default scheduler) and the
pseudo Runge-Kutta warm-up. diffusers selects its branches by a call counter, so img2img runs that
start part-way (even inside the Runge-Kutta phase) must restart the warm-up there too.
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
from sdjax.schedulers.pndm import PNDMScheduler

TOL = 1e-6
SD15 = dict(testing.SCHEDULER_SD15)  # Stable Diffusion 1.5's scheduler_config.json
LINEAR = {
  "beta_schedule": "linear",
  "beta_start": 0.0001,
  "beta_end": 0.02,
  "steps_offset": 0,
  "set_alpha_to_one": True,
}
PRK = {"skip_prk_steps": False}
PREDICTIONS = ("epsilon", "v_prediction")
SPACINGS = ("leading", "trailing", "linspace")


def _case(overrides, steps, strength=None):
  parts = [f"{k}={v}" for k, v in overrides.items()] + [f"steps={steps}"]
  parts += [f"strength={strength}"] if strength is not None else []
  return pytest.param(overrides, steps, strength, id=",".join(parts))


CASES = (
  [_case({"prediction_type": p, "timestep_spacing": s}, 10) for p in PREDICTIONS for s in SPACINGS]
  + [_case({"prediction_type": p}, n) for p in PREDICTIONS for n in (1, 25)]
  + [_case({}, 4)]
  + [_case({**LINEAR, "prediction_type": p}, 10) for p in PREDICTIONS]
  + [_case({**LINEAR, "timestep_spacing": "trailing"}, 4)]
  # The pseudo Runge-Kutta warm-up (needs >= 4 steps).
  + [_case({**PRK, "prediction_type": p}, 10) for p in PREDICTIONS]
  + [_case({**PRK, **LINEAR, "timestep_spacing": "trailing"}, 4)]
  + [_case({**PRK, "timestep_spacing": "linspace", "prediction_type": "v_prediction"}, 25)]
  # img2img: the run starts part-way with an empty history, from add_noise.
  + [_case({}, 10, strength=0.6)]
  + [_case({"timestep_spacing": "trailing", "prediction_type": "v_prediction"}, 10, strength=0.3)]
  + [_case({**PRK}, 10, strength=0.5), _case({**PRK, "prediction_type": "v_prediction"}, 6, 0.2)]
)


@pytest.mark.parametrize("overrides,steps,strength", CASES)
def test_matches_diffusers(overrides, steps, strength):
  config = {**SD15, **overrides}
  parity = parity_errors(
    get_scheduler("pndm", config),
    lambda: diffusers.PNDMScheduler.from_config(config),
    steps,
    strength=strength,
  )
  assert parity.exact_sqrt <= TOL
  assert parity.plain <= PLAIN_TOL and parity.plain_timesteps_equal


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="bit-exactness is checked on CPU")
def test_bit_exact_with_correctly_rounded_sqrt():
  """One v-prediction step from t = 999 of the linear schedule cancels ~160-fold.

  There the last bit of torch's CPU sqrt(1 - alpha_prod) (MKL, not correctly rounded) alone
  gives ~3e-5 against plain diffusers. With it correctly rounded, the trajectories agree to the
  last bit, as they do wherever that sqrt is not involved.
  """
  config = {**SD15, **LINEAR, "timestep_spacing": "trailing", "prediction_type": "v_prediction"}
  parity = parity_errors(
    get_scheduler("pndm", config), lambda: diffusers.PNDMScheduler.from_config(config), 1
  )
  assert parity.exact_sqrt == 0.0, parity


def test_from_config_resolves_like_diffusers():
  config = {**SD15, "unknown_key": 3, "timestep_spacing": "trailing"}
  ours = get_scheduler("pndm", config)
  ref = diffusers.PNDMScheduler.from_config(config)
  for key in PNDMScheduler._DEFAULTS:
    assert ours.cfg[key] == ref.config[key], key
  assert "unknown_key" not in ours.cfg and "clip_sample" not in ours.cfg
  bare = PNDMScheduler.from_config({}, steps_offset=1)
  assert bare.cfg["skip_prk_steps"] is False and bare.cfg["steps_offset"] == 1


@pytest.mark.parametrize(
  "option",
  [{"prediction_type": "sample"}, {"timestep_spacing": "karras"}, {"beta_schedule": "sigmoid"}],
  ids=lambda o: next(iter(o)),
)
def test_unsupported_options_raise(option):
  key = next(iter(option))
  with pytest.raises(SchedulerConfigError, match=key):
    get_scheduler("pndm", {**SD15, **option})


def test_runge_kutta_warm_up_needs_four_steps():
  with pytest.raises(SchedulerConfigError, match="skip_prk_steps"):
    get_scheduler("pndm", {**SD15, **PRK}).set_timesteps(3, SHAPE)


def test_history_needs_the_sample_shape():
  with pytest.raises(ValueError, match="sample_shape"):
    get_scheduler("pndm", SD15).set_timesteps(10)


@pytest.mark.parametrize("overrides", [{}, PRK], ids=["plms", "prk"])
def test_true_noise_model_recovers_the_clean_sample(overrides):
  """With the noise of x_t = sqrt(a) x0 + sqrt(1 - a) eps known, every step lands on x_t'."""
  sched = get_scheduler("pndm", {**SD15, **overrides, "set_alpha_to_one": True})
  state = sched.set_timesteps(10, SHAPE)
  clean, noise = make_noises(1, seed=3)
  clean, noise = jnp.asarray(clean), jnp.asarray(noise[0])
  x = sched.add_noise(state, clean, noise, 0)
  for i in range(len(state.timesteps)):
    x, state = sched.step(state, noise, i, x)
  np.testing.assert_allclose(np.asarray(x), np.asarray(clean), rtol=0, atol=2e-5)


def test_bfloat16_sample_keeps_its_dtype_with_float32_math():
  sched = get_scheduler("pndm", {**SD15, "prediction_type": "v_prediction"})
  state = sched.set_timesteps(10, SHAPE)
  init, steps = make_noises(3)
  for i in range(3):  # through both warm-up calls into the multistep phase
    x, out = jnp.asarray(init, jnp.bfloat16), jnp.asarray(steps[i], jnp.bfloat16)
    got, state_bf16 = sched.step(state, out, i, x)
    want, state = sched.step(state, out.astype(jnp.float32), i, x.astype(jnp.float32))
    assert got.dtype == jnp.bfloat16 and state_bf16.ets.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want.astype(jnp.bfloat16)))


def _a1111_plms(config, steps, init, image=None, t_enc=None):
  """A1111's own PLMS loop (modules/sd_samplers_timesteps_impl.plms, 1.6+) over the fake model,
  restated in torch float32: its DDIM timesteps, a call at each from the last down to the second
  (the first step calling again at the next timestep, a pseudo improved Euler), the update
  sqrt(a_prev) x0 + sqrt(1 - a_prev) eps. The sample after every call. With `image` its
  img2img (sample_img2img): the first t_enc timesteps, `image` noised to the next one's level."""
  import torch  # noqa: PLC0415
  from k_diffusion_reference import ldm_alphas_cumprod  # noqa: PLC0415
  from scheduler_harness import fake_model  # noqa: PLC0415


  alphas_cumprod = ldm_alphas_cumprod(config).float()  # its model's buffer
  if config.get("downcast_alphas_cumprod"):  # the float16 model's buffer (A1111 < 1.7.0-225)
    alphas_cumprod = alphas_cumprod.half()
  timesteps = torch.clip(torch.arange(0, 1000, 1000 // steps) + 1, 0, 999)
  x, out, old_eps = torch.from_numpy(init), [], []
  if image is not None:
    level = alphas_cumprod[timesteps[t_enc]]
    x = torch.from_numpy(image) * torch.sqrt(level) + x * torch.sqrt(1 - level)
    timesteps = timesteps[:t_enc]
  alphas = alphas_cumprod[timesteps]
  sqrt_one_minus_alphas = (1 - alphas).sqrt().float()  # in the buffer's dtype
  alphas = alphas.float()  # the rest in float32 (`.item() * s_x`)
  alphas_prev = alphas_cumprod[torch.nn.functional.pad(timesteps[:-1], pad=(1, 0))].float()

  def model(x, t):
    return torch.from_numpy(fake_model(x.numpy(), float(t)))

  def x_prev(x, e_t, index):
    a_t, a_prev = alphas[index], alphas_prev[index]
    pred_x0 = (x - sqrt_one_minus_alphas[index] * e_t) / a_t.sqrt()
    return a_prev.sqrt() * pred_x0 + (1.0 - a_prev).sqrt() * e_t

  for i in range(len(timesteps) - 1):
    index = len(timesteps) - 1 - i
    e_t = model(x, timesteps[index])
    if not old_eps:
      guess = x_prev(x, e_t, index)
      out.append(guess.numpy())
      e_prime = (e_t + model(guess, timesteps[max(index - 1, 0)])) / 2
    elif len(old_eps) == 1:
      e_prime = (3 * e_t - old_eps[-1]) / 2
    elif len(old_eps) == 2:
      e_prime = (23 * e_t - 16 * old_eps[-1] + 5 * old_eps[-2]) / 12
    else:
      e_prime = (55 * e_t - 59 * old_eps[-1] + 37 * old_eps[-2] - 9 * old_eps[-3]) / 24
    x = x_prev(x, e_prime, index)
    old_eps = (old_eps + [e_t])[-3:]
    out.append(x.numpy())
  return np.stack(out)


@pytest.mark.parametrize("steps", [20, 30])
def test_a1111_form(steps):
  """The `a1111` option: A1111's own PLMS loop (one call more than its DDIM's: 20 for 20 steps,
  31 for 30), on a config without skip_prk_steps too; A1111's PLMS images read as it."""
  from scheduler_harness import max_rel_error, sdjax_trajectory  # noqa: PLC0415

  from sdjax import infotext  # noqa: PLC0415

  init, noises = make_noises(steps + 2)
  want = _a1111_plms(SD15, steps, init)
  for config in (SD15, {**SD15, "skip_prk_steps": False}):
    ours = get_scheduler("pndm", config, options={"a1111": True})
    got = sdjax_trajectory(ours, steps, init, noises)
    assert len(got) == len(want) == (20 if steps == 20 else 31)
    err = max_rel_error(got, want)
    print(f"\nA1111 PLMS, {steps} steps: {err:.2e}")
    assert err <= TOL
  diffusers_form = sdjax_trajectory(get_scheduler("pndm", SD15), steps, init, noises)
  apart = np.linalg.norm(diffusers_form[-1] - want[-1]) / np.linalg.norm(want[-1])
  assert apart > 100 * max(err, 1e-7), apart
  flags = infotext.reproduce(f"a cat\nSteps: {steps}, Sampler: PLMS, CFG scale: 7, Seed: 1").flags
  assert flags["scheduler_options"] == '{"a1111": true}'


def test_a1111_form_with_float16_alphas():
  """A1111's PLMS on a float16 model before 1.7.0-225 (or with its Downcast alphas_cumprod
  setting): alphas_cumprod in float16 and sqrt(1 - alpha) computed in float16, in A1111's
  update (`downcast_alphas_cumprod`)."""
  from scheduler_harness import max_rel_error, sdjax_trajectory  # noqa: PLC0415

  init, noises = make_noises(22)
  want = _a1111_plms({**SD15, "downcast_alphas_cumprod": True}, 20, init)
  ours = get_scheduler("pndm", SD15, options={"a1111": True, "downcast_alphas_cumprod": True})
  got = sdjax_trajectory(ours, 20, init, noises)
  err = max_rel_error(got, want)
  print(f"\nA1111 PLMS on float16 alphas: {err:.2e}")
  assert err <= TOL
  assert max_rel_error(got, _a1111_plms(SD15, 20, init)) > 100 * TOL


@pytest.mark.parametrize("steps,strength,options", [
    (20, 0.6, {}), (30, 0.4, {}), (20, 0.75, {"downcast_alphas_cumprod": True})])
def test_a1111_img2img(steps, strength, options):
  """The `a1111` form's img2img (`a1111_img2img`: A1111's t_enc): its PLMS over the first t_enc
  timesteps, its first step calling twice, the image noised to the level above the first call's."""
  from scheduler_harness import max_rel_error, sdjax_trajectory  # noqa: PLC0415

  t_enc = int(strength * steps)
  ours = get_scheduler("pndm", SD15, options={"a1111": True, "a1111_img2img": t_enc, **options})
  init, noises = make_noises(steps + 2)
  image = np.random.default_rng(7).standard_normal(init.shape).astype(np.float32)
  got = sdjax_trajectory(ours, steps, init, noises, init_sample=image)
  want = _a1111_plms({**SD15, **options}, steps, init, image=image, t_enc=t_enc)
  assert len(got) == len(want) == t_enc
  err = max_rel_error(got, want)
  print(f"\nA1111 PLMS img2img, {steps} steps at {strength}: {err:.2e}")
  assert err <= TOL
