"""A1111 prompt syntax: the parser against A1111's own docstring examples; weighted encoding."""

import pytest

from sdjax import prompts
from sdjax.prompts import parse_prompt_attention, prompt_schedule


# -- attention weights: modules/prompt_parser.py parse_prompt_attention's docstring ----------------
@pytest.mark.parametrize("text,expected", [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).", [
        ("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1),
        ("hill", 0.55), (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1)]),
])
def test_attention_docstring_examples(text, expected):
  assert parse_prompt_attention(text) == expected  # exact floats, products included


@pytest.mark.parametrize("text,expected", [
    ("", [("", 1.0)]),
    ("[a] (b:0.5) (c: 1.5 )", [("a", 1 / 1.1), (" ", 1.0), ("b", 0.5), (" ", 1.0), ("c", 1.5)]),
    ("a BREAK b", [("a", 1.0), prompts.BREAK, ("b", 1.0)]),
    ("BREAK", [("", 1.0), prompts.BREAK, ("", 1.0)]),
    # Inside brackets BREAK is weighted too, and then A1111 reads it as the word "BREAK".
    ("(a BREAK b)", [("a", 1.1), ("BREAK", -1.1), ("b", 1.1)]),
    ("x:1.5) \\\\ y\\z", [("x:1.5) \\ yz", 1.0)]),  # no open bracket; a lone backslash vanishes
    ("[[a]", [("a", 1 / 1.1 / 1.1)]),
])
def test_attention_edge_cases(text, expected):
  assert parse_prompt_attention(text) == expected


def test_attention_bad_weight():
  with pytest.raises(prompts.PromptError, match="bad attention weight '1.2.3'"):
    parse_prompt_attention("(a:1.2.3)")


# -- schedules: get_learned_conditioning_prompt_schedules' docstring (steps=10) --------------------
def _alternating(a, b, steps=10):
  return [(s, a if s % 2 else b) for s in range(1, steps + 1)]


@pytest.mark.parametrize("prompt,expected", [
    ("test", [(10, "test")]),
    ("a [b:3]", [(3, "a "), (10, "a b")]),
    ("a [b: 3]", [(3, "a "), (10, "a b")]),
    ("a [[[b]]:2]", [(2, "a "), (10, "a [[b]]")]),
    ("[(a:2):3]", [(3, ""), (10, "(a:2)")]),
    ("a [b : c : 1] d", [(1, "a b  d"), (10, "a  c  d")]),
    ("a[b:[c:d:2]:1]e", [(1, "abe"), (2, "ace"), (10, "ade")]),
    ("a [unbalanced", [(10, "a [unbalanced")]),
    ("a [b:.5] c", [(5, "a  c"), (10, "a b c")]),
    ("((a][:b:c [d:3]", [(3, "((a][:b:c "), (10, "((a][:b:c d")]),
    ("[a|(b:1.1)]", _alternating("a", "(b:1.1)")),
    ("[fe|]male", _alternating("female", "male")),
    ("[fe|||]male", [(s, "female" if s % 4 == 1 else "male") for s in range(1, 11)]),
    # Not in the docstring: a step past the end clamps; a `|` outside brackets leaves it all text.
    ("a [b:1.5] c", [(10, "a  c")]),
    ("a|b [c:2]", [(10, "a|b [c:2]")]),
])
def test_schedule_docstring_examples(prompt, expected):
  assert prompt_schedule(prompt, 10) == expected


def test_schedule_stale_docstring_example():
  # The docstring says [[5, 'a  c'], [10, 'a {b|d{ c']] ("not handling this right now"), but with
  # A1111's grammar (lark 1.1.2, its pinned version, and later ones) `|` outside an alternation is
  # a syntax error, so A1111 encodes the prompt as written. sdjax does what A1111 does.
  assert prompt_schedule("a [{b|d{:.5] c", 10) == [(10, "a [{b|d{:.5] c")]


def test_schedule_module_comment_example():
  prompt = ("fantasy landscape with a [mountain:lake:0.25] and [an oak:a christmas tree:0.75]"
            "[ in foreground::0.6][ in background:0.25] [shoddy:masterful:0.5]")
  assert prompt_schedule(prompt, 100) == [
      (25, "fantasy landscape with a mountain and an oak in foreground shoddy"),
      (50, "fantasy landscape with a lake and an oak in foreground in background shoddy"),
      (60, "fantasy landscape with a lake and an oak in foreground in background masterful"),
      (75, "fantasy landscape with a lake and an oak in background masterful"),
      (100, "fantasy landscape with a lake and a christmas tree in background masterful"),
  ]


def test_schedule_index_counts_denoiser_calls():
  # get_learned_conditioning's docstring: 'a [blue:green:5] jeweled crown' at 20 steps.
  schedule = prompt_schedule("a [blue:green:5] jeweled crown", 20)
  assert schedule == [(5, "a blue jeweled crown"), (20, "a green jeweled crown")]
  ends = [end for end, _ in schedule]
  # A1111's denoiser counts calls from 0 and keeps an entry while the count is <= its end.
  assert [prompts.schedule_index(ends, c) for c in range(8)] == [0] * 6 + [1] * 2
  assert prompts.schedule_index(ends, 25) == 0  # past every end: the first entry, as A1111


# -- extra networks: modules/extra_networks.py -----------------------------------------------------
def test_extra_networks_removed_in_order():
  text, found = prompts.extract_extra_networks(
      "1girl, <hypernet:agm:1.1> <extrasupernet:master:12:13:14> <hypernet:ray>")
  assert text == "1girl,   "
  assert found == [("hypernet", ("agm", "1.1")), ("extrasupernet", ("master", "12", "13", "14")),
                   ("hypernet", ("ray",))]


def test_lora_tags():
  text, tags = prompts.lora_tags(
      "a <lora:one> b <lora:two:0.5> <lora:three:0.2:0.9><lora:four:te=0.3:unet=0.7> <hn:x:1>")
  assert text == "a  b   "
  assert tags == (prompts.LoraTag("one", 1.0, 1.0), prompts.LoraTag("two", 0.5, 0.5),
                  prompts.LoraTag("three", 0.2, 0.9), prompts.LoraTag("four", 0.3, 0.7))
  with pytest.raises(prompts.PromptError, match="bad multiplier in <lora:x:strong>"):
    prompts.lora_tags("<lora:x:strong>")
