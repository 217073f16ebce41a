"""Frozen architecture configs built from a checkpoint's `config.json`.

Every key of a component's config is either a field of its dataclass, an option that only has
one value sdjax implements (any other value raises, naming the option), or metadata. A key that
is none of these raises too: an option we do not know is never silently ignored.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any


class ConfigError(ValueError):
  """A config option sdjax does not implement, or an impossible value."""


def _normalize(value):
  # Nested lists too (SDXL-style per-layer depths): configs must be hashable jit statics.
  return tuple(_normalize(v) for v in value) if isinstance(value, (list, tuple)) else value


def build_config(
    cls,
    raw: dict[str, Any],
    *,
    component: str,
    fixed: dict[str, Any],
    ignored: frozenset[str] = frozenset(),
):
  """Builds dataclass `cls` from a raw config dict, strictly.

  Args:
    cls: a frozen dataclass whose field names are the config keys sdjax implements.
    raw: the parsed config.json.
    component: name used in error messages ("unet", "vae", "text_encoder").
    fixed: options sdjax supports only at one value (the library default); any other value raises.
    ignored: keys with no effect on the forward pass (metadata, training-only options).
  """
  fields = {f.name for f in dataclasses.fields(cls)}
  kwargs = {}
  for key, value in raw.items():
    if key.startswith("_") or key in ignored:
      continue
    if key in fields:
      kwargs[key] = _normalize(value)
    elif key in fixed:
      if _normalize(value) != _normalize(fixed[key]):
        raise ConfigError(
            f"{component} config option {key}={value!r} is not supported by sdjax "
            f"(only {fixed[key]!r})"
        )
    else:
      raise ConfigError(f"{component} config has unknown option {key!r}")
  return cls(**kwargs)


def read_json(path: str) -> dict[str, Any]:
  """Reads a JSON object file, with a one-line error when it is missing or corrupt."""
  try:
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
  except FileNotFoundError:
    raise ConfigError(f"missing file {path}") from None
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ConfigError(f"cannot read {path}: {e}") from None
  if not isinstance(data, dict):
    raise ConfigError(f"{path} does not hold a JSON object")
  return data


def to_json_dict(config, class_name: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
  """The config as the dict diffusers / transformers write to config.json."""
  out = {"_class_name": class_name}
  for f in dataclasses.fields(config):
    value = getattr(config, f.name)
    out[f.name] = list(value) if isinstance(value, tuple) else value
  out.update(extra or {})
  return out


def config_path(folder: str) -> str:
  return os.path.join(folder, "config.json")
