"""Training: optax optimisers, data-parallel jitted steps, EMA, orbax checkpoints with exact resume.

A stage is a loss `loss_fn(params, frozen, key) -> (loss, metrics)` over trainable params; the
batch is made inside the loss from `key` (see `sdjax.training.shapes`), so a step is a pure function of
(state, frozen, seed) and a resumed run replays the same keys. Params and optimiser state are
replicated over a 1-D mesh of every device; the batch is split along it, so `jax.jit` turns the
gradient into a data-parallel all-reduce.

Two losses make Stable Diffusion: `vae_loss` (reconstruction + KL, stage 1) and `diffusion_loss`
(noise prediction on the frozen VAE's latents, UNet and text encoder trained together, stage 2).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

from sdjax import parallel
from sdjax.schedulers import common

LossFn = Callable[[Any, Any, jax.Array], tuple[jax.Array, dict[str, jax.Array]]]


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: optimizer steps taken
  params: Any
  opt_state: Any
  ema: Any  # exponential moving average of params (None when disabled)


def make_optimizer(cfg) -> optax.GradientTransformation:
  """AdamW on a linear warm-up + cosine decay schedule, after global-norm gradient clipping.

  `cfg` needs: learning_rate, warmup_steps, steps, weight_decay, grad_clip, end_lr_factor.
  """
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, cfg.learning_rate, cfg.warmup_steps, cfg.steps, cfg.learning_rate * cfg.end_lr_factor)
  return optax.chain(optax.clip_by_global_norm(cfg.grad_clip),
                     optax.adamw(schedule, b1=0.9, b2=0.999, weight_decay=cfg.weight_decay))


def ema_update(ema, params, step, decay: float):
  """EMA with the usual warm-up: the decay is min(decay, (1 + step) / (10 + step))."""
  d = jnp.minimum(decay, (1.0 + step) / (10.0 + step))
  return jax.tree.map(lambda e, p: d * e + (1 - d) * p, ema, params)


def init_state(params, optimizer, ema_decay: float) -> TrainState:
  params = jax.tree.map(jnp.copy, params)  # the step donates its state; callers keep theirs
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=optimizer.init(params),
                    ema=jax.tree.map(jnp.copy, params) if ema_decay > 0 else None)


def make_train_step(loss_fn: LossFn, optimizer, mesh: Mesh, ema_decay: float, seed: int):
  """A jitted `step(state, frozen) -> (state, metrics)`; its key is fold_in(seed, state.step)."""

  def step(state: TrainState, frozen):
    key = jax.random.fold_in(jax.random.key(seed), state.step)
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, frozen, key)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = state.ema
    if ema is not None:
      ema = ema_update(ema, params, state.step.astype(jnp.float32), ema_decay)
    metrics = {**metrics, "loss": loss, "grad_norm": optax.tree_utils.tree_norm(grads)}
    return TrainState(state.step + 1, params, opt_state, ema), metrics

  replicated = NamedSharding(mesh, P())
  return jax.jit(step, in_shardings=(replicated, replicated),
                 out_shardings=(replicated, replicated), donate_argnums=0)


_last_step: list = []  # [(key, step_fn)]: the latest compiled step, for a fit that resumes


def _cached_train_step(loss_fn, optimizer, mesh: Mesh, cfg):
  """`make_train_step`, reused when the same loss and settings train again in this process
  (a resumed or repeated fit): one compile instead of one per call. Only the latest is kept, so
  nothing a finished stage closed over stays alive."""
  key = (loss_fn, mesh, cfg.ema_decay, cfg.seed, cfg.learning_rate, cfg.warmup_steps, cfg.steps,
         cfg.end_lr_factor, cfg.weight_decay, cfg.grad_clip)
  if not _last_step or _last_step[0][0] != key:
    _last_step[:] = [(key, make_train_step(loss_fn, optimizer, mesh, cfg.ema_decay, cfg.seed))]
  return _last_step[0][1]


def shard_rows(x, mesh: Mesh):
  """Splits a batch made inside a jitted step along the mesh's data axis."""
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(parallel.DATA)))


