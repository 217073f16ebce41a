import os
import shutil
import subprocess
import sys
import tempfile

import pytest

# Tests import their helpers (parity.py, scheduler_harness.py) as top-level modules.
sys.path.insert(0, os.path.dirname(__file__))

_CACHE_VAR = "SDJAX_TEST_JAX_CACHE"
FAST_COMPILE = ("--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true "
                "--xla_cpu_parallel_codegen_split_count=1")
CLASSIC_EMITTERS = "--xla_cpu_use_fusion_emitters=false"


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
  # expensive optimisations and use XLA:CPU's classic emitters (the programs, and so every
  # parity check, are the same HLO; only the machine code is less tuned: a tiny SD1 sampler
  # compiles in 2.0 s instead of 3.0, the suite takes 30% less CPU), and emit each program as
  # one LLVM module, not split for parallel codegen (two workers already keep both cores busy:
  # the split's threads only added work; the suite's compile time -16%). Inherited by the
  # processes tests start. The classic emitters round programs of different batch shapes
  # differently (1e-6): tests that compare such programs bit for bit run them in processes with
  # `default_codegen_flags()` (`run_default_codegen`).
  flags = os.environ.get("XLA_FLAGS", "")
  if FAST_COMPILE not in flags:
    flags = f"{FAST_COMPILE} {flags}"
  if CLASSIC_EMITTERS not in flags:
    flags = f"{flags} {CLASSIC_EMITTERS}"
  os.environ["XLA_FLAGS"] = flags.strip()
  import jax  # noqa: PLC0415

  jax.config.update("jax_compilation_cache_dir", _run_cache())
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def _run_cache() -> str:
  return os.path.join(os.environ[_CACHE_VAR], "sdjax", "jax")


def default_codegen_flags() -> str:
  """XLA_FLAGS for a process a test starts whose programs are compared bit for bit across
  shapes: this run's, less the classic emitters. (A process of its own, not a nested pytest,
  which would pay pytest's start and the module's fixtures again: ~20 s a test.)"""
  return os.environ["XLA_FLAGS"].replace(CLASSIC_EMITTERS, "").strip()


def run_default_codegen(code: str, *args: str) -> str:
  """`python -c code *args` (the repository root its folder, one CPU device) with
  `default_codegen_flags()`: for checks that compare programs bit for bit, which the code
  asserts itself. Its stdout; its stderr's end when it fails."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = {**os.environ, "XLA_FLAGS": default_codegen_flags(), "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([sys.executable, "-c", code, *args], cwd=root, env=env,
                        capture_output=True, text=True, timeout=600)
  if proc.returncode != 0:
    pytest.fail(f"with XLA:CPU's default emitters:\n{proc.stderr[-4000:]}", pytrace=False)
  return proc.stdout


def pytest_unconfigure(config):
  if getattr(config, "_sdjax_cache_owner", False):
    shutil.rmtree(os.environ.pop(_CACHE_VAR), ignore_errors=True)


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
  """After each test module, jax forgets the programs it compiled and traced: an xdist worker
  runs half the suite in one process, and kept every executable of a thousand tests (over 20 GB
  in two workers, past this 24 GB machine's memory). A later module that needs one again finds
  it in the run's persistent compilation cache."""
  yield
  import gc  # noqa: PLC0415

  import jax  # noqa: PLC0415

  jax.clear_caches()
  gc.collect()


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
def sd1(tmp_path_factory):
  """(diffusers' tiny random SD1 pipeline, sdjax's of the same folder), for parity tests of a
  feature on both (a module may define its own `sd1`)."""
  import sdjax  # noqa: PLC0415
  from sdjax import testing  # noqa: PLC0415

  folder = str(tmp_path_factory.mktemp("sd1") / "pipe")
  base = testing.write_torch_pipeline(folder, "sd1", seed=11)
  return base, sdjax.load_pipeline(folder)


@pytest.fixture(scope="module")
def cache():
  """The --compilation_cache folder for runs: the run-wide one (tests that need a cold start
  make their own)."""
  return _run_cache()


# The longest files first (worker seconds, setup included, of a 2-worker run on a 2-core AMD
# EPYC on 2026-12-07, 24.4 min: main 419, sampling 410, sdxl 195, controlnet 183, run 151,
# prompts 145, ip_adapter 138, train 106, inpaint 86, nv_rng 78, brownian_tree 77, builtin 67,
# controlnet_union 57, cfg_skip 54, adapter 51, pix2pix 49, tiling 48, pag 48, k_diffusion 40,
# cfg_pp 40, token_merging 37, unet 33; the rest under 26 each): xdist hands whole files to
# workers in collection order, and a long file collected late (test_train, then test_run) left
# one worker idle for minutes at the end.
_LONGEST_FIRST = ("test_main.py", "test_sampling.py", "test_sdxl.py", "test_controlnet.py",
                  "test_run.py", "test_prompts.py", "test_ip_adapter.py", "test_train.py",
                  "test_inpaint.py", "test_nv_rng.py", "test_brownian_tree.py", "test_builtin.py",
                  "test_controlnet_union.py", "test_cfg_skip.py", "test_adapter.py",
                  "test_pix2pix.py", "test_tiling.py", "test_pag.py", "test_k_diffusion.py",
                  "test_cfg_pp.py", "test_token_merging.py", "test_unet.py",
                  "test_upscaler_model.py", "test_freeu.py", "test_depth.py")


def pytest_collection_modifyitems(session, config, items):
  rank = {name: i for i, name in enumerate(_LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable within a file
