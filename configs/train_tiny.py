"""Trains sdjax's built-in shapes model (sdjax/builtin/shapes) from scratch.

  python tools/train_tiny.py --workdir /tmp/shapes_train --output /tmp/shapes
  python tools/train_tiny.py --workdir /tmp/smoke --config configs/train_tiny.py:smoke

Stage 1 trains the VAE (64x64x3 -> 8x8x4), stage 2 the UNet and text encoder together on the
frozen VAE's latents. Rerunning the same command resumes from the newest checkpoint.

The default recipe (`_cpu_recipe`) is sized for a 2-core CPU: about an hour, measured in
BENCHMARKS.md. `:gpu` is the larger recipe the first shipped model came from: about 8 minutes
on one H100, about 100 hours on 2 CPU cores.

  python tools/train_tiny.py --workdir /tmp/tune --output /tmp/tuned --init_from FOLDER

goes on training an exported model's UNet and text encoder (`finetune` below) under this
config's tokenizer: how the first shipped model got its fixed tokenizer without a GPU.
"""

import ml_collections

# One caption token per word, so 16 positions fit the longest caption with BOS/EOS.
MAX_LENGTH = 16


def _models():
  return {
      "vae": {
          "in_channels": 3, "out_channels": 3, "latent_channels": 4,
          "down_block_types": ["DownEncoderBlock2D"] * 4,
          "up_block_types": ["UpDecoderBlock2D"] * 4,
          "block_out_channels": [32, 64, 64, 64],
          # 4 channels per group at full resolution: with one channel per group, GroupNorm
          # would normalise each channel's image mean away, and with it the colors.
          "layers_per_block": 1, "norm_num_groups": 8, "sample_size": 64,
      },
      "unet": {
          "sample_size": 8, "in_channels": 4, "out_channels": 4,
          "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
          "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
          "block_out_channels": [32, 64, 64], "layers_per_block": 1,
          "cross_attention_dim": 64, "attention_head_dim": 4, "norm_num_groups": 8,
      },
      "text_encoder": {
          "hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 3,
          "num_attention_heads": 4, "max_position_embeddings": MAX_LENGTH,
          "hidden_act": "quick_gelu",
      },
  }


def _stage(steps, batch, lr, warmup, ema_decay):
  return ml_collections.ConfigDict({
      "steps": steps, "batch_size": batch, "learning_rate": lr, "warmup_steps": warmup,
      "end_lr_factor": 0.05, "weight_decay": 0.01, "grad_clip": 1.0, "ema_decay": ema_decay,
      "checkpoint_every": 250, "log_every": 25, "seed": 0,
  })


def get_config(arg: str = ""):
  """"" (the recipe sized for a 2-core CPU), "gpu" (the larger one the first shipped model
  came from) or "smoke" (a few steps of each stage, for tests)."""
  c = ml_collections.ConfigDict()
  c.models = _models()
  c.max_length = MAX_LENGTH
  # Stable Diffusion's training noise schedule; sampling defaults to DPM-Solver++(2M).
  c.scheduler = {
      "_class_name": "DPMSolverMultistepScheduler", "num_train_timesteps": 1000,
      "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
      "prediction_type": "epsilon", "timestep_spacing": "leading", "steps_offset": 1,
  }
  c.caption_mix = {"empty": 0.1, "no_position": 0.1, "no_background": 0.1, "neither": 0.1}
  # `--init_from FOLDER`: go on training an exported model's UNet and text encoder instead.
  c.finetune = _stage(steps=1000, batch=64, lr=3e-4, warmup=50, ema_decay=0.999)
  c.finetune.checkpoint_every, c.finetune.log_every = 100, 25
  if arg in ("", "smoke"):
    _cpu_recipe(c)
  elif arg == "gpu":
    _gpu_recipe(c)
  else:
    raise ValueError(f"unknown train_tiny config variant {arg!r} (use '', 'gpu' or 'smoke')")
  if arg == "smoke":  # a few steps of each stage: tests and quick checks
    for stage in (c.vae, c.vae_sharpen, c.diffusion, c.finetune):
      stage.steps, stage.batch_size, stage.warmup_steps = 4, 8, 1
      stage.checkpoint_every, stage.log_every = 2, 1
    c.diffusion.cached_latents = 256
  return c


def _cpu_recipe(c):
  """About an hour on 2 CPU cores: the VAE learns the shapes from 32-pixel windows around them
  (a quarter of the pixels), then adapts to whole images; small batches (a CPU's step time
  grows faster than its batch); latents encoded once for stage 2."""
  c.models.vae.block_out_channels = [16, 32, 64, 64]
  c.models.vae.norm_num_groups = 4  # still 4 channels per group at full resolution
  c.vae = _stage(steps=8000, batch=16, lr=2e-3, warmup=100, ema_decay=0.0)
  c.vae.kl_weight = 1e-5
  c.vae.crop = 32
  c.vae.foreground_weight = 10.0
  c.vae_sharpen = _stage(steps=400, batch=8, lr=5e-4, warmup=50, ema_decay=0.0)
  c.vae_sharpen.kl_weight = 1e-5
  c.vae_sharpen.foreground_weight = 10.0
  c.diffusion = _stage(steps=13000, batch=32, lr=1e-3, warmup=200, ema_decay=0.999)
  c.diffusion.cached_latents = 16384
  for stage in (c.vae, c.vae_sharpen, c.diffusion):
    stage.checkpoint_every, stage.log_every = 500, 50


def _gpu_recipe(c):
  """Batches sized for an accelerator: about 8 minutes on one H100, ~100 hours on 2 cores."""
  c.vae = _stage(steps=2500, batch=64, lr=2e-3, warmup=100, ema_decay=0.0)
  c.vae.kl_weight = 1e-5
  # Then sharper outlines: a small shape's pixels weigh as much as the flat background.
  c.vae_sharpen = _stage(steps=3500, batch=64, lr=1e-3, warmup=100, ema_decay=0.0)
  c.vae_sharpen.kl_weight = 1e-5
  c.vae_sharpen.foreground_weight = 10.0
  c.diffusion = _stage(steps=12000, batch=256, lr=1e-3, warmup=500, ema_decay=0.9995)
  for stage in (c.vae, c.vae_sharpen, c.diffusion):
    stage.checkpoint_every, stage.log_every = 1000, 100
  # The first shipped model is this schedule's EMA at step 8900: its GPU lease ran out there.
  c.diffusion.stop_at = 8900
