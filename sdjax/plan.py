"""The images of a run, streamed from its prompts: memory independent of the prompts file's length.

Image k of a run (prompts in order: `--prompt`s, then the file's lines; each repeated
`num_images` times) gets seed `seed + k`, or `s + j` for the j-th image of a jsonl line with its
own `seed` s; a jsonl line's `width` / `height` and `guidance_scale` replace the run's for its
images, and its `init_image` (a path, relative to the prompts file's folder) makes them img2img
(inpainting with a `mask_image` too); its `control_image` is the ControlNet's (`--controlnet`;
with several, a list of one per ControlNet), its `ip_adapter_image` the IP-Adapter's
(`--ip_adapter`, likewise); its `parameters` (an image with A1111 parameters, or a text file
of them) gives the line's prompts, seed, steps, sampler, schedule type, size, CFG scale,
variation seed and hires prompts where the line does not. `Plan` reads the prompts file once
up front, without parsing it: it counts the images, hashes the file and notes where every shard
(`shard_size` consecutive images) starts, so that `jobs(shard)` can seek straight to any shard.
Lines are parsed, and bad ones reported with their line number, when their shard is generated.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import functools
import hashlib
import json
import math
import os
import re
import shlex
from collections.abc import Iterator, Sequence
from typing import Any

from absl import logging

from sdjax.dynamic_prompts import SYNTAX, DynamicPrompts, TemplateError, is_template

_JSONL_FIELDS = ("prompt", "negative_prompt", "seed", "num_images", "width", "height",
                 "init_image", "guidance_scale", "mask_image", "steps", "scheduler", "strength",
                 "control_image", "ip_adapter_image", "hires_prompt", "hires_negative_prompt",
                 "schedule_type", "styles", "subseed", "subseed_strength", "scheduler_options",
                 "clip_skip", "prompt_2", "negative_prompt_2", "depth_image")
MAX_SIZE = 4096  # pixels per side; larger is almost surely a typo
# Tables of prompts (`.csv`, `.tsv`): a header row names the columns; the prompt column is the
# first named one of these (PartiPrompts' "Prompt", DrawBench's "Prompts", captions' "caption"),
# other columns named as jsonl fields are those fields, and the rest (a benchmark's "Category",
# ...) are left out.
TABLE_DELIMITERS = {".csv": ",", ".tsv": "\t"}
_PROMPT_COLUMNS = ("prompt", "prompts", "caption", "text")
_TABLE_INTS = ("seed", "num_images", "width", "height", "steps", "subseed", "clip_skip")
_TABLE_FLOATS = ("guidance_scale", "strength", "subseed_strength")
_TABLE_JSON = ("scheduler_options", "control_image", "ip_adapter_image", "styles")


class RunError(ValueError):
  """Bad input to a run: one line that says what to change."""


@dataclasses.dataclass(frozen=True)
class PromptLine:
  prompt: str
  negative_prompt: str | None = None
  seed: int | None = None
  num_images: int | None = None
  width: int | None = None  # None: the run's
  height: int | None = None
  init_image: str | None = None  # img2img: the image to start from
  guidance_scale: float | None = None  # None: the run's
  mask_image: str | None = None  # inpainting (with init_image): white repaints
  steps: int | None = None  # None: the run's
  scheduler: str | None = None
  strength: float | None = None  # img2img and inpainting lines
  # The ControlNet's image (--controlnet), or one per ControlNet (None: the run's).
  control_image: str | tuple[str | None, ...] | None = None
  # The IP-Adapter's image (--ip_adapter), or one per IP-Adapter (None: the run's).
  ip_adapter_image: str | tuple[str | None, ...] | None = None
  # The hires fix's second pass (A1111's Hires prompt; None: the run's, else the line's own).
  hires_prompt: str | None = None
  hires_negative_prompt: str | None = None
  # A1111's Schedule type for this line ("Karras", "Align Your Steps", ...; None: the run's).
  schedule_type: str | None = None
  # A1111 saved styles applied to this line's prompts (None: the run's --style names).
  styles: tuple[str, ...] | None = None
  # A1111's variation seed of the line's first image (the j-th: subseed + j) and strength (None:
  # the run's --subseed, counted by image, and --subseed_strength).
  subseed: int | None = None
  subseed_strength: float | None = None
  # The line's scheduler options over the run's --scheduler_options (`freeze_options`; None:
  # the run's): e.g. an A1111 image's k-diffusion placement, from its "parameters".
  scheduler_options: tuple[tuple[str, Any], ...] | None = None
  clip_skip: int | None = None  # A1111's Clip skip (1: the last layer; None: the run's)
  # SDXL's second text encoder's prompts (diffusers' prompt_2; None: the run's, else the line's
  # prompt / negative prompt).
  prompt_2: str | None = None
  negative_prompt_2: str | None = None
  # A depth-to-image model's depth map of init_image (an image file, larger nearer).
  depth_image: str | None = None


@dataclasses.dataclass(frozen=True)
class ImageJob:
  """One image of the run: everything that decides its pixels besides the run's settings."""

  index: int
  prompt: str
  negative_prompt: str
  seed: int
  size: tuple[int, int] | None = None  # (height, width); None: the run's
  init_image: str | None = None
  guidance_scale: float | None = None  # None: the run's
  mask_image: str | None = None
  steps: int | None = None  # None: the run's
  scheduler: str | None = None
  strength: float | None = None
  control_image: str | tuple[str | None, ...] | None = None
  ip_adapter_image: str | tuple[str | None, ...] | None = None
  hires_prompt: str | None = None  # None: the run's --hires_prompt, else the line's prompt
  hires_negative_prompt: str | None = None
  # Dynamic prompts (`sdjax.dynamic_prompts`): the templates the prompts came from, when they
  # were templates.
  template: str | None = None
  negative_template: str | None = None
  schedule_type: str | None = None  # None: the run's
  subseed: int | None = None  # None: the run's (see `run.variation`)
  subseed_strength: float | None = None
  scheduler_options: tuple[tuple[str, Any], ...] | None = None  # the line's (`freeze_options`)
  clip_skip: int | None = None  # None: the run's
  # Its place in its seed's batch (ComfyUI's batch noise, --noise_batch: image k of a batch draws
  # the k-th slice of the batch's noise); 0 without.
  batch_place: int = 0
  prompt_2: str | None = None  # None: the run's --prompt_2, else the prompt
  negative_prompt_2: str | None = None
  depth_image: str | None = None  # a depth-to-image model's depth map of init_image

  @property
  def kind(self) -> str | None:
    """None (text-to-image), "img2img" or "inpaint"."""
    if self.init_image is None:
      return None
    return "img2img" if self.mask_image is None else "inpaint"


