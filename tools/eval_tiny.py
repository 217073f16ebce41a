r"""Judges the built-in shapes model: generates canonical prompts and classifies the pixels.

  python tools/eval_tiny.py                      # held-out prompts, generate()'s defaults
                                                 # (the model's own: sdjax_defaults.json)
  python tools/eval_tiny.py --split all --steps 20 --guidance_scale 4 --grid /tmp/grid.png

Prints per-attribute rates (foreground color, background color, shape, position), the rate
of images with all four right and how clean the shapes are (`shapes.shape_iou`: mean and 5th
percentile per shape). The classifier is `sdjax.training.shapes.classify` (pixel rules, no model).
"""

import json
import os
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_MODEL = flags.DEFINE_string("model", None, "model folder (default: sdjax.BUILTIN_MODEL)")
_SPLIT = flags.DEFINE_enum("split", "held_out", ["held_out", "trained", "all"],
                           "which canonical prompts: held_out ones never appeared in training")
_SEED = flags.DEFINE_integer("seed", 20261126, "image i uses seed + i (training used others)")
_STEPS = flags.DEFINE_integer("steps", None, "denoising steps (default: generate()'s, the model's)")
_GUIDANCE = flags.DEFINE_float("guidance_scale", None, "CFG scale (default: generate()'s)")
_SCHEDULER = flags.DEFINE_string("scheduler", None, "scheduler (default: the model's)")
_BATCH = flags.DEFINE_integer("batch", 64, "images per generate call")
_LIMIT = flags.DEFINE_integer("limit", None, "only the first N prompts")
_GRID = flags.DEFINE_string("grid", None, "also write the first 64 images as a PNG grid")
_VAE = flags.DEFINE_integer("vae", 0, "instead: score N random images through the VAE alone")
_JSON = flags.DEFINE_bool("json", False, "print one JSON line")
_CARD = flags.DEFINE_bool("card", False, "also record the result in the model folder's README.md "
                          "(its Evaluation section lists one line per distinct setting)")


def _write_grid(path, images, columns=8):
  import numpy as np  # noqa: PLC0415
  from PIL import Image  # noqa: PLC0415

  images = np.asarray(images)
  rows = -(-len(images) // columns)
  pad = np.zeros((rows * columns - len(images), *images.shape[1:]), images.dtype)
  cells = np.concatenate([images, pad]).reshape(rows, columns, *images.shape[1:])
  sheet = cells.transpose(0, 2, 1, 3, 4).reshape(rows * images.shape[1], -1, 3)  # rows*H, cols*W, 3
  Image.fromarray((sheet * 255).round().astype(np.uint8)).save(path)


_RATES = ("color", "background", "shape", "position", "all")
_IOUS = tuple(f"iou_{s}_{k}" for s in ("circle", "square", "triangle", "all")
              for k in ("mean", "p5"))


def _record(folder, result):
  """Adds (or replaces) this setting's rows under the card's "## Evaluation" heading: one in the
  attribute table, one in the shape-cleanliness (IoU) table."""
  path = os.path.join(folder, "README.md")
  text = open(path, encoding="utf-8").read()
  head, _, tail = text.partition("## Evaluation\n")
  setting = (f"| {result['split']} | {result['prompts']} | {result['seed']} | "
             f"{result.get('steps', 'default')} | {result.get('guidance_scale', 'default')} | "
             f"{result.get('scheduler', 'default')} |")
  tables = []
  for keys in (_RATES, _IOUS):
    width = 6 + len(keys)  # setting cells, then one per value
    rows = [x for x in tail.splitlines()
            if x.startswith("| ") and x.count("|") == width + 1 and not x.startswith("| split")]
    row = setting + "".join(f" {result[k]:.3f} |" for k in keys)
    tables.append([x for x in rows if not x.startswith(setting)] + [row])
  columns = "| split | prompts | seed | steps | guidance | scheduler |"
  body = ["Canonical prompts, one image each (image i seeded `seed + i`), judged by "
          "`sdjax.training.shapes.classify`; command: `python tools/eval_tiny.py --split SPLIT "
          "[--steps N --guidance_scale G --scheduler S]`. Held-out prompts never appeared in "
          "training.", "",
          columns + " color | background | shape | position | all four |",
          "|---|---|---|---|---|---|---|---|---|---|---|", *tables[0], "",
          "Shape cleanliness: per image, the intersection over union of the shape's pixel mask "
          "with the ideal shape of its class fitted to it (same area and centroid, drawn as the "
          "training images are: `sdjax.training.shapes.shape_iou`); mean and 5th percentile per "
          "asked-for shape. Rendered training images score 0.99.", "",
          columns + " circle | circle p5 | square | square p5 | triangle | triangle p5 | all "
          "| all p5 |", "|" + "---|" * 14, *tables[1], ""]
  with open(path, "w", encoding="utf-8") as f:
    f.write(head + "## Evaluation\n\n" + "\n".join(body))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  import sdjax  # noqa: PLC0415
  from sdjax import sampling, schedulers  # noqa: PLC0415
  from sdjax.training import shapes  # noqa: PLC0415

  pipe = sdjax.load_pipeline(_MODEL.value)
  if _VAE.value:
    result = {"vae_images": _VAE.value, "seed": _SEED.value,
              **shapes.evaluate_reconstruction(pipe, _VAE.value, seed=_SEED.value,
                                               batch=_BATCH.value)}
    print(json.dumps(result))
    return
  prompts = shapes.canonical_prompts(_SPLIT.value)[:_LIMIT.value]
  # The settings generate() will use (the model's sdjax_defaults.json for those not given),
  # written out so that the card's rows say what they measured.
  steps, guidance, scheduler = sampling.resolve_settings(pipe, _STEPS.value, _GUIDANCE.value,
                                                         _SCHEDULER.value)
  scheduler = scheduler or schedulers.default_scheduler_name(pipe.scheduler_config)
  kwargs = {"steps": steps, "guidance_scale": float(guidance), "scheduler": scheduler}
  start = time.time()
  rates, images = shapes.evaluate(pipe, prompts, seed=_SEED.value, batch=_BATCH.value, **kwargs)
  result = {"split": _SPLIT.value, "prompts": len(prompts), "seed": _SEED.value, **kwargs,
            **rates, "seconds": round(time.time() - start, 1)}
  if _GRID.value:
    _write_grid(_GRID.value, images[:64])
  if _CARD.value:
    _record(_MODEL.value or sdjax.BUILTIN_MODEL, result)
  if _JSON.value:
    print(json.dumps(result))
  else:
    for k, v in result.items():
      print(f"{k:>15}: {v:.3f}" if isinstance(v, float) else f"{k:>15}: {v}")


if __name__ == "__main__":
  app.run(main)
