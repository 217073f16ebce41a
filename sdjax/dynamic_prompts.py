"""Dynamic prompts: the templates of A1111's sd-dynamic-prompts extension, for making datasets.

`a {red|green|blue} __animal__ on {2$$ and $$grass|sand|snow}` is a template: `{a|b}` picks one
option (`{0.5::a|2::b}` weighted, `{2$$a|b|c}` two of them joined by `, `, `{1-3$$ and $$...}`
one to three joined by ` and `), `__name__` a line of `name.txt` in the wildcards folder
(`__colors/*__` any file under `colors/`), and options and wildcard lines may hold templates
too. The templates are read by the `dynamicprompts` library, which the extension (and ComfyUI's
and InvokeAI's nodes) use; sdjax decides which text each image gets:

- random: each image's prompt is the template sampled with its own seed (the library's
  `RandomPromptGenerator.generate(template, 1, seeds=[seed])`), and its negative prompt likewise
  with the same seed, as the extension samples them with each image's seed. An image's prompt
  thus depends on its seed alone: the same on 1 device or 64, in any shard, after a resume.
- combinatorial: every prompt the template can make (`CombinatorialPromptGenerator`, in its
  order, at most `max_generations` of them; 0: all), crossed with every negative prompt its
  template makes, prompts outer, as the extension's combinatorial generation does; each becomes
  a prompt of its own, with the run's (or the line's) number of images.

The library is optional (`pip install dynamicprompts`, or sdjax's `dynamic` extra); runs
without `--dynamic_prompts` never import it.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import random
from collections.abc import Iterator

MODES = ("off", "random", "combinatorial")
# A template without these is plain text, and the library returns it unchanged: `{` variants,
# `__` wildcards, `$` variables, `%` wraps, `#`, `//` and `/*` comments (and tabs, which its
# parser expands to spaces).
SYNTAX = ("{", "__", "$", "%", "#", "//", "/*", "\t")


class TemplateError(ValueError):
  """A template the library cannot read, or a wildcard with no lines: one line that says so."""


def is_template(text: str) -> bool:
  """Whether `text` holds any dynamic-prompts syntax (else it is its own only prompt)."""
  return any(s in text for s in SYNTAX)


@dataclasses.dataclass(frozen=True)
class DynamicPrompts:
  """How a run reads its prompts as templates: `mode` (random or combinatorial), the wildcards
  folder (`__name__` reads `name.txt` there) and combinatorial's cap per template."""

  mode: str = "random"
  wildcards_dir: str | None = None
  max_generations: int = 0  # combinatorial: prompts per template (0: all)

  def __post_init__(self):
    if self.mode not in MODES[1:]:
      raise TemplateError(f"dynamic prompts mode must be random or combinatorial, got "
                          f"{self.mode!r}")
    if self.wildcards_dir is not None and not os.path.isdir(self.wildcards_dir):
      raise TemplateError(f"--wildcards_dir {self.wildcards_dir} is not a folder")
    if self.max_generations < 0:
      raise TemplateError(f"--max_generations must be 0 (all) or more, got "
                          f"{self.max_generations}")
    _library()  # fail now, not at the first template

  def sample(self, template: str, seed: int) -> str:
    """The text `template` gives the image with this seed (random mode's rule, in any mode)."""
    if not is_template(template):
      return template
    context, command = self._context("random", template)
    context.rand.seed(seed)
    return _run(template, lambda: str(next(iter(context.sample_prompts(command, 1)))))

  def combinations(self, template: str) -> Iterator[str]:
    """Every text `template` makes, in the library's order, at most `max_generations`."""
    if not is_template(template):
      yield template
      return
    context, command = self._context("combinatorial", template)
    results = iter(context.sample_prompts(command, self.max_generations or None))
    while True:
      text = _run(template, lambda: next(results, None))
      if text is None:
        return
      yield str(text)

  def pairs(self, prompt: str, negative: str) -> Iterator[tuple[str, str]]:
    """Combinatorial: (prompt, negative prompt) for every prompt crossed with every negative."""
    negatives = list(self.combinations(negative))
    for text in self.combinations(prompt):
      for neg in negatives:
        yield text, neg

  def count(self, template: str) -> int:
    """How many texts `combinations` makes (enumerated: templates are cheap to expand);
    `pairs(p, n)` makes count(p) * count(n) of them (an empty negative prompt counts 1)."""
    return sum(1 for _ in self.combinations(template))

  def settings(self) -> dict:
    """What decides the texts: the mode, the cap and the wildcard files' names and contents."""
    return {"mode": self.mode, "max_generations": self.max_generations,
            "wildcards_sha256": _folder_digest(self.wildcards_dir)}

  def _context(self, mode: str, template: str):
    lib = _library()
    method = lib.SamplingMethod.RANDOM if mode == "random" else lib.SamplingMethod.COMBINATORIAL
    context = lib.SamplingContext(wildcard_manager=_wildcards(self.wildcards_dir),
                                  default_sampling_method=method, rand=random.Random())
    return context, _run(template, lambda: _parse(template, self.wildcards_dir))


