"""The compiled-program cache: a second compile of the same program loads instead of tracing."""

import gc
import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
import time
import weakref

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from sdjax import aot, testing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = (jnp.arange(32, dtype=jnp.float32).reshape(4, 8), jnp.ones((8, 2), jnp.float32))


def _program():
  """A fresh jitted function (nothing cached in memory) and the list of its traces."""
  traces = []

  def f(x, y):
    traces.append(x.shape)
    return {"out": jnp.sin(x) @ y}

  return jax.jit(f), traces


def _entries(folder):
  return sorted(p for p in os.listdir(folder) if p.endswith(".jaxexe"))


def test_second_compile_loads_without_tracing(tmp_path):
  fn, traces = _program()
  first = aot.load_or_compile(fn, ARGS, "f", str(tmp_path))
  assert len(traces) == 1 and len(_entries(tmp_path)) == 1
  fn, traces = _program()
  second = aot.load_or_compile(fn, ARGS, "f", str(tmp_path))
  assert traces == []
  np.testing.assert_array_equal(second(*ARGS)["out"], first(*ARGS)["out"])
  np.testing.assert_array_equal(second(*ARGS)["out"], jnp.sin(ARGS[0]) @ ARGS[1])


def test_param_shapes_are_kept(tmp_path, caplog):
  """A module's param shapes are traced once per key; a damaged entry is traced again."""
  calls = []

  def trace(n=3):
    calls.append(n)
    return {"block": {"kernel": jax.ShapeDtypeStruct((3, 3, n, 8), jnp.bfloat16)},
            "bias": jax.ShapeDtypeStruct((8,), jnp.float32)}

  first = aot.param_shapes("m", trace, str(tmp_path))
  assert aot.param_shapes("m", trace, str(tmp_path)) == first and calls == [3]
  assert aot.param_shapes("other", lambda: trace(4), str(tmp_path)) == trace(4)
  assert calls == [3, 4, 4]
  entries = sorted(tmp_path.iterdir())
  assert len(entries) == 2 and all(p.name.endswith(aot.PARAMS_SUFFIX) for p in entries)
  for path in entries:  # truncated
    path.write_text('{"format": 1, "key": "')
  assert aot.param_shapes("m", trace, str(tmp_path)) == first and calls == [3, 4, 4, 3]
  assert "rebuilding it" in caplog.text
  assert aot.param_shapes("m", trace, str(tmp_path)) == first and len(calls) == 4


def test_old_entries_are_pruned_least_recently_used_first(tmp_path, monkeypatch):
  """Past the size budget the entries used longest ago go; loading an entry counts as a use;
  a crashed writer's old temporary goes, a fresh one (a writer at work) stays."""
  fn, _ = _program()
  aot.load_or_compile(fn, ARGS, "f", str(tmp_path))
  (used,) = _entries(tmp_path)
  size = os.path.getsize(tmp_path / used)
  now = time.time()
  for age, name in ((300, "old.jaxexe"), (200, "fresh.tmp"), (7200, "crashed.tmp"),
                    (100, "newer.jaxexe"), (1000, used)):  # the used entry is the oldest...
    if name != used:
      (tmp_path / name).write_bytes(b"x" * size)
    os.utime(tmp_path / name, (now - age, now - age))
  fn, traces = _program()
  aot.load_or_compile(fn, ARGS, "f", str(tmp_path))  # ...until loaded now
  assert traces == []
  removed = aot.prune(str(tmp_path), max_bytes=2 * size)
  assert sorted(os.path.basename(p) for p in removed) == ["crashed.tmp", "old.jaxexe"]
  assert _entries(tmp_path) == sorted([used, "newer.jaxexe"])
  assert os.path.exists(tmp_path / "fresh.tmp")
  # A new entry is never its own victim, and compiling prunes with the module's budget.
  monkeypatch.setattr(aot, "MAX_BYTES", 0)
  fn, _ = _program()
  aot.load_or_compile(fn, (jnp.ones((3, 8)), ARGS[1]), "f", str(tmp_path))
  assert len(_entries(tmp_path)) == 1 and _entries(tmp_path)[0] not in (used, "newer.jaxexe")


@pytest.mark.parametrize("change", ["shape", "what", "jax_version"])
def test_other_program_is_not_loaded(change, tmp_path, monkeypatch):
  fn, _ = _program()
  aot.load_or_compile(fn, ARGS, "f", str(tmp_path))
  args, what = ARGS, "f"
  if change == "shape":
    args = (jnp.ones((3, 8)), ARGS[1])
  elif change == "what":
    what = "g"
  else:
    monkeypatch.setattr(jax, "__version__", "0.0.0")
  fn, traces = _program()
  out = aot.load_or_compile(fn, args, what, str(tmp_path))(*args)["out"]
  assert len(traces) == 1 and len(_entries(tmp_path)) == 2
  np.testing.assert_allclose(out, jnp.sin(args[0]) @ args[1], rtol=1e-6)


def _rewrite(path, body):
  header = {"format": aot.FORMAT, "key": os.path.basename(path).split(".")[0],
            "sha256": hashlib.sha256(body).hexdigest()}
  with open(path, "wb") as f:
    f.write(json.dumps(header).encode() + b"\n" + body)


