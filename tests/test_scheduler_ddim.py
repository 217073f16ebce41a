"""sdjax's DDIM against diffusers' `DDIMScheduler` (v0.42), step by step on a fake model."""

from __future__ import annotations

import json

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scheduler_harness import PLAIN_TOL, SHAPE, make_noises, parity_errors

from sdjax import testing
from sdjax.schedulers import SchedulerConfigError, get_scheduler
from sdjax.schedulers.common import make_alphas_cumprod
from sdjax.schedulers.ddim import DDIMScheduler

TOL = 1e-6
SD15 = dict(testing.SCHEDULER_SD15)  # Stable Diffusion 1.5's scheduler_config.json
LINEAR = {
  "beta_schedule": "linear",
  "beta_start": 0.0001,
  "beta_end": 0.02,
  "steps_offset": 0,
  "set_alpha_to_one": True,
  "clip_sample": True,
}
PREDICTIONS = ("epsilon", "v_prediction", "sample")
SPACINGS = ("leading", "trailing", "linspace")


def _case(overrides, steps, strength=None, eta=0.0):
  parts = [f"{k}={v}" for k, v in overrides.items()] + [f"steps={steps}"]
  parts += [f"strength={strength}"] if strength is not None else []
  parts += [f"eta={eta}"] if eta else []
  return pytest.param(overrides, steps, strength, eta, id=",".join(parts))


CASES = (
  [_case({"prediction_type": p, "timestep_spacing": s}, 10) for p in PREDICTIONS for s in SPACINGS]
  + [_case({"prediction_type": p}, n) for p in PREDICTIONS for n in (1, 25)]
  + [_case({**LINEAR, "prediction_type": p}, 10) for p in ("epsilon", "v_prediction")]
  + [_case({**LINEAR, "timestep_spacing": "trailing", "prediction_type": "sample"}, 4)]
  # img2img: the run starts part-way, from add_noise.
  + [_case({"prediction_type": p}, 10, strength=0.6) for p in ("epsilon", "sample")]
  + [_case({"timestep_spacing": "trailing", "prediction_type": "v_prediction"}, 10, strength=0.3)]
  # eta > 0: fresh noise at every step.
  + [
    _case({}, 10, eta=0.5),
    _case({**LINEAR, "prediction_type": "v_prediction", "timestep_spacing": "trailing"}, 4, eta=1),
  ]
  # Zero terminal SNR (SD 2.1's recipe); epsilon would divide by alpha_prod = 0 there.
  + [
    _case({"rescale_betas_zero_snr": True, "timestep_spacing": s, "prediction_type": p}, 10)
    for s, p in (("trailing", "v_prediction"), ("linspace", "sample"))
  ]
)


def _reference(config, eta=0.0):
  """diffusers' DDIM, with `eta` passed to every step as its pipelines pass it."""
  if not eta:
    return diffusers.DDIMScheduler.from_config(config)

  class EtaDDIM(diffusers.DDIMScheduler):
    def step(self, *args, **kwargs):
      return super().step(*args, eta=eta, **kwargs)

  # The harness injects the step noise into the module that defines the class.
  EtaDDIM.__module__ = diffusers.DDIMScheduler.__module__
  return EtaDDIM.from_config(config)


@pytest.mark.parametrize("overrides,steps,strength,eta", CASES)
def test_matches_diffusers(overrides, steps, strength, eta):
  config = {**SD15, **overrides}
  ours = DDIMScheduler.from_config(config, eta=eta)
  assert ours.needs_noise == (eta > 0)
  parity = parity_errors(ours, lambda: _reference(config, eta), steps, strength=strength)
  assert parity.exact_sqrt <= TOL
  assert parity.plain <= PLAIN_TOL and parity.plain_timesteps_equal


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="bit-exactness is checked on CPU")
def test_bit_exact_with_correctly_rounded_sqrt():
  """With torch's square roots correctly rounded, the trajectories agree to the last bit.

  SD's 50 steps with v-prediction is where torch's CPU sqrt (MKL) alone moves the plain
  comparison towards 1e-6; every other float32 operation rounds as diffusers' does.
  """
  config = {**SD15, "prediction_type": "v_prediction", "timestep_spacing": "linspace"}
  ours = get_scheduler("ddim", config)
  parity = parity_errors(ours, lambda: _reference(config), 50)
  assert parity.exact_sqrt == 0.0, parity


