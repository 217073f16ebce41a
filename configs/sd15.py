"""Stable Diffusion 1.5 (512x512, epsilon prediction).

  python main.py --config configs/sd15.py --model path/to/stable-diffusion-v1-5 \
      --prompt "a watercolor fox in the snow"
"""

import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.model = "stable-diffusion-v1-5/stable-diffusion-v1-5"
  c.steps = 50
  c.guidance_scale = 7.5
  c.scheduler = "pndm"
  c.height = 512
  c.width = 512
  c.batch_size = 1
  c.dtype = "bfloat16"
  return c
