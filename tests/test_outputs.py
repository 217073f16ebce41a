"""Output folder files: A1111 text, atomic PNGs, the shared manifest, resume logic, previews."""

import hashlib
import io
import json
import multiprocessing
import os
import struct
import time
import warnings

import numpy as np
import pytest
from PIL import Image

from sdjax import outputs
from sdjax.outputs import (
  Manifest,
  OutputError,
  a1111_parameters,
  check_output_dir,
  cleanup_temporaries,
  finished,
  parse_a1111_parameters,
  write_grid,
  write_index_html,
  write_png,
)

PARAMS = dict(prompt="a photo of a cat", negative_prompt="blurry, low quality", steps=30,
              sampler="euler_ancestral", cfg_scale=7.5, seed=42, width=512, height=768,
              model="sd-v1-5")


def _image(h=4, w=6, value=0.5):
  return np.full((h, w, 3), value, np.float32)


def _record(index, file, sha256, **extra):
  return {"index": index, "file": file, "sha256": sha256, **extra}


# --- A1111 parameters -------------------------------------------------------------------------


def test_a1111_text_exact():
  assert a1111_parameters(**PARAMS) == (
      "a photo of a cat\n"
      "Negative prompt: blurry, low quality\n"
      "Steps: 30, Sampler: Euler a, CFG scale: 7.5, Seed: 42, Size: 512x768, Model: sd-v1-5")


def test_a1111_text_without_negative_prompt():
  text = a1111_parameters(**{**PARAMS, "negative_prompt": "", "cfg_scale": 7, "sampler": "pndm"})
  assert text == ("a photo of a cat\n"
                  "Steps: 30, Sampler: PLMS, CFG scale: 7.0, Seed: 42, Size: 512x768, "
                  "Model: sd-v1-5")
  assert parse_a1111_parameters(text)["negative_prompt"] == ""


def test_a1111_text_with_eta():
  text = a1111_parameters(**{**PARAMS, "sampler": "ddim", "eta": 0.5})
  assert text.endswith("Steps: 30, Sampler: DDIM, CFG scale: 7.5, Seed: 42, Size: 512x768, "
                       "Model: sd-v1-5, Eta DDIM: 0.5")
  assert parse_a1111_parameters(text)["Eta DDIM"] == "0.5"
  text = a1111_parameters(**{**PARAMS, "sampler": "tcd", "eta": 0.3})
  assert parse_a1111_parameters(text)["Eta"] == "0.3"


@pytest.mark.parametrize("ours,theirs", sorted(outputs.A1111_SAMPLER_NAMES.items()) +
                         [("my_sampler", "my_sampler")])
def test_sampler_names(ours, theirs):
  assert parse_a1111_parameters(a1111_parameters(**{**PARAMS, "sampler": ours}))["Sampler"] == theirs


def test_a1111_round_trip():
  params = {**PARAMS, "prompt": "line one, (detail:1.2)\nline two", "model": "odd, name: v2"}
  text = a1111_parameters(**params)
  assert text.endswith('Model: "odd, name: v2"')  # Quoted as A1111 quotes it.
  assert parse_a1111_parameters(text) == {
      "prompt": params["prompt"], "negative_prompt": params["negative_prompt"],
      "Steps": "30", "Sampler": "Euler a", "CFG scale": "7.5", "Seed": "42", "Size": "512x768",
      "Model": "odd, name: v2"}


def test_a1111_text_with_hash_and_version():
  text = a1111_parameters(**PARAMS, model_hash="0123456789", version="sdjax 0.1.0")
  assert text.endswith("Size: 512x768, Model hash: 0123456789, Model: sd-v1-5, "
                       "Version: sdjax 0.1.0")
  assert parse_a1111_parameters(text)["Model hash"] == "0123456789"


def test_short_hash_is_cached(tmp_path):
  weights = tmp_path / "model.safetensors"
  weights.write_bytes(b"weights" * 1000)
  cache = str(tmp_path / "cache" / "hashes.json")
  expected = hashlib.sha256(weights.read_bytes()).hexdigest()[:10]
  assert outputs.short_hash(weights, cache_file=cache) == expected
  assert list(json.load(open(cache)).values()) == [expected]
  keys = list(json.load(open(cache)))
  with open(cache, "w") as f:  # a cached value is used while size and mtime are unchanged
    json.dump({k: "cachedhash" for k in keys}, f)
  assert outputs.short_hash(weights, cache_file=cache) == "cachedhash"
  weights.write_bytes(b"other" * 1000)
  assert outputs.short_hash(weights, cache_file=cache) == hashlib.sha256(
      weights.read_bytes()).hexdigest()[:10]


