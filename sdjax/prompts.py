"""Prompts as the AUTOMATIC1111 web UI reads them.

Parsing (pure Python, no model):
- `parse_prompt_attention`: `(x)` x1.1, `[x]` /1.1, `(x:1.5)`, escapes, BREAK -> (text, weight) runs.
- `prompt_schedule`: prompt editing `[from:to:when]`, `[to:when]`, `[from::when]` and alternation
  `[a|b|c]` -> the prompt text in force up to each step.
- `strip_comments`: `# ...` to the end of a line is a comment.
- `extract_extra_networks` / `lora_tags`: `<lora:name:w>` tags, removed from the text.
- `composable_parts`: composable diffusion, `a AND b :0.5` -> parts with guidance weights (the
  sampler runs the UNet per part and sums the weighted guidance, `sampling._composable_guidance`).

Encoding (`tokenize_chunks`, `PromptBatch`, `encode_weighted`): 75-token chunks wrapped in
BOS...EOS, BREAK and the comma backtrack rule, textual-inversion vectors at their positions,
per-token weights on the encoder output rescaled to the unweighted mean (A1111's emphasis
modes, `EMPHASIS_MODES`: "Original" rescales, "No norm" does not, "Ignore" drops the weights,
"None" reads brackets and BREAK as plain text; and ComfyUI's way, "ComfyUI": a weighted token's
output moved away from the empty prompt's at its position, `(z - z_empty) * w + z_empty`).

The behaviour follows A1111's `modules/prompt_parser.py`, `sd_hijack_clip.py`, `sd_emphasis.py`
and `extra_networks.py`; the code is sdjax's own (a small recursive-descent parser instead of
A1111's lark grammar).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

# A1111's names (Original its default), and ComfyUI's weighting.
EMPHASIS_MODES = ("Original", "No norm", "Ignore", "None", "ComfyUI")
ROUND_MULTIPLIER = 1.1
SQUARE_MULTIPLIER = 1 / 1.1
BREAK = ("BREAK", -1.0)  # the run A1111 emits for the BREAK keyword


class PromptError(ValueError):
  """A prompt that cannot be read: one line saying where."""


# -- attention weights -----------------------------------------------------------------------------
_BREAK_RE = re.compile(r"\s*\bBREAK\b\s*", re.S)
_WEIGHT_CLOSE_RE = re.compile(r":\s*([+-]?[.\d]+)\s*\)")
_TEXT_RE = re.compile(r"[^\\()\[\]:]+")


def _attention_tokens(text: str):
  """Splits `text` into A1111's attention tokens: (kind, text, weight string or None)."""
  i, n = 0, len(text)
  while i < n:
    c = text[i]
    if c == "\\":
      nxt = text[i + 1:i + 2]
      if nxt in ("(", ")", "[", "]", "\\"):
        yield "literal", nxt, None
        i += 2
      else:  # a lone backslash stands for nothing
        yield "literal", "", None
        i += 1
    elif c in "([":
      yield "open", c, None
      i += 1
    elif c == ":" and (m := _WEIGHT_CLOSE_RE.match(text, i)):
      yield "weight", m.group(0), m.group(1)
      i = m.end()
    elif c in ")]:":
      yield "close" if c != ":" else "text", c, None
      i += 1
    else:
      m = _TEXT_RE.match(text, i)
      yield "text", m.group(0), None
      i = m.end()


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
  """(text, weight) runs of a prompt; ("BREAK", -1.0) marks a chunk break.

  Weights multiply as brackets close (inner first), then for brackets left open (outermost
  first), so the float products are A1111's to the last bit; adjacent runs of equal weight merge.
  """
  runs: list[list] = []
  open_round: list[int] = []
  open_square: list[int] = []

  def scale_from(start: int, factor: float) -> None:
    for run in runs[start:]:
      run[1] *= factor

  for kind, tok, weight in _attention_tokens(text):
    if kind == "literal":
      runs.append([tok, 1.0])
    elif kind == "open":
      (open_round if tok == "(" else open_square).append(len(runs))
    elif kind == "weight" and open_round:
      try:
        factor = float(weight)
      except ValueError:
        raise PromptError(f"bad attention weight {weight!r} in prompt {text!r}") from None
      scale_from(open_round.pop(), factor)
    elif tok == ")" and open_round:
      scale_from(open_round.pop(), ROUND_MULTIPLIER)
    elif tok == "]" and open_square:
      scale_from(open_square.pop(), SQUARE_MULTIPLIER)
    else:
      for j, part in enumerate(_BREAK_RE.split(tok)):
        if j:
          runs.append(list(BREAK))
        runs.append([part, 1.0])
  for start in open_round:
    scale_from(start, ROUND_MULTIPLIER)
  for start in open_square:
    scale_from(start, SQUARE_MULTIPLIER)
  if not runs:
    runs = [["", 1.0]]
  merged = [runs[0]]
  for run in runs[1:]:
    if run[1] == merged[-1][1]:
      merged[-1][0] += run[0]
    else:
      merged.append(run)
  return [(t, w) for t, w in merged]


