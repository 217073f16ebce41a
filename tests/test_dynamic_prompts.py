"""Dynamic prompts (sd-dynamic-prompts templates) against the dynamicprompts library's own
generators, in plans and in a main.py run."""

import itertools
import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from sdjax import outputs
from sdjax.dynamic_prompts import DynamicPrompts, TemplateError, is_template
from sdjax.plan import Plan, PromptLine, RunError

dynamicprompts = pytest.importorskip("dynamicprompts")
from dynamicprompts.generators import (  # noqa: E402
  CombinatorialPromptGenerator,
  RandomPromptGenerator,
)
from dynamicprompts.wildcards import WildcardManager  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEMPLATES = [
    "a {red|green|blue} {cat|dog} in the {park|snow}",
    "{0.5::rare|3::common|1.5::odd} shape",  # weighted
    "a {2$$red|green|blue|white} flag",  # two of them, joined by ","
    "{1-3$$ and $$cats|dogs|birds|fish}",  # one to three, custom separator
    "a {big {red|blue}|small} __animal__",  # nested, and a wildcard
    "__colors/*__ sky, {2$$__animal__}",  # a glob, two lines of a wildcard
    "__colors/warm__ {sun|moon} # a comment",
    "{|empty|options|}",
    "plain text, no syntax",
]


@pytest.fixture(scope="module")
def wildcards(tmp_path_factory):
  folder = tmp_path_factory.mktemp("wildcards")
  (folder / "colors").mkdir()
  (folder / "colors" / "warm.txt").write_text("red\norange\n# a comment line\n\nyellow\n")
  (folder / "colors" / "cold.txt").write_text("blue\ncyan\n")
  (folder / "animal.txt").write_text("cat\nfox\nowl {at night|at dawn}\n")  # lines are templates
  return str(folder)


@pytest.mark.parametrize("template", TEMPLATES)
def test_random_matches_the_library(template, wildcards):
  ours = DynamicPrompts("random", wildcards)
  seeds = list(range(40)) + [2**32 - 1]
  library = RandomPromptGenerator(WildcardManager(wildcards))
  # An image's text depends on its seed alone: the library's one-image call with that seed,
  # and its batched call with every image's seed (the extension's) give the same texts.
  alone = [library.generate(template, 1, seeds=[s])[0] for s in seeds]
  assert [ours.sample(template, s) for s in seeds] == alone
  assert library.generate(template, len(seeds), seeds=seeds) == alone
  if is_template(template) and "$$" not in template:
    assert len(set(alone)) > 1  # the seeds do pick different texts


@pytest.mark.parametrize("template", TEMPLATES)
@pytest.mark.parametrize("cap", [0, 5])
def test_combinatorial_matches_the_library(template, cap, wildcards):
  ours = DynamicPrompts("combinatorial", wildcards, max_generations=cap)
  library = CombinatorialPromptGenerator(WildcardManager(wildcards))
  expected = library.generate(template, cap or None)
  assert list(ours.combinations(template)) == expected
  assert ours.count(template) == len(expected)
  negatives = library.generate("{ugly|blurry}", cap or None)
  # The extension's cross product: every prompt with every negative prompt, prompts outer.
  assert list(ours.pairs(template, "{ugly|blurry}")) == list(
      itertools.product(expected, negatives))


def test_plain_text_is_its_own_prompt():
  """Text without template syntax skips the library: it would return it unchanged."""
  library = RandomPromptGenerator(WildcardManager(None))
  rng = random.Random(0)
  alphabet = "abc XYZ,.:;!?()[]<>|}_/\\'\"-+=*&^~`@0123456789\u00e9\u4e00"
  texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40))) for _ in range(400)]
  texts = [t for t in texts if not any(s in t for s in ("__", "//", "/*"))]  # syntax
  assert len(texts) > 300
  texts += ["(masterpiece:1.2), [a:b:0.5], <lora:x:1> BREAK x", " lead", "trail  ", "a_b"]
  for text in texts:
    assert not is_template(text)
    assert library.generate(text, 1, seeds=[1]) == [text], text
  # The library's parser expands tabs: text with one goes through it.
  assert is_template("a\tb") and DynamicPrompts().sample("a\tb", 1) == "a       b"


