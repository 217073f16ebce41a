"""The streamed plan: the same images as an eager reading, any shard on its own, bounded memory."""

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from sdjax.plan import ImageJob, Plan, PromptLine, RunError, read_prompts_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _eager(prompts, lines, nipp, seed, negative):
  """The plan as the pre-streaming code made it: every job in a list."""
  jobs = []
  for line in [*prompts, *lines]:
    for j in range(line.num_images or nipp):
      k = len(jobs)
      jobs.append(ImageJob(k, line.prompt, negative if line.negative_prompt is None
                           else line.negative_prompt,
                           seed + k if line.seed is None else line.seed + j))
  return jobs


def _all_jobs(plan):
  return [job for s in range(plan.num_shards) for job in plan.jobs(s)]


@pytest.mark.parametrize("shard_size", [1, 2, 3, 7, 100])
def test_jsonl_plan_matches_eager(tmp_path, shard_size):
  path = tmp_path / "p.jsonl"
  path.write_text(
      '{"prompt": "a cat", "seed": 7, "num_images": 3}\n'
      "\n"
      '{"prompt": "a dog", "negative_prompt": "red"}\n'
      '   \n'
      '{"prompt": "mentions num_images in text"}\n'
      '{"prompt": "caf\\u00e9 \u00e9", "num_images": 4}\n'
      '{"prompt": "last"}')  # no final newline
  cli = [PromptLine("first"), PromptLine("second", num_images=2)]
  plan = Plan(cli, str(path), num_images_per_prompt=2, seed=100, negative_prompt="neg",
              shard_size=shard_size)
  expected = _eager(cli, read_prompts_file(str(path)), 2, 100, "neg")
  assert plan.total == len(expected) == 2 + 2 + 3 + 2 + 2 + 4 + 2
  assert plan.num_shards == -(-plan.total // shard_size)
  assert _all_jobs(plan) == expected
  for s in reversed(range(plan.num_shards)):  # any shard alone, in any order
    assert list(plan.jobs(s)) == expected[s * shard_size:(s + 1) * shard_size]


def test_txt_plan_and_digest(tmp_path):
  path = tmp_path / "p.txt"
  path.write_text("a cat\n\n  a dog  \r\nthird\n")
  plan = Plan([], str(path), num_images_per_prompt=1, seed=5, negative_prompt="",
              shard_size=2)
  assert [(j.index, j.prompt, j.seed) for j in _all_jobs(plan)] == [
      (0, "a cat", 5), (1, "a dog", 6), (2, "third", 7)]
  same = Plan([], str(path), num_images_per_prompt=1, seed=5, negative_prompt="", shard_size=2)
  assert same.digest == plan.digest
  path.write_text("a cat\n\n  a dog  \r\nthird!\n")
  changed = Plan([], str(path), num_images_per_prompt=1, seed=5, negative_prompt="",
                 shard_size=2)
  other_seed = Plan([], str(path), num_images_per_prompt=1, seed=6, negative_prompt="",
                    shard_size=2)
  assert len({plan.digest, changed.digest, other_seed.digest}) == 3


def test_txt_comment_lines(tmp_path):
  """With comments (A1111 syntax), a .txt line that is only a `#` comment is no prompt; a
  comment after a prompt stays in it (the encoder drops it); without, `#` is text."""
  path = tmp_path / "p.txt"
  path.write_text("# cats\na cat # tabby\n  #dogs\na dog\n#\nthird")
  kw = dict(num_images_per_prompt=2, seed=5, negative_prompt="", shard_size=3)
  plan = Plan([], str(path), comments=True, **kw)
  expected = [(0, "a cat # tabby"), (1, "a cat # tabby"), (2, "a dog"), (3, "a dog"),
              (4, "third"), (5, "third")]
  assert [(j.index, j.prompt) for j in _all_jobs(plan)] == expected
  assert [(j.index, j.prompt) for j in plan.jobs(1)] == expected[3:]  # a shard alone
  assert [p.prompt for p in read_prompts_file(str(path), comments=True)] == [
      "a cat # tabby", "a dog", "third"]
  assert Plan([], str(path), **kw).total == 12  # every line a prompt


def test_bad_lines_name_their_line(tmp_path):
  path = tmp_path / "bad.jsonl"
  path.write_text('{"prompt": "ok"}\n{"prompt": "a", "num_images": 0}\n')
  with pytest.raises(RunError, match=r"bad.jsonl line 2: \"num_images\" must be a positive"):
    Plan([], str(path), num_images_per_prompt=1, seed=0, negative_prompt="", shard_size=10)
  path.write_text('{"prompt": "ok"}\n{"prompt": "a", "seed": -1}\n')
  plan = Plan([], str(path), num_images_per_prompt=1, seed=0, negative_prompt="", shard_size=1)
  assert list(plan.jobs(0))[0].prompt == "ok"  # a bad line is found when reached
  with pytest.raises(RunError, match=r"bad.jsonl line 2: \"seed\" must be a non-negative"):
    list(plan.jobs(1))
  for text in ("", "\n \n"):
    path.write_text(text)
    with pytest.raises(RunError, match="holds no prompts"):
      Plan([], str(path), num_images_per_prompt=1, seed=0, negative_prompt="", shard_size=1)
  with pytest.raises(RunError, match="does not exist"):
    Plan([], str(tmp_path / "missing.txt"), num_images_per_prompt=1, seed=0,
         negative_prompt="", shard_size=1)


def test_control_images_per_line():
  """A line's control_image: one path, or a list of one per ControlNet (null: the run's), each
  relative to the prompts file and part of the digest."""
  from sdjax.plan import _key, parse_line  # noqa: PLC0415

  folder = os.path.abspath("prompts")
  one = parse_line("prompts/p.jsonl", 1, b'{"prompt": "a", "control_image": "e.png"}')
  assert one.control_image == os.path.join(folder, "e.png")
  two = parse_line("prompts/p.jsonl", 1, b'{"prompt": "a", "control_image": ["e.png", null]}')
  assert two.control_image == (os.path.join(folder, "e.png"), None)
  assert _key(two)[-1] == {"control_image": [os.path.join(folder, "e.png"), None]}
  assert _key(one)[-1] == {"control_image": os.path.join(folder, "e.png")}
  for bad, message in (("[]", "must be a path or a list of them"), ("[1]", "must be a path"),
                       ('""', "must be a path")):
    with pytest.raises(RunError, match=f'line 1: "control_image" {message}'):
      parse_line("p.jsonl", 1, f'{{"prompt": "a", "control_image": {bad}}}'.encode())


def test_per_line_schedule(tmp_path):
  """jsonl steps, scheduler, schedule type and strength (img2img lines) reach the jobs and the
  digest; bad values are named."""
  from sdjax.plan import parse_line

  line = parse_line("p.jsonl", 1, b'{"prompt": "a", "steps": 12, "scheduler": "ddim", '
                    b'"init_image": "a.png", "strength": 0.5}')
  assert (line.steps, line.scheduler, line.strength) == (12, "ddim", 0.5)
  for a1111, ours in (("Euler a", "euler_ancestral"), ("DPM++ 2M Karras", "dpmpp_2m_karras"),
                      ("PLMS", "pndm")):  # A1111's sampler names, as its PNGs write them
    line = parse_line("p.jsonl", 1, json.dumps({"prompt": "a", "scheduler": a1111}).encode())
    assert line.scheduler == ours
  path = tmp_path / "p.jsonl"
  path.write_text('{"prompt": "a", "steps": 12}\n{"prompt": "b"}\n')
  plan = Plan([], str(path), num_images_per_prompt=1, seed=0, negative_prompt="", shard_size=4)
  assert [(j.steps, j.scheduler, j.strength) for j in _all_jobs(plan)] == [
      (12, None, None), (None, None, None)]
  cli = Plan([PromptLine("a")], None, num_images_per_prompt=1, seed=0, negative_prompt="",
             shard_size=4)
  assert Plan([PromptLine("a", steps=3)], None, num_images_per_prompt=1, seed=0,
              negative_prompt="", shard_size=4).digest != cli.digest
  line = parse_line("p.jsonl", 1, b'{"prompt": "a", "schedule_type": "Align Your Steps"}')
  assert line.schedule_type == "align_your_steps"  # A1111's words or ours: one name
  for words, name in (("Karras", "karras"), ("sgm_uniform", "sgm_uniform"),
                      ("Automatic", "automatic")):
    assert parse_line("p.jsonl", 1, json.dumps({"prompt": "a", "schedule_type": words}).encode()
                      ).schedule_type == name
  typed = Plan([line], None, num_images_per_prompt=1, seed=0, negative_prompt="", shard_size=4)
  assert [j.schedule_type for j in _all_jobs(typed)] == ["align_your_steps"]
  assert typed.digest != cli.digest
  for text, error in (('"steps": 0', '"steps" must be a positive integer'),
                      ('"scheduler": "k_euler"', '"scheduler" must be one of ddim, .* or A1111'),
                      ('"init_image": "a.png", "strength": 1.5', r'"strength" must be a number '
                       r"in \(0, 1\]"),
                      ('"strength": 0.5', '"strength" is how much of an "init_image"'),
                      ('"schedule_type": "fast"', '"schedule_type": unknown schedule type '),
                      ('"schedule_type": 3', '"schedule_type": a string, got 3'),
                      ('"scheduler_options": [1]', '"scheduler_options" must be an object'),
                      ('"clip_skip": 0', '"clip_skip" must be a positive integer'),
                      ('"scheduler_options": {"x": {"y": 1}}',
                       '"scheduler_options": x must be a finite number, a string, true, false, '
                       'null or a list of numbers, got {"y": 1}'),
                      ('"scheduler_options": {"sigmas": [1, NaN]}',
                       '"scheduler_options": sigmas must be .* got \\[1, NaN\\]')):
    with pytest.raises(RunError, match=f"p.jsonl line 3: {error}"):
      parse_line("p.jsonl", 3, ('{"prompt": "a", ' + text + "}").encode())


def test_lines_from_images_parameters(tmp_path):
  """A jsonl line's "parameters" (an image's A1111 parameters, or a text file of them): the
  image's prompts and per-image settings, the line's own fields winning; bad files named."""
  from sdjax import outputs
  from sdjax.plan import parse_line

  text = outputs.a1111_parameters(
      prompt="a red circle", negative_prompt="blue", steps=12, sampler="dpmpp_2m", cfg_scale=4.5,
      seed=3, width=96, height=64, model="m", version="v1.10.1",
      extra={"Schedule type": "Automatic", "Variation seed": 8, "Variation seed strength": 0.25,
             "Hires upscale": 2, "Denoising strength": 0.5, "Hires prompt": "a big red circle",
             "Clip skip": 2})
  pixels = np.zeros((8, 8, 3), np.uint8)
  (tmp_path / "a.png").write_bytes(outputs.image_bytes(pixels, text))
  (tmp_path / "a.jpg").write_bytes(outputs.image_bytes(pixels, text, "jpg"))
  (tmp_path / "b.txt").write_text(text)
  prompts = tmp_path / "p.jsonl"
  for name in ("a.png", "a.jpg", "b.txt"):
    line = parse_line(str(prompts), 1, json.dumps({"parameters": name}).encode())
    assert line == PromptLine("a red circle", "blue", seed=3, width=96, height=64,
                              guidance_scale=4.5, steps=12, scheduler="dpmpp_2m",
                              hires_prompt="a big red circle", schedule_type="karras",
                              subseed=8, subseed_strength=0.25,  # A1111 1.9's Automatic
                              # as A1111 placed its levels and stepped its sampler
                              scheduler_options=(("k_diffusion", True),
                                                 ("timestep_spacing", "linspace")),
                              clip_skip=2)
  line = parse_line(str(prompts), 1, json.dumps({
      "parameters": "a.png", "seed": 9, "prompt": "a cat", "num_images": 2,
      "scheduler_options": {"k_diffusion": False, "sigmas": [9, 1, 0]}}).encode())
  assert (line.prompt, line.negative_prompt, line.seed, line.num_images) == (
      "a cat", "blue", 9, 2)
  assert line.scheduler_options == (("k_diffusion", False), ("sigmas", (9, 1, 0)),
                                    ("timestep_spacing", "linspace"))  # merged, the line's win
  # An sdjax image's own list of sigmas (a flag of its own) comes back as the line's option.
  (tmp_path / "d.txt").write_text(outputs.a1111_parameters(
      prompt="a cat", negative_prompt="", steps=2, sampler="euler", cfg_scale=4.5, seed=3,
      width=96, height=64, model="m", version="sdjax 0.1.0",
      extra={"Scheduler options": "sigmas=[9.0, 1.0, 0.0]"}))
  line = parse_line(str(prompts), 1, json.dumps({"parameters": "d.txt"}).encode())
  assert line.scheduler_options == (("sigmas", (9.0, 1.0, 0.0)),)
  (tmp_path / "c.txt").write_text("a cat, no parameters")
  for name, error in (("nothing.png", 'cannot read "parameters" .*nothing.png'),
                      ("c.txt", '"parameters" .*c.txt: no A1111 parameters line')):
    with pytest.raises(RunError, match=f"p.jsonl line 4: {error}"):
      parse_line(str(prompts), 4, json.dumps({"parameters": name}).encode())


def test_a1111_prompt_options(tmp_path):
  """A .txt line of A1111's "Prompts from file or textbox" options sets that line's prompt,
  negative, seed, steps, CFG, sampler (A1111's names in any case), size and image count (n_iter
  x batch_size); output-location options are ignored; a prompt that merely starts with dashes
  stays a prompt; a bad line is a one-line error in the line's own words."""
  from sdjax.plan import parse_line  # noqa: PLC0415

  line = parse_line("p.txt", 1, b'--prompt "a red cat" on a mat --negative_prompt blurry '
                    b'--steps 12 --cfg_scale 5.5 --sampler_name "dpm++ 2m karras" --seed 7 '
                    b'--width 64 --height 48 --n_iter 2 --batch_size 3 --outpath_samples out')
  assert line == PromptLine("a red cat on a mat", "blurry", seed=7, num_images=6, width=64,
                            height=48, guidance_scale=5.5, steps=12,
                            scheduler="dpmpp_2m_karras")
  for text in ("a cat --ar 16:9", "--- a cat", "-- a cat"):
    assert parse_line("p.txt", 1, text.encode()) == PromptLine(text)
  path = tmp_path / "p.txt"
  path.write_text('--prompt "a cat" --seed 5 --n_iter 3\na dog\n--prompt a bird --batch_size 2\n')
  plan = Plan([], str(path), num_images_per_prompt=1, seed=0, negative_prompt="", shard_size=4)
  assert [(j.prompt, j.seed) for j in _all_jobs(plan)] == [
      ("a cat", 5), ("a cat", 6), ("a cat", 7), ("a dog", 3), ("a bird", 4), ("a bird", 5)]
  for text, error in (("--prompt x --tiling true", "unknown option '--tiling'; sdjax reads "),
                      ("--steps 5", "A1111 prompt options need --prompt"),
                      ("--prompt x --steps", "--steps needs a value"),
                      ("--prompt x --steps five", "--steps must be an integer, got 'five'"),
                      ('--prompt "x', r"cannot read A1111 prompt options \(No closing"),
                      ("--prompt x --sampler_name k_euler", "--sampler_name must be one of ddim"),
                      ("--prompt x --seed -1", "--seed must be a non-negative integer"),
                      ("--prompt x --n_iter 0", "--n_iter x --batch_size must be a positive"),
                      ("--prompt x --width 13", "--width must be a multiple of 8")):
    with pytest.raises(RunError, match=f"p.txt line 2: {error}"):
      parse_line("p.txt", 2, text.encode())


def test_prompts_file_on_an_fsspec_store(tmp_path):
  """A prompts file at an fsspec URL plans as the same file on disk; a line's relative image
  path is relative to the URL; a missing file or an unknown store is a one-line error."""
  import fsspec  # noqa: PLC0415

  text = b'{"prompt": "a cat", "num_images": 2, "init_image": "imgs/a.png"}\n{"prompt": "b"}\n'
  url = f"memory://plan-{os.getpid()}/runs/p.jsonl"
  with fsspec.open(url, "wb") as f:
    f.write(text)
  (tmp_path / "p.jsonl").write_bytes(text)
  plans = [Plan([], source, num_images_per_prompt=1, seed=0, negative_prompt="", shard_size=1)
           for source in (url, str(tmp_path / "p.jsonl"))]
  assert plans[0].digest == plans[1].digest and plans[0].total == 3
  jobs = [_all_jobs(plan) for plan in plans]
  assert [j.init_image for j in jobs[0]] == [f"memory://plan-{os.getpid()}/runs/imgs/a.png"] * 2 + [
      None]
  assert [dataclasses.replace(j, init_image=None) for j in jobs[0]] == [
      dataclasses.replace(j, init_image=None) for j in jobs[1]]
  for source, error in ((f"memory://plan-{os.getpid()}/none.txt", "does not exist"),
                        ("nope://x.txt", "cannot read prompts file nope://x.txt: Protocol")):
    with pytest.raises(RunError, match=error):
      Plan([], source, num_images_per_prompt=1, seed=0, negative_prompt="", shard_size=1)


def test_styles(tmp_path):
  """A1111 saved styles: the run's apply to every image's final texts (hires prompts too); a
  jsonl line's `styles` replace them and enter the digest; unknown names and styles without a
  file are errors naming the line."""
  from sdjax import prompts  # noqa: PLC0415

  styles_csv = tmp_path / "styles.csv"
  styles_csv.write_text("name,prompt,negative_prompt\nA,style a,neg a\nB,{prompt} in b,\n")
  path = tmp_path / "p.jsonl"
  path.write_text('{"prompt": "a cat"}\n{"prompt": "a dog", "styles": "B", '
                  '"hires_prompt": "a dog, detailed"}\n{"prompt": "a cow", "styles": []}\n')

  def plan(names, source=path):
    return Plan([], str(source), num_images_per_prompt=1, seed=0, negative_prompt="bad",
                shard_size=4, styles=prompts.read_styles(str(styles_csv), names))

  jobs = _all_jobs(plan(["A"]))
  assert [(j.prompt, j.negative_prompt, j.hires_prompt) for j in jobs] == [
      ("a cat, style a", "bad, neg a", None), ("a dog in b", "bad", "a dog, detailed in b"),
      ("a cow", "bad", None)]
  bare = Plan([], str(path), num_images_per_prompt=1, seed=0, negative_prompt="bad",
              shard_size=4)
  with pytest.raises(RunError, match=r'p.jsonl line 2: "styles" are names in a styles file'):
    _all_jobs(bare)
  other = tmp_path / "q.jsonl"
  other.write_text('{"prompt": "a dog", "styles": ["B", "Z"]}\n')
  with pytest.raises(RunError, match=r"q.jsonl line 1: unknown style 'Z'"):
    _all_jobs(plan([], other))
  other.write_text('{"prompt": "a dog", "styles": "A"}\n')
  digest = plan([], other).digest
  other.write_text('{"prompt": "a dog", "styles": "B"}\n')
  assert plan([], other).digest != digest
  other.write_text('{"prompt": "a dog", "styles": 3}\n')
  with pytest.raises(RunError, match='"styles" must be a style name or a list of them'):
    _all_jobs(plan([], other))


def test_per_line_hires_prompts(tmp_path):
  """jsonl hires_prompt / hires_negative_prompt reach the jobs and the digest (only when set:
  older runs' digests stay); a non-string is named."""
  from sdjax.plan import parse_line  # noqa: PLC0415

  path = tmp_path / "p.jsonl"
  path.write_text('{"prompt": "a", "hires_prompt": "a, detailed"}\n'
                  '{"prompt": "b", "hires_negative_prompt": "blurry"}\n{"prompt": "c"}\n')
  plan = Plan([], str(path), num_images_per_prompt=1, seed=0, negative_prompt="", shard_size=4)
  assert [(j.hires_prompt, j.hires_negative_prompt) for j in _all_jobs(plan)] == [
      ("a, detailed", None), (None, "blurry"), (None, None)]
  cli = Plan([PromptLine("a")], None, num_images_per_prompt=1, seed=0, negative_prompt="",
             shard_size=4)
  assert Plan([PromptLine("a", hires_prompt="b")], None, num_images_per_prompt=1, seed=0,
              negative_prompt="", shard_size=4).digest != cli.digest
  assert cli.digest == Plan([PromptLine("a", hires_prompt=None)], None, num_images_per_prompt=1,
                            seed=0, negative_prompt="", shard_size=4).digest
  for key in ("hires_prompt", "hires_negative_prompt"):
    with pytest.raises(RunError, match=f'p.jsonl line 3: "{key}" must be a string'):
      parse_line("p.jsonl", 3, json.dumps({"prompt": "a", key: 3}).encode())


_MEMORY_PROBE = """
import importlib.util, json, sys, tracemalloc
# plan.py alone: importing the sdjax package would load jax (slow, and not what is measured).
spec = importlib.util.spec_from_file_location("plan", sys.argv[2])
plan_module = sys.modules["plan"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(plan_module)
Plan = plan_module.Plan
tracemalloc.start()
plan = Plan([], sys.argv[1], num_images_per_prompt=1, seed=0, negative_prompt="",
            shard_size=1000)
last = list(plan.jobs(plan.num_shards - 1))
print(json.dumps([plan.total, last[-1].index, last[-1].prompt,
                  tracemalloc.get_traced_memory()[1]]))
"""


def test_memory_does_not_grow_with_the_file(tmp_path):
  """200k prompts (~13 MB): planning and reading the last shard stay under 2 MB of Python heap,
  where a list of the jobs alone takes 45 MB."""
  path = tmp_path / "big.jsonl"
  with open(path, "w") as f:
    for i in range(200_000):
      f.write(json.dumps({"prompt": f"a red circle number {i} on a blue background"}) + "\n")
  proc = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, str(path),
                         os.path.join(ROOT, "sdjax", "plan.py")], capture_output=True,
                        text=True, timeout=300, cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-2000:]
  total, last, prompt, peak = json.loads(proc.stdout.splitlines()[-1])
  assert (total, last) == (200_000, 199_999)
  assert prompt.startswith("a red circle number 199999")
  assert peak < 2 * 2**20, peak