# -- prompt editing and alternation ----------------------------------------------------------------
@dataclasses.dataclass
class _Scheduled:
  before: list | None
  after: list
  number: str  # as written; resolved to a step for a given step count


@dataclasses.dataclass
class _Alternate:
  options: list[list]


_NUMBER_RE = re.compile(r"\s*([+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)\s*\]")
_SPECIAL = "\\[]():|"


class _ScheduleParser:
  """Recursive descent over A1111's schedule grammar.

  prompt := (emphasized | scheduled | alternate | plain)*; `(` or `[` that opens no valid
  construct ends a prompt. At the top level such characters (and `]`, `)`, `:`) are kept as
  literal text; a `|` outside an alternation makes the whole prompt unparsed text, as in A1111.
  """

  def __init__(self, text: str):
    self.s = text

  def top(self) -> list | None:
    s, i, out = self.s, 0, []
    while True:
      nodes, i = self.prompt(i)
      out += nodes
      if i == len(s):
        return out
      if s[i] not in "[]():":
        return None  # a `|` outside an alternation, or a dangling backslash
      out.append(s[i])
      i += 1

  def prompt(self, i: int) -> tuple[list, int]:
    s, out = self.s, []
    while i < len(s):
      c = s[i]
      if c in "([":
        parsed = self.bracket(i)
        if parsed is None:
          break
        node, i = parsed
        out += node
      elif c == "\\":
        if i + 1 >= len(s) or s[i + 1] == "\n":
          break
        out.append(s[i:i + 2])
        i += 2
      elif c in _SPECIAL:
        break
      else:
        j = i
        while j < len(s) and s[j] not in _SPECIAL:
          j += 1
        out.append(s[i:j])
        i = j
    return out, i

  def bracket(self, i: int) -> tuple[list, int] | None:
    s = self.s
    first, j = self.prompt(i + 1)
    end = s[j:j + 1]
    if s[i] == "(":
      if end == ")":
        return ["(", *first, ")"], j + 1
      if end == ":":
        second, k = self.prompt(j + 1)
        if s[k:k + 1] == ")":
          return ["(", *first, ":", *second, ")"], k + 1
      return None
    if end == "]":
      return ["[", *first, "]"], j + 1
    if end == "|":
      return self.alternate(first, j)
    if end == ":":
      m = _NUMBER_RE.match(s, j + 1)
      if m:
        return [_Scheduled(None, first, m.group(1))], m.end()
      second, k = self.prompt(j + 1)
      m = _NUMBER_RE.match(s, k + 1) if s[k:k + 1] == ":" else None
      if m:
        return [_Scheduled(first, second, m.group(1))], m.end()
    return None

  def alternate(self, first: list, j: int) -> tuple[list, int] | None:
    s, options = self.s, [first]
    while s[j:j + 1] == "|":
      option, j = self.prompt(j + 1)
      options.append(option)
    if s[j:j + 1] != "]":
      return None
    return [_Alternate(options)], j + 1


@dataclasses.dataclass(frozen=True)
class _Timeline:
  """How a schedule counts: `steps` steps, after a first pass of `base` (a hires pass), in
  A1111's `old` way or not."""

  steps: int
  base: int | None = None
  old: bool = False

  def last_step(self, number: str) -> int:
    """The last step of a `[...:when]`: a fraction of `steps` if written with a dot, else a
    step. In a hires pass A1111 counts on from the first pass: a fraction f is (f - 1) of the
    pass's steps, a step s is s - base (<= 0: in force from the start). A1111's old timelines
    (before 1.6) read a number below 1 as a fraction and any other as a step, dot or not."""
    value, steps = float(number), self.steps
    if self.old:
      value = value * steps if value < 1 else value
    elif "." in number:
      value = (value - (self.base is not None)) * steps
    elif self.base is not None:
      value -= self.base
    return steps if value >= steps else int(value)


def _collect_steps(nodes: list, timeline: _Timeline, out: set[int]) -> None:
  for node in nodes:
    if isinstance(node, _Scheduled):
      when = timeline.last_step(node.number)
      if when >= 1:
        out.add(when)
      _collect_steps(node.before or [], timeline, out)
      _collect_steps(node.after, timeline, out)
    elif isinstance(node, _Alternate):
      out.update(range(1, timeline.steps + 1))
      for option in node.options:
        _collect_steps(option, timeline, out)


def _text_at(nodes: list, step: int, timeline: _Timeline) -> str:
  parts = []
  for node in nodes:
    if isinstance(node, str):
      parts.append(node)
    elif isinstance(node, _Scheduled):
      early = step <= timeline.last_step(node.number)
      parts.append(_text_at((node.before or []) if early else node.after, step, timeline))
    else:
      parts.append(_text_at(node.options[(step - 1) % len(node.options)], step, timeline))
  return "".join(parts)