@pytest.mark.parametrize("damage", ["flipped_byte", "truncated", "empty", "bad_payload",
                                    "foreign_code"])
def test_corrupt_entry_is_rebuilt(damage, tmp_path, caplog):
  fn, _ = _program()
  aot.load_or_compile(fn, ARGS, "f", str(tmp_path))
  path = os.path.join(tmp_path, _entries(tmp_path)[0])
  with open(path, "rb") as f:
    data = f.read()
  if damage == "flipped_byte":
    data = data[:-100] + bytes([data[-100] ^ 1]) + data[-99:]
  elif damage == "truncated":
    data = data[:len(data) // 2]
  elif damage == "empty":
    data = b""
  if damage == "bad_payload":  # the checksum matches, the executable is garbage
    _rewrite(path, pickle.dumps((b"not an executable", None)))
  elif damage == "foreign_code":  # the checksum matches: the unpickler must refuse os.system
    _rewrite(path, pickle.dumps((os.system, None)))
  else:
    with open(path, "wb") as f:
      f.write(data)
  fn, traces = _program()
  out = aot.load_or_compile(fn, ARGS, "f", str(tmp_path))(*ARGS)["out"]
  assert len(traces) == 1  # rebuilt
  if damage == "foreign_code":
    assert "is not allowed in a cache entry" in caplog.text
  np.testing.assert_allclose(out, jnp.sin(ARGS[0]) @ ARGS[1], rtol=1e-6)
  fn, traces = _program()
  aot.load_or_compile(fn, ARGS, "f", str(tmp_path))
  assert traces == []  # and the rebuilt entry loads again


def test_no_cache_folder_compiles():
  previous = jax.config.jax_compilation_cache_dir
  jax.config.update("jax_compilation_cache_dir", None)
  try:
    assert aot.cache_dir() is None
    fn, traces = _program()
    aot.load_or_compile(fn, ARGS, "f")
    assert len(traces) == 1
  finally:
    jax.config.update("jax_compilation_cache_dir", previous)


_RUN = """
import json, sys
from sdjax import run, sampling
summary = run.generate_run(run.RunConfig(
    prompts=(run.PromptLine("a red circle"),), model=sys.argv[1], steps=2, height=16, width=16,
    guidance_scale=3.0, output_dir=sys.argv[2], compilation_cache=sys.argv[3],
    show_progress=False))
print(json.dumps({"traces": sampling.trace_count, "compile_s": summary.compile_seconds}))
"""


def test_fresh_process_loads_the_sampler(tmp_path):
  """A second process of the same run neither traces nor compiles, and makes the same image.

  Between them the entry is deleted: the process that writes it again finds the program in
  jax's persistent cache, whose executables XLA:CPU cannot serialize into a working entry.
  """
  model = str(tmp_path / "model")
  testing.write_torch_pipeline(model, "sd1", seed=5)
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  results = []
  for i in range(3):
    if i == 1:
      shutil.rmtree(tmp_path / "cache" / "aot")
    proc = subprocess.run([sys.executable, "-c", _RUN, model, str(tmp_path / f"out{i}"),
                           str(tmp_path / "cache")], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
  assert [r["traces"] for r in results] == [1, 1, 0]
  assert len(_entries(tmp_path / "cache" / "aot")) == 1
  images = [np.asarray(Image.open(next((tmp_path / f"out{i}").glob("**/000000.png"))))
            for i in range(3)]
  np.testing.assert_array_equal(images[0], images[1])
  np.testing.assert_array_equal(images[0], images[2])


def _live_programs(name: str) -> int:
  """How many compiled executables named after `name` this process still holds."""
  gc.collect()
  return sum(1 for o in gc.get_objects() if type(o).__name__ == "MeshExecutable"
             and o.xla_executable.hlo_modules()[0].name == f"jit_{name}")


def _scaled_sum(x, scale, y, *, shift=0.0):
  return {"out": (x * scale).sum(0) + y + shift}


def test_bounded_jit_matches_jit_and_frees_dropped_programs(monkeypatch):
  monkeypatch.setattr(aot, "MAX_PROGRAMS", 2)
  bounded = aot.bounded_jit(_scaled_sum, static_argnums=1)
  reference = jax.jit(lambda x, scale, y, shift: _scaled_sum(x, scale, y, shift=shift),
                      static_argnums=1)
  functions = []
  for rows in (1, 2, 3, 4, 5, 2):  # a static argument in the middle, a keyword, 5 shapes
    x = np.arange(rows * 3, dtype=np.float32).reshape(rows, 3)
    got = bounded(x, 2.0, np.ones(3, np.float32), shift=0.5)
    np.testing.assert_array_equal(got["out"], reference(x, 2.0, np.ones(3, np.float32),
                                                        shift=0.5)["out"])
    functions += [weakref.ref(p) for p in bounded.programs.values()]
  assert len(bounded.programs) == 2
  # every dropped program is gone from memory: its function and its executable, not only from
  # the dict (jax keeps what it compiled for a function as long as the function lives)
  assert len({id(f()) for f in functions if f() is not None}) == 2
  assert _live_programs("_scaled_sum") == 2
  # the shape used last but one was kept, the first compiles again
  assert [leaves[0][0] for _, _, leaves in bounded.programs] == [(5, 3), (2, 3)]
