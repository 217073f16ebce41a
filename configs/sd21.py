"""Stable Diffusion 2.1 (768x768, v-prediction).

  python main.py --config configs/sd21.py --prompt "a lighthouse at dusk"
"""

import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.model = "stabilityai/stable-diffusion-2-1"
  c.steps = 50
  c.guidance_scale = 7.5
  c.scheduler = "ddim"
  c.height = 768
  c.width = 768
  c.batch_size = 1
  c.dtype = "bfloat16"
  return c
