"""The captioned-shapes dataset the built-in model is trained on, and a pixel classifier for it.

Each 64x64 RGB image holds one filled shape on a plain background; its canonical caption is
`a {color} {shape} in the {position} on a {background} background`. Shorter captions leave the
position and/or the background out (those are then random), and the empty caption trains the
unconditional branch of classifier-free guidance.

Images are rendered on device from `jax.random` keys, so a training batch is a pure function of
(seed, step) and needs no input pipeline. Captions are tokenised once into a table indexed by
attributes and gathered in the same jitted function.
"""

from __future__ import annotations

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np

SIZE = 64
COLORS = {
    "red": (220, 40, 40),
    "orange": (245, 140, 30),
    "yellow": (240, 220, 50),
    "green": (40, 170, 70),
    "blue": (40, 90, 220),
    "purple": (140, 60, 190),
    "white": (245, 245, 245),
    "black": (25, 25, 25),
}
SHAPES = ("circle", "square", "triangle")
POSITIONS = {  # bounding-box centre (x, y), y down
    "center": (32, 32),
    "top left": (18, 18),
    "top right": (46, 18),
    "bottom left": (18, 46),
    "bottom right": (46, 46),
}
COLOR_NAMES = tuple(COLORS)
POSITION_NAMES = tuple(POSITIONS)
MIN_WIDTH, MAX_WIDTH = 16, 24
JITTER = 3  # px, each axis
# What the built-in model understands (recorded with it: `Pipeline.prompt_grammar`).
GRAMMAR = (f"'a {{color}} {{shape}} in the {{position}} on a {{background}} background' "
           f"(position and background optional) with colors {', '.join(COLOR_NAMES)}; shapes "
           f"{', '.join(SHAPES)}; positions {', '.join(POSITION_NAMES)}")
_PALETTE = np.asarray(list(COLORS.values()), np.float32)  # 8, 3
_ANCHORS = np.asarray(list(POSITIONS.values()), np.float32)  # 5, 2


def caption(color: str, shape: str, position: str | None = None,
            background: str | None = None) -> str:
  """The caption grammar; left-out attributes are dropped from the sentence."""
  text = f"a {color} {shape}"
  if position is not None:
    text += f" in the {position}"
  if background is not None:
    text += f" on a {background} background"
  return text


def held_out(color, shape, position, background):
  """About one in ten attribute combinations (by index), never shown in training.

  Every single attribute value, and most pairs, still appear in training; evaluating on these
  combinations tests prompts the model has never seen. Works on ints and on arrays.
  """
  return ((color * 3 + shape) * 5 + position + 2 * background) % 10 == 0


def canonical_prompts(split: str = "all") -> list[tuple[str, dict[str, str]]]:
  """Fully specified captions with their attributes: "all" 840 (8 x 7 x 3 x 5), "held_out" (the
  combinations training never shows) or "trained" (the rest)."""
  if split not in ("all", "held_out", "trained"):
    raise ValueError(f"split must be all, held_out or trained, got {split!r}")
  out = []
  for (c, color), (b, background), (s, shape), (p, position) in itertools.product(
      enumerate(COLOR_NAMES), enumerate(COLOR_NAMES), enumerate(SHAPES),
      enumerate(POSITION_NAMES)):
    if color == background or (split != "all" and held_out(c, s, p, b) != (split == "held_out")):
      continue
    attrs = {"color": color, "background": background, "shape": shape, "position": position}
    out.append((caption(color, shape, position, background), attrs))
  return out


# -- rendering -------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class CaptionMix:
  """How often training captions leave attributes out (the rest are canonical)."""

  empty: float = 0.1
  no_position: float = 0.1
  no_background: float = 0.1
  neither: float = 0.1


def sample_attributes(key, n: int, mix: CaptionMix = CaptionMix(),
                      exclude_held_out: bool = False) -> dict[str, jax.Array]:
  """Random attributes for `n` images: indices, box width, centre and which caption form.

  With `exclude_held_out` (training), a held-out combination moves to the next position, which
  never is held out itself.
  """
  keys = jax.random.split(key, 7)
  color = jax.random.randint(keys[0], (n,), 0, len(COLORS))
  background = jax.random.randint(keys[1], (n,), 0, len(COLORS) - 1)
  background = background + (background >= color)  # never the shape's color
  shape = jax.random.randint(keys[2], (n,), 0, len(SHAPES))
  position = jax.random.randint(keys[3], (n,), 0, len(POSITIONS))
  if exclude_held_out:
    position = jnp.where(held_out(color, shape, position, background),
                         (position + 1) % len(POSITIONS), position)
  width = jax.random.uniform(keys[4], (n,), minval=MIN_WIDTH, maxval=MAX_WIDTH)
  jitter = jax.random.uniform(keys[5], (n, 2), minval=-JITTER, maxval=JITTER)
  centre = jnp.asarray(_ANCHORS)[position] + jitter
  return {"color": color, "background": background, "shape": shape, "position": position,
          "width": width, "centre": centre, "form": sample_forms(keys[6], n, mix)}