def prompt_schedule(prompt: str, steps: int, base_steps: int | None = None,
                    old_timelines: bool = False) -> list[tuple[int, str]]:
  """[(last step, text)] for a prompt with editing/alternation, as A1111's schedules.

  `prompt_schedule("a [b:3]", 10) == [(3, "a "), (10, "a b")]`: the text is "a " while the
  step counter is at most 3. With `base_steps` the schedule is a hires pass's of `steps` steps
  after a first pass of `base_steps`, as A1111 counts it: `prompt_schedule("a [b:1.5]", 10, 10)
  == [(5, "a "), (10, "a b")]`, and an edit the first pass finished stays finished.
  `old_timelines`: A1111's "Old prompt editing timelines" (its counting before 1.6): a number
  below 1 is a fraction, any other a step (`[b:1.0]`: step 1), and a hires pass schedules as
  the first pass did, over `base_steps` (its calls past them take the first entry).
  """
  nodes = _ScheduleParser(prompt).top()
  if old_timelines and base_steps is not None:
    steps, base_steps = base_steps, None
  if nodes is None:
    return [(steps, prompt)]
  timeline = _Timeline(steps, base_steps, old_timelines)
  ends = {steps}
  _collect_steps(nodes, timeline, ends)
  return [(end, _text_at(nodes, end, timeline)) for end in sorted(ends)]


def schedule_index(ends: Sequence[int], step: int) -> int:
  """Which schedule entry is in force at denoiser call `step` (0-based), as A1111 picks it."""
  for k, end in enumerate(ends):
    if step <= end:
      return k
  return 0


# -- extra networks (<lora:name:w>) ----------------------------------------------------------------
_EXTRA_NETWORK_RE = re.compile(r"<(\w+):([^>]+)>")
# Composable diffusion: A1111 splits a prompt at AND and reads a number after a last ':' as the
# part's guidance weight.
_AND_RE = re.compile(r"\bAND\b")
_NUMBER = r"[-+]?(?:\d+\.?|\d*\.\d+)"
_PART_WEIGHT_RE = re.compile(rf":\s*{_NUMBER}\s*$")
_PART_RE = re.compile(rf"^(\s*.*?)(?:\s*:\s*({_NUMBER}))?\s*$")


def composable_parts(prompt: str) -> list[tuple[str, float]]:
  """A1111's composable diffusion: the prompt's parts between `AND`s, each with the weight a
  trailing `:number` gives it (default 1), as `get_multicond_prompt_list` reads them."""
  parts = []
  for part in _AND_RE.split(prompt):
    match = _PART_RE.search(part)
    text, weight = match.groups() if match is not None else (part, None)
    parts.append((text, 1.0 if weight is None else float(weight)))
  return parts


def composable_syntax(prompt: str) -> str | None:
  """What in `prompt` AUTOMATIC1111 reads as composable diffusion (`AND`, or a trailing
  `:weight`); None when there is nothing (the prompt is one part of weight 1)."""
  if _AND_RE.search(prompt):
    return "AND"
  if _PART_WEIGHT_RE.search(prompt):
    return "a trailing ':weight'"
  return None


def extract_extra_networks(prompt: str) -> tuple[str, list[tuple[str, tuple[str, ...]]]]:
  """Removes `<kind:arg:arg...>` tags; returns the text and [(kind, args)] in order."""
  found = []

  def take(m):
    found.append((m.group(1), tuple(m.group(2).split(":"))))
    return ""

  return _EXTRA_NETWORK_RE.sub(take, prompt), found


@dataclasses.dataclass(frozen=True)
class LoraTag:
  name: str
  te_scale: float = 1.0
  unet_scale: float = 1.0


def _lora_tag(args: tuple[str, ...], prompt: str) -> LoraTag:
  positional, named = [], {}
  for item in args:
    parts = item.split("=", 2)
    if len(parts) == 2:
      named[parts[0]] = parts[1]
    else:
      positional.append(item)
  if not positional:
    raise PromptError(f"<lora:{':'.join(args)}> names no LoRA in prompt {prompt!r}")
  try:
    te = float(positional[1]) if len(positional) > 1 else 1.0
    te = float(named.get("te", te))
    unet = float(positional[2]) if len(positional) > 2 else te
    unet = float(named.get("unet", unet))
  except ValueError:
    raise PromptError(f"bad multiplier in <lora:{':'.join(args)}> in prompt {prompt!r}") from None
  return LoraTag(positional[0], te, unet)


_LINE_COMMENT_RE = re.compile(r"(^|\n)#[^\n]*(\n|$)")
_COMMENT_RE = re.compile(r"#[^\n]*(\n|$)")


def strip_comments(prompt: str) -> str:
  """The prompt without `#` comments: from `#` to the end of its line (A1111's "Enable
  comments", on by default; a whole comment line and a trailing one each leave a newline)."""
  return _COMMENT_RE.sub("\n", _LINE_COMMENT_RE.sub("\n", prompt))


