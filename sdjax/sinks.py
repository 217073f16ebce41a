"""Where a run's images go: image folders or WebDataset tar shards, on a local disk or any fsspec URL.

A run's images are cut into shards of `shard_size` consecutive indices; each shard has exactly
one writer (a process of a job), so nothing is ever appended to by two writers and no locks are
needed, on NFS or object stores alike. The output location holds

  run.json                      the settings; a rerun with others is refused
  manifests/000012.jsonl        shard 12's manifest records, written once, after all its images:
                                a shard is finished exactly when this object exists
  manifests/000012.part.jsonl   png only: the images of an interrupted shard already written
  00000/000000.png ...          png: images in folders of `images_per_folder` (.jpg / .webp with
                                that image format)
  shards/000012.tar             webdataset: `<key>.png` (.jpg, .webp), `<key>.txt` (the
                                prompt, img2dataset's caption), `<key>.json` (the manifest
                                record)
  manifest.jsonl index.html grid.png   merged when every shard is finished

Every object is written whole (a temporary name renamed on local disks; one upload on object
stores, which never show a partial object), so a killed run leaves nothing half written under a
final name, and finding what is done is one listing of `manifests/`, whatever the run's size.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import hashlib
import io
import itertools
import json
import os
import posixpath
import re
import tarfile
import tempfile
import threading
from collections.abc import Iterable, Iterator
from typing import Any

import fsspec
import numpy as np
from absl import logging
from PIL import Image

from sdjax import outputs

RUN_JSON = "run.json"
MANIFESTS = "manifests"
SHARDS = "shards"
FORMATS = ("png", "webdataset")
_SHARD_RE = re.compile(r"^(\d{6,})\.jsonl$")
_PART_RE = re.compile(r"^(\d{6,})\.part\.jsonl$")
_FOLDER_RE = re.compile(r"^\d{5,}$")


def shard_name(shard: int) -> str:
  return f"{shard:06d}"


def image_key(index: int) -> str:
  return f"{index:06d}"


# --- the output location ------------------------------------------------------------------------


class Store:
  """An output location: a local folder (atomic renames, fsync) or any fsspec URL."""

  def __init__(self, url: str):
    self.url = url
    self.fs, self.root = fsspec.core.url_to_fs(url)
    protocols = self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
    self.local = "file" in protocols
    self._made: set[str] = set()
    self._lock = threading.Lock()

  def path(self, rel: str) -> str:
    return posixpath.join(self.root, rel) if rel else self.root

  def check(self) -> None:
    """Creates the location if missing; a one-line OutputError when it cannot be written."""
    if self.local:
      outputs.check_output_dir(self.root)
      return
    probe = self.path(outputs._temp_name("write-probe"))  # noqa: SLF001
    try:
      self.fs.makedirs(self.root, exist_ok=True)
      self.fs.pipe_file(probe, b"probe")
      self.fs.rm_file(probe)
    except Exception as e:  # noqa: BLE001 - each store raises its own kinds
      raise outputs.OutputError(f"output location {self.url!r} is not writable: {e}") from None

  def makedirs(self, rel: str) -> None:
    with self._lock:  # held while creating: another writer must not use the folder before
      if rel not in self._made:
        self.fs.makedirs(self.path(rel), exist_ok=True)
        self._made.add(rel)

  def write(self, rel: str, data: bytes) -> None:
    """Writes one whole object; readers never see a part of it."""
    self.makedirs(posixpath.dirname(rel))
    if self.local:
      outputs._atomic_write(self.path(rel), data)  # noqa: SLF001
    else:
      self.fs.pipe_file(self.path(rel), data)

  def read(self, rel: str) -> bytes:
    return self.fs.cat_file(self.path(rel))

  def open(self, rel: str, mode: str = "rb"):
    return self.fs.open(self.path(rel), mode)

  def exists(self, rel: str) -> bool:
    return self.fs.exists(self.path(rel))

  def listdir(self, rel: str = "") -> list[str]:
    """Names in a folder (empty when it does not exist)."""
    if self.local:
      try:
        return os.listdir(self.path(rel))
      except (FileNotFoundError, NotADirectoryError):
        return []
    try:
      return [posixpath.basename(p.rstrip("/")) for p in self.fs.ls(self.path(rel), detail=False)]
    except FileNotFoundError:
      return []

  def remove(self, rel: str) -> None:
    """Removes a file or a whole folder; nothing when it does not exist."""
    path = self.path(rel)
    try:
      if self.fs.isfile(path):
        self.fs.rm_file(path)
      else:
        self.fs.rm(path, recursive=True)
    except FileNotFoundError:
      pass

  def staging_file(self, rel: str) -> str:
    """A local path to build `rel` in before `publish`: beside it on a local disk."""
    if self.local:
      self.makedirs(posixpath.dirname(rel))
      folder, name = os.path.split(self.path(rel))
      return os.path.join(folder, outputs._temp_name(name))  # noqa: SLF001
    fd, path = tempfile.mkstemp(prefix="sdjax-", suffix="-" + posixpath.basename(rel))
    os.close(fd)
    return path

  def publish(self, staged: str, rel: str) -> None:
    """Moves a finished staging file to `rel` in one step."""
    if self.local:
      os.replace(staged, self.path(rel))
      outputs._fsync_dir(os.path.dirname(self.path(rel)))  # noqa: SLF001
      return
    self.makedirs(posixpath.dirname(rel))
    try:
      self.fs.put_file(staged, self.path(rel))
    finally:
      os.remove(staged)

  def write_lines(self, rel: str, chunks: Iterable[bytes]) -> None:
    """Writes a possibly large object from chunks, through a staging file (bounded memory)."""
    staged = self.staging_file(rel)
    try:
      with open(staged, "wb") as f:
        for chunk in chunks:
          f.write(chunk)
        f.flush()
        os.fsync(f.fileno())
      self.publish(staged, rel)
    except BaseException:
      if os.path.exists(staged):
        os.remove(staged)
      raise

  def cleanup_temporaries(self) -> None:
    """Removes what killed writers left under temporary names (local disks only)."""
    if not self.local:
      return  # Object stores never hold a partial object.
    for rel in ("", SHARDS, MANIFESTS):
      if os.path.isdir(self.path(rel)):
        outputs.cleanup_temporaries(self.path(rel))


def finished_shards(store: Store) -> set[int]:
  """The shards whose manifest exists: one listing, however many images the run has."""
  return {int(m[1]) for m in map(_SHARD_RE.match, store.listdir(MANIFESTS)) if m}


def partial_shards(store: Store) -> set[int]:
  return {int(m[1]) for m in map(_PART_RE.match, store.listdir(MANIFESTS)) if m}


def read_manifest(store: Store, rel: str) -> list[dict]:
  data = store.read(rel)
  return [json.loads(line) for line in data.splitlines() if line.strip()]


def _jsonl(records: Iterable[dict]) -> bytes:
  return b"".join(json.dumps(r, ensure_ascii=False, separators=(",", ":"),
                             allow_nan=False).encode() + b"\n" for r in records)


# --- sinks --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ImageFormat:
  """How images are encoded (`outputs.image_bytes`): png, jpg or webp, with A1111's options."""

  name: str = "png"
  quality: int = 80  # jpg, lossy webp
  lossless: bool = False  # webp

  def encode(self, image: np.ndarray, parameters: str) -> bytes:
    return outputs.image_bytes(image, parameters, self.name, quality=self.quality,
                               lossless=self.lossless)

  def settings(self) -> dict[str, Any]:
    """What the run's settings record of it (nothing for png: older folders still match)."""
    if self.name == "png":
      return {}
    return {"image_format": self.name, "image_quality": self.quality,
            **({"webp_lossless": True} if self.name == "webp" and self.lossless else {})}


