"""Compiled programs kept on disk, so that a second process of the same shape neither traces nor
compiles, and kept in memory within bounds (`bounded_jit`).

JAX's persistent compilation cache saves XLA's compile, but a new process still traces and lowers
the networks in Python before it can look the program up (half of a cold start for SD1.5). This
cache stores the compiled executable itself (`jax.experimental.serialize_executable`) under a key
computed without tracing: what the caller says fixes the program (its static configuration), the
shapes, dtypes and shardings of the arguments, the jax and jaxlib versions, the devices, the
process layout, the environment variables that change the program and a digest of sdjax's own
source. An entry that does not match (stale), does not load (corrupt, truncated, another jax) or
fails its checksum is ignored and rebuilt.

Entries live in `aot/` inside the persistent compilation cache folder (`~/.cache/sdjax/jax/aot`
by default) and are trusted as that cache is: only sdjax writes them, and they are read with an
unpickler that builds nothing but jax's and numpy's own types.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import io
import json
import os
import pickle
import tempfile
import threading
import time
from typing import Any

import jax
import jaxlib
from absl import logging
from flax import traverse_util
from jax.experimental import serialize_executable
from jax.experimental.compilation_cache import compilation_cache

FORMAT = 1  # bump when the entry layout changes
PARAMS_SUFFIX = ".params.json"
MAX_BYTES = 4 * 2**30  # entries past this total are deleted, least recently used first
MAX_PROGRAMS = 8  # compiled programs a `bounded_jit` function keeps, least recently used dropped
ENV_VARS = ("SDJAX_ATTENTION", "SDJAX_CONV", "XLA_FLAGS")  # environment that changes programs
_NUMPY_NAMES = {("numpy", "dtype"), ("numpy", "ndarray"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "scalar")}


def cache_dir() -> str | None:
  """`aot/` inside the persistent compilation cache folder, or None when that cache is off."""
  base = jax.config.jax_compilation_cache_dir
  return os.path.join(base, "aot") if base else None


@functools.cache
def source_digest() -> str:
  """sha256 of every sdjax source file: a code change makes every entry stale."""
  root = os.path.dirname(os.path.abspath(__file__))
  digest = hashlib.sha256()
  for folder, dirs, files in sorted(os.walk(root)):
    dirs.sort()
    for name in sorted(f for f in files if f.endswith(".py")):
      path = os.path.join(folder, name)
      digest.update(os.path.relpath(path, root).encode())
      with open(path, "rb") as f:
        digest.update(f.read())
  return digest.hexdigest()


def _leaf_signature(x) -> list[Any]:
  sharding = getattr(x, "sharding", None)
  return [list(jax.numpy.shape(x)), str(jax.numpy.result_type(x)),
          bool(getattr(x, "weak_type", False)), str(sharding) if sharding is not None else None]


def entry_key(what: str, args) -> str:
  """The cache key of `jitted.lower(*args)` for a program described by `what` (its statics)."""
  leaves, tree = jax.tree.flatten(args)
  parts = {
      "format": FORMAT, "what": what, "tree": str(tree),
      "leaves": [_leaf_signature(x) for x in leaves],
      "jax": jax.__version__, "jaxlib": jaxlib.__version__, "backend": jax.default_backend(),
      "devices": [[d.id, d.device_kind] for d in jax.devices()],
      "process": [jax.process_index(), jax.process_count()],
      "env": {k: os.environ.get(k) for k in ENV_VARS}, "sdjax": source_digest(),
  }
  return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


class bounded_jit:  # noqa: N801 - used as `jax.jit` is
  """`jax.jit(fn, static_argnums=...)` that keeps at most `MAX_PROGRAMS` compiled programs.

  A `jax.jit` function keeps every program it compiled (one per static arguments and argument
  shapes) for the process's life, and so do jax's tracing and lowering caches under it: a
  notebook trying sampler after sampler or size after size grew by 40-50 MB a program for a tiny
  model until the compiler failed to allocate. Here each program is a `jax.jit` of its own, over a
  function made for its static arguments and shapes; dropping the least recently used one drops
  the only reference to that function, which frees its executable and the jax caches keyed on
  it. Calling a dropped program again compiles it again (a read where jax's persistent
  compilation cache is on). Positional static arguments only, as the callers use them.
  """

  def __init__(self, fn, static_argnums: tuple[int, ...] = ()):
    self.fn = fn
    self.static_argnums = (static_argnums,) if isinstance(static_argnums, int) else tuple(
        sorted(static_argnums))
    self.programs: collections.OrderedDict = collections.OrderedDict()
    self._lock = threading.Lock()  # callers on several threads share the programs
    functools.update_wrapper(self, fn)

  def __call__(self, *args, **kwargs):
    statics = tuple(args[i] for i in self.static_argnums)
    dynamic = tuple(a for i, a in enumerate(args) if i not in self.static_argnums)
    leaves, tree = jax.tree.flatten((dynamic, kwargs))
    key = (statics, tree, tuple(map(_signature, leaves)))
    with self._lock:
      program = self.programs.pop(key, None) or self._program(statics)
      self.programs[key] = program  # the most recently used last
      while len(self.programs) > MAX_PROGRAMS:
        self.programs.popitem(last=False)
    return program(*dynamic, **kwargs)

  def _program(self, statics):
    fn, static_argnums = self.fn, self.static_argnums

    def program(*dynamic, **kwargs):
      args = list(dynamic)
      for i, value in zip(static_argnums, statics, strict=True):
        args.insert(i, value)
      return fn(*args, **kwargs)

    program.__name__ = program.__qualname__ = fn.__name__  # names the compiled module
    return jax.jit(program)


def _signature(x):
  """What makes jit compile another program for a leaf (sharding aside, which jit keys on within
  a program): a third of `jax.typeof`'s time, which was 3 ms a call over an SD UNet's params."""
  try:
    return x.shape, x.dtype, getattr(x, "weak_type", False)
  except AttributeError:  # a Python scalar
    return type(x)


def load_or_compile(jitted, args, what: str, directory: str | None = None):
  """`jitted.lower(*args).compile()`, or the same executable loaded from the cache.

  `what` must name everything static that the arguments do not show (for the sampler: the spec
  and the networks' configs). `directory` defaults to `cache_dir()`; with no cache folder, or in
  multi-process runs (each process would need its own executable of a shared program), this
  compiles as usual.
  """
  directory = cache_dir() if directory is None else directory
  if not directory or jax.process_count() > 1:
    return jitted.lower(*args).compile()
  key = entry_key(what, args)
  path = os.path.join(directory, f"{key}.jaxexe")
  compiled = _load(path, key, args)
  if compiled is not None:
    logging.info("loaded the compiled program from %s", path)
    _touch(path)
    return compiled
  compiled = _compile_afresh(jitted, args)
  _save(path, key, compiled, args)
  prune(directory, keep=path)
  return compiled


def param_shapes(what: str, trace, directory: str | None = None):
  """`trace()`, a module's params as nested dicts of `jax.ShapeDtypeStruct` (tracing its init:
  2-3.5 s for an SD UNet, most of loading a small model), or the same tree from the cache,
  keyed by `what` (the module and its input shapes) as programs are."""
  directory = cache_dir() if directory is None else directory
  if not directory:
    return trace()
  key = entry_key(f"param shapes of {what}", ())
  path = os.path.join(directory, f"{key}{PARAMS_SUFFIX}")
  if os.path.isfile(path):
    try:
      with open(path, encoding="utf-8") as f:
        entry = json.load(f)
      if entry.get("format") != FORMAT or entry.get("key") != key:
        raise ValueError("stale entry")
      tree = traverse_util.unflatten_dict(
          {k: jax.ShapeDtypeStruct(tuple(shape), jax.numpy.dtype(dtype))
           for k, (shape, dtype) in entry["params"].items()}, sep="/")
      _touch(path)
      return tree
    except Exception as e:  # noqa: BLE001 - any failure to read means: trace afresh
      logging.warning("ignoring param-shape cache entry %s (%s: %s); rebuilding it", path,
                      type(e).__name__, e)
  tree = trace()
  flat = {k: [list(v.shape), str(v.dtype)]
          for k, v in traverse_util.flatten_dict(tree, sep="/").items()}
  _write_atomically(path, json.dumps({"format": FORMAT, "key": key, "params": flat}).encode())
  return tree


def _touch(path: str) -> None:
  """Marks an entry used now: pruning goes by modification time (atime is often off)."""
  try:
    os.utime(path)
  except OSError:  # a read-only cache still serves its entries
    pass


def prune(directory: str, max_bytes: int | None = None, keep: str | None = None) -> list[str]:
  """Deletes the least recently used entries until the rest fit in `max_bytes`, and temporary
  files a crashed writer left (older than an hour); returns the deleted paths. Every sdjax or
  jax upgrade and source change starts a new set of entries: without this the folder grows
  by a few programs per release forever."""
  max_bytes = MAX_BYTES if max_bytes is None else max_bytes
  entries, removed = [], []
  now = time.time()
  try:
    names = os.listdir(directory)
  except OSError:
    return removed
  for name in names:
    path = os.path.join(directory, name)
    try:
      stat = os.stat(path)
    except OSError:  # another process deleted it
      continue
    if name.endswith((".jaxexe", PARAMS_SUFFIX)):
      entries.append((stat.st_mtime, stat.st_size, path))
    elif name.endswith(".tmp") and now - stat.st_mtime > 3600:
      removed += _remove(path)
  total = sum(size for _, size, _ in entries)
  for _, size, path in sorted(entries):  # oldest use first
    if total <= max_bytes:
      break
    if path != keep:
      removed += _remove(path)
      total -= size
  if removed:
    logging.info("compiled-program cache: deleted %d old entries from %s", len(removed),
                 directory)
  return removed


def _remove(path: str) -> list[str]:
  try:
    os.remove(path)
  except OSError:  # gone already (another process), or not ours to delete
    return []
  return [path]


def _compile_afresh(jitted, args):
  """Compiles past jax's persistent cache: an executable that cache loaded serializes on XLA:CPU
  into an entry that fails when run (`Function ... not found`); this entry replaces it anyway."""
  enabled = jax.config.jax_enable_compilation_cache
  jax.config.update("jax_enable_compilation_cache", False)
  compilation_cache.reset_cache()  # jax decides once whether the cache is on: decide again
  try:
    return jitted.lower(*args).compile()
  finally:
    jax.config.update("jax_enable_compilation_cache", enabled)
    compilation_cache.reset_cache()


def sampler_statics(spec, pipe, refiner=None, *more, first_refiner=None) -> str:
  """What fixes a sampling program beside its arguments: the spec and the networks' configs
  (and its later stages': an SDXL refiner's or the hires pass's `(spec, pipeline)`, then the
  refiner's of that pass; `first_refiner`: the refiner's finishing the first pass before the
  hires pass)."""
  stage = None if refiner is None else (refiner[0], refiner[1].networks)
  text = repr((spec, pipe.networks, stage, *((s, p.networks) for s, p in more)))
  if first_refiner is None:  # as before: older entries stay valid
    return text
  return text + repr(("first_refiner", first_refiner[0], first_refiner[1].networks))


def _save(path: str, key: str, compiled, args) -> None:
  try:
    payload, in_tree, out_tree = serialize_executable.serialize(compiled)
  except (ValueError, NotImplementedError) as e:
    logging.info("compiled program not cached: %s", e)
    return
  if in_tree != jax.tree.structure((tuple(args), {})):
    logging.info("compiled program not cached: its argument tree is not the call's")
    return
  body = pickle.dumps((payload, out_tree), protocol=pickle.HIGHEST_PROTOCOL)
  header = {"format": FORMAT, "key": key, "sha256": hashlib.sha256(body).hexdigest()}
  _write_atomically(path, json.dumps(header).encode() + b"\n" + body)


def _write_atomically(path: str, data: bytes) -> None:
  """A temporary file renamed into place: readers see a whole entry or none."""
  tmp = None
  try:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
      f.write(data)
    os.replace(tmp, path)
  except OSError as e:
    logging.warning("could not write the cache entry %s: %s", path, e)
    if tmp is not None and os.path.exists(tmp):
      os.remove(tmp)


def _load(path: str, key: str, args):
  """The cached executable, or None (missing, stale or corrupt: the caller rebuilds it)."""
  if not os.path.isfile(path):
    return None
  try:
    with open(path, "rb") as f:
      header, _, body = f.read().partition(b"\n")
    header = json.loads(header)
    if header.get("format") != FORMAT or header.get("key") != key:
      raise ValueError("stale entry")
    if header.get("sha256") != hashlib.sha256(body).hexdigest():
      raise ValueError("checksum mismatch")
    payload, out_tree = _Unpickler(io.BytesIO(body)).load()
    return _deserialize(payload, jax.tree.structure((tuple(args), {})), out_tree)
  except Exception as e:  # noqa: BLE001 - any failure to load means: compile afresh
    logging.warning("ignoring compiled-program cache entry %s (%s: %s); rebuilding it", path,
                    type(e).__name__, e)
    return None


def _find_class(unpickler, module: str, name: str):
  """Builds jax's and numpy's own types only: a tampered entry cannot name other code."""
  if module.split(".")[0] not in ("jax", "jaxlib") and (module, name) not in _NUMPY_NAMES:
    raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a cache entry")
  return pickle.Unpickler.find_class(unpickler, module, name)


class _Unpickler(pickle.Unpickler):
  find_class = _find_class


class _ExecutableUnpickler(serialize_executable._JaxPjrtUnpickler):  # noqa: SLF001
  find_class = _find_class


def _deserialize(payload: bytes, in_tree, out_tree):
  """`serialize_executable.deserialize_and_load` with the restricted unpickler."""
  backend = jax.devices()[0].client
  executable, args_info_flat, no_kwargs = _ExecutableUnpickler(io.BytesIO(payload),
                                                               backend).load()
  return jax.stages.Compiled(executable.load(), [], in_tree.unflatten(args_info_flat), out_tree,
                             no_kwargs=no_kwargs)