def test_lora_and_embedding_hashes_as_a1111(tmp_path):
  """`Lora hashes`: 12 digits of the sha256 of a safetensors LoRA's tensor bytes (its header,
  metadata included, left out), or of its stored `sshs_model_hash`; other files and
  embeddings: of the whole file."""
  from safetensors.numpy import save_file

  tensors = {"w": np.arange(12, dtype=np.float32).reshape(3, 4)}
  plain, tagged = str(tmp_path / "plain.safetensors"), str(tmp_path / "tagged.safetensors")
  save_file(tensors, plain)
  save_file(tensors, tagged, metadata={"ss_output_name": "x" * 40})
  data = open(plain, "rb").read()
  addnet = hashlib.sha256(data[8 + int.from_bytes(data[:8], "little"):]).hexdigest()
  assert outputs.short_hash(plain, kind="lora") == addnet[:12]
  assert outputs.short_hash(tagged, kind="lora") == addnet[:12]  # metadata does not count
  assert outputs.short_hash(plain, kind="model") == hashlib.sha256(data).hexdigest()[:10]
  assert outputs.short_hash(plain, kind="embedding") == hashlib.sha256(data).hexdigest()[:12]
  save_file(tensors, tagged, metadata={"sshs_model_hash": "0123456789abcdef"})
  assert outputs.short_hash(tagged, kind="lora") == "0123456789ab"
  pickled = tmp_path / "old.pt"
  pickled.write_bytes(b"not safetensors")
  assert outputs.short_hash(pickled, kind="lora") == hashlib.sha256(
      b"not safetensors").hexdigest()[:12]
  cache = str(tmp_path / "hashes.json")  # kinds are cached apart
  assert outputs.short_hash(plain, kind="lora", cache_file=cache) == addnet[:12]
  assert outputs.short_hash(plain, cache_file=cache) == hashlib.sha256(data).hexdigest()[:10]
  with pytest.raises(ValueError, match="unknown hash kind"):
    outputs.short_hash(plain, kind="vae")


def test_parse_a1111_text_without_parameters_line():
  assert parse_a1111_parameters("just a prompt") == {"prompt": "just a prompt",
                                                     "negative_prompt": ""}


# --- PNG ----------------------------------------------------------------------------------------


def test_write_png(tmp_path):
  image = np.zeros((2, 3, 3), np.float32)
  image[0, 0] = [-0.5, 1.5, 1.0]  # Clipped.
  image[0, 1] = [0.5, 10.5 / 255, 11.5 / 255]  # Exact halves round to even, as in diffusers.
  image[0, 2] = [0.2, 0.7, 0.999]
  path = tmp_path / "000001.png"
  digest = write_png(path, image, "the text")

  assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
  assert sorted(os.listdir(tmp_path)) == ["000001.png"]  # No temporary left.
  with Image.open(path) as png:
    assert png.text["parameters"] == "the text"
    assert png.mode == "RGB" and png.size == (3, 2)
    pixels = np.asarray(png)
  np.testing.assert_array_equal(pixels[0, :2], [[0, 255, 255], [128, 10, 12]])
  np.testing.assert_array_equal(pixels[0, 2], [51, 178, 255])
  np.testing.assert_array_equal(pixels[1], 0)


def _exif_entries(data: bytes) -> dict[int, tuple[int, bytes]]:
  """{tag: (TIFF type, value bytes)} of the Exif IFD of a jpg / webp file's EXIF, read with a
  plain TIFF walk (PIL's reader does not tell BYTE from UNDEFINED; A1111's piexif does)."""
  with Image.open(io.BytesIO(data)) as image:
    raw = image.info["exif"]
  tiff = raw[6:] if raw.startswith(b"Exif\0\0") else raw
  order = {b"MM": ">", b"II": "<"}[tiff[:2]]
  sizes = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 7: 1, 9: 4, 10: 8}

  def entries(offset):
    (count,) = struct.unpack_from(order + "H", tiff, offset)
    for k in range(count):
      tag, kind, n, value = struct.unpack_from(order + "HHII", tiff, offset + 2 + 12 * k)
      size = sizes[kind] * n
      start = offset + 2 + 12 * k + 8 if size <= 4 else value
      yield tag, kind, value, tiff[start:start + size]

  (ifd0,) = struct.unpack_from(order + "I", tiff, 4)
  exif_ifd = next(value for tag, _, value, _ in entries(ifd0) if tag == 0x8769)
  return {tag: (kind, payload) for tag, kind, _, payload in entries(exif_ifd)}


