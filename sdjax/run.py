"""Batch generation: many prompts, every device of every host, reproducible and resumable.

`generate_run(RunConfig(...))` is what `main.py` calls. Image k of a run (prompts in order, then
`num_images_per_prompt`) gets seed `seed + k` unless its jsonl line names one; each device makes
`batch_size` images per step with the single-device program, so the pixels do not depend on the
number of devices, processes or jobs. The images are cut into shards of `shard_size`; each shard
has one writer (see `sinks`), and the prompts file is streamed (see `plan`), so memory does not
grow with the run. While the devices compute batch n+1, the host fetches batch n and worker
threads encode and write it. Rerunning the same command skips finished shards.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import math
import os
import re
import signal
import time
from collections.abc import Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

import sdjax
from sdjax import (
  aot,
  conditioning,
  dynamic_prompts,
  interpolate,
  masks,
  outputs,
  parallel,
  safety,
  sampling,
  sinks,
  upscaling,
)
from sdjax.conditioning import MicroConditioning
from sdjax.models import token_merging
from sdjax.plan import (
  ImageJob,
  Plan,
  PromptLine,
  RunError,
  check_size,
  read_prompts_file,
  thaw_options,
)

__all__ = ["ImageJob", "PromptLine", "RunConfig", "RunError", "RunSummary", "generate_run",
           "read_prompts_file"]

# Samplers (size, kind, schedule) a run keeps compiled: a prompts file with per-line sizes and
# settings made one program each for the process's life, tens of MB or more each. One dropped
# and needed again loads from the compiled-program cache (`aot`) instead of compiling.
MAX_PROGRAMS = 32


@dataclasses.dataclass(frozen=True)
class RunConfig:
  prompts: tuple[PromptLine, ...] = ()
  prompts_file: str | None = None  # streamed after `prompts`
  model: str | None = None
  negative_prompt: str = ""
  num_images_per_prompt: int = 1
  # None: the model folder's sampling defaults (`sdjax_defaults.json`), else 50 steps, guidance
  # 7.5 and the checkpoint's own scheduler.
  steps: int | None = None
  guidance_scale: float | None = None
  guidance_rescale: float = 0.0  # diffusers' guidance_rescale (run-wide; 0: off)
  # Its form (`sampling.GUIDANCE_RESCALE_FORMS`): diffusers' or ComfyUI's RescaleCFG node's.
  guidance_rescale_form: str = "diffusers"
  # A1111's "Clip skip" (SD1/SD2): condition on the text encoder's layer this far from the end
  # (1: the last, as trained; 2: the penultimate, for NovelAI-descended models); diffusers'
  # clip_skip is one less.
  clip_skip: int = 1
  # As A1111 reads an image's Clip skip (main.py --parameters_file): an SDXL model keeps its
  # encoders' penultimate layers whatever clip_skip says (else that is an error).
  sdxl_ignores_clip_skip: bool = False
  scheduler: str | None = None
  # The scheduler's config options to override ((key, value) pairs), e.g. timestep_spacing.
  scheduler_options: tuple[tuple[str, Any], ...] = ()
  eta: float = 0.0  # DDIM's stochasticity; step noise from each image's seed
  height: int | None = None
  width: int | None = None
  seed: int = 0
  # Where each image's noise comes from (sampling.RNGS): "jax", or "torch_cpu": its seed's torch
  # CPU generator, as diffusers' pipelines with per-image generators and A1111's "RNG: CPU"; or
  # "nv": its seed's A1111 NV generator (A1111's "RNG: NV", and its GPU default on NVIDIA).
  rng: str = "jax"
  # The device of the Brownian tree the SDE samplers' step noise comes from, as A1111's, ComfyUI's
  # and diffusers' (`sampling.BrownianNoise`: "nv", a CUDA generator's; "torch_cpu"); None: fresh
  # draws from `rng`. Lines whose sampler is not an SDE one ignore it.
  brownian: str | None = None
  # A generator of its own for the steps' fresh noise (`sampling.SampleSpec.step_rng`: "nv" for
  # ComfyUI's ancestral samplers, drawn on its GPU); None: `rng`'s.
  step_rng: str | None = None
  # The seeds' high 32 bits (ComfyUI's are 64-bit), for what takes a seed whole: the Brownian
  # tree, CUDA's generator (NV).
  seed_high: int = 0
  # ComfyUI's batches (`sampling.SampleSpec.noise_batch`): the images in batches of this many,
  # image k of a batch the k-th slice of its seed's noise drawn for the whole batch at once, the
  # batches from consecutive seeds; 1: one seed per image. With rng torch_cpu.
  noise_batch: int = 1
  # A1111's variation seeds: image k's noise moved towards seed `subseed + k`'s by this strength.
  subseed: int | None = None
  subseed_strength: float = 0.0
  ensd: int = 0  # A1111's Eta noise seed delta: step noise from seed + ensd (0: off)
  # A1111's settings that leave the negative prompt out of some UNet calls (`sampling.CfgSkip`):
  # Negative Guidance minimum sigma (NGMS, 0: off), at every call below it rather than every
  # other, and Skip Early CFG (the fraction of the run without it, 0: off).
  s_min_uncond: float = 0.0
  s_min_uncond_all: bool = False
  skip_early_cond: float = 0.0
  # A1111's Pad conds (and v0): a prompt and negative prompt of different lengths padded to one
  # (`prompts.pad_conds`; --prompt_syntax a1111).
  pad_cond_uncond: bool = False
  pad_cond_uncond_v0: bool = False
  # A1111's Old prompt editing timelines (its counting before 1.6; --prompt_syntax a1111).
  old_prompt_editing_timelines: bool = False
  # A1111's "Resize seed from" width and height in pixels (either 0: off).
  seed_resize_from_w: int = 0
  seed_resize_from_h: int = 0
  batch_size: int = 1  # per device
  dtype: str = "float32"
  output_dir: str = "outputs"  # a folder or any fsspec URL
  output_format: str = "png"  # or "webdataset"
  images_per_folder: int = 10000  # png
  image_format: str = "png"  # or "jpg", "webp": the image files, in either output format
  # How float pixels become 8-bit levels: "round" (diffusers') or "floor" (A1111's, ComfyUI's).
  pixel_levels: str = "round"
  image_quality: int = 80  # jpg and lossy webp (A1111's default)
  webp_lossless: bool = False
  shard_size: int = 1000  # images per shard (a tar, or a unit of png resume and work split)
  num_shards: int = 1  # independent jobs sharing output_dir (a SLURM array)
  shard_index: int = 0  # which of them this is
  writer_threads: int = 8
  overwrite: bool = False
  allow_pickle: bool = True  # ignored: pickles are always read safely
  model_config: str | None = None  # single-file model: folder / hub id of its configs
  vae: str | None = None
  prediction_type: str | None = None
  compilation_cache: str | None = None
  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None
  cpu_devices: int | None = None  # CPU-only hosts: devices to split the CPU into (0: per core)
  # Each image's guidance pair on two devices (uncond on one, cond on the other): an image's
  # latency halves where images are fewer than devices; pixels move by float rounding.
  cfg_parallel: bool = False
  show_progress: bool = True
  loras: tuple[tuple[str, float], ...] = ()  # (file or hub file, scale)
  embeddings: tuple[tuple[str, str | None], ...] = ()  # (file or hub file, token or None)
  prompt_syntax: str = "plain"  # or "a1111": weights, long prompts, BREAK, prompt editing
  lora_dir: str | None = None  # a1111: where <lora:name:w> tags find name.safetensors
  emphasis: str = "Original"  # a1111: A1111's emphasis mode (`prompts.EMPHASIS_MODES`)
  strength: float = 0.75  # img2img lines (jsonl init_image): A1111's denoising strength
  noise_multiplier: float = 1.0  # img2img lines: A1111's Noise multiplier of the initial noise
  extra_noise: float = 0.0  # img2img lines and hires passes: A1111's Extra noise
  # An instruct-pix2pix model's lines (each edits its init_image): A1111's Image CFG scale
  # (None: sampling.IMAGE_GUIDANCE_SCALE).
  image_guidance_scale: float | None = None
  # An x4 upscaler's lines (each enlarges its init_image, read at a quarter of the image size):
  # the low-res image's noise level (None: sampling.NOISE_LEVEL).
  noise_level: int | None = None
  # Inpainting lines (jsonl mask_image), as A1111: the mask's blur radius; "Only masked" (the
  # masked box, padded, generated at the run's size and pasted back) or the whole picture. The
  # original's pixels are pasted back outside the mask either way (`sdjax.masks`).
  mask_blur: float = 4.0
  resize_mode: str = "just"  # init images to the image size: `outputs.RESIZE_MODES`
  inpaint_full_res: bool = False
  inpaint_full_res_padding: int = 32
  inpainting_mask_invert: bool = False  # repaint what the mask leaves black
  inpainting_fill: str = "original"  # A1111's "Masked content" (`masks.MASKED_CONTENT`)
  # An inpainting model's A1111 "Conditional mask weight" (see generate()); 1: the mask hides all.
  inpainting_mask_weight: float = 1.0
  # How inpainting keeps the image outside the mask (`sampling.INPAINT_BLENDS`): diffusers' or
  # A1111's blend.
  inpaint_blend: str = "diffusers"
  # How img2img, inpainting and a hires pixel upscaler's images become latents
  # (`sampling.IMAGE_ENCODES`): a posterior sample or (ComfyUI's) its mode.
  image_encode: str = "sample"
  # With inpaint_blend "comfyui": ComfyUI's VAEEncodeForInpaint, its mask grown by this many
  # pixels (`sampling.SampleSpec.grow_mask_by`); None: the image as it is.
  grow_mask_by: int | None = None
  # With inpaint_blend "a1111": A1111's Soft inpainting, its six settings
  # (`masks.SoftInpainting`); None: off.
  soft_inpainting: tuple[float, ...] | None = None
  # With inpaint_blend "comfyui": ComfyUI's DifferentialDiffusion, its strength
  # (`sampling.SampleSpec.differential`); None: off.
  differential_diffusion: float | None = None
  # With inpaint_blend "comfyui": ComfyUI's ImageCompositeMasked pastes the image back over the
  # decoded one through the mask (`masks.MaskOptions.composite`).
  comfyui_composite: bool = False
  # ControlNets steering lines by their control_image (else these, one per ControlNet), their
  # residuals summed in order; per ControlNet a single file's diffusers config ("": none). The
  # scale and share of the steps: one for all, or one per ControlNet.
  controlnet: tuple[str, ...] = ()
  controlnet_config: tuple[str, ...] = ()
  control_image: tuple[str, ...] = ()
  controlnet_scale: tuple[float, ...] = (1.0,)
  control_guidance_start: tuple[float, ...] = (0.0,)
  control_guidance_end: tuple[float, ...] = (1.0,)
  controlnet_guess_mode: bool = False  # diffusers' guess_mode (see Pipeline.generate)
  control_mode: tuple[str, ...] = ("balanced",)  # A1111's Control Mode: one, or one per net
  # Per ControlNet, a ControlNet union's control type (a name or index; "": not a union).
  control_type: tuple[str, ...] = ()
  # Perturbed-attention guidance (see Pipeline.generate's pag_*): on when pag_scale > 0.
  pag_scale: float = 0.0
  pag_adaptive_scale: float = 0.0
  pag_applied_layers: tuple[str, ...] = ("mid",)
  freeu: tuple[float, float, float, float] | None = None  # (s1, s2, b1, b2); see generate()
  freeu_form: str = "diffusers"  # diffusers' or ComfyUI's FreeU / FreeU_V2; see generate()
  # Token merging's ratio (A1111's "Token merging ratio"; 0: off) and the hires pass's (None:
  # the same); see generate().
  token_merging_ratio: float = 0.0
  hires_token_merging_ratio: float | None = None
  # A1111's Tiling, seamless images: True (both axes), "x" or "y" (one: panoramas, strips).
  tiling: bool | str = False
  # IP-Adapters conditioning lines on their ip_adapter_image (else these, one per adapter); per
  # adapter its image encoder ("": the image_encoder/ folder beside the file); the scale: one
  # for all, or one per adapter, each a number or InstantStyle's per-layer scales (a dict, or
  # its JSON text).
  ip_adapter: tuple[str, ...] = ()
  ip_adapter_encoder: tuple[str, ...] = ()
  ip_adapter_image: tuple[str, ...] = ()
  ip_adapter_scale: tuple[float | str | dict, ...] = (1.0,)
  # Per adapter a mask image ("": none) keeping its image to a region (diffusers'
  # ip_adapter_masks), resized to each image's size.
  ip_adapter_mask: tuple[str, ...] = ()
  # SDXL: an optional refiner taking over at `refiner_start` of the schedule (an int: after that
  # many steps); micro-conditioning.
  refiner: str | None = None
  refiner_start: float | int = 0.8
  # "diffusers": the refiner's sampler starts afresh; "a1111": A1111's switch inside its loop
  # (`sampling.REFINER_SWITCHES`)
  refiner_switch: str = "diffusers"
  # With the hires fix, the pass the refiner finishes (`sampling.HIRES_REFINER_PASSES`, A1111's
  # "Hires refiner"): the hires pass; the first (the base then runs the hires pass); both.
  hires_refiner: str = "second pass"
  # A1111's hires fix: 0 = off; else the latents are enlarged this many times and
  # denoised again (img2img at hires_strength) for hires_steps steps (0: --steps).
  hires_scale: float = 0.0
  hires_steps: int = 0
  hires_strength: float = 0.7
  # One of sampling.HIRES_UPSCALER_NAMES, or a model upscaler (ESRGAN / Real-ESRGAN): a file,
  # or its name in upscaler_dir (A1111's: "R-ESRGAN 4x+", a file's stem), run as A1111 runs it
  # with its tiling settings ESRGAN_tile / ESRGAN_tile_overlap (`sdjax.upscaling`).
  hires_upscaler: str = "latent"
  upscaler_dir: str | None = None
  upscaler_tile: int = upscaling.DEFAULT_TILE
  upscaler_tile_overlap: int = upscaling.DEFAULT_OVERLAP
  # Instead of hires_scale: A1111's "Resize width to" / "Resize height to" (0: from the aspect).
  hires_resize_width: int = 0
  hires_resize_height: int = 0
  hires_scheduler: str | None = None  # A1111's Hires sampler; None: each image's scheduler
  hires_guidance_scale: float = 0.0  # Forge's Hires CFG Scale; 0: each image's guidance
  # A1111's Hires schedule type (sdjax's name; "": the scheduler's own, A1111's Automatic);
  # None: each image's.
  hires_schedule_type: str | None = None
  # The second pass's prompts (A1111's Hires prompt; "" = each image's own), unless a prompt
  # line gives its own.
  hires_prompt: str = ""
  hires_negative_prompt: str = ""
  # SDXL's second text encoder's prompts (diffusers' prompt_2 / negative_prompt_2; "" = each
  # image's prompt / negative prompt), unless a prompt line gives its own.
  prompt_2: str = ""
  negative_prompt_2: str = ""
  # A1111's Hires checkpoint: another model (of the same latents) for the second pass; the
  # run's --vae, --lora and --embedding, ControlNets and IP-Adapters apply to it too.
  hires_model: str | None = None
  micro: MicroConditioning = MicroConditioning()
  # Prompts as templates of A1111's sd-dynamic-prompts extension (`sdjax.dynamic_prompts`):
  # "random" (each image's text picked by its seed) or "combinatorial" (every text a template
  # makes, at most max_generations; 0: all), `__name__` reading wildcards_dir/name.txt.
  dynamic_prompts: str = "off"
  wildcards_dir: str | None = None
  max_generations: int = 0
  # A1111's saved styles: a styles.csv, and the names applied to every prompt (a jsonl line's
  # `styles` replace them).
  styles_file: str | None = None
  styles: tuple[str, ...] = ()
  # diffusers' safety checker (`sdjax.safety`; a folder or hub id, None: off) and what becomes
  # of an image it flags: "black" (written black, as diffusers returns it) or "keep"; either
  # way its record says `nsfw`.
  safety_checker: str | None = None
  nsfw_action: str = "black"


@dataclasses.dataclass(frozen=True)
class RunSummary:
  images: int  # made by this process
  skipped: int  # already finished before it started (whole run)
  seconds: float  # generating, compile excluded
  compile_seconds: float
  interrupted: bool = False  # stopped early (here, or on another process of the run)
  stop_signal: int | None = None  # the signal that stopped this process, if one did
  merged: bool = False  # manifest.jsonl / index.html / grid.png written: the run is complete

  @property
  def images_per_second(self) -> float:
    return self.images / self.seconds if self.seconds > 0 else 0.0


def make_plan(cfg: RunConfig) -> Plan:
  return Plan(cfg.prompts, cfg.prompts_file, num_images_per_prompt=cfg.num_images_per_prompt,
              seed=cfg.seed, negative_prompt=cfg.negative_prompt, shard_size=cfg.shard_size,
              comments=cfg.prompt_syntax == "a1111", dynamic=_dynamic(cfg),
              styles=_styles(cfg), noise_batch=cfg.noise_batch)


def _styles(cfg: RunConfig):
  """The run's A1111 styles (`prompts.Styles`), or None without --styles_file."""
  if cfg.styles_file is None:
    if cfg.styles:
      raise RunError("--style names a style of a styles file: give --styles_file")
    return None
  from sdjax import prompts  # noqa: PLC0415

  try:
    return prompts.read_styles(cfg.styles_file, cfg.styles)
  except ValueError as e:
    raise RunError(f"--styles_file: {e}") from None


def _dynamic(cfg: RunConfig) -> dynamic_prompts.DynamicPrompts | None:
  """The run's dynamic prompts, or None (off)."""
  if cfg.dynamic_prompts == "off":
    return None
  try:
    return dynamic_prompts.DynamicPrompts(cfg.dynamic_prompts, cfg.wildcards_dir,
                                          cfg.max_generations)
  except dynamic_prompts.TemplateError as e:
    raise RunError(str(e)) from None


def parse_path_arg(spec: str, convert, default, flag: str = "--lora", value: str = "scale"):
  """`path[:value]` -> (path, value); a ':' followed by a path (`C:/x`) is part of the path."""
  head, sep, tail = spec.rpartition(":")
  if not sep or not head or "/" in tail or "\\" in tail:
    return spec, default
  try:
    return head, convert(tail)
  except ValueError:
    raise RunError(f"{flag} {spec}: the {value} after ':' must be a {convert.__name__}") from None


