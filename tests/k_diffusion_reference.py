"""k-diffusion's samplers (which AUTOMATIC1111 runs) written out in torch float32, as references.

k-diffusion is not a dependency (nor installable as one here): its loops are short, and are
written here in its own arithmetic over a fake UNet (`scheduler_harness.fake_model`) wrapped as
its CompVisDenoiser / CompVisVDenoiser wrap a UNet: the model sees x / sqrt(sigma^2 + 1) at the
timestep read off the training sigmas in log space (unrounded). Each loop returns the sample
after every model call, as `scheduler_harness.sdjax_trajectory` does.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scheduler_harness import fake_model


def ldm_alphas_cumprod(config) -> torch.Tensor:
  """float64 alphas_cumprod as ldm's DDPM.register_schedule (A1111's model) and ComfyUI's
  ModelSamplingDiscrete compute it: float64 betas ("linear" there: diffusers' scaled_linear)."""
  assert config["beta_schedule"] == "scaled_linear" and not config.get("trained_betas")
  betas = torch.linspace(config["beta_start"] ** 0.5, config["beta_end"] ** 0.5,
                         config["num_train_timesteps"], dtype=torch.float64) ** 2
  return torch.cumprod(1.0 - betas, dim=0)


def _zero_snr(alphas: torch.Tensor) -> torch.Tensor:
  """A1111's rescale_zero_terminal_snr_abar (ComfyUI's rescale_zero_terminal_snr_sigmas does
  it through sigmas), in the tensor's dtype."""
  root = alphas.sqrt()
  first, last = root[0].clone(), root[-1].clone()
  root -= last
  root *= first / (first - last)
  alphas = root**2
  alphas[-1] = 4.8973451890853435e-08
  return alphas


def train_sigmas(config) -> torch.Tensor:
  """k-diffusion's `DiscreteSchedule.sigmas` as A1111 builds it from its model's float32
  alphas_cumprod: float16 where A1111 downcast them (`downcast_alphas_cumprod` in `config`),
  computed in float16 as the model's half() buffer made them; rescaled to zero terminal SNR as
  A1111 rescales them (`rescale_betas_zero_snr`: its Noise Schedule). With `comfyui` in
  `config`, ComfyUI's: computed in float64, stored in float32."""
  alphas = ldm_alphas_cumprod(config)
  if config.get("comfyui"):
    if config.get("rescale_betas_zero_snr"):
      alphas = _zero_snr(alphas)
    return (((1 - alphas) / alphas) ** 0.5).float()
  alphas = alphas.float()
  if config.get("downcast_alphas_cumprod"):
    alphas = alphas.half()
  if config.get("rescale_betas_zero_snr"):
    alphas = _zero_snr(alphas)
  return ((1 - alphas) / alphas) ** 0.5


def train_log_sigmas(config) -> torch.Tensor:
  """k-diffusion's `DiscreteSchedule.log_sigmas`: `train_sigmas(config).log()`, in its dtype;
  ComfyUI's: the float64 levels' logs, stored in float32."""
  if config.get("comfyui"):
    alphas = ldm_alphas_cumprod(config)
    if config.get("rescale_betas_zero_snr"):
      alphas = _zero_snr(alphas)
    return (((1 - alphas) / alphas) ** 0.5).log().float()
  return train_sigmas(config).log()


def denoiser(config, timesteps=None):
  """x0 from (x, sigma), as k-diffusion's CompVis(V)Denoiser around the fake UNet; with
  `timesteps`, the UNet sees those, one per call in order, instead of each sigma's own."""
  log_sigmas = train_log_sigmas(config)
  given = None if timesteps is None else iter(timesteps)

  def sigma_to_t(sigma):
    log_sigma = sigma.log()
    dists = log_sigma - log_sigmas[:, None]
    low = dists.ge(0).cumsum(dim=0).argmax(dim=0).clamp(max=log_sigmas.shape[0] - 2)
    w = ((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1])).clamp(0, 1)
    return ((1 - w) * low + w * (low + 1)).view(sigma.shape)

  def denoise(x, sigma):
    c_in = 1 / (sigma**2 + 1) ** 0.5
    t = float(sigma_to_t(sigma.reshape(1))) if given is None else float(next(given))
    out = torch.from_numpy(fake_model((x * c_in).numpy(), t))
    if config.get("prediction_type") == "v_prediction":
      return x / (sigma**2 + 1) + out * (-sigma * c_in)
    return x + out * -sigma

  return denoise


def get_sigmas(config, n: int) -> torch.Tensor:
  """k-diffusion's `DiscreteSchedule.get_sigmas(n)` (A1111's Automatic / Uniform): n timesteps
  evenly from the last to 0, their sigmas interpolated in log sigma, then 0."""
  log_sigmas = train_log_sigmas(config).float()
  t = torch.linspace(len(log_sigmas) - 1, 0, n)
  low, high = t.floor().long(), t.ceil().long()
  w = t.frac()
  sigmas = ((1 - w) * log_sigmas[low] + w * log_sigmas[high]).exp()
  return torch.cat([sigmas, sigmas.new_zeros([1])])


