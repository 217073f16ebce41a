"""ESRGAN's RRDBNet in torch, in BasicSR's (Real-ESRGAN's) module names, as a parity reference.

Neither BasicSR nor spandrel (A1111's loader) is a dependency: the network is short and written
out here as BasicSR's `RRDBNet` computes it (pixel-unshuffle for its 2x / 1x models, nearest x2 +
conv per upsampling, LeakyReLU 0.2, residual scale 0.2). `original_state_dict` renames its
weights into the original ESRGAN's `model.*` sequence, the layout of most community files.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _lrelu(x):
  return F.leaky_relu(x, 0.2)


class DenseBlock(nn.Module):
  def __init__(self, feat, grow):
    super().__init__()
    for j in range(1, 5):
      setattr(self, f"conv{j}", nn.Conv2d(feat + (j - 1) * grow, grow, 3, 1, 1))
    self.conv5 = nn.Conv2d(feat + 4 * grow, feat, 3, 1, 1)

  def forward(self, x):
    seen = [x]
    for j in range(1, 5):
      seen.append(_lrelu(getattr(self, f"conv{j}")(torch.cat(seen, 1))))
    return self.conv5(torch.cat(seen, 1)) * 0.2 + x


class Block(nn.Module):
  def __init__(self, feat, grow):
    super().__init__()
    self.rdb1, self.rdb2, self.rdb3 = (DenseBlock(feat, grow) for _ in range(3))

  def forward(self, x):
    return self.rdb3(self.rdb2(self.rdb1(x))) * 0.2 + x


class RRDBNet(nn.Module):
  def __init__(self, blocks=2, feat=16, grow=32, ups=2, unshuffle=1, channels=3):
    super().__init__()
    self.unshuffle = unshuffle
    self.conv_first = nn.Conv2d(channels * unshuffle ** 2, feat, 3, 1, 1)
    self.body = nn.Sequential(*(Block(feat, grow) for _ in range(blocks)))
    self.conv_body = nn.Conv2d(feat, feat, 3, 1, 1)
    self.ups = ups
    for i in range(1, ups + 1):
      setattr(self, f"conv_up{i}", nn.Conv2d(feat, feat, 3, 1, 1))
    self.conv_hr = nn.Conv2d(feat, feat, 3, 1, 1)
    self.conv_last = nn.Conv2d(feat, channels, 3, 1, 1)

  def forward(self, x):  # x: B, C, H, W in [0, 1]
    h, w = x.shape[2:]
    s = self.unshuffle
    if s > 1:
      x = F.pixel_unshuffle(F.pad(x, (0, -w % s, 0, -h % s), mode="reflect"), s)
    feat = self.conv_first(x)
    feat = feat + self.conv_body(self.body(feat))
    for i in range(1, self.ups + 1):
      feat = _lrelu(getattr(self, f"conv_up{i}")(F.interpolate(feat, scale_factor=2,
                                                               mode="nearest")))
    out = self.conv_last(_lrelu(self.conv_hr(feat)))
    scale = 2 ** self.ups // s
    return out[:, :, :h * scale, :w * scale]


class SRVGGNetCompact(nn.Module):
  """Real-ESRGAN's compact network (BasicSR's SRVGGNetCompact, PReLU): `body` alternates 3x3
  convs and per-channel PReLUs, its last conv makes scale**2 values per output channel, pixel-
  shuffled, and the result is added to the input's nearest enlargement."""

  def __init__(self, feat=16, convs=3, scale=4, channels=3):
    super().__init__()
    layers = [nn.Conv2d(channels, feat, 3, 1, 1), nn.PReLU(feat)]
    for _ in range(convs):
      layers += [nn.Conv2d(feat, feat, 3, 1, 1), nn.PReLU(feat)]
    layers.append(nn.Conv2d(feat, channels * scale * scale, 3, 1, 1))
    self.body = nn.ModuleList(layers)
    self.scale = scale

  def forward(self, x):
    out = x
    for layer in self.body:
      out = layer(out)
    return F.pixel_shuffle(out, self.scale) + F.interpolate(x, scale_factor=self.scale,
                                                             mode="nearest")


def random_compact(seed=0, **kwargs) -> SRVGGNetCompact:
  """A float32 SRVGGNetCompact with random weights and slopes."""
  torch.manual_seed(seed)
  net = SRVGGNetCompact(**kwargs).eval()
  with torch.no_grad():
    for p in net.parameters():
      if p.ndim > 1:
        p.normal_(0.0, 0.1)
      else:  # biases and the PReLU slopes
        p.uniform_(0.0, 0.5)
  return net


def random_rrdbnet(seed=0, **kwargs) -> RRDBNet:
  """A float32 RRDBNet with weights large enough that every layer matters, its output spread
  over [0, 1] (mostly inside it, as an upscaler's) so that 8-bit rounding and clipping see
  varied values."""
  torch.manual_seed(seed)
  net = RRDBNet(**kwargs).eval()
  with torch.no_grad():
    for p in net.parameters():
      p.normal_(0.0, 0.05)
    net.conv_last.weight.mul_(12.0)
    net.conv_last.bias.fill_(0.5)
  return net