def lora_tags(prompt: str) -> tuple[str, tuple[LoraTag, ...]]:
  """The prompt without its comments and extra-network tags, and its `<lora:name:te:unet>` tags.

  `<lora:name>` is scale 1; `<lora:name:w>` scales both text encoder and UNet by w;
  `<lora:name:te:unet>` (or `te=`/`unet=`) scales them apart. Other kinds (`<hypernet:...>`) are
  removed and ignored, as A1111 skips extra networks it does not know. Comments go first (as
  A1111 strips them before reading tags): a tag in a comment does nothing.
  """
  text, found = extract_extra_networks(strip_comments(prompt))
  return text, tuple(_lora_tag(args, prompt) for kind, args in found if kind == "lora")


# -- chunked tokenization --------------------------------------------------------------------------
CHUNK_LENGTH = 75  # prompt tokens per chunk of a 77-token text encoder (with BOS and EOS)
COMMA_BACKTRACK = 20  # A1111's comma_padding_backtrack default


@dataclasses.dataclass
class _Chunk:
  tokens: list = dataclasses.field(default_factory=list)
  weights: list = dataclasses.field(default_factory=list)
  fixes: list = dataclasses.field(default_factory=list)  # (offset in tokens, trigger)


@dataclasses.dataclass(frozen=True)
class Chunks:
  """A text as A1111 feeds it to a text encoder, chunk by chunk.

  ids: [k][L] token ids, BOS ... EOS then the tokenizer's pad token; L = chunk length + 2 (77).
  weights: [k][L] attention weight per token (1.0 on BOS, EOS and padding).
  fixes: (chunk, position in the L, trigger) where a textual-inversion embedding's vectors go;
    its ids there are placeholders.
  """

  ids: tuple[tuple[int, ...], ...]
  weights: tuple[tuple[float, ...], ...]
  fixes: tuple[tuple[int, int, str], ...] = ()


class TriggerTable:
  """Finds textual-inversion trigger words in token ids (longest trigger first, as A1111)."""

  def __init__(self, tokenizer, vectors: dict[str, object] | None = None,
               chunk_length: int = CHUNK_LENGTH):
    self.lengths: dict[str, int] = {}
    self._by_first: dict[int, list[tuple[tuple[int, ...], str]]] = {}
    for trigger, vecs in (vectors or {}).items():
      n = int(len(vecs))
      if not 1 <= n <= chunk_length:
        raise PromptError(f"embedding {trigger!r} has {n} vectors; a chunk holds 1 to "
                          f"{chunk_length}")
      ids = tuple(tokenizer(trigger, add_special_tokens=False)["input_ids"])
      if not ids:
        continue
      self.lengths[trigger] = n
      entries = self._by_first.setdefault(ids[0], [])
      entries.append((ids, trigger))
      entries.sort(key=lambda e: len(e[0]), reverse=True)

  def find(self, tokens: Sequence[int], at: int) -> tuple[str | None, int]:
    """(trigger, its length in tokens) starting at `tokens[at]`, or (None, 0)."""
    for ids, trigger in self._by_first.get(tokens[at], ()):
      if tuple(tokens[at:at + len(ids)]) == ids:
        return trigger, len(ids)
    return None, 0


def _special_ids(tokenizer) -> tuple[int, int, int, int | None]:
  bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
  pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
  return bos, eos, pad, tokenizer.get_vocab().get(",</w>")


def check_emphasis(emphasis: str) -> str:
  if emphasis not in EMPHASIS_MODES:
    raise PromptError(f"unknown emphasis {emphasis!r}; use one of {', '.join(EMPHASIS_MODES)}")
  return emphasis


def _runs(text: str, emphasis: str) -> list[tuple[str, float]]:
  """A text's (text, weight) runs under an emphasis mode."""
  if emphasis == "None":  # brackets, weights and BREAK are plain text
    return [(text, 1.0)]
  runs = parse_prompt_attention(text)
  if emphasis == "Ignore":  # parsed (brackets and BREAK act), the weights not applied
    return [run if run == BREAK else (run[0], 1.0) for run in runs]
  return runs


