"""Diffusion schedulers as pure functions over a float32 pytree state.

`get_scheduler(name, scheduler_config)` builds one by the name users pick it by, configured from a
checkpoint's `scheduler_config.json` exactly as diffusers' `from_config` would; `name=None` takes
the checkpoint's own scheduler.
"""

from __future__ import annotations

import importlib
from typing import Any

from sdjax.schedulers import sigma_schedules
from sdjax.schedulers.common import (
  A1111_IMG2IMG,
  A1111_TIMESTEP_SAMPLERS,
  PLAN_START,
  S_CHURN,
  S_NOISE,
  S_TMAX,
  S_TMIN,
  SCHEDULE_SETTINGS,
  UNIPC_SKIP_TYPES,
  Scheduler,
  SchedulerConfigError,
  check_s_noise,
)
from sdjax.schedulers.sigma_schedules import (
  DISCARD_PENULTIMATE,
  DOWNCAST_ALPHAS_CUMPROD,
  DOWNCAST_SD1_SD2,
  MODEL_TABLES,
  ZERO_SNR,
)

# name -> (module, class, overrides passed as diffusers' from_config(**overrides) would).
_REGISTRY: dict[str, tuple[str, str, dict[str, Any]]] = {
    "ddim": ("ddim", "DDIMScheduler", {}),
    "pndm": ("pndm", "PNDMScheduler", {}),
    "ddpm": ("ddpm", "DDPMScheduler", {}),
    "lms": ("lms", "LMSDiscreteScheduler", {"use_karras_sigmas": False}),
    "lms_karras": ("lms", "LMSDiscreteScheduler", {"use_karras_sigmas": True}),
    "euler": ("euler", "EulerDiscreteScheduler", {}),
    "euler_ancestral": ("euler", "EulerAncestralDiscreteScheduler", {}),
    # Not in diffusers: ComfyUI's CFG++ forms of Euler and Euler a (Forge's "Euler (a) CFG++").
    "euler_cfg_pp": ("euler", "EulerCFGPPScheduler", {}),
    "euler_ancestral_cfg_pp": ("euler", "EulerAncestralCFGPPScheduler", {}),
    "heun": ("heun", "HeunDiscreteScheduler", {}),
    "dpmpp_2m": ("dpmpp", "DPMSolverMultistepScheduler", {"use_karras_sigmas": False}),
    "dpmpp_2m_karras": ("dpmpp", "DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "dpmpp_2m_sde": ("dpmpp", "DPMSolverMultistepScheduler",
                     {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": False}),
    "dpmpp_2m_sde_karras": ("dpmpp", "DPMSolverMultistepScheduler",
                            {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True}),
    "dpmpp_2m_sde_heun": ("dpmpp", "DPMSolverMultistepScheduler",
                          {"algorithm_type": "sde-dpmsolver++", "solver_type": "heun",
                           "use_karras_sigmas": False}),
    "dpmpp_2m_sde_heun_karras": ("dpmpp", "DPMSolverMultistepScheduler",
                                 {"algorithm_type": "sde-dpmsolver++", "solver_type": "heun",
                                  "use_karras_sigmas": True}),
    "dpmpp_3m_sde": ("dpmpp", "DPMSolverMultistepScheduler",
                     {"algorithm_type": "sde-dpmsolver++", "solver_order": 3,
                      "use_karras_sigmas": False}),
    "dpmpp_3m_sde_karras": ("dpmpp", "DPMSolverMultistepScheduler",
                            {"algorithm_type": "sde-dpmsolver++", "solver_order": 3,
                             "use_karras_sigmas": True}),
    "dpmpp_sde": ("dpmpp_sde", "DPMSolverSDEScheduler", {"use_karras_sigmas": False}),
    "dpmpp_sde_karras": ("dpmpp_sde", "DPMSolverSDEScheduler", {"use_karras_sigmas": True}),
    "kdpm2": ("kdpm2", "KDPM2DiscreteScheduler", {"use_karras_sigmas": False}),
    "kdpm2_karras": ("kdpm2", "KDPM2DiscreteScheduler", {"use_karras_sigmas": True}),
    "kdpm2_ancestral": ("kdpm2", "KDPM2AncestralDiscreteScheduler", {"use_karras_sigmas": False}),
    "kdpm2_ancestral_karras": ("kdpm2", "KDPM2AncestralDiscreteScheduler",
                               {"use_karras_sigmas": True}),
    # Not in diffusers: k-diffusion's DPM++ 2S a (A1111's), on DPM2-ancestral's positions.
    "dpmpp_2s_ancestral": ("dpmpp_2s", "DPMSolver2SAncestralScheduler",
                           {"use_karras_sigmas": False}),
    "dpmpp_2s_ancestral_karras": ("dpmpp_2s", "DPMSolver2SAncestralScheduler",
                                  {"use_karras_sigmas": True}),
    # Not in diffusers: A1111's Restart (Heun steps with restarts), its levels placed as A1111
    # places them (k-diffusion's: between the training sigmas' extremes) whatever the config's.
    "restart": ("restart", "RestartScheduler", {"timestep_spacing": "linspace"}),
    "unipc": ("unipc", "UniPCMultistepScheduler", {}),
    "deis": ("deis", "DEISMultistepScheduler", {}),
    "dpmpp_2s": ("dpmpp_singlestep", "DPMSolverSinglestepScheduler", {"use_karras_sigmas": False}),
    "dpmpp_2s_karras": ("dpmpp_singlestep", "DPMSolverSinglestepScheduler",
                        {"use_karras_sigmas": True}),
    "edm_dpmpp_2m": ("dpmpp", "EDMDPMSolverMultistepScheduler", {}),
    "edm_euler": ("euler", "EDMEulerScheduler", {}),
    "lcm": ("lcm", "LCMScheduler", {}),
    "tcd": ("tcd", "TCDScheduler", {}),
    # Not in diffusers or A1111: ComfyUI's own multistep samplers, on Euler's config.
    "ipndm": ("comfyui_samplers", "IPNDMScheduler", {}),
    "ipndm_v": ("comfyui_samplers", "IPNDMVScheduler", {}),
    "res_multistep": ("comfyui_samplers", "ResMultistepScheduler", {}),
    "gradient_estimation": ("comfyui_samplers", "GradientEstimationScheduler", {}),
    "dpmpp_2m_cfg_pp": ("comfyui_samplers", "DPMSolverMultistepCFGPPScheduler", {}),
    "res_multistep_cfg_pp": ("comfyui_samplers", "ResMultistepCFGPPScheduler", {}),
    "gradient_estimation_cfg_pp": ("comfyui_samplers", "GradientEstimationCFGPPScheduler", {}),
    "res_multistep_ancestral": ("comfyui_samplers", "ResMultistepAncestralScheduler", {}),
    "er_sde": ("comfyui_samplers", "ERSDEScheduler", {}),
    "res_multistep_ancestral_cfg_pp": ("comfyui_samplers", "ResMultistepAncestralCFGPPScheduler",
                                       {}),
    "deis_tab": ("comfyui_samplers", "DEISTabScheduler", {}),  # Forge's "DEIS"
    "seeds_2": ("comfyui_samplers", "SEEDSScheduler", {}),
    "seeds_3": ("comfyui_samplers", "SEEDS3Scheduler", {}),
    "heunpp2": ("comfyui_samplers", "HeunPP2Scheduler", {}),  # Forge's "HeunPP2"
    "dpm_fast": ("comfyui_samplers", "DPMFastScheduler", {}),
    "dpm_fast_ancestral": ("comfyui_samplers", "DPMFastAncestralScheduler", {}),  # A1111's
    "ddim_cfg_pp": ("ddim", "DDIMCFGPPScheduler", {}),  # A1111's "DDIM CFG++"
    "dpm_adaptive": ("dpm_adaptive", "DPMAdaptiveScheduler", {}),
    "dpm_adaptive_ancestral": ("dpm_adaptive", "DPMAdaptiveAncestralScheduler", {}),  # A1111's
    "k_ddpm": ("comfyui_samplers", "KDDPMScheduler", {}),  # ComfyUI's "ddpm"
    "sa_solver": ("comfyui_samplers", "SASolverScheduler", {}),
    "sa_solver_pece": ("comfyui_samplers", "SASolverPECEScheduler", {}),
    "dpmpp_2s_ancestral_cfg_pp": ("dpmpp_2s", "DPMSolver2SAncestralCFGPPScheduler",
                                  {"use_karras_sigmas": False}),
}

# diffusers class name of a checkpoint's scheduler -> our name.
_FROM_DIFFUSERS_CLASS = {
    "DDIMScheduler": "ddim",
    "DDIMParallelScheduler": "ddim",  # DDIM's config and steps (its batched step aside)
    "PNDMScheduler": "pndm",
    "DDPMScheduler": "ddpm",
    "DDPMParallelScheduler": "ddpm",
    "LMSDiscreteScheduler": "lms",
    "EulerDiscreteScheduler": "euler",
    "EulerAncestralDiscreteScheduler": "euler_ancestral",
    "HeunDiscreteScheduler": "heun",
    "DPMSolverMultistepScheduler": "dpmpp_2m",
    "DPMSolverSDEScheduler": "dpmpp_sde",
    "KDPM2DiscreteScheduler": "kdpm2",
    "KDPM2AncestralDiscreteScheduler": "kdpm2_ancestral",
    "UniPCMultistepScheduler": "unipc",
    "DEISMultistepScheduler": "deis",
    "DPMSolverSinglestepScheduler": "dpmpp_2s",
    "EDMDPMSolverMultistepScheduler": "edm_dpmpp_2m",
    "EDMEulerScheduler": "edm_euler",
    "LCMScheduler": "lcm",
    "TCDScheduler": "tcd",
}

SCHEDULERS = tuple(_REGISTRY)
# sdjax's true-or-false options that make a sampler step as A1111 or ComfyUI ran it (k-diffusion's
# loops, ComfyUI's KSampler, A1111's SGM noise multiplier, A1111's own DDIM / PLMS / UniPC loops,
# A1111's float16 training schedule, the next-to-last level A1111's setting and ComfyUI's KSampler
# drop): each scheduler that has the form takes its option.
FORM_OPTIONS = ("k_diffusion", "comfyui", "sgm_noise_multiplier", "a1111",
                "downcast_alphas_cumprod", DISCARD_PENULTIMATE)


def default_scheduler_name(scheduler_config: dict[str, Any]) -> str:
  """Our name for the scheduler a checkpoint ships with."""
  class_name = scheduler_config.get("_class_name")
  if class_name not in _FROM_DIFFUSERS_CLASS:
    raise SchedulerConfigError(
        f"the checkpoint's scheduler {class_name!r} is not supported; pick one of "
        f"{', '.join(SCHEDULERS)}"
    )
  name = _FROM_DIFFUSERS_CLASS[class_name]
  if name == "dpmpp_2m" and scheduler_config.get("algorithm_type") == "sde-dpmsolver++":
    if scheduler_config.get("solver_order") == 3:
      name = "dpmpp_3m_sde"
    elif scheduler_config.get("solver_type") == "heun":
      name = "dpmpp_2m_sde_heun"
    else:
      name = "dpmpp_2m_sde"
  if name.startswith(("dpmpp_", "kdpm2", "lms")) and scheduler_config.get("use_karras_sigmas"):
    name += "_karras"
  return name


def _class(name: str) -> type[Scheduler]:
  module_name, class_name, _ = _REGISTRY[name]
  return getattr(importlib.import_module(f"sdjax.schedulers.{module_name}"), class_name)


# Schedulers that take DDIM's eta (diffusers passes `eta` to the steps of those whose `step` has it;
# TCD's is its gamma).
ETA_SCHEDULERS = ("ddim", "tcd", "ddim_cfg_pp")


# The SDE samplers, whose step noise k-diffusion (A1111, ComfyUI) and diffusers' DPMSolverSDE
# draw from a Brownian tree seeded by the image's seed (generate's `brownian`), by family.
BROWNIAN_FAMILIES = ("dpmpp_sde", "dpmpp_2m_sde", "dpmpp_2m_sde_heun", "dpmpp_3m_sde")


def calls_per_step(name: str) -> int:
  """Model calls a step of scheduler `name` takes (its `order`: Heun 2; the last step may take
  fewer)."""
  return _class(name).order


def plans_its_run(name: str) -> bool:
  """Whether scheduler `name` plans its steps between its run's ends (img2img and hires runs
  over the levels they keep: `PLAN_START`)."""
  return _class(name).plans_its_run


def takes_a1111_blend(name: str) -> bool:
  """Whether scheduler `name` runs A1111's inpainting blend (`sampling.INPAINT_BLENDS`): its
  timestep samplers, and the samplers whose calls' denoised predictions A1111's CFG denoiser
  blends (not those that make their own number of calls or renoise along the unconditional
  prediction, nor LCM, TCD, DDPM or the EDM forms, whose predictions sdjax has in other terms)."""
  if name in A1111_TIMESTEP_SAMPLERS:
    return True
  cls = _class(name)
  return not (cls.adaptive or cls.takes_uncond or name in ("lcm", "tcd", "ddpm")
              or name.startswith("edm"))


def takes_comfyui_blend(name: str) -> bool:
  """Whether scheduler `name` runs ComfyUI's inpainting blend: A1111's blend's k-diffusion
  samplers (each call's input and denoised prediction blended), not its timestep samplers."""
  return takes_a1111_blend(name) and name not in A1111_TIMESTEP_SAMPLERS


def takes_brownian(name: str | None) -> bool:
  """Whether scheduler `name`'s step noise can come from a Brownian tree (`BROWNIAN_FAMILIES`)."""
  return name is not None and name.removesuffix("_karras") in BROWNIAN_FAMILIES


def takes_option(name: str, option: str) -> bool:
  """Whether scheduler `name` takes `option` (`get_scheduler(options=...)`): a config option,
  or one of the schedule options (`schedule_type`: A1111's schedule types)."""
  return option in _class(name).option_names(_REGISTRY[name][2])


def get_scheduler(name: str | None, scheduler_config: dict[str, Any],
                  eta: float = 0.0, options: dict[str, Any] | None = None) -> Scheduler:
  """Builds scheduler `name` (or the checkpoint's own when None) from a scheduler config.

  `eta` > 0 makes DDIM stochastic (diffusers' `step(eta=...)`); other schedulers refuse it
  rather than ignore it silently. `options` override the config as diffusers'
  `from_config(config, **options)` does (e.g. `{"timestep_spacing": "trailing"}`, as SDXL
  Lightning and Turbo want), after what `name` itself sets (`dpmpp_2m_karras`'s Karras sigmas);
  an option the scheduler does not have is an error, not ignored.
  """
  if name is None:
    name = default_scheduler_name(scheduler_config)
  if name not in _REGISTRY:
    raise SchedulerConfigError(
        f"unknown scheduler {name!r}; pick one of {', '.join(SCHEDULERS)}"
    )
  overrides = _REGISTRY[name][2]
  if eta:
    if name not in ETA_SCHEDULERS:
      ancestral = ("; an ancestral sampler's (A1111's Eta) is its scheduler option eta"
                   if takes_option(name, "eta") else "")
      raise SchedulerConfigError(
          f"eta is an option of {', '.join(ETA_SCHEDULERS)} only, not of scheduler {name!r}"
          f"{ancestral}")
    overrides = {**overrides, "eta": eta}
  cls = _class(name)
  if options:
    options = sigma_schedules.spacing_options(options, cls._DEFAULTS)
  known = cls.option_names({**scheduler_config, **overrides, **(options or {})})
  unknown = sorted(set(options or {}) - known)
  for option in set(unknown) & {"sigmas", "schedule_type", "timesteps"}:
    takers = [n for n in SCHEDULERS if option in _class(n).schedule_options
              and not _REGISTRY[n][2].get("use_karras_sigmas")]
    raise SchedulerConfigError(
        f"scheduler {name!r} places its own noise levels: {option} is an option of "
        f"{', '.join(takers)}")
  if unknown:
    raise SchedulerConfigError(
        f"scheduler {name!r} has no option {', '.join(map(repr, unknown))}; its options: "
        f"{', '.join(sorted(known))}")
  for key, value in (options or {}).items():  # diffusers would take "no" as true
    if (isinstance(cls._DEFAULTS.get(key), bool) or key in FORM_OPTIONS) and not isinstance(
        value, bool):
      resolved = (f" ({DOWNCAST_SD1_SD2!r} is resolved for a model by sampling.model_schedule)"
                  if value == DOWNCAST_SD1_SD2 else "")
      raise SchedulerConfigError(
          f"scheduler {name!r}: option {key} is true or false, got {value!r}{resolved}")
  if S_NOISE in (options or {}):
    check_s_noise(name, options[S_NOISE])
  merged = {**overrides, **(options or {})}
  if (any(merged.get(form) for form in ("k_diffusion", "comfyui", "a1111"))
      and scheduler_config.get(ZERO_SNR) and ZERO_SNR not in merged and ZERO_SNR in known):
    merged[ZERO_SNR] = True  # A1111 and ComfyUI rescale the model's schedule for any sampler
  return cls.from_config(scheduler_config, **merged)


__all__ = [
    "A1111_IMG2IMG",
    "A1111_TIMESTEP_SAMPLERS",
    "BROWNIAN_FAMILIES",
    "DISCARD_PENULTIMATE",
    "DOWNCAST_ALPHAS_CUMPROD",
    "DOWNCAST_SD1_SD2",
    "ETA_SCHEDULERS",
    "FORM_OPTIONS",
    "MODEL_TABLES",
    "PLAN_START",
    "SCHEDULERS",
    "SCHEDULE_SETTINGS",
    "S_CHURN",
    "S_NOISE",
    "S_TMAX",
    "S_TMIN",
    "Scheduler",
    "SchedulerConfigError",
    "UNIPC_SKIP_TYPES",
    "ZERO_SNR",
    "default_scheduler_name",
    "get_scheduler",
    "takes_brownian",
    "plans_its_run",
    "takes_option",
]
