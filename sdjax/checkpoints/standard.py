"""Built-in standard configs of the released model families, and the CLIP tokenizer, offline.

A single-file checkpoint carries weights only. Without a `config=` folder, its architecture,
scheduler and tokenizer come from here: one small JSON file per family (`standard_configs/`) and
the CLIP BPE vocabulary (`bpe_simple_vocab_16e6.txt.gz`, OpenAI CLIP, MIT license, see NOTICE).
"""

from __future__ import annotations

import functools
import gzip
import json
import os
import tempfile
from typing import Any

_DIR = os.path.join(os.path.dirname(__file__), "standard_configs")
_VOCAB = os.path.join(_DIR, "bpe_simple_vocab_16e6.txt.gz")
_NUM_MERGES = 49152 - 256 - 2  # CLIP uses the first 48894 merges of the file

STANDARD_CONFIGS = ("sd1", "sd2_768_v", "sd2_512_base", "sd2_x4_upscaler", "sdxl",
                    "sdxl_refiner")


def standard_config(name: str) -> dict[str, Any]:
  """Config dicts of a family: "unet", "vae", "scheduler", "text_encoder" / "text_encoder_2"
  and "tokenizer" / "tokenizer_2" (pad token) as it has them, "model_index" options; the x4
  upscaler's "low_res_scheduler" too."""
  with open(os.path.join(_DIR, f"{name}.json"), encoding="utf-8") as f:
    return json.load(f)


def _bytes_to_unicode() -> list[str]:
  """CLIP's byte -> printable character table, in vocabulary order (printable bytes first)."""
  printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
               *range(ord("®"), ord("ÿ") + 1)]
  chars = [chr(b) for b in printable]
  shifted = 0
  for b in range(256):
    if b not in printable:
      chars.append(chr(256 + shifted))
      shifted += 1
  return chars


@functools.cache
def clip_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
  """CLIP's 49408-token vocabulary and its merges, built from the shipped BPE file."""
  with gzip.open(_VOCAB, "rt", encoding="utf-8") as f:
    merges = f.read().split("\n")[1:_NUM_MERGES + 1]  # line 0 is a version header
  base = _bytes_to_unicode()
  tokens = base + [c + "</w>" for c in base] + ["".join(m.split(" ")) for m in merges]
  tokens += ["<|startoftext|>", "<|endoftext|>"]
  return {t: i for i, t in enumerate(tokens)}, merges


def clip_tokenizer(pad_token: str = "<|endoftext|>", max_length: int = 77):
  """transformers' `CLIPTokenizer` with the standard CLIP vocabulary (no download)."""
  from transformers import CLIPTokenizer  # noqa: PLC0415

  vocab, merges = clip_vocab_and_merges()
  with tempfile.TemporaryDirectory() as tmp:
    vocab_file, merges_file = os.path.join(tmp, "vocab.json"), os.path.join(tmp, "merges.txt")
    with open(vocab_file, "w", encoding="utf-8") as f:
      json.dump(vocab, f, ensure_ascii=False)
    with open(merges_file, "w", encoding="utf-8") as f:
      f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    return CLIPTokenizer(vocab_file, merges_file, pad_token=pad_token, model_max_length=max_length)
