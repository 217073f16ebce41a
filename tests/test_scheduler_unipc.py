"""UniPC against diffusers' UniPCMultistepScheduler, step by step, on a fake model."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from diffusers import UniPCMultistepScheduler as RefUniPC
from scheduler_harness import SHAPE, parity_errors

from sdjax import testing
from sdjax.schedulers import SchedulerConfigError, default_scheduler_name, get_scheduler

SD15 = dict(testing.SCHEDULER_SD15)  # Stable Diffusion 1.5's scheduler_config.json
TOL = 1e-6
STEPS = (1, 2, 4, 10, 25)


def _grid():
  """Every prediction type x spacing x karras, cycling step counts and steps_offset."""
  cases = []
  combos = itertools.product(("epsilon", "v_prediction", "sample"),
                             ("leading", "trailing", "linspace"), (False, True))
  for idx, (pred, spacing, karras) in enumerate(combos):
    steps, offset = STEPS[(idx + idx // 6) % len(STEPS)], (idx // 2) % 2
    case_id = f"{pred}-{spacing}-karras{int(karras)}-{steps}steps-offset{offset}"
    cases.append(pytest.param(
        dict(prediction_type=pred, timestep_spacing=spacing, steps_offset=offset,
             use_karras_sigmas=karras), steps, id=case_id))
  return cases


def _compare(options, steps, strength=None):
  cfg = dict(SD15, **options)
  parity = parity_errors(get_scheduler("unipc", cfg), lambda: RefUniPC.from_config(cfg), steps,
                         strength=strength)
  print(f"unipc {options} {steps} steps: {parity.plain:.3g} (exact sqrt {parity.exact_sqrt:.3g})")
  assert parity.exact_sqrt <= TOL
  return parity


@pytest.mark.parametrize("options,steps", _grid())
def test_trajectory_matches_diffusers(options, steps):
  _compare(options, steps)


@pytest.mark.parametrize("options,steps", [
    ({"solver_order": 1}, 10),
    ({"solver_order": 3}, 10),
    ({"solver_order": 3, "prediction_type": "v_prediction", "use_karras_sigmas": True}, 20),
    # Without lower_order_final the last step keeps the full order (zero final sigma: diffusers'
    # own solve fails). At order 3 that last extrapolation amplifies float32 rounding to ~1e-6
    # (0.56-1.1e-6 measured at 6-20 steps), so the flag is checked at order 2.
    ({"lower_order_final": False, "final_sigmas_type": "sigma_min"}, 8),
    ({"solver_type": "bh1", "final_sigmas_type": "sigma_min"}, 12),
    ({"solver_type": "bh1", "solver_order": 3, "final_sigmas_type": "sigma_min"}, 12),
    ({"disable_corrector": [0, 3]}, 8),
    ({"final_sigmas_type": "sigma_min", "use_karras_sigmas": True}, 10),
    ({"rescale_betas_zero_snr": True, "timestep_spacing": "trailing",
      "prediction_type": "v_prediction"}, 10),
    ({"solver_type": "midpoint"}, 6),  # diffusers reads it as bh2
    ({"use_exponential_sigmas": True}, 10),
    ({"use_exponential_sigmas": True, "final_sigmas_type": "sigma_min"}, 10),
    ({"use_beta_sigmas": True, "solver_order": 3}, 12),
], ids=["order1", "order3", "order3-v-karras", "no-lower-final", "bh1", "bh1-order3",
        "disable_corrector", "karras-sigma_min", "zero_snr-v", "midpoint-as-bh2", "exponential",
        "exponential-sigma_min", "beta-order3"])
def test_options_match_diffusers(options, steps):
  _compare(options, steps)


@pytest.mark.parametrize("options,steps,strength", [
    ({}, 20, 0.6),
    ({"solver_order": 3, "use_karras_sigmas": True}, 10, 0.75),
])
def test_img2img_matches_diffusers(options, steps, strength):
  # Starting mid-schedule: no correction at the first step, and the order warms up again.
  _compare(options, steps, strength)


def test_config_resolves_as_diffusers():
  ours = get_scheduler("unipc", SD15)
  ref = RefUniPC.from_config(SD15)
  for key, value in ours.cfg.items():
    if key in ("a1111", "comfyui", "skip_type"):  # sdjax's: A1111's and ComfyUI's forms, off
      continue
    assert ref.config[key] == value or (key == "disable_corrector" and not value), key
  cfg = dict(SD15, _class_name="UniPCMultistepScheduler")
  assert default_scheduler_name(cfg) == "unipc"
  assert not ours.needs_noise


@pytest.mark.parametrize("options,option", [
    ({"predict_x0": False}, "predict_x0"),
    ({"thresholding": True}, "thresholding"),
    ({"solver_order": 4}, "solver_order"),
    ({"solver_type": "bh3"}, "solver_type"),
    ({"use_flow_sigmas": True}, "use_flow_sigmas"),
    ({"final_sigmas_type": "one"}, "final_sigmas_type"),
    ({"sigma_min": 0.1}, "sigma_min"),
])
def test_unsupported_options_raise(options, option):
  with pytest.raises(SchedulerConfigError, match=option):
    get_scheduler("unipc", dict(SD15, **options))


def test_needs_sample_shape():
  with pytest.raises(ValueError, match="sample_shape"):
    get_scheduler("unipc", SD15).set_timesteps(10)
  state = get_scheduler("unipc", SD15).set_timesteps(10, sample_shape=SHAPE)
  assert state.model_outputs.shape == (2, *SHAPE) and np.asarray(state.corrector)[0] == 0


def _uni_pc(x, times, data, log_alpha, order, variant, lower_order_final=True):
  """uni_pc's `UniPC.sample` multistep loop (predict_x0, B(h) variants) in torch float32, as
  A1111 and ComfyUI run it: `data(x, t)` the data prediction, `log_alpha(t)` log alpha_t at
  positions `times`. (the model's input at each position after the first, the result)."""
  import torch  # noqa: PLC0415

  def std(t):
    return torch.sqrt(1.0 - torch.exp(2.0 * log_alpha(t)))

  def lam(t):
    la = log_alpha(t)
    return la - 0.5 * torch.log(1.0 - torch.exp(2.0 * la))

  inputs = []

  def update(x, models, ts, t, k, use_corrector):  # multistep_uni_pc_bh_update
    lam_prev, lam_t = lam(ts[-1]), lam(t)
    h = lam_t - lam_prev
    rks, d1s = [], []
    for i in range(1, k):
      rk = ((lam(ts[-(i + 1)]) - lam_prev) / h)[0]
      rks.append(rk)
      d1s.append((models[-(i + 1)] - models[-1]) / rk)
    rks = torch.tensor([*rks, 1.0])
    hh = -h[0]
    h_phi_1 = torch.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1
    b_h = hh if variant == "bh1" else torch.expm1(hh)
    rows, b, factorial = [], [], 1
    for i in range(1, k + 1):
      rows.append(torch.pow(rks, i - 1))
      b.append(h_phi_k * factorial / b_h)
      factorial *= i + 1
      h_phi_k = h_phi_k / hh - 1 / factorial
    r, b = torch.stack(rows), torch.tensor(b)
    alpha_t = torch.exp(log_alpha(t))
    x_t_ = (std(t) / std(ts[-1])) * x - (alpha_t * h_phi_1) * models[-1]
    x_t = x_t_
    if d1s:
      d1s = torch.stack(d1s, dim=1)
      rhos_p = torch.tensor([0.5]) if k == 2 else torch.linalg.solve(r[:-1, :-1], b[:-1])
      x_t = x_t_ - (alpha_t * b_h) * torch.einsum("k,bkhwc->bhwc", rhos_p, d1s)
    if not use_corrector:
      return x_t, None
    inputs.append(x_t.numpy())
    model_t = data(x_t, t)
    rhos_c = torch.tensor([0.5]) if k == 1 else torch.linalg.solve(r, b)
    corr = torch.einsum("k,bkhwc->bhwc", rhos_c[:-1], d1s) if len(rows) > 1 else 0
    return x_t_ - (alpha_t * b_h) * (corr + rhos_c[-1] * (model_t - models[-1])), model_t

  n = len(times) - 1
  models, ts = [data(x, times[0:1])], [times[0:1]]
  for step in range(1, n + 1):
    k = min(order, n + 1 - step) if lower_order_final and step >= order else min(step, order)
    x, model_x = update(x, models, ts, times[step:step + 1], k, use_corrector=step < n)
    models, ts = [*models, model_x][-order:], [*ts, times[step:step + 1]][-order:]
  return inputs, x


def _a1111_unipc(config, steps, init, order=3, variant="bh1", skip_type="time_uniform",
                 lower_order_final=True, image=None, t_enc=None):
  """A1111's UniPC (modules/sd_samplers_timesteps_impl.unipc over its uni_pc.UniPC, the UniPC
  authors' continuous-time code), restated in torch float32 over the fake model: the model's
  input at every position after the first, then the result (as `sdjax_trajectory` records).
  With `image` its img2img (sample_img2img): t_enc steps from the last kept timestep's time,
  `image` noised to the next timestep's level."""
  import torch  # noqa: PLC0415
  from k_diffusion_reference import _zero_snr, ldm_alphas_cumprod  # noqa: PLC0415
  from scheduler_harness import fake_model  # noqa: PLC0415

  alphas_cumprod = ldm_alphas_cumprod(config)
  buffer = alphas_cumprod.float()  # its model's alphas_cumprod
  if config.get("downcast_alphas_cumprod"):
    buffer = buffer.half()
  if config.get("rescale_betas_zero_snr"):  # that buffer only: not ldm's sqrt buffers (v)
    buffer = _zero_snr(buffer)
  sqrt_a, sqrt_1ma = alphas_cumprod.sqrt().float(), (1 - alphas_cumprod).sqrt().float()
  log_alphas = (0.5 * torch.log(buffer)).reshape(1, -1)
  total = len(buffer)
  t_array = torch.linspace(0.0, 1.0, total + 1)[1:].reshape(1, -1)

  def interpolate(x, xp, yp):  # piecewise linear through (xp, yp), the ends extended
    k = xp.shape[1]
    everything = torch.cat([x.unsqueeze(2), xp.unsqueeze(0).repeat((x.shape[0], 1, 1))], dim=2)
    ordered, where = torch.sort(everything, dim=2)
    idx = torch.argmin(where, dim=2)  # where x landed among the keypoints
    start = torch.where(idx == 0, 1, torch.where(idx == k, k - 2, idx - 1))
    end = torch.where(start == idx - 1, start + 2, start + 1)
    x0, x1 = (torch.gather(ordered, 2, i.unsqueeze(2)).squeeze(2) for i in (start, end))
    start_y = torch.where(idx == 0, 0, torch.where(idx == k, k - 2, idx - 1))
    ys = yp.unsqueeze(0).expand(x.shape[0], -1, -1)
    y0, y1 = (torch.gather(ys, 2, i.unsqueeze(2)).squeeze(2) for i in (start_y, start_y + 1))
    return y0 + (x - x0) * (y1 - y0) / (x1 - x0)

  def log_alpha(t):
    return interpolate(t.reshape(-1, 1), t_array, log_alphas).reshape(-1)

  def lam(t):
    la = log_alpha(t)
    return la - 0.5 * torch.log(1.0 - torch.exp(2.0 * la))

  n = len(range(0, 1000, 1000 // steps))
  t_T, t_0 = 1.0, 1.0 / total
  x = torch.from_numpy(init)
  if image is not None:
    grid = torch.clip(torch.arange(0, 1000, 1000 // steps) + 1, 0, 999)
    level = buffer[grid[t_enc]]
    x = torch.from_numpy(image) * torch.sqrt(level) + x * torch.sqrt(1 - level)
    n, t_T = t_enc, grid[:t_enc][-1] / 1000 + 1 / 1000
  if skip_type == "time_uniform":
    times = torch.linspace(t_T, t_0, n + 1)
  elif skip_type == "time_quadratic":
    times = torch.linspace(t_T ** 0.5, t_0 ** 0.5, n + 1).pow(2)
  else:  # logSNR, through inverse_lambda
    ends = [lam(torch.tensor(v).reshape(1)).item() for v in (t_T, t_0)]
    la = -0.5 * torch.logaddexp(torch.zeros((1,)), -2.0 * torch.linspace(*ends, n + 1))
    times = interpolate(la.reshape(-1, 1), torch.flip(log_alphas, [1]).float(),
                        torch.flip(t_array, [1])).reshape(-1)

  def data(x, t):
    t_in = (t - 1.0 / total) * 1000.0
    out = torch.from_numpy(fake_model(x.numpy(), float(t_in[0])))
    if config.get("prediction_type") == "v_prediction":  # CompVisTimestepsVDenoiser
      i = t_in.to(torch.int)
      out = sqrt_a[i] * out + sqrt_1ma[i] * x
    return (x - torch.sqrt(1.0 - torch.exp(2.0 * log_alpha(t))) * out) / torch.exp(log_alpha(t))

  inputs, x = _uni_pc(x, times, data, log_alpha, order, variant, lower_order_final)
  return np.stack([*inputs, x.numpy()])


@pytest.mark.parametrize("steps,options", [
    (20, {}),
    (30, {}),  # A1111's grid: 31 positions
    (8, {"solver_type": "bh2"}),
    (12, {"solver_order": 2}),
    (10, {"solver_order": 1}),
    (8, {"lower_order_final": False}),  # order 3 to the end: its last step amplifies ulps
    (15, {"skip_type": "time_quadratic"}),
    (10, {"skip_type": "logSNR"}),
    (20, {"prediction_type": "v_prediction"}),
    (12, {"downcast_alphas_cumprod": True}),
    (10, {"rescale_betas_zero_snr": True}),
], ids=["20", "30", "bh2", "order2", "order1", "no-lower-final", "time_quadratic", "logSNR",
        "v", "float16", "zero_snr"])
def test_a1111_form(steps, options):
  """The `a1111` option: A1111's UniPC (bh1, order 3 by its settings), its positions in
  continuous time, fractional timesteps and an end at timestep 0's noise; vs its loop restated."""
  from scheduler_harness import make_noises, max_rel_error, sdjax_trajectory  # noqa: PLC0415

  a1111 = {"solver_type": "bh1", "solver_order": 3, **options}
  config = {k: v for k, v in {**SD15, **a1111}.items() if k != "downcast_alphas_cumprod"}
  ours = get_scheduler("unipc", config, options={"a1111": True, **(
      {"downcast_alphas_cumprod": True} if options.get("downcast_alphas_cumprod") else {})})
  init, noises = make_noises(40)
  got = sdjax_trajectory(ours, steps, init, noises)
  want = _a1111_unipc({**SD15, **options}, steps, init, order=a1111["solver_order"],
                      variant=a1111["solver_type"], skip_type=a1111.get("skip_type",
                                                                        "time_uniform"),
                      lower_order_final=a1111.get("lower_order_final", True))
  assert got.shape == want.shape
  err = max_rel_error(got, want)
  print(f"\nA1111 UniPC {steps} steps {options}: {err:.2e}")
  assert err <= TOL
  final = "zero" if config.get("lower_order_final", True) else "sigma_min"  # diffusers': NaNs
  diffusers_form = sdjax_trajectory(get_scheduler("unipc", {**config, "final_sigmas_type": final}),
                                    steps, init, noises)
  apart = np.linalg.norm(diffusers_form[-1] - want[-1]) / np.linalg.norm(want[-1])
  assert apart > 100 * max(err, 1e-7), apart


def _comfyui_unipc(config, sigmas, noise, variant, image=None):
  """ComfyUI's uni_pc / uni_pc_bh2 (comfy/extra_samplers/uni_pc.sample_unipc) restated in torch
  float32 over the fake model, from its KSampler's start (unit noise times sqrt(1 + sigma_0^2);
  with `image`, img2img's: the image plus noise times sigma_0) and as its model wraps the UNet
  (the input scaled by sigma, whole timesteps)."""
  import torch  # noqa: PLC0415
  from k_diffusion_reference import train_log_sigmas  # noqa: PLC0415
  from scheduler_harness import fake_model  # noqa: PLC0415

  log_sigmas = train_log_sigmas({**config, "comfyui": True}).float()

  def denoise(x, sigma):
    c_in = 1 / (sigma**2 + 1) ** 0.5
    out = torch.from_numpy(fake_model((x * c_in).numpy(),
                                      float((sigma.log() - log_sigmas).abs().argmin())))
    if config.get("prediction_type") == "v_prediction":
      return x / (sigma**2 + 1) + out * (-sigma * c_in)
    return x + out * -sigma

  def log_alpha(s):
    return 0.5 * torch.log(1 / ((s * s) + 1))

  def data(x, s):  # predict_eps_sigma, then the data prediction
    model_in = x * ((s**2 + 1.0) ** 0.5)
    eps = (model_in - denoise(model_in, s)) / s
    return (x - torch.sqrt(1.0 - torch.exp(2.0 * log_alpha(s))) * eps) / torch.exp(log_alpha(s))

  times = sigmas.clone()
  if times[-1] == 0:
    times[-1] = 0.001
  if image is None:
    x = torch.from_numpy(noise) * torch.sqrt(1.0 + sigmas[0] ** 2.0)  # its KSampler's start
  else:
    x = torch.from_numpy(noise) * sigmas[0] + torch.from_numpy(image)
  x = x / torch.sqrt(1.0 + times[0] ** 2.0)
  inputs, x = _uni_pc(x, times, data, log_alpha, min(3, len(times) - 2), variant)
  return np.stack([*inputs, (x / torch.exp(log_alpha(times[-1:]))).numpy()])


@pytest.mark.parametrize("variant,label,steps,prediction", [
    ("bh1", "Uniform", 10, "epsilon"), ("bh2", "Karras", 12, "epsilon"),
    ("bh1", "Karras", 8, "v_prediction"), ("bh1", "Uniform", 3, "epsilon")])
def test_comfyui_form(variant, label, steps, prediction):
  """The `comfyui` option: ComfyUI's uni_pc (bh1) and uni_pc_bh2 over its levels, a final 0
  moved to 0.001, order 3 (2 at 3 steps), the result scaled back by that level's alpha."""
  import k_diffusion_reference as kd  # noqa: PLC0415
  from scheduler_harness import make_noises, max_rel_error, sdjax_trajectory  # noqa: PLC0415

  from sdjax import outputs  # noqa: PLC0415

  config = {**SD15, "prediction_type": prediction}
  options = {"comfyui": True, "solver_type": variant, "solver_order": 3,
             "timestep_spacing": "linspace", **outputs.schedule_type_options(label)}
  ours = get_scheduler("unipc", config, options=options)
  init, noises = make_noises(steps)
  got = sdjax_trajectory(ours, steps, init, noises)
  comfy = {**config, "comfyui": True}
  sigmas = (kd.get_sigmas if label == "Uniform" else kd.get_sigmas_karras)(comfy, steps)
  want = _comfyui_unipc(config, sigmas, init, variant)
  err = max_rel_error(got, want)
  print(f"\nComfyUI uni_pc {variant} {label} {steps} steps {prediction}: {err:.2e}")
  assert err <= TOL
  others = {k: v for k, v in options.items() if k != "comfyui"}
  diffusers_form = sdjax_trajectory(get_scheduler("unipc", config, options=others), steps, init,
                                    noises)
  assert max_rel_error(diffusers_form, want) > 100 * max(err, 1e-7)
  with pytest.raises(ValueError, match="at least 2"):
    ours.set_timesteps(1, sample_shape=SHAPE)
  # A pass starting lower (levels below sigma_max): noise times its first level (VP: / sqrt(26)).
  lower = get_scheduler("unipc", config, options={"comfyui": True, "sigmas": [5.0, 2.0, 0.5, 0]})
  state = lower.set_timesteps(3, sample_shape=SHAPE)
  np.testing.assert_allclose(float(lower.init_noise_sigma(state)), 5.0 / 26.0**0.5, rtol=1e-6)


def test_a1111_unipc_settings_read_from_an_image():
  """An A1111 UniPC image: its form and settings (written when changed: variant, skip type,
  order, lower order final) as UniPC's options; what sdjax lacks, or an older A1111 ran, a note."""
  import json  # noqa: PLC0415

  from sdjax import infotext  # noqa: PLC0415

  text = "a cat\nSteps: 20, Sampler: UniPC, CFG scale: 7, Seed: 1"
  found = infotext.reproduce(text)
  assert json.loads(found.flags["scheduler_options"]) == {
    "a1111": True, "solver_type": "bh1", "solver_order": 3}
  assert "scheduler" not in dict(found.notes)
  changed = infotext.reproduce(text + ", UniPC variant: bh2, UniPC skip type: time_quadratic, "
                               "UniPC order: 2, UniPC lower order final: False")
  options = json.loads(changed.flags["scheduler_options"])
  assert options == {"a1111": True, "solver_type": "bh2", "solver_order": 2,
                     "skip_type": "time_quadratic", "lower_order_final": False}
  get_scheduler("unipc", SD15, options=options).set_timesteps(20, sample_shape=SHAPE)
  assert "not reproduced" not in dict(changed.notes).get(None, "")
  vary = infotext.reproduce(text + ", UniPC variant: vary_coeff")
  assert "bh1 and bh2" in dict(vary.notes)["scheduler"]
  old = infotext.reproduce(text + ", Version: v1.5.2")
  assert "before 1.6.0" in dict(old.notes)["scheduler"]


@pytest.mark.parametrize("steps,strength,options", [
    (20, 0.6, {}), (30, 0.5, {"prediction_type": "v_prediction"}),
    (20, 0.75, {"skip_type": "logSNR", "downcast_alphas_cumprod": True})])
def test_a1111_img2img(steps, strength, options):
  """The `a1111` form's img2img (`a1111_img2img`: A1111's t_enc): t_enc steps from the time of the
  last timestep it keeps, grid[t_enc - 1] / 1000 + 1 / 1000, the image noised to grid[t_enc]'s
  level, as its sample_img2img."""
  from scheduler_harness import make_noises, max_rel_error, sdjax_trajectory  # noqa: PLC0415

  t_enc = int(strength * steps)
  solver = {"solver_type": "bh1", "solver_order": 3}
  config = {**SD15, **solver,
            **{k: v for k, v in options.items() if k != "downcast_alphas_cumprod"}}
  forms = {"a1111": True, "a1111_img2img": t_enc,
           **{k: v for k, v in options.items() if k == "downcast_alphas_cumprod"}}
  ours = get_scheduler("unipc", config, options=forms)
  init, noises = make_noises(steps)
  image = np.random.default_rng(7).standard_normal(init.shape).astype(np.float32)
  got = sdjax_trajectory(ours, steps, init, noises, init_sample=image)
  want = _a1111_unipc({**SD15, **options}, steps, init, skip_type=options.get(
      "skip_type", "time_uniform"), image=image, t_enc=t_enc)
  assert len(got) == len(want) == t_enc
  err = max_rel_error(got, want)
  print(f"\nA1111 UniPC img2img, {steps} steps at {strength} {options}: {err:.2e}")
  assert err <= TOL
  with pytest.raises(ValueError, match="higher strength"):
    get_scheduler("unipc", config, options={**forms, "a1111_img2img": 2}).set_timesteps(
        steps, sample_shape=SHAPE)



def test_comfyui_ksampler_discards_penultimate():
  """ComfyUI's KSampler runs uni_pc over the levels of one step more less the next-to-last (its
  custom sampling nodes over the scheduler's own): discard_penultimate_sigma, the comfyui form's
  only."""
  import k_diffusion_reference as kd  # noqa: PLC0415
  import torch  # noqa: PLC0415
  from scheduler_harness import make_noises, max_rel_error, sdjax_trajectory  # noqa: PLC0415

  options = {"comfyui": True, "solver_type": "bh2", "solver_order": 3,
             "timestep_spacing": "linspace", "schedule_type": "karras",
             "discard_penultimate_sigma": True}
  ours = get_scheduler("unipc", SD15, options=options)
  init, noises = make_noises(8)
  got = sdjax_trajectory(ours, 8, init, noises)
  placed = kd.get_sigmas_karras({**SD15, "comfyui": True}, 9)
  want = _comfyui_unipc(SD15, torch.cat([placed[:-2], placed[-1:]]), init, "bh2")
  err = max_rel_error(got, want)
  print(f"\nComfyUI KSampler uni_pc_bh2: {err:.2e}")
  assert err <= TOL
  with pytest.raises(SchedulerConfigError, match="comfyui"):
    get_scheduler("unipc", SD15, options={"discard_penultimate_sigma": True})


@pytest.mark.parametrize("steps,denoise", [(6, 0.5), (3, 0.6)])
def test_comfyui_img2img(steps, denoise):
  """ComfyUI's uni_pc at denoise < 1 (its KSampler: the last `steps` levels of int(steps /
  denoise)): the image plus noise times the first of them, its order min(3, steps - 1)."""
  import k_diffusion_reference as kd  # noqa: PLC0415
  from scheduler_harness import make_noises, max_rel_error, sdjax_trajectory  # noqa: PLC0415

  options = {"comfyui": True, "solver_type": "bh1", "solver_order": 3,
             "timestep_spacing": "linspace", "schedule_type": "karras"}
  ours = get_scheduler("unipc", SD15, options=options)
  total, first = ours.img2img_steps(steps, denoise)
  assert (total, first) == (int(steps / denoise), int(steps / denoise) - steps)
  init, noises = make_noises(total)
  image = np.random.default_rng(7).standard_normal(init.shape).astype(np.float32)
  got = sdjax_trajectory(ours, total, init, noises, begin=first, init_sample=image)
  sigmas = kd.get_sigmas_karras({**SD15, "comfyui": True}, total)[first:]
  want = _comfyui_unipc(SD15, sigmas, init, "bh1", image=image)
  assert len(got) == len(want) == steps
  err = max_rel_error(got, want)
  print(f"\nComfyUI uni_pc img2img {steps} of {total}: {err:.2e}")
  assert err <= TOL