class Sink:
  """Encodes images (on worker threads) and collects each open shard's records (in order)."""

  format = ""

  def __init__(self, store: Store, image_format: ImageFormat = ImageFormat()):
    self.store, self.image_format = store, image_format
    self.ext = image_format.name
    self._records: dict[int, list[dict]] = {}

  def encode(self, record: dict, image: np.ndarray, parameters: str) -> tuple[dict, bytes]:
    """Worker thread: the image file and the record that names it. `image`: uint8 [H, W, 3]."""
    data = self.image_format.encode(image, parameters)
    return {**record, **self.location(record["index"]),
            "sha256": hashlib.sha256(data).hexdigest()}, data

  def location(self, index: int) -> dict[str, str]:
    raise NotImplementedError

  def resume(self, shard: int) -> set[int]:
    """Indices of `shard` already written by an interrupted run (kept, not made again)."""
    return set()

  def add(self, shard: int, record: dict, data: bytes) -> None:
    self._records.setdefault(shard, []).append(record)

  def finish(self, shard: int) -> None:
    """Writes the shard's manifest, which marks it finished; its images are written already."""
    records = sorted(self._records.pop(shard, []), key=lambda r: r["index"])
    self.store.write(f"{MANIFESTS}/{shard_name(shard)}.jsonl", _jsonl(records))

  def abandon(self, shard: int) -> None:
    """Stops an unfinished shard (interrupt or error)."""
    self._records.pop(shard, None)


