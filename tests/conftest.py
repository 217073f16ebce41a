import os
import shutil
import sys
import tempfile

import pytest

# Tests import their helpers (parity.py, scheduler_harness.py) as top-level modules.
sys.path.insert(0, os.path.dirname(__file__))

_CACHE_VAR = "SDJAX_TEST_JAX_CACHE"


def pytest_configure(config):
  """One persistent compilation cache for the whole run, shared by the xdist workers (they
  inherit the variable): a program that several tests compile (the same tiny network under the
  same sampler, a training step the recipe runs twice) is compiled once. Set before any compile:
  jax decides at its first compile whether the cache is on."""
  if _CACHE_VAR not in os.environ:
    os.environ[_CACHE_VAR] = tempfile.mkdtemp(prefix="sdjax-test-jax-cache-")
    config._sdjax_cache_owner = True  # noqa: SLF001
  import jax  # noqa: PLC0415

  jax.config.update("jax_compilation_cache_dir", os.environ[_CACHE_VAR])
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


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
def cache(tmp_path_factory):
  """A --compilation_cache folder of the module's own: runs in it start cold."""
  return str(tmp_path_factory.mktemp("jax_cache"))
