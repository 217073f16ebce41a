"""SDXL base 1.0 handing off to the SDXL refiner 1.0 for the last 20% of the schedule.

The ensemble-of-experts setup of diffusers' SDXL docs: the base denoises until 0.8 of the
schedule (`denoising_end`), the refiner finishes from its latents (`denoising_start`), with the
same steps, scheduler and guidance, in one compiled program per shape.

  python main.py --config configs/sdxl_refiner.py --prompt "a lion in the savanna, photo"
  python main.py --config configs/sdxl_refiner.py --refiner_start 0.7 --aesthetic_score 6.5 ...
"""

import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.model = "stabilityai/stable-diffusion-xl-base-1.0"
  c.refiner = "stabilityai/stable-diffusion-xl-refiner-1.0"
  c.refiner_start = 0.8
  c.steps = 40
  c.guidance_scale = 5.0
  c.scheduler = "euler"
  c.height = 1024
  c.width = 1024
  c.batch_size = 1
  c.dtype = "bfloat16"
  return c