def _random_template(rng: random.Random, depth: int = 0) -> str:
  """Variants (nested, options with leading and trailing whitespace, empty ones), wildcards
  (globs, odd underscores) and literal text with A1111 syntax in it."""
  parts = []
  for _ in range(rng.randint(1, 4)):
    r = rng.random()
    if r < 0.3 and depth < 3:
      parts.append("{" + "|".join(rng.choice(["", " ", "\n "]) + _random_template(rng, depth + 1)
                                  + rng.choice(["", " "]) for _ in range(rng.randint(1, 4))) + "}")
    elif r < 0.45:
      parts.append("__" + rng.choice(["x", "a/b", "c/*", " sp ", "_u", "w_"]) + "__")
    else:
      parts.append(rng.choice(["a ", "red", " big cat, ", "x_y", "(w:1.2)", "[a:b:3]", "\u00e9"]
                              + (["}", "|"] if depth == 0 else [])))
  return "".join(parts)


def test_quick_parse_is_the_library_parse():
  """The library's parser takes ~3.5 ms a template; sdjax reads variants and wildcards itself
  into the very tree the library's parser makes, and leaves the rest (or anything unclear) to
  it: checked on structured templates and on soups of syntax characters."""
  from dynamicprompts.parser.parse import parse  # noqa: PLC0415

  from sdjax.dynamic_prompts import _quick_parse  # noqa: PLC0415

  rng = random.Random(0)
  structured = [_random_template(rng) for _ in range(400)]
  pieces = ["a", " ", "{", "}", "|", "_", "__", "\n", "/", "*", "~", "x y", "(", ")", ":", ",",
            "0.5", "/*", "*/", "\u00e9"]
  soups = ["".join(rng.choice(pieces) for _ in range(rng.randint(1, 14))) for _ in range(1500)]
  for templates, least in ((structured, 0.5), (soups, 0.3)):
    quick = [(t, _quick_parse(t)) for t in templates]
    read = [(t, q) for t, q in quick if q is not None]
    assert len(read) > least * len(templates)
    for template, command in read:
      assert command == parse(template), template
  assert _quick_parse("a {red|blue} __colors/*__, {big|small}") is not None


def test_errors_are_one_line(wildcards):
  ours = DynamicPrompts("random", wildcards)
  with pytest.raises(TemplateError, match=r"'50% off'.*a literal \$, % or __"):
    ours.sample("50% off", 0)
  with pytest.raises(TemplateError, match=r"wildcard __nope__ has no lines in --wildcards_dir"):
    ours.sample("a {__nope__|x}", 3)  # this seed picks x: missing is an error for every seed
  with pytest.raises(TemplateError, match=r"wildcard __animal__ has no lines \(no --wildcards"):
    DynamicPrompts("combinatorial").count("a __animal__")
  with pytest.raises(TemplateError, match="not a folder"):
    DynamicPrompts("random", os.path.join(wildcards, "missing"))


def _jobs(plan):
  return [job for shard in range(plan.num_shards) for job in plan.jobs(shard)]


def _plan(path, mode, wildcards, shard_size, negative="{ugly|blurry}", prompts=()):
  return Plan(prompts, str(path), num_images_per_prompt=2, seed=100, negative_prompt=negative,
              shard_size=shard_size, comments=True, dynamic=DynamicPrompts(mode, wildcards))


@pytest.fixture
def prompts_file(tmp_path):
  path = tmp_path / "prompts.jsonl"
  lines = [{"prompt": "a {red|blue} __animal__"},
           {"prompt": "a plain line"},
           {"prompt": "a {small|big} house", "negative_prompt": "", "seed": 7, "num_images": 3},
           {"prompt": "__colors/cold__ sea", "negative_prompt": "{dark|grey|dull}"}]
  path.write_text("".join(json.dumps(x) + "\n" for x in lines))
  return path