@functools.lru_cache(maxsize=4096)
def _parse(template: str, wildcards_dir: str | None):
  """The library's command tree of a template, its wildcards checked: a missing one is an
  error for every seed, not only those that pick it. The library's parser (pyparsing) takes
  ~3.5 ms a template, 20x its sampling: the common ones (variants and wildcards, nothing
  else) are read by `_quick_parse` into the tree the library's parser makes."""
  command = _quick_parse(template)
  if command is None:
    command = _library().parse(template)
  _check_wildcards(command, _wildcards(wildcards_dir))
  return command


# Templates `_quick_parse` leaves to the library: comments (a `/*` without a `*/` is none: a
# glob `__dir/*__`), variables, wraps, weights, bounds, tabs (its parser expands them).
_QUICK_EXCLUDED = ("#", "$", "%", "\t", "::", "//", "*/")
_WHITESPACE = " \r\n"  # pyparsing's White(): skipped before each variant option
_SAMPLERS = "~!@"  # a variant's or wildcard's own sampler: left to the library


class _Unsure(Exception):
  """The quick parser met something it leaves to the library."""


def _quick_parse(template: str):
  """The library's command tree of `template` when it holds only literal text, `{a|b}`
  variants (nested, any options) and `__name__` wildcards; else None. Built with the
  library's own command classes, the same tree as its parser's (tests compare them on many
  random templates)."""
  if any(s in template for s in _QUICK_EXCLUDED):
    return None
  try:
    command, end = _quick_sequence(template, 0, inside=False)
  except _Unsure:
    return None
  return command if end == len(template) else None


def _quick_sequence(text: str, i: int, inside: bool):
  """(command, end) of the chunks from `i` to the end (or, `inside` a variant, to its next
  `|` or `}`): one chunk as itself, else a SequenceCommand."""
  from dynamicprompts.commands import LiteralCommand, SequenceCommand  # noqa: PLC0415

  chunks, n = [], len(text)
  while i < n and not (inside and text[i] in "|}"):
    if text[i] == "{":
      command, i = _quick_variant(text, i)
    elif text.startswith("__", i):
      command, i = _quick_wildcard(text, i)
    else:
      start = i
      while i < n and text[i] != "{" and not text.startswith("__", i) and not (
          inside and text[i] in "|}"):
        i += 1
      command = LiteralCommand(text[start:i])
    chunks.append(command)
  return (chunks[0] if len(chunks) == 1 else SequenceCommand(tokens=chunks)), i


def _quick_variant(text: str, i: int):
  from dynamicprompts.commands import VariantCommand, VariantOption  # noqa: PLC0415

  options = []
  i += 1
  while True:
    while i < len(text) and text[i] in _WHITESPACE:
      i += 1
    if i < len(text) and text[i] in _SAMPLERS and not options:
      raise _Unsure
    command, i = _quick_sequence(text, i, inside=True)
    options.append(VariantOption(command))
    if i >= len(text):
      raise _Unsure  # unclosed: the library says what is wrong
    i += 1
    if text[i - 1] == "}":
      return VariantCommand(options), i


