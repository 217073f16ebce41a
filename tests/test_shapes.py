"""The shapes dataset, its caption grammar and the pixel classifier."""

import itertools

import jax
import numpy as np
import pytest

from sdjax import testing
from sdjax.training import shapes


def _attrs(n, seed=0, **kw):
  return jax.tree.map(np.asarray, shapes.sample_attributes(jax.random.key(seed), n, **kw))


def _wanted(a, i):
  return {"color": shapes.COLOR_NAMES[a["color"][i]],
          "background": shapes.COLOR_NAMES[a["background"][i]],
          "shape": shapes.SHAPES[a["shape"][i]], "position": shapes.POSITION_NAMES[a["position"][i]]}


def test_attributes_follow_the_spec():
  a = _attrs(4000)
  assert (a["color"] != a["background"]).all()
  assert set(np.unique(a["color"])) == set(range(8)) == set(np.unique(a["background"]))
  assert set(np.unique(a["shape"])) == set(range(3))
  assert ((a["width"] >= 16) & (a["width"] <= 24)).all()
  anchors = np.asarray(list(shapes.POSITIONS.values()))[a["position"]]
  assert np.abs(a["centre"] - anchors).max() <= 3
  forms = np.bincount(a["form"], minlength=5) / len(a["form"])
  np.testing.assert_allclose(forms, [0.6, 0.1, 0.1, 0.1, 0.1], atol=0.03)


def test_training_never_sees_held_out_combinations():
  a = _attrs(4000, exclude_held_out=True)
  assert not shapes.held_out(a["color"], a["shape"], a["position"], a["background"]).any()
  assert shapes.held_out(*(_attrs(4000)[k] for k in ("color", "shape", "position",
                                                      "background"))).any()
  held = shapes.canonical_prompts("held_out")
  assert len(shapes.canonical_prompts()) == 840
  assert len(held) + len(shapes.canonical_prompts("trained")) == 840
  # Every attribute value still appears among the combinations training sees.
  trained = [a for _, a in shapes.canonical_prompts("trained")]
  for key in ("color", "background", "shape", "position"):
    assert {a[key] for a in trained} == {a[key] for _, a in held} | {a[key] for a in trained}


def test_render_geometry():
  a = {"color": np.array([0, 1, 2]), "background": np.array([7, 7, 7]),
       "shape": np.array([0, 1, 2]), "position": np.array([0, 0, 0]),
       "width": np.array([20.0, 20.0, 20.0]), "centre": np.array([[32.0, 32.0]] * 3)}
  img = np.asarray(shapes.render(a))
  fg = np.abs(img - img[:, :1, :1]).sum(-1) > 1.0  # pixels fully or partly covered
  area = fg.sum((1, 2))
  assert area[1] == 400  # the square covers exactly 20x20 pixels
  assert abs(area[0] - np.pi * 100) < 40 and abs(area[2] - 200) < 40
  tri = fg[2]
  assert tri[23:28].sum() < tri[37:42].sum()  # apex up: narrow at the top


@pytest.mark.parametrize("size", [32, 40, 64])
def test_render_window_is_the_latent_aligned_window_holding_the_shape(size):
  a = {k: np.array(v) for k, v in _attrs(512, seed=3).items()}
  # The worst cases too: the widest shapes at every corner of every position's jitter.
  corners = np.asarray(list(itertools.product((-3.0, 3.0), repeat=2)))
  anchors = np.asarray(list(shapes.POSITIONS.values()))[a["position"]]
  a["centre"][:40] = anchors[:40] + corners[np.arange(40) % 4]
  a["width"][:40] = 24.0
  full = np.asarray(shapes.render(a))
  window = np.asarray(shapes.render_window(a, size))
  assert window.shape == (512, size, size, 3)
  for i in range(512):
    cut = [full[i, y:y + size, x:x + size] for y in range(0, 65 - size, 8)
           for x in range(0, 65 - size, 8)]
    assert any(np.allclose(window[i], c, atol=1e-6) for c in cut), i
    # Every covered pixel of the whole image lies in the window.
    ink = lambda img: np.abs(img - img[:1, :1]).sum()  # noqa: E731
    np.testing.assert_allclose(ink(window[i]), ink(full[i]), rtol=1e-5)
  with pytest.raises(ValueError, match="multiple of 8"):
    shapes.render_window(a, 28)


