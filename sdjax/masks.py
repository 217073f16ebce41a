"""Inpainting's work on the host, on 8-bit images, as AUTOMATIC1111 does it (and diffusers after
it): blurring the mask, "Only masked" (the mask's bounding box, padded and widened to the output's
aspect, is inpainted at the full output size and pasted back into the original) and the overlay
that gives the result the original's own pixels outside the mask.

The sampler (`sampling.generate`, `run.py`) only ever sees an image and a mask of the size it
generates; `prepare` makes them from the user's files, `Prepared.finish` turns the decoded image
into the final one. Pixel for pixel as diffusers' `VaeImageProcessor` (`blur`,
`get_crop_region`, `resize(mode="fill")`, `apply_overlay`), which are A1111's rules; A1111 blurs
with OpenCV's kernel rather than PIL's, which differs by a grey level here and there.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image, ImageFilter, ImageOps

from sdjax import outputs

# A1111's "Masked content" (its API's `inpainting_fill` is the index): what the masked area
# starts from. "original": the image; "fill": the image with the masked area painted over by
# the colours around it (`fill`); "latent noise" / "latent nothing": the filled image's latents
# with the masked area's replaced by the image's own initial noise / by zeros (on the device,
# `sampling`). They matter where the start is not pure noise: strength < 1.
MASKED_CONTENT = ("fill", "original", "latent noise", "latent nothing")
# `fill`'s layers: (blur radius, times composited), widest first, as A1111's.
_FILL_LAYERS = ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1))


@dataclasses.dataclass(frozen=True)
class MaskOptions:
  """How an inpainting mask is used (A1111's img2img inpaint settings).

  blur: the mask's Gaussian blur radius in pixels of the original (A1111's "Mask blur"; soft
    edges blend the overlay; what the sampler repaints is still where the blurred mask >= 0.5).
  padding: "Only masked" with this padding in pixels: the mask's bounding box, padded and widened
    to the output's aspect, is what is generated, at the full output size, and then pasted back
    into the original, which keeps its size. None: the whole picture, resized to the output size.
  overlay: whole picture: paste the original back over the result where the mask is below 0.5,
    blended where the (blurred) mask is in between (A1111 always does; "Only masked" always does).
  invert: repaint what the mask leaves black (A1111's "Inpaint not masked"), before the blur.
  masked_content: what the masked area starts from (MASKED_CONTENT); all but "original" fill it
    on the host (`fill`, after the blur and the resize, as A1111), the latent ones go on in
    `sampling`.
  """

  blur: float = 0.0
  padding: int | None = None
  overlay: bool = False
  invert: bool = False
  masked_content: str = "original"

  def check(self) -> None:
    if not self.blur >= 0:
      raise ValueError(f"the mask blur must be >= 0, got {self.blur}")
    if self.padding is not None and self.padding < 0:
      raise ValueError(f"the only-masked padding must be >= 0, got {self.padding}")
    check_masked_content(self.masked_content)

  @property
  def host_work(self) -> bool:
    """Whether anything happens here, besides the sampler's own binarizing of the mask."""
    return (bool(self.blur) or self.padding is not None or self.overlay or self.invert
            or self.masked_content != "original")

  def a1111_parameters(self) -> dict[str, str]:
    """A1111's infotext entries for these options."""
    extra = {"Mask blur": f"{self.blur:g}"}
    if self.padding is not None:
      extra.update({"Inpaint area": "Only masked", "Masked area padding": str(self.padding)})
    if self.masked_content != "original":
      extra["Masked content"] = self.masked_content
    return extra


def check_masked_content(value: str) -> str:
  if value not in MASKED_CONTENT:
    raise ValueError(f"masked content must be one of {', '.join(map(repr, MASKED_CONTENT))}, "
                     f"got {value!r}")
  return value


@dataclasses.dataclass(frozen=True)
class Prepared:
  """One image and mask ready for the sampler, and what is needed to finish its result."""

  image: np.ndarray  # float32 [h, w, 3] in [0, 1], the output size
  mask: np.ndarray  # float32 [h, w, 1] in [0, 1]
  original: Image.Image | None  # RGB: pasted over the result (None: nothing to paste)
  overlay_mask: Image.Image | None  # L: where the result shows through
  crop: tuple[int, int, int, int] | None  # (x1, y1, x2, y2) in the original ("Only masked")

  def finish(self, generated: np.ndarray) -> np.ndarray:
    """The final image (uint8 [H, W, 3]) from the decoded one (uint8 [h, w, 3])."""
    if self.original is None:
      return generated
    return np.asarray(overlay(Image.fromarray(generated), self.original, self.overlay_mask,
                              self.crop))


def cut_as(image: Image.Image, prepared: Prepared, height: int, width: int,
           resize_mode: str = "just") -> Image.Image:
  """Another image of the original's size (a ControlNet's control image) made the sampler's
  size as `prepare` made `prepared`'s: with "Only masked", the same box resized to fill; else
  the whole picture resized by `resize_mode`."""
  if prepared.crop is None:
    return outputs.resize(image, height, width, resize_mode)
  return outputs.resize_fill(image.crop(prepared.crop), height, width)


def read_mask(image: Image.Image, comfyui: bool = False) -> Image.Image:
  """A mask file's image as the 8-bit mask it stands for (white repaints). A1111's reading (its
  create_binary_mask, rounding on): an RGBA image whose alpha is not all opaque is that alpha,
  thresholded (above 128: 255, else 0), any other image its grey levels. ComfyUI's (`comfyui`:
  its LoadImage's mask; `run._comfyui_files`): an image with an alpha channel is 255 - alpha
  (what is transparent is repainted), any other its grey levels (as its LoadImageMask reads a
  channel)."""
  if comfyui and "A" in image.getbands():
    return ImageOps.invert(image.getchannel("A"))
  if not comfyui and image.mode == "RGBA" and image.getextrema()[-1] != (255, 255):
    return image.getchannel("A").point(lambda level: 255 if level > 128 else 0)
  return image.convert("L")


def prepare(image: Image.Image, mask: Image.Image, height: int, width: int,
            options: MaskOptions, resize_mode: str = "just") -> Prepared:
  """The sampler's image and mask (`height` x `width`) from an image and a mask of any (common)
  size; the mask is resized to the image's size first if they differ. The whole picture is
  resized to the output by `resize_mode` (`outputs.RESIZE_MODES`)."""
  image, mask = image.convert("RGB"), mask.convert("L")
  if options.invert:
    mask = ImageOps.invert(mask)
  if mask.size != image.size:
    mask = mask.resize(image.size, Image.Resampling.LANCZOS)
  if options.blur:
    mask = mask.filter(ImageFilter.GaussianBlur(options.blur))
  region = None
  if options.padding is not None:  # a blank mask has no region: the whole picture, as A1111
    region = crop_region(np.asarray(mask), height, width, options.padding)
  if region is not None:
    sampled_image = outputs.resize_fill(image.crop(region), height, width)
    sampled_mask = outputs.resize_fill(mask.crop(region), height, width)
    original, overlay_mask = image, mask
  else:
    sampled_image = outputs.resize(image, height, width, resize_mode)
    sampled_mask = outputs.resize(mask, height, width, resize_mode)
    original = overlay_mask = None
    if options.overlay:  # A1111: the doubled mask, so what is repainted shows whole
      original = sampled_image
      doubled = np.clip(np.asarray(sampled_mask, np.float32) * 2, 0, 255).astype(np.uint8)
      overlay_mask = Image.fromarray(doubled)
  if options.masked_content != "original":  # what is sampled; the overlay keeps the original
    sampled_image = fill(sampled_image, sampled_mask)
  return Prepared(_unit(sampled_image), _unit(sampled_mask)[..., None], original, overlay_mask,
                  region)


def fill(image: Image.Image, mask: Image.Image) -> Image.Image:
  """`image` (RGB) with what `mask` (L) covers painted over by the colours around it, as A1111's
  "fill": the image's pixels weighted by how much the mask leaves them (alpha = 255 - mask,
  8-bit premultiplied) are blurred ever less widely (`_FILL_LAYERS`), each blur composited over
  the last, so the widest blur reaches into any hole and the narrower ones bring the nearer
  colours; the last (no blur) restores what the mask leaves whole. A mask covering everything
  leaves nothing to take colours from: black."""
  weighted = Image.new("RGBa", image.size)
  weighted.paste(image.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask.convert("L")))
  canvas = Image.new("RGBA", image.size)
  for radius, times in _FILL_LAYERS:
    layer = weighted.filter(ImageFilter.GaussianBlur(radius)).convert("RGBA")
    for _ in range(times):
      canvas.alpha_composite(layer)
  return canvas.convert("RGB")


