"""Inpainting's work on the host, on 8-bit images, as AUTOMATIC1111 does it (and diffusers after
it): blurring the mask, "Only masked" (the mask's bounding box, padded and widened to the output's
aspect, is inpainted at the full output size and pasted back into the original) and the overlay
that gives the result the original's own pixels outside the mask; and ComfyUI's paste back
(its ImageCompositeMasked node: `MaskOptions.composite`), in float before the 8-bit levels.

The sampler (`sampling.generate`, `run.py`) only ever sees an image and a mask of the size it
generates; `prepare` makes them from the user's files, `Prepared.finish` turns the decoded image
into the final one. Pixel for pixel as diffusers' `VaeImageProcessor` (`blur`,
`get_crop_region`, `resize(mode="fill")`, `apply_overlay`), which are A1111's rules; A1111 blurs
with OpenCV's kernel rather than PIL's, which differs by a grey level here and there.
"""

from __future__ import annotations

import dataclasses
import math

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
  soft: A1111's soft inpainting (`SoftInpainting`): the original pasted back by
    `soft_overlay`'s mask, made from the final latents, instead of the (doubled) mask.
  composite: ComfyUI's ImageCompositeMasked of the decoded image over the image through the
    mask, as its inpainting workflows paste the original back: `mask * decoded + (1 - mask) *
    image` in float32, before the 8-bit levels (`Prepared.composite`); the mask as ComfyUI loads
    it (`comfyui_mask`), or with a blur the blurred one the sampler gets. Whole picture only.
  """

  blur: float = 0.0
  padding: int | None = None
  overlay: bool = False
  invert: bool = False
  masked_content: str = "original"
  soft: SoftInpainting | None = None
  composite: bool = False

  def check(self) -> None:
    if not self.blur >= 0:
      raise ValueError(f"the mask blur must be >= 0, got {self.blur}")
    if self.padding is not None and self.padding < 0:
      raise ValueError(f"the only-masked padding must be >= 0, got {self.padding}")
    check_masked_content(self.masked_content)
    if self.composite and (self.padding is not None or self.overlay or self.soft is not None):
      raise ValueError("ComfyUI's composite pastes the whole picture back: not with \"Only "
                       "masked\", the overlay or soft inpainting")

  @property
  def host_work(self) -> bool:
    """Whether anything happens here, besides the sampler's own binarizing of the mask."""
    return (bool(self.blur) or self.padding is not None or self.overlay or self.invert
            or self.masked_content != "original" or self.soft is not None or self.composite)

  def a1111_parameters(self) -> dict[str, str]:
    """A1111's infotext entries for these options."""
    extra = {"Mask blur": f"{self.blur:g}"}
    if self.padding is not None:
      extra.update({"Inpaint area": "Only masked", "Masked area padding": str(self.padding)})
    if self.masked_content != "original":
      extra["Masked content"] = self.masked_content
    if self.invert:  # (A1111's paste field of its inpainting_mask_invert)
      extra["Mask mode"] = "Inpaint not masked"
    if self.soft is not None:
      extra.update(self.soft.a1111_parameters())
    return extra


@dataclasses.dataclass(frozen=True)
class SoftInpainting:
  """A1111's "Soft inpainting" (its built-in extension), which lets a soft (blurred) mask's
  grey edge blend the original into the result instead of cutting it at 0.5. On the device
  (`sampling`): the latent mask is not rounded; each of the sampler's blends is a
  magnitude-keeping interpolation (`sampling.latent_blend`) towards the image's latents by
  the mask raised to sigma ** schedule_bias * preservation_strength; no blend after the loop.
  Here (`soft_overlay`): the original is pasted back where the final latents moved little from
  the image's. Defaults and ranges are A1111's sliders'.

  schedule_bias: when the original is preserved (below 1: more near the end, at low sigma).
  preservation_strength: how strongly partially masked areas keep the original.
  transition_contrast_boost: the blend's magnitude power (higher: the larger magnitude wins).
  mask_influence: how much the mask biases the difference threshold (0: not at all).
  difference_threshold: the latent distance at which the original's opacity is 50%.
  difference_contrast: how sharp that transition is.
  """

  schedule_bias: float = 1.0
  preservation_strength: float = 0.5
  transition_contrast_boost: float = 4.0
  mask_influence: float = 0.0
  difference_threshold: float = 0.5
  difference_contrast: float = 2.0

  def check(self) -> SoftInpainting:
    for field in dataclasses.fields(self):
      value = getattr(self, field.name)
      low, high = _SOFT_RANGES[field.name]
      if isinstance(value, bool) or not isinstance(value, int | float | np.number) or not (
          low <= value <= high):
        raise ValueError(f"soft inpainting's {field.name} must be a number in [{low:g}, "
                         f"{high:g}] (A1111's slider), got {value!r}")
    return self

  def a1111_parameters(self) -> dict[str, str]:
    """A1111's infotext entries (its extension's labels)."""
    return {"Soft inpainting enabled": "True", **{
        label: f"{getattr(self, field.name):g}" for field, label in zip(
            dataclasses.fields(self), SOFT_INPAINTING_LABELS, strict=True)}}


