"""CFG++ samplers (ComfyUI's euler_cfg_pp and euler_ancestral_cfg_pp, Forge's "Euler (a) CFG++"):
against diffusers' UNet and scheduler levels in a loop written as ComfyUI's k-diffusion loops
step (the guided x0, then the unconditional prediction's direction)."""

import diffusers
import numpy as np
import pytest
import torch
from parity import assert_close, nchw, nhwc, reference_pipelines, rel_err

from sdjax import outputs

PROMPTS = ["a red circle", "a cat"]
NEGATIVES = ["blue", ""]


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
  torch.set_num_threads(1)
  ref, pipe, _ = reference_pipelines(tmp_path_factory, "sd1", seed=7)
  return ref, pipe


def _encode(ref, texts):
  ids = ref.tokenizer(texts, padding="max_length", max_length=77, return_tensors="pt").input_ids
  with torch.no_grad():
    return ref.text_encoder(ids)[0]


def _euler_levels(pipe, steps):
  sched = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler_config)
  sched.set_timesteps(steps)
  return sched


def _unet(ref, x, sigma, t, cond, uncond):
  """(unconditional eps, conditional eps) of one batched UNet call at level sigma."""
  x_in = x / (sigma**2 + 1) ** 0.5
  return ref.unet(torch.cat([x_in, x_in]), t,
                  encoder_hidden_states=torch.cat([uncond, cond])).sample.chunk(2)


