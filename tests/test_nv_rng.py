"""A1111's NV random source (`sdjax.nv_rng`, rng="nv"): Philox4x32-10 against Random123's
known-answer vectors; the normals against A1111's arithmetic (modules/rng_philox.py: counter
(draw, 0, index, 0), key = the seed's words, Box-Muller in float64) restated in numpy here; and
generate() against diffusers' Euler a given that noise."""

import json
from unittest import mock

import diffusers
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from parity import reference_pipelines

from sdjax import nv_rng

_M = (0xD2511F53, 0xCD9E8D57)
_W = (0x9E3779B9, 0xBB67AE85)


def a1111_nv(seed: int, draws: int, n: int) -> np.ndarray:
  """float32 [draws, n]: A1111's NV generator seeded `seed` (a Python int, up to 64 bits), its
  first `draws` randn calls of n values, in numpy uint64 / float64 as A1111 computes them."""
  mask = np.uint64(0xFFFFFFFF)
  out = []
  for k in range(draws):
    c = [np.full(n, k, np.uint64), np.zeros(n, np.uint64), np.arange(n, dtype=np.uint64),
         np.zeros(n, np.uint64)]
    key = [np.uint64(seed & 0xFFFFFFFF), np.uint64(seed >> 32)]
    for r in range(10):
      if r:
        key = [(key[0] + np.uint64(_W[0])) & mask, (key[1] + np.uint64(_W[1])) & mask]
      p0, p1 = c[0] * np.uint64(_M[0]), c[2] * np.uint64(_M[1])
      c = [(p1 >> np.uint64(32)) ^ c[1] ^ key[0], p1 & mask, (p0 >> np.uint64(32)) ^ c[3] ^ key[1],
           p0 & mask]
    two32 = float(np.float32(2.3283064e-10))  # 2^-32
    two32_2pi = float(np.float32(2.3283064e-10 * 6.2831855))
    u = c[0].astype(np.float64) * two32 + two32 / 2
    v = c[1].astype(np.float64) * two32_2pi + two32_2pi / 2
    out.append((np.sqrt(-2.0 * np.log(u)) * np.sin(v)).astype(np.float32))
  return np.stack(out)


@pytest.mark.parametrize("counter,key,expected", [  # Random123's kat_vectors, philox4x32 10
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
])
def test_philox_known_answers(counter, key, expected):
  out = nv_rng.philox4x32([np.uint32(c) for c in counter], [np.uint32(k) for k in key])
  assert tuple(int(o) for o in out) == expected


@pytest.mark.parametrize("seed", [0, 1, 31337, 2**31 + 5, 2**32 - 1, 2**32 + 7])
def test_normals_match_a1111(seed):
  """Within 4 float32 ulps of A1111's float64 arithmetic rounded (seen: at most 3, over half
  bit for bit): XLA's float32 log, log1p, sin and cos against float64's; the integer part is
  exact. Seeds past 32 bits (A1111 adds ENSD as Python ints) key the high word."""
  ours = np.asarray(nv_rng.randn(jnp.uint32(seed & 0xFFFFFFFF), jnp.uint32(seed >> 32), 3, 8192))
  ref = a1111_nv(seed, 3, 8192)
  ulps = np.abs(ours - ref) / np.spacing(np.abs(ref))
  print(f"\nseed {seed}: max {ulps.max():.0f} ulps, {np.mean(ours == ref):.0%} exact")
  assert ulps.max() <= 4 and np.mean(ours == ref) > 0.3
  assert abs(float(ref.std()) - 1) < 0.02  # normals, and not one draw repeated
  assert not np.allclose(ref[0], ref[1], atol=0.1)