def check_size(value, what: str) -> None:
  """A side of an image: a multiple of 8 in [8, MAX_SIZE] (`what` names it in the error)."""
  if not isinstance(value, int) or isinstance(value, bool) or value % 8 or not (
      8 <= value <= MAX_SIZE):
    raise RunError(f"{what} must be a multiple of 8 between 8 and {MAX_SIZE}, got {value!r}")


def _blank(path: str, raw: bytes, comments: bool, number: int = 0) -> bool:
  """A line that is no prompt: ASCII whitespace only, a table's header (line 1), or
  (`comments`, a `.txt` file) a `#` comment line. Decided on the bytes, as `Plan` counts
  lines."""
  line = raw.strip()
  if number == 1 and _table(path):
    return True
  return not line or (comments and line.startswith(b"#") and not path.endswith(".jsonl")
                      and not _table(path))


def _table(path: str) -> str | None:
  """The column delimiter of a `.csv` / `.tsv` prompts file; None for other files."""
  return TABLE_DELIMITERS.get(os.path.splitext(path.lower())[1])


def parse_line(path: str, number: int, raw: bytes, comments: bool = False) -> PromptLine | None:
  """One line of a prompts file (`.jsonl`: a JSON object; `.csv` / `.tsv`: a row of the table
  its header names (`table_columns`); else the prompt, or A1111's "Prompts from file" options
  `--prompt "..." --steps 20 ...`); None when blank (with `comments`, A1111 syntax's `#`, a
  `.txt` line that is only a comment too)."""
  if _blank(path, raw, comments, number):
    return None
  line = _decode(path, number, raw)
  where = f"{path} line {number}"
  if _table(path):
    return _prompt_line(path, where, _table_row(path, where, line))
  if not path.endswith(".jsonl"):
    if not _is_a1111_options(line):
      return PromptLine(line.strip())
    try:
      return _prompt_line(path, where, a1111_options(line, where))
    except RunError as e:  # in the words the line used
      raise RunError(re.sub(r'"(\w+)"', lambda m: _A1111_NAMES.get(m[1], m[0]), str(e))) from None
  else:
    try:
      obj = json.loads(line)
    except json.JSONDecodeError as e:
      raise RunError(f"{where}: not valid JSON ({e.msg})") from None
  return _prompt_line(path, where, obj)