def _loop(ref, pipe, latents, guidance, steps, ancestral=False, generators=None):
  """diffusers' Euler levels, x0 = x - sigma * eps (guided); d = the unconditional eps; Euler
  CFG++: x0 + d * sigma_next; Euler a CFG++: x0 + d * sigma_down + noise * sigma_up."""
  sched = _euler_levels(pipe, steps)
  sigmas = sched.sigmas
  cond, uncond = _encode(ref, PROMPTS), _encode(ref, NEGATIVES)
  x = latents * sched.init_noise_sigma
  with torch.no_grad():
    for i, t in enumerate(sched.timesteps):
      sigma, sigma_next = sigmas[i], sigmas[i + 1]
      eps_u, eps_c = _unet(ref, x, sigma, t, cond, uncond)
      eps = eps_u + guidance * (eps_c - eps_u)
      x0, d = x - sigma * eps, eps_u
      if not ancestral:
        x = x0 + d * sigma_next
        continue
      sigma_up = (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5
      sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
      noise = torch.stack([torch.randn(x.shape[1:], generator=g) for g in generators])
      x = x0 + d * sigma_down + noise * sigma_up
    images = ref.vae.decode(x / ref.vae.config.scaling_factor).sample
  return nhwc((images / 2 + 0.5).clamp(0, 1))


@pytest.mark.parametrize("guidance", [1.0, 2.5])
def test_euler_cfg_pp(sd, guidance):
  """At guidance 1 too: the unconditional pass runs at any scale (ComfyUI turns its cfg-1 skip
  off for CFG++)."""
  ref, pipe = sd
  latents = np.random.default_rng(5).standard_normal((2, 8, 8, 4)).astype(np.float32)
  kw = dict(negative_prompts=NEGATIVES, steps=4, guidance_scale=guidance, height=16, width=16,
            latents=latents)
  ours = pipe.generate(PROMPTS, scheduler="euler_cfg_pp", **kw)
  expected = _loop(ref, pipe, torch.from_numpy(nchw(latents).numpy()), guidance, 4)
  err = assert_close(ours, expected, 1e-4)
  euler = pipe.generate(PROMPTS, scheduler="euler", **kw)
  print(f"\neuler_cfg_pp at {guidance}: rel err {err:.2e} (euler: {rel_err(euler, expected):.2e})")
  assert rel_err(euler, expected) > 100 * err


def test_euler_ancestral_cfg_pp(sd):
  """With torch's CPU generators (rng="torch_cpu"): the initial noise, then a draw per step."""
  ref, pipe = sd
  generators = [torch.Generator().manual_seed(30 + i) for i in range(2)]
  latents = torch.stack([torch.randn((4, 8, 8), generator=g) for g in generators])
  expected = _loop(ref, pipe, latents, 2.0, 4, ancestral=True, generators=generators)
  ours = pipe.generate(PROMPTS, negative_prompts=NEGATIVES, steps=4, guidance_scale=2.0,
                       height=16, width=16, seed=30, rng="torch_cpu",
                       scheduler="euler_ancestral_cfg_pp")
  err = assert_close(ours, expected, 1e-4)
  print(f"\neuler_ancestral_cfg_pp: rel err {err:.2e}")
  assert outputs.A1111_SAMPLER_NAMES["euler_ancestral_cfg_pp"] == "Euler a CFG++"
  assert outputs.scheduler_name("Euler a CFG++") == "euler_ancestral_cfg_pp"


@pytest.mark.parametrize("kwargs,match", [
    (dict(pag_scale=2.0), "not perturbed-attention guidance"),
    (dict(s_min_uncond=100.0), "not NGMS or Skip Early CFG"),
    (dict(cfg_parallel=True), "not cfg_parallel"),
    (dict(prompt_syntax="a1111", prompts=["a cat AND a dog"]), "composable prompts"),
])
def test_what_cfg_pp_does_not_take(sd, kwargs, match):
  prompts = kwargs.pop("prompts", ["a cat"])
  with pytest.raises(ValueError, match=match):
    sd[1].generate(prompts, scheduler="euler_cfg_pp", guidance_scale=2.0, steps=2, height=16,
                   width=16, **kwargs)


def _comfyui_loop(ref, pipe, latents, guidance, steps, name, generators=None):
  """ComfyUI's own CFG++ multistep loops, written out over diffusers' Euler levels and UNet (x0
  guided, x0u the unconditional one): dpmpp_2m_cfg_pp, res_multistep_cfg_pp (eta 0; its
  ancestral form at eta 1 with a draw per step from `generators`) and
  gradient_estimation_cfg_pp (gamma 2)."""
  sched = _euler_levels(pipe, steps)
  sigmas = sched.sigmas
  cond, uncond = _encode(ref, PROMPTS), _encode(ref, NEGATIVES)
  x, old, old_down = latents * sched.init_noise_sigma, None, None
  with torch.no_grad():
    for i, t in enumerate(sched.timesteps):
      sigma, sigma_next = sigmas[i], sigmas[i + 1]
      eps_u, eps_c = _unet(ref, x, sigma, t, cond, uncond)
      x0 = x - sigma * (eps_u + guidance * (eps_c - eps_u))
      x0u = x - sigma * eps_u
      lam, lam_next = -sigma.log(), -sigma_next.log()
      h = lam_next - lam
      if name == "dpmpp_2m_cfg_pp":
        mix = -torch.exp(-h) * x0u
        if old is not None and sigma_next != 0:
          r = (lam - -sigmas[i - 1].log()) / h
          mix = mix - torch.expm1(-h) * (1 / (2 * r)) * (x0 - old)
        x, old = x0 + mix + torch.exp(-h) * x, x0u
      elif name.startswith("res_multistep"):
        up = torch.tensor(0.0)
        if generators:  # k-diffusion's ancestral step at eta 1
          up = torch.minimum(sigma_next, (sigma_next**2 * (sigma**2 - sigma_next**2)
                                          / sigma**2) ** 0.5)
        down = (sigma_next**2 - up**2) ** 0.5
        h = -down.log() - lam
        if old is None or sigma_next == 0:
          x = x0 + (x - x0u) / sigma * down
        else:
          c2 = (-sigmas[i - 1].log() - -old_down.log()) / h
          phi1 = torch.expm1(-h) / -h
          phi2 = (phi1 - 1.0) / -h
          b1, b2 = phi1 - phi2 / c2, phi2 / c2
          x = torch.exp(-h) * (x + (x0 - x0u)) + h * (b1 * x0u + b2 * old)
        if generators and sigma_next > 0:
          x = x + torch.stack([torch.randn(x.shape[1:], generator=g) for g in generators]) * up
        old, old_down = x0u, down
      else:  # gradient_estimation_cfg_pp
        d = (x - x0u) / sigma
        if sigma_next == 0:
          x = x0
        else:
          x = x0 + d * sigma_next
          if old is not None:
            x = x + (d - old) * (sigma_next - sigma)
        old = d
    images = ref.vae.decode(x / ref.vae.config.scaling_factor).sample
  return nhwc((images / 2 + 0.5).clamp(0, 1))


@pytest.mark.parametrize("name", ["dpmpp_2m_cfg_pp", "res_multistep_cfg_pp",
                                  "gradient_estimation_cfg_pp"])
def test_comfyui_multistep_cfg_pp(sd, name):
  """ComfyUI's CFG++ forms of DPM++ 2M, RES multistep and gradient estimation: their loops over
  diffusers' UNet (at guidance 1.5, the unconditional pass run as for any CFG++)."""
  ref, pipe = sd
  latents = np.random.default_rng(6).standard_normal((2, 8, 8, 4)).astype(np.float32)
  kw = dict(negative_prompts=NEGATIVES, steps=5, guidance_scale=1.5, height=16, width=16,
            latents=latents)
  ours = pipe.generate(PROMPTS, scheduler=name, **kw)
  expected = _comfyui_loop(ref, pipe, torch.from_numpy(nchw(latents).numpy()), 1.5, 5, name)
  err = assert_close(ours, expected, 1e-4)
  plain = pipe.generate(PROMPTS, scheduler=name.removesuffix("_cfg_pp"), **kw)
  print(f"\n{name}: rel err {err:.2e} (without CFG++: {rel_err(plain, expected):.2e})")
  assert rel_err(plain, expected) > 100 * err


def test_res_multistep_ancestral_cfg_pp(sd):
  """Its ancestral form: each step to sigma_down, then a fresh draw (torch's CPU generators,
  rng="torch_cpu") times sigma_up."""
  ref, pipe = sd
  generators = [torch.Generator().manual_seed(40 + i) for i in range(2)]
  latents = torch.stack([torch.randn((4, 8, 8), generator=g) for g in generators])
  expected = _comfyui_loop(ref, pipe, latents, 1.5, 5, "res_multistep_ancestral_cfg_pp",
                           generators)
  ours = pipe.generate(PROMPTS, negative_prompts=NEGATIVES, steps=5, guidance_scale=1.5,
                       height=16, width=16, seed=40, rng="torch_cpu",
                       scheduler="res_multistep_ancestral_cfg_pp")
  err = assert_close(ours, expected, 1e-4)
  print(f"\nres_multistep_ancestral_cfg_pp: rel err {err:.2e}")


def _two_stage_loop(ref, pipe, latents, guidance, steps, generators):
  """ComfyUI's sample_dpmpp_2s_ancestral_cfg_pp, written out over diffusers' Euler levels and
  UNet (the midpoint's timestep interpolated in log sigma): each stage moves x shifted by the
  guided minus the unconditional x0 (the second stage: the first call's guided, the second's
  unconditional), then a draw per step times sigma_up."""
  sched = _euler_levels(pipe, steps)
  sigmas = sched.sigmas
  alphas = sched.alphas_cumprod.numpy()
  log_sigmas = np.log(((1 - alphas) / alphas) ** 0.5)
  cond, uncond = _encode(ref, PROMPTS), _encode(ref, NEGATIVES)
  x = latents * sched.init_noise_sigma

  def x0s(x, sigma, t):
    eps_u, eps_c = _unet(ref, x, sigma, t, cond, uncond)
    return x - sigma * (eps_u + guidance * (eps_c - eps_u)), x - sigma * eps_u

  with torch.no_grad():
    for i, t in enumerate(sched.timesteps):
      sigma, sigma_next = sigmas[i], sigmas[i + 1]
      x0, x0u = x0s(x, sigma, t)
      up = torch.minimum(sigma_next, (sigma_next**2 * (sigma**2 - sigma_next**2)
                                      / sigma**2) ** 0.5)
      down = (sigma_next**2 - up**2) ** 0.5
      if down == 0:
        x = x0 + (x - x0u) / sigma * down
      else:
        lam, lam_down = sigma.log().neg(), down.log().neg()
        h = lam_down - lam
        mid = lam + 0.5 * h
        x_2 = (mid.neg().exp() / lam.neg().exp()) * (x + (x0 - x0u)) - (-h * 0.5).expm1() * x0
        t_mid = float(sched._sigma_to_t(mid.neg().exp().numpy(), log_sigmas))
        x0_2, x0u_2 = x0s(x_2, mid.neg().exp(), torch.tensor(t_mid))
        x = (lam_down.neg().exp() / lam.neg().exp()) * (x + (x0 - x0u_2)) - (-h).expm1() * x0_2
      if sigma_next > 0:
        x = x + torch.stack([torch.randn(x.shape[1:], generator=g) for g in generators]) * up
    images = ref.vae.decode(x / ref.vae.config.scaling_factor).sample
  return nhwc((images / 2 + 0.5).clamp(0, 1))


def test_dpmpp_2s_ancestral_cfg_pp(sd):
  """ComfyUI's DPM++ 2S a CFG++: its two calls a step over diffusers' UNet, a fresh draw per step
  from torch's CPU generators (rng="torch_cpu")."""
  ref, pipe = sd
  generators = [torch.Generator().manual_seed(40 + i) for i in range(2)]
  latents = torch.stack([torch.randn((4, 8, 8), generator=g) for g in generators])
  expected = _two_stage_loop(ref, pipe, latents, 1.5, 4, generators)
  kw = dict(negative_prompts=NEGATIVES, steps=4, guidance_scale=1.5, height=16, width=16,
            seed=40, rng="torch_cpu")
  ours = pipe.generate(PROMPTS, scheduler="dpmpp_2s_ancestral_cfg_pp", **kw)
  err = assert_close(ours, expected, 1e-4)
  plain = pipe.generate(PROMPTS, scheduler="dpmpp_2s_ancestral", **kw)
  print(f"\ndpmpp_2s_ancestral_cfg_pp: rel err {err:.2e} (without CFG++: "
        f"{rel_err(plain, expected):.2e})")
  assert rel_err(plain, expected) > 100 * err


def test_a1111_ddim_cfg_pp(sd):
  """A1111's "DDIM CFG++" (its `ddim_cfgpp`, in its own DDIM loop: the `a1111` form): the CFG
  scale over 12.5, x0 from the guided noise prediction, the step's direction the unconditional
  one's; A1111's images of it read as it."""
  import k_diffusion_reference as kd  # noqa: PLC0415

  from sdjax import infotext  # noqa: PLC0415

  ref, pipe = sd
  steps, guidance = 5, 7.0
  latents = np.random.default_rng(6).standard_normal((2, 8, 8, 4)).astype(np.float32)
  cond, uncond = _encode(ref, PROMPTS), _encode(ref, NEGATIVES)
  alphas_cumprod = kd.ldm_alphas_cumprod(pipe.scheduler_config).float()
  timesteps = torch.clip(torch.arange(0, 1000, 1000 // steps) + 1, 0, 999)
  alphas = alphas_cumprod[timesteps]
  alphas_prev = alphas_cumprod[torch.nn.functional.pad(timesteps[:-1], pad=(1, 0))]
  x = torch.from_numpy(nchw(latents).numpy())
  with torch.no_grad():
    for i in range(len(timesteps) - 1):
      index = len(timesteps) - 1 - i
      eps_u, eps_c = ref.unet(torch.cat([x, x]), int(timesteps[index]),
                              encoder_hidden_states=torch.cat([uncond, cond])).sample.chunk(2)
      e_t = eps_u + (eps_c - eps_u) * (guidance * (1 / 12.5))
      a_t, a_prev = alphas[index], alphas_prev[index]
      pred_x0 = (x - (1 - a_t).sqrt() * e_t) / a_t.sqrt()
      x = a_prev.sqrt() * pred_x0 + (1.0 - a_prev).sqrt() * eps_u
    images = ref.vae.decode(x / ref.vae.config.scaling_factor).sample
  expected = nhwc((images / 2 + 0.5).clamp(0, 1))
  kw = dict(negative_prompts=NEGATIVES, steps=steps, guidance_scale=guidance, height=16,
            width=16, latents=latents, scheduler_options={"a1111": True})
  ours = pipe.generate(PROMPTS, scheduler="ddim_cfg_pp", **kw)
  err = assert_close(ours, expected, 1e-4)
  ddim = pipe.generate(PROMPTS, scheduler="ddim", **{**kw, "guidance_scale": guidance / 12.5})
  print(f"\nA1111's DDIM CFG++: rel err {err:.2e} (DDIM: {rel_err(ddim, expected):.2e})")
  assert rel_err(ddim, expected) > 100 * err
  found = infotext.reproduce("a cat\nSteps: 20, Sampler: DDIM CFG++, CFG scale: 7, Seed: 1")
  assert found.flags["scheduler"] == "DDIM CFG++"
  assert outputs.scheduler_name("DDIM CFG++") == "ddim_cfg_pp"
  assert '"a1111": true' in found.flags["scheduler_options"]
