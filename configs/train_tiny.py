"""Trains sdjax's built-in shapes model (sdjax/builtin/shapes) from scratch.

  python tools/train_tiny.py --workdir /tmp/shapes_train
  python tools/train_tiny.py --workdir /tmp/smoke --config configs/train_tiny.py:smoke

Stage 1 trains the VAE (64x64x3 -> 8x8x4), stage 2 the UNet and text encoder together on the
frozen VAE's latents. Rerunning the same command resumes from the newest checkpoint. The
recipe is sized for a GPU: about 8 minutes on one H100 (the built-in model's card has the
times). A 2-core CPU took 31 s per VAE step (batch 64) and 22 s per diffusion step (batch 256):
about 100 hours, so train this on an accelerator.

  python tools/train_tiny.py --workdir /tmp/tune --output /tmp/tuned --init_from FOLDER

goes on training an exported model's UNet and text encoder (`finetune` below) under this
config's tokenizer: how the shipped model got its fixed tokenizer without a GPU.
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
  c = ml_collections.ConfigDict()
  c.models = _models()
  c.max_length = MAX_LENGTH
  # Stable Diffusion's training noise schedule; sampling defaults to DPM-Solver++(2M).
  c.scheduler = {
      "_class_name": "DPMSolverMultistepScheduler", "num_train_timesteps": 1000,
      "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
      "prediction_type": "epsilon", "timestep_spacing": "leading", "steps_offset": 1,
  }
  c.vae = _stage(steps=2500, batch=64, lr=2e-3, warmup=100, ema_decay=0.0)
  c.vae.kl_weight = 1e-5
  # Then sharper outlines: a small shape's pixels weigh as much as the flat background.
  c.vae_sharpen = _stage(steps=3500, batch=64, lr=1e-3, warmup=100, ema_decay=0.0)
  c.vae_sharpen.kl_weight = 1e-5
  c.vae_sharpen.foreground_weight = 10.0
  c.diffusion = _stage(steps=12000, batch=256, lr=1e-3, warmup=500, ema_decay=0.9995)
  for stage in (c.vae, c.vae_sharpen, c.diffusion):
    stage.checkpoint_every, stage.log_every = 1000, 100
  # The shipped model is this schedule's EMA at step 8900: its GPU lease ran out there, and
  # held-out prompts already came out right 96% of the time. None runs all `steps`.
  c.diffusion.stop_at = 8900
  # `--init_from FOLDER`: go on training an exported model's UNet and text encoder instead.
  c.finetune = _stage(steps=1000, batch=64, lr=3e-4, warmup=50, ema_decay=0.999)
  c.finetune.checkpoint_every, c.finetune.log_every = 100, 25
  c.caption_mix = {"empty": 0.1, "no_position": 0.1, "no_background": 0.1, "neither": 0.1}
  if arg == "smoke":  # a few steps of each stage: tests and quick checks
    for stage in (c.vae, c.vae_sharpen, c.diffusion, c.finetune):
      stage.steps, stage.batch_size, stage.warmup_steps = 4, 8, 1
      stage.checkpoint_every, stage.log_every = 2, 1
    c.diffusion.stop_at = None
  elif arg:
    raise ValueError(f"unknown train_tiny config variant {arg!r} (use '' or 'smoke')")
  return c