# A1111's infotext labels of `SoftInpainting`'s fields, in order.
SOFT_INPAINTING_LABELS = (
    "Soft inpainting schedule bias", "Soft inpainting preservation strength",
    "Soft inpainting transition contrast boost", "Soft inpainting mask influence",
    "Soft inpainting difference threshold", "Soft inpainting difference contrast")
_SOFT_RANGES = {"schedule_bias": (0, 8), "preservation_strength": (0, 8),
                "transition_contrast_boost": (1, 32), "mask_influence": (0, 1),
                "difference_threshold": (0, 8), "difference_contrast": (0, 8)}


def soft_inpainting(values) -> SoftInpainting | None:
  """`SoftInpainting` from None (off), "on" (A1111's defaults) or its six numbers in A1111's
  order (schedule bias, preservation strength, transition contrast boost, mask influence,
  difference threshold, difference contrast), as a list or a comma-separated string."""
  if values is None or isinstance(values, SoftInpainting):
    return values if values is None else values.check()
  if isinstance(values, str):
    values = [v.strip() for v in values.split(",")]
  values = list(values)
  if values == ["on"]:
    return SoftInpainting()
  if len(values) != 6:
    raise ValueError("soft inpainting takes 'on' (A1111's defaults) or six numbers: schedule "
                     "bias, preservation strength, transition contrast boost, mask influence, "
                     f"difference threshold, difference contrast; got {values!r}")
  try:
    numbers = [float(v) for v in values]
  except (TypeError, ValueError):
    raise ValueError(f"soft inpainting's settings must be numbers, got {values!r}") from None
  return SoftInpainting(*numbers).check()


def soft_latent_mask(mask: np.ndarray, latent_hw: tuple[int, int]) -> np.ndarray:
  """A1111's latent mask of a float32 mask [H, W] (or [H, W, 1]) of 8-bit levels / 255 with
  soft inpainting (its mask rounding off): the 8-bit mask as RGB through PIL's default
  (bicubic) resize to the latents' size, / 255, float32 [h, w]."""
  levels = np.round(np.asarray(mask, np.float32).reshape(mask.shape[:2]) * 255).astype(np.uint8)
  small = Image.fromarray(levels).convert("RGB").resize(latent_hw[::-1])
  return np.asarray(small, np.float32)[..., 0] / np.float32(255)


def soft_overlay(distance: np.ndarray, latent_mask: np.ndarray, soft: SoftInpainting,
                 height: int, width: int) -> Image.Image:
  """Soft inpainting's overlay mask (L, `width` x `height`: white where the result shows, the
  original pasted where black), A1111's apply_adaptive_masks for one image: the distance
  between the final latents and the image's (float32 [h, w]) through two weighted-histogram
  filters (`weighted_histogram_filter`: the upper tenth's mean, then the middle half's),
  divided by the threshold (scaled by the mask where mask_influence > 0), through
  1 / (1 + d ** contrast), smootherstep and 1 - that, as 8-bit levels (truncated), then
  "Resize and fill" to the image's size and a Gaussian blur of radius 4. `latent_mask` is
  `soft_latent_mask`'s."""
  one = np.float32(1)
  scalar = one - np.clip(latent_mask.astype(np.float32), 0, 1) ** np.float32(
      soft.preservation_strength / 2)
  scalar = np.float32(0.5 * (1 - soft.mask_influence)) + scalar * np.float32(
      soft.mask_influence)
  scalar = scalar / (np.float32(1.00001) - scalar)
  d = weighted_histogram_filter(distance.astype(np.float32), 0.9, 1.0)
  d = weighted_histogram_filter(d, 0.25, 0.75)
  with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
    d = d / (np.float32(soft.difference_threshold) * scalar)
    m = one / (one + d ** np.float32(soft.difference_contrast))
  m = m * m * m * (m * (np.float32(6) * m - np.float32(15)) + np.float32(10))  # smootherstep
  m = np.nan_to_num((one - m) * np.float32(255), nan=0.0)
  levels = Image.fromarray(m.astype(np.uint8))
  whole = outputs.resize_fill(levels, height, width)
  return whole.filter(ImageFilter.GaussianBlur(4))


