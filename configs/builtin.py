"""sdjax's built-in shapes model (64x64), the default of main.py.

  python main.py --prompt "a red circle in the center on a blue background"
"""

import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.model = ml_collections.config_dict.placeholder(str)  # None: sdjax.BUILTIN_MODEL
  c.steps = 20
  c.guidance_scale = 4.0
  c.scheduler = "dpmpp_2m"
  c.height = 64
  c.width = 64
  c.batch_size = 8
  c.dtype = "float32"
  return c