@pytest.mark.parametrize("image_format", ["png", "jpg", "webp"])
def test_image_formats_carry_a1111_text(image_format):
  """png: the `parameters` chunk; jpg / webp: EXIF UserComment typed UNDEFINED with the UNICODE
  code, as A1111 (piexif) writes and reads it; non-ASCII text survives."""
  image = np.random.default_rng(0).integers(0, 256, (24, 40, 3), dtype=np.uint8)
  text = "a cat, (red:1.2) — ünïcode 🐱\nNegative prompt: blurry\nSteps: 20, Seed: 1, Size: 40x24"
  data = outputs.image_bytes(image, text, image_format)
  assert outputs.read_parameters(data) == text
  with Image.open(io.BytesIO(data)) as got:
    assert got.format == {"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}[image_format]
    pixels = np.asarray(got.convert("RGB"), np.float32)
  if image_format == "png":
    np.testing.assert_array_equal(pixels, image)
    return
  kind, payload = _exif_entries(data)[0x9286]
  assert kind == 7 and payload == b"UNICODE\0" + text.encode("utf_16_be")
  assert np.abs(pixels - image).mean() < 60  # lossy, but this image (noise is the worst case)


def test_webp_lossless_and_quality():
  image = np.kron(np.random.default_rng(1).integers(0, 256, (8, 8, 3)), np.ones((8, 8, 1)))
  image = image.astype(np.uint8)  # 64x64 blocks: compressible, as generated images are
  lossless = outputs.image_bytes(image, "x", "webp", lossless=True)
  with Image.open(io.BytesIO(lossless)) as got:
    np.testing.assert_array_equal(np.asarray(got.convert("RGB")), image)
  low, high = (outputs.image_bytes(image, "x", "jpg", quality=q) for q in (20, 95))
  errors = [np.abs(np.asarray(Image.open(io.BytesIO(d)), np.float32) - image).mean()
            for d in (low, high)]
  assert len(low) < len(high) and errors[1] < errors[0]
  with pytest.raises(ValueError, match="unknown image format 'gif'"):
    outputs.image_bytes(image, "x", "gif")
  assert outputs.read_parameters(outputs.image_bytes(image, "", "jpg")) == ""
  plain = io.BytesIO()
  Image.fromarray(image).save(plain, format="JPEG")
  assert outputs.read_parameters(plain.getvalue()) is None


def test_write_png_overwrites_atomically(tmp_path):
  path = tmp_path / "a.png"
  write_png(path, _image(value=0.0), "old")
  digest = write_png(path, _image(value=1.0), "new")
  assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
  with Image.open(path) as png:
    assert png.text["parameters"] == "new"


def test_floor_levels_truncate_as_a1111():
  """levels="floor": A1111's `(255. * x).astype(np.uint8)` of the clamped float32 image, and
  ComfyUI's SaveImage (`np.clip(255. * i, 0, 255).astype(np.uint8)`)."""
  image = np.random.default_rng(0).uniform(-0.1, 1.1, (8, 8, 3)).astype(np.float32)
  image[0, 0] = [0.5, 10.5 / 255, 1.0]
  a1111 = (255.0 * np.clip(image, 0.0, 1.0)).astype(np.uint8)
  np.testing.assert_array_equal(outputs.to_uint8(image, "floor"), a1111)
  np.testing.assert_array_equal(outputs.to_uint8(image, "floor")[0, 0], [127, 10, 255])
  assert (outputs.to_uint8(image) != a1111).any()  # diffusers' rounding: another image
  with pytest.raises(ValueError, match="^pixel levels must be one of round, floor, got 'up'$"):
    outputs.to_uint8(image, "up")


def test_write_png_rejects_bad_images(tmp_path):
  with pytest.raises(ValueError, match="shape"):
    write_png(tmp_path / "a.png", np.zeros((4, 4)), "")
  bad = _image()
  bad[0, 0, 0] = np.nan
  with pytest.raises(ValueError, match="NaN"):
    write_png(tmp_path / "a.png", bad, "")
  assert os.listdir(tmp_path) == []


# --- manifest -----------------------------------------------------------------------------------


def test_manifest_append_and_records(tmp_path):
  manifest = Manifest(tmp_path)
  assert manifest.records() == {}
  manifest.append(_record(0, "000000.png", "aa", prompt="a \"cat\"\nnewline"))
  manifest.append(_record(1, "000001.png", "bb"))
  manifest.append(_record(0, "000000.png", "cc"))  # Redone: the later line wins.
  records = manifest.records()
  assert sorted(records) == [0, 1]
  assert records[0]["sha256"] == "cc" and records[1]["file"] == "000001.png"
  assert (tmp_path / "manifest.jsonl").read_text().count("\n") == 3


def test_manifest_rejects_bad_records(tmp_path):
  manifest = Manifest(tmp_path)
  for bad in ({"file": "a", "sha256": "b"}, _record("1", "a", "b"), _record(True, "a", "b"),
              _record(1, "", "b"), _record(1, "a", None)):
    with pytest.raises(ValueError, match="bad manifest record"):
      manifest.append(bad)
  with pytest.raises(ValueError):
    manifest.append(_record(1, "a", "b", guidance_scale=float("nan")))
  assert manifest.records() == {}


def test_manifest_truncated_last_line(tmp_path):
  manifest = Manifest(tmp_path)
  manifest.append(_record(0, "000000.png", "aa"))
  with open(manifest.path, "ab") as f:
    f.write(b'{"index": 1, "file": "0000')  # A kill in the middle of an append.
  assert sorted(manifest.records()) == [0]

  manifest.append(_record(2, "000002.png", "cc"))
  manifest.append(_record(3, "000003.png", "dd"))
  assert sorted(manifest.records()) == [0, 2, 3]
  # The garbage stays on a line of its own instead of swallowing the new record.
  lines = open(manifest.path, "rb").read().split(b"\n")
  assert lines[1] == b'{"index": 1, "file": "0000'


def test_manifest_corrupt_middle_line(tmp_path):
  manifest = Manifest(tmp_path)
  manifest.append(_record(0, "000000.png", "aa"))
  with open(manifest.path, "ab") as f:
    f.write(b"garbage\n")
  manifest.append(_record(1, "000001.png", "bb"))
  with pytest.raises(ValueError, match=r"line 2: not valid JSON"):
    manifest.records()


def test_manifest_middle_line_not_a_record(tmp_path):
  manifest = Manifest(tmp_path)
  with open(manifest.path, "w") as f:
    f.write('{"index": 0, "file": "a", "sha256": "b"}\n[1, 2]\n')
  with pytest.raises(ValueError, match=r"line 2: bad record"):
    manifest.records()


def _append_many(output_dir, worker, count):
  manifest = Manifest(output_dir)
  for i in range(count):
    # Long lines make an interleaving, if there were one, show up as broken JSON.
    manifest.append(_record(worker * 1000 + i, f"{worker}-{i}.png", "ab" * 32, pad="x" * 3000))


def test_manifest_concurrent_appends(tmp_path):
  with warnings.catch_warnings():
    # JAX (imported with sdjax) warns about fork; the children never touch it.
    warnings.simplefilter("ignore", RuntimeWarning)
    warnings.simplefilter("ignore", DeprecationWarning)
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_append_many, args=(str(tmp_path), w, 50))
               for w in range(4)]
    for p in workers:
      p.start()
    for p in workers:
      p.join(60)
  assert [p.exitcode for p in workers] == [0] * 4
  lines = (tmp_path / "manifest.jsonl").read_text().splitlines()
  assert len(lines) == 200
  assert all(json.loads(line)["pad"] == "x" * 3000 for line in lines)
  assert sorted(Manifest(tmp_path).records()) == sorted(
      w * 1000 + i for w in range(4) for i in range(50))