def tokenize_chunks(text: str, tokenizer, triggers: TriggerTable | None = None,
                    comma_backtrack: int = COMMA_BACKTRACK,
                    chunk_length: int = CHUNK_LENGTH, emphasis: str = "Original") -> Chunks:
  """Splits a prompt (without schedules) into weighted chunks, as A1111.

  A chunk takes `chunk_length` tokens (75: 77 with BOS and EOS, the CLIP text encoders' length);
  BREAK closes it early. When a chunk fills up and its last comma is at most `comma_backtrack`
  tokens back, the tokens after that comma move on to the next chunk. A trigger word takes as many
  positions as its embedding has vectors, in one chunk.
  """
  bos, eos, pad, comma = _special_ids(tokenizer)
  runs = _runs(text, check_emphasis(emphasis))
  token_lists = tokenizer([t for t, _ in runs], add_special_tokens=False)["input_ids"]
  chunks: list[_Chunk] = []
  chunk = _Chunk()
  last_comma = -1

  def close():
    nonlocal chunk, last_comma
    chunks.append(chunk)
    chunk, last_comma = _Chunk(), -1

  for tokens, (run_text, weight) in zip(token_lists, runs, strict=True):
    if (run_text, weight) == BREAK:
      close()
      continue
    pos = 0
    while pos < len(tokens):
      if tokens[pos] == comma:
        last_comma = len(chunk.tokens)
      elif (comma_backtrack and len(chunk.tokens) == chunk_length and last_comma != -1
            and len(chunk.tokens) - last_comma <= comma_backtrack):
        chunk = _move_after(chunk, last_comma + 1, close)
      if len(chunk.tokens) == chunk_length:
        close()
      trigger, span = triggers.find(tokens, pos) if triggers else (None, 0)
      if trigger is None:
        chunk.tokens.append(tokens[pos])
        chunk.weights.append(weight)
        pos += 1
        continue
      n = triggers.lengths[trigger]
      if len(chunk.tokens) + n > chunk_length:
        close()
      chunk.fixes.append((len(chunk.tokens), trigger))
      chunk.tokens += [0] * n  # placeholders (as A1111): the vectors replace their embeddings
      chunk.weights += [weight] * n
      pos += span
  if chunk.tokens or not chunks:
    close()
  return _finish(chunks, bos, eos, pad, chunk_length)


def _move_after(chunk: _Chunk, cut: int, close) -> _Chunk:
  """Closes `chunk` at `cut` and returns a new chunk holding what came after it."""
  # A1111 leaves a moved trigger's vectors behind (a bug); sdjax moves them with their positions.
  rest = _Chunk(chunk.tokens[cut:], chunk.weights[cut:],
                [(at - cut, t) for at, t in chunk.fixes if at >= cut])
  chunk.tokens, chunk.weights = chunk.tokens[:cut], chunk.weights[:cut]
  chunk.fixes = [(at, t) for at, t in chunk.fixes if at < cut]
  close()
  return rest


def _finish(chunks: list[_Chunk], bos: int, eos: int, pad: int, chunk_length: int) -> Chunks:
  """Wraps each chunk in BOS...EOS, pads to chunk_length + 2 (EOS then the pad token, as A1111's
  SD2 path)."""
  ids, weights, fixes = [], [], []
  for k, c in enumerate(chunks):
    n = len(c.tokens)
    ids.append((bos, *c.tokens, eos, *[pad] * (chunk_length - n)))
    weights.append((1.0, *c.weights, *[1.0] * (chunk_length + 1 - n)))
    fixes += [(k, at + 1, t) for at, t in c.fixes]
  return Chunks(tuple(ids), tuple(weights), tuple(fixes))


# -- a batch of prompts with schedules, packed for the compiled sampler ---------------------------
@struct.dataclass
class PromptBatch:
  """Prompts tokenized for A1111-style encoding; every array leads with the batch axis B.

  Each prompt has V variants (the distinct texts of its schedule) of K chunks of L tokens (the
  text encoder's length, 77 for CLIP). V and K are the batch's buckets: a prompt uses `chunks[b]`
  chunks (the rest is padding, masked out of cross-attention) and the variants with `counts > 0`.
  """

  ids: Any  # int32 [B, V, K, L]
  weights: Any  # float32 [B, V, K, L] attention weight per token
  counts: Any  # float32 [B, V] schedule entries that use each variant (0: padding)
  chunks: Any  # int32 [B] chunks in use
  schedule: Any  # int32 [B, T] the variant in force at each denoiser call
  token_embeds: Any = None  # (float32 [B, V, K, L, D], bool [B, V, K, L]) trigger vectors
  # int32 [B] chunks attended to, when not `chunks`: composable prompts' (a row per part) the
  # longest part's of the row's prompt; A1111's Pad conds' (`pad_conds`) the other side's.
  attend_chunks: Any = None
  # int32 [B]: past its own `chunks` and up to these a row repeats its last vector (as A1111 pads
  # composable parts, and Pad conds v0 a shorter negative prompt); None: no row does.
  repeat_chunks: Any = None
  # Emphasis restores each chunk's unweighted mean (A1111's "Original"; "No norm": False).
  normalize: bool = struct.field(pytree_node=False, default=True)
  # "ComfyUI" emphasis: the empty prompt's token ids (one chunk), whose encoding the weights
  # pull away from; static, so a sharded batch leaves it whole.
  empty_ids: tuple[int, ...] | None = struct.field(pytree_node=False, default=None)

  @property
  def context_length(self) -> int:
    return self.ids.shape[2] * self.ids.shape[3]


@dataclasses.dataclass(frozen=True)
class _Prompt:
  variants: tuple[Chunks, ...]
  counts: tuple[int, ...]
  schedule: tuple[int, ...]

  @property
  def chunks(self) -> int:
    return max(len(v.ids) for v in self.variants)