def _quick_wildcard(text: str, i: int):
  from dynamicprompts.commands import WildcardCommand  # noqa: PLC0415

  end = text.find("__", i + 2)
  name = text[i + 2:end]
  if end < 0 or not name or name[0] in _SAMPLERS or any(c in name for c in "(){}|"):
    raise _Unsure
  return WildcardCommand(name), end + 2


def _check_wildcards(node, manager) -> None:
  """Every wildcard named literally in a command tree has lines (else `get_values` raises)."""
  if type(node).__name__ == "WildcardCommand" and isinstance(node.wildcard, str):
    manager.get_values(node.wildcard)
  if dataclasses.is_dataclass(node):
    for field in dataclasses.fields(node):
      _check_wildcards(getattr(node, field.name), manager)
  elif isinstance(node, (list, tuple)):
    for item in node:
      _check_wildcards(item, manager)


def _run(template: str, step):
  """`step()`, with the library's errors as one line naming the template."""
  lib = _library()
  try:
    return step()
  except TemplateError:
    raise
  except lib.ParseException as e:
    raise TemplateError(f"cannot read the dynamic prompt {template!r}: {e.msg} at character "
                        f"{e.loc + 1} (a literal $, % or __ is template syntax)") from None
  except (ValueError, KeyError, RecursionError) as e:
    raise TemplateError(f"cannot expand the dynamic prompt {template!r}: {e}") from None


@dataclasses.dataclass(frozen=True)
class _Library:
  parse: object
  ParseException: type
  SamplingContext: type
  SamplingMethod: type
  WildcardManager: type


_LIBRARY: list[_Library] = []
_MANAGERS: dict[str | None, object] = {}


def _library() -> _Library:
  if not _LIBRARY:
    try:
      from dynamicprompts.enums import SamplingMethod  # noqa: PLC0415
      from dynamicprompts.parser.parse import parse  # noqa: PLC0415
      from dynamicprompts.sampling_context import SamplingContext  # noqa: PLC0415
      from dynamicprompts.wildcards import WildcardManager  # noqa: PLC0415
      from pyparsing import ParseException  # noqa: PLC0415
    except ImportError:
      raise TemplateError("--dynamic_prompts reads templates with the dynamicprompts package: "
                          "pip install dynamicprompts (or sdjax's [dynamic] extra)") from None

    class Wildcards(WildcardManager):
      """A wildcard with no lines is an error (the library would leave `__name__` in the
      prompt and log a warning, which a long run buries)."""

      def get_values(self, wildcard):
        values = super().get_values(wildcard)
        if not values:
          where = f"in --wildcards_dir {self.path}" if self.path else "(no --wildcards_dir)"
          raise TemplateError(f"wildcard __{wildcard}__ has no lines {where}")
        return values

    _LIBRARY.append(_Library(parse, ParseException, SamplingContext, SamplingMethod,
                             Wildcards))
  return _LIBRARY[0]


def _wildcards(folder: str | None):
  """One wildcard manager per folder (it caches the files it has read)."""
  if folder not in _MANAGERS:
    _MANAGERS[folder] = _library().WildcardManager(folder)
  return _MANAGERS[folder]


def _folder_digest(folder: str | None) -> str | None:
  """sha256 over a folder's files (relative names and contents, in sorted order)."""
  if folder is None:
    return None
  digest = hashlib.sha256()
  for root, dirs, files in os.walk(folder):
    dirs.sort()
    for name in sorted(files):
      path = os.path.join(root, name)
      digest.update(os.path.relpath(path, folder).encode() + b"\0")
      with open(path, "rb") as f:
        digest.update(hashlib.sha256(f.read()).digest())
  return digest.hexdigest()