# --- resume -------------------------------------------------------------------------------------


def test_finished(tmp_path):
  manifest = Manifest(tmp_path)
  for k in range(5):
    digest = write_png(tmp_path / f"{k:06d}.png", _image(value=k / 10), f"image {k}")
    if k != 4:  # 4: written, then killed before its manifest line.
      manifest.append(_record(k, f"{k:06d}.png", digest))
  os.remove(tmp_path / "000001.png")  # Record, no file.
  write_png(tmp_path / "000002.png", _image(value=0.9), "other")  # Record, other content.
  with open(tmp_path / "000003.png", "r+b") as f:  # Record, damaged file.
    f.truncate(20)
  manifest.append(_record(5, "000005.png", "00"))  # Record of a file never written.
  assert finished(tmp_path, manifest.records()) == {0}


def test_cleanup_temporaries(tmp_path):
  dead = multiprocessing.get_context("fork").Process(target=int)
  dead.start()
  dead.join()
  host = outputs._HOST
  names = {
      f".000001.png.tmp-{dead.pid}-{host}": False,  # Writer dead.
      f".000002.png.tmp-{os.getpid()}-{host}": False,  # Ours: left by a predecessor.
      f".000003.png.tmp-{os.getppid()}-{host}": True,  # A live writer.
      f".000004.png.tmp-{dead.pid}-other-host": True,  # Cannot tell yet.
      f".000005.png.tmp-{dead.pid}-other-host-old": False,  # Too old to be in progress.
      "000006.png": True,
      ".hidden": True,
      "notes.tmp-1-x": True,
  }
  for name in names:
    (tmp_path / name).write_bytes(b"x")
  old = time.time() - 7200
  os.utime(tmp_path / f".000005.png.tmp-{dead.pid}-other-host-old", (old, old))

  removed = cleanup_temporaries(tmp_path)
  assert removed == sorted(n for n, keep in names.items() if not keep)
  assert sorted(os.listdir(tmp_path)) == sorted(n for n, keep in names.items() if keep)