def test_a1111_documented_output():
  """modules/rng_philox.py's docstring: Generator(seed=0).randn((3, 4)), printed from float64
  (each within 3e-7 of the float64 arithmetic: a few float32 ulps)."""
  documented = [[-0.92466259, -0.42534415, -2.6438457, 0.14518388],
                [-0.12086647, -0.57972564, -0.62285122, -0.32838709],
                [-1.07454231, -0.36314407, -1.67105067, 2.26550497]]
  ours = np.asarray(nv_rng.randn(jnp.uint32(0), jnp.uint32(0), 1, 12)).reshape(3, 4)
  np.testing.assert_allclose(ours, documented, atol=3e-7, rtol=0)
  layout = nv_rng.randn_nchw(jnp.asarray([0], jnp.uint32), 1, (3, 2, 2))  # h, w, C
  np.testing.assert_array_equal(np.asarray(layout)[0, 0].transpose(2, 0, 1).reshape(-1),
                                ours.reshape(-1))


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
  torch.set_num_threads(1)
  ref, pipe, _ = reference_pipelines(tmp_path_factory, "sd1", seed=6)
  return ref, pipe


@pytest.mark.parametrize("seed,ensd", [(40, 0), (2**32 - 10, 31337)])
def test_generate_draws_a1111s_nv_noise(sd, seed, ensd):
  """rng="nv", Euler a: each image's initial noise is its NV generator's first draw, each step's
  the next (with ENSD from a generator seeded seed + ensd, from its first draw; past 2^32 its
  high word is 1): diffusers' Euler a given that noise."""
  ref, pipe = sd
  ref.scheduler = diffusers.EulerAncestralDiscreteScheduler.from_config(pipe.scheduler_config)
  seeds, steps = [seed, seed + 1], 3
  draws = {s: a1111_nv(s, steps + 1, 4 * 8 * 8).reshape(-1, 4, 8, 8) for s in seeds}
  step_draws = {s: a1111_nv(s + ensd, steps, 4 * 8 * 8).reshape(-1, 4, 8, 8) for s in seeds}
  latents = torch.from_numpy(np.stack([draws[s][0] for s in seeds]))
  calls = iter(range(steps))

  def step_noise(shape, generator=None, device=None, dtype=None, layout=None):
    k = next(calls)
    return torch.from_numpy(np.stack([step_draws[s][k] if ensd else draws[s][k + 1]
                                      for s in seeds]))

  module = "diffusers.schedulers.scheduling_euler_ancestral_discrete"
  with mock.patch(f"{module}.randn_tensor", step_noise), torch.no_grad():
    expected = ref(["a red circle", "a cat"], num_inference_steps=steps, guidance_scale=3.0,
                   height=16, width=16, latents=latents, output_type="np").images
  ours = pipe.generate(["a red circle", "a cat"], steps=steps, scheduler="euler_ancestral",
                       guidance_scale=3.0, height=16, width=16, seed=seed, rng="nv", ensd=ensd)
  err = float(np.linalg.norm(ours - expected) / np.linalg.norm(expected))
  print(f"\nNV noise, seed {seed}, ensd {ensd}: rel err {err:.2e}")
  assert err <= 1e-5
  other = pipe.generate(["a red circle", "a cat"], steps=steps, scheduler="euler_ancestral",
                        guidance_scale=3.0, height=16, width=16, seed=seed, rng="torch_cpu",
                        ensd=ensd)
  assert float(np.linalg.norm(other - expected) / np.linalg.norm(expected)) > 1e-2


def test_comfyui_ancestral_noise(sd):
  """rng="torch_cpu", step_rng="nv", seed_high: ComfyUI's Euler a on an NVIDIA GPU with a
  64-bit seed: the initial noise from torch's CPU generator (the seed's low 32 bits), each step's
  from a CUDA generator seeded by the whole seed, from its first draw; diffusers' Euler a given
  that noise."""
  ref, pipe = sd
  ref.scheduler = diffusers.EulerAncestralDiscreteScheduler.from_config(pipe.scheduler_config)
  seed, high, steps = 40, 36479, 3
  latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(seed))
  draws = a1111_nv((high << 32) + seed, steps, 4 * 8 * 8).reshape(-1, 1, 4, 8, 8)
  calls = iter(range(steps))
  module = "diffusers.schedulers.scheduling_euler_ancestral_discrete"
  with mock.patch(f"{module}.randn_tensor", lambda *a, **k: torch.from_numpy(draws[next(calls)])):
    with torch.no_grad():
      expected = ref(["a cat"], num_inference_steps=steps, guidance_scale=3.0, height=16,
                     width=16, latents=latents, output_type="np").images
  common = dict(steps=steps, scheduler="euler_ancestral", guidance_scale=3.0, height=16,
                width=16, seed=seed, rng="torch_cpu")
  ours = pipe.generate(["a cat"], step_rng="nv", seed_high=high, **common)
  err = float(np.linalg.norm(ours - expected) / np.linalg.norm(expected))
  print(f"\nComfyUI's ancestral noise (CPU initial, CUDA steps): rel err {err:.2e}")
  assert err <= 1e-5
  for other in (dict(step_rng="nv"), dict(seed_high=high)):  # the high word, the steps' source
    got = pipe.generate(["a cat"], **other, **common)
    assert float(np.linalg.norm(got - expected) / np.linalg.norm(expected)) > 1e-2