def test_parameters_lines_say_what_they_leave_to_the_run(tmp_path, caplog):
  """What a line's image asks for that a line cannot set (run-wide flags) or sdjax cannot give
  is one warning per kind in a process, not one per line."""
  from sdjax import plan
  from sdjax.plan import parse_line

  (tmp_path / "a.txt").write_text("a cat\nSteps: 20, Sampler: Euler SMEA Dy, CFG scale: 7, Seed: 1, "
                                  "Size: 64x64, RNG: CPU, ENSD: 31337, Hires upscale: 2, "
                                  "Model: foo, Version: v1.10.1")
  plan._WARNED.clear()
  for n in range(3):
    parse_line(str(tmp_path / "p.jsonl"), n + 1, b'{"parameters": "a.txt", "seed": %d}' % n)
  said = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
  assert [s.split(": ", 1)[1] for s in said] == [  # not the model: the run's is the lines'
      '"parameters" ' + str(tmp_path / "a.txt") + " (and any line like it) asks for run-wide "
      "settings, which the run's flags decide: --ensd=31337 --hires_scale=2 --pixel_levels=floor "
      "--rng=torch_cpu",
      '"parameters" ' + str(tmp_path / "a.txt") + ": Sampler: Euler SMEA Dy is not one sdjax has: "
      "the model's own is used (or give --scheduler)"]
  assert said[0].startswith(str(tmp_path / "p.jsonl") + " line 1:")
  # An inpainted image's: its Denoising strength is the line's with the line's own init image
  # (no note), else a note; its inpaint settings are the run's flags'.
  (tmp_path / "i.txt").write_text("a cat\nSteps: 20, Sampler: Euler, CFG scale: 7, Seed: 1, "
                                  "Denoising strength: 0.6, Mask blur: 2, Masked content: fill, "
                                  "Version: sdjax 0.1.0")
  (tmp_path / "i.png").write_bytes(b"")  # parse_line checks that the image exists, not reads it
  caplog.clear()
  line = parse_line(str(tmp_path / "p.jsonl"), 1, json.dumps(
      {"parameters": "i.txt", "init_image": "i.png", "mask_image": "i.png"}).encode())
  assert line.strength == 0.6
  said = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
  assert len(said) == 1 and said[0].endswith(
      "asks for run-wide settings, which the run's flags decide: --inpainting_fill=fill "
      "--mask_blur=2.0")
  caplog.clear()
  line = parse_line(str(tmp_path / "p.jsonl"), 2, b'{"parameters": "i.txt"}')
  assert line.strength is None
  said = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
  assert len(said) == 1 and "whose init image is not in the file" in said[0]


