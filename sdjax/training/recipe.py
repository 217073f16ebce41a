"""Trains the built-in shapes model end to end and exports it as a diffusers-format folder.

`run(config, workdir, output)` is what `tools/train_tiny.py` calls; `configs/train_tiny.py`
holds the architecture and both stages' hyper-parameters. Each stage checkpoints under
`workdir/<stage>` and resumes from there, so rerunning an interrupted command continues it.
"""

from __future__ import annotations

import json
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from transformers import CLIPTokenizer

from sdjax import parallel, testing
from sdjax import pipeline as pipeline_lib
from sdjax.models.clip import CLIPTextConfig
from sdjax.models.unet import UNetConfig
from sdjax.models.vae import VAEConfig
from sdjax.training import shapes, train

# The caption grammar's words, each one BPE token.
STAGES = ("vae", "vae_sharpen", "diffusion")
SUMMARY = pipeline_lib.TRAINING_SUMMARY  # written beside the exported model: what trained it
VOCABULARY = ("a in the on background " + " ".join(shapes.COLOR_NAMES) + " " +
              " ".join(shapes.SHAPES) + " center top bottom left right").split()


def make_tokenizer(folder: str, max_length: int) -> CLIPTokenizer:
  testing.write_tokenizer(folder, VOCABULARY, max_length=max_length)
  return CLIPTokenizer.from_pretrained(folder)


def build(config, workdir: str, params=None, scaling_factor: float | None = None):
  """The pipeline the config describes (fresh params unless given)."""
  tokenizer = make_tokenizer(os.path.join(workdir, "tokenizer"), config.max_length)
  models = config.models.to_dict() if hasattr(config.models, "to_dict") else config.models
  text = {**models["text_encoder"], "vocab_size": len(tokenizer),
          "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
          "pad_token_id": tokenizer.pad_token_id}
  vae = dict(models["vae"])
  if scaling_factor is not None:
    vae["scaling_factor"] = scaling_factor
  return pipeline_lib.build_pipeline(
      UNetConfig.from_dict(models["unet"]), VAEConfig.from_dict(vae),
      CLIPTextConfig.from_dict(text), tokenizer, dict(config.scheduler), params,
      seed=config.diffusion.seed, name="sdjax-shapes")


def _caption_tables(pipe):
  return jnp.asarray(shapes.caption_table(pipe.tokenize)), jnp.asarray(pipe.tokenize([""])[0])


def make_batch_fn(pipe, mix: shapes.CaptionMix, mesh):
  """`(key, n, vae_params) -> (latents, ids)`: shapes rendered and put through the VAE's
  encoder (a posterior sample), with their (possibly shortened) captions."""
  table, empty = _caption_tables(pipe)

  def make_batch(key, n, vae_params):
    data_key, sample_key = jax.random.split(key)
    attrs = shapes.sample_attributes(data_key, n, mix, exclude_held_out=True)
    images = train.shard_rows(shapes.render(attrs), mesh)
    ids = train.shard_rows(shapes.caption_ids(table, empty, attrs), mesh)
    posterior = pipe.vae.apply({"params": vae_params}, images, method=pipe.vae.encode)
    return posterior.sample(sample_key), ids

  return make_batch


_ATTRIBUTES = ("color", "background", "shape", "position")


