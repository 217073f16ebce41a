"""Textual inversion: every file format vs diffusers' load_textual_inversion + encode_prompt."""

import numpy as np
import pytest
import torch
from parity import assert_close, reference_pipelines
from safetensors.torch import save_file

import sdjax
from sdjax import testing
from sdjax.checkpoints import embeddings
from sdjax.checkpoints.embeddings import EmbeddingError

torch.set_num_threads(1)
DIM = 32  # the tiny SD1 text encoder's width


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  return reference_pipelines(tmp_path_factory, "ti", seed=6)


def _vectors(n, seed, dim=DIM):
  return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))


def _diffusers_embeds(ref, prompts):
  with torch.no_grad():
    embeds, _ = ref.encode_prompt(prompts, "cpu", 1, False)
  return embeds.numpy()


def _check(models, files, prompts):
  """Loads `files` ((path, token or None) each) in both; compares ids and prompt embeddings."""
  ref, pipe, _ = models
  vocab_before = len(ref.tokenizer)
  try:
    for path, token in files:
      ref.load_textual_inversion(path, token=token)
    expected = _diffusers_embeds(ref, prompts)
    expected_ids = ref.tokenizer(ref.maybe_convert_prompt(prompts, ref.tokenizer),
                                 padding="max_length", max_length=77, truncation=True).input_ids
  finally:
    ref.unload_textual_inversion()
  assert len(ref.tokenizer) == vocab_before
  entries = [path if token is None else (path, token) for path, token in files]
  ours = embeddings.add_embeddings(pipe, entries)
  ids = ours.tokenize(prompts)
  np.testing.assert_array_equal(ids, expected_ids)
  assert ids.max() >= pipe.text_encoder.config.vocab_size  # the new tokens are used
  err = assert_close(np.asarray(ours.encode_text(ids)), expected)
  return ours, err


def test_diffusers_learned_embeds(models, tmp_path):
  path = str(tmp_path / "learned_embeds.safetensors")
  save_file({"<cat-toy>": _vectors(1, 0)[0]}, path)
  ours, err = _check(models, [(path, None)], ["a <cat-toy> on the house", "a photo of a cat"])
  assert list(ours.embeddings) == ["<cat-toy>"]
  print(f"diffusers learned_embeds rel err {err:.2g}")


def test_a1111_pt_multi_vector(models, tmp_path):
  """The A1111 `.pt` pickle is read by the safe unpickler; the token is the file's stem."""
  path = str(tmp_path / "my-style.pt")
  vectors = _vectors(3, 1).requires_grad_()  # as A1111 saves its trained vectors
  torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vectors},
              "name": "other-name", "step": 500}, path)
  prompts = ["a dog in my-style, my-style", "my-style"]
  ours, err = _check(models, [(path, "my-style")], prompts)
  assert ours.embeddings["my-style"].num_vectors == 3
  triggers = embeddings.trigger_vectors(ours.embeddings)
  assert list(triggers) == ["my-style"]
  np.testing.assert_array_equal(triggers["my-style"], _vectors(3, 1).numpy())
  print(f"A1111 .pt (3 vectors) rel err {err:.2g}")


def test_emb_params_and_bin_together(models, tmp_path):
  """A1111 safetensors (`emb_params`, token = stem) and a diffusers .bin with a token override."""
  emb = str(tmp_path / "bad-hands.safetensors")
  save_file({"emb_params": _vectors(2, 2)}, emb)
  binary = str(tmp_path / "learned_embeds.bin")
  torch.save({"<old>": _vectors(1, 3)}, binary)
  prompts = ["a cat, bad-hands", "<new> in the sky bad-hands"]
  ours, err = _check(models, [(emb, "bad-hands"), (binary, "<new>")], prompts)
  # Our defaults give the same tokens without naming them.
  again = embeddings.add_embeddings(models[1], [emb, (binary, "<new>")])
  assert list(again.embeddings) == list(ours.embeddings) == ["bad-hands", "<new>"]
  print(f"emb_params + .bin rel err {err:.2g}")


def test_load_pipeline_keeps_original(models, tmp_path):
  _, pipe, folder = models
  path = str(tmp_path / "learned_embeds.safetensors")
  save_file({"<x>": _vectors(2, 4)}, path)
  loaded = sdjax.load_pipeline(folder, embeddings=[path])
  added = embeddings.add_embeddings(pipe, [path])
  assert loaded.text_encoder.config.vocab_size == pipe.text_encoder.config.vocab_size + 2
  ids = loaded.tokenize(["a <x> cat"])
  np.testing.assert_array_equal(ids, added.tokenize(["a <x> cat"]))
  assert_close(loaded.encode_text(ids), added.encode_text(ids), tol=0)
  # The pipeline embeddings were added to is unchanged.
  assert "<x>" not in pipe.tokenizer.get_vocab() and not pipe.embeddings
  assert pipe.params["text_encoder"]["embeddings"]["token_embedding"]["embedding"].shape[0] == (
      pipe.text_encoder.config.vocab_size)


def test_sdxl_file_parses():
  emb = embeddings.parse_embedding({"clip_l": np.ones((2, 768), np.float32),
                                    "clip_g": np.ones((2, 1280), np.float32)}, "sdxl-style")
  assert emb.token == "sdxl-style" and emb.num_vectors == 2
  assert {k: v.shape for k, v in emb.vectors.items()} == {
      "text_encoder": (2, 768), "text_encoder_2": (2, 1280)}