def test_comfyui_ancestral_s_noise(sd):
  """ComfyUI's SamplerEulerAncestral at s_noise 0.6 (scheduler option `s_noise`): each step's
  CUDA draw times 0.6 before its sigma_up, through generate()'s compiled loop; diffusers' Euler a
  given those scaled draws."""
  ref, pipe = sd
  ref.scheduler = diffusers.EulerAncestralDiscreteScheduler.from_config(pipe.scheduler_config)
  seed, steps = 40, 3
  latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(seed))
  draws = a1111_nv(seed, steps, 4 * 8 * 8).reshape(-1, 1, 4, 8, 8)
  calls = iter(range(steps))
  module = "diffusers.schedulers.scheduling_euler_ancestral_discrete"
  with mock.patch(f"{module}.randn_tensor",
                  lambda *a, **k: torch.from_numpy(draws[next(calls)]) * 0.6):
    with torch.no_grad():
      expected = ref(["a cat"], num_inference_steps=steps, guidance_scale=3.0, height=16,
                     width=16, latents=latents, output_type="np").images
  common = dict(steps=steps, scheduler="euler_ancestral", guidance_scale=3.0, height=16,
                width=16, seed=seed, rng="torch_cpu", step_rng="nv")
  ours = pipe.generate(["a cat"], scheduler_options={"s_noise": 0.6}, **common)
  err = float(np.linalg.norm(ours - expected) / np.linalg.norm(expected))
  print(f"\nComfyUI's Euler a at s_noise 0.6: rel err {err:.2e}")
  assert err <= 1e-5
  plain = pipe.generate(["a cat"], **common)
  assert float(np.linalg.norm(plain - expected) / np.linalg.norm(expected)) > 100 * err


def test_comfyui_sa_solver_draws(sd, monkeypatch):
  """ComfyUI's sa_solver on an NVIDIA GPU draws CUDA's noise only for its steps to a level
  where tau > 0, the k-th draw at the k-th such step: generate() (its comfyui form, step_rng
  "nv") as that loop (k_diffusion_reference's) over diffusers' UNet with guidance."""
  import k_diffusion_reference as kd  # noqa: PLC0415

  ref, pipe = sd
  seed, steps, scale = 40, 8, 3.0
  config = {**pipe.scheduler_config, "comfyui": True}
  log_sigmas = kd.train_log_sigmas(config).float()
  ids = ref.tokenizer(["", "a cat"], padding="max_length", max_length=77,
                      return_tensors="pt").input_ids
  with torch.no_grad():
    context = ref.text_encoder(ids)[0]

  def denoiser(config):
    def denoise(x, sigma):
      t = float((sigma.float().log() - log_sigmas).abs().argmin())
      x_in = x / (sigma**2 + 1) ** 0.5
      with torch.no_grad():
        eps_u, eps_c = ref.unet(torch.cat([x_in, x_in]), t,
                                encoder_hidden_states=context).sample.chunk(2)
      return x - sigma * (eps_u + scale * (eps_c - eps_u))
    return denoise

  monkeypatch.setattr(kd, "denoiser", denoiser)
  sigmas = kd.get_sigmas_karras(config, steps)
  latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(seed))
  draws = iter(torch.from_numpy(a1111_nv(seed, steps, 4 * 8 * 8).reshape(-1, 1, 4, 8, 8)))
  x = kd.sample_sa_solver(config, sigmas, latents * torch.sqrt(1.0 + sigmas[0] ** 2.0), None,
                          draws=draws)[-1]
  assert 0 < len(list(draws)) < steps - 1  # the loop drew at some steps, not all
  expected = _decoded(ref, x)
  ours = pipe.generate(["a cat"], steps=steps, scheduler="sa_solver", guidance_scale=scale,
                       height=16, width=16, seed=seed, rng="torch_cpu", step_rng="nv",
                       scheduler_options={"timestep_spacing": "linspace", "k_diffusion": True,
                                          "comfyui": True}, schedule_type="karras")
  err = float(np.linalg.norm(ours - expected) / np.linalg.norm(expected))
  print(f"\nComfyUI's sa_solver, CUDA's draws where it draws: rel err {err:.2e}")
  assert err <= 1e-5