def embeddings_in_dir(folder: str) -> tuple[tuple[str, None], ...]:
  """Every textual-inversion file in `folder` (A1111's embeddings folder), trigger = file stem."""
  if not os.path.isdir(folder):
    raise RunError(f"--embeddings_dir {folder} is not a folder")
  names = sorted(n for n in os.listdir(folder)
                 if n.lower().endswith((".pt", ".safetensors", ".bin")) and not n.startswith("."))
  return tuple((os.path.join(folder, n), None) for n in names)


# -- validation ------------------------------------------------------------------------------------
def _check_finite(cfg: RunConfig) -> None:
  """Every number a flag gives is finite (a NaN scale would run, then fail to be recorded)."""

  def numbers(value):
    if isinstance(value, tuple):
      return [x for item in value for x in numbers(item)]
    return [value] if isinstance(value, float) else []

  flag_names = {"loras": "lora"}
  for field in dataclasses.fields(cfg):
    value = getattr(cfg, field.name)
    if field.name == "micro":  # its own flags
      for name, part in dataclasses.asdict(value).items():
        if not all(math.isfinite(x) for x in numbers(part)):
          raise RunError(f"--{name} must be finite, got {part}")
    elif not all(math.isfinite(x) for x in numbers(value)):
      raise RunError(f"--{flag_names.get(field.name, field.name)} must be finite, got {value}")


def validate(cfg: RunConfig) -> None:
  """Checks what needs no model, so that bad input fails before anything slow."""
  if not cfg.prompts and not cfg.prompts_file:
    raise RunError("no prompts: give --prompt or --prompts_file")
  _check_finite(cfg)
  if cfg.steps is not None and cfg.steps < 1:  # None: the model's default
    raise RunError(f"--steps must be at least 1, got {cfg.steps}")
  for name in ("batch_size", "num_images_per_prompt", "shard_size",
               "images_per_folder", "num_shards", "writer_threads"):
    if getattr(cfg, name) < 1:
      raise RunError(f"--{name} must be at least 1, got {getattr(cfg, name)}")
  if cfg.cpu_devices is not None and cfg.cpu_devices < 0:
    raise RunError(f"--cpu_devices must be 0 (one per core) or more, got {cfg.cpu_devices}")
  if not 0 <= cfg.shard_index < cfg.num_shards:
    raise RunError(f"--shard_index must be in [0, --num_shards={cfg.num_shards}), "
                   f"got {cfg.shard_index}")
  if cfg.overwrite and cfg.num_shards > 1:
    raise RunError("--overwrite would delete the other jobs' shards: clear --output_dir "
                   "before starting the jobs instead")
  if cfg.output_format not in sinks.FORMATS:
    raise RunError(f"--output_format must be one of {', '.join(sinks.FORMATS)}, "
                   f"got {cfg.output_format!r}")
  if cfg.image_format not in outputs.IMAGE_FORMATS:
    raise RunError(f"--image_format must be one of {', '.join(outputs.IMAGE_FORMATS)}, "
                   f"got {cfg.image_format!r}")
  if cfg.pixel_levels not in outputs.PIXEL_LEVELS:
    raise RunError(f"--pixel_levels must be one of {', '.join(outputs.PIXEL_LEVELS)}, "
                   f"got {cfg.pixel_levels!r}")
  if not 1 <= cfg.image_quality <= 100:
    raise RunError(f"--image_quality must be in [1, 100], got {cfg.image_quality}")
  for name in ("height", "width"):
    if getattr(cfg, name) is not None:
      check_size(getattr(cfg, name), f"--{name}")
  from sdjax import schedulers  # noqa: PLC0415

  if not cfg.eta >= 0:
    raise RunError(f"--eta must be >= 0, got {cfg.eta}")
  if cfg.rng not in sampling.RNGS:
    raise RunError(f"--rng must be one of {', '.join(sampling.RNGS)}, got {cfg.rng!r}")
  if not 0.0 <= cfg.subseed_strength <= 1.0:
    raise RunError(f"--subseed_strength must be in [0, 1], got {cfg.subseed_strength}")
  if cfg.subseed_strength and cfg.subseed is None:
    raise RunError("--subseed_strength moves each image's noise towards its variation seed's: "
                   "give --subseed")
  if cfg.subseed is not None and not 0 <= cfg.subseed < 2**32:
    raise RunError(f"--subseed must be in [0, 2**32), got {cfg.subseed}")
  if not 0 <= cfg.ensd < 2**32:
    raise RunError(f"--ensd must be in [0, 2**32), got {cfg.ensd}")
  if not 0 <= cfg.seed_high < 2**32:
    raise RunError(f"--seed_high must be in [0, 2**32), got {cfg.seed_high}")
  if cfg.step_rng is not None and cfg.step_rng not in sampling.RNGS[1:]:
    raise RunError(f"--step_rng must be one of {', '.join(sampling.RNGS[1:])}, got "
                   f"{cfg.step_rng!r}")
  if cfg.grow_mask_by is not None and cfg.inpaint_blend != "comfyui":
    raise RunError("--grow_mask_by is ComfyUI's VAEEncodeForInpaint: give --inpaint_blend "
                   "comfyui too")
  try:  # (its range: the blend is checked above, in the flags' words)
    sampling.check_grow_mask_by(cfg.grow_mask_by, "comfyui")
  except ValueError as e:
    raise RunError(f"--{e}") from None
  if cfg.soft_inpainting is not None:
    try:
      masks.soft_inpainting(cfg.soft_inpainting)
    except ValueError as e:
      raise RunError(f"--soft_inpainting: {e}") from None
    if cfg.inpaint_blend != "a1111":
      raise RunError("--soft_inpainting is A1111's inpainting: give --inpaint_blend a1111 too")
    if cfg.cfg_parallel or cfg.refiner is not None:
      raise RunError("--soft_inpainting is not made with --cfg_parallel or --refiner")
  if cfg.differential_diffusion is not None:
    if cfg.inpaint_blend != "comfyui":
      raise RunError("--differential_diffusion is ComfyUI's DifferentialDiffusion: give "
                     "--inpaint_blend comfyui too")
    try:
      sampling.check_differential(cfg.differential_diffusion, "comfyui")
    except ValueError as e:
      raise RunError(f"--{e}") from None
  if cfg.comfyui_composite:
    if cfg.inpaint_blend != "comfyui":
      raise RunError("--comfyui_composite is ComfyUI's ImageCompositeMasked: give "
                     "--inpaint_blend comfyui too")
    if cfg.inpaint_full_res:
      raise RunError("--comfyui_composite pastes the whole picture back: not with "
                     "--inpaint_full_res")
  if cfg.noise_batch != 1 and cfg.subseed_strength:
    raise RunError("--noise_batch and --subseed_strength (A1111's variation seeds) do not go "
                   "together")
  try:
    sampling.check_noise_batch(cfg.noise_batch, cfg.rng, cfg.brownian, _seed_resize(cfg))
  except ValueError as e:
    raise RunError(f"--{e}") from None
  try:
    sampling.check_brownian(cfg.brownian, *(
        (cfg.scheduler, cfg.hires_scheduler) if cfg.scheduler is not None else ()))
  except ValueError as e:
    raise RunError(f"--brownian: {e}") from None
  try:
    _cfg_skip(cfg).check()
  except ValueError as e:
    raise RunError(f"--{e}") from None
  if (cfg.pad_cond_uncond or cfg.pad_cond_uncond_v0) and cfg.prompt_syntax != "a1111":
    raise RunError("--pad_cond_uncond pads A1111-syntax prompts of different lengths: add "
                   "--prompt_syntax a1111")
  if cfg.old_prompt_editing_timelines and cfg.prompt_syntax != "a1111":
    raise RunError("--old_prompt_editing_timelines counts A1111 prompt editing's steps: add "
                   "--prompt_syntax a1111")
  if not 0.0 < cfg.strength <= 1.0:
    raise RunError(f"--strength must be in (0, 1], got {cfg.strength}")
  for name in ("noise_multiplier", "extra_noise", "image_guidance_scale"):
    value = getattr(cfg, name)
    if value is not None and not 0.0 <= value < math.inf:
      raise RunError(f"--{name} must be a number >= 0, got {value}")
  if cfg.resize_mode not in outputs.RESIZE_MODES:
    raise RunError(f"--resize_mode must be one of {', '.join(outputs.RESIZE_MODES)}, "
                   f"got {cfg.resize_mode!r}")
  if not cfg.mask_blur >= 0 or cfg.inpaint_full_res_padding < 0:
    raise RunError(f"--mask_blur and --inpaint_full_res_padding must be >= 0, got "
                   f"{cfg.mask_blur} and {cfg.inpaint_full_res_padding}")
  if not cfg.controlnet and (cfg.control_image or cfg.controlnet_config or cfg.control_type
                             or cfg.controlnet_guess_mode or _control_modes(cfg)):
    raise RunError("--control_image, --controlnet_config, --control_type, "
                   "--controlnet_guess_mode and --control_mode are for a ControlNet: give "
                   "--controlnet too")
  if cfg.controlnet:
    nets = len(cfg.controlnet)
    for name in ("control_image", "controlnet_config", "control_type"):
      if getattr(cfg, name) and len(getattr(cfg, name)) != nets:
        raise RunError(f"--{name}: give one per --controlnet ({nets}), got "
                       f"{len(getattr(cfg, name))}")
    for name in ("controlnet_scale", "control_guidance_start", "control_guidance_end",
                 "control_mode"):
      if len(getattr(cfg, name)) not in (1, nets):
        raise RunError(f"--{name}: give one, or one per --controlnet ({nets}), got "
                       f"{len(getattr(cfg, name))}")
    for start, end in zip(*_per_controlnet(cfg)[1:], strict=True):
      if not 0.0 <= start < end <= 1.0:
        raise RunError(f"--control_guidance_start and --control_guidance_end must satisfy "
                       f"0 <= start < end <= 1, got {start} and {end}")
    for scale in cfg.controlnet_scale:
      if not math.isfinite(scale):
        raise RunError(f"--controlnet_scale must be a number, got {scale}")
  if not cfg.ip_adapter and (cfg.ip_adapter_image or cfg.ip_adapter_encoder
                             or cfg.ip_adapter_mask):
    raise RunError("--ip_adapter_image, --ip_adapter_encoder and --ip_adapter_mask are for an "
                   "IP-Adapter: give --ip_adapter too")
  if cfg.ip_adapter:
    adapters = len(cfg.ip_adapter)
    for name in ("ip_adapter_image", "ip_adapter_encoder", "ip_adapter_mask"):
      if getattr(cfg, name) and len(getattr(cfg, name)) != adapters:
        raise RunError(f"--{name}: give one per --ip_adapter ({adapters}), got "
                       f"{len(getattr(cfg, name))}")
    if len(cfg.ip_adapter_scale) not in (1, adapters):
      raise RunError(f"--ip_adapter_scale: give one, or one per --ip_adapter ({adapters}), got "
                     f"{len(cfg.ip_adapter_scale)}")
    _ip_scales(cfg)  # numbers or JSON objects
  if cfg.inpainting_fill not in masks.MASKED_CONTENT:
    raise RunError(f"--inpainting_fill must be one of "
                   f"{', '.join(m.replace(' ', '_') for m in masks.MASKED_CONTENT)}, got "
                   f"{cfg.inpainting_fill!r}")
  if cfg.eta and cfg.scheduler is not None and cfg.scheduler not in schedulers.ETA_SCHEDULERS:
    raise RunError(f"eta is an option of {', '.join(schedulers.ETA_SCHEDULERS)} only, not of "
                   f"scheduler {cfg.scheduler!r}")
  if not 0 <= cfg.seed < 2**32:
    raise RunError(f"--seed must be in [0, 2**32), got {cfg.seed}")
  if cfg.dynamic_prompts not in dynamic_prompts.MODES:
    raise RunError(f"--dynamic_prompts must be one of {', '.join(dynamic_prompts.MODES)}, "
                   f"got {cfg.dynamic_prompts!r}")
  if cfg.dynamic_prompts == "off" and (cfg.wildcards_dir is not None or cfg.max_generations):
    raise RunError("--wildcards_dir and --max_generations are options of --dynamic_prompts "
                   "random or combinatorial")
  _dynamic(cfg)  # the library installed, the folder there
  if cfg.prompt_syntax not in sampling.PROMPT_SYNTAXES:
    raise RunError(f"--prompt_syntax must be one of {', '.join(sampling.PROMPT_SYNTAXES)}, "
                   f"got {cfg.prompt_syntax!r}")
  if cfg.lora_dir is not None:
    if cfg.prompt_syntax != "a1111":
      raise RunError("--lora_dir applies <lora:...> tags, which need --prompt_syntax a1111")
    if not os.path.isdir(cfg.lora_dir):
      raise RunError(f"--lora_dir {cfg.lora_dir} is not a folder")
  from sdjax import prompts  # noqa: PLC0415

  if cfg.emphasis not in prompts.EMPHASIS_MODES:
    raise RunError(f"--emphasis must be one of {', '.join(prompts.EMPHASIS_MODES)}, "
                   f"got {cfg.emphasis!r}")
  if cfg.emphasis != "Original" and cfg.prompt_syntax != "a1111":
    raise RunError("--emphasis is a mode of --prompt_syntax a1111")
  if cfg.prompt_syntax == "a1111":  # the inline prompts fail here; a file's when reached
    lora_set = _LoraSets(cfg.lora_dir) if cfg.lora_dir is not None else None
    for line in cfg.prompts:
      for text in (line.prompt, line.negative_prompt or cfg.negative_prompt,
                   line.hires_prompt or cfg.hires_prompt,
                   line.hires_negative_prompt or cfg.hires_negative_prompt,
                   line.prompt_2 or cfg.prompt_2,
                   line.negative_prompt_2 or cfg.negative_prompt_2):
        text = sampling.strip_extra_networks(text, lora_set is not None)
        if cfg.emphasis != "None":  # "None" reads brackets as text: nothing to get wrong
          prompts.parse_prompt_attention(text)
        if lora_set is not None:
          lora_set(text)  # every tag names a file in --lora_dir
  if cfg.refiner is not None and not (0.0 < cfg.refiner_start < 1.0 or (
      sampling.is_step_count(cfg.refiner_start) and cfg.refiner_start >= 1)):
    raise RunError(f"--refiner_start must be a fraction in (0, 1) or a whole number of steps, "
                   f"got {cfg.refiner_start}")
  if min(cfg.hires_scale, cfg.hires_steps, cfg.hires_resize_width,
         cfg.hires_resize_height) < 0:
    raise RunError("--hires_scale, --hires_steps and --hires_resize_* must be >= 0 (0: off / "
                   "--steps / from the aspect)")
  if cfg.hires_refiner != RunConfig.hires_refiner and (cfg.refiner is None or _hires(cfg) is None):
    raise RunError(f"--hires_refiner {cfg.hires_refiner!r} says which pass of the hires fix "
                   "--refiner finishes: give --refiner and --hires_scale (or --hires_resize_*) too")
  if _hires(cfg) is not None:
    try:
      _hires(cfg).check()
    except ValueError as e:
      raise RunError(f"--hires_*: {e}") from None
    if cfg.refiner is not None and cfg.hires_model is not None:
      raise RunError("--refiner with the hires fix takes its passes over from the model: not with "
                     "--hires_model")
    if cfg.refiner is not None and cfg.hires_refiner != "first pass":
      try:
        sampling.check_hires_handoff(cfg.refiner_start)
      except ValueError as e:
        raise RunError(f"--{e}") from None
  elif cfg.hires_guidance_scale:
    raise RunError("--hires_guidance_scale is the hires pass's: give --hires_scale or "
                   "--hires_resize_* too")
  elif cfg.hires_schedule_type is not None:
    raise RunError("--hires_schedule_type is the hires pass's: give --hires_scale or "
                   "--hires_resize_* too")
  elif cfg.hires_prompt or cfg.hires_negative_prompt:
    raise RunError("--hires_prompt and --hires_negative_prompt are the hires pass's: give "
                   "--hires_scale or --hires_resize_* too")
  elif cfg.hires_model is not None:
    raise RunError("--hires_model is the hires pass's model: give --hires_scale or "
                   "--hires_resize_* too")
  try:
    sampling.freeu_factors(cfg.freeu)
  except ValueError as e:
    raise RunError(f"--freeu: {e}") from None
  try:
    sampling.check_freeu_form(cfg.freeu_form)
  except ValueError as e:
    raise RunError(f"--{e}") from None
  if cfg.freeu_form != "diffusers" and cfg.freeu is None:
    raise RunError("--freeu_form is FreeU's: give --freeu too")
  try:
    sampling.tiling_axes(cfg.tiling)
  except ValueError as e:
    raise RunError(f"--tiling: {e}") from None
  try:
    token_merging.check_ratio("--token_merging_ratio", cfg.token_merging_ratio)
    if cfg.hires_token_merging_ratio is not None:
      token_merging.check_ratio("--hires_token_merging_ratio", cfg.hires_token_merging_ratio)
  except ValueError as e:
    raise RunError(str(e)) from None
  if not (math.isfinite(cfg.guidance_rescale) and cfg.guidance_rescale >= 0):
    raise RunError(f"--guidance_rescale must be a number >= 0, got {cfg.guidance_rescale}")
  if cfg.scheduler is not None and cfg.scheduler not in schedulers.SCHEDULERS:
    raise RunError(f"unknown scheduler {cfg.scheduler!r}; pick one of "
                   f"{', '.join(schedulers.SCHEDULERS)}")
  if cfg.nsfw_action not in safety.NSFW_ACTIONS:
    raise RunError(f"--nsfw_action must be one of {', '.join(safety.NSFW_ACTIONS)}, got "
                   f"{cfg.nsfw_action!r}")
  if cfg.nsfw_action != RunConfig.nsfw_action and not cfg.safety_checker:
    raise RunError("--nsfw_action is for a run with --safety_checker")