def test_classifier_reads_rendered_images():
  a = _attrs(600, seed=1)
  images = (np.asarray(shapes.render(a)) + 1) / 2
  rates = shapes.score(images, [_wanted(a, i) for i in range(600)])
  assert rates["all"] == 1.0, rates
  # The training images are the cleanest shapes there are: IoU with their fitted ideal ~0.99
  # (pixel-centre quantisation of 16-24 pixel shapes), never below 0.96.
  for name in shapes.SHAPES:
    assert rates[f"iou_{name}_mean"] >= 0.985 and rates[f"iou_{name}_p5"] >= 0.96, rates


def _disc(cx, cy, rx, ry):
  ys, xs = np.mgrid[0:64, 0:64] + 0.5
  return ((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2 <= 1


def test_fitted_shape_and_iou():
  """The fit keeps area and centroid; a wobbly outline scores lower than a clean one."""
  triangle = np.asarray(shapes._coverage(np.asarray([2]), np.asarray([20.0]),
                                         np.asarray([[30.0, 34.0]]), *(np.mgrid[0:64, 0:64][::-1]
                                                                       + 0.5)))[0]
  fitted = shapes.fitted_shape(triangle, "triangle")
  assert abs(int(fitted.sum()) - int(triangle.sum())) <= 6
  assert (fitted & triangle).sum() / (fitted | triangle).sum() >= 0.97
  rgb = np.asarray([0.9, 0.1, 0.1]), np.asarray([0.1, 0.1, 0.9])

  def paint(mask):
    return np.where(mask[..., None], rgb[0], rgb[1]).astype(np.float32)

  clean, squashed = _disc(32, 32, 10, 10), _disc(32, 32, 13, 7.7)  # both about 314 pixels
  assert shapes.shape_iou(paint(clean)) >= 0.97
  assert 0.6 < shapes.shape_iou(paint(squashed)) < 0.9
  assert shapes.shape_iou(paint(np.zeros((64, 64), bool))) == 0.0
  stats = shapes.iou_stats(np.stack([paint(clean), paint(squashed)]), ["circle", "circle"])
  assert stats["iou_circle_mean"] == pytest.approx(
      (shapes.shape_iou(paint(clean)) + shapes.shape_iou(paint(squashed))) / 2)
  assert "iou_square_mean" not in stats and stats["iou_all_p5"] <= stats["iou_all_mean"]


def test_classifier_rejects_plain_images():
  plain = np.ones((64, 64, 3), np.float32) * np.asarray(shapes.COLORS["blue"]) / 255
  got = shapes.classify(plain)
  assert got == {"color": None, "background": "blue", "shape": None, "position": None}
  rates = shapes.score(plain[None], [{"color": "red", "background": "blue", "shape": "circle",
                                      "position": "center"}])
  assert rates["background"] == 1.0 and rates["all"] == 0.0


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  folder = tmp_path_factory.mktemp("tok")
  testing.write_tokenizer(str(folder), max_length=16)
  return testing.torch_tokenizer(str(folder))


def test_caption_ids(tokenizer):
  def tokenize(texts):
    return tokenizer(texts, padding="max_length", max_length=16, truncation=True,
                     return_tensors="np")["input_ids"]

  table = shapes.caption_table(tokenize)
  empty = tokenize([""])[0]
  a = _attrs(64, seed=2)
  ids = np.asarray(shapes.caption_ids(table, empty, a))
  for i in range(64):
    c, s = shapes.COLOR_NAMES[a["color"][i]], shapes.SHAPES[a["shape"][i]]
    p, b = shapes.POSITION_NAMES[a["position"][i]], shapes.COLOR_NAMES[a["background"][i]]
    want = {0: shapes.caption(c, s, p, b), 1: shapes.caption(c, s, None, b),
            2: shapes.caption(c, s, p, None), 3: shapes.caption(c, s), 4: ""}[int(a["form"][i])]
    np.testing.assert_array_equal(ids[i], tokenize([want])[0])


def test_caption_grammar():
  assert shapes.caption("red", "circle", "top left", "blue") == (
      "a red circle in the top left on a blue background")
  assert shapes.caption("red", "circle") == "a red circle"
  words = {w for text, _ in shapes.canonical_prompts() for w in text.split()}
  assert words <= set(testing.TOKENIZER_WORDS)
  combos = {tuple(a.values()) for _, a in shapes.canonical_prompts()}
  assert len(combos) == 840 and all(len(set(itertools.islice(c, 2))) == 2 for c in combos)
