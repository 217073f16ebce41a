"""Finding a pipeline's files: a local folder, or only the needed files of a hub repository."""

from __future__ import annotations

import os
import posixpath
import re

from sdjax.checkpoints.weights import WEIGHT_STEMS, weight_candidates

_CONFIG_FILES = (
    "model_index.json",
    "unet/config.json",
    "vae/config.json",
    "text_encoder/config.json",
    "text_encoder_2/config.json",
    "scheduler/scheduler_config.json",
)
_TOKENIZER_FILES = (
    "vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "added_tokens.json",
)


class HubError(ValueError):
  """A source that is neither a folder nor a reachable hub repository."""


def _looks_like_path(source: str) -> bool:
  # Hub ids are `owner/name`; anything else is meant as a folder.
  return source.startswith((".", "/", "~")) or source.count("/") != 1


def _weight_files(files: set[str], folder: str, stem: str, variant: str | None) -> list[str]:
  for name in weight_candidates(stem, variant):
    path = f"{folder}{name}"
    if path in files:
      if not name.endswith(".index.json"):
        return [path]
      shard_head = path.rsplit(".safetensors", 1)[0]
      return [path] + sorted(f for f in files if f.startswith(shard_head + "-")
                             and f.endswith(".safetensors"))
  return []


def select_files(repo_files: list[str], *, variant: str | None = None,
                 configs_only: bool = False, component: str | None = None) -> list[str]:
  """The files of a diffusers repo that loading needs: configs, tokenizer, one weight file set.

  safetensors are preferred over pickles, and `variant` files (e.g. fp16) over plain ones; a
  sharded checkpoint brings its index and every shard file. `configs_only`: configs and
  tokenizer (a single file's `config=`). `component="vae"`: only a VAE, from a pipeline repo's
  `vae/` or a VAE repo's root (likewise `"safety_checker"`, with its image processor's
  preprocessor_config.json).
  """
  files = set(repo_files)
  if component is not None:
    folder = f"{component}/" if f"{component}/config.json" in files else ""
    if f"{folder}config.json" not in files:
      return []
    wanted = [f"{folder}config.json"]
    if component == "safety_checker":  # its image processor: a pipeline's, or its own
      wanted += [f for f in ("feature_extractor/preprocessor_config.json",
                             f"{folder}preprocessor_config.json") if f in files]
    return wanted + _weight_files(files, folder, WEIGHT_STEMS[component], variant)
  wanted = [f for f in _CONFIG_FILES if f in files]
  for folder in ("tokenizer", "tokenizer_2"):  # tokenizer_2: SDXL
    wanted += [f"{folder}/{f}" for f in _TOKENIZER_FILES if f"{folder}/{f}" in files]
  if not configs_only:
    for comp, stem in WEIGHT_STEMS.items():
      if comp not in ("image_encoder", "safety_checker"):  # loaded by their own loaders
        wanted += _weight_files(files, f"{comp}/", stem, variant)
  return wanted


