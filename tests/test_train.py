"""Training: the loop lowers the loss, resumes exactly, and the two-stage recipe exports a model."""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import train_tiny
from sdjax import parallel, pipeline, testing
from sdjax.models.vae import AutoencoderKL, VAEConfig
from sdjax.training import recipe, shapes, train


def _stage_cfg(steps, lr=1e-2):
  return ml_collections.ConfigDict({
      "steps": steps, "batch_size": 4, "learning_rate": lr, "warmup_steps": 1,
      "end_lr_factor": 0.1, "weight_decay": 0.01, "grad_clip": 1.0, "ema_decay": 0.9,
      "checkpoint_every": 3, "log_every": 2, "seed": 7,
  })


def _render(key, n):  # 32-pixel windows around the shapes: a quarter of the pixels
  return shapes.render_window(shapes.sample_attributes(key, n), 32)


@pytest.fixture(scope="module")
def vae_setup():
  vae = AutoencoderKL(VAEConfig.from_dict({**testing.VAE, "sample_size": 32}))
  params = pipeline.init_params(vae, np.zeros((1, 32, 32, 3), np.float32))
  mesh = parallel.make_mesh()
  return vae, params, mesh, train.vae_loss(vae, _render, 4, 1e-5, mesh)


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_training_lowers_the_loss(vae_setup, tmp_path):
  vae, params, mesh, loss_fn = vae_setup
  key = jax.random.key(123)  # a fixed batch, seen by neither run
  before = float(loss_fn(params, None, key)[0])
  state, losses = train.fit(loss_fn, params, None, _stage_cfg(8), str(tmp_path), mesh=mesh)
  after = float(loss_fn(state.params, None, key)[0])
  assert len(losses) == 8 and int(state.step) == 8
  assert after < 0.8 * before, (before, after)
  # EMA trails the params.
  pairs = zip(_leaves(state.ema), _leaves(state.params), strict=True)
  ema_gap = sum(np.abs(e - p).sum() for e, p in pairs)
  assert ema_gap > 0
  lines = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
  assert [x["step"] for x in lines] == [2, 4, 6, 8] and all("grad_norm" in x for x in lines)


def test_resume_is_exact(vae_setup, tmp_path):
  vae, params, mesh, loss_fn = vae_setup
  cfg = _stage_cfg(6)
  straight, _ = train.fit(loss_fn, params, None, cfg, str(tmp_path / "a"), mesh=mesh)
  first, losses = train.fit(loss_fn, params, None, cfg, str(tmp_path / "b"), mesh=mesh, stop_at=4)
  assert int(first.step) == 4 and len(losses) == 4
  resumed, losses = train.fit(loss_fn, params, None, cfg, str(tmp_path / "b"), mesh=mesh)
  assert int(resumed.step) == 6 and len(losses) == 2  # steps 5 and 6 only
  for a, b in zip(_leaves(straight), _leaves(resumed), strict=True):
    np.testing.assert_array_equal(a, b)


def _tiny_config():
  """The smoke recipe on the smallest networks (one layer per block: the train steps' compiles
  are most of this test's time)."""
  c = train_tiny.get_config("smoke")
  c.models = {
      "vae": {**testing.VAE, "sample_size": 64},
      "unet": {**testing.UNET_SD1, "cross_attention_dim": 32, "sample_size": 32,
               "layers_per_block": 1},
      "text_encoder": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                       "num_attention_heads": 4, "max_position_embeddings": 16},
  }
  for stage in (c.vae, c.vae_sharpen, c.diffusion):  # compiles, not steps, are the time here
    stage.steps, stage.batch_size, stage.checkpoint_every = 3, 2, 3
  c.scaling_images = 16
  c.diffusion.cached_latents = 16
  # Fine-tuning as the diffusion stage trains: the same training step, compiled once (the
  # suite's persistent compilation cache, tests/conftest.py).
  c.finetune = ml_collections.ConfigDict(c.diffusion.to_dict())
  return c


def test_two_stage_recipe_exports_a_loadable_model(tmp_path):
  out = tmp_path / "model"
  recipe.run(_tiny_config(), str(tmp_path / "work"), str(out))
  summary = json.load(open(out / recipe.SUMMARY))
  assert summary["vae_steps"] == 6 and summary["diffusion_steps"] == 3
  assert np.isfinite(summary["diffusion_final_loss"]) and summary["scaling_factor"] > 0
  pipe = pipeline.load_pipeline(str(out))
  assert pipe.vae.config.scaling_factor == pytest.approx(summary["scaling_factor"])
  assert pipe.tokenize(["a red circle"]).shape == (1, 16)
  images = pipe.generate(["a red circle in the center on a blue background"], steps=2)
  assert images.shape == (1, 64, 64, 3) and np.isfinite(images).all()
  # Rerunning the finished command resumes both stages at their last step: nothing to redo.
  assert os.path.isdir(tmp_path / "work" / "diffusion" / "3")
  # --init_from: three more steps of the UNet and text encoder, starting from the export.
  tuned = recipe.run(_tiny_config(), str(tmp_path / "tune"), str(tmp_path / "tuned"),
                     init_from=str(out))
  after = json.load(open(tmp_path / "tuned" / recipe.SUMMARY))
  assert after["finetune_steps"] == 3 and after["diffusion_steps"] == 3
  assert "stage 3, fine-tuning" in open(tmp_path / "tuned" / "README.md").read()
  np.testing.assert_array_equal(tuned.params["vae"]["decoder"]["conv_out"]["kernel"],
                                pipe.params["vae"]["decoder"]["conv_out"]["kernel"])
  moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()),
                       tuned.params["unet"], pipe.params["unet"])
  assert max(jax.tree.leaves(moved)) > 0


