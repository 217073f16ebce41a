"""Stable Diffusion 2.1-base (512x512, epsilon prediction).

  python main.py --config configs/sd21_base.py --prompt "a lighthouse at dusk"
"""

import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.model = "stabilityai/stable-diffusion-2-1-base"
  c.steps = 50
  c.guidance_scale = 7.5
  c.scheduler = "ddim"
  c.height = 512
  c.width = 512
  c.batch_size = 1
  c.dtype = "bfloat16"
  return c