# --- previews -----------------------------------------------------------------------------------


def _png(path, color, size=(8, 6)):
  Image.new("RGB", size, color).save(path)
  return path.name


def test_write_grid(tmp_path):
  colors = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255)]
  files = [_png(tmp_path / f"{i}.png", c) for i, c in enumerate(colors)]
  _png(tmp_path / "3.png", colors[3], size=(4, 4))  # Resized to the first image's size.

  path = write_grid(tmp_path, files)
  assert path == os.path.join(tmp_path, "grid.png")
  with Image.open(path) as grid:
    assert grid.size == (3 * 8, 2 * 6)
    pixels = np.asarray(grid.convert("RGB"))
  for i, color in enumerate(colors):
    row, col = divmod(i, 3)
    np.testing.assert_array_equal(pixels[row * 6 + 3, col * 8 + 4], color)
  np.testing.assert_array_equal(pixels[6 + 3, 2 * 8 + 4], 0)  # The unused cell.

  with Image.open(write_grid(tmp_path, files, columns=5)) as grid:
    assert grid.size == (5 * 8, 6)
  with Image.open(write_grid(tmp_path, files, columns=9)) as grid:
    assert grid.size == (5 * 8, 6)
  with pytest.raises(ValueError):
    write_grid(tmp_path, [])


def test_write_grid_is_bounded(tmp_path, monkeypatch):
  monkeypatch.setattr(outputs, "MAX_GRID_IMAGES", 4)
  monkeypatch.setattr(outputs, "MAX_GRID_SIDE", 8)
  files = [_png(tmp_path / f"{i}.png", (i, i, i)) for i in range(6)]
  with Image.open(write_grid(tmp_path, files)) as grid:
    assert grid.size == (8, 6)  # 2 x 2 cells of 8 x 6 shrunk to fit 8 pixels.


def test_write_index_html_escapes(tmp_path):
  records = {
      1: _record(1, "000001.png", "b", prompt="<script>alert('x')</script> & more",
                 negative_prompt='"quoted" <b>', seed=7, steps=20, scheduler="ddim",
                 guidance_scale=7.5),
      0: _record(0, "a b.png", "a", prompt="first"),
  }
  page = open(write_index_html(tmp_path, records), encoding="utf-8").read()
  assert "<script>" not in page and "<b>" not in page
  assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; more" in page
  assert "&quot;quoted&quot; &lt;b&gt;" in page
  assert 'src="a%20b.png"' in page and 'src="000001.png"' in page
  assert page.index("a%20b.png") < page.index("000001.png")  # Ordered by index.
  for text in ("seed 7", "steps 20", "scheduler ddim", "guidance 7.5"):
    assert text in page
  assert sorted(os.listdir(tmp_path)) == ["index.html"]


