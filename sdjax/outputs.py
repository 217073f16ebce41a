"""Output files safe to resume and to share: A1111 text, atomic writes, previews, a manifest.

`run.py` writes through `sinks.py` (one writer per shard, per-shard manifests); the shared,
append-only `Manifest` and `finished` below are the older single-folder scheme, kept for tools
that append to one folder from several processes.

A run may be killed at any instant and several processes may write into one folder at once (each
its own images, all one manifest). The rules that make that safe:

* Every file is written under a temporary name in the same folder, fsynced, then renamed over
  the final name, so a final name never holds a partial file.
* `manifest.jsonl` gets one JSON line per finished image, appended with a single `os.write` on
  an `O_APPEND` descriptor and fsynced, so lines from concurrent processes never interleave.
  The image is written before its line: a line only ever names a complete file.
* An image counts as done only when its manifest line exists and the file's sha256 matches it
  (`finished`); anything else is generated again and overwritten.

`O_APPEND` is atomic on local filesystems; on NFS, appends from different machines can clobber
each other, so there give each machine its own output folder.
"""

from __future__ import annotations

import fcntl
import hashlib
import html
import io
import itertools
import json
import math
import os
import re
import socket
import struct
import time
import urllib.parse
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
from absl import logging
from PIL import Image, ImageOps, PngImagePlugin

MANIFEST_NAME = "manifest.jsonl"
GRID_NAME = "grid.png"
INDEX_HTML_NAME = "index.html"

# A contact sheet of thousands of images would be huge and take minutes to encode; it is a preview.
MAX_GRID_IMAGES = 256
# 16 x 16 cells of 1024 px would need a 800 MB canvas; cells shrink to keep both sides below this.
MAX_GRID_SIDE = 8192

# Our scheduler names -> the sampler names AUTOMATIC1111's web UI writes and understands.
A1111_SAMPLER_NAMES = {
    "ddim": "DDIM",
    "pndm": "PLMS",
    "lms": "LMS",
    "lms_karras": "LMS Karras",
    "euler": "Euler",
    "euler_ancestral": "Euler a",
    "heun": "Heun",
    "dpmpp_2m": "DPM++ 2M",
    "dpmpp_2m_karras": "DPM++ 2M Karras",
    "dpmpp_2m_sde": "DPM++ 2M SDE",
    "dpmpp_2m_sde_karras": "DPM++ 2M SDE Karras",
    "dpmpp_sde": "DPM++ SDE",
    "dpmpp_sde_karras": "DPM++ SDE Karras",
    "dpmpp_2m_sde_heun": "DPM++ 2M SDE Heun",
    "dpmpp_2m_sde_heun_karras": "DPM++ 2M SDE Heun Karras",
    "dpmpp_3m_sde": "DPM++ 3M SDE",
    "dpmpp_3m_sde_karras": "DPM++ 3M SDE Karras",
    "kdpm2": "DPM2",
    "kdpm2_karras": "DPM2 Karras",
    "kdpm2_ancestral": "DPM2 a",
    "kdpm2_ancestral_karras": "DPM2 a Karras",
    "dpmpp_2s_ancestral": "DPM++ 2S a",
    "dpmpp_2s_ancestral_karras": "DPM++ 2S a Karras",
    "restart": "Restart",
    "unipc": "UniPC",
    "ddpm": "DDPM",
    "lcm": "LCM",
    "euler_cfg_pp": "Euler CFG++",  # Forge's names (ComfyUI's euler_cfg_pp, ...)
    "euler_ancestral_cfg_pp": "Euler a CFG++",
    "ipndm": "iPNDM",  # ComfyUI's own samplers (as Forge-derived UIs name them)
    "ipndm_v": "iPNDM_v",
    "res_multistep": "Res Multistep",
    "gradient_estimation": "Gradient Estimation",
    "dpmpp_2m_cfg_pp": "DPM++ 2M CFG++",
    "res_multistep_cfg_pp": "Res Multistep CFG++",
    "gradient_estimation_cfg_pp": "Gradient Estimation CFG++",
    "res_multistep_ancestral": "Res Multistep a",
    "er_sde": "ER SDE",
    "res_multistep_ancestral_cfg_pp": "Res Multistep a CFG++",
    "deis_tab": "DEIS",
    "seeds_2": "SEEDS 2",
    "seeds_3": "SEEDS 3",
    "heunpp2": "HeunPP2",
    "dpmpp_2s_ancestral_cfg_pp": "DPM++ 2S a CFG++",
    "dpm_fast_ancestral": "DPM fast",  # A1111's (ComfyUI's dpm_fast: sdjax's dpm_fast)
    "dpm_adaptive_ancestral": "DPM adaptive",  # A1111's (ComfyUI's: sdjax's dpm_adaptive)
    "ddim_cfg_pp": "DDIM CFG++",
}

# diffusers' sigma-spacing options -> A1111's "Schedule type" (its infotext key since 1.9).
A1111_SCHEDULE_TYPES = {"use_karras_sigmas": "Karras", "use_exponential_sigmas": "Exponential",
                        "use_beta_sigmas": "Beta"}
