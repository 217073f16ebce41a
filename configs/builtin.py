"""sdjax's built-in shapes model (64x64), the default of main.py.

  python main.py --prompt "a red circle in the center on a blue background"

Steps, guidance and scheduler are left to the model: its `sdjax_defaults.json` holds the setting
that draws the cleanest shapes (model card, Evaluation); flags still override them.
"""

import ml_collections
from ml_collections import config_dict


def get_config():
  c = ml_collections.ConfigDict()
  c.model = config_dict.placeholder(str)  # None: sdjax.BUILTIN_MODEL
  c.steps = config_dict.placeholder(int)  # None: the model's sdjax_defaults.json
  c.guidance_scale = config_dict.placeholder(float)
  c.scheduler = config_dict.placeholder(str)
  c.height = 64
  c.width = 64
  c.batch_size = 8
  c.dtype = "float32"
  return c