class PngSink(Sink):
  """`<folder>/<index>.png`, `images_per_folder` to a folder; interrupted shards resume."""

  format = "png"

  def __init__(self, store: Store, images_per_folder: int, image_format: ImageFormat):
    super().__init__(store, image_format)
    self.images_per_folder = images_per_folder

  def location(self, index: int) -> dict[str, str]:
    return {"file": f"{index // self.images_per_folder:05d}/{image_key(index)}.{self.ext}"}

  def encode(self, record, image, parameters):
    record, data = super().encode(record, image, parameters)
    self.store.write(record["file"], data)
    return record, data

  def resume(self, shard: int) -> set[int]:
    rel = f"{MANIFESTS}/{shard_name(shard)}.part.jsonl"
    try:
      records = read_manifest(self.store, rel)
    except FileNotFoundError:
      return set()
    except ValueError:
      logging.warning("%s is unreadable; making its shard again", rel)
      return set()
    kept = [r for r in records if self._intact(r)]
    self._records[shard] = kept
    return {r["index"] for r in kept}

  def _intact(self, record: dict) -> bool:
    try:
      data = self.store.read(record["file"])
    except (OSError, KeyError):
      return False
    return hashlib.sha256(data).hexdigest() == record.get("sha256")

  def finish(self, shard: int) -> None:
    super().finish(shard)
    self.store.remove(f"{MANIFESTS}/{shard_name(shard)}.part.jsonl")

  def abandon(self, shard: int) -> None:
    records = sorted(self._records.pop(shard, []), key=lambda r: r["index"])
    if records:
      self.store.write(f"{MANIFESTS}/{shard_name(shard)}.part.jsonl", _jsonl(records))