def test_from_config_resolves_like_diffusers():
  config = {**SD15, "unknown_key": 3, "timestep_spacing": "trailing"}
  ours = get_scheduler("ddim", config)
  ref = diffusers.DDIMScheduler.from_config(config)
  for key in DDIMScheduler._DEFAULTS:
    assert ours.cfg[key] == ref.config[key], key
  assert "unknown_key" not in ours.cfg and "skip_prk_steps" not in ours.cfg
  # Missing keys take DDIM's own defaults, not PNDM's; overrides win.
  bare = DDIMScheduler.from_config({}, prediction_type="v_prediction")
  assert bare.cfg["clip_sample"] is True and bare.cfg["set_alpha_to_one"] is True
  assert bare.cfg["prediction_type"] == "v_prediction"


@pytest.mark.parametrize(
  "option",
  [
    {"thresholding": True},
    {"prediction_type": "flow"},
    {"timestep_spacing": "karras"},
    {"beta_schedule": "sigmoid"},
  ],
  ids=lambda o: next(iter(o)),
)
def test_unsupported_options_raise(option):
  key = next(iter(option))
  with pytest.raises(SchedulerConfigError, match=key):
    get_scheduler("ddim", {**SD15, **option})


def test_negative_eta_raises():
  with pytest.raises(SchedulerConfigError, match="eta"):
    DDIMScheduler.from_config(SD15, eta=-0.1)


def test_eta_lives_in_the_state():
  """Every eta > 0 compiles one program (`program()`); its value only scales the state."""
  half, one = (get_scheduler("ddim", SD15, eta=e) for e in (0.5, 1.0))
  assert half.program() == one.program() == one and half.program() != half
  assert get_scheduler("ddim", SD15).program() == get_scheduler("ddim", SD15)
  state = half.set_timesteps(10, SHAPE)
  init, steps = make_noises(2)
  x, out, noise = (jnp.asarray(a) for a in (init, steps[0], steps[1]))
  np.testing.assert_array_equal(np.asarray(half.program().step(state, out, 3, x, noise)[0]),
                                np.asarray(half.step(state, out, 3, x, noise)[0]))
  with pytest.raises(SchedulerConfigError, match="eta is an option of ddim, tcd, ddim_cfg_pp only"):
    get_scheduler("euler_ancestral", SD15, eta=0.5)


def test_too_many_steps_raise():
  with pytest.raises(ValueError, match="num_train_timesteps"):
    get_scheduler("ddim", SD15).set_timesteps(1001)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_true_noise_model_recovers_the_clean_sample(prediction_type):
  """A model that knows x_t = sqrt(a) x0 + sqrt(1 - a) eps lands deterministic DDIM on x0."""
  config = {**SD15, "set_alpha_to_one": True, "prediction_type": prediction_type}
  sched = get_scheduler("ddim", config)
  state = sched.set_timesteps(10, SHAPE)
  clean, noise = make_noises(1, seed=3)
  clean, noise = jnp.asarray(clean), jnp.asarray(noise[0])
  alphas_cumprod = make_alphas_cumprod(sched.cfg)
  x = sched.add_noise(state, clean, noise, 0)
  for i in range(len(state.timesteps)):
    a = np.float32(alphas_cumprod[int(state.timesteps[i])])
    # The noise is the same at every t: each step lands exactly on the next x_t.
    out = noise if prediction_type == "epsilon" else np.sqrt(a) * noise - np.sqrt(1 - a) * clean
    x, state = sched.step(state, out, i, x)
  np.testing.assert_allclose(np.asarray(x), np.asarray(clean), rtol=0, atol=2e-5)