# sdjax's `schedule_type` option (`schedulers.sigma_schedules`) -> A1111's Schedule type.
A1111_SCHEDULE_TYPE_NAMES = {"align_your_steps": "Align Your Steps",
                             "align_your_steps_sdxl": "Align Your Steps",
                             "sgm_uniform": "SGM Uniform", "normal": "Normal",
                             "uniform": "Uniform", "simple": "Simple", "kl_optimal": "KL Optimal",
                             "karras": "Karras", "exponential": "Exponential", "beta": "Beta",
                             "polyexponential": "Polyexponential",
                             # Forge's
                             "align_your_steps_gits": "Align Your Steps GITS",
                             "align_your_steps_gits_sdxl": "Align Your Steps GITS",
                             "align_your_steps_32": "Align Your Steps 32",
                             "align_your_steps_32_sdxl": "Align Your Steps 32", "turbo": "Turbo"}
# Other words for them: Forge's "Align Your Steps 11" is A1111's Align Your Steps levels.
_SCHEDULE_TYPE_ALIASES = {"align your steps 11": "align_your_steps"}

_NEGATIVE_PREFIX = "Negative prompt:"
# One `Key: value` item of A1111's last line; a value is either JSON-quoted or runs to the comma.
_PARAM_RE = re.compile(r'\s*(\w[\w /-]*):\s*("(?:[^"\\]|\\.)*"|[^,]*)(?:,|$)')

_HOST = re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname()) or "host"
_TEMP_RE = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<pid>\d+)-(?P<host>[A-Za-z0-9._-]*)$")

# Written (in the same write as the next record) right after a line that an interrupted append
# cut short, so `records` can tell that line from corruption.
_TORN_MARKER = b'{"_torn_line_above":true}'


class OutputError(ValueError):
  """An output folder that cannot be used."""


# --- AUTOMATIC1111 `parameters` text ----------------------------------------------------------


def _a1111_quote(value: Any) -> str:
  # A1111 JSON-quotes exactly the values that would break its `Key: value, ...` line; a leading
  # quote is added here because A1111 would otherwise JSON-decode the raw value on reading.
  text = str(value)
  if any(c in text for c in ",:\n") or text.startswith('"'):
    return json.dumps(text, ensure_ascii=False)
  return text


def a1111_schedule_type(scheduler_options) -> str | None:
  """A1111's `Schedule type` for scheduler options (pairs or a dict) that set one of diffusers'
  sigma spacings or an A1111 `schedule_type`; None otherwise (a name's own Karras is in its A1111
  sampler name; A1111 has no word for a list of sigmas)."""
  options = dict(scheduler_options or {})
  if options.get("schedule_type") in A1111_SCHEDULE_TYPE_NAMES:
    return A1111_SCHEDULE_TYPE_NAMES[options["schedule_type"]]
  return next((label for key, label in A1111_SCHEDULE_TYPES.items() if options.get(key)), None)


def scheduler_name(name: str) -> str:
  """sdjax's scheduler name for one of its own or for the sampler name A1111 writes for it
  ("Euler a", "DPM++ 2M Karras"); ValueError naming both lists otherwise."""
  from sdjax import schedulers  # noqa: PLC0415

  ours = {a1111: key for key, a1111 in A1111_SAMPLER_NAMES.items()}
  if isinstance(name, str) and (name in schedulers.SCHEDULERS or name in ours):
    return ours.get(name, name)
  raise ValueError(f"must be one of {', '.join(schedulers.SCHEDULERS)}, or A1111's name of one "
                   f"({', '.join(ours)})")


def schedule_type_options(value: str) -> dict[str, Any]:
  """The scheduler options of a schedule type named by sdjax (`align_your_steps`, `karras`) or
  as A1111 writes it (`Align Your Steps`, `Karras`; `Automatic`: none): {"schedule_type": name}
  (`schedulers.get_scheduler` turns Karras, Exponential and Beta into diffusers' spacing
  options). ValueError if unknown."""
  ours = {**{label.lower(): name for name, label in A1111_SCHEDULE_TYPE_NAMES.items()
             if not name.endswith("_sdxl")}, **{name: name for name in A1111_SCHEDULE_TYPE_NAMES},
          **_SCHEDULE_TYPE_ALIASES}
  key = value.strip().lower()
  if key == "automatic":
    return {}
  if key in ours:
    return {"schedule_type": ours[key]}
  names = sorted(set(A1111_SCHEDULE_TYPE_NAMES.values()))
  raise ValueError(f"unknown schedule type {value!r}; pick one of Automatic, {', '.join(names)} "
                   "(or sdjax's names: align_your_steps, sgm_uniform, ...)")