def _prompt_line(path: str, where: str, obj) -> PromptLine:
  """A prompts-file line from its jsonl fields, checked."""
  if isinstance(obj, dict) and "parameters" in obj:
    obj = _with_parameters(path, where, obj)
  if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
    raise RunError(f"{where}: needs an object with a string \"prompt\"")
  unknown = set(obj) - set(_JSONL_FIELDS)
  if unknown:
    raise RunError(f"{where}: unknown field {sorted(unknown)[0]!r}")
  for key in ("negative_prompt", "hires_prompt", "hires_negative_prompt", "prompt_2",
              "negative_prompt_2"):
    if obj.get(key) is not None and not isinstance(obj[key], str):
      raise RunError(f"{where}: \"{key}\" must be a string")
  negative = obj.get("negative_prompt")
  for key, least in (("seed", 0), ("num_images", 1), ("steps", 1), ("subseed", 0),
                     ("clip_skip", 1)):
    value = obj.get(key)
    if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                              or value < least):
      kind = "positive" if least else "non-negative"
      raise RunError(f"{where}: \"{key}\" must be a {kind} integer")
  for key in ("width", "height"):
    if obj.get(key) is not None:
      check_size(obj[key], f'{where}: "{key}"')
  init, mask = (_image_path(path, where, obj, key) for key in ("init_image", "mask_image"))
  control, ip_image = (_image_paths(path, where, obj, key)
                       for key in ("control_image", "ip_adapter_image"))
  if mask is not None and init is None:
    raise RunError(f'{where}: "mask_image" marks what to repaint in an "init_image": give both')
  depth = _image_path(path, where, obj, "depth_image")
  if depth is not None and init is None:
    raise RunError(f'{where}: "depth_image" is the depth map of an "init_image": give both')
  guidance, strength = obj.get("guidance_scale"), obj.get("strength")
  if guidance is not None and not (_is_number(guidance) and guidance >= 0):
    raise RunError(f'{where}: "guidance_scale" must be a number >= 0')
  if strength is not None:
    if not (_is_number(strength) and 0 < strength <= 1):
      raise RunError(f'{where}: "strength" must be a number in (0, 1]')
    if init is None:
      raise RunError(f'{where}: "strength" is how much of an "init_image" to repaint: give one')
  subseed_strength = obj.get("subseed_strength")
  if subseed_strength is not None:
    if not (_is_number(subseed_strength) and 0 <= subseed_strength <= 1):
      raise RunError(f'{where}: "subseed_strength" must be a number in [0, 1]')
    if obj.get("subseed") is None:
      raise RunError(f'{where}: "subseed_strength" moves the noise towards a variation seed\'s: '
                     f'give "subseed" too')
  scheduler = obj.get("scheduler")
  if scheduler is not None:
    scheduler = _scheduler(scheduler, where)
  schedule_type = obj.get("schedule_type")
  if schedule_type is not None:
    schedule_type = _schedule_type(schedule_type, where)
  options = obj.get("scheduler_options")
  if options is not None:
    _check_options(options, where)
  styles = obj.get("styles")
  if isinstance(styles, str):
    styles = [styles]
  if styles is not None and not (isinstance(styles, list)
                                 and all(isinstance(s, str) for s in styles)):
    raise RunError(f'{where}: "styles" must be a style name or a list of them')
  return PromptLine(obj["prompt"], negative, obj.get("seed"), obj.get("num_images"),
                    obj.get("width"), obj.get("height"), init,
                    None if guidance is None else float(guidance), mask, obj.get("steps"),
                    scheduler, None if strength is None else float(strength), control,
                    ip_image, obj.get("hires_prompt"), obj.get("hires_negative_prompt"),
                    schedule_type, None if styles is None else tuple(styles),
                    obj.get("subseed"),
                    None if subseed_strength is None else float(subseed_strength),
                    freeze_options(options) if options else None, obj.get("clip_skip"),
                    obj.get("prompt_2"), obj.get("negative_prompt_2"), depth)


def _check_options(options, where: str) -> None:
  """A line's scheduler options: an object of finite numbers, strings, true / false, null or
  lists of numbers (what schedulers take; each scheduler then checks its own)."""
  if not isinstance(options, dict):
    raise RunError(f'{where}: "scheduler_options" must be an object {{"option": value}}')
  for key, value in options.items():
    values = value if isinstance(value, list) else [value]
    scalars = (str, bool, type(None)) if not isinstance(value, list) else ()
    if not all(isinstance(v, scalars) or _is_number(v) for v in values):
      raise RunError(f'{where}: "scheduler_options": {key} must be a finite number, a string, '
                     f"true, false, null or a list of numbers, got {json.dumps(value)}")


