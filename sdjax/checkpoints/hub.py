"""Finding a pipeline's files: a local folder, or only the needed files of a hub repository."""

from __future__ import annotations

import os

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


def select_files(repo_files: list[str], *, variant: str | None = None) -> list[str]:
  """The files of a diffusers repo that loading needs: configs, tokenizer, one weight file set.

  safetensors are preferred over pickles, and `variant` files (e.g. fp16) over plain ones; a
  sharded checkpoint brings its index and every shard file.
  """
  files = set(repo_files)
  wanted = [f for f in _CONFIG_FILES if f in files]
  for folder in ("tokenizer", "tokenizer_2"):  # tokenizer_2: SDXL
    wanted += [f"{folder}/{f}" for f in _TOKENIZER_FILES if f"{folder}/{f}" in files]
  for component, stem in WEIGHT_STEMS.items():
    for name in weight_candidates(stem, variant):
      path = f"{component}/{name}"
      if path in files:
        wanted.append(path)
        if name.endswith(".index.json"):
          shard_head = path.rsplit(".safetensors", 1)[0]
          wanted += sorted(f for f in files if f.startswith(shard_head + "-")
                           and f.endswith(".safetensors"))
        break
  return wanted


def resolve_source(source: str, *, variant: str | None = None, revision: str | None = None) -> str:
  """A local folder holding the pipeline `source` (a folder path or a hub repo id)."""
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
    allow = select_files(repo_files, variant=variant)
    return huggingface_hub.snapshot_download(source, revision=revision, allow_patterns=allow)
  except Exception as e:  # noqa: BLE001 - network, auth and not-found errors all end here
    raise HubError(f"cannot download model {source!r} from the Hugging Face hub: "
                   f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