def test_vocabulary_words_are_single_tokens(tmp_path):
  """Every caption word is one token, so canonical captions fit the text encoder's 16 places.

  (The first shipped tokenizer merged left to right regardless of rank: "red"'s "re" merge
  left "green" in 4 pieces and "bottom" in 3, and 84 captions lost their background.)
  """
  tokenizer = recipe.make_tokenizer(str(tmp_path), 16)
  for word in recipe.VOCABULARY:
    assert len(tokenizer(word, add_special_tokens=False).input_ids) == 1, word
  longest = max(len(tokenizer(text).input_ids) for text, _ in shapes.canonical_prompts())
  assert longest == 13  # BOS + 11 words + EOS


def test_retokenize_keeps_known_tokens_and_averages_new_ones(tmp_path):
  old_words, new_words = ("a", "red", "circle"), ("a", "red", "circle", "green")
  testing.write_tokenizer(str(tmp_path / "old"), old_words)
  testing.write_tokenizer(str(tmp_path / "new"), new_words)
  old, new = (testing.torch_tokenizer(str(tmp_path / n)) for n in ("old", "new"))
  table = np.random.default_rng(0).standard_normal((len(old), 8)).astype(np.float32)
  params = {"embeddings": {"token_embedding": {"embedding": table},
                           "position_embedding": {"embedding": np.zeros((16, 8))}}}
  got = np.asarray(recipe.retokenize(params, old, new)["embeddings"]["token_embedding"]
                   ["embedding"])
  assert got.shape == (len(new), 8)
  for word in ("a", "red", "circle", "<|endoftext|>"):
    np.testing.assert_array_equal(got[new.convert_tokens_to_ids(word + "</w>" * (word[0] != "<"))],
                                  table[old.convert_tokens_to_ids(word + "</w>" * (word[0] != "<"))])
  pieces = old("green", add_special_tokens=False).input_ids
  assert len(pieces) > 1
  np.testing.assert_allclose(got[new.convert_tokens_to_ids("green</w>")], table[pieces].mean(0),
                             rtol=1e-6)


def test_latent_cache_encodes_training_images_and_batches_draw_from_it(tmp_path):
  config = _tiny_config()
  pipe = recipe.build(config, str(tmp_path))
  mesh = parallel.make_mesh()
  cache = recipe.encode_dataset(pipe, pipe.params["vae"], 8, seed=5, mesh=mesh, chunk=4)
  assert not shapes.held_out(*(np.asarray(cache[k]) for k in ("color", "shape", "position",
                                                              "background"))).any()
  # Row i holds the encoder's posterior of the image whose attributes row i records.
  attrs = shapes.sample_attributes(jax.random.fold_in(jax.random.key(5), 1), 4,
                                   exclude_held_out=True)
  posterior = jax.jit(lambda p, x: pipe.vae.apply({"params": p}, x, method=pipe.vae.encode))(
      pipe.params["vae"], shapes.render(attrs))
  # Up to float rounding of different fusions; another image would be off by ~0.1 or more.
  np.testing.assert_allclose(cache["mean"][4:], posterior.mean, atol=1e-3)
  np.testing.assert_allclose(cache["std"][4:], posterior.std, atol=1e-3)
  assert np.abs(cache["mean"][:4] - posterior.mean).max() > 0.05
  np.testing.assert_array_equal(cache["color"][4:], attrs["color"])

  # A batch: row j of the cache (mean j, std 0) comes with one of row j's caption forms.
  make_batch = recipe.cached_batch_fn(pipe, shapes.CaptionMix(), mesh)
  marked = {**cache, "mean": jnp.broadcast_to(jnp.arange(8.0)[:, None, None, None],
                                              cache["mean"].shape),
            "std": jnp.zeros_like(cache["std"])}
  latents, ids = jax.jit(make_batch, static_argnums=1)(jax.random.key(0), 64, marked)
  rows = np.asarray(latents[:, 0, 0, 0]).astype(int)
  assert len(set(rows)) > 4 and (np.asarray(latents) == rows[:, None, None, None]).all()
  table, empty = recipe._caption_tables(pipe)
  for j, row in enumerate(rows):
    forms = {k: jnp.full((5,), cache[k][row]) for k in ("color", "background", "shape",
                                                        "position")}
    allowed = np.asarray(shapes.caption_ids(table, empty, {**forms, "form": jnp.arange(5)}))
    assert (allowed == np.asarray(ids[j])).all(1).any(), j
  # With std 1 and mean 0, latents are fresh standard normal draws.
  noisy = {**cache, "mean": jnp.zeros_like(cache["mean"]), "std": jnp.ones_like(cache["std"])}
  latents, _ = make_batch(jax.random.key(1), 64, noisy)
  assert abs(float(jnp.std(latents)) - 1) < 0.05 and abs(float(jnp.mean(latents))) < 0.05