def _k_diffusion_over(ref, scale, monkeypatch, prompt_at=None):
  """Makes k_diffusion_reference's loops run over `ref`'s UNet, guided at `scale` ("a cat", an
  empty negative prompt). `prompt_at(call)`: the prompt at each call instead (counted from 0;
  the returned list's first item is the count of calls made, which a caller may reset)."""
  import k_diffusion_reference as kd  # noqa: PLC0415

  prompt_at = prompt_at or (lambda call: "a cat")
  made = [0]
  contexts = {}

  def context(prompt):
    if prompt not in contexts:
      ids = ref.tokenizer(["", prompt], padding="max_length", max_length=77,
                          return_tensors="pt").input_ids
      with torch.no_grad():
        contexts[prompt] = ref.text_encoder(ids)[0]
    return contexts[prompt]

  def unet(x, t):
    prompt = prompt_at(made[0])
    made[0] += 1
    with torch.no_grad():
      eps_u, eps_c = ref.unet(torch.from_numpy(np.concatenate([x, x])), t,
                              encoder_hidden_states=context(prompt)).sample.chunk(2)
    return (eps_u + scale * (eps_c - eps_u)).numpy()

  monkeypatch.setattr(kd, "fake_model", unet)
  return made


def _decoded(ref, latents) -> np.ndarray:
  """`ref`'s VAE's images [B, H, W, 3] in [0, 1] of diffusion latents (numpy, NCHW)."""
  with torch.no_grad():
    images = ref.vae.decode(torch.from_numpy(latents) / ref.vae.config.scaling_factor).sample
  return (images / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("eta", [1.0, 0.5])
def test_a1111_dpm_fast_draws(sd, monkeypatch, eta):
  """A1111's "DPM fast" with its NV noise: the initial noise the generator's first draw, then one
  draw a DPM-Solver step (after its last call; the last step's unused, at sigma_up 0), from the
  training schedule's largest level to its smallest at its Eta: generate() as k-diffusion's
  dpm_solver_fast (k_diffusion_reference's) over diffusers' UNet with guidance."""
  import k_diffusion_reference as kd  # noqa: PLC0415

  ref, pipe = sd
  seed, steps, scale = 40, 8, 3.0  # DPM-Solver-3, -3 and -2 steps: 3 draws
  config = {**pipe.scheduler_config, "k_diffusion": True}
  _k_diffusion_over(ref, scale, monkeypatch)
  sigmas = kd.get_sigmas(config, steps)
  draws = torch.from_numpy(a1111_nv(seed, 4, 4 * 8 * 8).reshape(-1, 1, 4, 8, 8))
  noises = [draws[1]] * 2 + [draws[1], draws[2], draws[2], draws[2], draws[2], draws[3]]
  x = kd.sample_dpm_fast(config, sigmas, draws[0] * sigmas[0], noises, eta=eta,
                         extremes=True)[-1]
  expected = _decoded(ref, x)
  ours = pipe.generate(["a cat"], steps=steps, scheduler="dpm_fast_ancestral",
                       guidance_scale=scale, height=16, width=16, seed=seed, rng="nv",
                       scheduler_options={"timestep_spacing": "linspace", "k_diffusion": True,
                                          "eta": eta})
  err = float(np.linalg.norm(ours - expected) / np.linalg.norm(expected))
  print(f"\nA1111's DPM fast at eta {eta}, NV draws: rel err {err:.2e}")
  assert err <= 1e-5


def test_dpm_adaptive_images_alone(sd, monkeypatch):
  """dpm_adaptive (the A1111 form: k-diffusion's timesteps) in a batch of two: each image is
  k-diffusion's dpm_solver_adaptive run of that image alone (its NV initial noise, diffusers' UNet
  with guidance), though their step sizes differ; its refusals of per-call features."""
  import k_diffusion_reference as kd  # noqa: PLC0415

  ref, pipe = sd
  seed, steps, scale = 40, 6, 3.0
  options = {"timestep_spacing": "linspace", "k_diffusion": True, "schedule_type": "karras"}
  config = {**pipe.scheduler_config, "k_diffusion": True}
  _k_diffusion_over(ref, scale, monkeypatch)
  sigmas = kd.get_sigmas_karras(config, steps)
  runs = [pipe.generate(["a cat"] * 2, steps=steps, scheduler="dpm_adaptive",
                        guidance_scale=scale, height=16, width=16, seed=seed, rng="nv",
                        scheduler_options=options, prompt_syntax=syntax)
          for syntax in ("plain", "a1111")]  # A1111's: the composable form's UNet call
  counts = []
  for i in range(2):
    draw = torch.from_numpy(a1111_nv(seed + i, 1, 4 * 8 * 8).reshape(1, 4, 8, 8))
    x, ends, rejected = kd.sample_dpm_adaptive(config, sigmas, draw * sigmas[0])
    counts.append((len(ends), rejected))
    expected = _decoded(ref, x.numpy())
    for ours in runs:
      err = float(np.linalg.norm(ours[i] - expected[0]) / np.linalg.norm(expected[0]))
      print(f"\ndpm_adaptive image {i}: rel err {err:.2e}, (steps, rejected) {counts[-1]}")
      assert err <= 1e-5
  assert counts[0] != counts[1]  # each image its own steps (11 and 10)
  with pytest.raises(ValueError, match="makes its own number of model calls"):
    pipe.generate(["a cat"], steps=steps, scheduler="dpm_adaptive", guidance_scale=scale,
                  height=16, width=16, scheduler_options=options, pag_scale=1.0)


@pytest.mark.parametrize(("eta", "ensd"), [(1.0, 31337), (0.5, 0)])
def test_a1111_dpm_adaptive_draws(sd, monkeypatch, eta, ensd):
  """A1111's "DPM adaptive" with its NV noise, a batch of two: each image's initial noise its
  generator's first draw, then one draw an accepted step (its own count; with ENSD from the
  generator of seed + ENSD, from its first), from the training
  schedule's largest level to its smallest at its Eta: generate() as k-diffusion's
  dpm_solver_adaptive (k_diffusion_reference's) of each image alone over diffusers' UNet with
  guidance; torch's CPU generator (drawn in sequence) is refused. (At Eta below 1 the levels'
  device log and exp, an ulp off torch's at times, move the end by up to ~1e-5: 1.1e-5 for
  seed 41 at Eta 0.5 with ENSD; see test_k_diffusion's test_a1111_dpm_adaptive.)"""
  import k_diffusion_reference as kd  # noqa: PLC0415

  ref, pipe = sd
  seed, steps, scale = 40, 6, 3.0
  options = {"timestep_spacing": "linspace", "k_diffusion": True, "eta": eta}
  config = {**pipe.scheduler_config, "k_diffusion": True}
  _k_diffusion_over(ref, scale, monkeypatch)
  sigmas = kd.get_sigmas(config, steps)
  ours = pipe.generate(["a cat"] * 2, steps=steps, scheduler="dpm_adaptive_ancestral",
                       guidance_scale=scale, height=16, width=16, seed=seed, rng="nv",
                       scheduler_options=options, ensd=ensd)
  for i in range(2):
    draws = torch.from_numpy(a1111_nv(seed + i, 40, 4 * 8 * 8).reshape(-1, 1, 4, 8, 8))
    steps_draws = (draws[1:] if not ensd else torch.from_numpy(
        a1111_nv(seed + i + ensd, 40, 4 * 8 * 8).reshape(-1, 1, 4, 8, 8)))
    x, ends, rejected = kd.sample_dpm_adaptive(config, sigmas, draws[0] * sigmas[0], eta=eta,
                                               noises=steps_draws, extremes=True)
    expected = _decoded(ref, x.numpy())
    err = float(np.linalg.norm(ours[i] - expected[0]) / np.linalg.norm(expected[0]))
    print(f"\nA1111's DPM adaptive at eta {eta}, image {i}: rel err {err:.2e}, (steps, "
          f"rejected) {len(ends), rejected}")
    assert err <= 1e-5
  with pytest.raises(ValueError, match="not torch's CPU generator"):
    pipe.generate(["a cat"], steps=steps, scheduler="dpm_adaptive_ancestral", height=16,
                  width=16, rng="torch_cpu", scheduler_options=options)


def test_a1111_dpm_adaptive_prompt_editing(sd, monkeypatch):
  """A1111's "DPM adaptive" with prompt editing and alternation, 6 steps: its denoiser counts
  calls (3 an attempt, rejected ones too), and a call past step 6 finds no schedule entry
  left and takes the first again (`reconstruct_cond_batch`'s fallback), so these runs go back
  to "a cat" after their seventh call. Each image as k-diffusion's dpm_solver_adaptive of it
  alone over diffusers' UNet with that prompt at each call. (Seed 40's edited image amplifies
  ulps: its own pixels move by up to 4e-5 between batch sizes, from the UNet's float32
  rounding in a batch of 1, 2 or 8; seeds 41-47 stay within 7e-6.)"""
  import k_diffusion_reference as kd  # noqa: PLC0415

  ref, pipe = sd
  seed, steps, scale = 41, 6, 3.0
  # [a cat:a dog:3]: "a cat" while the counter is at most 3, then "a dog" through 6.
  # a [cat|dog]: a new option at each step: "cat" through call 1, then dog at even calls.
  rules = [lambda call: "a dog" if 3 < call <= 6 else "a cat",
           lambda call: "a dog" if 2 <= call <= 6 and call % 2 == 0 else "a cat"]
  options = {"timestep_spacing": "linspace", "k_diffusion": True}
  config = {**pipe.scheduler_config, "k_diffusion": True}
  image = [0]
  made = _k_diffusion_over(ref, scale, monkeypatch, lambda call: rules[image[0]](call))
  sigmas = kd.get_sigmas(config, steps)
  ours = pipe.generate(["[a cat:a dog:3]", "a [cat|dog]"], steps=steps,
                       scheduler="dpm_adaptive_ancestral", guidance_scale=scale, height=16,
                       width=16, seed=seed, rng="nv", scheduler_options=options,
                       prompt_syntax="a1111")
  for i in range(2):
    image[0], made[0] = i, 0
    draws = torch.from_numpy(a1111_nv(seed + i, 40, 4 * 8 * 8).reshape(-1, 1, 4, 8, 8))
    x, ends, rejected = kd.sample_dpm_adaptive(config, sigmas, draws[0] * sigmas[0], eta=1.0,
                                               noises=draws[1:], extremes=True)
    assert made[0] > 7  # past the schedule's end
    expected = _decoded(ref, x.numpy())
    err = float(np.linalg.norm(ours[i] - expected[0]) / np.linalg.norm(expected[0]))
    print(f"\nA1111's DPM adaptive, prompt editing, image {i}: rel err {err:.2e}, {made[0]} "
          f"calls")
    assert err <= 1e-5


@pytest.mark.parametrize("scheduler", ["euler", "heun"])
def test_a1111_churn_draws(sd, monkeypatch, tmp_path, scheduler):
  """A1111's Euler and Heun with Sigma churn and its NV noise: the initial noise the generator's
  first draw, then one draw a step (before the step's first call, churned or not): generate()
  as k-diffusion's sample_euler / sample_heun (k_diffusion_reference's) over diffusers' UNet with
  guidance, the churned calls at sigma_hat. A run's PNG says the churn settings."""
  import k_diffusion_reference as kd  # noqa: PLC0415

  ref, pipe = sd
  seed, steps, scale, churn = 40, 4, 3.0, (2.0, 0.5, float("inf"), 0.9)
  config = {**pipe.scheduler_config, "k_diffusion": True}
  _k_diffusion_over(ref, scale, monkeypatch)
  sigmas = kd.get_sigmas(config, steps)
  draws = torch.from_numpy(a1111_nv(seed, steps + 1, 4 * 8 * 8).reshape(-1, 1, 4, 8, 8))
  per_call = 1 if scheduler == "euler" else 2  # the references take the draws by model call
  noises = [draws[1 + i // per_call] if i % per_call == 0 else None
            for i in range(per_call * steps)]
  loop = kd.sample_euler if scheduler == "euler" else kd.sample_heun
  x = loop(config, sigmas, draws[0] * sigmas[0], noises, churn=churn)[-1]
  expected = _decoded(ref, x)
  options = {"timestep_spacing": "linspace", "k_diffusion": True, "s_churn": churn[0],
             "s_tmin": churn[1], "s_noise": churn[3]}
  ours = pipe.generate(["a cat"], steps=steps, scheduler=scheduler, guidance_scale=scale,
                       height=16, width=16, seed=seed, rng="nv", scheduler_options=options)
  err = float(np.linalg.norm(ours - expected) / np.linalg.norm(expected))
  print(f"\nA1111's {scheduler} with churn, NV draws: rel err {err:.2e}")
  assert err <= 1e-5
  plain = pipe.generate(["a cat"], steps=steps, scheduler=scheduler, guidance_scale=scale,
                        height=16, width=16, seed=seed, rng="nv",
                        scheduler_options={**options, "s_churn": 0.0})
  assert float(np.linalg.norm(plain - expected) / np.linalg.norm(expected)) > 100 * err
  if scheduler == "heun":
    return
  # A run's PNG says them as A1111 writes them, and gives them back.
  from parity import one_image_run  # noqa: PLC0415

  from sdjax import infotext, outputs  # noqa: PLC0415

  _, record, png, _ = one_image_run(pipe, tmp_path / "out", steps=steps, seed=seed, rng="nv",
                                    scheduler_options=tuple(options.items()))
  assert np.abs(np.asarray(png, np.float32) - ours[0] * 255).max() <= 1.0
  params = outputs.parse_a1111_parameters(png.text["parameters"])
  assert (params["Sigma churn"], params["Sigma tmin"], params["Sigma noise"]) == (
      "2.0", "0.5", "0.9") and "Sigma tmax" not in params  # 0: no bound, A1111's default
  back = json.loads(infotext.reproduce(png.text["parameters"]).flags["scheduler_options"])
  assert {k: back[k] for k in ("s_churn", "s_tmin", "s_noise")} == {
      "s_churn": 2.0, "s_tmin": 0.5, "s_noise": 0.9}


def test_run_with_step_rng(sd, tmp_path):
  """main.py --step_rng / --seed_high: generate()'s image; the manifest and the PNG (sdjax's
  `Step RNG`, `Seed high` fields) name them and the PNG's text gives them back."""
  from parity import one_image_run  # noqa: PLC0415

  from sdjax import infotext, outputs  # noqa: PLC0415

  _, pipe = sd
  options = dict(rng="torch_cpu", step_rng="nv", seed_high=5)
  _, record, png, kw = one_image_run(pipe, tmp_path / "out", scheduler="euler_ancestral",
                                     **options)
  expected = pipe.generate("a cat", **options, **kw)
  assert np.abs(np.asarray(png, np.float32) - expected[0] * 255).max() <= 1.0
  assert (record["step_rng"], record["seed_high"]) == ("nv", 5)
  params = outputs.parse_a1111_parameters(png.text["parameters"])
  assert (params["Step RNG"], params["Seed high"]) == ("NV", "5")
  flags = infotext.reproduce(png.text["parameters"]).flags
  assert (flags["rng"], flags["step_rng"], flags["seed_high"]) == ("torch_cpu", "nv", "5")