@pytest.mark.parametrize("mode", ["random", "combinatorial"])
def test_plans_stream_and_shard(mode, prompts_file, wildcards):
  jobs = _jobs(_plan(prompts_file, mode, wildcards, shard_size=1000,
                     prompts=(PromptLine("{one|two} cli prompt"),)))
  # Any shard size makes the same images: shards start anywhere inside a line's texts.
  for size in (1, 3, 5):
    assert _jobs(_plan(prompts_file, mode, wildcards, shard_size=size,
                       prompts=(PromptLine("{one|two} cli prompt"),))) == jobs
  assert [j.index for j in jobs] == list(range(len(jobs)))
  sample = DynamicPrompts("random", wildcards).sample
  if mode == "random":  # 2 + 2 + 2 + 3 + 2 images, each text its seed's pick
    assert len(jobs) == 11
    for job in jobs:
      assert job.prompt == sample(job.template or job.prompt, job.seed)
      assert job.negative_prompt == sample(job.negative_template or "", job.seed)
    assert [j.seed for j in jobs] == [100, 101, 102, 103, 104, 105, 7, 8, 9, 109, 110]
  else:  # every text of the prompt x every negative, each twice (the line's 3 times)
    expected = [(p, n) for line, negatives in (
        (["one cli prompt", "two cli prompt"], ["ugly", "blurry"]),
        ([f"a {c} {a}" for c in ("red", "blue") for a in ("cat", "fox", "owl at night",
                                                         "owl at dawn")], ["ugly", "blurry"]),
        (["a plain line"], ["ugly", "blurry"]),
        (["a small house", "a big house"], [""]),
        (["blue sea", "cyan sea"], ["dark", "grey", "dull"]))
        for p in line for n in negatives]
    counts = [2] * 4 + [2] * 16 + [2] * 2 + [3] * 2 + [2] * 6
    assert [(j.prompt, j.negative_prompt) for j in jobs] == [
        pair for pair, n in zip(expected, counts, strict=True) for _ in range(n)]
    assert [j.seed for j in jobs if j.prompt.endswith("house")] == list(range(7, 13))
  assert {j.template for j in jobs} == {"{one|two} cli prompt", "a {red|blue} __animal__",
                                        None, "a {small|big} house", "__colors/cold__ sea"}
  assert {j.negative_template for j in jobs} == {"{ugly|blurry}", None, "{dark|grey|dull}"}


def test_plan_errors_name_the_line(tmp_path, wildcards):
  path = tmp_path / "prompts.txt"
  path.write_text("a {red|blue} cat\n# a comment\n50% off\n")
  plan = _plan(path, "random", wildcards, shard_size=2, negative="")
  assert [j.prompt for j in plan.jobs(0)] == [plan.dynamic.sample("a {red|blue} cat", s)
                                              for s in (100, 101)]
  with pytest.raises(RunError, match=r"prompts.txt line 3: cannot read the dynamic prompt"):
    list(plan.jobs(1))  # a random run's line fails when reached
  with pytest.raises(RunError, match=r"prompts.txt line 3: cannot read"):
    _plan(path, "combinatorial", wildcards, shard_size=2)  # counted up front
  with pytest.raises(RunError, match=r"--negative_prompt: cannot read"):
    _plan(path, "combinatorial", wildcards, shard_size=2, negative="100%")


def test_main_py_random_run(model, cache, wildcards, tmp_path):
  """A main.py run: each image is the image of its picked text, and says its template."""
  template, seed = "a {red|green} __animal__, {0.5::sunny|2::rainy}", 5
  text = DynamicPrompts("random", wildcards).sample(template, seed)
  prompts = tmp_path / "prompts.jsonl"
  prompts.write_text(json.dumps({"prompt": template, "seed": seed, "num_images": 2}) + "\n"
                     + json.dumps({"prompt": text, "seed": seed}) + "\n")
  out = tmp_path / "out"
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  subprocess.run([sys.executable, os.path.join(ROOT, "main.py"), "--model", model,
                  "--prompts_file", str(prompts), "--dynamic_prompts", "random",
                  "--wildcards_dir", wildcards, "--negative_prompt", "{ugly|dull}", "--steps",
                  "2", "--height", "16", "--width", "16", "--output_dir", str(out),
                  "--compilation_cache", cache], cwd=ROOT, env=env, check=True, timeout=300)
  with open(out / "manifest.jsonl") as f:
    records = [json.loads(line) for line in f]
  assert [(r["prompt"], r["seed"]) for r in records] == [
      (text, 5), (DynamicPrompts("random", wildcards).sample(template, 6), 6), (text, 5)]
  assert records[0]["template"] == template and "template" not in records[2]
  assert all(r["negative_template"] == "{ugly|dull}" for r in records)
  pixels = [np.asarray(Image.open(out / r["file"])) for r in records]
  np.testing.assert_array_equal(pixels[0], pixels[2])  # the template's image is its text's
  params = [outputs.parse_a1111_parameters(Image.open(out / r["file"]).text["parameters"])
            for r in records]
  assert params[0]["prompt"] == text and params[0]["template"] == template
  assert params[0]["negative_template"] == "{ugly|dull}" and "template" not in params[2]
  assert params[0]["Seed"] == "5" and params[0]["negative_prompt"] in ("ugly", "dull")
  with open(out / "run.json") as f:
    settings = json.load(f)["dynamic_prompts"]
  assert settings["mode"] == "random" and len(settings["wildcards_sha256"]) == 64
