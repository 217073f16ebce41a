"""Model upscalers (ESRGAN family): the network against a torch RRDBNet in every file layout, the
loader's errors, and A1111's tiled upscale (tiles, 8-bit rounding, PIL's blends and Lanczos)
against the same steps done with PIL."""

from __future__ import annotations

import pickle
import zipfile

import esrgan_reference as ref
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from PIL import Image

from sdjax import upscaling
from sdjax.checkpoints import upscalers as files
from sdjax.models.esrgan import network

torch.set_num_threads(1)


def rel(a, b):
  return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


def _bsrgan_state_dict(net):
  """BSRGAN / RealSR names of a BasicSR-named RRDBNet."""
  out = {}
  for key, value in net.state_dict().items():
    parts = key.split(".")
    if parts[0] == "body":
      key = f"RRDB_trunk.{parts[1]}.RDB{parts[2][3:]}.{'.'.join(parts[3:])}"
    else:
      key = {"conv_body": "trunk_conv", "conv_hr": "HRconv"}.get(parts[0], parts[0].replace(
          "conv_up", "upconv")) + "." + parts[-1]
    out[key] = value
  return out


def _write(tmp_path, net, layout: str) -> str:
  if layout == "basicsr":  # Real-ESRGAN's releases: the weights under params_ema
    path = str(tmp_path / "RealESRGAN_x4plus.pth")
    torch.save({"params_ema": net.state_dict()}, path)
  elif layout == "original":
    path = str(tmp_path / "4x-UltraSharp.pth")
    torch.save(ref.original_state_dict(net), path)
  else:
    import safetensors.torch  # noqa: PLC0415

    path = str(tmp_path / "4x_bsrgan.safetensors")
    safetensors.torch.save_file({k: v.contiguous() for k, v in _bsrgan_state_dict(net).items()},
                                path)
  return path


@pytest.mark.parametrize(("layout", "kwargs", "size"), [
    ("basicsr", {}, (13, 10)),
    ("basicsr", {"dense": "concat"}, (13, 10)),  # the dense blocks' other form (GPUs')
    ("basicsr", {"feat": 8}, (40, 36)),  # incremental: matmuls of 28 and 12 rows
    ("original", {}, (9, 12)),
    ("bsrgan", {}, (8, 8)),
    ("basicsr", {"unshuffle": 2}, (13, 11)),  # Real-ESRGAN x2: reflect-padded, cropped back
    ("original", {"unshuffle": 4, "blocks": 1}, (10, 7)),  # x1
    ("original", {"ups": 1, "feat": 8}, (9, 7)),  # an original-layout 2x
    ("original", {"ups": 0, "blocks": 1}, (6, 9)),  # 1x
    ("original", {"ups": 3, "blocks": 1, "feat": 8}, (5, 4)),  # 8x
])
def test_network_matches_torch(tmp_path, monkeypatch, layout, kwargs, size):
  kwargs = dict(kwargs)
  monkeypatch.setenv("SDJAX_ESRGAN_DENSE", kwargs.pop("dense", "incremental"))
  net = ref.random_rrdbnet(seed=len(kwargs), **kwargs)
  path = _write(tmp_path, net, layout)
  config, params = files.load_network(path)
  assert (config.num_blocks, config.num_feat, config.unshuffle) == (
      kwargs.get("blocks", 2), kwargs.get("feat", 16), kwargs.get("unshuffle", 1))
  assert config.scale == 2 ** kwargs.get("ups", 2) // kwargs.get("unshuffle", 1)
  x = torch.rand(2, 3, *size, generator=torch.Generator().manual_seed(1))
  with torch.no_grad():
    expected = net(x).numpy().transpose(0, 2, 3, 1)
  ours = network(config).apply({"params": params}, jnp.asarray(x.numpy().transpose(0, 2, 3, 1)))
  assert ours.shape == expected.shape == (2, size[0] * config.scale, size[1] * config.scale, 3)
  err = rel(ours, expected)
  print(f"\n{layout} {kwargs}: {err:.1e}")
  assert err <= 1e-5  # seen 2e-7 .. 6e-7