def a1111_parameters(*, prompt: str, negative_prompt: str, steps: int, sampler: str,
                     cfg_scale: float, seed: int, width: int, height: int, model: str,
                     model_hash: str | None = None, eta: float = 0.0,
                     version: str | None = None, extra: dict[str, Any] | None = None) -> str:
  """The text AUTOMATIC1111's web UI stores in (and reads from) a PNG `parameters` chunk.

  ```
  a photo of a cat
  Negative prompt: blurry
  Steps: 30, Sampler: Euler a, CFG scale: 7.5, Seed: 42, Size: 512x512, Model: sd-v1-5
  ```

  As in A1111: the negative prompt line is left out when it is empty, values holding `,`, `:`
  or a newline are JSON-quoted, the CFG scale is Python's `str(float)` (`7.0`), and the whole
  text is stripped (a prompt's leading whitespace is lost). `sampler` is one of our scheduler
  names, written under its A1111 name (`A1111_SAMPLER_NAMES`); other names pass through. An
  empty `model`, `model_hash` (A1111's short hash, see `short_hash`) or `version` is left out,
  and so is a zero `eta` (written `Eta DDIM` for DDIM, as A1111 does; `Eta` for TCD, whose
  stochasticity A1111 has no name for); A1111 writes `Model hash` before `Model`, the eta after
  it and `Version` last. `extra` fields (e.g. `Refiner`) come before `Version`, in order.
  """
  params = {
      "Steps": int(steps),
      "Sampler": A1111_SAMPLER_NAMES.get(sampler, sampler),
      "CFG scale": float(cfg_scale),
      "Seed": int(seed),
      "Size": f"{int(width)}x{int(height)}",
      "Model hash": model_hash or None,
      "Model": model or None,
      "Eta DDIM" if sampler == "ddim" else "Eta": float(eta) if eta else None,
      **(extra or {}),
      "Version": version or None,
  }
  line = ", ".join(f"{k}: {_a1111_quote(v)}" for k, v in params.items() if v is not None)
  negative = f"\n{_NEGATIVE_PREFIX} {negative_prompt}" if negative_prompt else ""
  return f"{prompt}{negative}\n{line}".strip()


def short_hash(path: str | os.PathLike, *, cache_file: str | None = None,
               kind: str = "model") -> str:
  """A1111's short hash of a file, as model sites index them.

  kind "model" (`Model hash`, `Refiner`): the first 10 hex digits of the file's sha256;
  "embedding" (`TI hashes`): the first 12; "lora" (`Lora hashes`): the first 12 of the hash
  kohya's scripts write into a safetensors LoRA's metadata (`sshs_model_hash`), else of the
  sha256 of its tensor data after the JSON header (the "addnet" hash, unchanged by metadata
  edits); a LoRA in another format: of the whole file.

  Hashing a multi-GB checkpoint takes seconds, so results are kept in `cache_file` (JSON, keyed
  by kind, absolute path, size and modification time) when given.
  """
  if kind not in _HASH_DIGITS:
    raise ValueError(f"unknown hash kind {kind!r}")
  path = os.path.abspath(os.fspath(path))
  stat = os.stat(path)
  key = f"{path}:{stat.st_size}:{stat.st_mtime_ns}"
  if kind != "model":
    key = f"{kind}:{key}"
  cache = {}
  if cache_file:
    try:
      with open(cache_file, encoding="utf-8") as f:
        cache = json.load(f)
    except (OSError, ValueError):
      cache = {}
    if isinstance(cache, dict) and isinstance(cache.get(key), str):
      return cache[key]
  if kind == "lora" and path.endswith(".safetensors"):
    digest = _lora_hash(path)
  else:
    digest = _sha256_file(path)
  digest = digest[:_HASH_DIGITS[kind]]
  if cache_file:
    try:
      os.makedirs(os.path.dirname(cache_file), exist_ok=True)
      _atomic_write(cache_file, json_bytes({**(cache if isinstance(cache, dict) else {}),
                                            key: digest}))
    except OSError:
      pass  # a read-only cache only costs time
  return digest


_HASH_DIGITS = {"model": 10, "embedding": 12, "lora": 12}


def _lora_hash(path: str) -> str:
  """A safetensors LoRA's `sshs_model_hash`, else the sha256 of the bytes after its header."""
  with open(path, "rb") as f:
    size = int.from_bytes(f.read(8), "little")
    try:
      header = json.loads(f.read(size))
      stored = header.get("__metadata__", {}).get("sshs_model_hash")
    except (ValueError, AttributeError):
      stored = None
    if isinstance(stored, str) and stored:
      return stored
    f.seek(8 + size)
    digest = hashlib.sha256()
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def parse_a1111_parameters(text: str) -> dict[str, str]:
  """Reads A1111 `parameters` text back, the way A1111 itself does.

  Returns `prompt`, `negative_prompt` (empty when absent) and every `Key: value` pair of the last
  line, keys as written (`Steps`, `Sampler`, `CFG scale`, `Seed`, `Size`, `Model`, ...) and values
  as unquoted strings. The last line counts as the parameters line only when it holds at least
  three pairs, as in A1111; otherwise all text is prompt. A prompt line starting with
  `Negative prompt:` is ambiguous in this format and is read as the start of the negative prompt.
  Dynamic prompts' `Template: ...` and `Negative Template: ...` lines after the parameters line
  (as the sd-dynamic-prompts extension writes them) come back as `template` and
  `negative_template`.
  """
  templates = {}
  for key, label in (("negative_template", "\nNegative Template: "),
                     ("template", "\nTemplate: ")):
    at = text.rfind(label)
    if at >= 0:
      text, templates[key] = text[:at], text[at + len(label):]
  lines = text.strip().split("\n")
  pairs = _PARAM_RE.findall(lines[-1])
  if len(pairs) >= 3:
    lines = lines[:-1]
  else:
    pairs = []

  prompt, negative, in_negative = [], [], False
  for line in lines:
    if not in_negative and line.startswith(_NEGATIVE_PREFIX):
      in_negative = True
      line = line[len(_NEGATIVE_PREFIX):]
      line = line[1:] if line.startswith(" ") else line
    (negative if in_negative else prompt).append(line)

  result = {"prompt": "\n".join(prompt), "negative_prompt": "\n".join(negative),
            **templates}
  for key, value in pairs:
    if len(value) >= 2 and value[0] == value[-1] == '"':
      try:
        value = json.loads(value)
      except ValueError:
        pass  # A1111 keeps a value that only looks quoted as it is.
    result[key] = value
  return result