def encode_dataset(pipe, vae_params, n: int, seed: int, mesh, chunk: int = 256) -> dict:
  """`n` training images (no held-out combination) through the VAE's encoder, once: their
  posterior means and standard deviations [n, h, w, C] and attribute indices [n].

  The encoder then costs nothing per diffusion step (a third of a step on a CPU); each step
  draws images from this set and a fresh posterior sample, caption form, timestep and noise.
  """
  if n % chunk:
    raise ValueError(f"cached_latents must be a multiple of {chunk}, got {n}")

  @jax.jit
  def encode(params, key):
    attrs = shapes.sample_attributes(key, chunk, exclude_held_out=True)
    images = train.shard_rows(shapes.render(attrs), mesh)
    posterior = pipe.vae.apply({"params": params}, images, method=pipe.vae.encode)
    return {"mean": posterior.mean, "std": posterior.std,
            **{k: attrs[k].astype(jnp.int32) for k in _ATTRIBUTES}}

  key = jax.random.key(seed)
  parts = [encode(vae_params, jax.random.fold_in(key, i)) for i in range(n // chunk)]
  return jax.tree.map(lambda *xs: jnp.concatenate(xs), *parts)


def cached_batch_fn(pipe, mix: shapes.CaptionMix, mesh):
  """`(key, n, cache) -> (latents, ids)`: images drawn from `encode_dataset`'s `cache`."""
  table, empty = _caption_tables(pipe)

  def make_batch(key, n, cache):
    pick_key, form_key, sample_key = jax.random.split(key, 3)
    pick = jax.random.randint(pick_key, (n,), 0, cache["mean"].shape[0])
    attrs = {k: cache[k][pick] for k in _ATTRIBUTES}
    attrs["form"] = shapes.sample_forms(form_key, n, mix)
    mean, std = cache["mean"][pick], cache["std"][pick]
    latents = mean + std * jax.random.normal(sample_key, mean.shape, mean.dtype)
    return (train.shard_rows(latents, mesh),
            train.shard_rows(shapes.caption_ids(table, empty, attrs), mesh))

  return make_batch


def _render_batch(key, n):
  return shapes.render(shapes.sample_attributes(key, n))


def _render_windows(size: int):
  """`(key, n) -> images`: `shapes.render_window`s; at `shapes.SIZE`, the whole images."""
  return lambda key, n: shapes.render_window(shapes.sample_attributes(key, n), size)


def train_vae(pipe, config, workdir: str, mesh):
  """Stage 1 in two parts (`vae`, `vae_sharpen`), each on whole images or on the windows
  around the shapes (`crop`), with the shapes' pixels optionally weighted up."""
  params = pipe.params["vae"]
  for name in STAGES[:2]:
    cfg = config[name]
    images = _render_windows(cfg.get("crop") or shapes.SIZE)
    loss_fn = train.vae_loss(pipe.vae, images, cfg.batch_size, cfg.kl_weight, mesh,
                             cfg.get("foreground_weight", 0.0))
    state, _ = train.fit(loss_fn, params, None, cfg, os.path.join(workdir, name), mesh=mesh,
                         desc=name)
    params = state.params
  return params


def train_diffusion(pipe, cfg, mix: shapes.CaptionMix, workdir: str, mesh,
                    deadline: float | None = None, stage: str = "diffusion"):
  """Returns the EMA params {"unet", "text_encoder"} (the raw ones when EMA is off) and the
  number of steps trained (fewer than `cfg.steps` when `deadline` stopped it).

  With `cfg.cached_latents` = N, the VAE encodes N images once (`encode_dataset`) and the
  steps draw from them; without, every step renders and encodes its batch.
  """
  n = cfg.get("cached_latents") or 0
  if n:
    start = time.time()
    frozen = encode_dataset(pipe, pipe.params["vae"], n, cfg.seed + 1, mesh, chunk=min(n, 256))
    logging.info("%s: encoded %d images in %.1f s", stage, n, time.time() - start)
    make_batch = cached_batch_fn(pipe, mix, mesh)
  else:
    frozen, make_batch = pipe.params["vae"], make_batch_fn(pipe, mix, mesh)
  loss_fn = train.diffusion_loss(pipe.unet, pipe.text_encoder, make_batch, cfg.batch_size,
                                 pipe.scheduler_config, mesh, pipe.vae.config.scaling_factor)
  params = {"unet": pipe.params["unet"], "text_encoder": pipe.params["text_encoder"]}
  state, _ = train.fit(loss_fn, params, frozen, cfg, os.path.join(workdir, stage), mesh=mesh,
                       desc=stage, stop_at=cfg.get("stop_at"), deadline=deadline)
  return (state.ema if state.ema is not None else state.params), int(state.step)


def run(config, workdir: str, output: str | None, max_seconds: float | None = None,
        init_from: str | None = None) -> pipeline_lib.Pipeline:
  """Both stages, then (when `output` is set) the exported folder with its model card.

  With `max_seconds`, the diffusion stage stops early (checkpointed, resumable) once this run
  has taken that long, and what it has learned so far is exported. With `init_from` (a folder
  this function exported), only `config.finetune` runs: the UNet and text encoder go on
  training from that model, under this config's tokenizer (see `retokenize`).
  """
  os.makedirs(workdir, exist_ok=True)
  t0 = time.time()
  deadline = None if max_seconds is None else t0 + max_seconds
  mesh = parallel.make_mesh()
  if init_from:
    return _finetune(config, workdir, output, init_from, mesh, deadline, t0)
  pipe = build(config, workdir)
  vae_params = train_vae(pipe, config, workdir, mesh)
  scaling = train.latent_scaling_factor(
      pipe.vae, vae_params, _render_batch(jax.random.key(1), config.get("scaling_images", 256)),
      jax.random.key(2))
  logging.info("vae done: scaling factor %.4f", scaling)
  pipe = build(config, workdir, {**pipe.params, "vae": vae_params}, scaling)
  mix = shapes.CaptionMix(**config.caption_mix)
  trained, diffusion_steps = train_diffusion(pipe, config.diffusion, mix, workdir, mesh,
                                             deadline)
  pipe = build(config, workdir, {**pipe.params, **trained}, scaling)
  seconds = time.time() - t0
  summary = {
      "vae_steps": config.vae.steps + config.vae_sharpen.steps,
      "diffusion_steps": diffusion_steps,
      "vae_final_loss": _last_logged(workdir, "vae_sharpen").get("loss"),
      "diffusion_final_loss": _last_logged(workdir, "diffusion").get("loss"),
      # Each stage's loop time over every call that ran it, compile included.
      "stage_seconds": {k: stage_seconds(workdir, k) for k in STAGES},
      "train_seconds_this_run": round(seconds, 1), "scaling_factor": scaling,
      "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
      "host": f"{platform.machine()}, {os.cpu_count()} CPUs", "jax": jax.__version__,
      "prompt_grammar": shapes.GRAMMAR,
  }
  _export(pipe, config, summary, workdir, output)
  return pipe


def _export(pipe, config, summary: dict, workdir: str, output: str | None) -> None:
  for folder in (workdir, output):
    if folder:
      os.makedirs(folder, exist_ok=True)
      with open(os.path.join(folder, SUMMARY), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
  if output:
    pipe.save_pretrained(output)
    write_model_card(output, config, summary, pipe)


def retokenize(text_params, old_tokenizer, new_tokenizer):
  """The text encoder's params for `new_tokenizer`: a token both vocabularies hold keeps its
  embedding; a new one starts as the mean embedding of the pieces the old tokenizer cut it into."""
  table = np.asarray(text_params["embeddings"]["token_embedding"]["embedding"])
  old_vocab = old_tokenizer.get_vocab()
  rows = []
  for token, _ in sorted(new_tokenizer.get_vocab().items(), key=lambda kv: kv[1]):
    if token in old_vocab:
      rows.append(table[old_vocab[token]])
    else:
      pieces = old_tokenizer(token.removesuffix("</w>"), add_special_tokens=False).input_ids
      rows.append(table[pieces].mean(0))
  embeddings = {**text_params["embeddings"], "token_embedding": {"embedding": jnp.asarray(
      np.stack(rows))}}
  return {**text_params, "embeddings": embeddings}


def _finetune(config, workdir, output, init_from, mesh, deadline, t0):
  start = pipeline_lib.load_pipeline(init_from)
  with open(os.path.join(init_from, SUMMARY), encoding="utf-8") as f:
    summary = json.load(f)
  scaling = start.vae.config.scaling_factor
  tokenizer = make_tokenizer(os.path.join(workdir, "tokenizer"), config.max_length)
  params = {**start.params,
            "text_encoder": retokenize(start.params["text_encoder"], start.tokenizer, tokenizer)}
  pipe = build(config, workdir, params, scaling)
  mix = shapes.CaptionMix(**config.caption_mix)
  trained, steps = train_diffusion(pipe, config.finetune, mix, workdir, mesh, deadline,
                                   stage="finetune")
  pipe = build(config, workdir, {**pipe.params, **trained}, scaling)
  summary.update({
      "prompt_grammar": shapes.GRAMMAR, "finetune_steps": steps, "finetune_final_loss": _last_logged(workdir, "finetune")["loss"],
      "finetune_seconds": stage_seconds(workdir, "finetune"),
      "finetune_host": f"{platform.machine()}, {os.cpu_count()} CPUs "
                       f"({jax.device_count()} x {jax.devices()[0].device_kind})",
      "train_seconds_this_run": round(time.time() - t0, 1)})
  _export(pipe, config, summary, workdir, output)
  return pipe


def write_model_card(folder: str, config, summary: dict, pipe) -> None:
  """README.md of the exported folder: what it is, how it was trained, and (filled in by
  `tools/eval_tiny.py --card`) how it scores."""
  n_params = {name: int(sum(np.prod(x.shape) for x in jax.tree.leaves(p)))
              for name, p in pipe.params.items()}
  lines = [
      "---", "library_name: diffusers", "pipeline_tag: text-to-image", "license: apache-2.0", "---",
      "", "# sdjax-shapes: sdjax's built-in text-to-image model", "",
      "A small Stable Diffusion (CLIP text encoder, conditional UNet, AutoencoderKL; diffusers "
      "format) trained from scratch by sdjax on captioned 64x64 shapes: one filled circle, "
      "square or triangle (apex up) on a plain background.", "",
      "Prompt grammar: `a {color} {shape} in the {position} on a {background} background`, with "
      f"colors {', '.join(shapes.COLOR_NAMES)}; shapes {', '.join(shapes.SHAPES)}; positions "
      f"{', '.join(shapes.POSITION_NAMES)}. Position and/or background may be left out.", "",
      "## Architecture", "",
      *(f"- {name}: {count:,} parameters" for name, count in n_params.items()),
      f"- VAE: 64x64x3 -> 8x8x4 latents, scaling factor {summary['scaling_factor']:.5f}",
      f"- text: {config.max_length} tokens, a CLIP BPE vocabulary of the grammar's words", "",
      "## Training", "",
      "```bash", *_commands(summary), "```", "",
      f"- stage 1, VAE: AdamW, L1 + L2 reconstruction + KL (weight {config.vae.kl_weight}); "
      f"{_vae_parts(config)}; final loss {summary['vae_final_loss']:.4f}",
      f"- stage 2, UNet + text encoder on the frozen VAE's latents"
      f"{_cache_words(config.diffusion)}: "
      f"{_steps_of(summary['diffusion_steps'], config.diffusion.steps)} of batch "
      f"{config.diffusion.batch_size}, noise prediction (MSE), EMA "
      f"{config.diffusion.ema_decay} of the weights exported; final loss "
      f"{summary['diffusion_final_loss']:.4f}",
      "- captions: canonical, 10% each without position, without background, without both, "
      "and empty (the unconditional branch); about one attribute combination in ten "
      "(`sdjax.training.shapes.held_out`) never shown",
      "- wall time per stage (loop and compile, minutes): " + ", ".join(
          f"{k} {v / 60:.1f}" for k, v in summary["stage_seconds"].items() if v) +
      f"; on {summary['host']} ({summary['devices']}), jax {summary.get('jax', '?')}" +
      f"; {sum(v for v in summary['stage_seconds'].values() if v) / 60:.1f} min in all",
      *([f"- {summary['note']}"] if summary.get("note") else []),
      *([_finetune_line(config, summary)] if summary.get("finetune_steps") else []), "",
      "## Evaluation", "", "Not evaluated yet: run `python tools/eval_tiny.py --card`.", "",
  ]
  with open(os.path.join(folder, "README.md"), "w", encoding="utf-8") as f:
    f.write("\n".join(lines))


def _cache_words(cfg) -> str:
  n = cfg.get("cached_latents") or 0
  return (f" ({n} images encoded once; each step draws a fresh posterior sample)" if n else
          " (each step's images encoded afresh)")


def _vae_parts(config) -> str:
  parts = []
  for name in STAGES[:2]:
    cfg = config[name]
    crop = cfg.get("crop") or shapes.SIZE
    where = ("whole images" if crop == shapes.SIZE else
             f"the {crop}x{crop} window around each shape (`shapes.render_window`)")
    fg = cfg.get("foreground_weight", 0.0)
    parts.append(f"{cfg.steps} steps of batch {cfg.batch_size} on {where}" +
                 (f", the shape's pixels weighted {1 + fg:g}x" if fg else ""))
  return ", then ".join(parts)


def _commands(summary: dict) -> list[str]:
  train = "python tools/train_tiny.py --workdir /tmp/shapes_train --output "
  if not summary.get("finetune_steps"):
    return [train + "sdjax/builtin/shapes"]
  return [train + "/tmp/shapes", "python tools/train_tiny.py --workdir /tmp/shapes_tune "
          "--output sdjax/builtin/shapes --init_from /tmp/shapes"]


def _finetune_line(config, summary: dict) -> str:
  cfg = config.finetune
  return (f"- stage 3, fine-tuning the UNet and text encoder from that model "
          f"(`--init_from`): {_steps_of(summary['finetune_steps'], cfg.steps)} of batch "
          f"{cfg.batch_size}, learning rate {cfg.learning_rate:g}, EMA {cfg.ema_decay}; final "
          f"loss {summary['finetune_final_loss']:.4f}; {summary['finetune_seconds'] / 60:.1f} "
          f"min on {summary['finetune_host']}")


def _steps_of(done: int, planned: int) -> str:
  return f"{done} steps" + ("" if done == planned else f" (of a {planned}-step schedule)")


def stage_seconds(workdir: str, stage: str) -> float | None:
  """A stage's wall time summed over the calls that ran it (each call's clock starts at 0)."""
  records = _logged(workdir, stage)
  if not records:
    return None
  total, last = 0.0, 0.0
  for seconds in (r["seconds"] for r in records):
    total, last = (total + last, seconds) if seconds < last else (total, seconds)
  return round(total + last, 1)


def _last_logged(workdir: str, stage: str) -> dict:
  """The last metrics line a stage logged (also when this run resumed it with nothing to do)."""
  records = _logged(workdir, stage)
  return records[-1] if records else {}


def _logged(workdir: str, stage: str) -> list[dict]:
  """Every line of a stage's metrics.jsonl, over all the calls that ran it."""
  path = os.path.join(workdir, stage, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]
