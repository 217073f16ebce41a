r"""Trains sdjax's built-in shapes model and exports it (see configs/train_tiny.py).

  python tools/train_tiny.py --workdir /tmp/shapes_train --output sdjax/builtin/shapes

Rerun the same command to resume an interrupted run from its newest checkpoint.
"""

import os
import sys

from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sdjax.training import recipe  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(__file__), "..", "configs", "train_tiny.py"),
    "Training config.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, metrics and summary go here.",
                               required=True)
_OUTPUT = flags.DEFINE_string("output", None,
                              "Where to write the trained diffusers-format folder (optional).")
_INIT_FROM = flags.DEFINE_string(
    "init_from", None, "Instead of training from scratch, fine-tune this exported model's UNet "
    "and text encoder (config.finetune), with the config's tokenizer.")
_MAX_MINUTES = flags.DEFINE_float(
    "max_minutes", None, "Stop the diffusion stage (checkpointed; rerun to go on) once the run "
    "has taken this long, and export what it has.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  max_seconds = None if _MAX_MINUTES.value is None else 60 * _MAX_MINUTES.value
  recipe.run(_CONFIG.value, _WORKDIR.value, _OUTPUT.value, max_seconds, _INIT_FROM.value)


if __name__ == "__main__":
  app.run(main)