def _prompt(text: str, tokenizer, steps: int, calls: int, triggers, comma_backtrack,
            chunk_length: int, first_call: int = 0, emphasis: str = "Original",
            base_steps: int | None = None, old_timelines: bool = False) -> _Prompt:
  schedule = prompt_schedule(text, steps, base_steps, old_timelines)
  texts = list(dict.fromkeys(t for _, t in schedule))
  counts = [sum(t == u for _, u in schedule) for t in texts]
  ends = [end for end, _ in schedule]
  per_call = tuple(texts.index(schedule[schedule_index(ends, c)][1])
                   for c in range(first_call, first_call + calls))
  variants = tuple(tokenize_chunks(t, tokenizer, triggers, comma_backtrack, chunk_length,
                                   emphasis) for t in texts)
  return _Prompt(variants, tuple(counts), per_call)


def parse_prompts(prompts: Sequence[str], tokenizer, *, steps: int, calls: int,
                  embeddings: Mapping[str, Any] | None = None,
                  comma_backtrack: int = COMMA_BACKTRACK, first_call: int = 0,
                  chunk_length: int = CHUNK_LENGTH, emphasis: str = "Original",
                  base_steps: int | None = None, old_timelines: bool = False) -> list[_Prompt]:
  """Schedules and tokenizes prompts (A1111 syntax, extra-network tags already removed).

  Args:
    prompts: prompt texts.
    tokenizer: the text encoder's CLIP tokenizer.
    steps: the step count schedules are written against (A1111: sampler steps, doubled for
      second-order samplers).
    calls: denoiser calls the sampler makes; the schedule table has one entry per call.
    embeddings: textual-inversion vectors {trigger word: [n, D]} for this text encoder.
    first_call: A1111's call counter at the first call (a refiner continues the base's count).
    chunk_length: prompt tokens per chunk: the text encoder's max_position_embeddings - 2.
    emphasis: one of `EMPHASIS_MODES` (pack with the same).
    base_steps: a hires pass: the first pass's `steps` (A1111's offsets, see `prompt_schedule`).
    old_timelines: A1111's "Old prompt editing timelines" (`prompt_schedule`).
  """
  triggers = TriggerTable(tokenizer, embeddings, chunk_length) if embeddings else None
  return [_prompt(p, tokenizer, steps, calls, triggers, comma_backtrack, chunk_length, first_call,
                  emphasis, base_steps, old_timelines) for p in prompts]


def pack_prompts(prompts: Sequence[str] | Sequence[_Prompt], tokenizer, *, steps: int = 1,
                 calls: int = 1, embeddings: Mapping[str, Any] | None = None,
                 chunks: int | None = None, variants: int | None = None,
                 comma_backtrack: int = COMMA_BACKTRACK,
                 chunk_length: int = CHUNK_LENGTH, emphasis: str = "Original") -> PromptBatch:
  """Prompts (texts, or `parse_prompts`' output) as one `PromptBatch` of numpy arrays.

  `chunks` and `variants` are the bucket sizes (default: the batch's largest). Parsed prompts
  keep the chunk length and emphasis they were parsed with; `emphasis` also sets whether
  encoding restores the mean.
  """
  triggers = TriggerTable(tokenizer, embeddings, chunk_length) if embeddings else None
  parsed = [p if isinstance(p, _Prompt) else
            _prompt(p, tokenizer, steps, calls, triggers, comma_backtrack, chunk_length,
                    emphasis=emphasis) for p in prompts]
  length = len(parsed[0].variants[0].ids[0])
  k = max(p.chunks for p in parsed) if chunks is None else chunks
  v = max(len(p.variants) for p in parsed) if variants is None else variants
  if k < max(p.chunks for p in parsed) or v < max(len(p.variants) for p in parsed):
    raise ValueError("chunk or variant bucket smaller than a prompt needs")
  bos, eos, pad, _ = _special_ids(tokenizer)
  empty = _finish([_Chunk()], bos, eos, pad, length - 2)
  b, calls = len(parsed), len(parsed[0].schedule)
  ids = np.zeros((b, v, k, length), np.int32)
  weights = np.ones((b, v, k, length), np.float32)
  counts = np.zeros((b, v), np.float32)
  uses_triggers = any(var.fixes for p in parsed for var in p.variants)
  dim = next(iter(embeddings.values())).shape[-1] if uses_triggers else 0
  vectors = np.zeros((b, v, k, length, dim), np.float32) if uses_triggers else None
  where = np.zeros((b, v, k, length), bool) if uses_triggers else None
  for i, p in enumerate(parsed):
    for j in range(v):
      # Padding variants repeat the first; short variants end in empty chunks, as A1111 pads a
      # prompt's variants to its longest (those chunks are encoded and attended to).
      var = p.variants[j] if j < len(p.variants) else p.variants[0]
      for c in range(k):
        ids[i, j, c] = var.ids[c] if c < len(var.ids) else empty.ids[0]
        weights[i, j, c] = var.weights[c] if c < len(var.weights) else empty.weights[0]
      for c, at, trigger in var.fixes:
        vecs = np.asarray(embeddings[trigger], np.float32)
        vectors[i, j, c, at:at + len(vecs)] = vecs
        where[i, j, c, at:at + len(vecs)] = True
    counts[i, :len(p.counts)] = p.counts
  return PromptBatch(
      ids=ids, weights=weights, counts=counts,
      chunks=np.asarray([p.chunks for p in parsed], np.int32),
      schedule=np.asarray([p.schedule for p in parsed], np.int32).reshape(b, calls),
      token_embeds=None if not uses_triggers else (vectors, where),
      normalize=check_emphasis(emphasis) not in ("No norm", "ComfyUI"),
      empty_ids=tuple(int(i) for i in empty.ids[0]) if emphasis == "ComfyUI" else None)


