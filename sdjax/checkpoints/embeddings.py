"""Textual-inversion embeddings: new tokens whose input vectors come from a file.

Formats: AUTOMATIC1111 `.pt` (`string_to_param["*"]`, read by sdjax's safe unpickler),
`.safetensors` holding one tensor (`emb_params`), diffusers' `learned_embeds.safetensors` /
`.bin` (`{token: vectors}`), and SDXL files (`clip_l` and `clip_g`, one per text encoder).

Loading works as diffusers' `load_textual_inversion`: the tokenizer gains the added tokens
`tok`, `tok_1`, ... (one per vector), the token embedding table grows by as many rows (the text
encoder's `vocab_size` with it), and prompts are expanded so `tok` reads `tok tok_1 ...`.
The vectors stay available per token on `Pipeline.embeddings` for prompt parsers that insert
them themselves; a folder saved after adding them keeps them in its tokenizers and token tables,
where loading it finds them again (`from_vocabulary`).
"""

from __future__ import annotations

import copy
import dataclasses
import os
import re
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from sdjax.checkpoints import lora

# text encoder -> the pipeline attribute of its tokenizer
ENCODERS = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2"}
_SDXL_KEYS = {"clip_l": "text_encoder", "clip_g": "text_encoder_2"}
_PREFERRED = ("learned_embeds.safetensors", "learned_embeds.bin")


class EmbeddingError(ValueError):
  """An embedding file that cannot be loaded into this model: one line saying why."""


@dataclasses.dataclass(frozen=True)
class Embedding:
  """A textual-inversion embedding: its trigger token and vectors [n, D] per text encoder."""

  token: str
  vectors: Mapping[str, np.ndarray]

  @property
  def num_vectors(self) -> int:
    return next(iter(self.vectors.values())).shape[0]


def _as_vectors(value: Any, what: str) -> np.ndarray:
  if not isinstance(value, np.ndarray) or value.ndim not in (1, 2) or not value.size:
    raise EmbeddingError(f"{what} is not a [vectors, dim] tensor")
  return np.asarray(value, np.float32).reshape(-1, value.shape[-1])


def parse_embedding(data: Mapping[str, Any], stem: str, token: str | None = None) -> Embedding:
  """An embedding from a loaded file's contents; the token defaults to the file's stem."""
  what = f"embedding {stem}"
  if "string_to_param" in data:  # AUTOMATIC1111 .pt
    params = data["string_to_param"]
    if not isinstance(params, Mapping) or len(params) != 1:
      raise EmbeddingError(f"{what}: string_to_param must hold one tensor")
    return Embedding(token or stem, {"text_encoder": _as_vectors(next(iter(params.values())), what)})
  if set(data) & set(_SDXL_KEYS):
    if set(data) != set(_SDXL_KEYS):
      raise EmbeddingError(f"{what}: an SDXL embedding holds exactly clip_l and clip_g")
    return Embedding(token or stem, {_SDXL_KEYS[k]: _as_vectors(v, f"{what} {k}")
                                     for k, v in data.items()})
  if len(data) != 1:
    raise EmbeddingError(f"{what}: expected one tensor, string_to_param, or clip_l + clip_g; "
                         f"found keys {', '.join(sorted(data)[:4])}")
  key, value = next(iter(data.items()))
  default = stem if key == "emb_params" else key  # diffusers files name their token
  return Embedding(token or default, {"text_encoder": _as_vectors(value, what)})


def embedding_file(source: str) -> str:
  """The local file of an embedding `source` (a path, or a hub file)."""
  return lora.resolve_file(source, "embedding", _PREFERRED)


def read_embedding(source: str, token: str | None = None) -> Embedding:
  """Reads an embedding file (or hub file, see `hub.resolve_file`)."""
  try:
    path = embedding_file(source)
    if path.endswith(".safetensors"):
      data = lora.read_tensors(path)[0]
    else:
      data = lora.read_pickle(path)
  except lora.LoraError as e:
    raise EmbeddingError(str(e)) from None
  if not isinstance(data, Mapping):
    raise EmbeddingError(f"embedding {source} is not a dict of tensors")
  return parse_embedding(data, os.path.splitext(os.path.basename(path))[0], token)


def trigger_vectors(embeddings: Mapping[str, Embedding], component: str = "text_encoder"):
  """{trigger word: vectors [n, D]} for one text encoder, as A1111-style prompt parsers take."""
  return {token: emb.vectors[component] for token, emb in embeddings.items()
          if component in emb.vectors}


def token_names(token: str, n: int) -> list[str]:
  """The added tokens of an n-vector embedding, as diffusers names them."""
  return [token] + [f"{token}_{i}" for i in range(1, n)]


def expand_prompt(prompt: str, embeddings: Mapping[str, Embedding]) -> str:
  """`tok` -> `tok tok_1 ...` for multi-vector embeddings, as diffusers' maybe_convert_prompt."""
  for token, emb in embeddings.items():
    if emb.num_vectors > 1:
      prompt = re.sub(re.escape(token) + r"(?!_\d)", " ".join(token_names(token, emb.num_vectors)),
                      prompt, flags=re.IGNORECASE)
  return prompt