# --- atomic files ------------------------------------------------------------------------------


def _temp_name(name: str) -> str:
  # pid and host let `cleanup_temporaries` tell a dead writer's leftovers from a live one's.
  return f".{name}.tmp-{os.getpid()}-{_HOST}"


def _fsync_dir(folder: str) -> None:
  # Makes a rename or a new file survive a power loss, not just a kill.
  try:
    fd = os.open(folder, os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:
    pass  # Some filesystems cannot fsync a directory; the rename is still atomic.
  finally:
    os.close(fd)


def _atomic_write(path: str | os.PathLike, data: bytes) -> None:
  path = os.path.abspath(os.fspath(path))
  folder, name = os.path.split(path)
  tmp = os.path.join(folder, _temp_name(name))
  try:
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
      view = memoryview(data)
      while view:
        view = view[os.write(fd, view):]
      os.fsync(fd)
    finally:
      os.close(fd)
    os.replace(tmp, path)
  except BaseException:
    try:
      os.remove(tmp)
    except OSError:
      pass
    raise
  _fsync_dir(folder)


def _png_bytes(image: Image.Image, pnginfo: PngImagePlugin.PngInfo | None = None) -> bytes:
  buf = io.BytesIO()
  image.save(buf, format="PNG", pnginfo=pnginfo)
  return buf.getvalue()


IMAGE_FORMATS = ("png", "jpg", "webp")
_EXIF_IFD, _USER_COMMENT = 0x8769, 0x9286
_UNICODE_COMMENT = b"UNICODE\0"  # EXIF's character-code prefix for UCS-2 (big-endian) text


def image_bytes(image: np.ndarray, parameters: str, image_format: str = "png", *,
                quality: int = 80, lossless: bool = False) -> bytes:
  """A uint8 [H, W, 3] image as `image_format` file bytes carrying A1111's `parameters` text.

  As A1111 saves them: a PNG `parameters` text chunk; for jpg and webp the EXIF UserComment, in
  the "UNICODE" character code (UTF-16 big-endian), which A1111's PNG Info tab, civitai and
  other readers take. `quality`: jpg and lossy webp (A1111's "Quality for saved jpeg images",
  default 80); `lossless`: webp (A1111's "Lossless WebP").
  """
  picture = Image.fromarray(image)
  if image_format == "png":
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters)
    return _png_bytes(picture, info)
  if image_format not in IMAGE_FORMATS:
    raise ValueError(f"unknown image format {image_format!r}; pick one of "
                     f"{', '.join(IMAGE_FORMATS)}")
  exif = _user_comment_exif(_UNICODE_COMMENT + parameters.encode("utf_16_be"))
  buf = io.BytesIO()
  if image_format == "jpg":
    picture.save(buf, format="JPEG", quality=quality, exif=exif)
  else:
    picture.save(buf, format="WEBP", quality=quality, lossless=lossless, exif=exif)
  return buf.getvalue()


def _user_comment_exif(comment: bytes) -> bytes:
  """EXIF (APP1 payload) holding only a UserComment in the Exif IFD, typed UNDEFINED as the
  standard says. (PIL's `Image.Exif` types a bytes value BYTE, which piexif, A1111's reader,
  returns as a tuple of ints instead of the text.) Big-endian TIFF: header, IFD0 with one entry
  pointing at the Exif IFD, the Exif IFD with one entry pointing at the comment."""
  exif_ifd, data = 8 + 18, 8 + 18 + 18

  def ifd(tag: int, kind: int, count: int, value: int) -> bytes:
    return struct.pack(">HHHII", 1, tag, kind, count, value) + struct.pack(">I", 0)

  return (b"Exif\0\0MM\0\x2a" + struct.pack(">I", 8) + ifd(_EXIF_IFD, 4, 1, exif_ifd)
          + ifd(_USER_COMMENT, 7, len(comment), data) + comment)


def read_parameters(data: bytes) -> str | None:
  """The A1111 `parameters` text an image file's bytes carry (PNG text chunk, or jpg / webp
  EXIF UserComment), as A1111's PNG Info reads it; None when it carries none."""
  with Image.open(io.BytesIO(data)) as image:
    if "parameters" in image.info:
      return image.info["parameters"]
    comment = image.getexif().get_ifd(_EXIF_IFD).get(_USER_COMMENT)
  if not isinstance(comment, bytes) or len(comment) < 8:
    return None
  codes = {_UNICODE_COMMENT: "utf_16_be", b"ASCII\0\0\0": "ascii"}
  if comment[:8] not in codes:
    return None
  return comment[8:].decode(codes[comment[:8]], errors="replace")