@pytest.mark.parametrize(("kwargs", "size"), [({}, (13, 10)), ({"scale": 2, "convs": 2}, (7, 9))])
def test_compact_network_matches_torch(tmp_path, kwargs, size):
  """Real-ESRGAN's compact network (General 4xV3, AnimeVideo): depth, width and factor read
  from the weights; its PReLU slopes per channel."""
  net = ref.random_compact(seed=len(kwargs), **kwargs)
  path = str(tmp_path / "realesr-general-x4v3.pth")
  torch.save({"params": net.state_dict()}, path)
  config, params = files.load_network(path)
  assert (config.num_feat, config.num_conv, config.scale) == (
      16, kwargs.get("convs", 3), kwargs.get("scale", 4))
  x = torch.rand(2, 3, *size, generator=torch.Generator().manual_seed(2))
  with torch.no_grad():
    expected = net(x).numpy().transpose(0, 2, 3, 1)
  ours = network(config).apply({"params": params}, jnp.asarray(x.numpy().transpose(0, 2, 3, 1)))
  assert ours.shape == expected.shape
  err = rel(ours, expected)
  print(f"\ncompact {kwargs}: {err:.1e}")
  assert err <= 1e-5
  assert upscaling.load_upscaler(path).name == "R-ESRGAN General 4xV3"


def test_upscaler_names(tmp_path):
  """A1111's names: its Real-ESRGAN labels for their release files, else the file's stem; a
  name is looked up in a folder (and its subfolders) by label, stem or file name."""
  net = ref.random_rrdbnet(blocks=1, feat=8)
  path = _write(tmp_path, net, "basicsr")
  assert upscaling.a1111_name(path) == "R-ESRGAN 4x+"
  other = _write(tmp_path, net, "original")
  assert upscaling.a1111_name(other) == "4x-UltraSharp"
  sub = tmp_path / "ESRGAN"
  sub.mkdir()
  (tmp_path / "4x-UltraSharp.pth").rename(sub / "4x-UltraSharp.pth")
  find = upscaling.find_upscaler_file
  assert find("R-ESRGAN 4x+", str(tmp_path)) == path
  assert find("4x-UltraSharp", str(tmp_path)) == str(sub / "4x-UltraSharp.pth")
  assert find("4x-UltraSharp.pth", str(tmp_path)) == str(sub / "4x-UltraSharp.pth")
  assert find(path, None) == path
  assert find("R-ESRGAN 4x+ Anime6B", str(tmp_path)) is None
  assert find("4x-UltraSharp", None) is None
  up = upscaling.load_upscaler(path, tile=64, overlap=4)
  assert (up.name, up.spec.scale, up.spec.tile, up.spec.overlap) == ("R-ESRGAN 4x+", 4, 64, 4)
  base, other = {"unet": 1}, {"unet": 2}
  merged = up.with_params(base)
  assert merged == {"unet": 1, "upscaler": up.params} and up.with_params(base) is merged
  assert up.with_params(other)["unet"] == 2 and up.with_params(base) is merged
  assert upscaling.load_upscaler(path, name="mine").name == "mine"


class _Code:
  def __reduce__(self):
    return (print, ("ran",))


def test_loader_errors(tmp_path):
  """Files that are not ESRGAN upscalers, or not readable: one line naming the file."""
  net = ref.random_rrdbnet(blocks=1, feat=8)

  def error(name, obj=None, raw=None):
    path = tmp_path / name
    if raw is not None:
      path.write_bytes(raw)
    elif obj is not None:
      torch.save(obj, str(path))
    with pytest.raises(files.UpscalerError) as e:
      files.load_network(str(path))
    assert "\n" not in str(e.value) and str(tmp_path) in str(e.value)
    return str(e.value)

  assert "does not exist" in error("missing.pth")
  assert "expected one of" in error("model.ckpt", raw=b"x")
  assert "not an ESRGAN" in error("unet.pth", {"conv_in.weight": torch.zeros(4, 4, 3, 3)})
  plus = dict(ref.original_state_dict(net))
  plus["model.1.sub.0.RDB1.conv1x1.weight"] = torch.zeros(8, 8, 1, 1)
  del plus["model.1.sub.0.RDB1.conv1.0.weight"]
  assert "ESRGAN+" in error("plus.pth", plus)
  extra = dict(ref.original_state_dict(net), **{"model.11.weight": torch.zeros(3, 8, 3, 3)})
  assert "layout sdjax does not know" in error("odd.pth", extra)
  wrong = {"params_ema": dict(net.state_dict(), **{"conv_hr.weight": torch.zeros(8, 8, 1, 1)})}
  assert "conv_hr" in error("shape.pth", wrong)
  gray = ref.random_rrdbnet(blocks=1, feat=8).state_dict()
  gray["conv_last.weight"], gray["conv_last.bias"] = torch.zeros(1, 8, 3, 3), torch.zeros(1)
  assert "RGB to RGB" in error("gray.pth", gray)
  buf = zipfile.ZipFile(tmp_path / "code.pth", "w")  # a torch zip whose pickle runs code
  buf.writestr("code/data.pkl", pickle.dumps(_Code(), protocol=2))
  buf.close()
  assert "print" in error("code.pth")