def _settings(cfg: RunConfig, pipe, height: int, width: int, scheduler: str,
              plan: Plan) -> dict[str, Any]:
  """What decides the pixels and the layout; a location's images must all share them."""
  settings = {"model": pipe.name, "steps": cfg.steps, "guidance_scale": cfg.guidance_scale,
              "scheduler": scheduler, "height": height, "width": width, "dtype": cfg.dtype,
              "images": plan.total, "jobs_sha256": plan.digest,
              "output_format": cfg.output_format, "shard_size": cfg.shard_size}
  if cfg.output_format == "png":
    settings["images_per_folder"] = cfg.images_per_folder
  if cfg.scheduler_options:  # absent without: older folders still match
    settings["scheduler_options"] = dict(cfg.scheduler_options)
  if cfg.controlnet:
    settings["controlnet"] = _controlnet_record(cfg)
  if cfg.ip_adapter:
    settings["ip_adapter"] = _ip_adapter_record(cfg)
  settings.update(_image_format(cfg).settings())
  if cfg.eta:  # absent when 0: older folders still match
    settings["eta"] = cfg.eta
  if cfg.rng != RunConfig.rng:
    settings["rng"] = cfg.rng
  if cfg.brownian is not None:
    settings["brownian"] = cfg.brownian
  if cfg.step_rng is not None:
    settings["step_rng"] = cfg.step_rng
  if cfg.seed_high:
    settings["seed_high"] = cfg.seed_high
  if cfg.noise_batch != 1:
    settings["noise_batch"] = cfg.noise_batch
  if cfg.subseed_strength:
    settings.update(subseed=cfg.subseed, subseed_strength=cfg.subseed_strength)
  if cfg.ensd:
    settings["ensd"] = cfg.ensd
  settings.update(_cfg_options(cfg))  # absent when off: older folders still match
  if _seed_resize(cfg):
    settings["seed_resize_from"] = list(_seed_resize(cfg))
  if cfg.prompt_syntax != "plain":
    settings["prompt_syntax"] = cfg.prompt_syntax
  if cfg.lora_dir is not None:
    settings["lora_dir"] = cfg.lora_dir
  if cfg.emphasis != "Original":  # absent for the default: older folders still match
    settings["emphasis"] = cfg.emphasis
  if cfg.strength != RunConfig.strength:  # img2img lines' pixels depend on it
    settings["strength"] = cfg.strength
  if cfg.noise_multiplier != 1.0:
    settings["noise_multiplier"] = cfg.noise_multiplier
  if cfg.extra_noise:
    settings["extra_noise"] = cfg.extra_noise
  if cfg.image_encode != "sample":  # absent for the default: older folders still match
    settings["image_encode"] = cfg.image_encode
  if cfg.image_guidance_scale is not None:
    settings["image_guidance_scale"] = cfg.image_guidance_scale
  if cfg.noise_level is not None:
    settings["noise_level"] = cfg.noise_level
  if cfg.resize_mode != RunConfig.resize_mode:
    settings["resize_mode"] = cfg.resize_mode
  if _mask_options(cfg) != _mask_options(RunConfig()):  # inpainting lines' pixels depend on it
    settings["inpainting"] = dataclasses.asdict(_mask_options(cfg))
    if cfg.inpainting_fill == "original":  # absent for the default: older folders still match
      del settings["inpainting"]["masked_content"]
    if cfg.soft_inpainting is None:  # (the same)
      del settings["inpainting"]["soft"]
    if not cfg.comfyui_composite:  # (the same)
      del settings["inpainting"]["composite"]
  if cfg.inpainting_mask_weight != 1.0:  # absent for the default: older folders still match
    settings["inpainting_mask_weight"] = cfg.inpainting_mask_weight
  if cfg.inpaint_blend != "diffusers":  # absent for the default: older folders still match
    settings["inpaint_blend"] = cfg.inpaint_blend
  if cfg.grow_mask_by is not None:
    settings["grow_mask_by"] = cfg.grow_mask_by
  if cfg.differential_diffusion is not None:
    settings["differential_diffusion"] = cfg.differential_diffusion
  if cfg.loras:
    settings["loras"] = [list(x) for x in cfg.loras]
  if cfg.cfg_parallel:  # its own program: pixels differ by rounding
    settings["cfg_parallel"] = True
  if cfg.embeddings:
    settings["embeddings"] = [list(x) for x in cfg.embeddings]
  if plan.dynamic is not None:
    settings["dynamic_prompts"] = plan.dynamic.settings()
  if plan.styles is not None:  # absent without: older folders still match
    settings["styles"] = {"names": list(plan.styles.default),
                          "styles_sha256": plan.styles.sha256}
  axes = sampling.tiling_axes(cfg.tiling)
  if axes:  # absent when off: older folders still match
    settings["tiling"] = True if axes == "xy" else axes
  if cfg.guidance_rescale:  # absent when off: older folders still match
    settings["guidance_rescale"] = cfg.guidance_rescale
  if cfg.guidance_rescale_form != "diffusers":  # (the same)
    settings["guidance_rescale_form"] = cfg.guidance_rescale_form
  if cfg.clip_skip != 1:  # absent when off: older folders still match
    settings["clip_skip"] = cfg.clip_skip
  if cfg.freeu is not None:  # absent when off: older folders still match
    settings["freeu"] = list(cfg.freeu)
  if cfg.freeu_form != "diffusers":  # (the same)
    settings["freeu_form"] = cfg.freeu_form
  if cfg.token_merging_ratio:  # absent when off: older folders still match
    settings["token_merging_ratio"] = cfg.token_merging_ratio
  if cfg.pixel_levels != "round":  # absent for the default: older folders still match
    settings["pixel_levels"] = cfg.pixel_levels
  if cfg.pag_scale:  # absent when off: older folders still match
    settings["pag"] = {"scale": cfg.pag_scale, "adaptive_scale": cfg.pag_adaptive_scale,
                       "applied_layers": list(cfg.pag_applied_layers)}
  if cfg.safety_checker:  # absent when off: older folders still match
    settings["safety_checker"] = {"source": cfg.safety_checker, "nsfw_action": cfg.nsfw_action}
  for key in ("prompt_2", "negative_prompt_2"):  # only when set: older folders still match
    if getattr(cfg, key):
      settings[key] = getattr(cfg, key)
  return {**settings, **_hires_record(cfg), **_sdxl_record(cfg, pipe)}


def _per_controlnet(cfg: RunConfig) -> tuple[list[float], ...]:
  """(scales, starts, ends), one of each per ControlNet (generate()'s rule)."""
  def one_or_each(values):
    return values[0] if len(values) == 1 else values

  return tuple(sampling.per_controlnet(one_or_each(getattr(cfg, name)), len(cfg.controlnet), name)
               for name in ("controlnet_scale", "control_guidance_start",
                            "control_guidance_end"))


def _control_modes(cfg: RunConfig) -> tuple[str, ...]:
  """The ControlNets' A1111 Control Modes (CONTROL_MODES keys), () when all are balanced."""
  try:
    modes = tuple(conditioning.control_mode(m) for m in cfg.control_mode)
  except ValueError as e:
    raise RunError(f"--control_mode: {e}") from None
  if all(m == "balanced" for m in modes):
    return ()
  return modes if len(modes) > 1 else modes * max(len(cfg.controlnet), 1)


def _pag(cfg: RunConfig, pipe) -> sampling.Pag | None:
  """The run's perturbed-attention guidance for `pipe`'s UNet (None: off)."""
  try:
    return sampling.perturbed_guidance(
        pipe, cfg.pag_scale, cfg.pag_adaptive_scale, cfg.pag_applied_layers,
        guess_mode=pipe.controlnet is not None and sampling.uses_guess_mode(
            pipe.controlnet, cfg.controlnet_guess_mode), cfg_parallel=cfg.cfg_parallel)
  except ValueError as e:
    raise RunError(f"--pag_scale: {e}") from None


def _controlnet_record(cfg: RunConfig) -> dict[str, Any]:
  """The ControlNets' settings: one ControlNet's as single values, as before there could be
  several (older folders still match); several as lists."""
  scales, starts, ends = _per_controlnet(cfg)
  record = {"controlnet": list(cfg.controlnet), "controlnet_scale": list(scales),
            "control_guidance_start": list(starts), "control_guidance_end": list(ends)}
  if any(cfg.controlnet_config):  # absent without: older folders still match
    record["controlnet_config"] = list(cfg.controlnet_config)
  if any(cfg.control_type):  # absent without unions: older folders still match
    record["control_type"] = list(cfg.control_type)
  if len(cfg.controlnet) == 1:
    record = {k: v[0] for k, v in record.items()}
  if cfg.controlnet_guess_mode:  # absent without: older folders still match
    record["controlnet_guess_mode"] = True
  if _control_modes(cfg):  # absent when balanced: older folders still match
    modes = [conditioning.CONTROL_MODES[m] for m in _control_modes(cfg)]
    record["control_mode"] = modes[0] if len(cfg.controlnet) == 1 else modes
  return record


def _comfyui_files(cfg: RunConfig) -> bool:
  """Whether init and mask files are read as ComfyUI's LoadImage reads them (RGB, the alpha
  dropped; a mask from the transparent pixels: `masks.read_mask`), under its encode or blend
  (--image_encode mode, --inpaint_blend comfyui); else as A1111's img2img (an RGBA image
  `outputs.flatten`ed over white, an RGBA mask's alpha)."""
  return cfg.inpaint_blend == "comfyui" or cfg.image_encode == "mode"


def _mask_options(cfg: RunConfig) -> masks.MaskOptions:
  """The inpainting options: A1111's, its original pasted back over the result, save with
  ComfyUI's blend (ComfyUI saves the decoded image as it is)."""
  return masks.MaskOptions(cfg.mask_blur, cfg.inpaint_full_res_padding if cfg.inpaint_full_res
                           else None, overlay=cfg.inpaint_blend != "comfyui",
                           invert=cfg.inpainting_mask_invert, masked_content=cfg.inpainting_fill,
                           soft=masks.soft_inpainting(cfg.soft_inpainting),
                           composite=cfg.comfyui_composite)


def line_options(cfg: RunConfig, pipe, scheduler: str, schedule_type: str | None,
                 own: tuple[tuple[str, Any], ...] | None = None) -> dict[str, Any]:
  """The scheduler options of images under `scheduler` and a prompt line's `schedule_type` and
  scheduler options (`own`, frozen): the run's --scheduler_options (with --schedule_type,
  --sigmas, --timesteps), a line's type or own placement (sigmas, a spacing, ...) in place of
  whatever placed the noise levels, then the line's own options over the rest; without either,
  the run's schedule type is dropped for a line's scheduler that has no such type (it places its
  own noise levels, as in A1111); so are A1111's forms it has not (`sampling.a1111_form_for`)."""
  options = dict(cfg.scheduler_options)
  own = thaw_options(own)
  if schedule_type is None and not set(own) & set(sampling.PLACEMENT_OPTIONS):
    options = sampling.schedule_type_for(pipe, scheduler, options) or {}
  else:
    options = {k: v for k, v in options.items() if k not in sampling.PLACEMENT_OPTIONS}
    if schedule_type is not None:
      options.update(outputs.schedule_type_options(schedule_type))
  return dict(sorted((sampling.a1111_form_for(scheduler, {**options, **own}) or {}).items()))


def _check_clip_skip(clip_skip: int, pipe, what: str = "--clip_skip") -> None:
  """A1111's Clip skip: an integer from 1 to the text encoder's depth; SD1/SD2 only (A1111
  leaves SDXL's encoders at their penultimate layer whatever it says)."""
  if clip_skip == 1:
    return
  if pipe.is_sdxl:
    raise RunError(f"{what} is A1111's Clip skip for SD1/SD2 models; A1111 leaves SDXL's "
                   "text encoders at their penultimate layer (generate(clip_skip=) has "
                   "diffusers' SDXL clip skip)")
  try:
    if not isinstance(clip_skip, int) or clip_skip < 1:
      raise ValueError(f"got {clip_skip!r}")
    conditioning.check_clip_skip(pipe.networks, clip_skip - 1)
  except ValueError:
    layers = pipe.text_encoder.config.num_hidden_layers
    raise RunError(f"{what} must be an integer from 1 (the last layer) to {layers}, got "
                   f"{clip_skip!r}") from None


def _hires(cfg: RunConfig) -> sampling.Hires | None:
  """The run's hires fix: on with --hires_scale or --hires_resize_* (which then win)."""
  resize = (cfg.hires_resize_width, cfg.hires_resize_height)
  if not cfg.hires_scale and not any(resize):
    return None
  return sampling.Hires(cfg.hires_scale or 2.0, cfg.hires_steps or None, cfg.hires_strength,
                        _hires_upscaler(cfg), resize, cfg.hires_scheduler,
                        cfg.hires_guidance_scale or None, cfg.hires_schedule_type)


def _hires_upscaler(cfg: RunConfig) -> str | upscaling.Upscaler:
  """--hires_upscaler: one of sdjax's names, else a model upscaler's file, loaded (once)."""
  name = cfg.hires_upscaler
  if name in sampling.HIRES_UPSCALER_NAMES:
    return name
  path = _upscaler_file(name, cfg.upscaler_dir)
  if not os.path.isfile(path):  # gone since it was found (a process running several runs)
    _upscaler_file.cache_clear()
    path = _upscaler_file(name, cfg.upscaler_dir)
  try:
    return _load_upscaler(path, cfg.upscaler_tile, cfg.upscaler_tile_overlap,
                          os.stat(path).st_mtime_ns)
  except ValueError as e:
    raise RunError(f"--hires_upscaler: {e}") from None


@functools.lru_cache(maxsize=8)
def _upscaler_file(name: str, folder: str | None) -> str:
  """The file of --hires_upscaler `name` (looked up once: a run asks for it per batch)."""
  path = upscaling.find_upscaler_file(name, folder)
  if path is None:
    where = (f"in --upscaler_dir {folder}" if folder else
             "(give --upscaler_dir, the folder of your ESRGAN / Real-ESRGAN files)")
    raise RunError(f"--hires_upscaler {name!r} is neither one of sdjax's "
                   f"({', '.join(sampling.HIRES_UPSCALER_NAMES)}) nor an upscaler file {where}")
  return os.path.abspath(path)


@functools.lru_cache(maxsize=2)
def _load_upscaler(path: str, tile: int, overlap: int, stamp: int) -> upscaling.Upscaler:
  del stamp  # a rewritten file is read again
  return upscaling.load_upscaler(path, tile, overlap)


def _hires_upscaler_name(cfg: RunConfig) -> str:
  """The hires upscaler as A1111 names it in an image's parameters."""
  upscaler = _hires_upscaler(cfg)
  return upscaler.name if isinstance(upscaler, upscaling.Upscaler) else (
      sampling.HIRES_UPSCALER_NAMES[upscaler])


def _hires_record(cfg: RunConfig) -> dict[str, Any]:
  """The hires fix's settings (nothing without it: older folders still match)."""
  hires = _hires(cfg)
  if hires is None:
    return {}
  record = {"scale": hires.scale, "steps": hires.steps or cfg.steps,
            "strength": hires.strength, "upscaler": cfg.hires_upscaler}
  if isinstance(hires.upscaler, upscaling.Upscaler):  # only then: older folders still match
    record.update(upscaler_name=hires.upscaler.name, upscaler_tile=hires.upscaler.spec.tile,
                  upscaler_tile_overlap=hires.upscaler.spec.overlap)
  if any(hires.resize):  # only when set: older folders still match
    record.update(resize_width=hires.resize[0], resize_height=hires.resize[1])
    del record["scale"]
  if hires.scheduler is not None:
    record["scheduler"] = hires.scheduler
  if hires.guidance_scale is not None:  # only when set: older folders still match
    record["guidance_scale"] = hires.guidance_scale
  if hires.schedule_type is not None:
    record["schedule_type"] = hires.schedule_type
  for key in ("prompt", "negative_prompt", "model"):  # only when set: older folders match
    if getattr(cfg, f"hires_{key}"):
      record[key] = getattr(cfg, f"hires_{key}")
  if cfg.hires_token_merging_ratio is not None:  # only when set: older folders match
    record["token_merging_ratio"] = cfg.hires_token_merging_ratio
  return {"hires": record}


def _hires_merging(cfg: RunConfig) -> float:
  """The hires pass's token merging ratio: its own, else the first pass's (as A1111's)."""
  if cfg.hires_token_merging_ratio is None:
    return cfg.token_merging_ratio
  return cfg.hires_token_merging_ratio


def second_prompts(cfg: RunConfig, job: ImageJob) -> tuple[str | None, str | None]:
  """SDXL's second text encoder's (prompt, negative prompt) of an image: its line's, else the
  run's; None: the image's prompt / negative prompt, as diffusers' prompt_2 defaults."""
  return (job.prompt_2 or cfg.prompt_2 or None,
          job.negative_prompt_2 or cfg.negative_prompt_2 or None)


def _check_two_encoders(pipe) -> None:
  if not pipe.is_sdxl or pipe.text_encoder is None:
    raise RunError("prompt_2 and negative_prompt_2 are the prompts of SDXL's second text "
                   f"encoder: {pipe.name} has one text encoder")


def _second_encoder(prompts, negatives, seconds):
  """(negative prompts, prompts_2, negative_prompts_2) of `sampling.make_conditioning` for
  images whose `second_prompts` are `seconds` (None when no image has its own). An empty
  negative prompt with a negative_prompt_2 is the empty text, not SDXL base's zeros (which
  would drop the negative_prompt_2)."""
  prompts_2 = [s or p for (s, _), p in zip(seconds, prompts, strict=True)]
  negatives_2 = [s or n or "" for (_, s), n in zip(seconds, negatives, strict=True)]
  negatives = ["" if n is None and s is not None else n
               for (_, s), n in zip(seconds, negatives, strict=True)]
  return (negatives, None if all(s is None for s, _ in seconds) else prompts_2,
          None if all(s is None for _, s in seconds) else negatives_2)


def hires_prompts(cfg: RunConfig, job: ImageJob) -> tuple[str, str]:
  """The hires pass's (prompt, negative prompt) of an image: its line's, else the run's, else
  (empty, as A1111 reads an empty Hires prompt) the first pass's."""
  return (job.hires_prompt or cfg.hires_prompt or job.prompt,
          job.hires_negative_prompt or cfg.hires_negative_prompt or job.negative_prompt)


def _image_format(cfg: RunConfig) -> sinks.ImageFormat:
  return sinks.ImageFormat(cfg.image_format, cfg.image_quality, cfg.webp_lossless)