def _soft_kernel() -> np.ndarray:
  """A1111's 5 x 5 kernel of the filters: a Gaussian of standard deviation 1.5 (exp(-r^2 /
  1.5^2)) lowered and rescaled to 1 at the centre and 0 at radius 3, float64."""
  r2 = np.add.outer(np.arange(-2, 3) ** 2.0, np.arange(-2, 3) ** 2.0)
  zero = math.exp(-9 / 2.25)
  return np.maximum((np.exp(-r2 / 2.25) - zero) * (1 / (1 - zero)), 0.0)


def weighted_histogram_filter(image: np.ndarray, low: float, high: float) -> np.ndarray:
  """A1111's weighted histogram filter of a float32 image [h, w] with `_soft_kernel`: at each
  pixel, the window's values (those inside the image) sorted, each as tall as its kernel
  weight, stacked; the mean of the stack between fractions `low` and `high` of its height
  (widened to a height of at least 1 about its middle, kept inside the stack), weighted by
  each value's overlap with that range. float32."""
  kernel = _soft_kernel()
  h, w = image.shape
  padded = np.pad(image.astype(np.float64), 2, constant_values=np.inf)
  inside = np.pad(np.ones((h, w)), 2)
  # [h, w, 25]: each pixel's window in row-major order, outside pixels +inf with weight 0
  values = np.stack([padded[i:i + h, j:j + w] for i in range(5) for j in range(5)], -1)
  weights = np.stack([inside[i:i + h, j:j + w] * kernel[i, j]
                      for i in range(5) for j in range(5)], -1)
  order = np.argsort(values, axis=-1, kind="stable")
  values = np.take_along_axis(values, order, -1)
  weights = np.take_along_axis(weights, order, -1)
  tops = np.cumsum(weights, -1)
  bottoms = tops - weights
  total = tops[..., -1:]
  start, end = total * low, total * high
  narrow = end - start < 1
  middle = (start + end) / 2
  start, end = np.where(narrow, middle - 0.5, start), np.where(narrow, middle + 0.5, end)
  over = narrow & (end > total)
  start, end = np.where(over, total - 1, start), np.where(over, total, end)
  under = narrow & (start < 0)
  start, end = np.where(under, 0, start), np.where(under, 1, end)
  overlap = np.maximum(np.minimum(end, tops) - np.maximum(start, bottoms), 0)
  overlap = np.where(weights > 0, overlap, 0)
  value = np.sum(np.where(overlap > 0, values, 0) * overlap, -1)
  weight = np.sum(overlap, -1)
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(weight != 0, value / weight, 0).astype(np.float32)


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
  soft: SoftInpainting | None = None  # the overlay mask made by `soft_overlay`
  # ComfyUI's composite (`MaskOptions.composite`): (the image, float32 [h, w, 3] in [0, 1], and
  # the mask, float32 [h, w, 1], as ComfyUI loads them)
  pasted: tuple[np.ndarray, np.ndarray] | None = None

  @property
  def finishes(self) -> bool:
    """Whether the decoded image changes (`composite`, `finish`)."""
    return self.original is not None or self.pasted is not None

  def composite(self, decoded: np.ndarray) -> np.ndarray:
    """The decoded image (float [h, w, 3] in [0, 1]) with ComfyUI's composite over the image
    (`MaskOptions.composite`), in float32 as its ImageCompositeMasked: the result goes to the
    8-bit levels next; unchanged without."""
    if self.pasted is None:
      return decoded
    image, mask = self.pasted
    decoded = np.asarray(decoded, np.float32)
    return mask * decoded + (np.ones_like(mask) - mask) * image

  def finish(self, generated: np.ndarray, distance: np.ndarray | None = None) -> np.ndarray:
    """The final image (uint8 [H, W, 3]) from the decoded one (uint8 [h, w, 3]); with soft
    inpainting, the distance between its latents and the image's (float32 [h / 8, w / 8],
    `sampling`'s second output) makes the overlay mask."""
    if self.original is None:  # (ComfyUI's composite, if any, came before the levels)
      return generated
    mask = self.overlay_mask
    if self.soft is not None:
      if distance is None:
        raise ValueError("soft inpainting's overlay needs the latents' distance map")
      h, w = generated.shape[:2]
      distance = np.asarray(distance, np.float32).reshape(distance.shape[:2])
      mask = soft_overlay(distance, soft_latent_mask(self.mask, distance.shape), self.soft,
                          h, w)
      if self.crop is not None:  # A1111's uncrop: black (the original) outside the box
        x1, y1, x2, y2 = self.crop
        placed = Image.new("L", self.original.size)
        placed.paste(outputs.resize_cover(mask, y2 - y1, x2 - x1), (x1, y1))
        mask = placed
    return np.asarray(overlay(Image.fromarray(generated), self.original, mask, self.crop))