@pytest.fixture(scope="module")
def tiny():
  """A tiny 4x torch network (fast enough for images of a few hundred pixels)."""
  return ref.random_rrdbnet(seed=3, blocks=1, feat=8, grow=8)


def _loaded(tmp_path, net, tile, overlap):
  path = _write(tmp_path, net, "basicsr")
  up = upscaling.load_upscaler(path, tile=tile, overlap=overlap)
  apply = jax.jit(lambda x: network(up.spec.config).apply({"params": up.params}, x))
  return up, lambda x: np.asarray(apply(jnp.asarray(x)))


def _fake_network(x, xp=np):
  """An exactly predictable 4x "network" for the tiling's arithmetic: each output channel the
  next input channel (so a wrong channel order shows), enlarged (nearest), plus a pattern of
  the position inside the tile (so every tile differs where tiles overlap), wrapped into 0..255
  and divided by 255: its 8-bit rounding has no ties to break differently."""
  k = xp.round(x * 255)[..., (1, 2, 0)]
  k = xp.repeat(xp.repeat(k, 4, axis=1), 4, axis=2)
  i = xp.arange(k.shape[1])[:, None, None]
  j = xp.arange(k.shape[2])[None, :, None]
  c = xp.arange(3)[None, None, :]
  return ((k + 7 * i + 3 * j + 50 * c) % 256).astype(xp.float32) / xp.float32(255)


class _FakeNetwork:
  def __init__(self, config):
    assert config.scale == 4

  def apply(self, variables, x):
    del variables
    return _fake_network(x, jnp)


@pytest.mark.parametrize(("size", "tile", "overlap"), [
    ((40, 56), 16, 4),  # 4 x 5 tiles, spread unevenly (origins 0, 8, 16, 24 / 0, 10, 20, ...)
    ((20, 12), 192, 8),  # A1111's default tile: one tile, black past the top-left corner
    ((12, 20), 0, 8),  # tile 0: the whole image at once
    ((30, 17), 12, 11),  # overlap one short of the tile
    ((40, 30), 16, 0),  # no overlap: tiles pasted whole (A1111 allows 0)
    ((6, 9), 16, 8),  # no larger than the overlap: no tile (A1111 fails), the whole image
])
def test_model_pass_matches_a1111(tmp_path, tiny, monkeypatch, size, tile, overlap):
  """One A1111 upscaler pass (tiles, BGR in and out, 8-bit rounding, PIL's blends) with an
  exactly predictable network on both sides: the same levels."""
  up, _ = _loaded(tmp_path, tiny, tile, overlap)
  monkeypatch.setattr(upscaling.esrgan, "network", _FakeNetwork)
  rng = np.random.default_rng(sum(size) + tile)
  levels = rng.integers(0, 256, (2, *size, 3), dtype=np.uint8)
  if min(size) <= overlap:
    tile = 0
  expected = np.stack([np.asarray(ref.a1111_upscale_pass(_fake_network, Image.fromarray(x), tile,
                                                         overlap)) for x in levels])
  ours = np.asarray(jax.jit(lambda p, x: upscaling.model_pass(up.spec, p, x))(
      up.params, jnp.asarray(levels, jnp.int32)))
  assert ours.shape == expected.shape == (2, size[0] * 4, size[1] * 4, 3)
  np.testing.assert_array_equal(ours, expected)
  if tile and min(size) > overlap:  # the tiles differ where they overlap, so blends show
    whole = ref.a1111_upscale_pass(_fake_network, Image.fromarray(levels[0]), 0, 0)
    assert (np.asarray(whole) != expected[0]).mean() > 0.01


