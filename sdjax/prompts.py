"""Prompts as the AUTOMATIC1111 web UI reads them.

Parsing (pure Python, no model):
- `parse_prompt_attention`: `(x)` x1.1, `[x]` /1.1, `(x:1.5)`, escapes, BREAK -> (text, weight) runs.
- `prompt_schedule`: prompt editing `[from:to:when]`, `[to:when]`, `[from::when]` and alternation
  `[a|b|c]` -> the prompt text in force up to each step.
- `extract_extra_networks` / `lora_tags`: `<lora:name:w>` tags, removed from the text.

Encoding (`tokenize_chunks`, `PromptBatch`, `encode_weighted`): 75-token chunks wrapped in
BOS...EOS, BREAK and the comma backtrack rule, textual-inversion vectors at their positions,
per-token weights on the encoder output rescaled to the unweighted mean.

The behaviour follows A1111's `modules/prompt_parser.py`, `sd_hijack_clip.py`, `sd_emphasis.py`
("Original" emphasis) and `extra_networks.py`; the code is sdjax's own (a small recursive-descent
parser instead of A1111's lark grammar).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

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


def _resolve_step(number: str, steps: int) -> int:
  """The last step of a `[...:when]`: a fraction of `steps` if written with a dot, else a step."""
  value = float(number)
  if "." in number:
    value *= steps
  return steps if value >= steps else int(value)


def _collect_steps(nodes: list, steps: int, out: set[int]) -> None:
  for node in nodes:
    if isinstance(node, _Scheduled):
      when = _resolve_step(node.number, steps)
      if when >= 1:
        out.add(when)
      _collect_steps(node.before or [], steps, out)
      _collect_steps(node.after, steps, out)
    elif isinstance(node, _Alternate):
      out.update(range(1, steps + 1))
      for option in node.options:
        _collect_steps(option, steps, out)


def _text_at(nodes: list, step: int, steps: int) -> str:
  parts = []
  for node in nodes:
    if isinstance(node, str):
      parts.append(node)
    elif isinstance(node, _Scheduled):
      early = step <= _resolve_step(node.number, steps)
      parts.append(_text_at((node.before or []) if early else node.after, step, steps))
    else:
      parts.append(_text_at(node.options[(step - 1) % len(node.options)], step, steps))
  return "".join(parts)


def prompt_schedule(prompt: str, steps: int) -> list[tuple[int, str]]:
  """[(last step, text)] for a prompt with editing/alternation, as A1111's schedules.

  `prompt_schedule("a [b:3]", 10) == [(3, "a "), (10, "a b")]`: the text is "a " while the
  step counter is at most 3.
  """
  nodes = _ScheduleParser(prompt).top()
  if nodes is None:
    return [(steps, prompt)]
  ends = {steps}
  _collect_steps(nodes, steps, ends)
  return [(end, _text_at(nodes, end, steps)) for end in sorted(ends)]


def schedule_index(ends: Sequence[int], step: int) -> int:
  """Which schedule entry is in force at denoiser call `step` (0-based), as A1111 picks it."""
  for k, end in enumerate(ends):
    if step <= end:
      return k
  return 0


# -- extra networks (<lora:name:w>) ----------------------------------------------------------------
_EXTRA_NETWORK_RE = re.compile(r"<(\w+):([^>]+)>")


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


def lora_tags(prompt: str) -> tuple[str, tuple[LoraTag, ...]]:
  """The prompt without its extra-network tags, and its `<lora:name:te:unet>` tags.

  `<lora:name>` is scale 1; `<lora:name:w>` scales both text encoder and UNet by w;
  `<lora:name:te:unet>` (or `te=`/`unet=`) scales them apart. Other kinds (`<hypernet:...>`) are
  removed and ignored, as A1111 skips extra networks it does not know.
  """
  text, found = extract_extra_networks(prompt)
  return text, tuple(_lora_tag(args, prompt) for kind, args in found if kind == "lora")
