"""sdjax.masks against diffusers' VaeImageProcessor (A1111's rules), pixel for pixel."""

import dataclasses

import numpy as np
import pytest
from diffusers.image_processor import VaeImageProcessor
from PIL import Image, ImageFilter, ImageOps

from sdjax import masks, outputs

PROCESSOR = VaeImageProcessor()  # diffusers' inpainting pipelines': Lanczos


def _image(rng, height, width):
  return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _mask(rng, height, width, box, blur=0.0):
  """A white box (x1, y1, x2, y2) on black, maybe blurred, with a few stray grey pixels in it."""
  mask = np.zeros((height, width), np.uint8)
  x1, y1, x2, y2 = box
  mask[y1:y2, x1:x2] = rng.integers(1, 256, (y2 - y1, x2 - x1))
  image = Image.fromarray(mask)
  return image.filter(ImageFilter.GaussianBlur(blur)) if blur else image


# (image height, width), mask box, padding, output (height, width): every branch of the aspect
# rule (wider, taller, equal), boxes at the edges, padding pushing out of the image.
CROPS = [
    ((40, 56), (10, 5, 20, 12), 0, (32, 32)),
    ((40, 56), (10, 5, 20, 12), 4, (24, 40)),
    ((40, 56), (0, 0, 3, 30), 2, (32, 16)),
    ((40, 56), (50, 30, 56, 40), 6, (16, 48)),
    ((64, 24), (2, 40, 22, 63), 1, (40, 40)),
    ((64, 24), (5, 5, 6, 6), 0, (8, 64)),
    ((33, 47), (0, 0, 47, 33), 9, (24, 32)),
    ((50, 50), (20, 1, 30, 49), 3, (64, 8)),
]


@pytest.mark.parametrize(("shape", "box", "padding", "out"), CROPS)
def test_crop_region_matches_diffusers(shape, box, padding, out):
  mask = _mask(np.random.default_rng(0), *shape, box)
  ours = masks.crop_region(np.asarray(mask), *out, padding)
  assert ours == PROCESSOR.get_crop_region(mask, out[1], out[0], pad=padding)
  x1, y1, x2, y2 = ours
  assert 0 <= x1 < x2 <= shape[1] and 0 <= y1 < y2 <= shape[0]


def test_blank_mask_has_no_crop_region():
  assert masks.crop_region(np.zeros((16, 24), np.uint8), 8, 8, 4) is None


@pytest.mark.parametrize("crop", [None, (8, 4, 40, 36)])
def test_overlay_matches_diffusers(crop):
  rng = np.random.default_rng(2)
  original = _image(rng, 40, 56)
  mask = _mask(rng, 40, 56, (12, 9, 34, 30), blur=3.0)  # grey edges: blended
  generated = _image(rng, 32, 32) if crop else _image(rng, 40, 56)
  ours = masks.overlay(generated, original, mask, crop)
  theirs = PROCESSOR.apply_overlay(mask, original, generated, crop)
  np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))
  outside = np.asarray(mask) == 0
  np.testing.assert_array_equal(np.asarray(ours)[outside], np.asarray(original)[outside])


def test_prepare_only_masked_is_diffusers_preprocessing():
  """The sampler's inputs for "Only masked", as diffusers' inpainting pipelines preprocess them
  with `padding_mask_crop`; `finish` pastes back at the original's size."""
  rng = np.random.default_rng(3)
  image, mask = _image(rng, 40, 56), _mask(rng, 40, 56, (30, 10, 44, 18))
  blur = 2.0
  blurred = PROCESSOR.blur(mask, blur)
  prepared = masks.prepare(image, mask, 24, 32, masks.MaskOptions(blur=blur, padding=5))
  crop = PROCESSOR.get_crop_region(blurred, 32, 24, pad=5)
  assert prepared.crop == crop
  mask_processor = VaeImageProcessor(do_normalize=False, do_binarize=True,
                                     do_convert_grayscale=True)
  theirs_image = PROCESSOR.preprocess(image, 24, 32, resize_mode="fill", crops_coords=crop)
  theirs_mask = mask_processor.preprocess(blurred, 24, 32, resize_mode="fill", crops_coords=crop)
  np.testing.assert_allclose(prepared.image * 2 - 1, theirs_image[0].permute(1, 2, 0).numpy(),
                             atol=1e-7)
  np.testing.assert_array_equal(prepared.mask[..., 0] >= 0.5, theirs_mask[0, 0].numpy() == 1)
  generated = np.asarray(_image(rng, 24, 32))
  final = prepared.finish(generated)
  assert final.shape == (40, 56, 3)
  theirs = PROCESSOR.apply_overlay(blurred, image, Image.fromarray(generated), crop)
  np.testing.assert_array_equal(final, np.asarray(theirs))