def test_bfloat16_sample_keeps_its_dtype_with_float32_math():
  sched = get_scheduler("ddim", {**SD15, "prediction_type": "v_prediction"})
  state = sched.set_timesteps(10, SHAPE)
  init, steps = make_noises(1)
  x, out = jnp.asarray(init, jnp.bfloat16), jnp.asarray(steps[0], jnp.bfloat16)
  got, _ = sched.step(state, out, 3, x)
  want, _ = sched.step(state, out.astype(jnp.float32), 3, x.astype(jnp.float32))
  assert got.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want.astype(jnp.bfloat16)))


def _a1111_ddim(config, steps, init, noises, eta=0.0, image=None, t_enc=None):
  """A1111's own DDIM loop (modules/sd_samplers_timesteps_impl.ddim, 1.6+) over the fake
  model, restated in torch float32: timesteps range(0, 1000, 1000 // steps) + 1, a call at each
  from the last down to the second, each stepping to the timestep before it. With `image` its
  img2img (sample_img2img): the first t_enc timesteps, `image` noised to the next one's level."""
  import torch  # noqa: PLC0415
  from k_diffusion_reference import ldm_alphas_cumprod  # noqa: PLC0415
  from scheduler_harness import fake_model  # noqa: PLC0415

  alphas_cumprod = ldm_alphas_cumprod(config).float()  # its model's buffer
  if config.get("downcast_alphas_cumprod"):  # the float16 model's buffer (A1111 < 1.7.0-225)
    alphas_cumprod = alphas_cumprod.half()
  timesteps = torch.clip(torch.arange(0, 1000, 1000 // steps) + 1, 0, 999)
  x, out = torch.from_numpy(init), []
  if image is not None:
    level = alphas_cumprod[timesteps[t_enc]]
    x = torch.from_numpy(image) * torch.sqrt(level) + x * torch.sqrt(1 - level)
    timesteps = timesteps[:t_enc]
  alphas = alphas_cumprod[timesteps]
  sqrt_one_minus_alphas = (1 - alphas).sqrt().float()  # in the buffer's dtype
  alphas = alphas.float()  # the rest in float32 (`.item() * s_x`)
  alphas_prev = alphas_cumprod[torch.nn.functional.pad(timesteps[:-1], pad=(1, 0))].float()
  sigmas = eta * ((1 - alphas_prev) / (1 - alphas) * (1 - alphas / alphas_prev)) ** 0.5
  for i in range(len(timesteps) - 1):
    index = len(timesteps) - 1 - i
    e_t = torch.from_numpy(fake_model(x.numpy(), float(timesteps[index])))
    a_t, a_prev, sigma_t = alphas[index], alphas_prev[index], sigmas[index]
    pred_x0 = (x - sqrt_one_minus_alphas[index] * e_t) / a_t.sqrt()
    x = a_prev.sqrt() * pred_x0 + (1.0 - a_prev - sigma_t**2).sqrt() * e_t + sigma_t * (
        torch.from_numpy(noises[i]))
    out.append(x.numpy())
  return np.stack(out)


@pytest.mark.parametrize("steps,calls,eta", [(20, 19, 0.0), (30, 30, 0.0), (6, 6, 0.5)])
def test_a1111_form(steps, calls, eta):
  """The `a1111` option: A1111's own DDIM loop (one UNet call fewer than its timesteps, 19 for
  20 steps but 30 for 30, ending at timestep 1's level); A1111's DDIM images read as it."""
  from scheduler_harness import max_rel_error, sdjax_trajectory  # noqa: PLC0415

  from sdjax import infotext  # noqa: PLC0415

  ours = get_scheduler("ddim", SD15, eta=eta, options={"a1111": True})
  state = ours.set_timesteps(steps)
  assert len(state.timesteps) == calls and int(state.timesteps[-1]) == 1 + 1000 // steps
  init, noises = make_noises(max(steps, calls))  # the diffusers form's run too
  got = sdjax_trajectory(ours, steps, init, noises)
  want = _a1111_ddim(SD15, steps, init, noises, eta)
  err = max_rel_error(got, want)
  print(f"\nA1111 DDIM, {steps} steps, eta {eta}: {err:.2e}")
  assert err <= TOL
  diffusers_form = sdjax_trajectory(get_scheduler("ddim", SD15, eta=eta), steps, init, noises)
  # diffusers' own (20 steps: the same calls and one more, from timestep 1 to the end)
  apart = np.linalg.norm(diffusers_form[-1] - want[-1]) / np.linalg.norm(want[-1])
  assert apart > 100 * max(err, 1e-7), apart
  flags = infotext.reproduce(f"a cat\nSteps: {steps}, Sampler: DDIM, CFG scale: 7, Seed: 1").flags
  assert flags["scheduler_options"] == '{"a1111": true}'


def test_a1111_form_with_float16_alphas():
  """A1111's DDIM on a float16 model before 1.7.0-225 (or with its Downcast alphas_cumprod
  setting): alphas_cumprod in float16, sqrt(1 - alpha) computed in float16, the rest in float32
  from those values (`downcast_alphas_cumprod`); an image whose Version is that old reads so."""
  from scheduler_harness import max_rel_error, sdjax_trajectory  # noqa: PLC0415

  from sdjax import infotext  # noqa: PLC0415

  options = {"a1111": True, "downcast_alphas_cumprod": True}
  ours = get_scheduler("ddim", SD15, options=options)
  init, noises = make_noises(20)
  got = sdjax_trajectory(ours, 20, init, noises)
  want = _a1111_ddim({**SD15, "downcast_alphas_cumprod": True}, 20, init, noises)
  err = max_rel_error(got, want)
  print(f"\nA1111 DDIM on float16 alphas: {err:.2e}")
  assert err <= TOL
  assert max_rel_error(got, _a1111_ddim(SD15, 20, init, noises)) > 100 * TOL
  old = infotext.reproduce("a cat\nSteps: 20, Sampler: DDIM, CFG scale: 7, Seed: 1, "
                           "Version: v1.5.2").flags
  assert json.loads(old["scheduler_options"]) == {**options, "downcast_alphas_cumprod": "sd1_sd2"}
  assert old["pad_cond_uncond_v0"] == "true"  # what A1111 before 1.6.0 did too


@pytest.mark.parametrize("steps,strength,options", [
    (20, 0.6, {}), (30, 0.75, {"eta": 0.5}), (20, 0.5, {"downcast_alphas_cumprod": True})])
def test_a1111_img2img(steps, strength, options):
  """The `a1111` form's img2img (`a1111_img2img`: A1111's t_enc = int(strength * steps)): its
  DDIM over the first t_enc timesteps (t_enc - 1 calls), the image noised to the level of the
  timestep above the first call's, as its sample_img2img."""
  from scheduler_harness import max_rel_error, sdjax_trajectory  # noqa: PLC0415

  t_enc = int(strength * steps)
  eta = options.get("eta", 0.0)
  forms = {"a1111": True, "a1111_img2img": t_enc,
           **{k: v for k, v in options.items() if k != "eta"}}
  ours = get_scheduler("ddim", SD15, eta=eta, options=forms)
  init, noises = make_noises(steps)
  image = np.random.default_rng(7).standard_normal(init.shape).astype(np.float32)
  got = sdjax_trajectory(ours, steps, init, noises, init_sample=image)
  assert len(got) == t_enc - 1
  want = _a1111_ddim({**SD15, **options}, steps, init, noises, eta, image=image, t_enc=t_enc)
  err = max_rel_error(got, want)
  print(f"\nA1111 DDIM img2img, {steps} steps at {strength}: {err:.2e}")
  assert err <= TOL
  # not at the first call's own level (where diffusers' img2img starts)
  state = ours.set_timesteps(steps)
  assert not np.allclose(np.asarray(ours.img2img_noise(state, image, init, 0)),
                         np.asarray(ours.add_noise(state, image, init, 0)), rtol=1e-3)


def test_parallel_class_is_the_same_scheduler():
  """A checkpoint shipping diffusers' DDIMParallelScheduler (its config, its step) gets
  ddim."""
  config = {**SD15, "_class_name": "DDIMParallelScheduler", "prediction_type": "v_prediction"}
  parity = parity_errors(get_scheduler(None, config),
                         lambda: diffusers.DDIMParallelScheduler.from_config(config), 10)
  assert parity.exact_sqrt == 0.0 and parity.plain <= PLAIN_TOL, parity
