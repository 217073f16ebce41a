"""Output sinks: PNG folders and WebDataset shards on local disks and fsspec stores, resume, merge."""

import io
import json
import os
import tarfile

import fsspec
import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from sdjax import outputs, sinks


def _image(index, size=8):
  rng = np.random.default_rng(index)
  return rng.integers(0, 256, (size, size, 3), dtype=np.uint8)


def _write(sink, shards, shard_size, total, *, stop_after=None, kept=None):
  """Writes the images of `shards` through a ShardWriter; stops (abandons) after `stop_after`."""
  kept = kept or {}
  remaining = {s: len(range(s * shard_size, min((s + 1) * shard_size, total)))
               - len(kept.get(s, ())) for s in shards}
  writer = sinks.ShardWriter(sink, remaining, workers=3, max_pending=2)
  count = 0
  try:
    for s in shards:
      for index in range(s * shard_size, min((s + 1) * shard_size, total)):
        if index in kept.get(s, ()):
          continue
        if count == stop_after:
          return
        writer.submit(s, {"index": index, "prompt": f"p{index}"}, _image(index), f"text {index}")
        count += 1
  finally:
    writer.close()


@pytest.fixture(params=["local", "memory"])
def store(request, tmp_path):
  if request.param == "local":
    yield sinks.Store(str(tmp_path / "out"))
    return
  url = f"memory://sinks-{id(request)}/{request.node.name}"
  yield sinks.Store(url)
  memory = fsspec.filesystem("memory")
  for path in [p for p in memory.store if p.startswith(sinks.Store(url).root)]:
    memory.rm_file(path)


def test_png_folders_and_manifests(store):
  store.check()
  sink = sinks.make_sink("png", store, shard_size=4, images_per_folder=3)
  _write(sink, [0, 1, 2], 4, 10)
  assert sinks.finished_shards(store) == {0, 1, 2}
  assert sorted(store.listdir()) == ["00000", "00001", "00002", "00003", "manifests"]
  assert all(len(store.listdir(f"0000{k}")) == (3 if k < 3 else 1) for k in range(4))
  records = list(sinks.iter_records(store, 3))
  assert [r["index"] for r in records] == list(range(10))
  for r in records:
    data = store.read(r["file"])
    assert r["file"] == f"{r['index'] // 3:05d}/{r['index']:06d}.png"
    with Image.open(io.BytesIO(data)) as png:
      assert png.text["parameters"] == f"text {r['index']}"
      np.testing.assert_array_equal(np.asarray(png), _image(r["index"]))


def test_png_resume_keeps_written_images(store):
  sink = sinks.make_sink("png", store, shard_size=5, images_per_folder=100)
  _write(sink, [0, 1], 5, 10, stop_after=7)  # shard 0 finished, shard 1 has 2 images
  assert sinks.finished_shards(store) == {0} and sinks.partial_shards(store) == {1}
  sink = sinks.make_sink("png", store, shard_size=5, images_per_folder=100)
  store.write("00000/000006.png", b"damaged")  # a kept image must still be intact
  kept = {1: sink.resume(1)}
  assert kept == {1: {5}}
  _write(sink, [1], 5, 10, kept=kept)
  assert sinks.finished_shards(store) == {0, 1} and sinks.partial_shards(store) == set()
  assert [r["index"] for r in sinks.iter_records(store, 2)] == list(range(10))


def test_webdataset_shards(store):
  sink = sinks.make_sink("webdataset", store, shard_size=4, images_per_folder=1)
  _write(sink, [0, 1, 2], 4, 10, stop_after=9)  # the last shard is abandoned unpublished
  assert sinks.finished_shards(store) == {0, 1}
  assert sorted(store.listdir(sinks.SHARDS)) == ["000000.tar", "000001.tar"]
  assert not [n for n in store.listdir(sinks.SHARDS) if ".tmp" in n]
  sink = sinks.make_sink("webdataset", store, shard_size=4, images_per_folder=1)
  _write(sink, [2], 4, 10)
  assert [r["index"] for r in sinks.iter_records(store, 3)] == list(range(10))

  local = []
  for name in sorted(store.listdir(sinks.SHARDS)):
    path = os.path.join(str(os.environ.get("TMPDIR", "/tmp")), f"sdjax-test-{os.getpid()}-{name}")
    with open(path, "wb") as f:
      f.write(store.read(f"{sinks.SHARDS}/{name}"))
    local.append(path)
  try:
    samples = list(wds.WebDataset(local, shardshuffle=False, empty_check=False))
  finally:
    for path in local:
      os.remove(path)
  assert [s["__key__"] for s in samples] == [f"{k:06d}" for k in range(10)]
  for s in samples:
    record = json.loads(s["json"])
    assert record["index"] == int(s["__key__"]) and record["file"].endswith(".tar")
    assert s["txt"].decode() == record["prompt"] == f"p{record['index']}"
    with Image.open(io.BytesIO(s["png"])) as png:
      np.testing.assert_array_equal(np.asarray(png), _image(record["index"]))