def resolve_source(source: str, *, variant: str | None = None, revision: str | None = None,
                   configs_only: bool = False, component: str | None = None) -> str:
  """A local folder holding the pipeline `source` (a folder path or a hub repo id).

  `configs_only` and `component` narrow what a hub download fetches (see `select_files`).
  """
  expanded = os.path.expanduser(source)
  if os.path.isdir(expanded):
    return expanded
  if os.path.exists(expanded):
    raise HubError(f"model {source!r} is a file, not a diffusers pipeline folder")
  if _looks_like_path(source):
    raise HubError(f"model folder {source!r} does not exist")
  try:
    import huggingface_hub  # noqa: PLC0415

    repo_files = huggingface_hub.list_repo_files(source, revision=revision)
    allow = select_files(repo_files, variant=variant, configs_only=configs_only,
                         component=component)
    if not allow:
      raise HubError(f"hub repository {source!r} holds no diffusers {component or 'model'}")
    return huggingface_hub.snapshot_download(source, revision=revision, allow_patterns=allow)
  except Exception as e:  # noqa: BLE001 - network, auth and not-found errors all end here
    raise HubError(f"cannot download model {source!r} from the Hugging Face hub: "
                   f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None


# -- single files (LoRA, embeddings) ------------------------------------------------------------
_FILE_EXTENSIONS = (".safetensors", ".pt", ".bin", ".ckpt")


def select_file(repo_files: list[str], kind: str, preferred=()) -> str:
  """The one weight file of a hub repo meant by its bare id: a `preferred` name, else the only one.

  Raises HubError listing the candidates when there are several, so the user can name one as
  `owner/name/file`.
  """
  files = set(repo_files)
  for name in preferred:
    if name in files:
      return name
  candidates = sorted(f for f in files if f.endswith(_FILE_EXTENSIONS))
  safe = [f for f in candidates if f.endswith(".safetensors")]
  if len(safe) == 1:
    return safe[0]
  if len(candidates) == 1:
    return candidates[0]
  if not candidates:
    raise HubError(f"the hub repo has no {kind} file ({', '.join(_FILE_EXTENSIONS)})")
  raise HubError(f"the hub repo has several {kind} files ({', '.join(candidates[:5])}"
                 f"{', ...' if len(candidates) > 5 else ''}); name one as owner/name/file")


# A file's page or download address on the hub: .../owner/name/{blob,resolve}/revision/path.
_HUB_URL = re.compile(r"^https?://(?:www\.)?(?:huggingface\.co|hf\.co)/([^/]+/[^/]+)/"
                      r"(?:blob|resolve)/([^/]+)/([^?#]+)(?:[?#].*)?$")


def parse_hub_url(source: str) -> tuple[str, str, str] | None:
  """`https://huggingface.co/owner/name/blob/main/x.safetensors` (or `/resolve/`) ->
  (repo, file, revision); None for anything else."""
  match = _HUB_URL.match(source)
  return None if match is None else (match.group(1), match.group(3), match.group(2))


def is_hub_file(source: str) -> bool:
  """Whether `source`, not being a local path, names one hub file: a hub URL, or
  `owner/name/path/file.ext`."""
  if os.path.exists(os.path.expanduser(source)):
    return False
  hub_file = split_hub_file(source)
  return parse_hub_url(source) is not None or (hub_file is not None and hub_file[1] is not None)


def split_hub_file(source: str) -> tuple[str, str | None] | None:
  """`owner/name` -> (repo, None); `owner/name/path/file.ext` -> (repo, path); else None."""
  if source.startswith((".", "/", "~")) or source.count("/") < 1:
    return None
  parts = source.split("/")
  if len(parts) == 2:
    return source, None
  if source.endswith(_FILE_EXTENSIONS):
    return "/".join(parts[:2]), "/".join(parts[2:])
  return None


def resolve_file(source: str, kind: str, preferred=(), *, revision: str | None = None) -> str:
  """A local path for a single-file `source`: a file, or a file downloaded from the hub.

  Hub forms: `owner/name/file.safetensors` (that file), `owner/name` (the repo's `preferred`
  file, else its only weight file), or the file's hub URL
  (`https://huggingface.co/owner/name/blob/<revision>/file`, whose revision wins). Only that one
  file is downloaded.
  """
  expanded = os.path.expanduser(source)
  if os.path.isfile(expanded):
    return expanded
  elsewhere = not os.path.exists(expanded)  # a folder of that name is no hub file
  url = parse_hub_url(source) if elsewhere else None
  if url is not None:
    repo, filename, revision = url
  else:
    hub_file = split_hub_file(source) if elsewhere else None
    if hub_file is None:
      raise HubError(f"{kind} file {source!r} does not exist")
    repo, filename = hub_file
  try:
    import huggingface_hub  # noqa: PLC0415

    if filename is None:
      filename = select_file(huggingface_hub.list_repo_files(repo, revision=revision), kind,
                             preferred)
    return huggingface_hub.hf_hub_download(repo, filename, revision=revision)
  except HubError as e:
    raise HubError(f"{kind} {source!r}: {e}") from None
  except Exception as e:  # noqa: BLE001 - network, auth and not-found errors all end here
    raise HubError(f"{kind} {source!r} is no local file and cannot be downloaded from the "
                   f"Hugging Face hub: "
                   f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None


def sibling_folder(source: str, name: str, stem: str, *, revision: str | None = None) -> str | None:
  """For a hub file `source` (see `resolve_file`), its repo's folder `name` beside the file or
  one level up (h94/IP-Adapter's `models/image_encoder/`), downloaded: its config.json and one
  weight file set of `stem`. None when the repo has no such folder."""
  url = parse_hub_url(source)
  if url is not None:
    repo, filename, revision = url
  else:
    repo, filename = split_hub_file(source)
  try:
    import huggingface_hub  # noqa: PLC0415

    files = set(huggingface_hub.list_repo_files(repo, revision=revision))
    here = posixpath.dirname(filename or "")
    for base in dict.fromkeys((here, posixpath.dirname(here))):
      folder = posixpath.join(base, name)
      if f"{folder}/config.json" in files:
        wanted = [f"{folder}/config.json"] + _weight_files(files, f"{folder}/", stem, None)
        local = huggingface_hub.snapshot_download(repo, revision=revision,
                                                  allow_patterns=wanted)
        return os.path.join(local, folder)
  except Exception as e:  # noqa: BLE001 - network, auth and not-found errors all end here
    raise HubError(f"cannot download {name}/ of {source!r} from the Hugging Face hub: "
                   f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
  return None