PIXEL_LEVELS = ("round", "floor")
# `FreeU form` in PNGs: the forms other than diffusers' (`unet.FREEU_FORMS`), by their name there.
FREEU_FORM_NAMES = {"comfyui": "ComfyUI FreeU", "comfyui_v2": "ComfyUI FreeU_V2"}


def to_uint8(image: Any, levels: str = "round") -> np.ndarray:
  """A float [H, W, 3] image in [0, 1] as uint8: `clip(round(image * 255), 0, 255)` in float32.

  `np.round` rounds halves to even (127.5 -> 128, 126.5 -> 126), exactly like diffusers'
  `numpy_to_pil`, so files match a diffusers run byte for byte. `levels="floor"` truncates
  instead, as A1111 (`(255. * x).astype(np.uint8)`) and ComfyUI's SaveImage make their files.
  Values outside [0, 1] are clipped; NaN or inf raise, as they mean a broken decode that a
  black pixel would hide.
  """
  array = np.asarray(image, dtype=np.float32)
  if array.ndim != 3 or array.shape[-1] != 3:
    raise ValueError(f"expected an image of shape [H, W, 3], got {array.shape}")
  if not np.isfinite(array).all():
    raise ValueError("image holds NaN or inf values")
  if levels not in PIXEL_LEVELS:
    raise ValueError(f"pixel levels must be one of {', '.join(PIXEL_LEVELS)}, got {levels!r}")
  scaled = array * np.float32(255)
  return np.clip(np.floor(scaled) if levels == "floor" else np.round(scaled), 0, 255
                 ).astype(np.uint8)


def open_image(path: str, mode: str | None = "RGB") -> Image.Image:
  """An image file (local path or fsspec URL) in `mode` (None: its own), at its own size, turned
  upright by its EXIF orientation (a phone's photo), as A1111's `images.read`, ComfyUI's
  LoadImage and diffusers' `load_image` turn it; ValueError if unreadable."""
  import fsspec  # noqa: PLC0415

  try:
    with fsspec.open(path, "rb") as f:
      image = Image.open(io.BytesIO(f.read()))
      image.load()
  except (OSError, ValueError) as e:
    raise ValueError(f"cannot read image {path}: {e}") from None
  try:
    image = ImageOps.exif_transpose(image)
  except (OSError, ValueError, SyntaxError, TypeError, KeyError):
    pass  # a broken EXIF block: the image as it is, as A1111 takes it
  return image if mode is None else image.convert(mode)


def read_depth(path: str) -> np.ndarray:
  """A depth map's image file (local path or fsspec URL; grey levels of 8 or 16 bits, or colours
  taken as their luminance; larger nearer, as depth estimators draw them) as float32 [h, w] at
  its own size; ValueError if unreadable or constant."""
  image = open_image(path, None)
  if image.mode not in ("I;16", "I;16B", "I;16L", "I", "F"):
    image = image.convert("L")
  depth = np.asarray(image, np.float32)
  if depth.max() == depth.min():
    raise ValueError(f"depth map {path} is constant: it says nothing of the depth")
  return depth


def read_image(path: str, size: tuple[int, int], mode: str = "RGB",
               resize_mode: str = "just", flatten_alpha: bool = False) -> np.ndarray:
  """An image file (local path or fsspec URL) as float32 [H, W, 3] in [0, 1], resized to `size`
  (height, width) by `resize` (`resize_mode`); ValueError if unreadable. `mode` "L": grey levels
  [H, W]. `flatten_alpha`: an RGBA file `flatten`ed (A1111's img2img), not just converted."""
  image = flatten(open_image(path, None)) if flatten_alpha else open_image(path, mode)
  image = resize(image, *size, resize_mode)
  return np.asarray(image, np.float32) / np.float32(255.0)


def flatten(image: Image.Image, background: str = "#ffffff") -> Image.Image:
  """An image as A1111's img2img takes it (its images.flatten over its
  img2img_background_color, white by default), RGB: an RGBA one over the background, its alpha
  the paste's mask (PIL's 8-bit blend), where converting would drop the alpha."""
  if image.mode == "RGBA":
    canvas = Image.new("RGBA", image.size, background)
    canvas.paste(image, mask=image)
    image = canvas
  return image.convert("RGB")


# A1111's img2img resize modes, by their names there.
RESIZE_MODES = {"just": "Just resize", "crop": "Crop and resize", "fill": "Resize and fill"}


def resize(image: Image.Image, height: int, width: int, mode: str = "just") -> Image.Image:
  """`image` at `width` x `height` (Lanczos) in one of `RESIZE_MODES`: "just" (the aspect not
  kept), "crop" (`resize_cover`) or "fill" (`resize_fill`)."""
  if image.size == (width, height):
    return image
  if mode == "crop":
    return resize_cover(image, height, width)
  if mode == "fill":
    return resize_fill(image, height, width)
  if mode != "just":
    raise ValueError(f"resize mode must be one of {', '.join(RESIZE_MODES)}, got {mode!r}")
  return image.resize((width, height), Image.Resampling.LANCZOS)