def get_sigmas_karras(config, n: int, rho: float = 7.0) -> torch.Tensor:
  """k-diffusion's Karras levels between the training sigmas' extremes, as A1111 calls it."""
  sigmas = train_sigmas(config)
  sigma_min, sigma_max = sigmas[0].item(), sigmas[-1].item()
  ramp = torch.linspace(0, 1, n)
  min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
  levels = (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho
  return torch.cat([levels, levels.new_zeros([1])])


def get_sigmas_exponential(config, n: int) -> torch.Tensor:
  """k-diffusion's levels evenly spaced in log sigma between the training sigmas' extremes."""
  sigmas = train_sigmas(config).float()
  levels = torch.linspace(sigmas[-1].log().item(), sigmas[0].log().item(), n).exp()
  return torch.cat([levels, levels.new_zeros([1])])


def _to_d(x, sigma, denoised):
  return (x - denoised) / sigma


def _ancestral_step(sigma, sigma_next, eta=1.0):
  if not eta:
    return sigma_next, torch.zeros_like(sigma_next)
  sigma_up = torch.minimum(sigma_next, eta * (sigma_next**2 * (sigma**2 - sigma_next**2)
                                              / sigma**2) ** 0.5)
  return (sigma_next**2 - sigma_up**2) ** 0.5, sigma_up


def _churn(x, sigmas, i, noise, churn):
  """k-diffusion's churn before step i's first call (`churn`: s_churn, s_tmin, s_tmax, s_noise;
  None: none): (x, sigma_hat). Its loops draw `noise` every step, churned or not."""
  if churn is None:
    return x, sigmas[i]
  s_churn, s_tmin, s_tmax, s_noise = churn
  gamma = min(s_churn / (len(sigmas) - 1), 2**0.5 - 1) if s_tmin <= sigmas[i] <= s_tmax else 0.0
  eps = noise * s_noise
  sigma_hat = sigmas[i] * (gamma + 1)
  if gamma > 0:
    x = x + eps * (sigma_hat**2 - sigmas[i] ** 2) ** 0.5
  return x, sigma_hat


def sample_euler(config, sigmas, x, noises, churn=None):
  """Euler; with `churn`, noises[i] its churn's draw at step i."""
  denoise, out = denoiser(config), []
  for i in range(len(sigmas) - 1):
    x, sigma_hat = _churn(x, sigmas, i, noises[i], churn)
    x = x + _to_d(x, sigma_hat, denoise(x, sigma_hat)) * (sigmas[i + 1] - sigma_hat)
    out.append(x)
  return np.stack([y.numpy() for y in out])


def sample_euler_ancestral(config, sigmas, x, noises, eta=1.0):
  """noises[i]: the draw after step i."""
  denoise, out = denoiser(config), []
  for i in range(len(sigmas) - 1):
    denoised = denoise(x, sigmas[i])
    sigma_down, sigma_up = _ancestral_step(sigmas[i], sigmas[i + 1], eta)
    x = x + _to_d(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
    if sigmas[i + 1] > 0:
      x = x + noises[i] * sigma_up
    out.append(x)
  return np.stack([y.numpy() for y in out])


def sample_dpmpp_2m(config, sigmas, x, noises, timesteps=None):
  del noises
  denoise, out, old_denoised = denoiser(config, timesteps), [], None
  for i in range(len(sigmas) - 1):
    denoised = denoise(x, sigmas[i])
    t, t_next = -sigmas[i].log(), -sigmas[i + 1].log()
    h = t_next - t
    if old_denoised is None or sigmas[i + 1] == 0:
      x = (sigmas[i + 1] / sigmas[i]) * x - (-h).expm1() * denoised
    else:
      r = (t - (-sigmas[i - 1].log())) / h
      x = (sigmas[i + 1] / sigmas[i]) * x - (-h).expm1() * (
          (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised)
    old_denoised = denoised
    out.append(x)
  return np.stack([y.numpy() for y in out])


def sample_dpmpp_2s_ancestral(config, sigmas, x, noises, eta=1.0):
  """noises[2i + 1]: the draw after step i (its second model call's position)."""
  denoise, out = denoiser(config), []
  for i in range(len(sigmas) - 1):
    sigma, sigma_next = sigmas[i], sigmas[i + 1]
    denoised = denoise(x, sigma)
    sigma_down, sigma_up = _ancestral_step(sigma, sigma_next, eta)
    if sigma_down == 0:  # Euler to the denoised image
      x = x + _to_d(x, sigma, denoised) * (sigma_down - sigma)
      out.append(x)
      continue
    t, t_next = -sigma.log(), -sigma_down.log()
    h = t_next - t
    s = t + h * 0.5
    x_2 = (s.neg().exp() / t.neg().exp()) * x - (-h * 0.5).expm1() * denoised
    out.append(x_2)
    denoised_2 = denoise(x_2, s.neg().exp())
    x = (t_next.neg().exp() / t.neg().exp()) * x - (-h).expm1() * denoised_2
    if sigma_next > 0:
      x = x + noises[2 * i + 1] * sigma_up
    out.append(x)
  return np.stack([y.numpy() for y in out])


def sample_dpmpp_sde(config, sigmas, x, noises, eta=1.0):
  """k-diffusion's DPM++ SDE (r = 1/2); its noise sampler's answers given: noises[2i] for step
  i's first stage (to the log-midpoint), noises[2i + 1] for its second. The last step (to 0):
  Euler."""
  denoise, out = denoiser(config), []
  for i in range(len(sigmas) - 1):
    denoised = denoise(x, sigmas[i])
    if sigmas[i + 1] == 0:
      x = x + _to_d(x, sigmas[i], denoised) * (sigmas[i + 1] - sigmas[i])
      out.append(x)
      continue
    t, t_next = sigmas[i].log().neg(), sigmas[i + 1].log().neg()
    h = t_next - t
    s = t + h * 0.5
    sd, su = _ancestral_step(t.neg().exp(), s.neg().exp(), eta)
    s_ = sd.log().neg()
    x_2 = (s_.neg().exp() / t.neg().exp()) * x - (t - s_).expm1() * denoised
    x_2 = x_2 + noises[2 * i] * su
    out.append(x_2)
    denoised_2 = denoise(x_2, s.neg().exp())
    sd, su = _ancestral_step(t.neg().exp(), t_next.neg().exp(), eta)
    t_next_ = sd.log().neg()
    x = (t_next_.neg().exp() / t.neg().exp()) * x - (t - t_next_).expm1() * denoised_2
    x = x + noises[2 * i + 1] * su
    out.append(x)
  return np.stack([y.numpy() for y in out])


def sample_dpmpp_2m_sde(config, sigmas, x, noises, eta=1.0, solver_type="midpoint"):
  """k-diffusion's DPM++ 2M SDE; its noise sampler's answer for step i given: noises[i]. The
  last step (to 0): the denoised image."""
  denoise, out, old_denoised, h_last, h = denoiser(config), [], None, None, None
  for i in range(len(sigmas) - 1):
    denoised = denoise(x, sigmas[i])
    if sigmas[i + 1] == 0:
      x = denoised
    else:
      t, s = -sigmas[i].log(), -sigmas[i + 1].log()
      h = s - t
      eta_h = eta * h
      x = sigmas[i + 1] / sigmas[i] * (-eta_h).exp() * x + (-h - eta_h).expm1().neg() * denoised
      if old_denoised is not None:
        r = h_last / h
        if solver_type == "heun":
          x = x + ((-h - eta_h).expm1().neg() / (-h - eta_h) + 1) * (1 / r) * (
              denoised - old_denoised)
        else:
          x = x + 0.5 * (-h - eta_h).expm1().neg() * (1 / r) * (denoised - old_denoised)
      x = x + noises[i] * sigmas[i + 1] * (-2 * eta_h).expm1().neg().sqrt()
    out.append(x)
    old_denoised, h_last = denoised, h
  return np.stack([y.numpy() for y in out])


def sample_dpmpp_3m_sde(config, sigmas, x, noises, eta=1.0):
  """k-diffusion's DPM++ 3M SDE; its noise sampler's answer for step i given: noises[i]. The
  last step (to 0): the denoised image."""
  denoise, out = denoiser(config), []
  denoised_1 = denoised_2 = h = h_1 = h_2 = None
  for i in range(len(sigmas) - 1):
    denoised = denoise(x, sigmas[i])
    if sigmas[i + 1] == 0:
      x = denoised
    else:
      t, s = -sigmas[i].log(), -sigmas[i + 1].log()
      h = s - t
      h_eta = h * (eta + 1)
      x = torch.exp(-h_eta) * x + (-h_eta).expm1().neg() * denoised
      if h_2 is not None:
        r0, r1 = h_1 / h, h_2 / h
        d1_0 = (denoised - denoised_1) / r0
        d1_1 = (denoised_1 - denoised_2) / r1
        d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
        d2 = (d1_0 - d1_1) / (r0 + r1)
        phi_2 = h_eta.neg().expm1() / h_eta + 1
        phi_3 = phi_2 / h_eta - 0.5
        x = x + phi_2 * d1 - phi_3 * d2
      elif h_1 is not None:
        r = h_1 / h
        phi_2 = h_eta.neg().expm1() / h_eta + 1
        x = x + phi_2 * ((denoised - denoised_1) / r)
      x = x + noises[i] * sigmas[i + 1] * (-2 * h * eta).expm1().neg().sqrt()
    out.append(x)
    denoised_1, denoised_2 = denoised, denoised_1
    h_1, h_2 = h, h_1
  return np.stack([y.numpy() for y in out])


def sample_heun(config, sigmas, x, noises, churn=None):
  """Heun's method: the Euler guess after a step's first call, the step after its second; the
  last step, to 0, is Euler's. With `churn`, noises[2i] its draw at step i (the position of the
  step's first call)."""
  denoise, out = denoiser(config), []
  for i in range(len(sigmas) - 1):
    x, sigma = _churn(x, sigmas, i, noises[2 * i], churn)
    sigma_next = sigmas[i + 1]
    d = _to_d(x, sigma, denoise(x, sigma))
    dt = sigma_next - sigma
    if sigma_next == 0:
      x = x + d * dt
      out.append(x)
      continue
    x_2 = x + d * dt
    out.append(x_2)
    d_2 = _to_d(x_2, sigma_next, denoise(x_2, sigma_next))
    x = x + (d + d_2) / 2 * dt
    out.append(x)
  return np.stack([y.numpy() for y in out])


def sample_lms(config, sigmas, x, noises, order: int = 4):
  """Linear multistep: each step's coefficients integrate the Lagrange basis over sigma."""
  from scipy import integrate  # noqa: PLC0415

  del noises
  levels = sigmas.numpy()

  def coeff(cur_order, i, j):
    def basis(tau):
      prod = 1.0
      for k in range(cur_order):
        if k != j:
          prod *= (tau - levels[i - k]) / (levels[i - j] - levels[i - k])
      return prod
    return integrate.quad(basis, levels[i], levels[i + 1], epsrel=1e-4)[0]

  denoise, out, ds = denoiser(config), [], []
  for i in range(len(sigmas) - 1):
    ds.append(_to_d(x, sigmas[i], denoise(x, sigmas[i])))
    if len(ds) > order:
      ds.pop(0)
    cur_order = min(i + 1, order)
    coeffs = [coeff(cur_order, i, j) for j in range(cur_order)]
    x = x + sum(c * d for c, d in zip(coeffs, reversed(ds), strict=True))
    out.append(x)
  return np.stack([y.numpy() for y in out])


def discard_penultimate(sigmas: torch.Tensor) -> torch.Tensor:
  """A1111's DPM2 levels: those of one step more (`sigmas`), less the last above 0."""
  return torch.cat([sigmas[:-2], sigmas[-1:]])


def sample_dpm_2(config, sigmas, x, noises, ancestral: bool = False, eta=1.0, churn=None):
  """DPM-Solver-2: the Euler move to the log-midpoint after a step's first call, the whole step
  with the midpoint's slope after its second; the last step, to 0, is Euler's. The ancestral form
  aims at sigma_down and then adds noises[2i + 1] (the draw after step i, at its second model
  call's position) at scale sigma_up; the other, with `churn`, churns with noises[2i]."""
  denoise, out = denoiser(config), []
  for i in range(len(sigmas) - 1):
    x, sigma = _churn(x, sigmas, i, noises[2 * i], churn)
    d = _to_d(x, sigma, denoise(x, sigma))
    if ancestral:
      target, sigma_up = _ancestral_step(sigma, sigmas[i + 1], eta)
    else:
      target, sigma_up = sigmas[i + 1], None
    if target == 0:
      x = x + d * (target - sigma)
      out.append(x)
      continue
    sigma_mid = sigma.log().lerp(target.log(), 0.5).exp()
    x_2 = x + d * (sigma_mid - sigma)
    out.append(x_2)
    d_2 = _to_d(x_2, sigma_mid, denoise(x_2, sigma_mid))
    x = x + d_2 * (target - sigma)
    if ancestral:
      x = x + noises[2 * i + 1] * sigma_up
    out.append(x)
  return np.stack([y.numpy() for y in out])


def sample_dpm_2_ancestral(config, sigmas, x, noises, eta=1.0):
  return sample_dpm_2(config, sigmas, x, noises, ancestral=True, eta=eta)


def _karras(n, sigma_min, sigma_max, rho=7.0):
  """k-diffusion's `get_sigmas_karras` as it computes it (float32), then 0."""
  ramp = torch.linspace(0, 1, n)
  min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
  levels = (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho
  return torch.cat([levels, levels.new_zeros([1])])


def sample_restart(config, sigmas, x, noises):
  """A1111's Restart sampler (its automatic plan: from 20 steps, Karras levels for fewer steps
  and restarts near sigma 0.1 back up to near 2), Heun steps with churn 0. noises[j]: the draw
  at model call j; a restart takes the one of the call before it."""
  denoise, out = denoiser(config), []
  steps = len(sigmas) - 1
  pairs = [(sigmas[i], sigmas[i + 1]) for i in range(steps)]
  if steps >= 20:
    back, times = (steps // 4, 2) if steps >= 36 else (9, 1)
    sigmas = _karras(steps - back * times, sigmas[-2].item(), sigmas[0].item())
    low = int(torch.argmin((sigmas - 0.1).abs()))
    high = int(torch.argmin((sigmas - 2).abs()))
    pairs = []
    for i in range(len(sigmas) - 1):
      pairs.append((sigmas[i], sigmas[i + 1]))
      if i + 1 == low and high < low:
        climb = _karras(back + 1, sigmas[low].item(), sigmas[high].item())[:-1]
        for _ in range(times):
          pairs += list(zip(climb[:-1], climb[1:], strict=True))
  last = None
  for old, new in pairs:
    if last is not None and last < old:
      x = x + noises[len(out) - 1] * (old**2 - last**2) ** 0.5
      out[-1] = x
    d = _to_d(x, old, denoise(x, old))
    dt = new - old
    if new == 0:
      x = x + d * dt
    else:
      x_2 = x + d * dt
      out.append(x_2)
      d_2 = _to_d(x_2, new, denoise(x_2, new))
      x = x + (d + d_2) / 2 * dt
    out.append(x)
    last = new
  return np.stack([y.numpy() for y in out])


def lcm_sigmas(config, original: int = 50) -> torch.Tensor:
  """A1111's LCM sampler's table (its LCMCompVisDenoiser): the model's alphas_cumprod at the
  distillation timesteps only (skip - 1, 2 skip - 1, ..., the last), copied into float32, and
  their levels, as k-diffusion's DiscreteEpsDDPMDenoiser computes them. With `comfyui` in
  `config`, ComfyUI's ModelSamplingDiscreteDistilled's: its float32 table's levels there."""
  n_train = config["num_train_timesteps"]
  skip = n_train // original
  if config.get("comfyui"):
    table = train_sigmas(config)
    return torch.stack([table[n_train - 1 - x * skip] for x in range(original)][::-1])
  alphas = ldm_alphas_cumprod(config).float()
  if config.get("downcast_alphas_cumprod"):
    alphas = alphas.half()
  valid = torch.zeros(original, dtype=torch.float32)
  for x in range(original):
    valid[original - 1 - x] = alphas[n_train - 1 - x * skip]
  return ((1 - valid) / valid) ** 0.5


def lcm_log_table(config, original: int = 50) -> torch.Tensor:
  return lcm_sigmas(config, original).log()


def lcm_denoiser(config, original: int = 50):
  """x0 from (x, sigma) as A1111's LCMCompVisDenoiser wraps the fake UNet: the UNet sees the
  distillation timestep nearest sigma in log sigma; its noise-predicted x0 and x mixed by LCM's
  boundary condition at 10 times that timestep (ComfyUI's LCM model sampling: the same, its input
  divided by sqrt(sigma^2 + 1) rather than multiplied by the inverse)."""
  log_sigmas = lcm_log_table(config, original)
  skip = config["num_train_timesteps"] // original

  def sigma_to_t(sigma):
    dists = sigma.log() - log_sigmas[:, None]
    return dists.abs().argmin(dim=0).view(sigma.shape) * skip + (skip - 1)

  def denoise(x, sigma):
    c_in = 1 / (sigma**2 + 1.0**2) ** 0.5
    t = sigma_to_t(sigma.reshape(1))
    seen = x / (sigma**2 + 1.0**2) ** 0.5 if config.get("comfyui") else x * c_in
    eps = torch.from_numpy(fake_model(seen.numpy(), float(t)))
    x0 = x + eps * -sigma
    scaled = t * 10.0
    c_skip = 0.5**2 / (scaled**2 + 0.5**2)
    c_out = scaled / (scaled**2 + 0.5**2) ** 0.5
    return c_out * x0 + c_skip * x

  return denoise


def get_sigmas_lcm(config, n: int, original: int = 50) -> torch.Tensor:
  """A1111's LCM sampler's Automatic levels (LCMCompVisDenoiser.get_sigmas): n timesteps evenly
  from the last distillation timestep to the first, each read as a fractional index of the table
  and interpolated in log sigma, then 0."""
  log_sigmas = lcm_log_table(config, original)
  skip = config["num_train_timesteps"] // original
  start, end = torch.tensor((original - 1) * skip + skip - 1), torch.tensor(skip - 1)
  t = torch.linspace(start, end, n)
  t = torch.clamp(((t - (skip - 1)) / skip).float(), min=0, max=original - 1)
  low, high, w = t.floor().long(), t.ceil().long(), t.frac()
  sigmas = ((1 - w) * log_sigmas[low] + w * log_sigmas[high]).exp()
  return torch.cat([sigmas, sigmas.new_zeros([1])])


def sample_lcm(config, sigmas, x, noises):
  """A1111's sample_lcm: x becomes the denoised sample, noised to the next level with a fresh
  draw (noises[i]) where that level is above 0."""
  denoise, out = lcm_denoiser(config), []
  for i in range(len(sigmas) - 1):
    x = denoise(x, sigmas[i])
    if sigmas[i + 1] > 0:
      x = x + sigmas[i + 1] * noises[i]
    out.append(x)
  return np.stack([y.numpy() for y in out])


def sample_ipndm(config, sigmas, x, noises, variable=False):
  """ComfyUI's sample_ipndm (fixed Adams-Bashforth weights on d, order up to 4) or, with
  `variable`, sample_ipndm_v (the weights of the levels' spacing), written out; the last step
  lands on x0."""
  del noises
  denoise, out, history = denoiser(config), [], []
  for i in range(len(sigmas) - 1):
    s, s_next = sigmas[i], sigmas[i + 1]
    x0 = denoise(x, s)
    d = (x - x0) / s
    order = min(4, i + 1)
    if s_next == 0:
      x = x0
    elif order == 1:
      x = x + (s_next - s) * d
    elif not variable:
      weights, divisor = {2: ((3, -1), 2), 3: ((23, -16, 5), 12),
                          4: ((55, -59, 37, -9), 24)}[order]
      acc = weights[0] * d
      for w, b in zip(weights[1:], history[::-1], strict=False):
        acc = acc + w * b
      x = x + (s_next - s) * acc / divisor
    else:
      acc = None
      for w, v in zip(_ipndm_v_weights(sigmas, i, order), [d, *history[::-1]], strict=False):
        acc = w * v if acc is None else acc + w * v
      x = x + (s_next - s) * acc
    history = [*history, d][-3:]
    out.append(x)
  return np.stack([y.numpy() for y in out])


def _ipndm_v_weights(t, i, order):
  """iPNDM-v's weights at step i of the given order (torch float32 scalars), from its paper's
  variable-step Adams-Bashforth formulas as ComfyUI evaluates them."""
  h0 = t[i + 1] - t[i]
  h1 = t[i] - t[i - 1]
  if order == 2:
    return [(2 + h0 / h1) / 2, -(h0 / h1) / 2]
  h2 = t[i - 1] - t[i - 2]
  a = (1 - h0 / (3 * (h0 + h1)) * (h0 * (h0 + h1)) / (h1 * (h1 + h2))) / 2
  if order == 3:
    return [(2 + h0 / h1) / 2 + a, -(h0 / h1) / 2 - (1 + h1 / h2) * a, a * h1 / h2]
  h3 = t[i - 2] - t[i - 3]
  b = (((1 - h0 / (3 * (h0 + h1))) / 2 + (1 - h0 / (2 * (h0 + h1))) * h0 / (6 * (h0 + h1 + h2)))
       * (h0 * (h0 + h1) * (h0 + h1 + h2)) / (h1 * (h1 + h2) * (h1 + h2 + h3)))
  r = h1 * (h1 + h2) / (h2 * (h2 + h3))
  return [(2 + h0 / h1) / 2 + a + b, -(h0 / h1) / 2 - (1 + h1 / h2) * a - (1 + h1 / h2 + r) * b,
          a * h1 / h2 + (h1 / h2 + r * (1 + h2 / h3)) * b, -b * r * h1 / h2]


def sample_ipndm_v(config, sigmas, x, noises):
  return sample_ipndm(config, sigmas, x, noises, variable=True)


def sample_res_multistep(config, sigmas, x, noises, eta=0.0):
  """ComfyUI's res_multistep loop: Euler first and to 0, else RES's second-order exponential
  multistep in t = -log sigma, each step to sigma_down (with `eta`, its ancestral form: then
  noises[i] times sigma_up)."""
  denoise, out, old, old_down = denoiser(config), [], None, None
  for i in range(len(sigmas) - 1):
    s, s_next = sigmas[i], sigmas[i + 1]
    x0 = denoise(x, s)
    down, up = _ancestral_step(s, s_next, eta) if eta else (s_next, 0.0)
    if down == 0 or old is None:
      x = x + (x - x0) / s * (down - s)
    else:
      t, t_next, t_prev = -s.log(), -down.log(), -sigmas[i - 1].log()
      h = t_next - t
      c2 = (t_prev - -old_down.log()) / h
      phi1 = torch.expm1(-h) / -h
      phi2 = (phi1 - 1.0) / -h
      b1 = torch.nan_to_num(phi1 - phi2 / c2, nan=0.0)
      b2 = torch.nan_to_num(phi2 / c2, nan=0.0)
      x = (-h).exp() * x + h * (b1 * x0 + b2 * old)
    if eta and s_next > 0:
      x = x + noises[i] * 1.0 * up
    old, old_down = x0, down
    out.append(x)
  return np.stack([y.numpy() for y in out])


def sample_gradient_estimation(config, sigmas, x, noises, gamma=2.0):
  """ComfyUI's sample_gradient_estimation: Euler plus (gamma - 1) times d's change since the last
  call, times the step; the last step lands on x0."""
  del noises
  denoise, out, old_d = denoiser(config), [], None
  for i in range(len(sigmas) - 1):
    s, s_next = sigmas[i], sigmas[i + 1]
    x0 = denoise(x, s)
    d = (x - x0) / s
    dt = s_next - s
    if s_next == 0:
      x = x0
    else:
      x = x + d * dt
      if i >= 1:
        x = x + (gamma - 1) * (d - old_d) * dt
    old_d = d
    out.append(x)
  return np.stack([y.numpy() for y in out])


def sample_er_sde(config, sigmas, x, noises, solver_type="ER-SDE", max_stage=3, eta=1.0):
  """ComfyUI's sample_er_sde (up to 3 stages, its default noise scaler), written out: lambda =
  sigma / alpha (exp(log sigma) for these models), the ER-SDE's linear part, then the first and
  second divided differences of x0 in lambda with its 200-point sums, then fresh noise. Its
  SamplerER_SDE's other solver types: "Reverse-time SDE" (scaler lambda^(eta + 1)), "ODE"
  (lambda, and like eta 0, no noise)."""
  denoise, out = denoiser(config), []
  if solver_type == "ODE" or (solver_type == "Reverse-time SDE" and eta == 0):
    eta, noisy = 0.0, False
  else:
    noisy = True

  def scaler(v):
    if solver_type != "ER-SDE":
      return v ** (eta + 1)
    return v * ((v**0.3).exp() + 10.0)

  lam = sigmas.log().neg().neg().exp()
  points = torch.arange(0, 200.0, dtype=torch.float32)
  old, old_d = None, None
  for i in range(len(sigmas) - 1):
    x0 = denoise(x, sigmas[i])
    if sigmas[i + 1] == 0:
      x = x0
    else:
      lam_s, lam_t = lam[i], lam[i + 1]
      alpha_s, alpha_t = sigmas[i] / lam_s, sigmas[i + 1] / lam_t
      r = scaler(lam_t) / scaler(lam_s)
      x = alpha_t / alpha_s * r * x + alpha_t * (1 - r) * x0
      if min(max_stage, i + 1) >= 2:
        dt = lam_t - lam_s
        step = -dt / 200.0
        pos = lam_t + points * step
        scaled = scaler(pos)
        d = (x0 - old) / (lam_s - lam[i - 1])
        x = x + alpha_t * (dt + torch.sum(1 / scaled) * step * scaler(lam_t)) * d
        if min(max_stage, i + 1) >= 3:
          u = (d - old_d) / ((lam_s - lam[i - 2]) / 2)
          s_u = torch.sum((pos - lam_s) / scaled) * step
          x = x + alpha_t * ((dt**2) / 2 + s_u * scaler(lam_t)) * u
        old_d = d
      if noisy:
        x = x + alpha_t * noises[i] * 1.0 * (lam_t**2 - lam_s**2 * r**2).sqrt().nan_to_num(
            nan=0.0)
    old = x0
    out.append(x)
  return np.stack([y.numpy() for y in out])


def _deis_weights(sigmas, order, i, points=10000):
  """tAB-DEIS's weights at step i of the given order, as ComfyUI's deis module makes them in
  torch float32: the levels' times in a VP process fitted to EDM's range, the integrand's
  d log alpha / dt by autograd, the Lagrange polynomials' integrals as 10000-point sums."""
  low, high = torch.tensor(0.002), torch.tensor(80.0)
  beta_d = 2 * (np.log(low**2 + 1) / 1e-3 - np.log(high**2 + 1)) / (1e-3 - 1)
  beta_min = np.log(high**2 + 1) - 0.5 * beta_d
  t = ((beta_min**2 + 2 * beta_d * (sigmas**2 + 1).log()).sqrt() - beta_min) / beta_d
  beta_0, beta_1 = beta_min, beta_d + beta_min
  taus = torch.linspace(t[i], t[i + 1], points).requires_grad_(True)
  with torch.enable_grad():
    alpha = torch.exp(-0.5 * taus**2 * (beta_1 - beta_0) - taus * beta_0)
    (slope,) = torch.autograd.grad(alpha.log().sum(), taus)
  alpha, taus = alpha.detach(), taus.detach()
  integrand = -0.5 * slope / torch.sqrt(alpha * (1 - alpha))
  times = t[[i - k for k in range(order)]]
  weights = []
  for j in range(order):
    poly = 1
    for k in range(order):
      if k != j:
        poly = poly * ((taus - times[k]) / (times[j] - times[k]))
    weights.append(torch.sum(integrand * poly) * ((t[i + 1] - t[i]) / points))
  return weights


def sample_deis(config, sigmas, x, noises):
  """ComfyUI's sample_deis (tAB, orders up to 3), written out: Euler first and to 0, else d
  and the earlier derivatives weighed by `_deis_weights`."""
  del noises
  denoise, out, history = denoiser(config), [], []
  for i in range(len(sigmas) - 1):
    x0 = denoise(x, sigmas[i])
    d = (x - x0) / sigmas[i]
    order = 1 if sigmas[i + 1] == 0 else min(3, i + 1)
    if order == 1:
      x = x + (sigmas[i + 1] - sigmas[i]) * d
    else:
      for w, value in zip(_deis_weights(sigmas, order, i), [d, *history[::-1]], strict=False):
        x = x + w * value
    history = [*history, d][-2:]
    out.append(x)
  return np.stack([y.numpy() for y in out])


def sample_seeds(config, sigmas, x, noises, stages=2):
  """ComfyUI's sample_seeds_2 / sample_seeds_3 (eta 1, s_noise 1, r 1/2 or r_1 1/3, r_2 2/3),
  written out: each step's calls at the log-interpolated levels (the model at each), its
  noise carried from stage to stage, decayed, plus a fresh draw (noises, one per call but the
  last step's); the last step lands on x0."""
  denoise, out, draws = denoiser(config), [], iter(noises)

  def phi_2(v):
    return (torch.expm1(v) - v) / v

  for i in range(len(sigmas) - 1):
    s, s_next = sigmas[i], sigmas[i + 1]
    x0 = denoise(x, s)
    if s_next == 0:
      x = x0
      out.append(x)
      continue
    lam_s, lam_t = s.log().neg(), s_next.log().neg()
    h = lam_t - lam_s
    h_eta = h * 2.0
    alpha_t = s_next * lam_t.exp()
    if stages == 2:
      lam_1 = torch.lerp(lam_s, lam_t, 0.5)
      s_1 = lam_1.neg().exp()
      x_2 = s_1 / s * (-0.5 * h).exp() * x - s_1 * lam_1.exp() * torch.expm1(-0.5 * h_eta) * x0
      noise = (-1.0 * h).expm1().neg().sqrt() * next(draws)
      x_2 = x_2 + noise * s_1 * 1.0
      out.append(x_2)
      x0_2 = denoise(x_2, s_1)
      x = s_next / s * (-h).exp() * x - alpha_t * torch.expm1(-h_eta) * torch.lerp(x0, x0_2, 1.0)
      factor = -0.5 * h
      noise = noise * factor.exp() + (factor * 2).expm1().neg().sqrt() * next(draws)
    else:
      r_1, r_2 = 1.0 / 3, 2.0 / 3
      lam_1, lam_2 = torch.lerp(lam_s, lam_t, r_1), torch.lerp(lam_s, lam_t, r_2)
      s_1, s_2 = lam_1.neg().exp(), lam_2.neg().exp()
      x_2 = (s_1 / s * (-r_1 * h).exp() * x
             - s_1 * lam_1.exp() * torch.expm1(-r_1 * h_eta) * x0)
      noise = (-2 * r_1 * h).expm1().neg().sqrt() * next(draws)
      x_2 = x_2 + noise * s_1 * 1.0
      out.append(x_2)
      x0_2 = denoise(x_2, s_1)
      a_2 = r_2 / r_1 * phi_2(-r_2 * h_eta)
      a_1 = torch.expm1(-r_2 * h_eta) - a_2
      x_3 = s_2 / s * (-r_2 * h).exp() * x - s_2 * lam_2.exp() * (a_1 * x0 + a_2 * x0_2)
      factor = (r_1 - r_2) * h
      noise = noise * factor.exp() + (factor * 2).expm1().neg().sqrt() * next(draws)
      x_3 = x_3 + noise * s_2 * 1.0
      out.append(x_3)
      x0_3 = denoise(x_3, s_2)
      b_3 = phi_2(-h_eta) / r_2
      b_1 = torch.expm1(-h_eta) - b_3
      x = s_next / s * (-h).exp() * x - alpha_t * (b_1 * x0 + b_3 * x0_3)
      factor = (r_2 - 1) * h
      noise = noise * factor.exp() + (factor * 2).expm1().neg().sqrt() * next(draws)
    x = x + noise * s_next * 1.0
    out.append(x)
  return np.stack([y.numpy() for y in out])


def sample_heunpp2(config, sigmas, x, noises):
  """ComfyUI's sample_heunpp2 (churn 0), written out: Euler to the last level; Heun's step
  before it, its slopes weighed by the levels over 2 sigma_0; else three calls, the slopes
  weighed over 3 sigma_0. One entry per model call (the intermediate samples too)."""
  del noises
  denoise, out, end = denoiser(config), [], sigmas[-1]
  for i in range(len(sigmas) - 1):
    d = (x - denoise(x, sigmas[i])) / sigmas[i]
    dt = sigmas[i + 1] - sigmas[i]
    if sigmas[i + 1] == end:
      x = x + d * dt
      out.append(x)
      continue
    x_2 = x + d * dt
    out.append(x_2)
    d_2 = (x_2 - denoise(x_2, sigmas[i + 1])) / sigmas[i + 1]
    if sigmas[i + 2] == end:
      w_2 = sigmas[i + 1] / (2 * sigmas[0])
      x = x + (d * (1 - w_2) + d_2 * w_2) * dt
    else:
      x_3 = x_2 + d_2 * (sigmas[i + 2] - sigmas[i + 1])
      out.append(x_3)
      d_3 = (x_3 - denoise(x_3, sigmas[i + 2])) / sigmas[i + 2]
      w_2, w_3 = sigmas[i + 1] / (3 * sigmas[0]), sigmas[i + 2] / (3 * sigmas[0])
      x = x + ((1 - w_2 - w_3) * d + w_2 * d_2 + w_3 * d_3) * dt
    out.append(x)
  return np.stack([y.numpy() for y in out])


def sample_dpm_fast(config, sigmas, x, noises, eta=0.0, extremes=False):
  """ComfyUI's dpm_fast (k-diffusion's DPMSolver.dpm_solver_fast at eta 0), written out: its
  calls spent on DPM-Solver-3 steps (2 and 1 at the end) even in t = -log sigma from the first
  level to the smallest above 0, where it ends. One entry per model call. A1111's "DPM fast"
  (`extremes`, `eta`): from the training schedule's largest level to its smallest, each step to
  its ancestral sigma_down (not past the end), then noise of the rest of the next level's
  variance (`noises` at the step's last call)."""
  denoise, out = denoiser(config), []
  low = sigmas[-2] if sigmas[-1] == 0 else sigmas[-1]
  high = sigmas[0]
  calls = len(sigmas) - 1
  if extremes:
    table = train_sigmas(config)
    high, low = table[-1], table[0]
  t_start, t_end = torch.tensor(float(high)).log().neg(), torch.tensor(float(low)).log().neg()
  m = calls // 3 + 1
  ts = torch.linspace(t_start, t_end, m + 1)
  orders = [3] * (m - 2) + [2, 1] if calls % 3 == 0 else [3] * (m - 1) + [calls % 3]

  def eps_at(x, t):
    level = t.neg().exp()
    return (x - denoise(x, level)) / level

  for i, order in enumerate(orders):
    t, t_next = ts[i], ts[i + 1]
    spread = 0.0
    if eta:
      down, _ = _ancestral_step(t.neg().exp(), t_next.neg().exp(), eta)
      aim = torch.minimum(t_end, down.log().neg())
      spread = (t_next.neg().exp() ** 2 - aim.neg().exp() ** 2) ** 0.5
      t_next = aim
    h, end = t_next - t, t_next.neg().exp()
    eps = eps_at(x, t)
    if order == 1:
      x = x - end * h.expm1() * eps
      out.append(x + spread * noises[len(out)] if eta else x)
      x = out[-1]
      continue
    r1 = 1 / 2 if order == 2 else 1 / 3
    s1 = t + r1 * h
    u1 = x - s1.neg().exp() * (r1 * h).expm1() * eps
    out.append(u1)
    eps_1 = eps_at(u1, s1)
    if order == 2:
      x = x - end * h.expm1() * eps - end / (2 * r1) * h.expm1() * (eps_1 - eps)
      out.append(x + spread * noises[len(out)] if eta else x)
      x = out[-1]
      continue
    r2 = 2 / 3
    s2 = t + r2 * h
    u2 = (x - s2.neg().exp() * (r2 * h).expm1() * eps
          - s2.neg().exp() * (r2 / r1) * ((r2 * h).expm1() / (r2 * h) - 1) * (eps_1 - eps))
    out.append(u2)
    eps_2 = eps_at(u2, s2)
    x = x - end * h.expm1() * eps - end / r2 * (h.expm1() / h - 1) * (eps_2 - eps)
    out.append(x + spread * noises[len(out)] if eta else x)
    x = out[-1]
  return np.stack([y.numpy() for y in out])


def sample_ddpm(config, sigmas, x, noises):
  """k-diffusion's sample_ddpm (ComfyUI's ddpm), written out: DDPM's posterior mean between the
  levels' alpha_cumprods in the variance-preserving scale, fresh noise but on the last step."""
  denoise, out = denoiser(config), []
  for i in range(len(sigmas) - 1):
    sigma, sigma_next = sigmas[i], sigmas[i + 1]
    d = (x - denoise(x, sigma)) / sigma
    x = x / torch.sqrt(1.0 + sigma * sigma)
    alphas = 1 / ((sigma * sigma) + 1)
    alphas_next = 1 / ((sigma_next * sigma_next) + 1)
    alpha = alphas / alphas_next
    x = (1.0 / alpha).sqrt() * (x - (1 - alpha) * d / (1 - alphas).sqrt())
    if sigma_next > 0:
      x = x + ((1 - alpha) * (1.0 - alphas_next) / (1.0 - alphas)).sqrt() * noises[i]
      x = x * torch.sqrt(1.0 + sigma_next * sigma_next)
    out.append(x.numpy())
  return np.stack(out)


def _sa_simple_weights(sigma_next, lambdas, lambda_s, lambda_t, tau, correcting):
  """SA-Solver's simple order-2 weights (its appendix D), oldest first, as ComfyUI's module."""
  mul, h = 1 + tau**2, lambda_t - lambda_s
  alpha_t = sigma_next * lambda_t.exp()
  whole = alpha_t * (-h * mul).expm1().neg()
  if correcting:
    newer = alpha_t * (0.5 * mul * h)
    return torch.stack([whole - newer, newer])
  older = alpha_t * (0.5 * mul * h**2) / (lambdas[-2] - lambda_s)
  return torch.stack([older, whole - older])


def _sa_weights(sigma_next, lambdas, lambda_s, lambda_t, tau, exact):
  """SA-Solver's weights of the x0s at `lambdas` (oldest first), as ComfyUI's sa_solver module
  makes them: the integrals of x^p against (1 + tau^2) e^((1 + tau^2)(x - lambda_t)) (a
  triangular matrix of signed factorial ratios times the end terms), solved against the
  transposed Vandermonde matrix, times sigma_next e^lambda_t. In float32 torch as ComfyUI; with
  `exact`, the same in float64 from the float32 levels, rounded once."""
  dtype = torch.float64 if exact else torch.float32
  lambdas, s, t, sigma_next = (v.to(dtype) for v in (lambdas, lambda_s, lambda_t, sigma_next))
  order, mul = len(lambdas), 1 + tau**2
  p = torch.arange(order, dtype=dtype)
  ends = t**p - s**p * (-mul * (t - s)).exp()
  depth = p[:, None] - p[None, :]
  log_fact = (p + 1).lgamma()
  ratios = log_fact[:, None] - log_fact[None, :]
  if tau > 0:
    ratios = ratios - depth * math.log(mul)
  signs = torch.where(depth % 2 == 0, 1.0, -1.0).to(dtype)
  integrals = (ratios.exp() * signs).tril() @ ends
  basis = torch.linalg.solve(torch.vander(lambdas, order, increasing=True).T, integrals)
  return (sigma_next * t.exp() * basis).float()


def sample_sa_solver(config, sigmas, x, noises, eta=1.0, exact=True, draws=None, pece=False,
                     predictor_order=3, corrector_order=4, simple_order_2=False, start=0.2,
                     end=0.8):
  """ComfyUI's sample_sa_solver at its KSampler's settings (predictor order 3, corrector 4, tau =
  eta between percent_to_sigma(0.2) and (0.8); `pece`: its sa_solver_pece), written out; the
  noise of its predictor at call k `noises[k]`, or with `draws` (an iterator) the next one, drawn
  only where it draws. One entry per call: the sample the next call sees (PECE's first call of a
  step: the corrected one; the last: what the loop returns). Its SamplerSASolver's settings:
  the orders, simple_order_2, the SDE's start and end percents."""
  denoise, out = denoiser(config), []
  log_sigmas = train_log_sigmas(config)

  def percent_to_sigma(percent):
    if percent <= 0 or percent >= 1:
      return 999999999.9 if percent <= 0 else 0.0
    t = torch.tensor((1.0 - percent) * 999.0)
    w = t.frac()
    low, high = int(t.floor()), int(t.ceil())
    return float(((1 - w) * log_sigmas[low] + w * log_sigmas[high]).exp())

  high, low = percent_to_sigma(start), percent_to_sigma(end)

  def weights(sigma_next, levels, lambda_s, lambda_t, tau, correcting):
    if simple_order_2 and len(levels) == 2:
      return _sa_simple_weights(sigma_next, levels, lambda_s, lambda_t, tau, correcting)
    return _sa_weights(sigma_next, levels, lambda_s, lambda_t, tau, exact)


  def tau_at(sigma):
    return eta if eta > 0 and high >= float(sigma) >= low else 0.0

  lam = sigmas.log().neg()
  to_zero = float(sigmas[-1]) == 0
  x_pred, h, tau, noise, x0s = x, 0.0, 0.0, 0.0, []
  n = len(sigmas) - 1
  for i in range(n):
    x0 = denoise(x_pred, sigmas[i])
    x0s = [*x0s, x0][-max(predictor_order, corrector_order):]
    p_order = min(predictor_order, len(x0s))
    c_order = (0 if i == 0 or (float(sigmas[i + 1]) == 0 and not pece)
               else min(corrector_order, len(x0s)))
    if to_zero:
      p_order, c_order = min(p_order, n - 1 - i), min(c_order, n - i)
    if c_order == 0:
      x = x_pred
    else:
      b = weights(sigmas[i], lam[i - c_order + 1:i + 1], lam[i - 1], lam[i], tau, True)
      mixed = torch.tensordot(torch.stack(x0s[-c_order:], dim=1), b, dims=([1], [0]))
      x = sigmas[i] / sigmas[i - 1] * (-(tau**2) * h).exp() * x + mixed
      if tau > 0:
        x = x + noise
      if pece:  # evaluated again: its x0 the step's
        out.append(x)
        x0 = denoise(x, sigmas[i])
        x0s[-1] = x0
    if float(sigmas[i + 1]) == 0:
      x = x0
      out.append(x)
      continue
    tau = tau_at(sigmas[i + 1])
    b = weights(sigmas[i + 1], lam[i - p_order + 1:i + 1], lam[i], lam[i + 1], tau, False)
    mixed = torch.tensordot(torch.stack(x0s[-p_order:], dim=1), b, dims=([1], [0]))
    h = lam[i + 1] - lam[i]
    x_pred = sigmas[i + 1] / sigmas[i] * (-(tau**2) * h).exp() * x + mixed
    if tau > 0:
      fresh = noises[len(out)] if draws is None else next(draws)
      noise = fresh * sigmas[i + 1] * (-2 * tau**2 * h).expm1().neg().sqrt()
      x_pred = x_pred + noise
    out.append(x_pred if i < n - 1 else x)
  return np.stack([y.numpy() for y in out])


def sample_dpm_adaptive(config, sigmas, x, order=3, rtol=0.05, atol=0.0078, h_init=0.05,
                        pcoeff=0.0, icoeff=1.0, dcoeff=0.0, accept_safety=0.81, model=None,
                        eta=0.0, s_noise=1.0, noises=None, extremes=False):
  """ComfyUI's dpm_adaptive (k-diffusion's DPMSolver.dpm_solver_adaptive at eta 0, its
  PIDStepSizeController in Python floats), written out, from the first level to the smallest
  above 0 over the whole of `x` (one image: k-diffusion's error is over the batch). `model(x,
  sigma)`: x0 (default: `denoiser(config)`). A1111's "DPM adaptive" (`extremes`, `eta`): from
  the training schedule's largest level to its smallest, each accepted step to its ancestral
  sigma_down (not past the end), then `noises[k]` (the k-th accepted step's) times the rest of
  its level's deviation times `s_noise`; the controller at order 1.5. Returns (x, the accepted
  steps' ends in t, the rejected attempts)."""
  denoise = denoiser(config) if model is None else model
  low, high = (sigmas[-2] if sigmas[-1] == 0 else sigmas[-1]), sigmas[0]
  if extremes:
    table = train_sigmas(config)
    high, low = table[-1], table[0]
  t_start = torch.tensor(float(high)).log().neg()
  t_end = torch.tensor(float(low)).log().neg()

  def sigma(t):
    return t.neg().exp()

  def eps_at(x, t):
    return (x - denoise(x, sigma(t))) / sigma(t)

  pid_order = 1.5 if eta else order
  b1, b2, b3 = ((pcoeff + icoeff + dcoeff) / pid_order, -(pcoeff + 2 * dcoeff) / pid_order,
                dcoeff / pid_order)
  h, errs = abs(h_init), []
  s, x_prev, ends, rejected = t_start, x, [], 0
  atol_t, rtol_t = torch.tensor(atol), torch.tensor(rtol)
  while s < t_end - 1e-5:
    t = torch.minimum(t_end, s + h)
    target, up = t, 0.0
    if eta:
      down, _ = _ancestral_step(sigma(s), sigma(t), eta)
      t = torch.minimum(t_end, down.log().neg())
      up = (sigma(target) ** 2 - sigma(t) ** 2) ** 0.5
    step = t - s
    eps = eps_at(x, s)
    r1 = 1 / 3 if order == 3 else 1 / 2
    s1 = s + r1 * step
    u1 = x - sigma(s1) * (r1 * step).expm1() * eps
    eps_r1 = eps_at(u1, s1)
    first = x - sigma(t) * step.expm1() * eps
    two = first - sigma(t) / (2 * r1) * step.expm1() * (eps_r1 - eps)
    if order == 2:
      x_low, x_high = first, two
    else:
      r2 = 2 / 3
      s2 = s + r2 * step
      u2 = (x - sigma(s2) * (r2 * step).expm1() * eps
            - sigma(s2) * (r2 / r1) * ((r2 * step).expm1() / (r2 * step) - 1) * (eps_r1 - eps))
      eps_r2 = eps_at(u2, s2)
      x_low = two
      x_high = first - sigma(t) / r2 * (step.expm1() / step - 1) * (eps_r2 - eps)
    delta = torch.maximum(atol_t, rtol_t * torch.maximum(x_low.abs(), x_prev.abs()))
    error = torch.linalg.norm((x_low - x_high) / delta) / x.numel() ** 0.5
    inv = 1 / (float(error) + 1e-8)
    if not errs:
      errs = [inv, inv, inv]
    errs[0] = inv
    factor = errs[0] ** b1 * errs[1] ** b2 * errs[2] ** b3
    factor = 1 + math.atan(factor - 1)
    if factor >= accept_safety:
      errs[2], errs[1] = errs[1], errs[0]
      x_prev, x, s = x_low, x_high + up * s_noise * noises[len(ends)] if eta else x_high, target
      ends.append(float(target))
    else:
      rejected += 1
    h *= factor
  return x, ends, rejected
