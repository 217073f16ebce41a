"""Making an image again from its A1111 `parameters` text (A1111's "PNG Info"): main.py flags.

A1111 and sdjax write how an image was made into the image (`outputs.a1111_parameters`);
`reproduce(text)` turns that text back into the main.py flags that make it again: the prompts,
steps, sampler and schedule type, CFG scale, seed, size, Clip skip, RNG (and the SDE samplers'
Brownian tree), ENSD, variation seed, seed resize, eta, the hires fix, tiling, FreeU, PAG, NGMS,
Skip Early CFG, Pad conds, SGM noise multiplier, Downcast alphas_cumprod, Old prompt editing
timelines (both also implied by an older A1111's `Version`, as A1111 reads them), SDXL's
micro-conditioning and refiner switch, and A1111's k-diffusion placement of the noise levels (its
own DDIM and PLMS loops) for its own images. What the text asks for that a flag
cannot give (a model or VAE known only by name, another GPU's noise than NVIDIA's, an img2img
image's init image, extensions' fields) comes back as notes, one per thing, so that the
caller can say what will differ. A ComfyUI PNG carries its workflow instead (`parameters_text`
returns it): `reproduce` hands that to `sdjax.comfyui`, which reads it into the same fields.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from typing import Any

from sdjax import masks, outputs, schedulers
from sdjax.schedulers import sigma_schedules

# A1111's schedule type "Automatic" since 1.9: the sampler's own choice (its
# sd_samplers_kdiffusion table) where it has one, else k-diffusion's own levels (A1111's
# Uniform), which is also what an image without a Schedule type (an older A1111) used.
_AUTOMATIC_SCHEDULE_TYPES = {"dpmpp_2m": "Karras", "dpmpp_sde": "Karras",
                             "dpmpp_2s_ancestral": "Karras",
                             "dpmpp_2m_sde": "Exponential", "dpmpp_2m_sde_heun": "Exponential",
                             "dpmpp_3m_sde": "Exponential", "kdpm2": "Karras",
                             "kdpm2_ancestral": "Karras", "restart": "Karras"}
# A1111's samplers that always drop the penultimate level (its discard_next_to_last_sigma), as
# sdjax's do with `k_diffusion`; A1111 writes `Discard penultimate sigma` for others when a setting
# makes them drop it too.
_DISCARDING = ("kdpm2", "kdpm2_ancestral", "dpmpp_3m_sde")
# A1111's samplers that step over training timesteps (its sd_samplers_timesteps), which its
# Schedule type does not move.
_TIMESTEP_SAMPLERS = schedulers.A1111_TIMESTEP_SAMPLERS
# Fields that say which files made the image, not how: nothing to set.
_RECORD_ONLY = ("Model hash", "VAE hash", "Lora hashes", "TI hashes", "Version", "template",
                "negative_template", "PerturbedAttentionGuidance_enabled")
# Fields that are one flag each, their values as the flag reads them.
_ONE_TO_ONE = {"Steps": "steps", "CFG scale": "guidance_scale", "Seed": "seed",
               "Clip skip": "clip_skip", "ENSD": "ensd", "Variation seed": "subseed",
               "Variation seed strength": "subseed_strength", "Emphasis": "emphasis",
               "Guidance rescale": "guidance_rescale", "Refiner switch at": "refiner_start",
               "Refiner switch step": "refiner_start",
               "Aesthetic score": "aesthetic_score",
               "Negative aesthetic score": "negative_aesthetic_score",
               "NGMS": "s_min_uncond", "Skip Early CFG": "skip_early_cond",
               "Pixel levels": "pixel_levels",
               "PerturbedAttentionGuidance_scale": "pag_scale",
               "PerturbedAttentionGuidance_adaptive_scale": "pag_adaptive_scale",
               "Seed high": "seed_high", "Noise multiplier": "noise_multiplier",
               "Extra noise": "extra_noise", "Image CFG scale": "image_guidance_scale",
               "Image encode": "image_encode",
               "Prompt 2": "prompt_2", "Token merging ratio": "token_merging_ratio",
               "Negative prompt 2": "negative_prompt_2"}

# A1111's RNG sources: --rng.
_RNGS = {"CPU": "torch_cpu", "NV": "nv"}
# A1111's settings written as "True" when on: flag name.
_SWITCHES = {"NGMS all steps": "s_min_uncond_all", "Pad conds": "pad_cond_uncond",
             "Pad conds v0": "pad_cond_uncond_v0",
             "Old prompt editing timelines": "old_prompt_editing_timelines"}
_HIRES_ONE_TO_ONE = {"Hires steps": "hires_steps", "Hires CFG Scale": "hires_guidance_scale",
                     "Hires prompt": "hires_prompt",
                     "Hires negative prompt": "hires_negative_prompt"}
_SIZE = re.compile(r"^(-?\d+)x(-?\d+)$")
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


@dataclasses.dataclass(frozen=True)
class Reproduction:
  """The main.py flags that make an image again, and what they cannot give.

  `flags`: flag name -> value as written on a command line (a list for repeatable and list
  flags). `notes`: (flag, text) for each thing the image's text asks for that sdjax will not
  reproduce as asked; `flag` is the flag whose own value settles it (None: none does).
  `model_hash`: the image's `Model hash`, to compare with the model's.
  """

  flags: dict[str, str | list[str]]
  notes: tuple[tuple[str | None, str], ...]
  model_hash: str | None


def reproduce(text: str) -> Reproduction:
  """The main.py flags that make again the image whose A1111 `parameters` text is `text`.

  ValueError when the text has no parameters line, or a field the flags need is malformed (a
  Size that is not WxH, ...).
  """
  from sdjax import comfyui  # noqa: PLC0415

  graph = comfyui.parse_graph(text)
  if graph is not None:  # a ComfyUI image's workflow
    return comfyui.reproduce(graph)
  fields = dict(outputs.parse_a1111_parameters(text))
  if set(fields) <= {"prompt", "negative_prompt", "template", "negative_template"}:
    raise ValueError("no A1111 parameters line (Steps: ..., Sampler: ..., Seed: ...) after the "
                     "prompt")
  return from_fields(fields)


def from_fields(fields: dict[str, str], made_in: str = "A1111") -> Reproduction:
  """`reproduce` of an image's A1111 fields (`outputs.parse_a1111_parameters`'s, with "prompt"
  and "negative_prompt"); `made_in` names the program in notes."""
  fields = dict(fields)
  flags: dict[str, str | list[str]] = {"prompt": [fields.pop("prompt")],
                                       "negative_prompt": fields.pop("negative_prompt")}
  notes: list[tuple[str | None, str]] = []
  made_by_sdjax = fields.get("Version", "").startswith("sdjax")
  if not made_by_sdjax:
    _backcompat(fields, flags["prompt"][0])
    flags["pixel_levels"] = "floor"  # A1111 and ComfyUI truncate to 8 bits
  model_hash = fields.get("Model hash") or None
  _model(fields, flags, notes, model_hash)
  scheduler = _sampler(fields, flags, notes, made_by_sdjax, made_in)
  _sgm(fields, flags, notes, scheduler)
  _schedule_settings(fields, flags, notes, scheduler, made_by_sdjax)
  _downcast(fields, flags, notes, scheduler)
  _zero_snr(fields, flags, notes, scheduler)
  _eta(fields, flags, notes, scheduler)
  _churn(fields, flags, notes, scheduler)
  # An inpainting model's: A1111 writes it for every image made with one; 1 is the default
  weight = fields.pop("Conditional mask weight", None)
  if weight is not None and _number("Conditional mask weight", weight) != 1.0:
    flags["inpainting_mask_weight"] = weight
  _sigma_noise(fields, flags, notes, scheduler)
  _noise(fields, flags, notes, made_by_sdjax, made_in)
  _brownian(fields, flags, notes, scheduler, made_by_sdjax, made_in)
  if "Size" in fields:
    width, height = _size("Size", fields.pop("Size"))
    flags["width"], flags["height"] = str(width), str(height)
  _hires(fields, flags, notes)
  _inpainting(fields, flags, notes, made_by_sdjax, made_in, scheduler)
  _looks(fields, flags)
  _sdxl(fields, flags, notes, scheduler, made_by_sdjax)
  _controlnets(fields, flags, notes, made_by_sdjax, made_in)
  form = fields.pop("Guidance rescale form", None)  # sdjax's, `comfyui.reproduce`'s RescaleCFG
  if form is not None and form != "ComfyUI RescaleCFG":
    raise ValueError(f"Guidance rescale form: {form!r} is not ComfyUI RescaleCFG")
  if form is not None and (scheduler is None or schedulers.takes_comfyui_blend(scheduler)):
    flags["guidance_rescale_form"] = "comfyui"
  elif form is not None:
    notes.append(("guidance_rescale_form", f"ComfyUI's RescaleCFG: sdjax's {scheduler} does not "
                                           "give it each call's noise level (diffusers' rescale "
                                           "instead, the same for a v-prediction model)"))
  for key, flag in _ONE_TO_ONE.items():
    if key in fields:
      flags[flag] = fields.pop(key)
  for key, flag in _SWITCHES.items():
    if fields.get(key) in ("True", "False"):
      flags[flag] = fields.pop(key).lower()
  for key in _RECORD_ONLY:
    fields.pop(key, None)
  if fields:  # extensions' and img2img's fields: say what is left out, once
    notes.append((None, "not reproduced: " + ", ".join(f"{k}: {v}" for k, v in fields.items())))
  return Reproduction(flags, tuple(notes), model_hash)


# The flags `ControlNet N` units set: a ControlNet's, an IP-Adapter's (main.py applies them only
# with --controlnet / --ip_adapter, which give the models).
CONTROLNET_FLAGS = ("controlnet_scale", "control_guidance_start", "control_guidance_end",
                    "control_mode", "control_type")
IP_ADAPTER_FLAGS = ("ip_adapter_scale",)


def _controlnets(fields, flags, notes, made_by_sdjax: bool, made_in: str) -> None:
  """A1111's ControlNet extension's units (`ControlNet 0`, ...: Module, Model, Weight, Guidance
  Start / End, Control Mode; sdjax's Union Control Type) as the flags of as many ControlNets, in
  order; a note names their models (give each with --controlnet, and its image). Units of an
  ip-adapter module are IP-Adapters (`_ip_adapters`)."""
  units = sorted((int(key.split()[1]), key) for key in fields
                 if re.fullmatch(r"ControlNet \d+", key))
  found, adapters = [], []
  for _, key in units:
    text = fields.pop(key)
    unit = dict(item.partition(": ")[::2] for item in text.split(", "))
    if "Model" not in unit:
      raise ValueError(f"{key}: {text!r} names no Model")
    (adapters if unit.get("Module", "none").startswith("ip-adapter") else found).append(unit)
  _ip_adapters(adapters, fields, flags, notes, made_in)
  if not found:
    return
  for flag, name, default in (("controlnet_scale", "Weight", "1"),
                              ("control_guidance_start", "Guidance Start", "0"),
                              ("control_guidance_end", "Guidance End", "1")):
    flags[flag] = [str(_number(name, unit.get(name, default))) for unit in found]
  modes = [unit.get("Control Mode", "Balanced") for unit in found]  # (A1111's names: run checks)
  if any(mode.lower() != "balanced" for mode in modes):
    flags["control_mode"] = modes
  if any("Union Control Type" in unit for unit in found):
    flags["control_type"] = [unit.get("Union Control Type", "") for unit in found]
  models = ", ".join(unit["Model"] for unit in found)
  modules = sorted({unit["Module"] for unit in found if unit.get("Module", "none") != "none"})
  notes.append(("controlnet", f"made with the ControlNet(s) {models}: give each with "
                              "--controlnet, in this order, and its control image with "
                              "--control_image (or a jsonl line's control_image)"
                + (f"; {made_in} made those images with its preprocessor(s) "
                   f"{', '.join(modules)}: give the preprocessed images" if modules else "")
                + ("" if made_by_sdjax or made_in != "A1111" or all(
                    float(end) >= 1 for end in flags["control_guidance_end"]) else
                   f"; {made_in}'s ControlNet extension keeps a ControlNet up to the step that "
                   "starts past its Guidance End, diffusers' (sdjax's) to the step that ends "
                   "past it: one step less here")))


def _ip_adapters(units, fields, flags, notes, made_in: str) -> None:
  """IP-Adapter units (A1111's ControlNet extension's, sdjax's): their Weight, or sdjax's
  `IP-Adapter N layer scales` (InstantStyle's), as --ip_adapter_scale, one per unit in order; a
  note names the models and their image encoders (the module), and a Guidance Start / End
  sdjax does not apply."""
  if not units:
    return
  scales = []
  for i, unit in enumerate(units):
    layers = fields.pop(f"IP-Adapter {i} layer scales", None)
    scales.append(layers if layers is not None else str(_number("Weight",
                                                                unit.get("Weight", "1"))))
  flags["ip_adapter_scale"] = scales
  bounded = [unit["Model"] for unit in units
             if _number("Guidance Start", unit.get("Guidance Start", "0")) > 0
             or _number("Guidance End", unit.get("Guidance End", "1")) < 1]
  notes.append(("ip_adapter", "made with the IP-Adapter(s) " + ", ".join(
      f"{unit['Model']} ({unit.get('Module', 'ip-adapter')})" for unit in units)
      + ": give each with --ip_adapter, in this order (its image encoder with "
        "--ip_adapter_encoder where it has none beside it), and its image with "
        "--ip_adapter_image (or a jsonl line's ip_adapter_image)"
      + (f"; {made_in} applied {', '.join(bounded)} only within its Guidance Start / End, "
         "sdjax applies an IP-Adapter at every step" if bounded else "")))


def read_parameters_file(path: str) -> str | None:
  """The A1111 parameters in the file at `path` (a local path or any fsspec URL): an image's, or
  a text file's text; None when there is none. OSError (ImportError for a URL whose store's
  package is not installed) when it cannot be read."""
  if "://" in path:
    import fsspec  # noqa: PLC0415

    with fsspec.open(path, "rb") as f:
      return parameters_text(f.read())
  with open(path, "rb") as f:
    return parameters_text(f.read())


def parameters_text(data: bytes) -> str | None:
  """The A1111 parameters an image file's bytes carry (PNG, JPEG, WebP), else a ComfyUI PNG's
  workflow (its API graph, JSON: `reproduce` reads both), or a text file's text; None when there
  is none."""
  from sdjax import comfyui  # noqa: PLC0415

  try:
    return outputs.read_parameters(data) or comfyui.read_graph_text(data)
  except (OSError, ValueError, SyntaxError):  # not an image PIL knows: text?
    try:
      text = data.decode("utf-8")
    except UnicodeDecodeError:
      return None
    return text if text.strip() else None


def _size(key: str, value: str) -> tuple[int, int]:
  """(width, height) of a `WxH` field."""
  match = _SIZE.match(value.strip())
  if match is None:
    raise ValueError(f"{key}: {value!r} is not WIDTHxHEIGHT")
  return int(match[1]), int(match[2])


def _model(fields, flags, notes, model_hash) -> None:
  """A hub id (as sdjax writes it) is the model itself; a name needs --model (a VAE's, --vae)."""
  if "VAE" in fields:  # A1111's VAE swap, by file name (sdjax's: or a hub id)
    vae = fields.pop("VAE")
    if _HUB_ID.match(vae):
      flags["vae"] = vae
    else:
      notes.append(("vae", f"made with the VAE {vae}: give it with --vae"))
  name = fields.pop("Model", None)
  if name == "sdjax-shapes":  # the built-in model, main.py's default
    return
  if name and _HUB_ID.match(name):
    flags["model"] = name
  elif name:
    known = f" [{model_hash}]" if model_hash else ""
    notes.append(("model", f"made with the model {name}{known}: give it with --model"))


def _sampler(fields, flags, notes, made_by_sdjax, made_in="A1111") -> str | None:
  """Sampler and schedule type (or sdjax's scheduler options, which it writes as it was
  given them, the Schedule type only restating them); sdjax's scheduler name.

  An A1111 image's k-diffusion sampler ran over k-diffusion's noise levels: its Automatic (or,
  before A1111 1.9, no schedule type) is A1111's Uniform where the sampler has no choice of its
  own, and `timestep_spacing: linspace` places Karras, Exponential and Beta between the training
  sigmas' extremes and starts from noise of the first level, as k-diffusion does (diffusers'
  "leading" configs start below it, at sqrt(sigma^2 + 1)); `k_diffusion` makes the rest
  k-diffusion's and A1111's (DPM-Solver++'s start, fractional timesteps, DPM2's dropped
  penultimate level).
  """
  sampler, label = fields.pop("Sampler", None), fields.pop("Schedule type", None)
  options = fields.pop("Scheduler options", None)
  scheduler = None
  if sampler is not None and _named("Sampler", sampler, "scheduler", outputs.scheduler_name,
                                    "the model's own is used", flags, notes):
    scheduler = outputs.scheduler_name(sampler)
  if made_by_sdjax:  # its Scheduler options say so
    fields.pop("Discard penultimate sigma", None)
  discard = not made_by_sdjax and _a1111_sampling(fields, notes, sampler, scheduler)
  if options is not None:
    _scheduler_options(options, flags)
    return scheduler
  if label == "Automatic":
    label = _AUTOMATIC_SCHEDULE_TYPES.get(scheduler, "Automatic")
  if scheduler in _TIMESTEP_SAMPLERS and (made_by_sdjax or made_in == "A1111"):
    if not made_by_sdjax:  # A1111's own DDIM / PLMS / UniPC loops
      options = {"a1111": True}
      if scheduler == "unipc":
        options.update(_a1111_unipc(fields, notes))
      flags["scheduler_options"] = json.dumps(options)
    return scheduler
  if (scheduler is not None and not made_by_sdjax
      and schedulers.takes_option(scheduler, "schedule_type")):
    options = {"timestep_spacing": "linspace"}
    if schedulers.takes_option(scheduler, "k_diffusion"):
      options["k_diffusion"] = True
    if discard:
      options[schedulers.DISCARD_PENULTIMATE] = True
    flags["scheduler_options"] = json.dumps(options)
    if label is None and scheduler == "restart":  # A1111 1.6-1.8's Restart: Karras
      label = "Karras"
    elif label in (None, "Automatic") and not scheduler.endswith("_karras"):
      label = "Uniform"
  if label in (None, "Automatic"):
    return scheduler
  if label == "DDIM" and not made_by_sdjax and _ddim_levels(fields, flags, notes, scheduler,
                                                            discard):
    return scheduler
  if scheduler is not None and not schedulers.takes_option(scheduler, "schedule_type"):
    notes.append(("schedule_type", f"Schedule type: {label}: sdjax's {scheduler} places its own "
                                   "noise levels"))
  else:
    _named("Schedule type", label, "schedule_type", outputs.schedule_type_options,
           "the sampler's own is used", flags, notes)
  return scheduler


def _a1111_unipc(fields, notes) -> dict[str, Any]:
  """A1111's UniPC settings (written when changed; its defaults bh1, time_uniform, order 3,
  lower order final) as UniPC's options, beside its `a1111` form."""
  variant = fields.pop("UniPC variant", "bh1")
  if variant not in ("bh1", "bh2"):
    notes.append(("scheduler", f"UniPC variant: {variant}: sdjax's UniPC has bh1 and bh2 (bh1 "
                               "is used)"))
    variant = "bh1"
  options = {"solver_type": variant,
             "solver_order": int(_number("UniPC order", fields.pop("UniPC order", "3")))}
  skip_type = fields.pop("UniPC skip type", None)
  if skip_type is not None:
    if skip_type in schedulers.UNIPC_SKIP_TYPES:
      options["skip_type"] = skip_type
    else:
      notes.append(("scheduler", f"UniPC skip type: {skip_type} is not one A1111 has"))
  if fields.pop("UniPC lower order final", "True") == "False":
    options["lower_order_final"] = False
  version = a1111_version(fields.get("Version"))
  if version is not None and version < (1, 6, 0, 0):
    notes.append(("scheduler", "Sampler: UniPC: A1111 before 1.6.0 ran it through another "
                               "wrapper (its own step count, a v model's eps at the interpolated "
                               "level): sdjax runs 1.6's; the image may differ"))
  return options


# A1111's settings of its schedule types (written where they differ from its defaults; Beta's
# always): the scheduler options of the same meaning (`schedulers.SCHEDULE_SETTINGS`).
SCHEDULE_SETTING_FIELDS = {"Schedule min sigma": "schedule_sigma_min",
                           "Schedule max sigma": "schedule_sigma_max",
                           "Schedule rho": "schedule_rho",
                           "Beta schedule alpha": "schedule_beta_alpha",
                           "Beta schedule beta": "schedule_beta_beta"}


def _schedule_settings(fields, flags, notes, scheduler, made_by_sdjax) -> None:
  """A1111's schedule settings: the k-diffusion samplers' options (sdjax's images carry them in
  their Scheduler options already); Beta's default shape (0.6, 0.6), sdjax's too, sets none."""
  given = {key: fields.pop(key) for key in list(fields) if key in SCHEDULE_SETTING_FIELDS}
  if not given or made_by_sdjax:
    return
  values = {SCHEDULE_SETTING_FIELDS[key]: _number(key, text) for key, text in given.items()}
  values = {k: v for k, v in values.items() if not (k.startswith("schedule_beta") and v == 0.6)}
  options = json.loads(flags.get("scheduler_options", "{}"))
  if not values:
    return
  if (scheduler is not None and options.get("k_diffusion")
      and schedulers.takes_option(scheduler, "schedule_sigma_min")):
    flags["scheduler_options"] = json.dumps({**options, **values})
  else:
    notes.append(("scheduler", ", ".join(f"{k}: {v}" for k, v in given.items())
                  + f": sdjax's {scheduler or 'sampler'} places its noise levels without them"))


def _sgm(fields, flags, notes, scheduler) -> None:
  """A1111's SGM noise multiplier: the sampler's `sgm_noise_multiplier` option, where it has one
  (in its k-diffusion form)."""
  if fields.pop("SGM noise multiplier", None) != "True":
    return
  options = json.loads(flags.get("scheduler_options", "{}"))
  if (scheduler is not None and options.get("k_diffusion")
      and schedulers.takes_option(scheduler, "sgm_noise_multiplier")):
    flags["scheduler_options"] = json.dumps({**options, "sgm_noise_multiplier": True})
  else:
    notes.append(("scheduler", f"SGM noise multiplier: True: sdjax's {scheduler or 'sampler'} "
                               "starts from its noise times sigma_0, not sqrt(1 + sigma_0^2)"))


def a1111_version(text: str | None) -> tuple[int, int, int, int] | None:
  """An A1111 `Version` (`v1.6.0`, `v1.7.0-225-g1f2e3d4`, `1.8.0-RC`) as (major, minor, patch,
  commits after the tag; -1 for a release candidate), ordered as A1111 orders them
  (modules/infotext_versions.py: the tag and the commit count only); None for another program's
  (Forge's `f0.0.17v1.8.0rc-...`, sdjax's)."""
  if text is None:
    return None
  found = re.match(r"([^-]+-[^-]+)-.*", text)
  if found:
    text = found.group(1)
  found = re.fullmatch(r"v?(\d+)\.(\d+)\.(\d+)(?:-(\d+)|-?(rc\d*))?", text, re.IGNORECASE)
  if found is None:
    return None
  after = int(found.group(4)) if found.group(4) else -1 if found.group(5) else 0
  return int(found.group(1)), int(found.group(2)), int(found.group(3)), after


def _backcompat(fields, prompt: str) -> None:
  """The settings an older A1111 ran with and did not write, as A1111 reads them back from its
  `Version` (its infotext_versions.backcompat): before 1.6.0 DDIM and PLMS padded the shorter
  prompt as `Pad conds v0` does; before 1.7.0-225 a float16 SD1/SD2 model's alphas_cumprod was
  float16 (`Downcast alphas_cumprod`; A1111 reads it so for SDXL too, whose alphas_cumprod it
  had kept in float32: sdjax does not); before 1.6.0 prompt editing counted steps the old way."""
  version = a1111_version(fields.get("Version"))
  if version is None:
    return
  if version < (1, 6, 0, 0) and "[" in prompt:
    fields["Old prompt editing timelines"] = "True"
  if version < (1, 6, 0, 0) and fields.get("Sampler") in ("DDIM", "PLMS"):
    fields["Pad conds v0"] = "True"
  if version < (1, 7, 0, 225):  # for SD1/SD2 models: A1111 kept SDXL's apart, in float32
    fields["Downcast alphas_cumprod"] = schedulers.DOWNCAST_SD1_SD2


def _downcast(fields, flags, notes, scheduler) -> None:
  """A1111's float16 training schedule (`Downcast alphas_cumprod`, written by A1111 1.8+, or
  implied by an older `Version`: for SD1/SD2 models only): the sampler's
  `downcast_alphas_cumprod` option."""
  value = fields.pop("Downcast alphas_cumprod", None)
  if value not in ("True", schedulers.DOWNCAST_SD1_SD2):
    return
  _option_or_note(flags, notes, scheduler, schedulers.DOWNCAST_ALPHAS_CUMPROD,
                  True if value == "True" else value,
                  f"Downcast alphas_cumprod: True: sdjax's {scheduler or 'sampler'} reads its "
                  "noise levels off the float32 training schedule"
                  + (" (an SD1/SD2 model's: this A1111 downcast them)" if value != "True" else ""))


def _zero_snr(fields, flags, notes, scheduler) -> None:
  """A1111's Noise Schedule (written only when it rescaled the schedule to zero terminal SNR:
  "Zero Terminal SNR", or a fork's "Default" for a checkpoint marked ztsnr): the sampler's
  `rescale_betas_zero_snr`, in its A1111 form A1111's rescale (its largest level 4518.8)."""
  value = fields.pop("Noise Schedule", None)
  if value is not None:
    _option_or_note(flags, notes, scheduler, schedulers.ZERO_SNR, True,
                    f"Noise Schedule: {value}: sdjax's {scheduler or 'sampler'} has no "
                    "zero-terminal-SNR schedule")


def _option_or_note(flags, notes, scheduler, option: str, value, note: str) -> None:
  """Scheduler option `option` set to `value` where the sampler takes it, else `note`."""
  if scheduler is not None and schedulers.takes_option(scheduler, option):
    options = json.loads(flags.get("scheduler_options", "{}"))
    flags["scheduler_options"] = json.dumps({**options, option: value})
  else:
    notes.append(("scheduler", note))


def _ddim_levels(fields, flags, notes, scheduler, discard: bool) -> bool:
  """A1111's DDIM schedule type (every (1000 // steps)-th level of its table from the second,
  then 0: not steps + 1 of them where steps does not divide 1000) as the run's --sigmas, read
  off its table of Stable Diffusion's schedule (zero-terminal-SNR or float16 as its fields say),
  steps as many as they make; False where the sampler takes no list of levels."""
  if scheduler is None or not schedulers.takes_option(scheduler, "sigmas"):
    return False
  steps = _number("Steps", fields.get("Steps", "0"))
  levels = sigma_schedules.table_levels(
    "ddim", int(steps) if steps == int(steps) else None, "a1111",
    zero_snr=fields.get("Noise Schedule") == "Zero Terminal SNR",
    downcast=fields.get("Downcast alphas_cumprod") == "True",
    discard=discard or scheduler.removesuffix("_karras") in _DISCARDING)
  if levels is None:
    return False
  fields.pop("Steps")
  flags["steps"], flags["sigmas"] = str(len(levels) - 1), [str(v) for v in levels]
  options = json.loads(flags.get("scheduler_options", "{}"))
  options.pop(schedulers.DISCARD_PENULTIMATE, None)  # in the levels already
  flags["scheduler_options"] = json.dumps(options)
  if "Hires upscale" in fields or "Hires resize" in fields:
    notes.append(("hires_schedule_type", "Schedule type: DDIM: A1111's hires pass places DDIM's "
                                         "levels too, sdjax's its sampler's own"))
  return True


def _a1111_sampling(fields, notes, sampler, scheduler) -> bool:
  """Whether an A1111 image's sampler dropped its penultimate level by A1111's "Always discard
  next-to-last sigma" setting (`discard_penultimate_sigma`, where sdjax's sampler takes it);
  notes on what it did that sdjax's does not: noise from torch's global generator, that level's
  drop where the sampler does not take it."""
  family = (scheduler or "").removesuffix("_karras")
  if family == "restart" and _number("Steps", fields.get("Steps", "0")) >= 20:
    notes.append(("scheduler", "Sampler: Restart: from 20 steps A1111 draws its restarts' noise "
                               "from torch's global generator, not from the image's seed: the "
                               "image will differ"))
  if fields.pop("Discard penultimate sigma", None) != "True" or family in _DISCARDING:
    return False
  if (scheduler is not None and scheduler not in _TIMESTEP_SAMPLERS  # k-diffusion's only
      and schedulers.takes_option(scheduler, schedulers.DISCARD_PENULTIMATE)):
    return True
  notes.append((None, f"Discard penultimate sigma: True: sdjax's {scheduler or 'sampler'} keeps "
                      "every noise level"))
  return False


def _named(key, value, flag, check, instead, flags, notes) -> bool:
  """A field naming a sampler or a schedule type: the flag when `check` knows the name, else a
  note saying what is used `instead`."""
  try:
    check(value)
  except ValueError:
    notes.append((flag, f"{key}: {value} is not one sdjax has: {instead} (or give --{flag})"))
    return False
  flags[flag] = value
  return True


def _scheduler_options(text: str, flags) -> None:
  """sdjax's `Scheduler options: key=value; ...` (Python's str of each value) as the flags
  that set them."""
  options = {}
  for item in text.split("; "):
    key, sep, value = item.partition("=")
    if not sep or not key:
      raise ValueError(f"Scheduler options: {item!r} is not key=value")
    options[key] = _option_value(value)
  for key in ("sigmas", "timesteps"):
    if key in options:
      values = options.pop(key)
      if not isinstance(values, list):
        raise ValueError(f"Scheduler options: {key} must be a list, got {values!r}")
      flags[key] = [str(v) for v in values]
  if "schedule_type" in options:
    flags["schedule_type"] = str(options.pop("schedule_type"))
  if options:
    flags["scheduler_options"] = json.dumps(options)


def _option_value(text: str) -> Any:
  python = {"True": True, "False": False, "None": None}
  if text in python:
    return python[text]
  try:
    return json.loads(text)
  except ValueError:
    return text  # a string option, written unquoted


def _eta(fields, flags, notes, scheduler) -> None:
  """`Eta DDIM` (A1111's and sdjax's DDIM eta) and `Eta` (sdjax's TCD eta; the ancestral and
  SDE samplers' share of fresh noise, their `eta` scheduler option)."""
  if "Eta DDIM" in fields:
    flags["eta"] = fields.pop("Eta DDIM")
  if "Eta" not in fields:
    return
  value = fields.pop("Eta")
  if scheduler in schedulers.ETA_SCHEDULERS:  # older sdjax wrote DDIM's as Eta too
    flags["eta"] = value
  elif scheduler is not None and schedulers.takes_option(scheduler, "eta"):
    if _number("Eta", value) != 1.0:  # 1: the default
      options = json.loads(flags.get("scheduler_options", "{}"))
      options.setdefault("eta", _number("Eta", value))  # sdjax's options say it too
      flags["scheduler_options"] = json.dumps(options)
  elif _number("Eta", value) != 1.0:
    notes.append((None, f"Eta: {value}: sdjax's {scheduler or 'sampler'} takes no eta"))


# A1111's churn settings as it writes them (where they differ from its defaults and the sampler
# takes them: Euler, Heun, DPM2) -> the options of sdjax's samplers (`schedulers.S_CHURN`).
_CHURN_FIELDS = (("Sigma churn", schedulers.S_CHURN), ("Sigma tmin", schedulers.S_TMIN),
                 ("Sigma tmax", schedulers.S_TMAX))


def _churn(fields, flags, notes, scheduler) -> None:
  """A1111's `Sigma churn`, `Sigma tmin` and `Sigma tmax` (k-diffusion's churn of its Euler,
  Heun and DPM2): the options of the samplers that take them, else a note."""
  for field, option in _CHURN_FIELDS:
    if field not in fields:
      continue
    text = fields.pop(field)
    value = _number(field, text)
    if scheduler is not None and schedulers.takes_option(scheduler, option):
      options = json.loads(flags.get("scheduler_options", "{}"))
      options.setdefault(option, value)  # sdjax's options say it too
      flags["scheduler_options"] = json.dumps(options)
    else:
      notes.append((None, f"{field}: {text}: sdjax's {scheduler or 'sampler'} takes no "
                          f"{option} (A1111's Euler, Heun and DPM2 do)"))


def _sigma_noise(fields, flags, notes, scheduler) -> None:
  """A1111's `Sigma noise` (its s_noise setting, k-diffusion's `s_noise`, written where the
  sampler took it): the `s_noise` option of the samplers that have it."""
  if "Sigma noise" not in fields:
    return
  text = fields.pop("Sigma noise")
  value = _number("Sigma noise", text)
  if value == 1.0:
    return
  if scheduler is not None and schedulers.takes_option(scheduler, schedulers.S_NOISE):
    options = json.loads(flags.get("scheduler_options", "{}"))
    options.setdefault(schedulers.S_NOISE, value)  # sdjax's options say it too
    flags["scheduler_options"] = json.dumps(options)
  else:
    notes.append((None, f"Sigma noise: {text}: sdjax's {scheduler or 'sampler'} takes no "
                        "s_noise"))


def _brownian(fields, flags, notes, scheduler, made_by_sdjax, made_in) -> None:
  """Brownian noise (sdjax's field, and ComfyUI's reader's): the device of the tree an SDE
  sampler's noise came from (--brownian). A1111's SDE samplers (of either pass) grow theirs on
  its GPU, seeded by the image's seed: on NVIDIA, CUDA's generator."""
  value = fields.pop("Brownian noise", None)
  if value is not None:
    if value in _RNGS:
      flags["brownian"] = _RNGS[value]
    else:
      notes.append(("brownian", f"Brownian noise: {value}: sdjax grows the tree with a CPU or "
                                "CUDA generator only (CPU, NV): the image's noise will differ"))
    return
  hires = fields.get("Hires sampler")
  try:
    hires = outputs.scheduler_name(hires) if hires else None
  except ValueError:
    hires = None
  if made_by_sdjax or not (schedulers.takes_brownian(scheduler)
                           or schedulers.takes_brownian(hires)):
    return
  flags["brownian"] = "nv"
  notes.append(("brownian", f"{made_in}'s SDE samplers draw their fresh noise from a Brownian "
                            "tree (torchsde's) on its GPU, seeded by the image's seed: sdjax "
                            "grows it with CUDA's generator, an NVIDIA GPU's (--brownian nv); an "
                            "AMD, Intel or Apple GPU's tree differs (a CPU's: --brownian "
                            "torch_cpu)"))


def _number(key: str, value: str) -> float:
  try:
    number = float(value)
  except ValueError:
    raise ValueError(f"{key}: {value!r} is not a number") from None
  if not math.isfinite(number):
    raise ValueError(f"{key}: {value!r} is not a number")
  return number


def _noise(fields, flags, notes, made_by_sdjax, made_in: str = "A1111") -> None:
  """RNG (A1111's absent one is its GPU's; sdjax's, jax's), Step RNG (sdjax's field, as ComfyUI's
  reader writes it), Noise batch (sdjax's, and ComfyUI's reader's: its batch_size) and Resize seed
  from."""
  step_rng = fields.pop("Step RNG", None)
  if step_rng in _RNGS:
    flags["step_rng"] = _RNGS[step_rng]
  elif step_rng is not None:
    notes.append(("step_rng", f"Step RNG: {step_rng}: sdjax cannot draw that noise (CPU, NV)"))
  rng = fields.pop("RNG", None)
  if rng in _RNGS:
    flags["rng"] = _RNGS[rng]
  elif rng is None and made_by_sdjax:
    flags["rng"] = "jax"
  elif rng is None and made_in == "A1111":  # its default, the GPU's: on NVIDIA, NV's noise
    flags["rng"] = "nv"
    notes.append(("rng", "RNG: GPU (A1111 writes none for it): sdjax draws A1111's NV noise, "
                         "which is an NVIDIA GPU's (to a few float32 ulps); an AMD, Intel or "
                         "Apple GPU's noise differs"))
  else:
    notes.append(("rng", f"RNG: {rng or 'GPU'}: sdjax cannot draw that noise (it draws "
                         "jax's, or A1111's RNG: CPU with --rng torch_cpu and RNG: NV with --rng "
                         "nv); the image's noise will differ"))
  if "Noise batch" in fields:  # ComfyUI's batches: the whole batch again, the image at its place
    size = fields.pop("Noise batch")
    flags["noise_batch"] = flags["num_images_per_prompt"] = size
    place = fields.pop("Noise batch place", "0")
    notes.append((None, f"made in a batch of {size} drawn from its seed at once: this makes the "
                        f"batch, the image its image {place} (from 0)"))
  if "Seed resize from" in fields:
    width, height = _size("Seed resize from", fields.pop("Seed resize from"))
    if width > 0 and height > 0:
      flags["seed_resize_from_w"], flags["seed_resize_from_h"] = str(width), str(height)


def _hires(fields, flags, notes) -> None:
  """The hires fix, on when the text has `Hires upscale` or `Hires resize`; a `Denoising
  strength` without them is img2img's, whose init image is not in the text."""
  strength = fields.pop("Denoising strength", None)
  scale, resize = fields.pop("Hires upscale", None), fields.pop("Hires resize", None)
  hires_merging = fields.pop("Token merging ratio hr", None)
  if scale is None and resize is None:
    if strength is not None:  # img2img's, of an init image that a flag or a line must give
      flags["strength"] = strength
      notes.append(("init_image", f"Denoising strength: {strength}: an img2img or inpainting "
                                  "image, whose init image is not in the file (give it with "
                                  "--init_image or in a .jsonl prompts line)"))
    return
  if scale is not None:  # sdjax adds the resize where rounding moved the size: derived
    flags["hires_scale"] = scale
  else:
    width, height = _size("Hires resize", resize)
    flags["hires_resize_width"], flags["hires_resize_height"] = str(width), str(height)
  if strength is not None:
    flags["hires_strength"] = strength
  upscaler = fields.pop("Hires upscaler", None)
  if upscaler is not None:
    ours = {label: name for name, label in _hires_upscalers().items()}
    if upscaler in ours:
      flags["hires_upscaler"] = ours[upscaler]
    elif upscaler.startswith(OTHER_UPSCALERS):
      notes.append(("hires_upscaler", f"Hires upscaler: {upscaler} is not one sdjax has (it "
                                      "runs A1111's latent ones, Lanczos, Nearest and ESRGAN / "
                                      "Real-ESRGAN files): Latent is used (or give "
                                      "--hires_upscaler)"))
    else:  # A1111's R-ESRGAN 4x+ (Anime6B), ESRGAN_4x, or a file in its models/ESRGAN
      flags["hires_upscaler"] = upscaler
  for key, flag in _HIRES_ONE_TO_ONE.items():
    if key in fields:
      flags[flag] = fields.pop(key)
  # A1111 writes the hires pass's token merging ratio where not 0 (its own, else the first
  # pass's): absent beside a first pass's, it was 0.
  if hires_merging is not None or "Token merging ratio" in fields:
    flags["hires_token_merging_ratio"] = hires_merging or "0"
  for key, flag, check in (("Hires sampler", "hires_scheduler", outputs.scheduler_name),
                           ("Hires schedule type", "hires_schedule_type",
                            outputs.schedule_type_options)):
    if key in fields:
      _named(key, fields.pop(key), flag, check, "the first pass's is used", flags, notes)
  if "Hires checkpoint" in fields:
    _named_model(fields.pop("Hires checkpoint"), "hires_model", "Hires checkpoint", flags, notes)


# A1111's upscalers of other architectures than ESRGAN's and Real-ESRGAN's (what sdjax cannot
# run), by name prefix: LDSR, ScuNET, SwinIR and DAT.
OTHER_UPSCALERS = ("LDSR", "ScuNET", "SwinIR", "DAT ")


def _inpainting(fields, flags, notes, made_by_sdjax: bool, made_in: str,
                scheduler: str | None) -> None:
  """A1111's img2img inpaint settings: Mask blur, "Only masked" with its padding, Masked content
  (A1111 writes it for fill; sdjax for the latent ones too); its blend (`--inpaint_blend
  a1111`: an A1111 image's, an sdjax image's where it says `Inpaint blend: A1111`; `ComfyUI`:
  --inpaint_blend comfyui, with its VAEEncodeForInpaint's `Grow mask by` and its
  ImageCompositeMasked's `Inpaint composite`)."""
  blend = fields.pop("Inpaint blend", None)
  if blend in ("A1111", "ComfyUI") and made_by_sdjax:
    flags["inpaint_blend"] = blend.lower()
  elif blend == "ComfyUI" and made_in == "ComfyUI":  # a noise mask (`comfyui.reproduce`)
    if scheduler is None or schedulers.takes_comfyui_blend(scheduler):
      flags["inpaint_blend"] = "comfyui"
    else:
      notes.append(("inpaint_blend", f"an inpainted image: sdjax's {scheduler} does not blend "
                                     "the image into its calls as ComfyUI does (diffusers' way "
                                     "instead): the repainted pixels differ"))
  differential = fields.pop("Differential diffusion", None)  # ComfyUI's node: with its blend
  if differential is not None and flags.get("inpaint_blend") == "comfyui":
    flags["differential_diffusion"] = str(_number("Differential diffusion", differential))
  elif differential is not None and blend is not None:  # (without a mask it does nothing)
    notes.append(("differential_diffusion", "ComfyUI's DifferentialDiffusion: sdjax makes it "
                                            "with ComfyUI's blend only, the image differs"))
  composite = fields.pop("Inpaint composite", None)  # ComfyUI's ImageCompositeMasked: the same
  if composite == "ComfyUI" and flags.get("inpaint_blend") == "comfyui":
    flags["comfyui_composite"] = "true"
  elif composite is not None:
    notes.append(("comfyui_composite", "the image pasted back by ComfyUI's ImageCompositeMasked: "
                                       "sdjax pastes it so with ComfyUI's blend only, the image "
                                       "differs"))
  grow = fields.pop("Grow mask by", None)  # ComfyUI's VAEEncodeForInpaint: with its blend
  if grow is not None and flags.get("inpaint_blend") == "comfyui":
    flags["grow_mask_by"] = grow
  elif grow is not None:
    notes.append(("grow_mask_by", "its mask grown by ComfyUI's VAEEncodeForInpaint: sdjax grows "
                                  "it with ComfyUI's blend only, the image differs"))
  if "Mask blur" in fields:  # A1111 writes it for inpainting only
    flags["mask_blur"] = str(_number("Mask blur", fields.pop("Mask blur")))
    if made_by_sdjax or made_in == "ComfyUI":  # (ComfyUI's: its noise mask's blend, above)
      pass
    elif scheduler is None or schedulers.takes_a1111_blend(scheduler):
      flags["inpaint_blend"] = "a1111"
    else:
      notes.append(("inpaint_blend", f"an inpainted image: sdjax's {scheduler} does not blend "
                                     f"the image into its steps as {made_in} does (diffusers' "
                                     "way instead): the repainted pixels differ"))
  if fields.get("Inpaint area") == "Only masked":
    del fields["Inpaint area"]
    flags["inpaint_full_res"] = "true"
    if "Masked area padding" in fields:
      flags["inpaint_full_res_padding"] = fields.pop("Masked area padding")
  if fields.get("Mask mode") in ("Inpaint masked", "Inpaint not masked"):  # its invert
    if fields.pop("Mask mode") == "Inpaint not masked":
      flags["inpainting_mask_invert"] = "true"
  content = fields.pop("Masked content", None)
  if content in masks.MASKED_CONTENT:
    flags["inpainting_fill"] = content.replace(" ", "_")
  elif content is not None:
    notes.append(("inpainting_fill", f"Masked content: {content} is not one sdjax has "
                                     f"({', '.join(masks.MASKED_CONTENT)})"))
  # A1111's Soft inpainting (its extension writes all six settings): with its blend
  soft = fields.pop("Soft inpainting enabled", None) == "True"
  settings = [fields.pop(label, None) for label in masks.SOFT_INPAINTING_LABELS]
  if soft and flags.get("inpaint_blend") == "a1111":
    defaults = dataclasses.astuple(masks.SoftInpainting())
    flags["soft_inpainting"] = [str(_number(label, value)) if value is not None else f"{d:g}"
                                for label, value, d in zip(masks.SOFT_INPAINTING_LABELS,
                                                           settings, defaults, strict=True)]
  elif soft:
    notes.append(("soft_inpainting", "soft inpainting: sdjax makes it with A1111's blend only "
                                     "(here not taken: the repainted pixels differ)"))


def _hires_upscalers() -> dict[str, str]:
  from sdjax import sampling  # noqa: PLC0415  (jax; the rest of this module needs none)

  return sampling.HIRES_UPSCALER_NAMES


def _looks(fields, flags) -> None:
  """Tiling, FreeU and perturbed-attention guidance's layers."""
  if fields.pop("Tiling", None) == "True":
    flags["tiling"] = "true"
  if "Tiling axis" in fields:
    flags["tiling"], flags["tiling_axes"] = "true", fields.pop("Tiling axis")
  if "FreeU" in fields:
    text = fields.pop("FreeU")
    factors = dict(item.strip().partition("=")[::2] for item in text.split(","))
    names = ("s1", "s2", "b1", "b2")
    if sorted(factors) != sorted(names):
      raise ValueError(f"FreeU: {text!r} is not s1=..., s2=..., b1=..., b2=...")
    flags["freeu"] = [str(_number("FreeU", factors[name])) for name in names]
    form = fields.pop("FreeU form", None)  # sdjax's (and `comfyui.reproduce`'s) other forms
    forms = {name: key for key, name in outputs.FREEU_FORM_NAMES.items()}
    if form is not None and form not in forms:
      raise ValueError(f"FreeU form: {form!r} is not one of {', '.join(forms)}")
    if form is not None:
      flags["freeu_form"] = forms[form]
  if "PerturbedAttentionGuidance_layers" in fields:
    text = fields.pop("PerturbedAttentionGuidance_layers")
    try:
      layers = json.loads(text)
    except ValueError:
      layers = None
    if not (isinstance(layers, list) and layers and all(isinstance(x, str) for x in layers)):
      raise ValueError(f"PerturbedAttentionGuidance_layers: {text!r} is not a list of names")
    flags["pag_applied_layers"] = layers


def _sdxl(fields, flags, notes, scheduler: str | None = None, made_by_sdjax: bool = False) -> None:
  """SDXL's micro-conditioning (WxH, as sdjax writes it; Crop: LEFTxTOP) and refiner: an A1111
  image's switches inside its sampler loop (--refiner_switch a1111), an sdjax image's as its
  `Refiner switch` says (none: diffusers')."""
  if fields.pop("Refiner switch", None) == "A1111" or (
      "Refiner switch at" in fields and not made_by_sdjax):
    flags["refiner_switch"] = "a1111"
  a1111_scheduler = None if made_by_sdjax else scheduler
  by_steps = fields.pop("Refiner switch by sampling steps", None) == "True"
  hires_refiner = fields.pop("Hires refiner", None)  # A1111's, where not its "second pass"
  if hires_refiner is not None:
    flags["hires_refiner"] = hires_refiner
  hires = "hires_scale" in flags or "hires_resize_width" in flags
  if by_steps and hires and hires_refiner != "first pass" and "Refiner switch at" in fields:
    notes.append(("refiner_start", f"Refiner switch by sampling steps: A1111 switches at "
                                   f"{fields['Refiner switch at']} of the hires pass's calls; "
                                   "sdjax at that timestep"))
  elif by_steps and "Refiner switch at" in fields:  # at the share of its calls, not a timestep
    at, steps = _number("Refiner switch at", fields["Refiner switch at"]), fields.get("Steps")
    if a1111_scheduler in schedulers.SCHEDULERS and (
        schedulers.calls_per_step(a1111_scheduler) == 1) and str(steps).isdigit():
      # its denoiser's call i (of `Steps`) is the refiner's from the first i / Steps >= at on
      call = next((i for i in range(1, int(steps)) if i / int(steps) >= at), None)
      if call is None:
        del fields["Refiner switch at"]
        notes.append(("refiner_start", f"Refiner switch at {at} by sampling steps: after the "
                                       f"last of {steps} steps, so no refiner step"))
      else:
        fields["Refiner switch at"] = str(call)  # a number of steps
    else:
      notes.append(("refiner_start", f"Refiner switch by sampling steps: A1111 switches at "
                                     f"{at} of its {a1111_scheduler} calls; sdjax at that "
                                     "timestep"))
  for key, flag in (("Original size", "original_size"), ("Target size", "target_size"),
                    ("Crop", "crops_coords_top_left"),
                    ("Negative original size", "negative_original_size"),
                    ("Negative target size", "negative_target_size"),
                    ("Negative crop", "negative_crops_coords_top_left")):
    if key in fields:
      across, down = _size(key, fields.pop(key))
      flags[flag] = [str(down), str(across)]  # HEIGHT,WIDTH; TOP,LEFT
  if "Refiner" in fields:
    _named_model(fields.pop("Refiner"), "refiner", "Refiner", flags, notes)


def _named_model(title: str, flag: str, key: str, flags, notes) -> None:
  """A model named as A1111's dropdown does (`name [short hash]`): a hub id is the flag itself
  (sdjax writes them), a file's name a note asking for it."""
  name = re.sub(r" \[\w+\]$", "", title)
  if _HUB_ID.match(name):
    flags[flag] = name
  else:
    notes.append((flag, f"{key}: {title}: give it with --{flag}"))