def bucket(n: int) -> int:
  """The next power of two: variant buckets, so few shapes compile."""
  return 1 << max(n - 1, 0).bit_length()


# -- weighted encoding (traced) --------------------------------------------------------------------
# (ids [N, L], token_embeds or None) -> hidden [N, L, D], or (hidden, pooled [N, P]) for
# SDXL's second text encoder.
Encoder = Callable[..., Any]


def emphasize(z, weights, counts, chunks, normalize: bool = True):
  """A1111's "Original" emphasis: z [B, V, K, L, D] times the weights, rescaled per chunk.

  Per prompt and chunk, the mean of the weighted output is set back to the unweighted one, both
  taken over every token, channel and schedule entry (A1111 encodes a prompt's schedule texts as
  one batch and takes `z.mean()` of it). Without `normalize` ("No norm"): the weighted output.
  """
  if not normalize:
    return z * weights[..., None]
  b, v, k, length, dim = z.shape
  in_use = counts[:, :, None] * (jnp.arange(k)[None, :] < chunks[:, None])[:, None, :]  # B, V, K
  total = jnp.sum(in_use, axis=1) * (length * dim)  # B, K

  def mean(x):  # B, K
    sums = _pairwise_sum(x.reshape(b, v, k, length * dim))
    return jnp.einsum("bvk,bvk->bk", in_use, sums) / jnp.maximum(total, 1.0)

  weighted = z * weights[..., None]
  scale = jnp.where(total > 0, mean(z) / mean(weighted), 1.0)  # B, K
  return weighted * scale[:, None, :, None, None]


def _pairwise_sum(x):
  """The sum over the last axis as a tree of halves. The mean of CLIP's output is near zero, so
  the relative error of one long float32 sum carries into every weighted vector: up to 1.0e-5
  against a float64 reference on the tests' tiny encoders (on an AVX-512 CPU), 2-8e-7 pairwise."""
  n = x.shape[-1]
  size = 1 << max(n - 1, 0).bit_length()
  x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, size - n)])
  while x.shape[-1] > 1:
    half = x.shape[-1] // 2
    x = x[..., :half] + x[..., half:]
  return x[..., 0]


def encode_weighted(encode: Encoder, batch: PromptBatch):
  """Every variant's conditioning [B, V, K * L, D]: chunks encoded apart, then concatenated.

  With an encoder that also returns pooled outputs, returns (conditioning, pooled [B, V, P]) with
  the pooled output of each variant's first chunk, unweighted (as A1111 for SDXL). SDXL's two
  text encoders are two calls, each with its tokenizer's batch; their contexts concatenate on D.
  """
  b, v, k, length = batch.ids.shape
  n = b * v * k
  ids = batch.ids.reshape(n, length)
  token_embeds = None
  if batch.token_embeds is not None:
    vectors, where = batch.token_embeds
    token_embeds = (vectors.reshape(n, length, -1), where.reshape(n, length))
  if batch.empty_ids is not None:  # ComfyUI's: the empty prompt encoded in the same batch
    ids = jnp.concatenate([ids, jnp.asarray(batch.empty_ids, ids.dtype)[None]])
    if token_embeds is not None:
      token_embeds = tuple(jnp.concatenate([x, jnp.zeros_like(x[:1])]) for x in token_embeds)
  out = encode(ids, token_embeds)
  z, pooled = out if isinstance(out, tuple) else (out, None)
  z = z.astype(jnp.float32)
  if batch.empty_ids is not None:
    z, empty = z[:n], z[n:]
    pooled = None if pooled is None else pooled[:n]
    weights = batch.weights.reshape(n, length)[..., None]
    z = jnp.where(weights != 1.0, (z - empty) * weights + empty, z).reshape(b, v, k, length, -1)
  else:
    z = emphasize(z.reshape(b, v, k, length, -1), batch.weights, batch.counts, batch.chunks,
                  batch.normalize)
  z = z.reshape(b, v, k * length, -1)  # B, V, K*L, D
  if batch.repeat_chunks is not None:  # a part shorter than its prompt's longest: repeat the end
    at = jnp.arange(k * length)[None, :]
    last = jnp.where(at < (batch.repeat_chunks * length)[:, None],
                     jnp.minimum(at, (batch.chunks * length - 1)[:, None]), at)
    z = jnp.take_along_axis(z, last[:, None, :, None], axis=2)
  if pooled is None:
    return z
  return z, pooled.reshape(b, v, k, -1)[:, :, 0]  # B, V, P