def test_tar_made_out_of_order_is_written_in_key_order(tmp_path):
  """main.py makes a shard's images out of order when its lines have several sizes: the tar is
  rewritten in key order when it closes, the same bytes as one made in order."""
  tars = []
  for order in ([0, 1, 2], [2, 0, 1]):
    store = sinks.Store(str(tmp_path / "".join(map(str, order))))
    writer = sinks.ShardWriter(sinks.make_sink("webdataset", store, shard_size=3,
                                               images_per_folder=1), {0: 3}, workers=2,
                               max_pending=1)
    for index in order:
      writer.submit(0, {"index": index, "prompt": f"p{index}"}, _image(index), f"text {index}")
    writer.close()
    tars.append(store.read("shards/000000.tar"))
    assert not [n for n in os.listdir(tmp_path / "".join(map(str, order)) / "shards")
                if n != "000000.tar"]  # no temporary left
  assert tars[0] == tars[1]


@pytest.mark.parametrize("output_format", ["png", "webdataset"])
def test_jpg_and_lossless_webp_images(store, output_format, monkeypatch):
  """--image_format in both layouts: files named by it, the A1111 text in EXIF, lossless webp
  keeps every pixel, and the merged grid reads them back."""
  monkeypatch.setattr(outputs, "MAX_GRID_IMAGES", 5)
  for name, fmt in (("jpg", sinks.ImageFormat("jpg", 90)),
                    ("webp", sinks.ImageFormat("webp", lossless=True))):
    sub = sinks.Store(f"{store.url}/{name}")
    sub.check()
    _write(sinks.make_sink(output_format, sub, shard_size=3, images_per_folder=4,
                           image_format=fmt), [0, 1], 3, 6)
    assert sinks.merge(sub, 2, 6)
    for r in sinks.iter_records(sub, 2):
      if output_format == "png":
        assert r["file"] == f"{r['index'] // 4:05d}/{r['index']:06d}.{name}"
        data = sub.read(r["file"])
      else:
        assert r["image"] == f"{r['key']}.{name}"
        with tarfile.open(fileobj=io.BytesIO(sub.read(r["file"]))) as tar:
          data = tar.extractfile(r["image"]).read()
      assert outputs.read_parameters(data) == f"text {r['index']}"
      with Image.open(io.BytesIO(data)) as got:
        pixels = np.asarray(got.convert("RGB"))
      if name == "webp":
        np.testing.assert_array_equal(pixels, _image(r["index"]))
    with Image.open(io.BytesIO(sub.read(outputs.GRID_NAME))) as grid:
      cell = np.asarray(grid.convert("RGB"))[8:16, 8:16]  # image 4
    if name == "webp":
      np.testing.assert_array_equal(cell, _image(4))
    page = sub.read(outputs.INDEX_HTML_NAME).decode()
    assert f"000004.{name}" in page


def test_tar_bytes_do_not_depend_on_the_run(tmp_path):
  digests = []
  for run in range(2):
    store = sinks.Store(str(tmp_path / f"run{run}"))
    _write(sinks.make_sink("webdataset", store, shard_size=3, images_per_folder=1), [0], 3, 3)
    digests.append(store.read("shards/000000.tar"))
  assert digests[0] == digests[1]
  with tarfile.open(fileobj=io.BytesIO(digests[0])) as tar:
    assert tar.getnames() == [f"00000{k}.{e}" for k in range(3) for e in ("png", "txt", "json")]


@pytest.mark.parametrize("output_format", ["png", "webdataset"])
def test_merge_is_bounded(store, output_format, monkeypatch):
  monkeypatch.setattr(outputs, "MAX_GRID_IMAGES", 5)
  sink = sinks.make_sink(output_format, store, shard_size=3, images_per_folder=4)
  _write(sink, [0, 2], 3, 8)
  assert not sinks.merge(store, 3, 8)  # shard 1 (another job's) is missing
  assert not store.exists(outputs.MANIFEST_NAME)
  _write(sink, [1], 3, 8)
  assert sinks.merge(store, 3, 8)
  lines = store.read(outputs.MANIFEST_NAME).decode().splitlines()
  assert [json.loads(line)["index"] for line in lines] == list(range(8))
  page = store.read(outputs.INDEX_HTML_NAME).decode()
  assert "8 images (the first 5 shown)" in page
  assert page.count("<figure id=") == 5
  assert ("src=\"grid.png\"" in page) == (output_format == "webdataset")
  assert ("shards/000002.tar" in page) == (output_format == "webdataset")
  with Image.open(io.BytesIO(store.read(outputs.GRID_NAME))) as grid:
    assert grid.size == (3 * 8, 2 * 8)
    cell = np.asarray(grid.convert("RGB"))[8:16, 8:16]  # image 4: row 1, column 1
  np.testing.assert_array_equal(cell, _image(4))


def test_clear_and_foreign_outputs(tmp_path):
  store = sinks.Store(str(tmp_path))
  (tmp_path / "notes.txt").write_text("mine")
  assert not sinks.holds_other_outputs(store)
  (tmp_path / "000000.png").write_bytes(b"x")  # a run of the old flat layout
  assert sinks.holds_other_outputs(store)
  _write(sinks.make_sink("png", store, shard_size=2, images_per_folder=2), [0], 2, 2)
  store.write(sinks.RUN_JSON, b"{}")
  sinks.clear(store)
  assert os.listdir(tmp_path) == ["notes.txt"]