def _unit(image: Image.Image) -> np.ndarray:
  return np.asarray(image, np.float32) / np.float32(255.0)


def crop_region(mask: np.ndarray, height: int, width: int,
                padding: int) -> tuple[int, int, int, int] | None:
  """The box (x1, y1, x2, y2) around the mask's nonzero pixels (uint8 [H, W]), `padding` wider
  on each side within the image, then widened (or heightened) about its centre to the aspect
  `width`:`height`, moved back inside the image where that pushes it out; None for a blank
  mask."""
  rows, cols = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
  if not len(rows):
    return None
  h, w = mask.shape
  x1, x2 = max(int(cols[0]) - padding, 0), min(int(cols[-1]) + 1 + padding, w)
  y1, y2 = max(int(rows[0]) - padding, 0), min(int(rows[-1]) + 1 + padding, h)
  aspect = width / height
  if (x2 - x1) / (y2 - y1) > aspect:
    y1, y2 = _widen(y1, y2, int((x2 - x1) / aspect - (y2 - y1)), h)
  else:
    x1, x2 = _widen(x1, x2, int((y2 - y1) * aspect - (x2 - x1)), w)
  return x1, y1, x2, y2


def _widen(lo: int, hi: int, grow: int, size: int) -> tuple[int, int]:
  """[lo, hi) grown by `grow` (the odd pixel after), shifted back into [0, size), clipped."""
  lo, hi = lo - grow // 2, hi + grow - grow // 2
  if hi > size:
    lo, hi = lo - (hi - size), size
  if lo < 0:
    lo, hi = 0, hi - lo
  return lo, min(hi, size)


def overlay(generated: Image.Image, original: Image.Image, mask: Image.Image,
            crop: tuple[int, int, int, int] | None = None) -> Image.Image:
  """`original` with `generated` showing through where `mask` (L) is white, blended where grey
  (alpha-compositing over 8-bit premultiplied colour, as A1111); with `crop`, `generated` is
  first scaled to cover that box of the original and placed there."""
  if crop is not None:
    x1, y1, x2, y2 = crop
    placed = Image.new("RGB", original.size)  # outside the box the mask is 0: the original's
    placed.paste(outputs.resize_cover(generated.convert("RGB"), y2 - y1, x2 - x1), (x1, y1))
    generated = placed
  kept = Image.new("RGBa", original.size)
  kept.paste(original.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask.convert("L")))
  result = generated.convert("RGBA")
  result.alpha_composite(kept.convert("RGBA"))
  return result.convert("RGB")