def _sdxl_record(cfg: RunConfig, pipe) -> dict[str, Any]:
  """SDXL's extra settings (none for SD1/SD2, whose records stay as they were)."""
  if not pipe.is_sdxl:
    return {}
  record = {"micro_conditioning": cfg.micro.to_dict()}
  if cfg.refiner is not None:
    record.update(refiner=cfg.refiner, refiner_start=cfg.refiner_start)
    if cfg.refiner_switch != RunConfig.refiner_switch:  # only when set: older folders match
      record["refiner_switch"] = cfg.refiner_switch
    if cfg.hires_refiner != RunConfig.hires_refiner:
      record["hires_refiner"] = cfg.hires_refiner
  return record


def _load_hires_model(cfg: RunConfig, pipe, controlnets=(), ip_adapters=()):
  """The --hires_model pipeline, with what the run adds to its model: the VAE, LoRAs and
  embeddings given, its ControlNets and IP-Adapters (loaded)."""
  if cfg.hires_model is None:
    return None
  try:
    hires = sdjax.load_pipeline(cfg.hires_model, cfg.dtype, vae=cfg.vae, loras=cfg.loras,
                                embeddings=cfg.embeddings)
    sampling.check_hires_model(pipe, hires)
    if controlnets:
      hires = hires.with_controlnet(controlnets)
    if ip_adapters:
      hires = hires.with_ip_adapter(ip_adapters, _ip_layer_scales(cfg))
  except ValueError as e:
    raise RunError(f"--hires_model {cfg.hires_model}: {e}") from None
  return hires


def _load_refiner(cfg: RunConfig, pipe):
  if cfg.refiner is None:
    return None
  if not pipe.is_sdxl:
    raise RunError("--refiner needs an SDXL base model")
  refiner = sdjax.load_pipeline(cfg.refiner, cfg.dtype)
  if not refiner.is_sdxl:
    raise RunError(f"--refiner {cfg.refiner} is not an SDXL pipeline")
  return refiner


# `Inpaint blend` in sdjax's PNGs (none: diffusers')
_INPAINT_BLEND_NAMES = {"a1111": "A1111", "comfyui": "ComfyUI"}


def _check_settings(store: sinks.Store, settings: dict[str, Any], overwrite: bool) -> None:
  previous = sinks.read_json(store, sinks.RUN_JSON)
  if previous == settings:
    return
  if previous is not None and not overwrite:
    # (a setting only one of the runs has counts: absent is its default)
    changed = sorted(k for k in {*settings, *previous} if previous.get(k) != settings.get(k))
    # (a run stopped before its first image, e.g. by bad input, leaves its settings alone)
    made = ("; use another --output_dir, or --overwrite to replace it" if sinks.holds_outputs(
        store) else ", which made no image yet: --overwrite replaces them (or use another "
        "--output_dir)")
    raise RunError(f"{store.url} holds a run with other settings ({', '.join(changed)} "
                   f"differ){made}")
  if previous is None and not overwrite and sinks.holds_other_outputs(store):
    raise RunError(f"{store.url} is not empty and was not made by this run; use another "
                   "--output_dir, or --overwrite to replace it")
  parallel.barrier("settings read")  # nobody clears what another process is still reading
  if jax.process_index() == 0:
    if overwrite:
      sinks.clear(store)
    store.write(sinks.RUN_JSON, outputs.json_bytes(settings))


# -- the run ---------------------------------------------------------------------------------------
class _StopFlag:
  """First Ctrl-C or SIGTERM (a pod's eviction, a preempted VM, a batch scheduler's time limit):
  finish writing what was dispatched, then stop; `signum` says which came. Second: stop at
  once."""

  SIGNALS = (signal.SIGINT, signal.SIGTERM)

  def __init__(self):
    self.requested = False
    self.signum: int | None = None
    self._previous = {}

  def __enter__(self):
    def handler(signum, frame):
      if self.requested:
        raise KeyboardInterrupt
      self.requested, self.signum = True, signum
      logging.warning("interrupted (%s): stopping after the current batch (again to abort)",
                      signal.Signals(signum).name)

    try:
      for signum in self.SIGNALS:
        self._previous[signum] = signal.signal(signum, handler)
    except ValueError:  # not the main thread: leave signals alone
      self._previous = {}
    return self

  def __exit__(self, *exc):
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)