def cut_as(image: Image.Image, prepared: Prepared, height: int, width: int,
           resize_mode: str = "just") -> Image.Image:
  """Another image of the original's size (a ControlNet's control image) made the sampler's
  size as `prepare` made `prepared`'s: with "Only masked", the same box resized to fill; else
  the whole picture resized by `resize_mode`."""
  if prepared.crop is None:
    return outputs.resize(image, height, width, resize_mode)
  return outputs.resize_fill(image.crop(prepared.crop), height, width)


def read_mask(image: Image.Image, comfyui: bool = False, rounded: bool = True) -> Image.Image:
  """A mask file's image as the 8-bit mask it stands for (white repaints). A1111's reading (its
  create_binary_mask, rounding on): an RGBA image whose alpha is not all opaque is that alpha,
  thresholded (above 128: 255, else 0), any other image its grey levels. ComfyUI's (`comfyui`:
  its LoadImage's mask; `run._comfyui_files`): an image with an alpha channel is 255 - alpha
  (what is transparent is repainted), any other its grey levels (as its LoadImageMask reads a
  channel). Not `rounded` (A1111's soft inpainting turns its rounding off), the alpha is the
  mask as it is."""
  if comfyui and "A" in image.getbands():
    return ImageOps.invert(image.getchannel("A"))
  if not comfyui and image.mode == "RGBA" and image.getextrema()[-1] != (255, 255):
    alpha = image.getchannel("A")
    return alpha.point(lambda level: 255 if level > 128 else 0) if rounded else alpha
  return image.convert("L")


def comfyui_mask(mask: Image.Image, from_alpha: bool, invert: bool = False) -> np.ndarray:
  """The float32 [h, w, 1] mask ComfyUI computes from the 8-bit one `read_mask(comfyui=True)`
  made (white repaints), bit for bit: from a file's alpha (`from_alpha`) its LoadImage's
  `1 - alpha / 255`, else LoadImageMask's `level / 255`; `invert`: then InvertMask's `1 - mask`.
  (1 - a / 255 and (255 - a) / 255 differ in the last bit for most levels.)"""
  levels = np.asarray(mask.convert("L"), np.float32)
  one = np.float32(1.0)
  unit = one - (np.float32(255) - levels) / np.float32(255) if from_alpha else _unit(mask)
  return (one - unit if invert else unit)[..., None]


def prepare(image: Image.Image, mask: Image.Image, height: int, width: int,
            options: MaskOptions, resize_mode: str = "just", mask_from_alpha: bool = False
            ) -> Prepared:
  """The sampler's image and mask (`height` x `width`) from an image and a mask of any (common)
  size; the mask is resized to the image's size first if they differ. The whole picture is
  resized to the output by `resize_mode` (`outputs.RESIZE_MODES`). `mask_from_alpha`: the mask
  is ComfyUI's reading of a file's alpha (`comfyui_mask`; for `options.composite`)."""
  image, mask = image.convert("RGB"), mask.convert("L")
  unflipped = mask
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
    if options.soft is not None:  # A1111's soft inpainting makes its own overlay mask
      original = sampled_image
    elif options.overlay:  # A1111: the doubled mask, so what is repainted shows whole
      original = sampled_image
      doubled = np.clip(np.asarray(sampled_mask, np.float32) * 2, 0, 255).astype(np.uint8)
      overlay_mask = Image.fromarray(doubled)
  pasted = None
  if options.composite and options.blur:  # the blurred mask, as the sampler gets it
    pasted = (_unit(sampled_image), _unit(sampled_mask)[..., None])
  elif options.composite:  # the file's, read as ComfyUI reads it
    resized = outputs.resize(unflipped.resize(image.size, Image.Resampling.LANCZOS)
                             if unflipped.size != image.size else unflipped,
                             height, width, resize_mode)
    pasted = (_unit(sampled_image), comfyui_mask(resized, mask_from_alpha, options.invert))
  if options.masked_content != "original":  # what is sampled; the overlay keeps the original
    sampled_image = fill(sampled_image, sampled_mask)
  return Prepared(_unit(sampled_image), _unit(sampled_mask)[..., None], original, overlay_mask,
                  region, options.soft, pasted)


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