def test_prepare_whole_picture():
  """Without padding the sampler gets the image and mask resized to its size (Lanczos, A1111's
  "Just resize"); the overlay keeps the original's pixels where the mask is 0 and the result's
  where the doubled mask saturates."""
  rng = np.random.default_rng(4)
  image, mask = _image(rng, 24, 32), _mask(rng, 24, 32, (4, 4, 20, 16))
  plain = masks.prepare(image, mask, 24, 32, masks.MaskOptions())
  np.testing.assert_array_equal(plain.image, np.asarray(image, np.float32) / 255)
  np.testing.assert_array_equal(plain.mask[..., 0], np.asarray(mask, np.float32) / 255)
  generated = np.asarray(_image(rng, 24, 32))
  np.testing.assert_array_equal(plain.finish(generated), generated)

  resized = masks.prepare(image, mask.resize((16, 12)), 16, 24, masks.MaskOptions(overlay=True))
  assert resized.image.shape == (16, 24, 3) and resized.mask.shape == (16, 24, 1)
  small = image.resize((24, 16), Image.Resampling.LANCZOS)
  np.testing.assert_array_equal(resized.image, np.asarray(small, np.float32) / 255)
  generated = np.asarray(_image(rng, 16, 24))
  final = resized.finish(generated)
  levels = np.round(resized.mask[..., 0] * 255)
  np.testing.assert_array_equal(final[levels == 0], np.asarray(small)[levels == 0])
  np.testing.assert_array_equal(final[levels >= 128], generated[levels >= 128])


def test_inverted_mask_repaints_the_rest():
  """A1111's "Inpaint not masked": the mask inverted before anything else (here the blur)."""
  rng = np.random.default_rng(6)
  image, mask = _image(rng, 24, 32), _mask(rng, 24, 32, (4, 4, 20, 16))
  inverted = masks.prepare(image, mask, 24, 32, masks.MaskOptions(blur=2.0, invert=True))
  expected = ImageOps.invert(mask).filter(ImageFilter.GaussianBlur(2.0))
  np.testing.assert_array_equal(inverted.mask[..., 0], np.asarray(expected, np.float32) / 255)


def test_blank_mask_only_masked_is_whole_picture():
  rng = np.random.default_rng(5)
  image = _image(rng, 24, 32)
  prepared = masks.prepare(image, Image.new("L", (32, 24)), 24, 32, masks.MaskOptions(padding=8))
  assert prepared.crop is None and not prepared.mask.any()