# --- the folder ---------------------------------------------------------------------------------


def test_check_output_dir_creates(tmp_path):
  path = tmp_path / "a" / "b"
  check_output_dir(path)
  assert path.is_dir() and os.listdir(path) == []
  check_output_dir(path)  # Existing is fine.


def test_check_output_dir_on_a_file(tmp_path):
  file = tmp_path / "file"
  file.write_text("x")
  with pytest.raises(OutputError, match="not a folder") as error:
    check_output_dir(file)
  assert "\n" not in str(error.value)
  with pytest.raises(OutputError, match="cannot create") as error:
    check_output_dir(file / "sub")
  assert "\n" not in str(error.value)
  assert isinstance(error.value, ValueError)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through read-only permissions")
def test_check_output_dir_not_writable(tmp_path):
  path = tmp_path / "ro"
  path.mkdir()
  path.chmod(0o500)
  try:
    with pytest.raises(OutputError, match="not writable"):
      check_output_dir(path)
  finally:
    path.chmod(0o700)

# --- init image resizing (A1111's resize modes) -----------------------------------------------


def _random_image(rng, height, width):
  return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.mark.parametrize("source", [(30, 50), (50, 30), (40, 40), (17, 61), (64, 9)])
@pytest.mark.parametrize("out", [(32, 32), (24, 40), (48, 16)])
def test_resizes_match_diffusers(source, out):
  from diffusers.image_processor import VaeImageProcessor

  processor = VaeImageProcessor()  # Lanczos, as diffusers' img2img and inpainting pipelines
  rng = np.random.default_rng(1)
  image = _random_image(rng, *source)
  mask = Image.fromarray(rng.integers(0, 256, source, dtype=np.uint8))
  fill = processor._resize_and_fill(image, out[1], out[0])  # noqa: SLF001
  np.testing.assert_array_equal(np.asarray(outputs.resize_fill(image, *out)), np.asarray(fill))
  # A mask keeps its own mode (diffusers pastes it into RGB and converts back: the same levels).
  fill = processor._resize_and_fill(mask, out[1], out[0]).convert("L")  # noqa: SLF001
  np.testing.assert_array_equal(np.asarray(outputs.resize_fill(mask, *out)), np.asarray(fill))
  cover = processor._resize_and_crop(image, out[1], out[0])  # noqa: SLF001
  np.testing.assert_array_equal(np.asarray(outputs.resize_cover(image, *out)), np.asarray(cover))
  just = processor.resize(image, out[0], out[1])  # diffusers' default: the aspect not kept
  for mode, expected in (("just", just), ("crop", cover)):
    np.testing.assert_array_equal(np.asarray(outputs.resize(image, *out, mode)),
                                  np.asarray(expected))


def test_resize_mode_is_checked():
  with pytest.raises(ValueError, match="resize mode must be one of just, crop, fill"):
    outputs.resize(Image.new("RGB", (4, 4)), 8, 8, "stretch")


def test_schedule_type():
  """A1111's `Schedule type` from diffusers' sigma-spacing options; none for other options."""
  assert outputs.a1111_schedule_type((("use_karras_sigmas", True),)) == "Karras"
  assert outputs.a1111_schedule_type({"use_beta_sigmas": True, "timestep_spacing": "x"}) == "Beta"
  assert outputs.a1111_schedule_type({"use_exponential_sigmas": True}) == "Exponential"
  assert outputs.a1111_schedule_type({"use_karras_sigmas": False}) is None
  assert outputs.a1111_schedule_type(()) is None
  assert outputs.a1111_schedule_type({"schedule_type": "align_your_steps_sdxl"}) == (
    "Align Your Steps")
  assert outputs.a1111_schedule_type({"schedule_type": "sgm_uniform"}) == "SGM Uniform"
  assert outputs.a1111_schedule_type({"sigmas": [1.0, 0.0]}) is None