_LATER_VECTOR = re.compile(r"^(.+)_(\d+)$")


def from_vocabulary(pipe) -> dict[str, Embedding]:
  """The embeddings a loaded pipeline's tokenizers already hold, {token: Embedding}.

  A pipeline saved after `add_embeddings` keeps the added tokens `tok`, `tok_1`, ... and their
  rows of the token table; this finds them again (tokens past the tokenizer's own vocabulary,
  grouped by the `_i` suffixes diffusers' `maybe_convert_prompt` expands by), so that a reloaded
  folder expands and weights its triggers as the pipeline that was saved.
  """
  found: dict[str, dict[str, np.ndarray]] = {}
  for component, tokenizer_name in ENCODERS.items():
    tokenizer = getattr(pipe, tokenizer_name, None)
    if tokenizer is None or getattr(pipe, component, None) is None:
      continue
    added = {t: i for t, i in tokenizer.get_added_vocab().items() if i >= tokenizer.vocab_size}
    if not added:
      continue
    table = np.asarray(pipe.params[component]["embeddings"]["token_embedding"]["embedding"],
                       np.float32)
    for token in added:
      later = _LATER_VECTOR.match(token)
      if later and later.group(1) in added:
        continue  # one of another token's vectors
      names = [token]
      while f"{token}_{len(names)}" in added:
        names.append(f"{token}_{len(names)}")
      found.setdefault(token, {})[component] = table[[added[n] for n in names]]
  return {token: Embedding(token, vectors) for token, vectors in found.items()}


def _normalize_entry(entry) -> tuple[str, str | None]:
  if isinstance(entry, (str, os.PathLike)):
    return os.fspath(entry), None
  path, token = entry
  return os.fspath(path), token


def _add_to_encoder(pipe, component: str, emb: Embedding, tokenizers, params, modules):
  """Adds one embedding's vectors for one text encoder: tokenizer, table, config."""
  tokenizer = tokenizers[component]
  vectors = emb.vectors[component]
  table = params[component]["embeddings"]["token_embedding"]["embedding"]  # V, D
  if vectors.shape[1] != table.shape[1]:
    raise EmbeddingError(
        f"embedding {emb.token} has vectors of size {vectors.shape[1]} but {component} uses "
        f"{table.shape[1]}: it was made for another model family")
  names = token_names(emb.token, vectors.shape[0])
  vocab = tokenizer.get_vocab()
  taken = [t for t in names if t in vocab]
  if taken:
    raise EmbeddingError(f"embedding token {taken[0]!r} is already in the {ENCODERS[component]} "
                         "vocabulary; give the embedding another token")
  tokenizer.add_tokens(names)
  ids = tokenizer.convert_tokens_to_ids(names)
  size = max(table.shape[0], max(ids) + 1)
  grown = jnp.zeros((size, table.shape[1]), table.dtype).at[:table.shape[0]].set(table)
  grown = grown.at[jnp.asarray(ids)].set(jnp.asarray(vectors, table.dtype))
  tree = copy.copy(params[component])
  tree["embeddings"] = {**tree["embeddings"], "token_embedding": {"embedding": grown}}
  params[component] = tree
  module = modules[component]
  modules[component] = module.clone(config=dataclasses.replace(module.config, vocab_size=size))


def add_embeddings(pipe, entries):
  """A new pipeline with textual-inversion embeddings added (`pipe` is left as it was).

  Args:
    pipe: a `Pipeline`.
    entries: `path` or `(path, token)` each (token default: the file's stem, or the token a
      diffusers file names).
  """
  embeddings = dict(pipe.embeddings)
  tokenizers = {c: copy.deepcopy(getattr(pipe, t)) for c, t in ENCODERS.items()
                if getattr(pipe, c, None) is not None}
  modules = {c: getattr(pipe, c) for c in tokenizers}
  params = dict(pipe.params)
  for entry in entries:
    source, token = _normalize_entry(entry)
    emb = read_embedding(source, token)
    if set(emb.vectors) != set(tokenizers):
      raise EmbeddingError(
          f"embedding {emb.token} has vectors for {' and '.join(sorted(emb.vectors))} but this "
          f"model has {' and '.join(sorted(tokenizers))}: it was made for another model family")
    if emb.token.lower() in {t.lower() for t in embeddings}:
      raise EmbeddingError(f"two embeddings use the token {emb.token!r}")
    for component in emb.vectors:
      _add_to_encoder(pipe, component, emb, tokenizers, params, modules)
    embeddings[emb.token] = emb
  fields = {**{ENCODERS[c]: t for c, t in tokenizers.items()}, **modules}
  return dataclasses.replace(pipe, params=params, embeddings=embeddings, **fields)