# -- the loop --------------------------------------------------------------------------------------
def _checkpoint_manager(workdir: str, every: int) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=2, save_interval_steps=every, create=True)
  return ocp.CheckpointManager(os.path.abspath(workdir), options=options)


def fit(loss_fn: LossFn, params, frozen, cfg, workdir: str, *, mesh: Mesh | None = None,
        desc: str = "train", stop_at: int | None = None,
        deadline: float | None = None) -> tuple[TrainState, list[float]]:
  """Trains `params` for `cfg.steps` steps, resuming from the newest checkpoint in `workdir`.

  `cfg` holds the optimizer's fields (see `make_optimizer`) and seed, ema_decay,
  checkpoint_every, log_every. `stop_at` ends this call after that step with a checkpoint (a
  long run split into sessions); so does passing `deadline` (a `time.time()` value), checked at
  each logged step; Ctrl-C also checkpoints before it stops. Returns the state and the loss of
  every step this call ran (`workdir/metrics.jsonl` gets one line per logged step).

  The host reads the loss only at logged steps, so the device runs ahead of Python in between.
  """
  mesh = mesh or parallel.make_mesh()
  optimizer = make_optimizer(cfg)
  state = init_state(params, optimizer, cfg.ema_decay)
  state = jax.device_put(state, NamedSharding(mesh, P()))
  frozen = jax.device_put(frozen, NamedSharding(mesh, P()))
  manager = _checkpoint_manager(workdir, cfg.checkpoint_every)
  start = manager.latest_step()
  if start is not None:
    state = manager.restore(start, args=ocp.args.StandardRestore(state))
    logging.info("%s: resumed at step %d from %s", desc, start, workdir)
  step_fn = _cached_train_step(loss_fn, optimizer, mesh, cfg)
  end = cfg.steps if stop_at is None else min(stop_at, cfg.steps)
  losses, pending, t0 = [], [], time.time()
  try:
    with tqdm(total=cfg.steps, initial=int(state.step), desc=desc, dynamic_ncols=True) as bar:
      for step in range(int(state.step) + 1, end + 1):
        state, metrics = step_fn(state, frozen)
        pending.append(metrics["loss"])
        last = step == end or (deadline is not None and step % cfg.log_every == 0
                               and time.time() > deadline)
        if step % cfg.log_every == 0 or last:
          window = [float(x) for x in pending]  # waits for the device
          pending = []
          if not np.all(np.isfinite(window)):
            raise FloatingPointError(f"{desc}: loss is {window[-1]} by step {step}")
          losses += window
          bar.update(len(window))
          bar.set_postfix(loss=f"{np.mean(window):.4f}")
          _log_metrics(workdir, step, np.mean(window), metrics, time.time() - t0)
        manager.save(step, args=ocp.args.StandardSave(state), force=last)
        if last:
          if step < end:
            logging.warning("%s: out of time, stopped at step %d of %d", desc, step, cfg.steps)
          break
  except KeyboardInterrupt:
    try:  # the state is gone if the interrupt came while a step held its donated buffers
      if manager.latest_step() != int(state.step):
        manager.save(int(state.step), args=ocp.args.StandardSave(state), force=True)
    except RuntimeError:
      logging.warning("%s: interrupted mid-step; resume from step %s", desc, manager.latest_step())
    raise
  finally:
    manager.wait_until_finished()
    manager.close()
  return state, losses


def _log_metrics(workdir, step, loss, metrics, seconds) -> None:
  record = {"step": step, "loss": float(loss), "seconds": round(seconds, 1),
            **{k: float(v) for k, v in metrics.items() if k != "loss"}}
  with open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8") as f:
    f.write(json.dumps(record) + "\n")