def pad_conds(prompt: PromptBatch, negative: PromptBatch, v0: bool = False,
              parts: int = 1) -> tuple[PromptBatch, PromptBatch]:
  """A1111's "Pad prompt/negative prompt" (Pad conds) for a prompt and negative prompt of
  different lengths, per image: the shorter side goes on with empty-prompt chunks (the padding
  chunks, encoded and attended to) to the longer's length. With `v0` ("Pad conds v0", its padding
  before 1.6): the negative prompt takes the prompt's length, a shorter one repeating its last
  vector, a longer one cut. `parts`: the prompt's rows per image (composable prompts)."""
  own = prompt.chunks if prompt.attend_chunks is None else prompt.attend_chunks
  cond = np.asarray(own).reshape(-1, parts)[:, 0]  # B
  if v0:
    return prompt, negative.replace(attend_chunks=cond, repeat_chunks=cond)
  theirs = negative.chunks if negative.attend_chunks is None else negative.attend_chunks
  length = np.maximum(cond, np.asarray(theirs)).astype(np.int32)
  return (prompt.replace(attend_chunks=np.repeat(length, parts)),
          negative.replace(attend_chunks=length))


def context_bias(batch: PromptBatch) -> jax.Array | None:
  """Additive cross-attention bias [B, 1, 1, K*L] hiding each prompt's padding chunks."""
  b, _, k, length = batch.ids.shape
  if k == 1:
    return None
  chunks = batch.chunks if batch.attend_chunks is None else batch.attend_chunks
  valid = jnp.arange(k * length)[None, :] < (chunks * length)[:, None]  # B, K*L
  return jnp.where(valid, 0.0, jnp.finfo(jnp.float32).min)[:, None, None, :]


# -- saved styles (A1111's styles.csv) ------------------------------------------------------------
def merge_style(style_prompt: str, prompt: str) -> str:
  """A style's text applied to a prompt as A1111 applies it: in place of the style's `{prompt}`,
  else after the prompt, joined by ", " (an empty side adds nothing)."""
  if "{prompt}" in style_prompt:
    return style_prompt.replace("{prompt}", prompt)
  return ", ".join(part for part in (prompt.strip(), style_prompt.strip()) if part)


@dataclasses.dataclass(frozen=True)
class Styles:
  """A1111's saved styles: {name: (prompt, negative prompt)} from a styles.csv, and the names a
  run applies to every prompt without styles of its own (`default`)."""

  table: Mapping[str, tuple[str, str]]
  default: tuple[str, ...] = ()
  sha256: str = ""  # of the file, for a run's settings

  def apply(self, prompt: str, negative: str,
            names: Sequence[str] | None = None) -> tuple[str, str]:
    """(prompt, negative) with styles `names` (default: `default`) applied in order, as A1111's
    `apply_styles_to_prompt` does to each."""
    for name in self.default if names is None else names:
      if name not in self.table:
        known = ", ".join(sorted(self.table)) or "none"
        raise ValueError(f"unknown style {name!r} (the styles file has: {known})")
      style, style_negative = self.table[name]
      prompt, negative = merge_style(style, prompt), merge_style(style_negative, negative)
    return prompt, negative


def read_styles(path: str, default: Sequence[str] = ()) -> Styles:
  """A1111's styles.csv (columns `name`, `prompt` (older files: `text`), `negative_prompt`; UTF-8,
  a BOM allowed), read as A1111 reads it; ValueError in one line for a file it cannot be."""
  import csv  # noqa: PLC0415
  import hashlib  # noqa: PLC0415
  import io  # noqa: PLC0415

  try:
    with open(path, "rb") as f:
      data = f.read()
  except OSError as e:
    raise ValueError(f"cannot read styles file {path}: {e.strerror or e}") from None
  try:
    reader = csv.DictReader(io.StringIO(data.decode("utf-8-sig"), newline=""),
                            skipinitialspace=True)
    rows = list(reader)
  except (UnicodeDecodeError, csv.Error) as e:
    raise ValueError(f"styles file {path} is not a UTF-8 CSV file ({e})") from None
  columns = reader.fieldnames or []
  if "name" not in columns or not ({"prompt", "text"} & set(columns)):
    raise ValueError(f"styles file {path} needs the columns name, prompt (and negative_prompt), "
                     f"as A1111's styles.csv; it has {', '.join(columns) or 'none'}")
  table = {row["name"]: (row.get("prompt", row.get("text")) or "",
                         row.get("negative_prompt") or "") for row in rows if row.get("name")}
  styles = Styles(table, tuple(default), hashlib.sha256(data).hexdigest())
  styles.apply("", "")  # the default names exist
  return styles