def test_model_pass_with_a_network(tmp_path, tiny):
  """The same with the tiny network itself: a network's float32 output differs by an ulp
  between two compilations, which moves a value by one level where it sits on a rounding
  tie (seen 2 of 215,040); nothing else may differ."""
  up, network = _loaded(tmp_path, tiny, 16, 4)
  levels = np.random.default_rng(0).integers(0, 256, (2, 40, 56, 3), dtype=np.uint8)
  expected = np.stack([np.asarray(ref.a1111_upscale_pass(network, Image.fromarray(x), 16, 4))
                       for x in levels]).astype(np.int32)
  ours = np.asarray(upscaling.model_pass(up.spec, up.params, jnp.asarray(levels, jnp.int32)))
  assert np.abs(ours - expected).max() <= 1
  assert (ours != expected).mean() <= 1e-4
  assert expected.std() > 30  # varied levels, not a clipped flat image


def test_ramp_and_div255_are_pils():
  """The blend's mask ramp and rounding against PIL's paste for every (old, new, mask)."""
  for overlap in (1, 7, 32, 48):
    expected = (np.arange(overlap, dtype=np.float32) * 255 / overlap).astype(np.uint8)
    np.testing.assert_array_equal(upscaling.blend_ramp(overlap), expected)
  old, new, m = np.meshgrid(np.arange(0, 256, 5), np.arange(0, 256, 3), np.arange(256),
                            indexing="ij")
  shape = (old.size // 256, 256)
  base = Image.fromarray(np.repeat(old.reshape(shape)[..., None], 3, -1).astype(np.uint8))
  top = Image.fromarray(np.repeat(new.reshape(shape)[..., None], 3, -1).astype(np.uint8))
  base.paste(top, (0, 0), mask=Image.fromarray(m.reshape(shape).astype(np.uint8), "L"))
  ours = upscaling._div255(jnp.asarray(old * (255 - m) + new * m))  # noqa: SLF001
  np.testing.assert_array_equal(np.asarray(ours).reshape(shape), np.asarray(base)[..., 0])


@pytest.mark.parametrize(("scale", "size", "target", "steps"), [
    (4, (512, 512), (1024, 1024), (((2048, 2048), "model"), ((1024, 1024), "lanczos"))),
    (2, (512, 768), (1536, 2304), (((1024, 1536), "model"), ((2048, 3072), "model"),
                                   ((1536, 2304), "lanczos"))),
    (4, (100, 100), (150, 150), (((400, 400), "model"), ((144, 144), "lanczos"),
                                 ((150, 150), "lanczos"))),
    (1, (64, 64), (128, 128), (((64, 64), "model"), ((128, 128), "lanczos"))),
    (2, (64, 64), (2048, 2048), (((128, 128), "model"), ((256, 256), "model"),
                                 ((512, 512), "model"), ((2048, 2048), "lanczos"))),
    (4, (64, 64), (48, 48), (((48, 48), "lanczos"),)),  # shrinking: no model
    (4, (64, 64), (64, 64), ()),
])
def test_resize_steps(scale, size, target, steps):
  """A1111's resize_image with a model upscaler: passes until the target (rounded down to 8)
  is covered, at most 3; one for a 1x model; then Lanczos to that and to the target."""
  ups = {1: 0, 2: 1, 4: 2}[scale]
  spec = upscaling.ModelUpscaler("m", files.RRDBNetConfig(num_upsample=ups))
  assert upscaling.resize_steps(spec, size, target) == steps


def test_upscale_matches_a1111_resize(tmp_path, tiny):
  """`Upscaler.upscale`: A1111's resize_image with the model: a pass, then Lanczos twice
  (to 8s, then the target)."""
  up, network = _loaded(tmp_path, tiny, 16, 4)
  levels = np.random.default_rng(5).integers(0, 256, (2, 20, 24, 3), dtype=np.uint8)
  ours = up.upscale(levels, (30, 37))
  expected = np.stack([np.asarray(ref.a1111_resize_with_model(
      network, Image.fromarray(x), 37, 30, 16, 4)) for x in levels])
  assert ours.dtype == np.uint8 and ours.shape == (2, 30, 37, 3)
  np.testing.assert_array_equal(ours, expected)
  assert up.upscale(levels).shape == (2, 80, 96, 3)
  with pytest.raises(ValueError, match="uint8 images"):
    up.upscale(levels.astype(np.float32))


def test_tiling_settings_are_checked(tmp_path, tiny):
  path = _write(tmp_path, tiny, "basicsr")
  for tile, overlap in ((16, 16), (-1, 0), (16, -2)):
    with pytest.raises(ValueError, match="upscaler tile"):
      upscaling.load_upscaler(path, tile=tile, overlap=overlap)
