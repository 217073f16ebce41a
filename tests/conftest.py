import os
import shutil
import sys
import tempfile

import pytest

# Tests import their helpers (parity.py, scheduler_harness.py) as top-level modules.
sys.path.insert(0, os.path.dirname(__file__))

_CACHE_VAR = "SDJAX_TEST_JAX_CACHE"
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def pytest_configure(config):
  """One persistent compilation cache for the whole run, shared by the xdist workers and the
  main.py processes tests start (they inherit the variables): a program that several tests
  compile (the same tiny network under the same sampler, a training step the recipe runs twice)
  is compiled once, and nothing is written to the user's ~/.cache. Set before any compile: jax
  decides at its first compile whether the cache is on."""
  if _CACHE_VAR not in os.environ:
    os.environ[_CACHE_VAR] = tempfile.mkdtemp(prefix="sdjax-test-jax-cache-")
    config._sdjax_cache_owner = True  # noqa: SLF001
  # main.py's default --compilation_cache is $XDG_CACHE_HOME/sdjax/jax: the same folder.
  os.environ["XDG_CACHE_HOME"] = os.environ[_CACHE_VAR]
  # Compiling is most of the suite's time and the tests' networks are tiny: skip LLVM's
  # expensive optimisations (the programs, and so every parity and equality check, are the
  # same HLO; only the machine code is less tuned). Inherited by the processes tests start.
  # (XLA:CPU's classic emitters, --xla_cpu_use_fusion_emitters=false, compile a third faster
  # but round programs of different batch shapes differently: bit-for-bit checks that hold
  # with the default emitters users run fail there.)
  flags = os.environ.get("XLA_FLAGS", "")
  if FAST_COMPILE not in flags:
    os.environ["XLA_FLAGS"] = f"{FAST_COMPILE} {flags}".strip()
  import jax  # noqa: PLC0415

  jax.config.update("jax_compilation_cache_dir", _run_cache())
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def _run_cache() -> str:
  return os.path.join(os.environ[_CACHE_VAR], "sdjax", "jax")


def pytest_unconfigure(config):
  if getattr(config, "_sdjax_cache_owner", False):
    shutil.rmtree(os.environ.pop(_CACHE_VAR), ignore_errors=True)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
  """A tiny random SD1 diffusers folder, for tests of main.py and runs."""
  import torch  # noqa: PLC0415

  from sdjax import testing  # noqa: PLC0415

  torch.set_num_threads(1)
  folder = str(tmp_path_factory.mktemp("model") / "pipe")
  testing.write_torch_pipeline(folder, "sd1", seed=31)
  return folder


@pytest.fixture(scope="module")
def cache():
  """The --compilation_cache folder for runs: the run-wide one (tests that need a cold start
  make their own)."""
  return _run_cache()


# The longest files first (worker seconds on 2 cores, the mean of two clean runs on 2026-12-03,
# on a machine a third slower than the morning's: main 480, sampling 293, train 218, inpaint 202,
# prompts 184, sdxl 180, run 171, controlnet 149, builtin 113, unet 75, aot 41, pipeline 40; the
# rest under 35 each): xdist hands whole files to workers in collection order, and a long file
# collected late (test_train, then test_run) left one worker idle for minutes at the end.
_LONGEST_FIRST = ("test_main.py", "test_sampling.py", "test_train.py", "test_inpaint.py",
                  "test_prompts.py", "test_sdxl.py", "test_run.py", "test_controlnet.py",
                  "test_builtin.py", "test_unet.py", "test_aot.py", "test_pipeline.py")


def pytest_collection_modifyitems(session, config, items):
  rank = {name: i for i, name in enumerate(_LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable within a file
