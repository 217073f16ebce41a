"""Stable Diffusion XL base 1.0 (1024x1024, the checkpoint's Euler scheduler).

  python main.py --config configs/sdxl.py --prompt "a watercolor fox in the snow"
  python main.py --config configs/sdxl.py --model path/to/sdxl-finetune --batch_size 2 \
      --original_size 1024,1024 --crops_coords_top_left 0,0 --prompts_file prompts.jsonl
"""

import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.model = "stabilityai/stable-diffusion-xl-base-1.0"
  c.steps = 30
  c.guidance_scale = 5.0
  c.scheduler = "euler"  # the checkpoint's EulerDiscreteScheduler
  c.height = 1024
  c.width = 1024
  c.batch_size = 1
  c.dtype = "bfloat16"
  return c