def _halves(height, width, left, right):
  image = np.empty((height, width, 3), np.uint8)
  image[:, : width // 2], image[:, width // 2:] = left, right
  return image


def test_fill_paints_the_hole_from_around_it():
  """A1111's "fill": what the mask leaves black is the image's own; a hole takes the colours
  around it, each side's nearer, none of its own; a hole in one colour becomes that colour
  (within the 8-bit premultiplied-alpha rounding of the wide, faint blurs)."""
  image = _halves(40, 64, (200, 20, 20), (20, 20, 200))
  image[10:30, 16:48] = (20, 220, 20)  # what the hole hides: none of its green comes back
  mask = np.zeros((40, 64), np.uint8)
  mask[10:30, 16:48] = 255
  filled = np.asarray(masks.fill(Image.fromarray(image), Image.fromarray(mask)))
  kept = mask == 0
  np.testing.assert_array_equal(filled[kept], image[kept])
  row = filled[20, 16:48].astype(int)
  assert np.all(np.diff(row[:, 0]) <= 0) and np.all(np.diff(row[:, 2]) >= 0)  # red to blue
  assert row[0, 0] > 180 and row[0, 2] < 40 and row[-1, 2] > 180 and row[-1, 0] < 40
  assert filled[mask == 255, 1].max() <= 25
  one = np.full((40, 64, 3), (90, 140, 30), np.uint8)
  filled_one = np.asarray(masks.fill(Image.fromarray(one), Image.fromarray(mask)))
  assert np.abs(filled_one.astype(int) - one).max() <= 8
  everything = masks.fill(Image.fromarray(one), Image.new("L", (64, 40), 255))
  assert not np.asarray(everything).any()  # nothing to take colours from: black


@pytest.mark.parametrize("padding", [None, 4])
def test_prepare_fills_what_is_sampled_not_the_overlay(padding):
  """Every masked content but "original" samples the filled image (filled after the blur and
  the resize, with the mask the sampler gets); the overlay still pastes the original back."""
  rng = np.random.default_rng(8)
  image, mask = _image(rng, 24, 32), _mask(rng, 24, 32, (4, 4, 20, 16))
  for content in ("fill", "latent noise", "latent nothing"):
    options = masks.MaskOptions(blur=2.0, padding=padding, overlay=True, masked_content=content)
    assert options.a1111_parameters()["Masked content"] == content
    filled = masks.prepare(image, mask, 16, 24, options)
    plain = masks.prepare(image, mask, 16, 24, dataclasses.replace(options,
                                                                   masked_content="original"))
    np.testing.assert_array_equal(filled.mask, plain.mask)
    sampled_mask = Image.fromarray(np.round(plain.mask[..., 0] * 255).astype(np.uint8))
    expected = masks.fill(Image.fromarray(np.round(plain.image * 255).astype(np.uint8)),
                          sampled_mask)
    np.testing.assert_array_equal(filled.image, np.asarray(expected, np.float32) / 255)
    assert not np.array_equal(filled.image, plain.image)
    generated = np.asarray(_image(rng, 16, 24))
    np.testing.assert_array_equal(filled.finish(generated), plain.finish(generated))
  assert "Masked content" not in masks.MaskOptions().a1111_parameters()
  with pytest.raises(ValueError, match="masked content must be one of"):
    masks.MaskOptions(masked_content="latent_noise").check()


def test_read_mask_as_a1111_and_comfyui():
  """A mask file: A1111 reads an RGBA one with transparency by its alpha, thresholded above 128
  (its create_binary_mask), ComfyUI's LoadImage by 255 - alpha (transparent repaints); an
  opaque RGBA one (A1111) or one without alpha is its grey levels either way."""
  rng = np.random.default_rng(3)
  rgb = rng.integers(0, 256, (6, 7, 3), np.uint8)
  alpha = rng.integers(0, 256, (6, 7), np.uint8)
  alpha[0, :3] = (128, 129, 255)
  image = Image.fromarray(np.dstack([rgb, alpha]))
  grey = np.asarray(Image.fromarray(rgb).convert("L"))
  a1111 = np.asarray(masks.read_mask(image))
  np.testing.assert_array_equal(a1111, np.where(alpha > 128, 255, 0))
  assert a1111[0, :3].tolist() == [0, 255, 255]
  np.testing.assert_array_equal(np.asarray(masks.read_mask(image, comfyui=True)), 255 - alpha)
  # A1111's soft inpainting turns the rounding off: the alpha as it is
  np.testing.assert_array_equal(np.asarray(masks.read_mask(image, rounded=False)), alpha)
  opaque = Image.fromarray(np.dstack([rgb, np.full_like(alpha, 255)]))
  np.testing.assert_array_equal(np.asarray(masks.read_mask(opaque)), grey)
  for comfyui in (False, True):
    read = masks.read_mask(Image.fromarray(rgb), comfyui)
    assert read.mode == "L"
    np.testing.assert_array_equal(np.asarray(read), grey)


def _comfyui_composite(destination, source, mask):
  """ComfyUI's ImageCompositeMasked at (0, 0) of same-sized images, as its `composite` computes
  it in torch (NCHW, float32; its bilinear resize of a same-sized mask is the identity)."""
  import torch  # noqa: PLC0415

  destination = torch.from_numpy(destination).movedim(-1, 0)[None].clone()
  source = torch.from_numpy(source).movedim(-1, 0)[None]
  mask = torch.from_numpy(mask).reshape((-1, 1, *mask.shape[-2:]))
  inverse_mask = torch.ones_like(mask) - mask
  destination[..., :, :] = mask * source + inverse_mask * destination
  return destination[0].movedim(0, -1).numpy()


@pytest.mark.parametrize("reading", ["alpha", "inverted alpha", "grey", "blurred"])
def test_comfyui_composite_is_its_image_composite_masked(reading):
  """`MaskOptions(composite=True)`: the decoded image pasted over the image through the mask as
  ComfyUI's ImageCompositeMasked does it, bit for bit in float32, with the mask as ComfyUI loads
  it: LoadImage's 1 - alpha / 255 of an RGBA file (InvertMask: 1 - that), LoadImageMask's
  level / 255 of a grey one; and then as its SaveImage writes 8 bits (floor). With a mask
  blur, the blurred mask the sampler gets. The sampler's own inputs are unchanged by it."""
  rng = np.random.default_rng(5)
  h, w = 9, 11
  rgb = rng.integers(0, 256, (h, w, 3), np.uint8)
  alpha = rng.integers(0, 256, (h, w), np.uint8)
  alpha[:2] = 255  # kept whole
  decoded = rng.random((h, w, 3), dtype=np.float32)
  image = Image.fromarray(rgb)
  invert = reading == "inverted alpha"
  if reading == "grey":
    file = Image.fromarray(alpha)
    mask = alpha.astype(np.float32) / 255.0  # LoadImageMask, a colour channel
  else:
    file = Image.fromarray(np.dstack([rgb, alpha]))
    mask = 1. - alpha.astype(np.float32) / 255.0  # LoadImage's MASK
    mask = 1. - mask if invert else mask  # InvertMask
  blur = 2.0 if reading == "blurred" else 0.0
  read = masks.read_mask(file, comfyui=True)
  options = masks.MaskOptions(blur=blur, invert=invert, composite=True)
  prepared = masks.prepare(image, read, h, w, options, mask_from_alpha="A" in file.getbands())
  plain = masks.prepare(image, read, h, w, dataclasses.replace(options, composite=False))
  np.testing.assert_array_equal(prepared.image, plain.image)
  np.testing.assert_array_equal(prepared.mask, plain.mask)
  assert prepared.finishes and not plain.finishes
  if blur:
    mask = prepared.mask[..., 0]
  expected = _comfyui_composite(rgb.astype(np.float32) / 255.0, decoded, mask)
  ours = prepared.composite(decoded)
  assert ours.dtype == np.float32
  np.testing.assert_array_equal(ours, expected)
  saved = np.clip(255. * expected, 0, 255).astype(np.uint8)  # its SaveImage
  np.testing.assert_array_equal(outputs.to_uint8(ours, "floor"), saved)
  if reading == "alpha":  # opaque: the image's own pixels
    np.testing.assert_array_equal(saved[:2], rgb[:2])
  with pytest.raises(ValueError, match="^ComfyUI's composite pastes the whole picture back"):
    dataclasses.replace(options, overlay=True).check()


@pytest.mark.parametrize(("shape", "low", "high"), [((7, 9), 0.9, 1.0), ((7, 9), 0.25, 0.75),
                                                    ((3, 2), 0.0, 0.1), ((1, 5), 0.4, 0.6)])
def test_weighted_histogram_filter_as_a1111(shape, low, high):
  """The vectorised filter against A1111's, pixel by pixel: windows cut at the edges, ties
  (repeated values), the narrow range widened to 1 and pushed back inside the stack at either
  end."""
  import soft_inpainting_reference as ref  # noqa: PLC0415

  rng = np.random.default_rng(shape[0] * 10 + int(low * 10))
  image = rng.choice(rng.uniform(0, 3, 5), shape).astype(np.float32)  # few values: ties
  image[0, 0] = 0
  ours = masks.weighted_histogram_filter(image, low, high)
  expected = ref.histogram_filter(image, low, high)
  assert ours.dtype == np.float32
  np.testing.assert_allclose(ours, expected, rtol=1e-6, atol=1e-7)
  if shape == (7, 9):  # not the identity, nor the mean
    assert np.abs(ours - image).max() > 0.1


@pytest.mark.parametrize("settings", [(1, 0.5, 4, 0, 0.5, 2), (1, 1.5, 4, 0.6, 0.8, 3.5)])
def test_soft_overlay_as_a1111(settings):
  """`soft_overlay` (and `soft_latent_mask`) against A1111's apply_adaptive_masks: the latent
  mask's bias (with mask influence), the two filters, the contrast curve, 8-bit levels,
  "Resize and fill" to the image's size, the blur. Its mask is black where the latents did not
  move (the original pasted back), white where they moved far."""
  import soft_inpainting_reference as ref  # noqa: PLC0415
  import torch  # noqa: PLC0415

  rng = np.random.default_rng(9)
  mask = np.zeros((48, 64), np.float32)
  mask[10:40, 16:50] = 1
  mask = np.asarray(Image.fromarray((mask * 255).astype(np.uint8)).filter(
      ImageFilter.GaussianBlur(6)), np.float32) / 255
  latent = masks.soft_latent_mask(mask[..., None], (6, 8))
  image = Image.fromarray(np.round(mask * 255).astype(np.uint8)).convert("RGB")
  expected_latent = np.asarray(image.resize((8, 6)), np.float32)[..., 0] / 255
  np.testing.assert_array_equal(latent, expected_latent)
  assert ((latent > 0.05) & (latent < 0.95)).any()  # graded: not rounded
  distance = (rng.uniform(0, 1.5, (6, 8)) * latent).astype(np.float32)
  soft = masks.SoftInpainting(*settings)
  ours = masks.soft_overlay(distance, latent, soft, 48, 64)
  expected = ref.overlay_mask(torch.from_numpy(latent), torch.from_numpy(distance), settings,
                              64, 48)
  assert ours.mode == "L" and ours.size == (64, 48)
  diff = np.abs(np.asarray(ours, int) - np.asarray(expected, int))
  assert diff.max() <= 1 and (diff > 0).mean() < 0.01
  assert np.asarray(ours).min() < 40 and np.asarray(ours).max() > 200


def test_soft_inpainting_settings():
  """'on' is A1111's defaults; six numbers in its order; out of its sliders' ranges, a clear
  error; the infotext's labels are its extension's."""
  assert masks.soft_inpainting("on") == masks.SoftInpainting()
  assert masks.soft_inpainting(None) is None
  soft = masks.soft_inpainting("2, 0.75, 8, 0.25, 1, 3")
  assert soft == masks.SoftInpainting(2, 0.75, 8, 0.25, 1, 3)
  assert soft.a1111_parameters() == {
      "Soft inpainting enabled": "True", "Soft inpainting schedule bias": "2",
      "Soft inpainting preservation strength": "0.75",
      "Soft inpainting transition contrast boost": "8", "Soft inpainting mask influence": "0.25",
      "Soft inpainting difference threshold": "1", "Soft inpainting difference contrast": "3"}
  for bad, match in (("1,2,3", "six numbers"), ("1,2,3,4,5,x", "must be numbers"),
                     ("1,0.5,0.5,0,0.5,2", r"transition_contrast_boost must be a number in "
                                           r"\[1, 32\]"),
                     ("1,0.5,4,2,0.5,2", "mask_influence")):
    with pytest.raises(ValueError, match=match):
      masks.soft_inpainting(bad)


def test_soft_inpainting_only_masked():
  """Soft inpainting with "Only masked": `Prepared.finish` makes the overlay mask at the
  sampler's size from the distance map, uncrops it into the original (black outside the box)
  and pastes the original over the uncropped result, as A1111's post_sample and apply_overlay;
  outside the box the original's own pixels."""
  import soft_inpainting_reference as ref  # noqa: PLC0415
  import torch  # noqa: PLC0415

  rng = np.random.default_rng(4)
  original = _image(rng, 40, 56)
  mask = _mask(rng, 40, 56, (20, 10, 40, 30), blur=3)
  soft = masks.SoftInpainting(1, 0.5, 4, 0.3, 0.5, 2)
  prepared = masks.prepare(original, mask, 32, 48, masks.MaskOptions(padding=4, soft=soft))
  assert prepared.crop is not None and prepared.soft == soft
  generated = rng.integers(0, 256, (32, 48, 3), np.uint8)
  distance = rng.uniform(0, 1.2, (4, 6)).astype(np.float32)
  distance[:, :2] = 0
  ours = prepared.finish(generated, distance)

  latent = masks.soft_latent_mask(prepared.mask, (4, 6))
  small = ref.overlay_mask(torch.from_numpy(latent), torch.from_numpy(distance),
                           dataclasses.astuple(soft), 48, 32)
  x1, y1, x2, y2 = prepared.crop
  box = (x1, y1, x2 - x1, y2 - y1)
  whole_mask = ref.uncrop(small, original.size, box).convert("L")
  placed = ref.uncrop(Image.fromarray(generated), original.size, box)
  expected = ref.composite(placed, original, whole_mask)
  assert ours.shape == (40, 56, 3)
  np.testing.assert_array_equal(ours, np.asarray(expected))
  outside = np.ones((40, 56), bool)
  outside[y1:y2, x1:x2] = False
  np.testing.assert_array_equal(ours[outside], np.asarray(original)[outside])
  inside = np.asarray(whole_mask)[~outside]
  assert inside.min() < 64 and inside.max() > 192
  with pytest.raises(ValueError, match="needs the latents' distance map"):
    prepared.finish(generated)