# -- Stable Diffusion's two losses -----------------------------------------------------------------
def vae_loss(vae, make_images, batch: int, kl_weight: float, mesh: Mesh,
             foreground_weight: float = 0.0) -> LossFn:
  """Stage 1: per-pixel L1 + L2 reconstruction of a posterior sample, plus a weighted KL.

  The KL is normalised per pixel value like the reconstruction, so `kl_weight` compares the two
  directly (Stable Diffusion's VAE used 1e-6 against a summed reconstruction loss). With
  `foreground_weight` > 0, pixels that differ from the image's corner (the background, in the
  shapes data) weigh 1 + foreground_weight: a small shape's outline otherwise counts for little
  against a large flat background.
  """

  def loss_fn(params, frozen, key):
    del frozen
    data_key, sample_key = jax.random.split(key)
    x = shard_rows(make_images(data_key, batch), mesh)  # B, H, W, 3
    recon, posterior = vae.apply({"params": params}, x, sample_key)
    err = recon.astype(jnp.float32) - x
    foreground = jnp.abs(x - x[:, :1, :1, :]).max(-1, keepdims=True) > 0.02  # B, H, W, 1
    w = 1.0 + foreground_weight * foreground
    w = w / w.mean()
    l1, l2 = (w * jnp.abs(err)).mean(), (w * jnp.square(err)).mean()
    kl = posterior.kl().mean() / np.prod(x.shape[1:])
    return l1 + l2 + kl_weight * kl, {"l1": l1, "kl": kl}

  return loss_fn


def noise_schedule(scheduler_config: dict[str, Any]) -> np.ndarray:
  """alphas_cumprod [T] of the training noise schedule, computed as diffusers does."""
  cfg = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02,
         "beta_schedule": "linear", "trained_betas": None, **scheduler_config}
  return common.make_alphas_cumprod(cfg)


def diffusion_loss(unet, text_encoder, make_batch, batch: int, scheduler_config, mesh: Mesh,
                   scaling: float) -> LossFn:
  """Stage 2: predict the noise added to frozen-VAE latents at a uniform random timestep.

  Trainable params are {"unet", "text_encoder"}. `make_batch(key, n, frozen)` returns (latents
  [n, h, w, C], posterior samples before `scaling`; caption token ids [n, L]), split over the
  mesh: it encodes rendered images with the VAE params in `frozen`, or draws from latents
  encoded once beforehand (see `sdjax.training.recipe`).
  """
  alphas_cumprod = jnp.asarray(noise_schedule(scheduler_config))
  prediction = scheduler_config.get("prediction_type", "epsilon")
  if prediction != "epsilon":
    raise ValueError(f"training supports prediction_type 'epsilon', got {prediction!r}")

  def loss_fn(params, frozen, key):
    data_key, t_key, noise_key = jax.random.split(key, 3)
    latents, ids = make_batch(data_key, batch, frozen)
    x0 = jax.lax.stop_gradient(latents) * scaling  # B, h, w, C
    t = jax.random.randint(t_key, (batch,), 0, alphas_cumprod.shape[0])
    noise = jax.random.normal(noise_key, x0.shape, jnp.float32)
    a = alphas_cumprod[t][:, None, None, None]
    xt = jnp.sqrt(a) * x0 + jnp.sqrt(1.0 - a) * noise
    ctx = text_encoder.apply({"params": params["text_encoder"]}, ids)["last_hidden_state"]
    eps = unet.apply({"params": params["unet"]}, xt, t.astype(jnp.float32), ctx)
    mse = jnp.square(eps.astype(jnp.float32) - noise).mean()
    return mse, {}

  return loss_fn


def latent_scaling_factor(vae, vae_params, images: jax.Array, key) -> float:
  """1 / std of posterior samples: gives the diffusion model unit-variance latents."""
  posterior = jax.jit(lambda p, x: vae.apply({"params": p}, x, method=vae.encode))(vae_params,
                                                                                  images)
  return float(1.0 / jnp.std(posterior.sample(key)))
