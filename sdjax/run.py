"""Batch generation: many prompts, every device of every host, reproducible and resumable.

`generate_run(RunConfig(...))` is what `main.py` calls. Image k of a run (prompts in order, then
`num_images_per_prompt`) gets seed `seed + k` unless its jsonl line names one; each device makes
`batch_size` images per step with the single-device program, so the pixels do not depend on the
number of devices or processes. Outputs are written atomically and recorded in `manifest.jsonl`
after their image; rerunning the same command skips what is finished.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import signal
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from absl import logging

import sdjax
from sdjax import outputs, parallel, sampling

MAX_SIZE = 4096  # pixels per side; larger is almost surely a typo


class RunError(ValueError):
  """Bad input to a run: one line that says what to change."""


@dataclasses.dataclass(frozen=True)
class PromptLine:
  prompt: str
  negative_prompt: str | None = None
  seed: int | None = None
  num_images: int | None = None


@dataclasses.dataclass(frozen=True)
class ImageJob:
  index: int
  prompt: str
  negative_prompt: str
  seed: int


@dataclasses.dataclass(frozen=True)
class RunConfig:
  prompts: tuple[PromptLine, ...]
  model: str | None = None
  negative_prompt: str = ""
  num_images_per_prompt: int = 1
  steps: int = 50
  guidance_scale: float = 7.5
  scheduler: str | None = None
  eta: float = 0.0  # DDIM's stochasticity; step noise from each image's seed
  height: int | None = None
  width: int | None = None
  seed: int = 0
  batch_size: int = 1  # per device
  dtype: str = "float32"
  output_dir: str = "outputs"
  overwrite: bool = False
  allow_pickle: bool = True  # ignored: pickles are always read safely
  compilation_cache: str | None = None
  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None
  show_progress: bool = True


@dataclasses.dataclass(frozen=True)
class RunSummary:
  images: int  # made by this run (all processes)
  skipped: int  # already finished before it started
  seconds: float
  compile_seconds: float
  interrupted: bool = False

  @property
  def images_per_second(self) -> float:
    return self.images / self.seconds if self.seconds > 0 else 0.0


# -- prompts ---------------------------------------------------------------------------------------
def read_prompts_file(path: str) -> list[PromptLine]:
  """`.txt`: one prompt per non-empty line; `.jsonl`: objects with `prompt` and options."""
  try:
    with open(path, encoding="utf-8") as f:
      lines = f.read().splitlines()
  except FileNotFoundError:
    raise RunError(f"prompts file {path} does not exist") from None
  except (OSError, UnicodeDecodeError) as e:
    raise RunError(f"cannot read prompts file {path}: {e}") from None
  if path.endswith(".jsonl"):
    prompts = [_jsonl_line(path, n, line) for n, line in enumerate(lines, 1) if line.strip()]
  else:
    prompts = [PromptLine(line.strip()) for line in lines if line.strip()]
  if not prompts:
    raise RunError(f"prompts file {path} holds no prompts")
  return prompts


def _jsonl_line(path: str, n: int, line: str) -> PromptLine:
  where = f"{path} line {n}"
  try:
    obj = json.loads(line)
  except json.JSONDecodeError as e:
    raise RunError(f"{where}: not valid JSON ({e.msg})") from None
  if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
    raise RunError(f"{where}: needs an object with a string \"prompt\"")
  unknown = set(obj) - {"prompt", "negative_prompt", "seed", "num_images"}
  if unknown:
    raise RunError(f"{where}: unknown field {sorted(unknown)[0]!r}")
  negative = obj.get("negative_prompt")
  if negative is not None and not isinstance(negative, str):
    raise RunError(f"{where}: \"negative_prompt\" must be a string")
  for key in ("seed", "num_images"):
    value = obj.get(key)
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0
                              or (key == "num_images" and value < 1)):
      raise RunError(f"{where}: \"{key}\" must be a {'positive' if key == 'num_images' else 'non-negative'} integer")
  return PromptLine(obj["prompt"], negative, obj.get("seed"), obj.get("num_images"))


def plan_images(cfg: RunConfig) -> list[ImageJob]:
  """Every image of the run, in global order, with its prompt, negative prompt and seed.

  A jsonl line's own `seed` s gives its j-th image seed s + j.
  """
  jobs = []
  for line in cfg.prompts:
    for j in range(line.num_images or cfg.num_images_per_prompt):
      k = len(jobs)
      seed = cfg.seed + k if line.seed is None else line.seed + j
      negative = cfg.negative_prompt if line.negative_prompt is None else line.negative_prompt
      jobs.append(ImageJob(k, line.prompt, negative, seed))
  return jobs


# -- validation ------------------------------------------------------------------------------------
def validate(cfg: RunConfig) -> None:
  """Checks what needs no model, so that bad input fails before anything slow."""
  if not cfg.prompts:
    raise RunError("no prompts: give --prompt or --prompts_file")
  if cfg.steps < 1:
    raise RunError(f"--steps must be at least 1, got {cfg.steps}")
  if cfg.batch_size < 1:
    raise RunError(f"--batch_size must be at least 1, got {cfg.batch_size}")
  if cfg.num_images_per_prompt < 1:
    raise RunError(f"--num_images_per_prompt must be at least 1, got {cfg.num_images_per_prompt}")
  for name in ("height", "width"):
    value = getattr(cfg, name)
    if value is not None and (value % 8 or not 8 <= value <= MAX_SIZE):
      raise RunError(f"--{name} must be a multiple of 8 between 8 and {MAX_SIZE}, got {value}")
  from sdjax import schedulers  # noqa: PLC0415

  if not cfg.eta >= 0:
    raise RunError(f"--eta must be >= 0, got {cfg.eta}")
  if cfg.eta and cfg.scheduler is not None and cfg.scheduler not in schedulers.ETA_SCHEDULERS:
    raise RunError(f"eta is an option of {', '.join(schedulers.ETA_SCHEDULERS)} only, not of "
                   f"scheduler {cfg.scheduler!r}")
  if not 0 <= cfg.seed < 2**32:
    raise RunError(f"--seed must be in [0, 2**32), got {cfg.seed}")
  if cfg.scheduler is not None and cfg.scheduler not in schedulers.SCHEDULERS:
    raise RunError(f"unknown scheduler {cfg.scheduler!r}; pick one of "
                   f"{', '.join(schedulers.SCHEDULERS)}")


def _settings(cfg: RunConfig, pipe, height: int, width: int, scheduler: str,
              jobs: Sequence[ImageJob]) -> dict[str, Any]:
  """What decides the pixels; a folder's images must all come from the same settings."""
  digest = hashlib.sha256(
      json.dumps([dataclasses.astuple(j) for j in jobs]).encode()).hexdigest()
  return {"model": pipe.name, "steps": cfg.steps, "guidance_scale": cfg.guidance_scale,
          "scheduler": scheduler, "height": height, "width": width, "dtype": cfg.dtype,
          "images": len(jobs), "jobs_sha256": digest,
          **({"eta": cfg.eta} if cfg.eta else {})}  # absent when 0: older folders still match