@pytest.mark.parametrize("shard_size", [1, 3, 100])
def test_tables_make_the_jsonl_plan(tmp_path, shard_size, caplog):
  """A .csv / .tsv (PartiPrompts', DrawBench's layouts) plans as the jsonl of its rows: the
  header's prompt column and jsonl-named columns, empty cells left out, other columns ignored
  with one warning; quoted cells keep commas and quotes."""
  csv_path = tmp_path / "prompts.csv"
  csv_path.write_text(
      "\ufeffPrompts,Category,Seed,num_images,guidance_scale,negative_prompt\r\n"
      '"a cat, sitting",Animals,7,2,,\r\n'
      'a dog,Animals,,,5.5,"blurry, ""low"" quality"\r\n'
      "\r\n"
      "# not a comment here,Other,,,,\r\n"
      "last,,,3,,")  # no final newline
  jsonl = tmp_path / "same.jsonl"
  jsonl.write_text("\n".join(json.dumps(o) for o in [
      {"prompt": "a cat, sitting", "seed": 7, "num_images": 2},
      {"prompt": "a dog", "guidance_scale": 5.5, "negative_prompt": 'blurry, "low" quality'},
      {"prompt": "# not a comment here"}, {"prompt": "last", "num_images": 3}]))
  kw = dict(num_images_per_prompt=2, seed=100, negative_prompt="neg", shard_size=shard_size)
  want = _all_jobs(Plan([], str(jsonl), **kw))
  with caplog.at_level("WARNING"):
    plan = Plan([], str(csv_path), comments=True, **kw)
  assert _all_jobs(plan) == want  # the same images; the blank line shifts nothing
  assert plan.total == 2 + 2 + 2 + 3
  assert [r.getMessage() for r in caplog.records
          if "not prompt settings" in r.getMessage()] == [
      f"prompts file {csv_path}: columns 'category' are not prompt settings; left out"]
  for s in reversed(range(plan.num_shards)):  # any shard alone
    assert list(plan.jobs(s)) == _all_jobs(plan)[s * shard_size:(s + 1) * shard_size]
  tsv = tmp_path / "PartiPrompts.tsv"
  tsv.write_text("Prompt\tCategory\tChallenge\tNote\nbond\tAbstract\tBasic\t\n"
                 "a \"quoted\" word, and commas\tWorld\tBasic\tnote\n")
  assert [p.prompt for p in read_prompts_file(str(tsv))] == [
      "bond", 'a "quoted" word, and commas']