class TarSink(Sink):
  """WebDataset shards `shards/<shard>.tar`, staged and published whole when complete."""

  format = "webdataset"

  def __init__(self, store: Store, shard_size: int, image_format: ImageFormat):
    super().__init__(store, image_format)
    self.shard_size = shard_size
    self._open: dict[int, tuple[str, tarfile.TarFile]] = {}

  def location(self, index: int) -> dict[str, str]:
    shard = index // self.shard_size
    location = {"file": f"{SHARDS}/{shard_name(shard)}.tar", "key": image_key(index)}
    return location if self.ext == "png" else {**location, "image": f"{location['key']}.{self.ext}"}

  def add(self, shard, record, data):
    super().add(shard, record, data)
    if shard not in self._open:
      staged = self.store.staging_file(f"{SHARDS}/{shard_name(shard)}.tar")
      self._open[shard] = staged, tarfile.open(staged, "w", format=tarfile.USTAR_FORMAT)
    tar = self._open[shard][1]
    meta = json.dumps(record, ensure_ascii=False, allow_nan=False).encode()
    # The prompt as a caption file too, as img2dataset writes them (what training loaders read).
    caption = () if record.get("prompt") is None else (
        (f"{record['key']}.txt", str(record["prompt"]).encode()),)
    for name, payload in ((f"{record['key']}.{self.ext}", data), *caption,
                          (f"{record['key']}.json", meta)):
      info = tarfile.TarInfo(name)
      info.size, info.mode, info.mtime = len(payload), 0o644, 0  # same bytes on every run
      tar.addfile(info, io.BytesIO(payload))

  def finish(self, shard):
    staged, tar = self._open.pop(shard)
    keys = [_sample_key(m) for m in tar.getmembers()]
    tar.close()
    if keys != sorted(keys):  # made out of order (lines of several sizes): samples by key
      _sort_tar(staged)
    with open(staged, "rb+") as f:
      os.fsync(f.fileno())
    self.store.publish(staged, f"{SHARDS}/{shard_name(shard)}.tar")
    super().finish(shard)

  def abandon(self, shard):
    super().abandon(shard)
    if shard in self._open:
      staged, tar = self._open.pop(shard)
      tar.close()
      os.remove(staged)


def _sample_key(member: tarfile.TarInfo) -> str:
  return member.name.split(".", 1)[0]


def _sort_tar(path: str) -> None:
  """Rewrites the tar at `path` with its samples in key order (each sample's files as they
  were: `<key>.png`, `<key>.txt`, `<key>.json`), so a shard's bytes do not depend on the order
  its images were made in."""
  folder, name = os.path.split(path)
  ordered = os.path.join(folder, outputs._temp_name(name))  # noqa: SLF001
  with tarfile.open(path, "r") as src, \
      tarfile.open(ordered, "w", format=tarfile.USTAR_FORMAT) as dst:
    for member in sorted(src.getmembers(), key=_sample_key):  # stable: a sample's order kept
      dst.addfile(member, src.extractfile(member))
  os.replace(ordered, path)


def make_sink(output_format: str, store: Store, *, shard_size: int, images_per_folder: int,
              image_format: ImageFormat = ImageFormat()) -> Sink:
  if output_format == "png":
    return PngSink(store, images_per_folder, image_format)
  return TarSink(store, shard_size, image_format)


# --- writing on worker threads ------------------------------------------------------------------


class ShardWriter:
  """Encodes and stores images on a bounded pool of threads, and closes shards as they fill.

  PIL's PNG encoder, zlib, hashing and file writes release the GIL, so the threads run while the
  main thread feeds the device. At most `max_pending` images wait in the pool: past that,
  `submit` blocks (backpressure). Results are taken in submission order, so a shard's manifest
  is written only after all of its images.
  """

  def __init__(self, sink: Sink, remaining: dict[int, int], *, workers: int, max_pending: int):
    self.sink, self.remaining = sink, dict(remaining)
    self.max_pending = max(max_pending, 1)
    self._pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="sdjax-write")
    self._pending: collections.deque = collections.deque()
    self.written = 0
    for shard, count in self.remaining.items():
      if count == 0:  # everything was kept from an interrupted run
        sink.finish(shard)

  def submit(self, shard: int, record: dict, image: np.ndarray, parameters: str) -> None:
    future = self._pool.submit(self.sink.encode, record, image, parameters)
    self._pending.append((shard, future))
    self._drain(self.max_pending)

  def _drain(self, keep: int) -> None:
    while self._pending and (len(self._pending) > keep or self._pending[0][1].done()):
      shard, future = self._pending.popleft()
      record, data = future.result()
      self.sink.add(shard, record, data)
      self.written += 1
      self.remaining[shard] -= 1
      if self.remaining[shard] == 0:
        self.sink.finish(shard)

  def close(self) -> None:
    """Waits for every submitted image; records unfinished shards as the sink can."""
    try:
      self._drain(0)
    finally:
      for _, future in self._pending:
        future.cancel()
      self._pool.shutdown(wait=True)
      for shard, count in self.remaining.items():
        if count > 0:
          self.sink.abandon(shard)