def sample_forms(key, n: int, mix: CaptionMix = CaptionMix()) -> jax.Array:
  """Which caption form each of `n` images gets: 0 full, 1 no position, 2 no background,
  3 neither, 4 empty (see `caption_ids`)."""
  probs = jnp.asarray([1 - mix.empty - mix.no_position - mix.no_background - mix.neither,
                       mix.no_position, mix.no_background, mix.neither, mix.empty])
  return jax.random.choice(key, 5, (n,), p=probs)


def _coverage(shape, width, centre, px, py):
  """Whether pixel point (px, py) lies inside the shape: [B, ...] bool."""
  h = width[:, None, None] / 2
  dx = px - centre[:, 0, None, None]
  dy = py - centre[:, 1, None, None]
  circle = dx**2 + dy**2 <= h**2
  square = (jnp.abs(dx) <= h) & (jnp.abs(dy) <= h)
  # Apex up: the half-width grows linearly from 0 at the top edge to h at the bottom edge.
  triangle = (dy >= -h) & (dy <= h) & (jnp.abs(dx) <= (dy + h) / 2)
  return jnp.select([shape[:, None, None] == 0, shape[:, None, None] == 1],
                    [circle, square], triangle)


def render(attrs: dict[str, jax.Array], size: int = SIZE) -> jax.Array:
  """Images [B, size, size, 3] in [-1, 1]: 4x supersampled edges, flat colors."""
  grid = jnp.arange(size, dtype=jnp.float32)
  alpha = 0.0
  for ox, oy in itertools.product((0.25, 0.75), repeat=2):
    py, px = jnp.meshgrid(grid + oy, grid + ox, indexing="ij")  # size, size
    alpha = alpha + _coverage(attrs["shape"], attrs["width"], attrs["centre"], px, py) / 4
  palette = jnp.asarray(_PALETTE) / 127.5 - 1.0
  fg = palette[attrs["color"]][:, None, None, :]  # B, 1, 1, 3
  bg = palette[attrs["background"]][:, None, None, :]
  return bg + (fg - bg) * alpha[..., None]


def render_window(attrs: dict[str, jax.Array], size: int) -> jax.Array:
  """The `size`-pixel window of each `render(attrs)` image that holds its shape, cut on the
  8-pixel latent grid (a window's latents are those of the whole image's encoder, but for
  padding and the mid-block attention): [B, size, size, 3].

  Training the VAE on 32-pixel windows shows it every shape in a quarter of the pixels.
  """
  if size % 8 or not MAX_WIDTH + 2 * JITTER <= size <= SIZE:
    raise ValueError(f"window must be a multiple of 8 from {MAX_WIDTH + 2 * JITTER} to {SIZE}, "
                     f"got {size}")
  centre = attrs["centre"]
  corner = jnp.clip(jnp.round((centre - size / 2) / 8) * 8, 0, SIZE - size)
  return render({**attrs, "centre": centre - corner}, size=size)


# -- captions as token ids -------------------------------------------------------------------------
def caption_table(tokenize) -> np.ndarray:
  """Token ids of every caption: [colors, shapes, positions + 1, colors + 1, L].

  The extra position / background index stands for "left out". `tokenize` maps a list of
  strings to int ids [N, L] (a pipeline's `tokenize`).
  """
  index = list(itertools.product(range(len(COLORS)), range(len(SHAPES)),
                                 range(len(POSITIONS) + 1), range(len(COLORS) + 1)))
  texts = [
      caption(COLOR_NAMES[c], SHAPES[s], POSITION_NAMES[p] if p < len(POSITIONS) else None,
              COLOR_NAMES[b] if b < len(COLORS) else None)
      for c, s, p, b in index
  ]
  ids = np.asarray(tokenize(texts), np.int32)
  return ids.reshape(len(COLORS), len(SHAPES), len(POSITIONS) + 1, len(COLORS) + 1, -1)