def resize_fill(image: Image.Image, height: int, width: int) -> Image.Image:
  """`image` scaled to fit `width` x `height` with its aspect kept, centred, the two uncovered
  bands filled with its first and last rows (or columns) stretched (A1111's "Resize and fill";
  the bands with PIL's default filter, as there)."""
  aspect, source = width / height, image.width / image.height
  if aspect < source:  # wider than the output: fit the width, bands above and below
    w, h = width, image.height * width // image.width
  else:
    w, h = image.width * height // image.height, height
  resized = image.resize((w, h), Image.Resampling.LANCZOS)
  canvas = Image.new(image.mode, (width, height))
  canvas.paste(resized, (width // 2 - w // 2, height // 2 - h // 2))
  if aspect < source:
    band = height // 2 - h // 2
    if band > 0:
      canvas.paste(resized.resize((width, band), box=(0, 0, width, 0)), (0, 0))
      canvas.paste(resized.resize((width, band), box=(0, h, width, h)), (0, band + h))
  elif aspect > source:
    band = width // 2 - w // 2
    if band > 0:
      canvas.paste(resized.resize((band, height), box=(0, 0, 0, height)), (0, 0))
      canvas.paste(resized.resize((band, height), box=(w, 0, w, height)), (band + w, 0))
  return canvas


def resize_cover(image: Image.Image, height: int, width: int) -> Image.Image:
  """`image` scaled to cover `width` x `height` with its aspect kept, centred, the excess cut
  (A1111's "Crop and resize")."""
  aspect, source = width / height, image.width / image.height
  if aspect > source:  # narrower than the output: fit the width, cut above and below
    w, h = width, image.height * width // image.width
  else:
    w, h = image.width * height // image.height, height
  canvas = Image.new(image.mode, (width, height))
  canvas.paste(image.resize((w, h), Image.Resampling.LANCZOS),
               (width // 2 - w // 2, height // 2 - h // 2))
  return canvas


def write_png(path: str | os.PathLike, image: Any, parameters: str) -> str:
  """Writes `image` (float [H, W, 3] in [0, 1], see `to_uint8`) as a PNG, atomically.

  `parameters` goes into a `parameters` tEXt chunk (A1111's, see `a1111_parameters`). Returns the
  sha256 hex digest of the file's bytes, for the manifest.
  """
  info = PngImagePlugin.PngInfo()
  info.add_text("parameters", parameters)
  data = _png_bytes(Image.fromarray(to_uint8(image)), info)
  _atomic_write(path, data)
  return hashlib.sha256(data).hexdigest()


def _sha256_file(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True  # Someone else's process: alive.
  except OSError:
    return False
  return True


def cleanup_temporaries(output_dir: str | os.PathLike, *, stale_after_s: float = 3600.0
                        ) -> list[str]:
  """Removes the temporary files (`.<name>.tmp-<pid>-<host>`) that killed writers left behind.

  Other processes may be writing into the folder right now, so a temporary file is removed only
  when its writer is gone: one from this host whose process is dead, or is this process (call this
  before writing; a restarted container often gets its predecessor's pid), or one older than
  `stale_after_s` (the writer of another host cannot be asked; a write takes well under a
  second). Processes sharing a host must share a pid namespace for this to hold. Leftovers that
  are kept do no harm: they never carry a final name. Returns the names removed.
  """
  output_dir = os.fspath(output_dir)
  removed = []
  now = time.time()
  for entry in os.scandir(output_dir):
    match = _TEMP_RE.match(entry.name)
    if match is None or not entry.is_file(follow_symlinks=False):
      continue
    pid = int(match["pid"])
    dead = match["host"] == _HOST and (pid == os.getpid() or not _pid_alive(pid))
    try:
      stale = now - entry.stat(follow_symlinks=False).st_mtime > stale_after_s
      if dead or stale:
        os.remove(entry.path)
        removed.append(entry.name)
    except FileNotFoundError:
      pass  # Renamed by its writer or removed by another cleanup meanwhile.
  return sorted(removed)


# --- manifest -----------------------------------------------------------------------------------


def _check_record(record: Any) -> str | None:
  if not isinstance(record, dict):
    return "not a JSON object"
  index = record.get("index")
  if not isinstance(index, int) or isinstance(index, bool) or index < 0:
    return f"`index` must be an int >= 0, got {index!r}"
  for key in ("file", "sha256"):
    if not isinstance(record.get(key), str) or not record[key]:
      return f"`{key}` must be a non-empty string, got {record.get(key)!r}"
  return None


class Manifest:
  """`<output_dir>/manifest.jsonl`: one JSON record per finished image, shared by processes.

  Each record has at least `index` (int), `file` (a name in the output folder) and `sha256`
  (of that file); the CLI adds what `write_index_html` shows (`prompt`, `negative_prompt`,
  `seed`, `steps`, `scheduler`, `guidance_scale`).

  A kill in the middle of an append can leave a last line without its newline. `records` ignores
  such a line, and the next `append` ends it and writes a marker line after it (in the same
  write as its record), so that from then on `records` knows that line for a cut-short append
  and skips it, while any other unreadable line still raises.
  """

  def __init__(self, output_dir: str | os.PathLike):
    self.path = os.path.join(os.fspath(output_dir), MANIFEST_NAME)

  def records(self) -> dict[int, dict]:
    """Every complete record by index; a later line for the same index wins (a redone image).

    Raises ValueError naming the line when a line other than a cut-short append is unreadable.
    """
    try:
      with open(self.path, "rb") as f:
        data = f.read()
    except FileNotFoundError:
      return {}
    lines = data.split(b"\n")
    if lines[-1]:
      logging.warning("%s: ignoring an unfinished last line (%d bytes) from an interrupted "
                      "write", self.path, len(lines[-1]))
    lines = lines[:-1]

    records = {}
    for number, line in enumerate(lines, start=1):
      if not line.strip() or line == _TORN_MARKER:
        continue
      try:
        record = json.loads(line)
      except ValueError as e:  # Also invalid UTF-8.
        if number < len(lines) and lines[number] == _TORN_MARKER:
          continue
        raise ValueError(f"{self.path}, line {number}: not valid JSON ({e}); the manifest is "
                         "corrupt: fix or remove that line") from None
      problem = _check_record(record)
      if problem is not None:
        raise ValueError(f"{self.path}, line {number}: bad record: {problem}")
      records[record["index"]] = record
    return records

  def append(self, record: Mapping[str, Any]) -> None:
    """Appends `record` as one line, durably, atomically with respect to other appenders."""
    record = dict(record)
    problem = _check_record(record)
    if problem is not None:
      raise ValueError(f"bad manifest record: {problem}")
    line = json.dumps(record, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    data = line.encode("utf-8") + b"\n"

    fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
      # Without the lock, the end check can catch another appender's write half done and take
      # it for a cut-short line.
      fcntl.flock(fd, fcntl.LOCK_EX)
      size = os.fstat(fd).st_size
      if size and os.pread(fd, 1, size - 1) != b"\n":
        data = b"\n" + _TORN_MARKER + b"\n" + data
      # One write: with O_APPEND the kernel places it at the end as a whole, so lines cannot
      # interleave even where the lock does not reach (another machine on NFS).
      written = os.write(fd, data)
      fcntl.flock(fd, fcntl.LOCK_UN)
      if written != len(data):
        raise OSError(f"short write to {self.path}: {written} of {len(data)} bytes (disk full?)")
      os.fsync(fd)
    finally:
      os.close(fd)
    if size == 0:
      _fsync_dir(os.path.dirname(os.path.abspath(self.path)))


def finished(output_dir: str | os.PathLike, manifest_records: Mapping[int, dict]) -> set[int]:
  """The indices that need no work: a manifest record exists and its file has that sha256.

  An image whose manifest line was lost, and a record whose file is missing or differs, are not
  finished: they are generated again and overwrite whatever is there.
  """
  output_dir = os.fspath(output_dir)
  done = set()
  for index, record in manifest_records.items():
    try:
      digest = _sha256_file(os.path.join(output_dir, record["file"]))
    except OSError:
      continue
    if digest == record["sha256"]:
      done.add(index)
  return done


# --- previews -----------------------------------------------------------------------------------


def write_grid(output_dir: str | os.PathLike, files: Iterable[str | os.PathLike], *,
               columns: int | None = None) -> str:
  """Writes `grid.png`, a contact sheet of `files` (relative to `output_dir`); see `grid_png`."""
  output_dir = os.fspath(output_dir)
  paths = [os.path.join(output_dir, os.fspath(f)) for f in list(files)[:MAX_GRID_IMAGES]]

  def images():
    for path in paths:
      with Image.open(path) as image:
        image.load()
        yield image

  out = os.path.join(output_dir, GRID_NAME)
  _atomic_write(out, grid_png(images(), len(paths), columns=columns))
  return out


def grid_png(images: Iterable[Image.Image], n: int, *, columns: int | None = None) -> bytes:
  """A contact sheet of the first `n` of `images` in order, as PNG bytes.

  At most `MAX_GRID_IMAGES` images are used, read one at a time. Cells have the first image's
  size (others are resized to it), shrunk evenly when the sheet would exceed `MAX_GRID_SIDE`
  pixels a side; the layout is `columns` wide (default: near square, ceil(sqrt(n))), filled row
  by row, unused cells black.
  """
  n = min(n, MAX_GRID_IMAGES)
  if n < 1:
    raise ValueError("write_grid needs at least one image")
  if columns is not None and columns < 1:
    raise ValueError(f"columns must be >= 1, got {columns}")
  columns = min(columns or math.ceil(math.sqrt(n)), n)
  rows = math.ceil(n / columns)

  images = itertools.islice(images, n)
  first = next(images)
  width, height = first.size
  scale = min(1.0, MAX_GRID_SIDE / (columns * width), MAX_GRID_SIDE / (rows * height))
  cell = (max(1, int(width * scale)), max(1, int(height * scale)))

  sheet = Image.new("RGB", (columns * cell[0], rows * cell[1]))
  for i, image in enumerate(itertools.chain([first], images)):
    image = image.convert("RGB")
    if image.size != cell:
      image = image.resize(cell, Image.Resampling.LANCZOS)
    sheet.paste(image, ((i % columns) * cell[0], (i // columns) * cell[1]))
  return _png_bytes(sheet)


_HTML_HEAD = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{title}</title>
<style>
body {{ font-family: sans-serif; margin: 1em; background: #fafafa; }}
main {{ display: grid; grid-template-columns: repeat(auto-fill, minmax(256px, 1fr)); gap: 1em; }}
figure {{ margin: 0; background: #fff; padding: .5em; border: 1px solid #ddd; }}
img {{ width: 100%; height: auto; display: block; }}
figcaption p {{ margin: .4em 0; white-space: pre-wrap; overflow-wrap: anywhere; }}
.negative {{ color: #a33; }}
.meta {{ color: #666; font-size: .85em; }}
</style>
</head>
<body>
<h1>{title}</h1>
<main>
"""


def write_index_html(output_dir: str | os.PathLike,
                     records: Mapping[int, dict] | Iterable[dict]) -> str:
  """Writes `index.html` (see `index_html`) into `output_dir`; returns its path."""
  out = os.path.join(os.fspath(output_dir), INDEX_HTML_NAME)
  _atomic_write(out, index_html(records).encode("utf-8"))
  return out


def index_html(records: Mapping[int, dict] | Iterable[dict], *, total: int | None = None,
               shards: Iterable[str] = ()) -> str:
  """A static gallery of manifest records, by index.

  Shows each record's image (`file`, linked relatively; a record with a `key` is a sample of the
  WebDataset shard `file`, linked instead) with its `prompt`, `negative_prompt`, `seed`, `steps`,
  `scheduler` and `guidance_scale` when present. `total` > len(records) says the page shows the
  first images of a larger run; `shards` are listed as links. Every value is HTML-escaped:
  prompts are user text.
  """
  if isinstance(records, Mapping):
    records = records.values()
  records = sorted(records, key=lambda r: r["index"])

  def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)

  total = len(records) if total is None else total
  title = f"{total} images" + (f" (the first {len(records)} shown)" if total > len(records)
                               else "")
  parts = [_HTML_HEAD.format(title=esc(title))]
  shards = list(shards)
  if shards:  # the images are inside tars: the grid shows them
    parts.append(f'<figure><img src="{GRID_NAME}" alt="grid of the first images"></figure>\n')
  for record in records:
    parts.append(_figure(record, esc))
  parts.append("</main>\n")
  if shards:
    parts.append(f"<h2>{len(shards)} WebDataset shards</h2>\n<ul>\n")
    parts.extend(f'<li><a href="{esc(urllib.parse.quote(s))}">{esc(s)}</a></li>\n'
                 for s in shards)
    parts.append("</ul>\n")
  parts.append("</body>\n</html>\n")
  return "".join(parts)


def sample_image(record: dict) -> str:
  """The name of a webdataset record's image in its tar: `image`, else `<key>.png`."""
  return record.get("image", f"{record['key']}.png")


def _figure(record: dict, esc) -> str:
  src = esc(urllib.parse.quote(str(record["file"])))
  prompt = record.get("prompt", "")
  if "key" in record:
    picture = f'<a href="{src}">{esc(record["file"])}: {esc(sample_image(record))}</a>'
  else:
    picture = f'<a href="{src}"><img src="{src}" alt="{esc(prompt)}" loading="lazy"></a>'
  parts = [f'<figure id="image-{int(record["index"])}">\n{picture}\n'
           f'<figcaption>\n<p class="prompt">{esc(prompt)}</p>\n']
  if record.get("negative_prompt"):
    parts.append(f'<p class="negative">Negative: {esc(record["negative_prompt"])}</p>\n')
  meta = [f"#{int(record['index'])}"]
  for key, label in (("seed", "seed"), ("steps", "steps"), ("scheduler", "scheduler"),
                     ("guidance_scale", "guidance")):
    if record.get(key) is not None:
      meta.append(f"{label} {esc(record[key])}")
  parts.append(f'<p class="meta">{" &middot; ".join(meta)}</p>\n</figcaption>\n</figure>\n')
  return "".join(parts)


# --- the folder ---------------------------------------------------------------------------------


def check_output_dir(path: str | os.PathLike) -> None:
  """Makes sure `path` is a writable folder, creating it (and its parents) if missing.

  Raises OutputError with a one-line message when it is an existing file, cannot be created, or
  cannot be written (tried with a probe file that is removed again).
  """
  path = os.fspath(path)
  if os.path.exists(path) and not os.path.isdir(path):
    raise OutputError(f"output path {path!r} exists and is not a folder")
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    raise OutputError(f"cannot create output folder {path!r}: {e.strerror or e}") from None
  # Named like our temporaries, so a probe left by a kill is cleaned up with them.
  probe = os.path.join(path, _temp_name("write-probe"))
  try:
    fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
      os.write(fd, b"probe")
    finally:
      os.close(fd)
    os.remove(probe)
  except OSError as e:
    raise OutputError(f"output folder {path!r} is not writable: {e.strerror or e}") from None


def json_bytes(data: Any) -> bytes:
  return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()


def write_json(path: str | os.PathLike, data: Any) -> None:
  """Writes a JSON file atomically."""
  _atomic_write(path, json_bytes(data))


_RUN_FILES = (MANIFEST_NAME, GRID_NAME, INDEX_HTML_NAME, "run.json")


def clear(output_dir: str | os.PathLike) -> None:
  """Removes what a previous run wrote (its numbered PNGs and run files), nothing else."""
  for name in os.listdir(output_dir):
    numbered = name.endswith(".png") and name[:-4].isdigit()
    if numbered or name in _RUN_FILES:
      os.remove(os.path.join(output_dir, name))