# --- the finished run: merged manifest, gallery, grid -------------------------------------------


def iter_records(store: Store, num_shards: int) -> Iterator[dict]:
  for shard in range(num_shards):
    yield from read_manifest(store, f"{MANIFESTS}/{shard_name(shard)}.jsonl")


def _preview_images(store: Store, records: list[dict]) -> Iterator[Image.Image]:
  """The records' images, in order, one at a time (a shard's tar is read sequentially)."""
  for file, group in itertools.groupby(records, key=lambda r: r["file"]):
    if not file.endswith(".tar"):
      blobs = (store.read(file) for _ in group)
    else:
      blobs = _tar_pngs(store, file, {outputs.sample_image(r) for r in group})
    for data in blobs:
      with Image.open(io.BytesIO(data)) as image:
        image.load()
        yield image


def _tar_pngs(store: Store, file: str, names: set[str]) -> Iterator[bytes]:
  with store.open(file) as f, tarfile.open(fileobj=f, mode="r|") as tar:
    for member in tar:
      if member.name in names:
        yield tar.extractfile(member).read()


def merge(store: Store, num_shards: int, total: int) -> bool:
  """Writes manifest.jsonl, index.html and grid.png once every shard is finished.

  Returns False (writing nothing) while some shard is not finished: other jobs of the run may
  still be writing, and the last one to finish merges.
  """
  missing = num_shards - len(finished_shards(store) & set(range(num_shards)))
  if missing:
    logging.info("%d of %d shards are not finished yet: not merging", missing, num_shards)
    return False
  store.write_lines(outputs.MANIFEST_NAME, (
      store.read(f"{MANIFESTS}/{shard_name(s)}.jsonl") for s in range(num_shards)))
  first = []
  for record in iter_records(store, num_shards):
    first.append(record)
    if len(first) == outputs.MAX_GRID_IMAGES:
      break
  shards = []
  if first and "key" in first[0]:  # webdataset: the gallery links every shard
    shards = [f"{SHARDS}/{shard_name(s)}.tar" for s in range(num_shards)]
  store.write(outputs.INDEX_HTML_NAME,
              outputs.index_html(first, total=total, shards=shards).encode())
  store.write(outputs.GRID_NAME, outputs.grid_png(_preview_images(store, first), len(first)))
  return True


# --- starting over ------------------------------------------------------------------------------


def holds_other_outputs(store: Store) -> bool:
  """Whether the location holds images or manifests that no run.json explains."""
  for name in store.listdir():
    if name in (outputs.MANIFEST_NAME, MANIFESTS, SHARDS) or name.endswith(".png"):
      return True
  return False


def holds_outputs(store: Store) -> bool:
  """Whether the location holds anything a run made besides its settings and previews: images,
  image folders, manifests or shards (a run stopped before its first image left only those)."""
  return holds_other_outputs(store) or any(_FOLDER_RE.match(n) for n in store.listdir())


def clear(store: Store) -> None:
  """Removes what a previous run wrote (run files, manifests, shards, image folders), no more."""
  for name in store.listdir():
    legacy_png = name.endswith(".png") and name[:-4].isdigit()
    ours = name in (RUN_JSON, outputs.MANIFEST_NAME, outputs.GRID_NAME,
                    outputs.INDEX_HTML_NAME, MANIFESTS, SHARDS)
    if ours or legacy_png or _FOLDER_RE.match(name):
      store.remove(name)


def read_json(store: Store, rel: str) -> Any | None:
  try:
    return json.loads(store.read(rel))
  except FileNotFoundError:
    return None
