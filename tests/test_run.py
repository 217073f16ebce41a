"""generate_run in this process: fsspec output locations, a run split into independent jobs."""

import io
import os

import numpy as np
import pytest
from PIL import Image

from sdjax import outputs, run, sinks

PROMPTS = tuple(run.PromptLine(f"a photo of a cat {i}") for i in range(5))


@pytest.fixture(scope="module")
def single_run(model, cache, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("single") / "out")
  summary = run.generate_run(_config(model, out, cache))
  assert (summary.images, summary.merged) == (5, True)
  return out


def _config(model, output_dir, cache, **kwargs):
  return run.RunConfig(prompts=PROMPTS, model=model, steps=2, guidance_scale=3.0,
                       scheduler="euler_ancestral", height=16, width=16, seed=100, batch_size=2,
                       output_dir=output_dir, compilation_cache=cache, show_progress=False,
                       shard_size=2, **kwargs)


def _pixels(store):
  records = [r for s in range(3) for r in sinks.read_manifest(
      store, f"{sinks.MANIFESTS}/{sinks.shard_name(s)}.jsonl")]
  return {r["index"]: np.asarray(Image.open(io.BytesIO(store.read(r["file"])))) for r in records}


def test_jobs_on_a_memory_store_make_the_single_run(model, cache, single_run):
  """Two jobs (--num_shards 2) writing to memory:// make the pixels of one local run."""
  url = f"memory://test-run-{os.getpid()}/out"
  first = run.generate_run(_config(model, url, cache, num_shards=2, shard_index=1))
  assert (first.images, first.merged) == (2, False)  # shard 1; shards 0 and 2 belong to job 0
  store = sinks.Store(url)
  assert sinks.finished_shards(store) == {1} and not store.exists(outputs.MANIFEST_NAME)
  second = run.generate_run(_config(model, url, cache, num_shards=2, shard_index=0))
  assert (second.images, second.skipped, second.merged) == (3, 2, True)

  ref = _pixels(sinks.Store(single_run))
  got = _pixels(store)
  assert sorted(got) == list(range(5))
  for k in ref:
    np.testing.assert_array_equal(got[k], ref[k])
  lines = store.read(outputs.MANIFEST_NAME).decode().splitlines()
  assert len(lines) == 5 and store.exists(outputs.GRID_NAME)
  again = run.generate_run(_config(model, url, cache, num_shards=2, shard_index=0))
  assert (again.images, again.skipped) == (0, 5)


def test_png_metadata_is_shareable(model, single_run):
  text = Image.open(os.path.join(single_run, "00000", "000000.png")).text["parameters"]
  params = outputs.parse_a1111_parameters(text)
  unet = os.path.join(model, "unet", "diffusion_pytorch_model.safetensors")
  assert params["Model"] == "pipe" and model not in text  # no local path in shared images
  assert params["Model hash"] == outputs.short_hash(unet) == outputs._sha256_file(unet)[:10]  # noqa: SLF001
  assert params["Version"].startswith("sdjax ")


def test_cpu_devices_after_jax_started():
  """In a process whose CPU backend is up, the same count is fine and another a clear error."""
  import jax  # noqa: PLC0415

  from sdjax import parallel  # noqa: PLC0415

  started = len(jax.devices("cpu"))
  parallel.set_cpu_devices(started)
  with pytest.raises(ValueError, match=f"already started with {started} CPU devices"):
    parallel.set_cpu_devices(started + 1)