def freeze_options(options: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
  """Scheduler options as a line holds them (hashable: sorted pairs, lists as tuples);
  `thaw_options` gives the dict back."""
  return tuple(sorted((key, tuple(value) if isinstance(value, list) else value)
                      for key, value in options.items()))


def thaw_options(options: tuple[tuple[str, Any], ...] | None) -> dict[str, Any]:
  return {key: list(value) if isinstance(value, tuple) else value
          for key, value in options or ()}


# The jsonl fields a line takes from an image's A1111 parameters (its "parameters" field): the
# main.py flags of the same names that `infotext.reproduce` reads, as a line's values.
_PARAMETERS_FIELDS = {"prompt": str, "negative_prompt": str, "seed": int, "steps": int,
                      "scheduler": str, "schedule_type": str, "width": int, "height": int,
                      "guidance_scale": float, "subseed": int, "subseed_strength": float,
                      "hires_prompt": str, "hires_negative_prompt": str,
                      "scheduler_options": json.loads, "clip_skip": int, "prompt_2": str,
                      "negative_prompt_2": str}


# What lines' "parameters" asked for that a line cannot set or sdjax cannot give, said once per
# process (a gallery's lines mostly ask the same); not the run's model and VAE, which are the
# lines' by design, nor a list of sigmas or timesteps, which the line takes as options.
_WARNED: set[str] = set()
_RUN_DECIDES = ("model", "vae", "sigmas", "timesteps")


def _warn_once(key: str, text: str) -> None:
  if key not in _WARNED:
    _WARNED.add(key)
    logging.warning("%s", text)


@functools.lru_cache(maxsize=16)
def table_columns(path: str) -> tuple[str | None, ...]:
  """The jsonl field of each column of a `.csv` / `.tsv` prompts file (None: a column left
  out), from its header row; the columns left out are named in a warning, once."""
  with _open(path) as f:
    raw = f.readline()
  header = _decode(path, 1, raw).lstrip("\ufeff")  # a spreadsheet's byte-order mark
  try:
    names = next(csv.reader([header], delimiter=_table(path), strict=True), [])
  except csv.Error as e:
    raise RunError(f"prompts file {path}: its header row is not one line of a table ({e})"
                   ) from None
  names = [name.strip().lower() for name in names]
  prompt = next((name for name in _PROMPT_COLUMNS if name in names), None)
  if prompt is None:
    raise RunError(f"prompts file {path}: its header row names no prompt column (one of "
                   f"{', '.join(_PROMPT_COLUMNS)}; got {', '.join(names) or 'nothing'})")
  fields = {*_JSONL_FIELDS, "parameters"} - {"prompt"}
  columns = tuple("prompt" if name == prompt else name if name in fields else None
                  for name in names)
  for name in set(names):
    if names.count(name) > 1 and name in {prompt, *fields}:
      raise RunError(f"prompts file {path}: its header row names column {name!r} twice")
  left_out = [name for name, field in zip(names, columns, strict=True) if field is None]
  if left_out:
    logging.warning("prompts file %s: columns %s are not prompt settings; left out", path,
                    ", ".join(repr(n) for n in left_out))
  return columns


def _table_row(path: str, where: str, line: str) -> dict[str, Any]:
  """A `.csv` / `.tsv` row as the jsonl object its header's columns make (empty cells left
  out; numbers and JSON cells read)."""
  columns = table_columns(path)
  try:
    cells = next(csv.reader([line.rstrip("\r\n")], delimiter=_table(path), strict=True), [])
  except csv.Error as e:
    raise RunError(f"{where}: not one row of a table ({e}; a row must sit on one line)"
                   ) from None
  if len(cells) > len(columns):
    raise RunError(f"{where}: {len(cells)} cells, the header names {len(columns)} columns")
  obj: dict[str, Any] = {}
  for field, cell in zip(columns, cells, strict=False):
    if field is None or (field != "prompt" and not cell.strip()):
      continue
    try:
      if field in _TABLE_INTS:
        obj[field] = int(cell)
      elif field in _TABLE_FLOATS:
        obj[field] = float(cell)
      elif field in _TABLE_JSON and cell.lstrip().startswith(("[", "{")):
        obj[field] = json.loads(cell)
      else:
        obj[field] = cell
    except ValueError:
      kind = "an integer" if field in _TABLE_INTS else "a number" if field in _TABLE_FLOATS \
        else "JSON"
      raise RunError(f"{where}: column {field!r} must be {kind}, got {cell!r}") from None
  return obj


def _with_parameters(path: str, where: str, obj: dict) -> dict:
  """A jsonl line with `"parameters": "image.png"` (A1111's, or sdjax's, or a text file of
  them): the image's prompts and per-image settings, under the line's own fields. What else the
  image asks for (run-wide settings: the flags decide; what sdjax cannot give) is a warning, once
  per kind."""
  from sdjax import infotext  # noqa: PLC0415

  file = _image_path(path, where, obj, "parameters")
  try:
    text = infotext.read_parameters_file(file)
  except (OSError, ImportError, ValueError) as e:
    raise RunError(f'{where}: cannot read "parameters" {file} '
                   f"({getattr(e, 'strerror', None) or e})") from None
  try:
    if text is None:
      raise ValueError("no A1111 parameters in it")
    found = infotext.reproduce(text)
    flags = found.flags
    fields = {key: kind(flags[key][0] if key == "prompt" else flags[key])
              for key, kind in _PARAMETERS_FIELDS.items() if key in flags}
    if "strength" in flags and obj.get("init_image"):  # an img2img image's, of the line's image
      fields["strength"] = float(flags["strength"])
    for key in ("sigmas", "timesteps"):  # flags of their own on the command line
      if key in flags:
        fields["scheduler_options"] = {**fields.get("scheduler_options", {}),
                                       key: [float(v) for v in flags[key]]}
  except ValueError as e:
    raise RunError(f'{where}: "parameters" {file}: {e}') from None
  # The run's model and VAE are the lines' (README: a gallery made again with the run's model).
  run_wide = sorted(f"--{key}={','.join(value) if isinstance(value, list) else value}"
                    for key, value in flags.items()
                    if key not in _PARAMETERS_FIELDS and key not in _RUN_DECIDES
                    and key != "strength"  # the line's (with its init image), else noted
                    and (key, value) != ("rng", "jax"))  # sdjax's own noise: the default
  if run_wide:
    _warn_once(" ".join(run_wide), f'{where}: "parameters" {file} (and any line like it) asks '
               f"for run-wide settings, which the run's flags decide: {' '.join(run_wide)}")
  for flag, note in found.notes:
    if flag not in _RUN_DECIDES and not (flag == "init_image" and obj.get("init_image")):
      _warn_once(note, f'{where}: "parameters" {file}: {note}')
  line = {**fields, **{k: v for k, v in obj.items() if k != "parameters"}}
  if isinstance(obj.get("scheduler_options"), dict) and "scheduler_options" in fields:
    line["scheduler_options"] = {**fields["scheduler_options"], **obj["scheduler_options"]}
  return line


# A1111's "Prompts from file or textbox" script: a line of `--tag value` options. The tags that
# decide an image, as sdjax's jsonl fields (with how to read the value); the output-location
# ones, which sdjax's own layout replaces, are read and ignored; any other is refused.
_A1111_TAGS = {"prompt": ("prompt", str), "negative_prompt": ("negative_prompt", str),
               "seed": ("seed", int), "steps": ("steps", int),
               "cfg_scale": ("guidance_scale", float), "width": ("width", int),
               "height": ("height", int), "sampler_name": ("scheduler", str),
               "n_iter": ("n_iter", int), "batch_size": ("batch_size", int),
               "subseed": ("subseed", int), "subseed_strength": ("subseed_strength", float)}
_A1111_IGNORED = ("outpath_samples", "outpath_grids", "prompt_for_display", "do_not_save_samples",
                  "do_not_save_grid")
# jsonl field -> the option an A1111 line gave it by (for errors).
_A1111_NAMES = {**{key: f"--{tag}" for tag, (key, _) in _A1111_TAGS.items()},
                "num_images": "--n_iter x --batch_size"}


@functools.cache
def _a1111_samplers() -> dict[str, str]:
  """A1111's sampler names by their lower case."""
  from sdjax import outputs  # noqa: PLC0415

  return {name.lower(): name for name in outputs.A1111_SAMPLER_NAMES.values()}


def _is_a1111_options(line: str) -> bool:
  """Whether a prompts-file line is A1111 script options: it starts with `--` and one of its
  tags (a prompt that merely starts with dashes stays a prompt)."""
  head = line.lstrip()
  if not head.startswith("--"):
    return False
  tag = head[2:].split(maxsplit=1)[0] if len(head) > 2 else ""
  return tag in _A1111_TAGS or tag in _A1111_IGNORED


def a1111_options(line: str, where: str) -> dict[str, Any]:
  """A line of A1111's "Prompts from file or textbox" (`--prompt "a cat" --steps 20
  --sampler_name "Euler a" ...`, read as its script does: shell quoting, a prompt running to the
  next `--`) as sdjax's jsonl fields; `--n_iter` times `--batch_size` is the line's image count."""
  try:
    args = shlex.split(line)
  except ValueError as e:
    raise RunError(f"{where}: cannot read A1111 prompt options ({e})") from None
  out: dict[str, Any] = {}
  pos = 0
  while pos < len(args):
    arg = args[pos]
    tag = arg[2:] if arg.startswith("--") else None
    if tag not in _A1111_TAGS and tag not in _A1111_IGNORED:
      what = f"unknown option {arg!r}" if tag else f"{arg!r} is not an option (--tag value)"
      raise RunError(f"{where}: {what}; sdjax reads A1111's "
                     f"{', '.join('--' + t for t in _A1111_TAGS)}")
    if pos + 1 >= len(args):
      raise RunError(f"{where}: {arg} needs a value")
    if tag in ("prompt", "negative_prompt"):  # words up to the next option, as A1111
      end = pos + 1
      while end < len(args) and (end == pos + 1 or not args[end].startswith("--")):
        end += 1
      out[tag] = " ".join(args[pos + 1:end])
      pos = end
      continue
    value = args[pos + 1]
    pos += 2
    if tag in _A1111_IGNORED:
      continue
    key, kind = _A1111_TAGS[tag]
    if tag == "sampler_name":  # A1111 looks its samplers up in lower case
      value = _a1111_samplers().get(value.lower(), value)
    try:
      out[key] = kind(value)
    except ValueError:
      raise RunError(f"{where}: {arg} must be {'an integer' if kind is int else 'a number'}, "
                     f"got {value!r}") from None
  if "prompt" not in out:
    raise RunError(f"{where}: A1111 prompt options need --prompt")
  n_iter, batch = out.pop("n_iter", None), out.pop("batch_size", None)
  if n_iter is not None or batch is not None:
    out["num_images"] = (1 if n_iter is None else n_iter) * (1 if batch is None else batch)
  return out


def _image_paths(path: str, where: str, obj: dict, key: str):
  """A line's image for a control model, or a list of one per model (null: the run's)."""
  value = obj.get(key)
  if not isinstance(value, list):
    return _image_path(path, where, obj, key)
  if not value:
    raise RunError(f'{where}: "{key}" must be a path or a list of them')
  return tuple(_image_path(path, where, {key: x}, key) for x in value)


def _scheduler(name, where: str) -> str:
  """A line's scheduler: one of sdjax's names, or the sampler name A1111 writes for it ("Euler a",
  "DPM++ 2M Karras"; as its PNG parameters and prompts-from-file say)."""
  from sdjax import outputs  # noqa: PLC0415

  try:
    return outputs.scheduler_name(name)
  except ValueError as e:
    raise RunError(f'{where}: "scheduler" {e}') from None


def _schedule_type(name, where: str) -> str:
  """A line's schedule type, given in A1111's words ("Karras", "Align Your Steps") or sdjax's,
  as sdjax names it ("karras", "align_your_steps"; "automatic": the scheduler's own), so that
  lines that say the same in other words share a program."""
  from sdjax import outputs  # noqa: PLC0415

  try:
    if not isinstance(name, str):
      raise ValueError(f"a string, got {name!r}")
    options = outputs.schedule_type_options(name)
  except ValueError as e:
    raise RunError(f'{where}: "schedule_type": {e}') from None
  return options.get("schedule_type", "automatic")


def _is_number(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _image_path(path: str, where: str, obj: dict, key: str) -> str | None:
  """A line's image path (a local path is relative to the prompts file, which may be an fsspec
  URL), or None."""
  value = obj.get(key)
  if value is None:
    return None
  if not isinstance(value, str) or not value:
    raise RunError(f'{where}: "{key}" must be a path')
  if "://" in value:
    return value
  if "://" in path:
    return f"{path.rsplit('/', 1)[0]}/{value}"
  return os.path.join(os.path.dirname(os.path.abspath(path)), os.path.expanduser(value))


def _decode(path: str, number: int, raw: bytes) -> str:
  try:
    return raw.decode("utf-8")
  except UnicodeDecodeError as e:
    raise RunError(f"cannot read prompts file {path}: line {number} is not UTF-8 ({e.reason})"
                   ) from None


def read_prompts_file(path: str, comments: bool = False) -> list[PromptLine]:
  """Every prompt of a (small) prompts file, parsed; runs stream the file with `Plan` instead."""
  table_columns.cache_clear()
  with _open(path) as f:
    lines = [parse_line(path, n, raw, comments) for n, raw in enumerate(f, 1)]
  prompts = [p for p in lines if p is not None]
  if not prompts:
    raise RunError(f"prompts file {path} holds no prompts")
  return prompts


def _open(path: str):
  """The prompts file, binary: a local path or any fsspec URL (gs://, s3://, memory://; the
  store's package installed)."""
  try:
    if "://" in path:
      import fsspec  # noqa: PLC0415

      return fsspec.open(path, "rb").open()
    return open(path, "rb")
  except FileNotFoundError:
    raise RunError(f"prompts file {path} does not exist") from None
  except (OSError, ImportError, ValueError) as e:
    raise RunError(f"cannot read prompts file {path}: {getattr(e, 'strerror', None) or e}"
                   ) from None


@dataclasses.dataclass(frozen=True)
class _Cursor:
  """Where a shard starts: prompt entry `entry` (the `--prompt`s, then the file's lines, blank
  lines included), at byte `offset` of the file, its image `skip` of that entry."""

  entry: int
  offset: int
  skip: int


def _key(line: PromptLine) -> list:
  """A command-line prompt as the run's digest holds it (the per-line settings only when set, so
  the digests of runs from before them stay valid)."""
  key = [line.prompt, line.negative_prompt, line.seed, line.num_images]
  extra = [line.width, line.height, line.init_image, line.guidance_scale]
  if line.mask_image is not None:
    extra.append(line.mask_image)
  if line.depth_image is not None:
    extra.append({"depth_image": line.depth_image})
  for field in ("control_image", "ip_adapter_image"):
    value = getattr(line, field)
    if value is not None:
      extra.append({field: list(value) if isinstance(value, tuple) else value})
  schedule = {k: v for k, v in (("steps", line.steps), ("scheduler", line.scheduler),
                                ("strength", line.strength),
                                ("schedule_type", line.schedule_type),
                                ("styles", None if line.styles is None else list(line.styles)),
                                ("subseed", line.subseed),
                                ("subseed_strength", line.subseed_strength),
                                ("scheduler_options", line.scheduler_options and thaw_options(
                                    line.scheduler_options)),
                                ("clip_skip", line.clip_skip))
              if v is not None}
  if schedule:
    extra.append(schedule)
  hires = {k: v for k, v in (("hires_prompt", line.hires_prompt),
                             ("hires_negative_prompt", line.hires_negative_prompt))
           if v is not None}
  if hires:
    extra.append(hires)
  second = {k: v for k, v in (("prompt_2", line.prompt_2),
                              ("negative_prompt_2", line.negative_prompt_2)) if v is not None}
  if second:
    extra.append(second)
  return key + extra if any(x is not None for x in extra) else key


class Plan:
  """The run's images: counted, hashed and indexed by shard in one pass over the prompts file."""

  def __init__(self, prompts: Sequence[PromptLine], prompts_file: str | None, *,
               num_images_per_prompt: int, seed: int, negative_prompt: str, shard_size: int,
               comments: bool = False, dynamic: DynamicPrompts | None = None, styles=None,
               noise_batch: int = 1):
    self.prompts, self.prompts_file, self.comments = tuple(prompts), prompts_file, comments
    # ComfyUI's batches (--noise_batch): image i of the run (or j of a line with its own seed)
    # takes seed + i // noise_batch, at place i % noise_batch of that seed's batch.
    self.noise_batch = noise_batch
    # A1111's saved styles (`prompts.Styles`): applied to each image's texts; None: none.
    self.styles = styles
    self.num_images_per_prompt, self.seed = num_images_per_prompt, seed
    self.negative_prompt, self.shard_size = negative_prompt, shard_size
    # Dynamic prompts: each image's text sampled from its line's template (random), or every
    # text a template makes a prompt of its own (combinatorial: counted in the first pass).
    self.dynamic = dynamic
    self._negatives = 1  # combinatorial: the texts of the run's negative prompt
    if self._combinatorial:
      with _templates("--negative_prompt"):
        self._negatives = dynamic.count(negative_prompt)
    self.total = 0
    self._starts: list[_Cursor] = []
    digest = hashlib.sha256(json.dumps(
        [num_images_per_prompt, seed, negative_prompt, [_key(p) for p in self.prompts]]).encode())
    for entry, prompt in enumerate(self.prompts):
      self._count(entry, 0, self._images(prompt, "--prompt"))
    if prompts_file is not None:
      self._scan_file(digest)
    self.digest = digest.hexdigest()
    if not self.total:
      raise RunError("no prompts: give --prompt or --prompts_file")

  @property
  def num_shards(self) -> int:
    return -(-self.total // self.shard_size)

  def shard_range(self, shard: int) -> range:
    return range(shard * self.shard_size, min((shard + 1) * self.shard_size, self.total))

  def _count(self, entry: int, offset: int, images: int) -> None:
    # Notes a cursor for every shard that starts among this entry's images.
    end = self.total + images
    next_start = len(self._starts) * self.shard_size
    while next_start < end:
      self._starts.append(_Cursor(entry, offset, next_start - self.total))
      next_start += self.shard_size
    self.total = end

  def _scan_file(self, digest) -> None:
    # Only lines that may name `num_images` are parsed: a plain line has the run's count.
    path, jsonl = self.prompts_file, self.prompts_file.endswith(".jsonl")
    # A table's rows say their image count only in a num_images column, when it has one.
    table_columns.cache_clear()  # the header as it is now, for this run
    counted = _table(path) is not None and "num_images" in table_columns(path)
    entry, offset, total_before = len(self.prompts), 0, self.total
    with _open(path) as f:
      for number, raw in enumerate(f, 1):
        digest.update(raw)
        if not _blank(path, raw, self.comments, number):
          images = self.num_images_per_prompt
          if self._combinatorial and _may_be_template(raw):
            images = self._images(parse_line(path, number, raw, self.comments),
                                  f"{path} line {number}")
          elif self._combinatorial:
            images *= self._negatives
          elif counted or (b"num_images" in raw if jsonl else not _table(path) and
                           raw.lstrip().startswith(b"--") and (b"--n_iter" in raw or
                                                               b"--batch_size" in raw)):
            images = parse_line(path, number, raw).num_images or images
          self._count(entry, offset, images)
        entry += 1
        offset += len(raw)
    if self.total == total_before:
      raise RunError(f"prompts file {path} holds no prompts")

  @property
  def _combinatorial(self) -> bool:
    return self.dynamic is not None and self.dynamic.mode == "combinatorial"

  def _negative(self, line: PromptLine) -> str:
    return self.negative_prompt if line.negative_prompt is None else line.negative_prompt

  def _images(self, line: PromptLine, where: str) -> int:
    """How many images a prompt line makes (combinatorial: per text its templates make)."""
    images = line.num_images or self.num_images_per_prompt
    if self._combinatorial:
      with _templates(where):
        images *= self.dynamic.count(line.prompt)
        if line.negative_prompt is not None:
          images *= self.dynamic.count(line.negative_prompt)
        else:
          images *= self._negatives
    return images

  def _texts(self, line: PromptLine) -> Iterator[tuple[int, str, str]]:
    """(image within the line, prompt, negative prompt) for each of a line's images; random
    dynamic prompts are sampled later, by each image's seed."""
    count = line.num_images or self.num_images_per_prompt
    pairs = [(line.prompt, self._negative(line))]
    if self._combinatorial:
      pairs = self.dynamic.pairs(*pairs[0])
    j = 0
    for prompt, negative in pairs:
      for _ in range(count):
        yield j, prompt, negative
        j += 1

  def _entries(self, cursor: _Cursor) -> Iterator[tuple[str, PromptLine | None]]:
    for line in self.prompts[cursor.entry:]:
      yield "--prompt", line
    if self.prompts_file is None:
      return
    first = max(cursor.entry - len(self.prompts), 0)
    offset = cursor.offset if cursor.entry >= len(self.prompts) else 0
    with _open(self.prompts_file) as f:
      f.seek(offset)
      for number, raw in enumerate(f, first + 1):
        yield (f"{self.prompts_file} line {number}",
               parse_line(self.prompts_file, number, raw, self.comments))

  def jobs(self, shard: int) -> Iterator[ImageJob]:
    """The images of `shard`, in order, read from where the shard starts."""
    cursor = self._starts[shard]
    wanted = self.shard_range(shard)
    index = wanted.start - cursor.skip
    for where, line in self._entries(cursor):
      if line is None:
        continue
      size = None
      if line.width is not None or line.height is not None:
        size = (line.height, line.width)  # a missing side is the run's (run.py fills it in)
      with _templates(where):
        for j, prompt, negative in self._texts(line):
          if index >= wanted.start:
            k = index if line.seed is None else j
            seed = (self.seed if line.seed is None else line.seed) + k // self.noise_batch
            job = self._job(line, index, j, prompt, negative, seed, size, where)
            yield job if self.noise_batch == 1 else dataclasses.replace(
                job, batch_place=k % self.noise_batch)
          index += 1
          if index >= wanted.stop:
            return  # before reading the next line, which belongs to the next shard

  def _job(self, line: PromptLine, index: int, j: int, prompt: str, negative: str, seed: int,
           size, where: str) -> ImageJob:
    """Image `index` of the run, the line's `j`-th."""
    templates = (None, None)
    if self.dynamic is not None:  # random: the image's own pick, by its seed
      templates = tuple(t if is_template(t) else None
                        for t in (line.prompt, self._negative(line)))
      if self.dynamic.mode == "random":
        prompt, negative = (self.dynamic.sample(t, seed) for t in (prompt, negative))
    hires = (line.hires_prompt, line.hires_negative_prompt)
    second = (line.prompt_2, line.negative_prompt_2)
    if line.styles is not None and self.styles is None:
      raise RunError(f'{where}: "styles" are names in a styles file: give --styles_file')
    if self.styles is not None:  # on the final texts, as A1111 styles the prompts it encodes
      try:
        prompt, negative = self.styles.apply(prompt, negative, line.styles)
        hires, second = (tuple(None if text is None else self.styles.apply(
            text, text, line.styles)[k] for k, text in enumerate(texts))
            for texts in (hires, second))
      except ValueError as e:
        raise RunError(f"{where}: {e}") from None
    return ImageJob(index, prompt, negative, seed, size, line.init_image, line.guidance_scale,
                    line.mask_image, line.steps, line.scheduler, line.strength,
                    line.control_image, line.ip_adapter_image, *hires, *templates,
                    schedule_type=line.schedule_type,
                    subseed=None if line.subseed is None else line.subseed + j,
                    subseed_strength=line.subseed_strength,
                    scheduler_options=line.scheduler_options, clip_skip=line.clip_skip,
                    prompt_2=second[0], negative_prompt_2=second[1],
                    depth_image=line.depth_image)


_SYNTAX_BYTES = (*(s.encode() for s in SYNTAX), b"\\")  # and any JSON escape


def _may_be_template(raw: bytes) -> bool:
  """Whether a prompts file's line may hold dynamic-prompts syntax (or a JSON escape of it)."""
  return any(s in raw for s in _SYNTAX_BYTES)


@contextlib.contextmanager
def _templates(where: str):
  """A template error as a run error naming its line."""
  try:
    yield
  except TemplateError as e:
    raise RunError(f"{where}: {e}") from None