def caption_ids(table: jax.Array, empty_ids: jax.Array, attrs: dict[str, jax.Array]) -> jax.Array:
  """Token ids [B, L] of each image's caption in the form `attrs["form"]` chose."""
  form = attrs["form"]
  position = jnp.where((form == 1) | (form == 3), len(POSITIONS), attrs["position"])
  background = jnp.where((form == 2) | (form == 3), len(COLORS), attrs["background"])
  ids = table[attrs["color"], attrs["shape"], position, background]
  return jnp.where((form == 4)[:, None], empty_ids[None, :], ids)


# -- judging images --------------------------------------------------------------------------------
def classify(image: np.ndarray) -> dict[str, str | None]:
  """Reads (color, background, shape, position) back from one image [H, W, 3] in [0, 1].

  Pixel-level and independent of any model: the background is the commonest palette color on
  the border, the shape's color the commonest other palette color among pixels far from the
  background, the shape's mask the pixels nearer that color than the background; position is
  the anchor nearest the mask's bounding-box centre (within 8 px), and the shape is the ideal
  circle, square or triangle drawn in that box that overlaps the mask best (intersection over
  union), which tolerates soft or slightly rounded outlines.
  """
  fg, bg, mask = _shape_mask(image)
  out = {"color": None, "background": COLOR_NAMES[bg], "shape": None, "position": None}
  if fg is None:
    return out
  out["color"] = COLOR_NAMES[fg]
  rows, cols = np.nonzero(mask.any(1))[0], np.nonzero(mask.any(0))[0]
  top, bottom, left, right = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
  centre = np.asarray([(left + right) / 2, (top + bottom) / 2])
  d = np.linalg.norm(_ANCHORS - centre, axis=-1)
  if d.min() <= 8.0:
    out["position"] = POSITION_NAMES[int(d.argmin())]
  out["shape"] = _nearest_template(mask, top, bottom, left, right)
  return out


def _shape_mask(image: np.ndarray) -> tuple[int | None, int, np.ndarray | None]:
  """(shape color, background color, shape mask [H, W] bool) as `classify` reads them; the
  shape color and mask are None when no shape stands out."""
  img = np.asarray(image, np.float32) * 255.0
  dist = np.linalg.norm(img[..., None, :] - _PALETTE, axis=-1)  # H, W, 8
  nearest = dist.argmin(-1)
  border = np.concatenate([nearest[:2].ravel(), nearest[-2:].ravel(), nearest[:, :2].ravel(),
                           nearest[:, -2:].ravel()])
  bg = int(np.bincount(border, minlength=len(COLORS)).argmax())
  far = dist[..., bg] > 60.0
  counts = np.bincount(nearest[far], minlength=len(COLORS))
  counts[bg] = 0
  if counts.sum() < 32:
    return None, bg, None
  fg = int(counts.argmax())
  return fg, bg, dist[..., fg] < dist[..., bg]


def fitted_shape(mask: np.ndarray, shape: str) -> np.ndarray:
  """The ideal `shape` fitted to `mask` [H, W] bool: drawn as `render` draws it (axis-aligned
  square, apex-up triangle as wide as tall), with the mask's area and its centroid."""
  ys, xs = np.nonzero(mask)
  area = float(len(xs))
  cx, cy = xs.mean() + 0.5, ys.mean() + 0.5  # pixel centres
  if shape == "circle":
    h = np.sqrt(area / np.pi)
  elif shape == "square":
    h = np.sqrt(area) / 2
  else:
    h = np.sqrt(area / 2)  # area (2h)^2 / 2
    cy -= h / 3  # the centroid lies a third of the way up from the base: box centre above it
  py, px = np.mgrid[0:mask.shape[0], 0:mask.shape[1]] + 0.5
  coverage = _coverage(np.asarray([SHAPES.index(shape)]), np.asarray([2 * h]),
                       np.asarray([[cx, cy]]), px, py)
  return np.asarray(coverage[0])


def shape_iou(image: np.ndarray) -> float:
  """How clean the shape in `image` is: the intersection over union of its mask (as `classify`
  reads it) with `fitted_shape` of the class `classify` gives it; 0 when no shape is found."""
  fg, _, mask = _shape_mask(image)
  if fg is None:
    return 0.0
  rows, cols = np.nonzero(mask.any(1))[0], np.nonzero(mask.any(0))[0]
  shape = _nearest_template(mask, rows[0], rows[-1] + 1, cols[0], cols[-1] + 1)
  ideal = fitted_shape(mask, shape)
  return float((mask & ideal).sum() / (mask | ideal).sum())