def original_state_dict(net: RRDBNet) -> dict[str, torch.Tensor]:
  """`net`'s weights in the original ESRGAN layout (`model.0`, `model.1.sub.N.RDBk.convj.0`,
  the body conv at `model.1.sub.<blocks>`, upsampling convs at 3, 6, ..., then conv_hr and
  conv_last two and four after the last)."""
  blocks = len(net.body)
  out = {}
  for key, value in net.state_dict().items():
    name, leaf = key.rsplit(".", 1)
    parts = name.split(".")
    if parts[0] == "body":
      name = f"model.1.sub.{parts[1]}.RDB{parts[2][3:]}.{parts[3]}.0"
    elif name == "conv_body":
      name = f"model.1.sub.{blocks}"
    elif name == "conv_first":
      name = "model.0"
    elif name.startswith("conv_up"):
      name = f"model.{3 * int(name[7:])}"
    else:
      name = f"model.{3 * net.ups + (2 if name == 'conv_hr' else 4)}"
    out[f"{name}.{leaf}"] = value
  return out


# -- A1111's tiled upscale (modules/upscaler_utils.py, modules/images.py), with PIL -------------
# Written from reading A1111 1.10: tiles cut with PIL's crop (black past the image), each through
# the network as BGR in [0, 1] (float64 / 255, then the network's float32), back clipped, times
# 255, rounded to uint8, and pasted back with PIL's paste and 8-bit "L" ramps over the overlap.


def a1111_tile_grid(width, height, tile, overlap):
  """[(y, [x, ...]), ...]: A1111's split_grid positions."""
  import math  # noqa: PLC0415

  def axis(n):
    count = math.ceil((n - overlap) / (tile - overlap))
    step = (n - tile) / (count - 1) if count > 1 else 0
    return [n - tile if int(i * step) + tile >= n else int(i * step) for i in range(count)]

  return [(y, axis(width)) for y in axis(height)]


def a1111_upscale_pass(network, image, tile, overlap):
  """One pass of A1111's `upscale_with_model` on a PIL RGB image; `network` maps float32 BGR
  [1, h, w, 3] (NHWC numpy) in [0, 1] to its enlargement."""
  import numpy as np  # noqa: PLC0415
  from PIL import Image  # noqa: PLC0415

  def patch(img):
    x = np.asarray(img.convert("RGB"))[:, :, ::-1] / 255  # float64, as A1111
    y = np.asarray(network(x[None].astype(np.float32)))[0]
    y = (255.0 * np.clip(y.astype(np.float32), 0, 1)).round().astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(y[:, :, ::-1]), "RGB")

  if tile <= 0:
    return patch(image)
  rows = []
  for y, xs in a1111_tile_grid(image.width, image.height, tile, overlap):
    row = []
    for x in xs:
      out = patch(image.crop((x, y, x + tile, y + tile)))
      row.append((x, out))
    rows.append((y, row))
  s = rows[0][1][0][1].width // tile
  ov, tw, th, iw, ih = overlap * s, tile * s, tile * s, image.width * s, image.height * s

  def ramp(shape):
    r = np.arange(ov, dtype=np.float32) * 255 / ov
    return Image.fromarray(np.ascontiguousarray(np.broadcast_to(r.astype(np.uint8), shape)),
                           "L")

  mask_w = ramp((th, ov))
  mask_h = Image.fromarray(np.ascontiguousarray(np.asarray(ramp((iw, ov))).T), "L")
  combined = Image.new("RGB", (iw, ih))
  for y, row in rows:
    line = Image.new("RGB", (iw, th))
    for x, out in row:
      if x == 0:
        line.paste(out, (0, 0))
        continue
      line.paste(out.crop((0, 0, ov, th)), (x * s, 0), mask=mask_w)
      line.paste(out.crop((ov, 0, tw, th)), (x * s + ov, 0))
    if y == 0:
      combined.paste(line, (0, 0))
      continue
    combined.paste(line.crop((0, 0, iw, ov)), (0, y * s), mask=mask_h)
    combined.paste(line.crop((0, ov, iw, th)), (0, y * s + ov))
  return combined


def a1111_resize_with_model(network, image, width, height, tile, overlap):
  """A1111's `resize_image(0, image, width, height, upscaler)` with a model upscaler: passes
  while the target rounded down to 8 is not covered (at most 3), then Lanczos."""
  from PIL import Image  # noqa: PLC0415

  scale = max(width / image.width, height / image.height)
  if scale > 1.0:
    dest_w, dest_h = int((image.width * scale) // 8 * 8), int((image.height * scale) // 8 * 8)
    for _ in range(3):
      if image.width >= dest_w and image.height >= dest_h:
        break
      shape = image.size
      image = a1111_upscale_pass(network, image, tile, overlap)
      if shape == image.size:
        break
    if image.size != (dest_w, dest_h):
      image = image.resize((dest_w, dest_h), resample=Image.LANCZOS)
  if image.size != (width, height):
    image = image.resize((width, height), resample=Image.LANCZOS)
  return image