def test_bad_tables(tmp_path):
  kw = dict(num_images_per_prompt=1, seed=0, negative_prompt="", shard_size=10)
  path = tmp_path / "p.csv"
  for text, message in [
      ("title,category\na cat,x\n", r"p.csv: its header row names no prompt column \(one of "
                                    r"prompt, prompts, caption, text; got title, category\)"),
      ("prompt,seed,Seed\na,1,2\n", "names column 'seed' twice"),
      ('prompt\n"a cat\nsat"\n', r"p.csv line 2: not one row of a table"),
      ("prompt,seed\na cat,1.5\n", r"p.csv line 2: column 'seed' must be an integer, got '1.5'"),
      ("prompt,seed\na cat,1,2\n", "p.csv line 2: 3 cells, the header names 2 columns"),
      ("prompt,guidance_scale\na,x\n", "column 'guidance_scale' must be a number, got 'x'"),
      ("prompt,width\na,12\n", r'p.csv line 2: "width" must be a multiple of 8'),
      ("prompt\n", "holds no prompts")]:
    path.write_text(text)
    with pytest.raises(RunError, match=message):
      _all_jobs(Plan([], str(path), **kw))
  path.write_text("caption,styles,scheduler_options\n"
                  'a cat,"[""one"", ""two""]","{""use_karras_sigmas"": true}"\na dog,one,\n')
  lines = read_prompts_file(str(path))
  assert [(p.prompt, p.styles) for p in lines] == [("a cat", ("one", "two")), ("a dog", ("one",))]
  assert lines[0].scheduler_options is not None and lines[1].scheduler_options is None