def _check_settings(output_dir: str, settings: dict[str, Any], overwrite: bool) -> None:
  path = os.path.join(output_dir, "run.json")
  if os.path.isfile(path):
    with open(path, encoding="utf-8") as f:
      previous = json.load(f)
    if previous == settings:
      return
    if not overwrite:
      changed = sorted(k for k in settings if previous.get(k) != settings[k])
      raise RunError(
          f"{output_dir} holds a run with other settings ({', '.join(changed)} differ); "
          "use another --output_dir, or --overwrite to replace it")
  elif any(f.endswith(".png") or f == "manifest.jsonl" for f in os.listdir(output_dir)):
    if not overwrite:
      raise RunError(f"{output_dir} is not empty and was not made by this run; use another "
                     "--output_dir, or --overwrite to replace it")
  if overwrite and jax.process_index() == 0:
    outputs.clear(output_dir)
  if jax.process_index() == 0:
    outputs.write_json(path, settings)


# -- the run ---------------------------------------------------------------------------------------
class _StopFlag:
  """First Ctrl-C: finish writing the current batch, then stop. Second: stop at once."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    def handler(signum, frame):
      if self.requested:
        raise KeyboardInterrupt
      self.requested = True
      logging.warning("interrupted: stopping after the current batch (Ctrl-C again to abort)")

    try:
      self._previous = signal.signal(signal.SIGINT, handler)
    except ValueError:  # not the main thread: leave signals alone
      self._previous = None
    return self

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGINT, self._previous)


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


def generate_run(cfg: RunConfig) -> RunSummary:
  """Generates every image of `cfg` that is not finished yet into `cfg.output_dir`."""
  validate(cfg)
  parallel.initialize(cfg.coordinator_address, cfg.num_processes, cfg.process_id)
  enable_compilation_cache(cfg.compilation_cache)
  outputs.check_output_dir(cfg.output_dir)
  pipe = sdjax.load_pipeline(cfg.model, cfg.dtype, allow_pickle=cfg.allow_pickle)
  height = cfg.height or pipe.native_size
  width = cfg.width or pipe.native_size
  sampling.check_size(pipe, height, width)
  scheduler = cfg.scheduler or sampling.schedulers.default_scheduler_name(pipe.scheduler_config)

  jobs = plan_images(cfg)
  _check_settings(cfg.output_dir, _settings(cfg, pipe, height, width, scheduler, jobs),
                  cfg.overwrite)
  if jax.process_index() == 0:
    outputs.cleanup_temporaries(cfg.output_dir)
  manifest = outputs.Manifest(cfg.output_dir)
  done = outputs.finished(cfg.output_dir, manifest.records())
  todo = [job for job in jobs if job.index not in done]
  parallel.barrier("planned")  # every process has read the manifest before anyone writes

  mesh = parallel.make_mesh()
  per_batch = cfg.batch_size * mesh.size
  spec, state = sampling.prepare(pipe, cfg.batch_size, steps=cfg.steps, scheduler=scheduler,
                                 height=height, width=width, guidance_scale=cfg.guidance_scale,
                                 eta=cfg.eta)
  writer = _Writer(cfg, pipe, manifest, height, width, scheduler)
  start = time.perf_counter()
  made, compile_s, interrupted = _generate_batches(cfg, pipe, mesh, spec, state, todo, per_batch,
                                                   writer)
  seconds = time.perf_counter() - start
  parallel.barrier("generated")
  if jax.process_index() == 0 and not interrupted:
    records = outputs.Manifest(cfg.output_dir).records()
    ordered = [records[k] for k in sorted(records)]
    outputs.write_grid(cfg.output_dir, [r["file"] for r in ordered])
    outputs.write_index_html(cfg.output_dir, ordered)
  summary = RunSummary(made, len(jobs) - len(todo), seconds, compile_s, interrupted)
  logging.info("%d images in %.1f s (%.2f images/s; compile %.1f s); %d were already done",
               summary.images, summary.seconds, summary.images_per_second, compile_s,
               summary.skipped)
  return summary


def _generate_batches(cfg, pipe, mesh, spec, state, todo, per_batch, writer):
  """Runs the compiled sampler over `todo` in global batches; returns (images, compile s, stop)."""
  if not todo:
    return 0, 0.0, False
  params = parallel.replicate(pipe.params, mesh)
  state = parallel.replicate(state, mesh)
  scalars = parallel.replicate(
      (np.float32(cfg.guidance_scale), np.float32(0.0)), mesh)
  sampler = parallel.sharded_sampler(mesh, spec, pipe)
  rows = parallel.local_slice(mesh, per_batch)
  compiled, compile_s, made = None, 0.0, 0
  progress = _progress(len(todo), cfg.show_progress)
  with _StopFlag() as stop:
    for first in range(0, len(todo), per_batch):
      batch = todo[first:first + per_batch]
      padded = batch + [batch[-1]] * (per_batch - len(batch))  # padding is never written
      local = padded[rows]
      args = (params,
              *(parallel.shard_batch(mesh, a, per_batch) for a in (
                  pipe.tokenize([j.prompt for j in local]),
                  pipe.tokenize([j.negative_prompt for j in local]),
                  np.asarray([j.seed for j in local], np.uint32))),
              *scalars, state)
      if compiled is None:
        t0 = time.perf_counter()
        compiled = sampler.lower(*args).compile()
        compile_s = time.perf_counter() - t0
        logging.info("compiled the sampler for %dx%d, %d steps, %d per device in %.1f s",
                     spec.latent_hw[1] * pipe.vae_scale, spec.latent_hw[0] * pipe.vae_scale,
                     cfg.steps, cfg.batch_size, compile_s)
      images = _run_compiled(compiled, args, cfg.batch_size)
      for row, image in parallel.local_rows(images):
        if row < len(batch):
          writer.write(batch[row], image)
      made += len(batch)
      progress.update(len(batch))
      if stop.requested:
        progress.close()
        return made, compile_s, True
  progress.close()
  return made, compile_s, False


def _run_compiled(compiled, args, batch_size):
  try:
    return compiled(*args)
  except Exception as e:  # noqa: BLE001 - XLA reports OOM as a generic runtime error
    text = str(e)
    if "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text:
      raise RunError(
          f"the batch does not fit in device memory: lower --batch_size (now {batch_size}) "
          "or --height/--width") from None
    raise


def _progress(total: int, show: bool):
  from tqdm import tqdm  # noqa: PLC0415

  return tqdm(total=total, unit="img", disable=not show or jax.process_index() != 0,
              desc="generating")


class _Writer:
  """Writes one finished image and then its manifest line."""

  def __init__(self, cfg: RunConfig, pipe, manifest, height: int, width: int, scheduler: str):
    self.cfg, self.pipe, self.manifest = cfg, pipe, manifest
    self.height, self.width, self.scheduler = height, width, scheduler

  def write(self, job: ImageJob, image: np.ndarray) -> None:
    cfg = self.cfg
    name = f"{job.index:06d}.png"
    params = outputs.a1111_parameters(
        prompt=job.prompt, negative_prompt=job.negative_prompt, steps=cfg.steps,
        sampler=self.scheduler, cfg_scale=cfg.guidance_scale, seed=job.seed, width=self.width,
        height=self.height, model=self.pipe.name, eta=cfg.eta)
    digest = outputs.write_png(os.path.join(cfg.output_dir, name), image, params)
    self.manifest.append({
        "index": job.index, "file": name, "sha256": digest, "prompt": job.prompt,
        "negative_prompt": job.negative_prompt, "seed": job.seed, "steps": cfg.steps,
        "scheduler": self.scheduler, "guidance_scale": cfg.guidance_scale, "eta": cfg.eta,
        "height": self.height, "width": self.width, "model": self.pipe.name,
        "dtype": cfg.dtype, "sdjax_version": sdjax.__version__,
    })