# -- bad input: one line naming the problem --------------------------------------------------------
@pytest.mark.parametrize("contents, token, message", [
    ({"emb_params": torch.ones(2, 768)}, None, "vectors of size 768 but text_encoder uses 32.*"
     "another model family"),
    ({"clip_l": torch.ones(1, DIM), "clip_g": torch.ones(1, DIM)}, None,
     "vectors for text_encoder and text_encoder_2 but this model has text_encoder"),
    ({"emb_params": torch.ones(1, DIM)}, "!", "token '!' is already in the tokenizer"),
    ({"a": torch.ones(1, DIM), "b": torch.ones(1, DIM)}, None, "expected one tensor"),
    ({"clip_l": torch.ones(1, DIM)}, None, "exactly clip_l and clip_g"),
])
def test_bad_embedding(models, tmp_path, contents, token, message):
  path = str(tmp_path / "emb.safetensors")
  save_file(contents, path)
  with pytest.raises(EmbeddingError, match=message) as e:
    embeddings.add_embeddings(models[1], [(path, token)])
  assert "\n" not in str(e.value)


def test_bad_files(models, tmp_path):
  path = str(tmp_path / "my-emb.safetensors")
  save_file({"emb_params": torch.ones(1, DIM)}, path)
  with pytest.raises(EmbeddingError, match="two embeddings use the token 'my-emb'"):
    embeddings.add_embeddings(models[1], [path, path])
  with pytest.raises(EmbeddingError, match="does not exist"):
    embeddings.add_embeddings(models[1], [str(tmp_path / "missing.pt")])
  hostile = str(tmp_path / "hostile.pt")
  with open(hostile, "wb") as f:  # a pickle that would call os.system when loaded
    f.write(b"cos\nsystem\n(S'touch " + str(tmp_path / "pwned").encode() + b"'\ntR.")
  with pytest.raises(ValueError, match="os.system"):
    embeddings.add_embeddings(models[1], [hostile])
  assert not (tmp_path / "pwned").exists()


def test_sdxl_vs_diffusers(tmp_path_factory, tmp_path):
  """clip_l + clip_g: one set of vectors per text encoder, as diffusers loads them in two calls."""
  import os

  from safetensors.torch import load_file

  folder = str(tmp_path_factory.mktemp("sdxl") / "pipes")
  ref, _ = testing.write_torch_sdxl(folder, seed=13)
  pipe = sdjax.load_pipeline(os.path.join(folder, "base"))
  path = str(tmp_path / "sdxl-style.safetensors")
  save_file({"clip_l": _vectors(2, 5, dim=24), "clip_g": _vectors(2, 6, dim=40)}, path)
  state = load_file(path)
  ref.load_textual_inversion(state["clip_l"], token="sdxl-style", text_encoder=ref.text_encoder,
                             tokenizer=ref.tokenizer)
  ref.load_textual_inversion(state["clip_g"], token="sdxl-style",
                             text_encoder=ref.text_encoder_2, tokenizer=ref.tokenizer_2)
  prompts, negatives = ["a cat in sdxl-style", "a dog"], ["sdxl-style", "blue"]
  with torch.no_grad():
    expected = ref.encode_prompt(prompts, device="cpu", negative_prompt=negatives)
  ours = embeddings.add_embeddings(pipe, [path])
  assert {k: v.shape for k, v in ours.embeddings["sdxl-style"].vectors.items()} == {
      "text_encoder": (2, 24), "text_encoder_2": (2, 40)}
  got = ours.encode_prompt(prompts, negatives)
  errs = [assert_close(np.asarray(a), b.numpy()) for a, b in zip(got, expected, strict=True)]
  print("SDXL clip_l + clip_g rel err (embeds, negative, pooled, negative pooled): "
        + ", ".join(f"{e:.2g}" for e in errs))
  ours.save_pretrained(str(tmp_path / "saved"))  # both encoders' vectors come back
  again = sdjax.load_pipeline(str(tmp_path / "saved"))
  for name, vectors in ours.embeddings["sdxl-style"].vectors.items():
    np.testing.assert_array_equal(again.embeddings["sdxl-style"].vectors[name], vectors)
  for a, b in zip(again.encode_prompt(prompts, negatives), got, strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  with pytest.raises(EmbeddingError, match="vectors for text_encoder but this model has "
                                           "text_encoder and text_encoder_2"):
    single = str(tmp_path / "one.safetensors")
    save_file({"emb_params": _vectors(1, 7, dim=24)}, single)
    embeddings.add_embeddings(pipe, [single])


def test_saved_pipeline_keeps_its_embeddings(models, tmp_path):
  """save_pretrained after adding a 3-vector embedding, reloaded: the trigger expands as before
  (and as diffusers expands it reading the same folder), with the same vectors."""
  import diffusers

  _, pipe, _ = models
  path = str(tmp_path / "my-style.safetensors")
  save_file({"emb_params": _vectors(3, 7)}, path)
  ours = embeddings.add_embeddings(pipe, [path])
  folder = str(tmp_path / "saved")
  ours.save_pretrained(folder)
  again = sdjax.load_pipeline(folder)
  assert list(again.embeddings) == ["my-style"]
  np.testing.assert_array_equal(again.embeddings["my-style"].vectors["text_encoder"],
                                _vectors(3, 7).numpy())
  prompts = ["a dog in my-style, my-style", "a cat"]
  ids = again.tokenize(prompts)
  np.testing.assert_array_equal(ids, ours.tokenize(prompts))
  theirs = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None,
                                                             local_files_only=True)
  expected = theirs.tokenizer(theirs.maybe_convert_prompt(prompts, theirs.tokenizer),
                              padding="max_length", max_length=77, truncation=True).input_ids
  np.testing.assert_array_equal(ids, expected)
  assert not sdjax.load_pipeline(models[2]).embeddings  # a folder without added tokens