def iou_stats(images: np.ndarray, asked: list[str]) -> dict[str, float]:
  """Mean and 5th percentile of `shape_iou` per asked-for shape, and over all images."""
  ious = np.asarray([shape_iou(image) for image in images])
  asked = np.asarray(asked)
  out = {}
  for name in (*SHAPES, "all"):
    values = ious if name == "all" else ious[asked == name]
    if len(values):
      out[f"iou_{name}_mean"] = float(values.mean())
      out[f"iou_{name}_p5"] = float(np.percentile(values, 5))
  return out


def _nearest_template(mask, top, bottom, left, right) -> str:
  """The shape whose ideal outline, drawn in the mask's bounding box, overlaps it best (IoU)."""
  ys, xs = np.mgrid[0:mask.shape[0], 0:mask.shape[1]] + 0.5  # pixel centres
  cx, cy = (left + right) / 2, (top + bottom) / 2
  hx, hy = (right - left) / 2, (bottom - top) / 2
  inside = (xs >= left) & (xs <= right) & (ys >= top) & (ys <= bottom)
  templates = {
      "circle": ((xs - cx) / hx) ** 2 + ((ys - cy) / hy) ** 2 <= 1.0,
      "square": inside,
      "triangle": inside & (np.abs(xs - cx) <= hx * (ys - top) / (2 * hy)),
  }
  iou = {k: (mask & t).sum() / max((mask | t).sum(), 1) for k, t in templates.items()}
  return max(iou, key=iou.get)


def score(images: np.ndarray, attrs: list[dict[str, str]]) -> dict[str, float]:
  """Per-attribute and all-correct rates of `images` against the attributes they were asked for."""
  keys = ("color", "background", "shape", "position")
  hits = np.zeros((len(attrs), len(keys)), bool)
  for i, (image, want) in enumerate(zip(images, attrs, strict=True)):
    got = classify(image)
    hits[i] = [got[k] == want[k] for k in keys]
  rates = {k: float(hits[:, j].mean()) for j, k in enumerate(keys)}
  rates["all"] = float(hits.all(1).mean())
  return {**rates, **iou_stats(images, [a["shape"] for a in attrs])}


def evaluate(pipe, prompts: list[tuple[str, dict[str, str]]], *, seed: int, batch: int = 64,
             **generate_kwargs) -> tuple[dict[str, float], np.ndarray]:
  """Generates one image per prompt (image i with seed `seed + i`) and scores them.

  Prompts go through `pipe.generate` in batches of `batch` (the last one padded, so one shape
  compiles). Returns the rates of `score` and the images.
  """
  texts = [p for p, _ in prompts]
  images = []
  for start in range(0, len(texts), batch):
    chunk = texts[start:start + batch]
    padded = chunk + [chunk[-1]] * (batch - len(chunk))
    out = pipe.generate(padded, seed=seed + start, **generate_kwargs)
    images.append(out[:len(chunk)])
  images = np.concatenate(images)
  return score(images, [a for _, a in prompts]), images


def evaluate_reconstruction(pipe, n: int, *, seed: int, batch: int = 64) -> dict[str, float]:
  """Scores the VAE alone: `n` random images (all attribute combinations) through encode (the
  posterior mean) and decode. The diffusion model can only be as right as this."""
  vae = pipe.vae

  @jax.jit
  def roundtrip(params, key):
    attrs = sample_attributes(key, batch)
    z = vae.apply({"params": params}, render(attrs), method=vae.encode).mean
    return vae.apply({"params": params}, z, method=vae.decode), attrs

  images, wanted = [], []
  for i in range(-(-n // batch)):
    out, attrs = roundtrip(pipe.params["vae"], jax.random.fold_in(jax.random.key(seed), i))
    images.append(np.clip((np.asarray(out, np.float32) + 1) / 2, 0, 1))
    idx = {k: np.asarray(attrs[k]) for k in ("color", "background", "shape", "position")}
    wanted += [{"color": COLOR_NAMES[idx["color"][j]], "background": COLOR_NAMES[idx["background"][j]],
                "shape": SHAPES[idx["shape"][j]], "position": POSITION_NAMES[idx["position"][j]]}
               for j in range(batch)]
  return score(np.concatenate(images)[:n], wanted[:n])