def test_schedule_type_options():
  """--schedule_type takes A1111's words (as its PNGs write them) or sdjax's names."""
  assert outputs.schedule_type_options("Align Your Steps") == {"schedule_type": "align_your_steps"}
  assert outputs.schedule_type_options("sgm uniform") == {"schedule_type": "sgm_uniform"}
  assert outputs.schedule_type_options("kl_optimal") == {"schedule_type": "kl_optimal"}
  assert outputs.schedule_type_options("Karras") == {"schedule_type": "karras"}
  assert outputs.schedule_type_options("Exponential") == {"schedule_type": "exponential"}
  assert outputs.schedule_type_options("Automatic") == {}
  # Forge's: its "Align Your Steps 11" is Align Your Steps' levels
  assert outputs.schedule_type_options("Align Your Steps 11") == {
    "schedule_type": "align_your_steps"}
  assert outputs.schedule_type_options("Align Your Steps GITS") == {
    "schedule_type": "align_your_steps_gits"}
  assert outputs.schedule_type_options("Turbo") == {"schedule_type": "turbo"}
  for name, label in outputs.A1111_SCHEDULE_TYPE_NAMES.items():  # round trip through a PNG
    options = outputs.schedule_type_options(label)
    assert outputs.a1111_schedule_type(options) == label, name
  with pytest.raises(ValueError, match="unknown schedule type 'Fast'; pick one of Automatic, "):
    outputs.schedule_type_options("Fast")


def test_flatten_is_a1111s(tmp_path):
  """An RGBA image as A1111's img2img takes it: over white by its alpha (transparent: white,
  opaque: its colour, between: PIL's 8-bit blend); read_image(flatten_alpha=True) reads a file
  so, where converting drops the alpha."""
  rng = np.random.default_rng(4)
  rgb = rng.integers(0, 256, (5, 6, 3), np.uint8)
  alpha = rng.integers(0, 256, (5, 6), np.uint8)
  alpha[0, :2] = (0, 255)
  image = Image.fromarray(np.dstack([rgb, alpha]))
  flat = np.asarray(outputs.flatten(image), int)
  assert flat[0, 0].tolist() == [255, 255, 255] and flat[0, 1].tolist() == rgb[0, 1].tolist()
  a = alpha[..., None] / 255
  assert np.abs(flat - (rgb * a + 255 * (1 - a))).max() <= 1
  assert np.array_equal(np.asarray(outputs.flatten(Image.fromarray(rgb))), rgb)
  image.save(tmp_path / "a.png")
  read = outputs.read_image(str(tmp_path / "a.png"), (5, 6), flatten_alpha=True)
  assert np.array_equal(np.round(read * 255).astype(int), flat)
  dropped = outputs.read_image(str(tmp_path / "a.png"), (5, 6))
  assert np.array_equal(np.round(dropped * 255).astype(int), rgb)


@pytest.mark.parametrize("fmt", ["png", "jpeg"])
def test_exif_orientation_turns_images_upright(tmp_path, fmt):
  """A photo whose EXIF says how to turn it (every orientation 1-8) is read upright, as
  diffusers' load_image (and A1111's images.read, ComfyUI's LoadImage: the same
  ImageOps.exif_transpose) reads it: init images, masks (the alpha too) and control images all
  come through open_image."""
  from diffusers.utils import load_image

  rng = np.random.default_rng(8)
  rgba = rng.integers(0, 256, (5, 7, 4), np.uint8)
  upright = {1: rgba, 3: rgba[::-1, ::-1], 6: np.rot90(rgba, -1), 8: np.rot90(rgba)}
  for orientation in range(1, 9):
    image = Image.fromarray(rgba if fmt == "png" else rgba[..., :3])
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = str(tmp_path / f"o{orientation}.{fmt}")
    image.save(path, exif=exif.tobytes(), **({"quality": 95} if fmt == "jpeg" else {}))
    ours = outputs.open_image(path)
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(load_image(path)))
    assert ours.size == ((5, 7) if orientation >= 5 else (7, 5))
    if fmt == "png" and orientation in upright:  # the pixels themselves, alpha included
      np.testing.assert_array_equal(np.asarray(outputs.open_image(path, None)),
                                    upright[orientation])
      read = outputs.read_image(path, ours.size[::-1])
      np.testing.assert_array_equal(np.round(read * 255), upright[orientation][..., :3])
