"""A1111's Soft inpainting (extensions-builtin/soft-inpainting), written out as its oracle: its
magnitude-keeping latent blend (torch, the magnitudes in float64), the mask exponent of each
blend, and its pixel composite's mask (apply_adaptive_masks, with its pixel-by-pixel weighted
histogram filter), step by step as A1111 takes them, for sdjax's vectorised versions to match."""

import math

import numpy as np
import torch
from PIL import Image, ImageFilter

DEFAULTS = (1.0, 0.5, 4.0, 0.0, 0.5, 2.0)  # power, scale, detail, influence, threshold, contrast


def latent_blend(a, b, t, detail: float):
  """a (the image's latents) and b [B, C, h, w] interpolated by t [B, 1, h, w], each pixel's
  vector rescaled to the interpolated powered magnitude."""
  interp = a * (1 - t) + b * t
  current = torch.norm(interp, p=2, dim=1, keepdim=True).to(torch.float64) + 0.00001
  na = torch.norm(a, p=2, dim=1, keepdim=True).to(torch.float64) ** detail * (1 - t)
  nb = torch.norm(b, p=2, dim=1, keepdim=True).to(torch.float64) ** detail * t
  desired = (na + nb) ** (1 / detail)
  return interp * (desired / current).to(interp.dtype)


def blend_weight(nmask, sigma, power: float, scale: float):
  """The blend's t: the latent mask to the power sigma^power * scale (sigma a float32 tensor)."""
  return torch.pow(nmask, sigma ** power * scale)


def _kernel():
  def gaussian(r2):
    return math.exp(-r2 / (1.5 * 1.5))

  zero = gaussian(3.0 * 3.0)
  kernel = np.zeros((5, 5))
  for i in range(5):
    for j in range(5):
      kernel[i, j] = max(0.0, (gaussian((i - 2) ** 2.0 + (j - 2) ** 2.0) - zero) / (1 - zero))
  return kernel


def histogram_filter(image: np.ndarray, low: float, high: float) -> np.ndarray:
  """The filter pixel by pixel: the window inside the image, sorted by value (a stable sort),
  stacked by kernel weight; the weighted mean of what overlaps [low, high] of the stack's height,
  that range widened to 1 about its middle and kept inside the stack."""
  kernel = _kernel()
  h, w = image.shape
  out = image.copy()
  for y in range(h):
    for x in range(w):
      items = []
      for wy in range(max(0, y - 2), min(h, y + 3)):
        for wx in range(max(0, x - 2), min(w, x + 3)):
          items.append((image[wy, wx], kernel[wy - y + 2, wx - x + 2]))
      items.sort(key=lambda item: item[0])
      bounds, total = [], 0
      for _, weight in items:
        bounds.append((total, total + weight))
        total += weight
      start, end = total * low, total * high
      if end - start < 1:
        middle = (start + end) / 2
        start, end = middle - 0.5, middle + 0.5
        if end > total:
          start, end = total - 1, total
        if start < 0:
          start, end = 0, 1
      value = weight_sum = 0
      for (v, _), (bottom, top) in zip(items, bounds, strict=True):
        if start >= top:
          continue
        if end <= bottom:
          break
        part = min(end, top) - max(start, bottom)
        value += v * part
        weight_sum += part
      out[y, x] = value / weight_sum if weight_sum != 0 else 0
  return out


def overlay_mask(nmask, distance, settings, width: int, height: int) -> Image.Image:
  """One image's overlay mask (L) from its latent mask (torch [h, w]) and the distance between
  its final latents and the image's (torch [h, w])."""
  _, scale, _, influence, threshold, contrast = settings
  scalar = 1 - torch.clamp(nmask.float(), min=0, max=1) ** (scale / 2)
  scalar = 0.5 * (1 - influence) + scalar * influence
  scalar = (scalar / (1.00001 - scalar)).numpy()
  m = distance.float().numpy()
  m = histogram_filter(m, 0.9, 1)
  m = histogram_filter(m, 0.25, 0.75)
  m = m / (threshold * scalar)
  m = 1 / (1 + m ** contrast)
  m = m * m * m * (m * (6 * m - 15) + 10)
  m = (255.0 * (1 - m)).astype(np.uint8)
  small = Image.fromarray(m)
  assert small.width * height == small.height * width  # "Resize and fill" of the same aspect
  whole = small.resize((width, height), Image.LANCZOS).convert("RGB").convert("L")
  return whole.filter(ImageFilter.GaussianBlur(radius=4))


def composite(generated: Image.Image, original: Image.Image, mask: Image.Image) -> Image.Image:
  """A1111's overlay: the original, its alpha the inverted mask (premultiplied RGBa), composited
  over the generated image."""
  from PIL import ImageOps  # noqa: PLC0415

  kept = Image.new("RGBa", original.size)
  kept.paste(original.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask.convert("L")))
  result = generated.convert("RGBA")
  result.alpha_composite(kept.convert("RGBA"))
  return result.convert("RGB")


def uncrop(image: Image.Image, size: tuple[int, int], box: tuple[int, int, int, int]):
  """A1111's uncrop: `image` through its "Crop and resize" (Lanczos) to the box (x, y, w, h),
  pasted there on a transparent canvas of `size` (RGBA)."""
  x, y, w, h = box
  ratio, source = w / h, image.width / image.height
  src_w = w if ratio > source else image.width * h // image.height
  src_h = h if ratio <= source else image.height * w // image.width
  resized = Image.new("RGB", (w, h))
  resized.paste(image.resize((src_w, src_h), Image.LANCZOS),
                box=(w // 2 - src_w // 2, h // 2 - src_h // 2))
  canvas = Image.new("RGBA", size)
  canvas.paste(resized, (x, y))
  return canvas