def enable_compilation_cache(path: str | None) -> None:
  """JAX's persistent compilation cache, so a second run of a shape starts without compiling."""
  if path is None:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    path = os.path.join(base, "sdjax", "jax")
  if not path:
    return
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def owns(cfg: RunConfig, shard: int) -> bool:
  """Whether this process makes `shard`: job i of N takes the shards s = i (mod N); within a
  job, its processes take turns over them."""
  if shard % cfg.num_shards != cfg.shard_index:
    return False
  return (shard // cfg.num_shards) % jax.process_count() == jax.process_index()


@dataclasses.dataclass
class _Work:
  """This process's share of what is not finished yet."""

  shards: list[int]  # in order
  kept: dict[int, set[int]]  # shard -> indices an interrupted run already wrote
  images: int

  def remaining(self, plan: Plan) -> dict[int, int]:
    return {s: len(plan.shard_range(s)) - len(self.kept.get(s, ())) for s in self.shards}

  def jobs(self, plan: Plan) -> Iterator[tuple[int, ImageJob]]:
    for shard in self.shards:
      kept = self.kept.get(shard, set())
      for job in plan.jobs(shard):
        if job.index not in kept:
          yield shard, job


def _find_work(cfg: RunConfig, plan: Plan, sink: sinks.Sink) -> tuple[_Work, int]:
  """(this process's work, images of the whole run finished before)."""
  finished = sinks.finished_shards(sink.store) & set(range(plan.num_shards))
  partial = sinks.partial_shards(sink.store)
  shards = [s for s in range(plan.num_shards) if s not in finished and owns(cfg, s)]
  kept = {s: sink.resume(s) for s in shards if s in partial}
  images = sum(len(plan.shard_range(s)) - len(kept.get(s, ())) for s in shards)
  done_before = sum(len(plan.shard_range(s)) for s in finished)
  return _Work(shards, kept, images), done_before + sum(map(len, kept.values()))


def generate_run(cfg: RunConfig) -> RunSummary:
  """Generates every image of `cfg` that is not finished yet into `cfg.output_dir`."""
  validate(cfg)
  parallel.initialize(cfg.coordinator_address, cfg.num_processes, cfg.process_id,
                      cfg.cpu_devices)
  enable_compilation_cache(cfg.compilation_cache)
  store = sinks.Store(cfg.output_dir)
  store.check()
  plan = make_plan(cfg)
  checker = None
  if cfg.safety_checker:  # first: a bad one fails before the model loads
    try:
      checker = safety.load_safety_checker(cfg.safety_checker)
    except safety.SafetyCheckerError as e:
      raise RunError(f"--safety_checker: {e}") from None
  pipe = sdjax.load_pipeline(cfg.model, cfg.dtype, config=cfg.model_config, vae=cfg.vae,
                             prediction_type=cfg.prediction_type, loras=cfg.loras,
                             embeddings=cfg.embeddings)
  controlnets, adapters = [], []
  if cfg.controlnet:
    try:
      none = ("",) * len(cfg.controlnet)
      controlnets = [
          sdjax.load_controlnet(path, cfg.dtype, config=config or None, base=pipe,
                                control_type=kind or None)
          for path, config, kind in zip(cfg.controlnet, cfg.controlnet_config or none,
                                        cfg.control_type or none, strict=True)]
      pipe = pipe.with_controlnet(controlnets)
    except ValueError as e:
      raise RunError(f"--controlnet: {e}") from None
  if cfg.ip_adapter:
    try:
      adapters = [sdjax.load_ip_adapter(path, encoder or None, cfg.dtype)
                  for path, encoder in zip(cfg.ip_adapter, cfg.ip_adapter_encoder
                                           or ("",) * len(cfg.ip_adapter), strict=True)]
      pipe = pipe.with_ip_adapter(adapters, _ip_layer_scales(cfg))
    except ValueError as e:  # a misfit, or per-layer scales naming no layer: the text says
      raise RunError(f"--ip_adapter: {e}") from None
  if pipe.is_sdxl and cfg.sdxl_ignores_clip_skip:
    cfg = dataclasses.replace(cfg, clip_skip=1)
  if cfg.prompt_2 or cfg.negative_prompt_2:  # a line's: when its batch is made
    _check_two_encoders(pipe)
  try:
    sampling.edit_scales(pipe, cfg.image_guidance_scale, 1)
  except ValueError as e:
    raise RunError(f"--{e}") from None
  try:
    sampling.low_res_inputs(pipe, cfg.noise_level, 1)
  except ValueError as e:
    raise RunError(f"--{e}") from None
  refiner, hires_model = _load_refiner(cfg, pipe), _load_hires_model(cfg, pipe, controlnets,
                                                                     adapters)
  for model in (pipe, hires_model):  # what it does not combine with, layers it cannot find
    if model is not None:
      _pag(cfg, model)
  steps, guidance, scheduler = sampling.resolve_settings(pipe, cfg.steps, cfg.guidance_scale,
                                                         cfg.scheduler)
  cfg = dataclasses.replace(cfg, steps=steps, guidance_scale=guidance, scheduler=scheduler)
  if cfg.cfg_parallel and not sampling.uses_guidance(pipe, guidance):
    why = (f"guidance_scale {guidance:g} (<= 1)" if guidance <= 1.0 else
           "an LCM-distilled UNet (time_cond_proj_dim: the guidance scale is an input)")
    raise RunError(f"--cfg_parallel splits classifier-free guidance, which {why} does not use")
  height = cfg.height or pipe.native_size
  width = cfg.width or pipe.native_size
  sampling.check_size(pipe, height, width)
  scheduler = cfg.scheduler or sampling.schedulers.default_scheduler_name(pipe.scheduler_config)
  _check_clip_skip(cfg.clip_skip, pipe)
  if cfg.scheduler_options:
    options = dict(cfg.scheduler_options)
    flag = next((f"--{key}" for key in ("sigmas", "timesteps", "schedule_type") if key in options),
                "--scheduler_options")
    try:  # at the run's steps: a list of sigmas must have one more than that
      sampling.schedulers.get_scheduler(
        scheduler, pipe.scheduler_config, options=sampling.model_schedule(pipe, options)
      ).set_timesteps(cfg.steps, sample_shape=(1, 1, 1, 1))
    except ValueError as e:
      raise RunError(f"{flag}: {e}") from None

  if jax.process_index() == 0:  # the prompts given on the command line
    sampling.warn_unknown_words(pipe, [line.prompt for line in cfg.prompts])
  _check_settings(store, _settings(cfg, pipe, height, width, scheduler, plan), cfg.overwrite)
  if jax.process_index() == 0:
    store.cleanup_temporaries()
  sink = sinks.make_sink(cfg.output_format, store, shard_size=cfg.shard_size,
                         images_per_folder=cfg.images_per_folder,
                         image_format=_image_format(cfg))
  work, skipped = _find_work(cfg, plan, sink)
  parallel.barrier("planned")  # every process has listed the shards before anyone writes

  made, seconds, compile_s, interrupted, stop_signal = _generate(
      cfg, pipe, plan, work, sink, _Metadata(cfg, pipe, height, width, scheduler, checker),
      refiner, hires_model)
  parallel.barrier("generated")
  merged = False
  if jax.process_index() == 0 and not interrupted:
    merged = sinks.merge(store, plan.num_shards, plan.total)
  summary = RunSummary(made, skipped, seconds, compile_s, interrupted, merged=merged,
                       stop_signal=stop_signal)
  logging.info("%d images in %.1f s (%.2f images/s; compile %.1f s); %d were already done",
               summary.images, summary.seconds, summary.images_per_second, compile_s,
               summary.skipped)
  return summary


def _generate(cfg, pipe, plan, work, sink, metadata, refiner=None, hires_model=None):
  """Runs the compiled sampler over this process's work; (images, seconds, compile s, whether
  it stopped early, the signal that stopped it here)."""
  try:
    mesh = parallel.make_mesh(cfg.cfg_parallel)
  except ValueError as e:
    raise RunError(f"--cfg_parallel: {e}") from None
  local_batch = cfg.batch_size * parallel.local_data_size(mesh)
  steps = parallel.max_over_processes(math.ceil(work.images / local_batch))
  if not steps:
    return 0, 0.0, 0.0, False, None
  lora_set = _LoraSets(cfg.lora_dir) if cfg.lora_dir is not None else None
  run_batch = _Sampler(cfg, pipe, mesh, metadata.scheduler, refiner, lora_set, hires_model)
  # The run's size: checked first (instruct-pix2pix, depth and x4 upscaler models' lines all
  # start from init images).
  images_in = (sampling.is_edit_model(pipe) or sampling.is_depth_model(pipe)
               or sampling.is_upscaler_model(pipe))
  run_batch.program((metadata.height, metadata.width), "img2img" if images_in else None,
                    cfg.guidance_scale)
  writer = sinks.ShardWriter(sink, work.remaining(plan), workers=cfg.writer_threads,
                             max_pending=4 * local_batch)

  def group(job):  # a batch holds one size, kind (ImageJob.kind), guidance, LoRA set, schedule
    _check_depth_image(pipe, job)
    return (metadata.size(job), job.kind, metadata.guidance(job),
            lora_set(job.prompt) if lora_set is not None else None, metadata.schedule(job))

  batches = _Batches(work.jobs(plan), local_batch, group, lookahead=max(1024, 16 * local_batch))
  made, start, pending, interrupted, progress, stop = 0, None, None, False, None, None
  try:
    with _StopFlag() as stop:
      batches.stop = stop  # several processes stop together, at the step they agree on
      for batch, group in batches:  # until no process has work left (or one asked to stop)
        try:
          # Dispatched: the devices work while the host writes the last batch.
          images, finish = run_batch(batch, *group)
          if progress is None:  # compiled: from here on the bar's rate and ETA mean something
            start, progress = time.perf_counter(), _progress(work.images, cfg.show_progress)
          if pending is not None:
            done, pending = pending, None
            made += _write(writer, metadata, *done, progress)
          pending = batch, images, finish
        except Exception as e:  # of several processes: all stop at the next step
          batches.fail(e)
        if stop.requested and jax.process_count() == 1:
          break
      interrupted = stop.requested or batches.stopped
      done, pending = pending, None
      if done is not None:
        made += _write(writer, metadata, *done, progress)
      if batches.failed is not None:  # this process's error, or another's
        if batches.failure is not None:
          raise batches.failure
        raise RunError("process {} stopped the run: {}".format(*batches.failed))
  except Exception:
    # A later prompt line failed (the file is streamed): keep the batch the devices were making,
    # and leave no device work in flight behind the error.
    if pending is not None:
      _write(writer, metadata, *pending, progress)
    raise
  finally:
    writer.close()
    if progress is not None:
      progress.close()
  return (made, time.perf_counter() - start if start is not None else 0.0,
          run_batch.compile_seconds, interrupted, stop.signum if stop is not None else None)


class _LoraSets:
  """A prompt's `<lora:name:te:unet>` tags as `apply_loras` entries (files in `lora_dir`)."""

  EXTENSIONS = (".safetensors", ".ckpt", ".pt", ".bin")

  def __init__(self, lora_dir: str):
    self.lora_dir, self._cache = lora_dir, {}

  def __call__(self, prompt: str) -> tuple[tuple[str, float, float], ...]:
    if prompt not in self._cache:
      from sdjax import prompts  # noqa: PLC0415

      if len(self._cache) > 10000:  # the prompts file is streamed: keep memory flat
        self._cache.clear()

      _, tags = prompts.lora_tags(prompt)
      self._cache[prompt] = tuple((self.file(t.name), t.unet_scale, t.te_scale) for t in tags)
    return self._cache[prompt]

  def file(self, name: str) -> str:
    for ext in ("", *self.EXTENSIONS):
      path = os.path.join(self.lora_dir, name + ext)
      if os.path.isfile(path):
        return path
    raise RunError(f"<lora:{name}>: no {name}{{{','.join(self.EXTENSIONS)}}} in --lora_dir "
                   f"{self.lora_dir}")


class _Batches:
  """Batches of (shard, job) rows that each hold one group (image size, kind: text-to-image,
  img2img or inpainting, guidance scale, LoRA set), the same on every process (their devices
  run one program and share the weights).

  Jobs are read ahead, at most `lookahead` waiting at once, and queued per group, so prompt lines
  of several sizes or kinds in any order still make full batches (each image is what it would be
  alone, so the order they are made in changes no pixel). A process proposes the group of a full
  batch (the one whose oldest job is oldest), else, when it can read no further, the group of
  its oldest job; a job waits at most while `lookahead` later jobs are read, so its shard
  closes. Each step the processes take, in turn, the proposal of one process (the next with work
  left); the others read ahead for that group while allowed, and one with fewer jobs of it pads
  the step with copies, which are never written. Iteration ends once no process has work left.

  Yields (batch, group).
  """

  def __init__(self, jobs: Iterator[tuple[int, ImageJob]], size: int, group, lookahead: int):
    self.jobs, self.size, self.group = jobs, size, group
    self.lookahead = max(lookahead, size)
    self.queues: dict[Any, collections.deque] = {}  # group -> (read order, (shard, job))
    self.read = self.waiting = self.step = 0
    self.ended = False
    self.stop = None  # a `_StopFlag`: processes end together once one asks to stop
    self.stopped = False  # ended because a process asked to
    # An error of this process (`fail`); the (process, message) of the one that ended the run.
    self.failure: Exception | None = None
    self.failed: tuple[int, str] | None = None

  def __iter__(self):
    return self

  def _oldest(self):
    return min(self.queues, key=lambda g: self.queues[g][0][0])

  def _can_read(self) -> bool:
    """Whether reading on is allowed: the read-ahead has room and its oldest job is not yet
    `lookahead` jobs old."""
    return not self.ended and self.waiting < self.lookahead and (
        not self.queues or self.read - self.queues[self._oldest()][0][0] < self.lookahead)

  def _read_until(self, enough) -> None:
    """Reads ahead while allowed, until `enough(group, queue)` holds for the last job's."""
    while self._can_read():
      item = next(self.jobs, None)
      if item is None:
        self.ended = True
        return
      key = self.group(item[1])
      queue = self.queues.setdefault(key, collections.deque())
      queue.append((self.read, item))
      self.read, self.waiting = self.read + 1, self.waiting + 1
      if enough(key, queue):
        return

  def _proposal(self):
    """The group this process would make next, reading ahead as far as that takes; None when it
    has no work left."""
    if not any(len(q) >= self.size for q in self.queues.values()):
      self._read_until(lambda _, queue: len(queue) >= self.size)
    if not self.queues:
      return None
    full = [g for g, q in self.queues.items() if len(q) >= self.size]
    oldest = self._oldest()
    if full and self.read - self.queues[oldest][0][0] < self.lookahead:
      return min(full, key=lambda g: self.queues[g][0][0])
    return oldest

  def __next__(self):
    asked = self.stop is not None and self.stop.requested
    wanted = None
    if not asked and self.failure is None:
      try:
        wanted = self._proposal()
      except Exception as e:  # a bad prompt line: the other processes stop with this one
        self.fail(e)
    group, self.stopped, self.failed = _agree_on_group(
        wanted, self.step, asked, None if self.failure is None else _one_line(self.failure))
    if group is None or self.stopped or self.failed is not None:
      raise StopIteration
    try:
      return self._take(group), group
    except Exception as e:
      self.fail(e)
      return [(None, ImageJob(0, "", "", 0))] * self.size, group  # nothing of its own

  def fail(self, error: Exception) -> None:
    """Keeps this process's `error` to tell the others at the next step, where every process
    stops (`failed`); alone, raises it at once."""
    if jax.process_count() == 1:
      raise error
    self.failure = error

  def _take(self, group) -> list[tuple[int | None, ImageJob]]:
    """A batch of `group`'s oldest jobs (reading ahead for more while allowed), padded."""
    self.step += 1
    if len(self.queues.get(group, ())) < self.size:  # another process's proposal
      self._read_until(lambda key, queue: key == group and len(queue) >= self.size)
    batch = []
    queue = self.queues.get(group)
    while queue and len(batch) < self.size:
      batch.append(queue.popleft()[1])
    if queue is not None and not queue:
      del self.queues[group]
    self.waiting -= len(batch)
    filler = batch[-1][1] if batch else ImageJob(0, "", "", 0)
    return batch + [(None, filler)] * (self.size - len(batch))


def _frozen(value):
  """JSON lists back as (nested) tuples."""
  return tuple(_frozen(x) for x in value) if isinstance(value, list) else value


def _one_line(error: Exception) -> str:
  """An error as another process's log says it."""
  text = str(error).splitlines()[0] if str(error) else ""
  return text if isinstance(error, RunError) else f"{type(error).__name__}: {text}"


class _Agreement(NamedTuple):
  group: Any  # None: no process has work left (or the run stops)
  stop: bool  # a process asked to stop (a signal)
  failed: tuple[int, str] | None  # (process, its one-line error): every process stops


def _agree_on_group(wanted, step: int = 0, stop: bool = False,
                    error: str | None = None) -> _Agreement:
  """The group (JSON-able, nested tuples) that process `step` mod the process count wants, or
  if it has no work the next one's after it, ...; whether some process asks to stop; the first
  process's error, if one has one. `wanted`: this process's proposal, or None; `stop`: this
  process asks to stop (a signal), `error`: it failed (its one-line message); either way every
  process stops at this step."""
  if jax.process_count() == 1:
    return _Agreement(wanted, stop, None if error is None else (0, error))
  from jax.experimental import multihost_utils  # noqa: PLC0415

  data = np.frombuffer(json.dumps([wanted, stop, error]).encode(), np.uint8)
  longest = parallel.max_over_processes(len(data))
  padded = np.zeros(longest, np.uint8)
  padded[:len(data)] = data
  every = np.asarray(multihost_utils.process_allgather(padded)).reshape(-1, longest)
  rows = [json.loads(bytes(row).rstrip(b"\0").decode()) for row in every]
  failed = next(((p, row[2]) for p, row in enumerate(rows) if row[2] is not None), None)
  if failed is not None or any(row[1] for row in rows):
    return _Agreement(None, any(row[1] for row in rows), failed)
  first = step % len(rows)
  for value, _, _ in (*rows[first:], *rows[:first]):  # in turn, from process `first`
    if value is not None:
      return _Agreement(_frozen(value), False, None)
  return _Agreement(None, False, None)


def _write(writer, metadata, batch, images, finish, progress) -> int:
  """Fetches a finished batch, finishes inpainted images (`masks.Prepared.finish`, where `finish`
  has one for the row), runs the safety checker over them and hands the real ones to the writer
  threads."""
  ready, distances = [], None
  if isinstance(images, tuple):  # soft inpainting's: (images, distance maps)
    images, distances = images
    distances = list(parallel.local_rows_numpy(distances))
  for row, image in enumerate(parallel.local_rows_numpy(images)):
    shard, job = batch[row]
    if shard is not None:
      finishing = finish is not None and finish[row] is not None
      try:
        if finishing:  # ComfyUI's composite, in float before the levels
          image = finish[row].composite(image)
        image = outputs.to_uint8(image, metadata.cfg.pixel_levels)
      except ValueError:  # NaN or inf: say for which image, under what settings
        steps, scheduler, *_ = metadata.schedule(job)
        raise RunError(f"image {job.index} ({job.prompt!r}): NaN or inf pixels, the sampler "
                       f"diverged ({steps} {scheduler} steps, guidance "
                       f"{metadata.guidance(job):g}, {metadata.cfg.dtype})") from None
      record = metadata.record(job)
      if finishing:
        image = finish[row].finish(image, None if distances is None else distances[row])
        if finish[row].crop is not None:  # "Only masked": the original's size
          record.update(height=image.shape[0], width=image.shape[1],
                        inpaint_region=list(finish[row].crop))
      ready.append((shard, job, record, image))
  if metadata.checker is not None and ready:
    ready = _check_safety(metadata.checker, metadata.cfg.nsfw_action, ready, len(batch))
  for shard, job, record, image in ready:
    writer.submit(shard, record, image, metadata.parameters(job))
  progress.update(len(ready))
  return len(ready)


def _check_safety(checker, action: str, ready: list, batch: int) -> list:
  """A batch's (shard, job, record, image) with the safety checker's verdict in each record
  (`nsfw`; `nsfw_score`, its highest concept score: flagged above 0) and, for action "black",
  the flagged images black."""
  images = [image for *_, image in ready]
  result = checker.check(images, batch=batch)
  if action == "black":
    images = checker.censor(images, result)
  for i, (_, _, record, _) in enumerate(ready):
    record.update(nsfw=bool(result.nsfw[i]), nsfw_score=round(float(result.scores[i]), 3))
  return [(*item[:3], image) for item, image in zip(ready, images, strict=True)]


class Schedule(NamedTuple):
  """What of an image's sampling its prompt line may set, the run's where it does not
  (`_Metadata.schedule`): one compiled program per distinct value (with size and kind)."""

  steps: int
  scheduler: str
  strength: float | None  # None: text-to-image
  schedule_type: str | None  # the line's (None: the run's scheduler options)
  scheduler_options: tuple[tuple[str, Any], ...] | None  # the line's own (`line_options`)
  clip_skip: int  # A1111's count (1: the last layer)


@dataclasses.dataclass
class _Program:
  """The sampler of one image size and kind (text-to-image, img2img or inpainting, guided or
  not): spec, states and the sharded, compiled programs."""

  spec: Any
  host_state: Any  # the base's scheduler state, on the host (A1111 schedules read it)
  # replicated: the base's, or (base, refiner), or (first pass, hires pass[, refiner][, first
  # pass's refiner])
  state: Any
  sampler: Any
  statics: str
  refiner: Any  # (spec, state, pipeline) of the refiner stage ending the program, or None
  steps: int
  hires: Any = None  # (spec, state) of the hires pass, or None
  # (spec, state, pipeline) of the refiner finishing the first pass before the hires pass, or None
  first_refiner: Any = None
  control: Any = None  # replicated (scale, weight per call[, hires pass's]) of the ControlNet
  compiled: dict = dataclasses.field(default_factory=dict)  # per prompt-input shape

  @property
  def stages(self) -> bool:
    """Whether the program has a second stage (its conditioning and states are pairs)."""
    return self.refiner is not None or self.hires is not None


class _Sampler:
  """The compiled, sharded samplers (one per image size and kind, see `program`): a process's
  batch of jobs -> a dispatched global batch."""

  def __init__(self, cfg, pipe, mesh, scheduler, refiner=None, lora_set=None, hires_model=None):
    self.cfg, self.pipe, self.mesh, self.scheduler = cfg, pipe, mesh, scheduler
    self.refiner_pipe, self.lora_set, self.loras = refiner, lora_set, ()
    self.hires_pipe = hires_model  # --hires_model's pipeline, or None: the hires pass's is pipe
    self.global_batch = cfg.batch_size * parallel.data_size(mesh)
    self.params = parallel.replicate(self._params(pipe.params), mesh)
    self.scalars: dict[float, Any] = {}  # per guidance scale, replicated
    self.programs: collections.OrderedDict[tuple, _Program] = collections.OrderedDict()
    self.compile_seconds = 0.0

  def _params(self, params):
    """The program's params given the base's: with a second model (the refiner, the hires
    model), the pair."""
    return self._with_second(params, None if self.hires_pipe is None else self.hires_pipe.params)

  def _with_second(self, params, hires_params):
    """The program's params from the base's and the hires model's (None: no hires model): the
    pair when there is a second model; a model upscaler's weights in the hires pass's."""
    hires = _hires(self.cfg)
    if self.refiner_pipe is not None:
      return params if hires is None else hires.params(params), self.refiner_pipe.params
    if hires_params is not None:
      return params, hires.params(hires_params)
    return params if hires is None else hires.params(params)

  def program(self, size: tuple[int, int], kind: str | None, guidance: float,
              schedule: Schedule | None = None) -> _Program:
    """The sampler of images of `size` (height, width) and `kind` (`ImageJob.kind`) under
    `schedule` (`_Metadata.schedule`; default the run's), made when first needed; one program
    serves every guidance scale > 1 (the scale is an input), another those <= 1 (no
    guidance)."""
    img2img = kind is not None
    schedule = Schedule(*schedule) if schedule else Schedule(  # a tuple from other processes
        self.cfg.steps, self.scheduler, self.cfg.strength if img2img else None, None, None,
        self.cfg.clip_skip)
    key = (size, kind, guidance > 1.0, schedule)
    steps, scheduler, strength = schedule.steps, schedule.scheduler, schedule.strength
    if key in self.programs:
      self.programs.move_to_end(key)
    else:
      cfg, pipe = self.cfg, self.pipe
      refiner, hires = self.refiner_pipe, _hires(cfg)
      _check_clip_skip(schedule.clip_skip, pipe, 'a prompt line\'s "clip_skip"')
      try:
        sampling.check_size(pipe, *size)
        if pipe.controlnet is not None:  # T2I-Adapters: their feature maps at this size
          sampling.check_control(pipe, *size, sampling.uses_guess_mode(
              pipe.controlnet, cfg.controlnet_guess_mode))
          if hires is not None:
            sampling.check_control(self.hires_pipe or pipe, *hires.size(pipe, *size), False)
      except ValueError as e:
        raise RunError(f"image size {size[1]}x{size[0]}: {e}") from None
      if refiner is not None:
        try:
          sampling.check_refined(pipe, kind == "inpaint", cfg.refiner_switch, cfg.inpaint_blend)
        except ValueError as e:
          raise RunError(f"--refiner: {e}") from None
      if img2img and hires is not None:
        raise RunError("prompt lines with an init_image (img2img) do not take --hires_scale")
      if cfg.cfg_parallel and guidance <= 1.0:
        raise RunError(f"--cfg_parallel splits classifier-free guidance, which a prompt line's "
                       f"guidance_scale {guidance:g} (<= 1) does not use")
      common = dict(steps=steps, scheduler=scheduler, height=size[0], width=size[1],
                    guidance_scale=guidance, guidance_rescale=cfg.guidance_rescale,
                    eta=cfg.eta, cfg_split=cfg.cfg_parallel, rng=cfg.rng, ensd=cfg.ensd,
                    seed_resize_from=_seed_resize(cfg), brownian=cfg.brownian,
                    step_rng=cfg.step_rng, seed_high=cfg.seed_high,
                    image_encode=cfg.image_encode,
                    clip_skip=schedule.clip_skip - 1 or None,  # diffusers' count
                    scheduler_options=line_options(cfg, pipe, scheduler, schedule.schedule_type,
                                                   schedule.scheduler_options) or None)
      extra = dict(img2img=True, strength=strength, noise_multiplier=cfg.noise_multiplier,
                   extra_noise=cfg.extra_noise) if img2img else {}
      if img2img and sampling.is_upscaler_model(pipe):  # from pure noise, its image beside
        extra["strength"] = 1.0
      if pipe.controlnet is not None:
        extra["control"] = True
        extra["control_guess"] = sampling.uses_guess_mode(pipe.controlnet,
                                                          cfg.controlnet_guess_mode)
      inpaint = kind == "inpaint"
      if inpaint:
        extra["masked_content"] = cfg.inpainting_fill
      if sampling.repaints_everything(pipe, inpaint, hires):  # lines without masks
        extra, inpaint = dict(img2img=True, strength=strength if img2img else 1.0,
                              noise_multiplier=cfg.noise_multiplier if img2img else 1.0,
                              extra_noise=cfg.extra_noise if img2img else 0.0), True
      # a refiner takes over the first pass, or the hires pass (A1111's "second pass"), or both
      first_handoff, hires_handoff = sampling.refined_passes(refiner, hires, cfg.hires_refiner)
      try:
        spec, state = sampling.prepare(
            pipe, cfg.batch_size, **common, **extra, inpaint=inpaint,
            inpaint_blend=cfg.inpaint_blend, grow_mask_by=cfg.grow_mask_by if inpaint else None,
            denoising_end=cfg.refiner_start if first_handoff else None,
            handoff=cfg.refiner_switch if first_handoff else "diffusers",
            noise_batch=cfg.noise_batch)
      except ValueError as e:
        what = {None: "text-to-image", "img2img": "img2img", "inpaint": "inpainting"}[kind]
        raise RunError(f"{what} lines: {e}") from None
      if kind == "inpaint":  # (lines with masks)
        spec = dataclasses.replace(spec, soft_inpainting=masks.soft_inpainting(
            cfg.soft_inpainting), differential=cfg.differential_diffusion)
      if spec.control:  # A1111's Control Modes (both passes of the hires fix)
        try:
          spec = dataclasses.replace(spec, control_modes=sampling.control_modes(
              _control_modes(cfg) or "balanced", len(pipe.controlnet), spec.control_guess))
        except ValueError as e:
          raise RunError(f"--control_mode: {e}") from None
      try:
        weight = sampling.check_mask_weight(pipe, cfg.inpainting_mask_weight)
      except ValueError as e:
        raise RunError(f"--{e}") from None
      try:
        rescale_form = sampling.check_rescale_form(
            cfg.guidance_rescale_form, spec.scheduler.name, cfg.cfg_parallel, _pag(cfg, pipe),
            cfg.guidance_rescale)
      except ValueError as e:
        raise RunError(f"--{e}") from None
      spec = dataclasses.replace(spec, pag=_pag(cfg, pipe),
                                 freeu=sampling.freeu_factors(cfg.freeu),
                                 freeu_form=cfg.freeu_form, tiling=sampling.tiling_axes(cfg.tiling),
                                 token_merging=cfg.token_merging_ratio, mask_weight=weight,
                                 rescale_form=rescale_form)
      try:
        spec = sampling.with_cfg_skip(spec, state, _cfg_skip(cfg), steps)
      except ValueError as e:
        raise RunError(f"--s_min_uncond / --skip_early_cond: {e}") from None
      host_state, stage, first_stage = state, None, None
      if first_handoff:  # the refiner's part of the first pass runs in the same program
        stage_spec, stage_state = sampling.prepare(
            refiner, cfg.batch_size, **common, denoising_start=cfg.refiner_start,
            handoff=cfg.refiner_switch, inpaint=inpaint, inpaint_blend=cfg.inpaint_blend,
            **({"img2img": True, "strength": strength} if img2img else {}))
        first_stage = (sampling.with_cfg_skip(dataclasses.replace(
            stage_spec, tiling=spec.tiling, rng_offset=sampling.stream_draws(
                spec, len(state.timesteps))), stage_state, _cfg_skip(cfg), steps),
            stage_state, refiner)
        if hires is None:  # the program's last stage
          refiner, first_stage = first_stage, None
          state, stage = (state, stage_state), refiner[::2]
      if hires is not None:  # so does the hires pass
        handed = {} if not hires_handoff else dict(denoising_end=cfg.refiner_start,
                                                   handoff=cfg.refiner_switch)
        try:
          if hires_handoff:  # the refiner's part of the hires pass
            stage_spec, stage_state = sampling.prepare_hires(
                refiner, cfg.batch_size, hires, denoising_start=cfg.refiner_start,
                handoff=cfg.refiner_switch, **common)
          hires = sampling.prepare_hires(self.hires_pipe or pipe, cfg.batch_size, hires,
                                         control=spec.control, extra_noise=cfg.extra_noise,
                                         control_guess=spec.control_guess, **handed, **common)
          hires = (sampling.with_cfg_skip(dataclasses.replace(
              hires[0], control_modes=spec.control_modes, pag=_pag(cfg, self.hires_pipe or pipe),
              freeu=spec.freeu, freeu_form=spec.freeu_form, rescale_form=spec.rescale_form,
              tiling=spec.tiling,
              token_merging=_hires_merging(cfg)),
              hires[1], _cfg_skip(cfg),
              cfg.hires_steps or steps), hires[1])
        except ValueError as e:
          raise RunError(f"--hires_scale: {e}") from None
        in_latents = _hires(cfg).in_latents
        if first_stage is None:
          spec = dataclasses.replace(spec, output_latents=in_latents)
        else:  # the refiner hands the hires pass latents, or its images (decoded by its VAE)
          first_stage = (dataclasses.replace(first_stage[0], output_latents=in_latents),
                         *first_stage[1:])
        # as generate: the second pass's noise from the batch's draws too
        hires = (dataclasses.replace(hires[0], noise_batch=spec.noise_batch), hires[1])
        state = (state, hires[1])
        if hires_handoff:
          refiner = (sampling.with_cfg_skip(dataclasses.replace(
              stage_spec, tiling=spec.tiling, noise_batch=spec.noise_batch,
              rng_offset=sampling.stream_draws(hires[0], len(hires[1].timesteps))),
              stage_state, _cfg_skip(cfg), cfg.hires_steps or steps), stage_state, refiner)
          state, stage = (*state, stage_state), refiner[::2]
        else:
          refiner = None
        if first_stage is not None:  # its conditioning and state come last
          state = (*state, first_stage[1])
      self.programs[key] = _Program(
          spec, host_state, parallel.replicate(state, self.mesh),
          parallel.sharded_sampler(self.mesh, spec, pipe, stage,
                                   hires=None if hires is None else hires[0],
                                   hires_pipe=self.hires_pipe,
                                   first_refiner=first_stage and first_stage[::2]),
          aot.sampler_statics(spec, pipe, *([stage] if hires is None else [
              (hires[0], self.hires_pipe or pipe)] + ([stage] if stage else [])),
              first_refiner=first_stage and first_stage[::2]),
          refiner, steps, hires, first_refiner=first_stage)
      if spec.control:  # (scales, weights per call[, the hires pass's weights])
        scales, starts, ends = _per_controlnet(cfg)
        control = (np.float32(scales),) + tuple(
            np.stack([sampling.control_weights(s, st, start, end)
                      for start, end in zip(starts, ends, strict=True)])
            for s, st in [(spec, host_state)] + ([] if hires is None else [hires]))
        self.programs[key].control = parallel.replicate(control, self.mesh)
      while len(self.programs) > MAX_PROGRAMS:  # the least recently used, and its executables
        self.programs.popitem(last=False)
    return self.programs[key]

  def _a1111(self, program, sizes=None):
    if self.cfg.prompt_syntax != "a1111":
      return None
    return sampling.a1111_options(program.spec, program.host_state, program.steps, sizes=sizes,
                                  bucket_variants=True, allow_lora=self.lora_set is not None,
                                  emphasis=self.cfg.emphasis,
                                  pad_cond_uncond=self.cfg.pad_cond_uncond,
                                  pad_cond_uncond_v0=self.cfg.pad_cond_uncond_v0,
                                  old_timelines=self.cfg.old_prompt_editing_timelines)

  def _conditioning(self, program, jobs, size, ip=None):
    """The batch's conditioning ((base, refiner) with a refiner, (first, hires pass) with the
    hires fix). An empty negative prompt is no negative prompt: zeros where the checkpoint asks
    for them (SDXL base). A1111 buckets agree across processes (the hires pass's schedules may
    need more variants than the first pass's: both take the larger)."""
    cond = self._make_conditioning(program, jobs, size, self._a1111(program), ip)
    each = [sampling.input_sizes(c) for c in (cond[:2] if program.hires is not None else
                                              [cond[0] if program.stages else cond])]
    if each[0] is not None and jax.process_count() > 1:
      agreed = tuple(parallel.max_over_processes(max(n)) for n in zip(*each, strict=True))
      if any(sizes != agreed for sizes in each):
        cond = self._make_conditioning(program, jobs, size, self._a1111(program, agreed), ip)
    return cond

  def _make_conditioning(self, program, jobs, size, a1111, ip=None):
    """`ip`: the IP-Adapters' input (`_ip_images`), which the refiner does not take."""
    prompts, negatives = [j.prompt for j in jobs], [j.negative_prompt or None for j in jobs]
    seconds = [second_prompts(self.cfg, j) for j in jobs]
    if any(x is not None for pair in seconds for x in pair):
      _check_two_encoders(self.pipe)
    negatives, prompts_2, negatives_2 = _second_encoder(prompts, negatives, seconds)
    cond = sampling.with_ip_images(sampling.make_conditioning(
        self.pipe, prompts, negatives, prompts_2=prompts_2, negative_prompts_2=negatives_2,
        micro=self.cfg.micro, size=size, img2img=program.spec.img2img, a1111=a1111), ip)
    if cond.part_weights is not None and not sampling.takes_composable(program.spec):
      raise RunError("prompt lines with composable prompts (AND, :weight) need guidance "
                     "(guidance_scale > 1), without --guidance_rescale, --cfg_parallel or "
                     "--pag_scale")
    if program.hires is None and any(j.hires_prompt or j.hires_negative_prompt for j in jobs):
      raise RunError("prompt lines with a hires_prompt or hires_negative_prompt need "
                     "--hires_scale or --hires_resize_*")
    if program.hires is not None:  # the hires pass's schedules count on from the first's
      # the refiner finishing the first pass: its conditioning last
      last = () if program.first_refiner is None else (self._refiner_conditioning(
          program.first_refiner, prompts, negatives, size, a1111, program.steps),)
      texts = [hires_prompts(self.cfg, j) for j in jobs]
      own = any(t != (j.prompt, j.negative_prompt) for t, j in zip(texts, jobs, strict=True))
      # A hires prompt of its own is both encoders' (as A1111's); else the first pass's pair.
      seconds = [(s if p == j.prompt else None, sn if n == j.negative_prompt else None)
                 for (p, n), (s, sn), j in zip(texts, seconds, jobs, strict=True)]
      second = [p for p, _ in texts], [n or None for _, n in texts]
      second = (second[0], *_second_encoder(*second, seconds))
      if own and self.lora_set is not None:
        self._check_hires_loras(jobs, second[0])
      if a1111 is None and not self.pipe.is_sdxl and not own and self.hires_pipe is None:
        return cond, cond  # (no refiner: it is SDXL's)
      if a1111 is not None:
        spec, state = program.hires
        a1111 = sampling.a1111_continued(a1111, spec, state,
                                         self.cfg.hires_steps or program.steps,
                                         base_steps=a1111.steps)
      hires_size = _hires(self.cfg).size(self.pipe, *size)
      hires_cond = sampling.with_ip_images(sampling.make_conditioning(
          self.hires_pipe or self.pipe, second[0], second[1], prompts_2=second[2],
          negative_prompts_2=second[3], micro=self.cfg.micro, size=hires_size, a1111=a1111), ip)
      if program.refiner is None:
        return cond, hires_cond, *last
      return cond, hires_cond, self._refiner_conditioning(
          program.refiner, second[0], second[1], hires_size, a1111,
          self.cfg.hires_steps or program.steps), *last
    if program.refiner is None:
      return cond
    return cond, self._refiner_conditioning(program.refiner, prompts, negatives, size, a1111,
                                            program.steps)

  def _refiner_conditioning(self, stage, prompts, negatives, size, a1111, steps):
    """The conditioning of a refiner stage, (spec, state, pipeline) (at `size`; `a1111`: the
    stage before it's settings)."""
    spec, state, refiner = stage
    if a1111 is not None:  # A1111's call counter runs on through the refiner's calls
      a1111 = sampling.a1111_continued(a1111, spec, state, steps, first_call=a1111.calls,
                                       sizes=None)
    return sampling.make_conditioning(refiner, prompts, negatives, micro=self.cfg.micro,
                                      size=size, img2img=True, a1111=a1111)

  @staticmethod
  def _check_hires_loras(jobs, hires_texts) -> None:
    """One LoRA set per image: a hires prompt's <lora:...> tags must be its prompt's."""
    from sdjax import prompts  # noqa: PLC0415

    for job, text in zip(jobs, hires_texts, strict=True):
      if prompts.lora_tags(text)[1] != prompts.lora_tags(job.prompt)[1]:
        raise RunError(f"image {job.index}: its hires prompt's <lora:...> tags differ from its "
                       f"prompt's (sdjax applies one set of LoRAs to both passes)")

  def _ip_images(self, batch, size):
    """The IP-Adapters' (images [B, 1, S, S, 3] per adapter, scales [B, A]) of a batch ((shard,
    job) rows): each line's `ip_adapter_image`, else the run's, as CLIP's image processor
    prepares them, and with --ip_adapter_mask the masks (per adapter None or [B, 1, *size]);
    None without --ip_adapter."""
    if self.pipe.ip_adapter is None:
      return None
    cfg, pixels = self.cfg, []
    for i, (encoder, _) in enumerate(self.pipe.ip_adapter):
      side = encoder.config.image_size
      rows = []
      for shard, job in batch:
        path = ip_adapter_paths(cfg, job)[i]
        if path is None and shard is not None:
          raise RunError(f'image {job.index} ({job.prompt!r}): --ip_adapter needs an image: the '
                         f'line\'s "ip_adapter_image" or --ip_adapter_image')
        rows.append(dataclasses.replace(job, ip_adapter_image=path))
      pixels.append(_read_each(rows, "ip_adapter_image", lambda path, side=side: (
          self._ip_pixels(path, side)), np.zeros((1, side, side, 3), np.float32)))
    scales = [1.0 if isinstance(s, dict) else s for s in _ip_scales(cfg)]
    ip = tuple(pixels), np.tile(np.float32(scales), (len(batch), 1))
    if not any(cfg.ip_adapter_mask):
      return ip
    return (*ip, tuple(None if not path else np.broadcast_to(
        self._ip_mask(path, *size), (len(batch), 1, *size)) for path in cfg.ip_adapter_mask))

  @functools.lru_cache(maxsize=16)  # noqa: B019 (the runner lives as long as its run)
  def _ip_mask(self, path: str, height: int, width: int) -> np.ndarray:
    from sdjax import pipeline  # noqa: PLC0415

    return pipeline.ip_adapter_mask(outputs.open_image(path, "L"), height, width)

  def _ip_pixels(self, path: str, side: int) -> np.ndarray:
    from sdjax import pipeline  # noqa: PLC0415

    return pipeline.ip_adapter_pixels(side, outputs.open_image(path))

  def _init_images(self, jobs, size, inpaint: bool):
    """The batch's init images [B, H, W, 3], resized to `size` (A1111's "Just resize"), and when
    inpainting their masks [B, H, W, 1] too, each row's `masks.Prepared` (or None: nothing to
    finish). An inpainting model's line without an image or mask has a grey one and a full one
    (everything repainted)."""
    if sampling.is_upscaler_model(self.pipe):  # its low-res images: the latents' size
      size = (size[0] // self.pipe.vae_scale, size[1] // self.pipe.vae_scale)
    comfyui = _comfyui_files(self.cfg)
    if not inpaint:
      return _read_each(jobs, "init_image", lambda path: outputs.read_image(
          path, size, resize_mode=self.cfg.resize_mode, flatten_alpha=not comfyui),
          np.zeros((*size, 3), np.float32)), None
    options, rows = _mask_options(self.cfg), {}
    for job in jobs:
      key = job.init_image, job.mask_image
      if key in rows:
        continue
      try:
        if job.mask_image is None:  # an inpainting model's: everything
          image, mask = sampling.unmasked_inpainting(
              None if job.init_image is None else outputs.read_image(
                  job.init_image, size, resize_mode=self.cfg.resize_mode,
                  flatten_alpha=not comfyui)[None], 1, *size)
          rows[key] = masks.Prepared(image[0], mask[0], None, None, None)
        else:
          image = outputs.open_image(job.init_image, None)
          mask = outputs.open_image(job.mask_image, None)
          rows[key] = masks.prepare(image if comfyui else outputs.flatten(image),
                                    masks.read_mask(mask, comfyui, options.soft is None),
                                    *size, options, self.cfg.resize_mode,
                                    mask_from_alpha="A" in mask.getbands())
      except ValueError as e:
        raise RunError(f"image {job.index} ({job.prompt!r}): {e}") from None
    prepared = [rows[job.init_image, job.mask_image] for job in jobs]
    return ((np.stack([p.image for p in prepared]), np.stack([p.mask for p in prepared])),
            [p if p.finishes else None for p in prepared])

  def _depth_maps(self, jobs, size) -> np.ndarray:
    """The batch's depth maps (a depth-to-image model's), float32 [B, h, w] at the latents' size:
    each file's map resized there by torch's bicubic interpolation, as `generate(depth_maps=)`
    resizes a map of any size (which then leaves these as they are)."""
    latent_hw = (size[0] // self.pipe.vae_scale, size[1] // self.pipe.vae_scale)

    def read(path):
      depth = jnp.asarray(outputs.read_depth(path))[None, ..., None]
      return np.asarray(interpolate.resize(depth, latent_hw, "bicubic"))[0, ..., 0]

    filler = np.broadcast_to(np.arange(latent_hw[1], dtype=np.float32), latent_hw)  # not flat
    return _read_each(jobs, "depth_image", read, filler)

  def _control_images(self, batch, size, prepared=None) -> tuple[np.ndarray, ...]:
    """Per ControlNet, the batch's images [B, H, W, c]: each line's `control_image`, else the
    run's, resized to `size` by --resize_mode (grey levels for a model taking one channel, as
    T2I-Adapters' canny and sketch ones do); for an inpainting row with "Only masked"
    (`prepared`, see `_init_images`), resized to its init image's size and cut as that was."""
    out = []
    for i, net in enumerate(self.pipe.controlnet):
      channels = net.config.conditioning_channels
      mode = "L" if channels == 1 else "RGB"
      jobs = []
      for shard, job in batch:
        path = control_paths(self.cfg, job)[i]
        if path is None and shard is not None:
          raise RunError(f'image {job.index} ({job.prompt!r}): --controlnet needs a control '
                         f'image: the line\'s "control_image" or --control_image')
        jobs.append(dataclasses.replace(job, control_image=path))
      images = _read_each(jobs, "control_image", lambda path, mode=mode: outputs.read_image(
          path, size, mode, self.cfg.resize_mode).reshape(*size, -1),
          np.zeros((*size, channels), np.float32))
      for k, (job, row) in enumerate(zip(jobs, prepared or [None] * len(jobs), strict=True)):
        if row is not None and row.crop is not None:
          width, height = row.original.size
          whole = outputs.resize(outputs.open_image(job.control_image, mode), height, width,
                                 self.cfg.resize_mode)
          images[k] = np.asarray(masks.cut_as(whole, row, *size), np.float32).reshape(
              *size, -1) / np.float32(255.0)
      out.append(images)
    return tuple(out)

  def _use_loras(self, loras) -> None:
    """Merges the batch's LoRA set into the base weights, once per change of set."""
    if loras != self.loras:
      from sdjax.checkpoints import lora  # noqa: PLC0415

      params = lora.apply_loras(self.pipe, list(loras)) if loras else self.pipe.params
      hires_params = None
      if self.hires_pipe is not None:  # A1111 applies an image's LoRAs to its hires model too
        hires_params = (lora.apply_loras(self.hires_pipe, list(loras)) if loras
                        else self.hires_pipe.params)
      params = self._with_second(params, hires_params)
      self.params, self.loras = parallel.replicate(params, self.mesh), loras
      logging.info("LoRA set %s merged", loras)

  def _seeds(self, jobs):
    """The program's seeds for this process's `jobs`: uint32, with A1111's variation seeds when
    an image of the global batch has some (`sampling.split_seeds`; strength 0 for the others,
    which leaves them as they are; every process must pass the program the same form)."""
    seeds = np.asarray([j.seed for j in jobs], np.uint32)
    varied = [variation(self.cfg, j) or (0, 0.0) for j in jobs]
    if self.cfg.noise_batch != 1:  # the same form in every process, which share the run's flags
      if any(strength for _, strength in varied):
        job = next(j for j, v in zip(jobs, varied, strict=True) if v[1])
        raise RunError(f"image {job.index}: its line's variation seeds (subseed_strength) and "
                       "--noise_batch do not go together")
      return seeds, None, np.asarray([j.batch_place for j in jobs], np.int32)
    if not parallel.max_over_processes(int(any(strength for _, strength in varied))):
      return seeds
    return seeds, sampling.Variation(np.asarray([v[0] for v in varied], np.uint32),
                                     np.asarray([v[1] for v in varied], np.float32))

  def __call__(self, batch, size, kind, guidance, loras, schedule):
    """Dispatches `batch` ((shard, job) rows) of images of `size` (height, width) and `kind`
    (`ImageJob.kind`: from their init images, and masks), at guidance scale `guidance`, under
    LoRA set `loras` (with `--lora_dir`) and `schedule`; with what finishes inpainted rows on
    the host (see `_init_images`)."""
    if self.lora_set is not None:
      self._use_loras(loras)
    program = self.program(size, kind, guidance, schedule)
    if guidance not in self.scalars:
      self.scalars[guidance] = parallel.replicate((np.float32(guidance),
                                                   np.float32(self.cfg.guidance_rescale)),
                                                  self.mesh)
    jobs = [job for _, job in batch]
    cond = self._conditioning(program, jobs, size, self._ip_images(batch, size))
    seeds = self._seeds(jobs)
    args = (self.params, parallel.shard_tree(self.mesh, cond, self.global_batch),
            parallel.shard_tree(self.mesh, seeds, self.global_batch),
            *self.scalars[guidance], program.state)
    finish = None
    if program.spec.img2img:
      init, finish = self._init_images(jobs, size, program.spec.inpaint is not None)
      if program.spec.edit:  # and each row's image guidance scale
        init = (init, np.asarray(sampling.edit_scales(self.pipe, self.cfg.image_guidance_scale,
                                                      len(jobs))))
      if program.spec.depth:  # and each row's depth map
        init = (init, self._depth_maps(jobs, size))
      if program.spec.low_res:  # and each row's noise level, its weights
        init = (init, *(np.asarray(x) for x in sampling.low_res_inputs(
            self.pipe, self.cfg.noise_level, len(jobs))))
      args += (parallel.shard_tree(self.mesh, init, self.global_batch),)
    if program.spec.control:  # with the hires fix the second pass's too, read at its size
      images = [self._control_images(batch, size, finish)]
      if program.hires is not None:
        images.append(self._control_images(batch, _hires(self.cfg).size(self.pipe, *size)))
      images = [parallel.shard_tree(self.mesh, x, self.global_batch) for x in images]
      args += (images[0], *program.control[:2], *images[1:], *program.control[2:])
    key = str(jax.tree.map(np.shape, (cond, seeds)))  # variation seeds: a program of their own
    if key not in program.compiled:
      t0 = time.perf_counter()
      program.compiled[key] = aot.load_or_compile(program.sampler, args, program.statics)
      self.compile_seconds += time.perf_counter() - t0
      logging.info("compiled the sampler for %dx%d, %d steps, %d per device on %d devices%s, "
                   "prompts %s in %.1f s", size[1], size[0], program.steps,
                   self.cfg.batch_size, self.mesh.size,
                   " (guidance pairs split over 2)" if parallel.CFG in self.mesh.axis_names
                   else "",
                   sampling.input_sizes(cond[0] if program.stages else cond) or "plain",
                   time.perf_counter() - t0)
    try:
      return program.compiled[key](*args), finish
    except Exception as e:  # noqa: BLE001 - XLA reports OOM as a generic runtime error
      text = str(e)
      if "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text:
        raise RunError(
            f"the batch does not fit in device memory: lower --batch_size (now "
            f"{self.cfg.batch_size}) or --height/--width") from None
      raise


def _cfg_skip(cfg: RunConfig) -> sampling.CfgSkip:
  return sampling.CfgSkip(cfg.s_min_uncond, cfg.s_min_uncond_all, cfg.skip_early_cond)


# The run's A1111 guidance and prompt settings by their manifest names, and the fields A1111
# writes them as.
_A1111_RNG_NAMES = {"torch_cpu": "CPU", "nv": "NV"}  # A1111's words for sdjax's generators
_A1111_CFG_FIELDS = {"s_min_uncond": "NGMS", "s_min_uncond_all": "NGMS all steps",
                     "skip_early_cond": "Skip Early CFG", "pad_cond_uncond": "Pad conds",
                     "pad_cond_uncond_v0": "Pad conds v0",
                     "old_prompt_editing_timelines": "Old prompt editing timelines"}


def _cfg_options(cfg: RunConfig) -> dict[str, Any]:
  """The A1111 guidance and prompt settings that are on (NGMS all steps only with NGMS)."""
  on = {name: getattr(cfg, name) for name in _A1111_CFG_FIELDS if getattr(cfg, name)}
  if not cfg.s_min_uncond:
    on.pop("s_min_uncond_all", None)
  return on


def _seed_resize(cfg: RunConfig) -> tuple[int, int] | None:
  """A1111's "Resize seed from" (width, height), None when off (a side <= 0, as A1111)."""
  size = (cfg.seed_resize_from_w, cfg.seed_resize_from_h)
  return None if min(size) <= 0 else size


def variation(cfg: RunConfig, job: ImageJob) -> tuple[int, float] | None:
  """An image's A1111 variation seed and strength: its line's (subseed + j for the line's j-th
  image), else --subseed + k for image k of the run, as A1111 counts them, at its line's
  strength, else --subseed_strength; None without variation."""
  strength = cfg.subseed_strength if job.subseed_strength is None else job.subseed_strength
  if not strength:
    return None
  subseed = job.subseed if job.subseed is not None else cfg.subseed + job.index
  return subseed % 2**32, strength


def control_paths(cfg: RunConfig, job: ImageJob) -> list[str | None]:
  """A line's control image per ControlNet: its own (a list, one per ControlNet, for several;
  null entries and a line without any: the run's --control_image)."""
  return _per_model_paths(job, "control_image", list(cfg.control_image), len(cfg.controlnet),
                          "ControlNet")


def ip_adapter_paths(cfg: RunConfig, job: ImageJob) -> list[str | None]:
  """A line's image per IP-Adapter: its own (a list, one per adapter, for several; null entries
  and a line without any: the run's --ip_adapter_image)."""
  return _per_model_paths(job, "ip_adapter_image", list(cfg.ip_adapter_image),
                          len(cfg.ip_adapter), "IP-Adapter")


def _per_model_paths(job: ImageJob, field: str, defaults: list[str], n: int,
                     what: str) -> list[str | None]:
  """A line's `field` image per model (ControlNet, IP-Adapter) of `n`: its own, else the run's
  `--<field>` (`defaults`)."""
  defaults = defaults or [None] * n
  own = getattr(job, field)
  if own is None:
    return defaults
  if isinstance(own, str):
    if n > 1:
      raise RunError(f'image {job.index} ({job.prompt!r}): "{field}" must be a list of one per '
                     f"{what} ({n}), null for --{field}'s")
    return [own]
  if len(own) != n:
    raise RunError(f'image {job.index} ({job.prompt!r}): "{field}" lists {len(own)} images for '
                   f"{n} {what}s")
  return [default if path is None else path for path, default in zip(own, defaults, strict=True)]


def _ip_layer_scales(cfg: RunConfig) -> list[dict | None]:
  """Per --ip_adapter, its InstantStyle per-layer scales, or None (one number for all layers)."""
  return [s if isinstance(s, dict) else None for s in _ip_scales(cfg)]


def _ip_scales(cfg: RunConfig) -> list[float | dict]:
  """The scale of each --ip_adapter (one serves all): a number, or InstantStyle's per-layer
  scales (a dict; given as JSON text on the command line)."""
  out = []
  for value in cfg.ip_adapter_scale:
    if isinstance(value, str):
      try:
        value = float(value)
      except ValueError:
        try:
          value = json.loads(value)
        except json.JSONDecodeError:
          value = None
    if isinstance(value, int | float) and not isinstance(value, bool):
      value = float(value)
      if math.isfinite(value):
        out.append(value)
        continue
    elif isinstance(value, dict):
      out.append(value)
      continue
    raise RunError(f"--ip_adapter_scale: a number, or per-layer scales as a JSON object (e.g. "
                   f"'{{\"up\": {{\"block_0\": [0, 1, 0]}}}}'), got {value!r}")
  return out * len(cfg.ip_adapter) if len(out) == 1 else out


def _ip_adapter_record(cfg: RunConfig) -> dict[str, Any]:
  """The IP-Adapters' settings: one adapter's as single values (as ControlNets'), several as
  lists."""
  record = {"ip_adapter": list(cfg.ip_adapter), "ip_adapter_scale": _ip_scales(cfg)}
  if any(cfg.ip_adapter_encoder):
    record["ip_adapter_encoder"] = list(cfg.ip_adapter_encoder)
  if any(cfg.ip_adapter_mask):
    record["ip_adapter_mask"] = [p or None for p in cfg.ip_adapter_mask]
  return {k: v[0] for k, v in record.items()} if len(cfg.ip_adapter) == 1 else record


def _weight(scale: float | dict) -> str:
  """An IP-Adapter's A1111 `Weight`: its scale (1 with per-layer scales, written beside)."""
  return "1" if isinstance(scale, dict) else f"{scale:g}"


def _one_or_list(values: list):
  return values[0] if len(values) == 1 else values


def _check_depth_image(pipe, job: ImageJob) -> None:
  """A depth-to-image model's lines give a depth_image, other models' none."""
  if sampling.is_depth_model(pipe) and job.depth_image is None:
    raise RunError(f"image {job.index} ({job.prompt!r}): a depth-to-image model's lines need an "
                   "init_image and its depth_image (a depth map, larger nearer; sdjax has no "
                   "estimator)")
  if job.depth_image is not None and not sampling.is_depth_model(pipe):
    raise RunError(f"image {job.index} ({job.prompt!r}): a depth_image steers a depth-to-image "
                   "model, which the run's model is not")


def _read_each(jobs, field: str, read, blank: np.ndarray) -> np.ndarray:
  """`read(path)` of each job's `field` path, each file read once; `blank` where it has none
  (and for a process with no work left, which pads)."""
  images = {None: blank}
  for job in jobs:
    path = getattr(job, field)
    if path not in images:
      try:
        images[path] = read(path)
      except ValueError as e:
        raise RunError(f"image {job.index} ({job.prompt!r}): {e}") from None
  return np.stack([images[getattr(job, field)] for job in jobs])


def _progress(total: int, show: bool):
  from tqdm import tqdm  # noqa: PLC0415

  return tqdm(total=total, unit="img", disable=not show or jax.process_index() != 0,
              desc="generating", smoothing=0.1)


def model_identity(source: str | None) -> tuple[str, str | None]:
  """(name, A1111 short hash) of a model, as AUTOMATIC1111 writes them into its PNGs.

  The name is the hub id, or the folder's or file's name without its path (which would leak the
  local layout into shared images); the hash is that of the checkpoint file, or for a diffusers
  folder of its UNet weights file (the variant-less safetensors, else the first that exists; for
  sharded weights, their index file). None when there is no such file.
  """
  from sdjax import BUILTIN_MODEL  # noqa: PLC0415
  from sdjax.checkpoints import hub  # noqa: PLC0415

  source = source or BUILTIN_MODEL
  if os.path.exists(os.path.expanduser(source)):
    folder = os.path.expanduser(source)
    name = os.path.basename(os.path.normpath(folder))
  elif hub.is_hub_file(source):  # a single file from the hub: its cached download
    folder = hub.resolve_file(source, "checkpoint")
    name = os.path.basename(folder)
  else:
    name = source
    try:
      folder = hub.resolve_source(source)  # loaded already: a cache lookup
    except ValueError:
      return name, None
  if os.path.isfile(folder):
    name, file = os.path.splitext(name)[0], folder
  else:
    file = _weights_file(os.path.join(folder, "unet"), "unet")
  if source == BUILTIN_MODEL:
    name = "sdjax-shapes"
  if file is None:
    return name, None
  return name, outputs.short_hash(file, cache_file=_hash_cache_file())


def vae_identity(source: str) -> tuple[str, str | None]:
  """(name, A1111 short hash) of a replacement VAE (--vae), as A1111 writes `VAE` and `VAE hash`:
  a file's name with its extension (a hub file's too), else the hub id or the folder's name; the
  hash of the file, or of the folder's weights file. None when there is no such file."""
  from sdjax.checkpoints import hub, single_file  # noqa: PLC0415

  local = os.path.expanduser(source)
  if single_file.is_single_file(source):
    name = os.path.basename(source.split("?", 1)[0])
  else:
    name = os.path.basename(os.path.normpath(local)) if os.path.isdir(local) else source
  try:
    if single_file.is_single_file(source):
      file = hub.resolve_file(source, "VAE") if hub.is_hub_file(source) else local
      return name, outputs.short_hash(file, cache_file=_hash_cache_file())
    folder = local if os.path.isdir(local) else hub.resolve_source(source, component="vae")
  except (ValueError, OSError):  # loaded already: a cache lookup that can only miss oddly
    return name, None
  if os.path.isdir(os.path.join(folder, "vae")):
    folder = os.path.join(folder, "vae")
  file = _weights_file(folder, "vae")
  return name, None if file is None else outputs.short_hash(file, cache_file=_hash_cache_file())


def _weights_file(folder: str, component: str) -> str | None:
  """The weights file of a diffusers component folder that A1111-style hashes are taken of: the
  variant-less safetensors, else the first that exists (a sharded one's index); None if none."""
  from sdjax.checkpoints import weights  # noqa: PLC0415

  return next((os.path.join(folder, n) for n in weights.weight_candidates(
      weights.WEIGHT_STEMS[component], None) if os.path.isfile(os.path.join(folder, n))), None)


def _named_with_hash(source: str) -> str:
  """A1111's dropdown name of a model, `name [short hash]` (the name alone without a file)."""
  name, short = model_identity(source)
  return name if short is None else f"{name} [{short}]"


def _hash_cache_file() -> str:
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "sdjax", "hashes.json")


_A1111_NAME_SYMBOLS = str.maketrans("", "", ":,")  # A1111 drops these from hashed names


class _Metadata:
  """Each image's manifest record and A1111 `parameters` text (extend both here)."""

  def __init__(self, cfg: RunConfig, pipe, height: int, width: int, scheduler: str,
               checker=None):
    from sdjax.checkpoints import embeddings, lora  # noqa: PLC0415

    self.cfg, self.pipe, self.checker = cfg, pipe, checker
    self.height, self.width, self.scheduler = height, width, scheduler
    self.model_name, self.model_hash = model_identity(cfg.model)
    self.vae = vae_identity(cfg.vae) if cfg.vae is not None else None
    self.refiner = model_identity(cfg.refiner) if cfg.refiner is not None else None
    self.hires_model = model_identity(cfg.hires_model) if cfg.hires_model is not None else None
    self.controlnets = [_named_with_hash(path) for path in cfg.controlnet]
    self.ip_adapters = [_named_with_hash(path) for path in cfg.ip_adapter]
    self._hashes: dict[tuple[str, str], str] = {}
    # (scheduler, line's schedule type and options) -> `line_options`: once per kind.
    self._options: dict[tuple, dict[str, Any]] = {}
    # A1111's `Lora hashes` / `TI hashes`: every --lora; the <lora:...> tags and the embeddings'
    # trigger words an image's prompts use.
    self.lora_dir = _LoraSets(cfg.lora_dir) if cfg.lora_dir is not None else None
    self.loras = [(_stem(path), self._hash(path, "lora"))
                  for path in (lora.lora_file(source) for source, _ in cfg.loras)]
    self.triggers = []
    for source, token in cfg.embeddings:
      trigger = embeddings.read_embedding(source, token).token
      pattern = re.compile(rf"(?<![\w]){re.escape(trigger)}(?![\w])", re.IGNORECASE)
      self.triggers.append((trigger, embeddings.embedding_file(source), pattern))

  def _hash(self, path: str, kind: str) -> str:
    if (path, kind) not in self._hashes:
      self._hashes[path, kind] = outputs.short_hash(path, cache_file=_hash_cache_file(),
                                                    kind=kind)
    return self._hashes[path, kind]

  def _line_options(self, scheduler: str, schedule_type: str | None,
                    own: tuple[tuple[str, Any], ...] | None) -> dict[str, Any]:
    key = (scheduler, schedule_type, own)
    if key not in self._options:
      self._options[key] = line_options(self.cfg, self.pipe, scheduler, schedule_type, own)
    return self._options[key]

  def guidance(self, job: ImageJob) -> float:
    """A job's guidance scale: its prompt line's, else the run's."""
    return self.cfg.guidance_scale if job.guidance_scale is None else job.guidance_scale

  def schedule(self, job: ImageJob) -> Schedule:
    """A job's schedule: its prompt line's, else the run's. An SDXL model's text encoders stay
    at their penultimate layer whatever a line's Clip skip says, as in A1111."""
    cfg = self.cfg
    strength = None
    if job.init_image is not None:
      strength = cfg.strength if job.strength is None else job.strength
    clip_skip = cfg.clip_skip if job.clip_skip is None or self.pipe.is_sdxl else job.clip_skip
    return Schedule(job.steps or cfg.steps, job.scheduler or self.scheduler, strength,
                    job.schedule_type, job.scheduler_options, clip_skip)

  def size(self, job: ImageJob) -> tuple[int, int]:
    """(height, width) of a job's image: its prompt line's, else the run's."""
    if job.size is None:
      return self.height, self.width
    return job.size[0] or self.height, job.size[1] or self.width

  def _hires_size(self, height: int, width: int) -> tuple[int, int]:
    return _hires(self.cfg).size(self.pipe, height, width)

  def record(self, job: ImageJob) -> dict[str, Any]:
    """The manifest record; `height` / `width` are the image file's (with the hires fix, the
    second pass's; `hires` says the first pass's)."""
    cfg = self.cfg
    height, width = self.size(job)
    schedule = self.schedule(job)
    steps, scheduler, strength, schedule_type = schedule[:4]
    options = self._line_options(scheduler, schedule_type, schedule.scheduler_options)
    hires = _hires_record(cfg)
    if hires:
      hires["hires"].update(first_height=height, first_width=width,
                            steps=cfg.hires_steps or steps)
      for key, text, first in zip(("prompt", "negative_prompt"), hires_prompts(cfg, job),
                                  (job.prompt, job.negative_prompt), strict=True):
        hires["hires"].pop(key, None)  # the run's, or the line's own: what this image used
        if text != first:
          hires["hires"][key] = text
      height, width = self._hires_size(height, width)
    return {
        "index": job.index, "prompt": job.prompt, "negative_prompt": job.negative_prompt,
        **{key: text for key, text in zip(("prompt_2", "negative_prompt_2"),
                                          second_prompts(cfg, job), strict=True) if text},
        "seed": job.seed, "steps": steps, "scheduler": scheduler,
        **({"scheduler_options": options} if options else {}),
        "guidance_scale": self.guidance(job), "eta": cfg.eta, "height": height, "width": width,
        **({"rng": cfg.rng} if cfg.rng != RunConfig.rng else {}),
        **({"brownian": brownian} if (brownian := self._brownian(scheduler)) else {}),
        **({"step_rng": cfg.step_rng} if cfg.step_rng else {}),
        **({"seed_high": cfg.seed_high} if cfg.seed_high else {}),
        **({"noise_batch": cfg.noise_batch, "batch_place": job.batch_place}
           if cfg.noise_batch != 1 else {}),
        **({"ensd": cfg.ensd} if cfg.ensd else {}), **_cfg_options(cfg),
        **({"seed_resize_from": list(_seed_resize(cfg))} if _seed_resize(cfg) else {}),
        **({"subseed": varied[0], "subseed_strength": varied[1]}
           if (varied := variation(cfg, job)) else {}),
        **({"clip_skip": schedule.clip_skip} if schedule.clip_skip != 1 else {}),
        **({"token_merging_ratio": cfg.token_merging_ratio} if cfg.token_merging_ratio else {}),
        **({"pixel_levels": cfg.pixel_levels} if cfg.pixel_levels != "round" else {}),
        "model": self.pipe.name, "model_name": self.model_name, "model_hash": self.model_hash,
        "dtype": cfg.dtype, "sdjax_version": sdjax.__version__,
        **({"init_image": job.init_image} if job.init_image else {}),
        **({"strength": strength} if job.init_image
           and not sampling.is_upscaler_model(self.pipe) else {}),
        **({"depth_image": job.depth_image} if job.depth_image else {}),
        **({"noise_level": sampling.NOISE_LEVEL if self.cfg.noise_level is None
            else self.cfg.noise_level}
           if sampling.is_upscaler_model(self.pipe) else {}),
        **({"image_guidance_scale": self._image_guidance_scale()}
           if sampling.is_edit_model(self.pipe) else {}),
        **({"noise_multiplier": cfg.noise_multiplier}
           if job.init_image and cfg.noise_multiplier != 1.0 else {}),
        **({"extra_noise": cfg.extra_noise}
           if cfg.extra_noise and (job.init_image or _hires(cfg)) else {}),
        **({"image_encode": cfg.image_encode} if self._encodes(job) else {}),
        **({"resize_mode": cfg.resize_mode} if job.init_image and cfg.resize_mode != "just"
           else {}),
        **({"mask_image": job.mask_image, **self._mask_record()} if job.mask_image else {}),
        **({"control_image": _one_or_list(control_paths(cfg, job)),
            **_controlnet_record(cfg)} if cfg.controlnet else {}),
        **({"ip_adapter_image": _one_or_list(ip_adapter_paths(cfg, job)),
            **_ip_adapter_record(cfg)} if cfg.ip_adapter else {}),
        **hires, **_sdxl_record(cfg, self.pipe),
        **{k: v for k, v in (("template", job.template),
                             ("negative_template", job.negative_template)) if v is not None},
    }

  def _encodes(self, job) -> bool:
    """Whether --image_encode (not its default) made a line's image: its init image, or the
    hires pass's pixel upscaler encoded images."""
    hires = _hires(self.cfg)
    return self.cfg.image_encode != "sample" and bool(
        job.init_image or hires is not None and sampling.is_pixel_upscaler(hires.upscaler))

  def _mask_record(self) -> dict[str, Any]:
    cfg = self.cfg
    record = {"mask_blur": cfg.mask_blur}
    if cfg.inpaint_full_res:  # `_write` adds the box and the file's own size
      record["inpaint_full_res_padding"] = cfg.inpaint_full_res_padding
    if cfg.inpainting_mask_invert:
      record["inpainting_mask_invert"] = True
    if cfg.inpainting_fill != "original":
      record["inpainting_fill"] = cfg.inpainting_fill
    if cfg.inpainting_mask_weight != 1.0:
      record["inpainting_mask_weight"] = cfg.inpainting_mask_weight
    if cfg.inpaint_blend != "diffusers":
      record["inpaint_blend"] = cfg.inpaint_blend
    if cfg.grow_mask_by is not None:
      record["grow_mask_by"] = cfg.grow_mask_by
    if cfg.soft_inpainting is not None:
      record["soft_inpainting"] = list(cfg.soft_inpainting)
    if cfg.differential_diffusion is not None:
      record["differential_diffusion"] = cfg.differential_diffusion
    if cfg.comfyui_composite:
      record["comfyui_composite"] = True
    return record

  def _brownian(self, scheduler: str) -> str | None:
    """--brownian where an image's sampler (or its hires pass's) takes it."""
    hires = self.cfg.hires_scheduler if _hires(self.cfg) is not None else None
    takes = sampling.schedulers.takes_brownian
    if self.cfg.brownian is not None and (takes(scheduler) or takes(hires)):
      return self.cfg.brownian
    return None

  def _hires_extra(self, height: int, width: int, scheduler: str,
                   schedule_type: str | None) -> dict[str, Any]:
    """A1111's hires fields (its `Size` stays the first pass's, whose `Schedule type` is
    `schedule_type`)."""
    cfg, hires = self.cfg, _hires(self.cfg)
    if hires is None:
      return {}
    extra = {"Denoising strength": cfg.hires_strength}
    final = self._hires_size(height, width)
    if any(hires.resize):
      extra["Hires resize"] = "x".join(map(str, hires.resize))  # A1111's: as given, 0 kept
    else:
      extra["Hires upscale"] = cfg.hires_scale
      if final != (int(height * cfg.hires_scale), int(width * cfg.hires_scale)):
        extra["Hires resize"] = f"{final[1]}x{final[0]}"  # rounded to a size the model takes
    if cfg.hires_steps:
      extra["Hires steps"] = cfg.hires_steps
    extra["Hires upscaler"] = _hires_upscaler_name(cfg)
    if self.hires_model is not None:  # A1111's checkpoint short title: name [short hash]
      name, short = self.hires_model
      extra["Hires checkpoint"] = f"{name} [{short}]" if short else name
    if hires.guidance_scale is not None:  # Forge's
      extra["Hires CFG Scale"] = hires.guidance_scale
    if hires.scheduler is not None and hires.scheduler != scheduler:
      extra["Hires sampler"] = outputs.A1111_SAMPLER_NAMES.get(hires.scheduler, hires.scheduler)
    if hires.schedule_type is not None:  # A1111 writes it where it differs from the first's
      label = outputs.a1111_schedule_type({"schedule_type": hires.schedule_type}) or "Automatic"
      if label != (schedule_type or "Automatic"):
        extra["Hires schedule type"] = label
    return extra

  def _hires_prompts(self, job: ImageJob) -> dict[str, str]:
    """A1111's `Hires prompt` / `Hires negative prompt`: written when not the first pass's."""
    if _hires(self.cfg) is None:
      return {}
    prompt, negative = hires_prompts(self.cfg, job)
    return {**({"Hires prompt": prompt} if prompt != job.prompt else {}),
            **({"Hires negative prompt": negative} if negative != job.negative_prompt else {})}

  def parameters(self, job: ImageJob) -> str:
    """A1111's `parameters` text; dynamic prompts' templates on lines of their own after it,
    as the sd-dynamic-prompts extension writes them."""
    templates = "".join(f"\n{label}: {text}" for label, text in (
        ("Template", job.template), ("Negative Template", job.negative_template)) if text)
    return self._parameters(job) + templates

  def _parameters(self, job: ImageJob) -> str:
    cfg = self.cfg
    height, width = self.size(job)
    schedule = self.schedule(job)
    steps, scheduler, strength, schedule_type = schedule[:4]
    options = self._line_options(scheduler, schedule_type, schedule.scheduler_options)
    return outputs.a1111_parameters(
        prompt=job.prompt, negative_prompt=job.negative_prompt, steps=steps,
        sampler=scheduler, cfg_scale=self.guidance(job), seed=job.seed, width=width,
        height=height, model=self.model_name, model_hash=self.model_hash, eta=cfg.eta,
        version=f"sdjax {sdjax.__version__}",
        extra={**({"Scheduler options": "; ".join(f"{k}={v}" for k, v in options.items())}
                  if options else {}),
               **({"Schedule type": kind}
                  if (kind := outputs.a1111_schedule_type(options)) else {}),
               # an ancestral sampler's eta, where A1111 writes it (not 1)
               **({"Eta": options["eta"]} if options.get("eta", 1) != 1
                  and scheduler not in sampling.schedulers.ETA_SCHEDULERS else {}),
               **({"Sigma noise": options["s_noise"]} if options.get("s_noise", 1) != 1
                  else {}),  # k-diffusion's s_noise, as A1111 writes it
               **{field: options[key] for field, key in (
                   ("Sigma churn", "s_churn"), ("Sigma tmin", "s_tmin"), ("Sigma tmax", "s_tmax"))
                  if options.get(key, 0) != 0},  # k-diffusion's churn, as A1111 writes it
               **self._a1111_schedule(options),
               **({"Denoising strength": strength} if job.init_image
                  and not sampling.is_upscaler_model(self.pipe) else {}),
               **({"Image CFG scale": self._image_guidance_scale()}
                  if sampling.is_edit_model(self.pipe) else {}),
               **({"Noise multiplier": cfg.noise_multiplier}
                  if job.init_image and cfg.noise_multiplier != 1.0 else {}),
               **({"Extra noise": cfg.extra_noise}
                  if cfg.extra_noise and (job.init_image or _hires(cfg)) else {}),
               **({"Image encode": cfg.image_encode} if self._encodes(job) else {}),
               **(_mask_options(cfg).a1111_parameters() if job.mask_image else {}),
               **({"Conditional mask weight": cfg.inpainting_mask_weight}
                  if cfg.inpainting_mask_weight != 1.0 and job.init_image else {}),
               **({"Inpaint blend": _INPAINT_BLEND_NAMES[cfg.inpaint_blend]}
                  if cfg.inpaint_blend != "diffusers" and job.mask_image else {}),
               **({"Grow mask by": cfg.grow_mask_by}
                  if cfg.grow_mask_by is not None and job.mask_image else {}),
               **({"Differential diffusion": cfg.differential_diffusion}
                  if cfg.differential_diffusion is not None and job.mask_image else {}),
               **({"Inpaint composite": "ComfyUI"}
                  if cfg.comfyui_composite and job.mask_image else {}),
               **self._controlnet_extra(),
               **self._hires_extra(height, width, scheduler, outputs.a1111_schedule_type(
                   options)), **self._hires_prompts(job),
               **self._vae_extra(),
               **{key: text for key, text in zip(("Prompt 2", "Negative prompt 2"),  # sdjax's
                                                 second_prompts(cfg, job), strict=True) if text},
               **({"Clip skip": schedule.clip_skip} if schedule.clip_skip != 1 else {}),
               **({"RNG": _A1111_RNG_NAMES[cfg.rng]} if cfg.rng != "jax" else {}),
               **({"Brownian noise": _A1111_RNG_NAMES[brownian]}  # sdjax's fields
                  if (brownian := self._brownian(scheduler)) else {}),
               **({"Step RNG": _A1111_RNG_NAMES[cfg.step_rng]} if cfg.step_rng else {}),
               **({"Seed high": cfg.seed_high} if cfg.seed_high else {}),
               **({"Noise batch": cfg.noise_batch, "Noise batch place": job.batch_place}
                  if cfg.noise_batch != 1 else {}),
               **({"ENSD": cfg.ensd} if cfg.ensd else {}),
               **{_A1111_CFG_FIELDS[k]: v for k, v in _cfg_options(cfg).items()},
               **({"Seed resize from": "x".join(map(str, _seed_resize(cfg)))}
                  if _seed_resize(cfg) else {}),
               **({"Variation seed": varied[0], "Variation seed strength": varied[1]}
                  if (varied := variation(cfg, job)) else {}),
               **self._sdxl_extra(height, width), **self._network_hashes(job),
               **self._emphasis(job), **self._pag_extra(),
               **({"Guidance rescale": cfg.guidance_rescale} if cfg.guidance_rescale else {}),
               **({"Guidance rescale form": "ComfyUI RescaleCFG"}
                  if cfg.guidance_rescale and cfg.guidance_rescale_form == "comfyui" else {}),
               **self._tiling_extra(),
               **({"FreeU": ", ".join(f"{k}={v:g}" for k, v in zip(
                   sampling.FREEU_NAMES, cfg.freeu, strict=True))} if cfg.freeu else {}),
               **({"FreeU form": outputs.FREEU_FORM_NAMES[cfg.freeu_form]}
                  if cfg.freeu and cfg.freeu_form != "diffusers" else {}),
               # A1111's, as it writes them: the passes' ratios where not 0
               **({"Token merging ratio": cfg.token_merging_ratio}
                  if cfg.token_merging_ratio else {}),
               **({"Pixel levels": cfg.pixel_levels}  # sdjax's
                  if cfg.pixel_levels != "round" else {}),
               **({"Token merging ratio hr": _hires_merging(cfg)}
                  if _hires(cfg) and _hires_merging(cfg) else {})})

  def _vae_extra(self) -> dict[str, str]:
    """A1111's `VAE hash` and `VAE` (its file's name, no local path) of a --vae."""
    if self.vae is None:
      return {}
    name, short = self.vae
    return {**({"VAE hash": short} if short else {}), "VAE": name}

  def _tiling_extra(self) -> dict[str, Any]:
    """A1111's `Tiling: True` for both axes; one axis: `Tiling axis: x` (or y)."""
    axes = sampling.tiling_axes(self.cfg.tiling)
    return {} if not axes else {"Tiling": True} if axes == "xy" else {"Tiling axis": axes}

  def _pag_extra(self) -> dict[str, Any]:
    """Forge's perturbed-attention guidance entries (its built-in extension writes the first
    two), the adaptive scale and layers when not the defaults."""
    cfg = self.cfg
    if not cfg.pag_scale:
      return {}
    return {"PerturbedAttentionGuidance_enabled": True,
            "PerturbedAttentionGuidance_scale": cfg.pag_scale,
            **({"PerturbedAttentionGuidance_adaptive_scale": cfg.pag_adaptive_scale}
               if cfg.pag_adaptive_scale else {}),
            **({"PerturbedAttentionGuidance_layers": json.dumps(list(cfg.pag_applied_layers))}
               if cfg.pag_applied_layers != RunConfig.pag_applied_layers else {})}

  def _controlnet_extra(self) -> dict[str, str]:
    """A1111's `ControlNet N` entries (the sd-webui-controlnet extension's units), each model by
    name."""
    modes = _control_modes(self.cfg) or ("balanced",) * len(self.controlnets)
    kinds = self.cfg.control_type or ("",) * len(self.controlnets)
    return {f"ControlNet {i}": f"Model: {name}, Weight: {scale:g}, Guidance Start: {start:g}, "
                              f"Guidance End: {end:g}" + (
                                  "" if mode == "balanced" else
                                  f", Control Mode: {conditioning.CONTROL_MODES[mode]}") + (
                                  f", Union Control Type: {kind}" if kind else "")
            for i, (name, scale, start, end, mode, kind) in enumerate(zip(
                self.controlnets, *_per_controlnet(self.cfg), modes, kinds, strict=True))} | {
        f"ControlNet {len(self.controlnets) + i}": f"Module: {module}, Model: {name}, Weight: "
                                                   f"{_weight(scale)}, Guidance Start: 0, "
                                                   f"Guidance End: 1"
        for i, (name, scale, module) in enumerate(zip(
            self.ip_adapters, _ip_scales(self.cfg) if self.ip_adapters else [],
            self._ip_modules(), strict=True))} | {
        f"IP-Adapter {i} layer scales": json.dumps(scale, separators=(",", ":"))
        for i, scale in enumerate(_ip_scales(self.cfg) if self.ip_adapters else [])
        if isinstance(scale, dict)}

  def _ip_modules(self) -> list[str]:
    """A1111's ControlNet-extension preprocessor name of each IP-Adapter's image encoder."""
    names = {1280: "ip-adapter_clip_h", 1664: "ip-adapter_clip_g"}
    return [names.get(encoder.config.hidden_size, "ip-adapter_clip")
            for encoder, _ in self.pipe.ip_adapter or ()]

  def _image_guidance_scale(self) -> float:
    """An instruct-pix2pix model's image guidance scale (A1111's Image CFG scale)."""
    scale = self.cfg.image_guidance_scale
    return sampling.IMAGE_GUIDANCE_SCALE if scale is None else scale

  def _a1111_schedule(self, options: dict[str, Any]) -> dict[str, Any]:
    """A1111's fields of its schedules where the run steps on them as A1111 does (its k-diffusion
    form): Downcast alphas_cumprod (where the model's is downcast), Noise Schedule, its
    schedule settings (Schedule rho, ...) and its Always discard next-to-last sigma."""
    applied = sampling.model_schedule(self.pipe, options) or {}
    a1111 = bool(options.get("k_diffusion") or options.get("a1111"))
    from sdjax import infotext  # noqa: PLC0415

    return {**({"Downcast alphas_cumprod": True}
               if applied.get("downcast_alphas_cumprod") is True else {}),
            **({"Noise Schedule": "Zero Terminal SNR"}
               if a1111 and options.get("rescale_betas_zero_snr") else {}),
            **{field: options[key] for field, key in infotext.SCHEDULE_SETTING_FIELDS.items()
               if options.get("k_diffusion") and options.get(key) is not None},
            **({"Discard penultimate sigma": True} if options.get("k_diffusion") and not
               options.get("comfyui") and options.get("discard_penultimate_sigma") else {})}

  def _emphasis(self, job: ImageJob) -> dict[str, str]:
    """A1111's `Emphasis` field: the mode, when not "Original" and a prompt text (after its
    extra-network tags and schedules) has a bracket."""
    if self.cfg.prompt_syntax != "a1111" or self.cfg.emphasis == "Original":
      return {}
    from sdjax import prompts  # noqa: PLC0415

    for text in (job.prompt, job.negative_prompt or ""):
      texts = [t for _, t in prompts.prompt_schedule(prompts.lora_tags(text)[0],
                                                     self.schedule(job).steps)]
      if any("(" in t or "[" in t for t in texts):
        return {"Emphasis": self.cfg.emphasis}
    return {}

  def _sdxl_extra(self, height: int, width: int) -> dict[str, Any]:
    """A1111's names for the refiner (`name [short hash]`, no local path); sdjax's for the
    micro-conditioning (A1111 has none). A default original or target size is each pass's own
    size: with the hires fix, none is written (the first pass's would be read back as both
    passes')."""
    cfg = self.cfg
    if not self.pipe.is_sdxl:
      return {}
    m, hires = cfg.micro, _hires(cfg) is not None
    extra = {key: _size_text(size or (height, width)) for key, size in (
        ("Original size", m.original_size), ("Crop", m.crops_coords_top_left),
        ("Target size", m.target_size)) if size is not None or not hires}
    if m.negative_original_size is not None or m.negative_target_size is not None:
      extra.update({key: _size_text(value) for key, value in (
          ("Negative original size", m.negative_original_size),
          ("Negative crop", m.negative_crops_coords_top_left),
          ("Negative target size", m.negative_target_size)) if value is not None})
    if self.refiner is not None:
      name, short = self.refiner
      extra.update({"Refiner": f"{name} [{short}]" if short else name,
                    # a number of steps: sdjax's field (A1111's is a fraction)
                    ("Refiner switch step" if sampling.is_step_count(cfg.refiner_start)
                     else "Refiner switch at"): cfg.refiner_start,
                    # sdjax's field (A1111's images switch so without it)
                    **({"Refiner switch": "A1111"} if cfg.refiner_switch == "a1111" else {}),
                    # A1111's, written where not its default
                    **({"Hires refiner": cfg.hires_refiner}
                       if cfg.hires_refiner != RunConfig.hires_refiner else {}),
                    "Aesthetic score": m.aesthetic_score,
                    "Negative aesthetic score": m.negative_aesthetic_score})
    return extra

  def _network_hashes(self, job: ImageJob) -> dict[str, str]:
    """`Lora hashes` and `TI hashes` as A1111 writes them: `name: hash` pairs, one per name."""
    from sdjax import prompts  # noqa: PLC0415

    loras = list(self.loras)
    if self.lora_dir is not None:
      loras += [(tag.name, self._hash(self.lora_dir.file(tag.name), "lora"))
                for tag in prompts.lora_tags(job.prompt)[1]]
    texts = [prompts.strip_comments(t) if self.cfg.prompt_syntax == "a1111" else t
             for t in (job.prompt, job.negative_prompt or "")]
    used = [(trigger, self._hash(path, "embedding")) for trigger, path, pattern in self.triggers
            if any(pattern.search(text) for text in texts)]  # hashed when first used
    extra = {}
    for key, pairs in (("Lora hashes", loras), ("TI hashes", used)):
      named = {}
      for name, short in pairs:
        named.setdefault(name.translate(_A1111_NAME_SYMBOLS), short)
      if named:
        extra[key] = ", ".join(f"{name}: {short}" for name, short in named.items())
    return extra


def _stem(path: str) -> str:
  return os.path.splitext(os.path.basename(path))[0]


def _size_text(hw) -> str:
  return f"{int(hw[1])}x{int(hw[0])}"  # width x height, as A1111's Size
