"""generate_run in this process: fsspec output locations, a run split into independent jobs."""

import dataclasses
import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from sdjax import outputs, run, sinks

PROMPTS = tuple(run.PromptLine(f"a photo of a cat {i}") for i in range(5))


@pytest.fixture(scope="module")
def single_run(model, cache, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("single") / "out")
  summary = run.generate_run(_config(model, out, cache))
  assert (summary.images, summary.merged) == (5, True)
  return out


def _config(model, output_dir, cache, **kwargs):
  return run.RunConfig(prompts=PROMPTS, model=model, steps=2, guidance_scale=3.0,
                       scheduler="euler_ancestral", height=16, width=16, seed=100, batch_size=2,
                       output_dir=output_dir, compilation_cache=cache, show_progress=False,
                       shard_size=2, **kwargs)


def _records(out):
  """A local run's manifest records, in index order."""
  return [json.loads(x) for x in open(os.path.join(out, outputs.MANIFEST_NAME))]


def _pixels(store):
  records = [r for s in range(3) for r in sinks.read_manifest(
      store, f"{sinks.MANIFESTS}/{sinks.shard_name(s)}.jsonl")]
  return {r["index"]: np.asarray(Image.open(io.BytesIO(store.read(r["file"])))) for r in records}


def test_jobs_on_a_memory_store_make_the_single_run(model, cache, single_run):
  """Two jobs (--num_shards 2) reading their prompts from and writing to memory:// make the
  pixels of one local run."""
  import fsspec  # noqa: PLC0415

  url = f"memory://test-run-{os.getpid()}/out"
  prompts = f"memory://test-run-{os.getpid()}/prompts.txt"
  with fsspec.open(prompts, "w") as f:
    f.write("".join(f"{line.prompt}\n" for line in PROMPTS))

  def config(**kwargs):  # the prompts from the store
    return dataclasses.replace(_config(model, url, cache, **kwargs), prompts=(),
                               prompts_file=prompts)

  first = run.generate_run(config(num_shards=2, shard_index=1))
  assert (first.images, first.merged) == (2, False)  # shard 1; shards 0 and 2 belong to job 0
  store = sinks.Store(url)
  assert sinks.finished_shards(store) == {1} and not store.exists(outputs.MANIFEST_NAME)
  second = run.generate_run(config(num_shards=2, shard_index=0))
  assert (second.images, second.skipped, second.merged) == (3, 2, True)

  ref = _pixels(sinks.Store(single_run))
  got = _pixels(store)
  assert sorted(got) == list(range(5))
  for k in ref:
    np.testing.assert_array_equal(got[k], ref[k])
  lines = store.read(outputs.MANIFEST_NAME).decode().splitlines()
  assert len(lines) == 5 and store.exists(outputs.GRID_NAME)
  again = run.generate_run(config(num_shards=2, shard_index=0))
  assert (again.images, again.skipped) == (0, 5)


def test_lossless_webp_run_has_the_png_pixels(model, cache, single_run, tmp_path):
  """--image_format webp --webp_lossless: the same pixels as the png run, the A1111 text in
  EXIF; the same folder with another image format is another run's."""
  out = str(tmp_path / "out")
  summary = run.generate_run(_config(model, out, cache, image_format="webp", webp_lossless=True))
  assert summary.images == 5
  store, ref = sinks.Store(out), _pixels(sinks.Store(single_run))
  records = list(sinks.iter_records(store, 3))
  assert [r["file"] for r in records] == [f"00000/{k:06d}.webp" for k in range(5)]
  for r in records:
    data = store.read(r["file"])
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")),
                                  ref[r["index"]])
    params = outputs.parse_a1111_parameters(outputs.read_parameters(data))
    assert params["Seed"] == str(r["seed"]) and params["prompt"] == r["prompt"]
  assert json.loads(store.read(sinks.RUN_JSON))["image_format"] == "webp"
  with pytest.raises(run.RunError, match=r"other settings \(image_format, webp_lossless differ\)"):
    run.generate_run(_config(model, out, cache, image_format="jpg"))
  with pytest.raises(run.RunError, match=r"--image_quality must be in \[1, 100\], got 0"):
    run.generate_run(_config(model, out, cache, image_format="jpg", image_quality=0))


def test_floor_pixel_levels_run(model, cache, single_run, tmp_path):
  """--pixel_levels floor (A1111's and ComfyUI's 8-bit levels): the same run's images truncated,
  not rounded (one level lower where the fraction is at least a half), written into the PNG and
  the manifest, read back by --parameters_file; another run's settings in the same folder."""
  from sdjax import infotext  # noqa: PLC0415

  out = str(tmp_path / "out")
  assert run.generate_run(_config(model, out, cache, pixel_levels="floor")).images == 5
  ref, got = _pixels(sinks.Store(single_run)), _pixels(sinks.Store(out))
  lower = np.concatenate([(ref[k].astype(int) - got[k]).ravel() for k in range(5)])
  assert set(np.unique(lower)) == {0, 1} and 0.3 < lower.mean() < 0.7
  record = _records(out)[0]
  assert record["pixel_levels"] == "floor"
  text = Image.open(os.path.join(out, record["file"])).text["parameters"]
  assert outputs.parse_a1111_parameters(text)["Pixel levels"] == "floor"
  assert infotext.reproduce(text).flags["pixel_levels"] == "floor"
  assert "Pixel levels" not in Image.open(os.path.join(single_run, record["file"])).text[
      "parameters"]
  with pytest.raises(run.RunError, match=r"other settings \(pixel_levels differ\)"):
    run.generate_run(_config(model, out, cache))
  with pytest.raises(run.RunError, match=r"^--pixel_levels must be one of round, floor, got "
                                         r"'ceil'$"):
    run.generate_run(_config(model, str(tmp_path / "other"), cache, pixel_levels="ceil"))


def test_a_run_that_made_no_image_says_so(model, cache, tmp_path):
  """A run stopped by bad input before its first image leaves its settings in the folder: a
  rerun with other settings is told that it made no image yet, so --overwrite loses nothing
  (once it made some, the plain message)."""
  Image.fromarray(np.random.default_rng(0).integers(0, 255, (16, 16, 3), np.uint8)).save(
      tmp_path / "init.png")
  out = str(tmp_path / "out")
  config = dataclasses.replace(
      _config(model, out, cache, strength=0.1),
      prompts=(run.PromptLine("a cat", init_image=str(tmp_path / "init.png")),))
  with pytest.raises(run.RunError, match="^img2img lines: strength 0.1 with 2 steps .* leaves "
                                         "no denoising step$"):
    run.generate_run(config)
  assert os.listdir(out) == [sinks.RUN_JSON]
  with pytest.raises(run.RunError, match=r"holds a run with other settings \(strength differ\), "
                                         "which made no image yet: --overwrite replaces them"):
    run.generate_run(dataclasses.replace(config, strength=0.8))
  assert run.generate_run(dataclasses.replace(config, strength=0.8, overwrite=True)).images == 1
  with pytest.raises(run.RunError, match=r"\(strength differ\); use another --output_dir, or "
                                         "--overwrite to replace it$"):
    run.generate_run(dataclasses.replace(config, strength=0.5))


def test_hires_fix_run(model, cache, tmp_path):
  """--hires_scale: both passes in the run's program make generate(hires_scale=...)'s images;
  the records give the file's size and the first pass's, the PNG text A1111's hires fields."""
  import sdjax  # noqa: PLC0415

  out = str(tmp_path / "out")
  # A1111 editing; A1111's Hires prompt: the line's own, and the run's negative one
  prompts = (PROMPTS[0], run.PromptLine("a [red:blue:0.5] (cat:1.2)", hires_prompt="a (dog:1.3)"))
  config = dataclasses.replace(_config(model, out, cache, hires_scale=1.5, hires_steps=3,
                                       hires_strength=0.6, prompt_syntax="a1111",
                                       hires_negative_prompt="blurry, [red|blue]"),
                               prompts=prompts)
  assert run.generate_run(config).images == 2
  pipe = sdjax.load_pipeline(model)
  for r in sinks.iter_records(sinks.Store(out), 1):
    assert (r["height"], r["width"]) == (24, 24)
    second = {"prompt": "a (dog:1.3)"} if r["index"] == 1 else {}
    assert r["hires"] == {"scale": 1.5, "steps": 3, "strength": 0.6, "upscaler": "latent",
                          "first_height": 16, "first_width": 16, **second,
                          "negative_prompt": "blurry, [red|blue]"}
    png = Image.open(os.path.join(out, r["file"]))
    params = outputs.parse_a1111_parameters(png.text["parameters"])
    assert (params["Size"], params["Hires upscale"], params["Hires steps"]) == ("16x16", "1.5", "3")
    assert (params["Denoising strength"], params["Hires upscaler"]) == ("0.6", "Latent")
    assert params.get("Hires prompt") == second.get("prompt")
    assert params["Hires negative prompt"] == "blurry, [red|blue]"
    alone = pipe.generate(r["prompt"], seed=r["seed"], steps=2, guidance_scale=3.0,
                          scheduler="euler_ancestral", height=16, width=16, hires_scale=1.5,
                          hires_steps=3, hires_strength=0.6, prompt_syntax="a1111",
                          hires_prompts=second.get("prompt"),
                          hires_negative_prompts="blurry, [red|blue]")
    assert alone.shape == (1, 24, 24, 3)
    assert np.abs(alone[0] * 255 - np.asarray(png, np.float32)).max() <= 1.0
  with pytest.raises(run.RunError, match="--hires_prompt and --hires_negative_prompt are the "):
    run.generate_run(dataclasses.replace(config, hires_scale=0.0))
  # A refiner takes the hires pass over (tests/test_sdxl.py): not another model's, nor after a
  # number of the first pass's steps; --hires_refiner only with a refiner and the hires fix.
  with pytest.raises(run.RunError, match="--refiner with the hires fix takes its passes over "
                     "from the model: not with --hires_model"):
    run.generate_run(dataclasses.replace(config, refiner="x", hires_model="y"))
  with pytest.raises(run.RunError, match="--refiner_start as a number of steps is the first "):
    run.generate_run(dataclasses.replace(config, refiner="x", refiner_start=2,
                                         hires_refiner="both passes"))
  with pytest.raises(run.RunError, match="--hires_refiner 'first pass' says which pass of the "
                     "hires fix --refiner finishes: give --refiner and --hires_scale"):
    run.generate_run(dataclasses.replace(config, hires_refiner="first pass"))


def test_hires_schedule_type_run(model, cache, tmp_path):
  """--hires_schedule_type (A1111's Hires schedule type): the hires pass places its noise levels
  by it, as generate(hires_schedule_type=...); PNGs say it where it differs from the first
  pass's, records and run.json keep it."""
  import sdjax  # noqa: PLC0415

  out = str(tmp_path / "out")
  config = dataclasses.replace(_config(model, out, cache, hires_scale=1.5, hires_steps=3,
                                       hires_schedule_type="sgm_uniform"), prompts=PROMPTS[:1])
  assert run.generate_run(config).images == 1
  (r,) = _records(out)
  assert r["hires"]["schedule_type"] == "sgm_uniform"
  png = Image.open(os.path.join(out, r["file"]))
  params = outputs.parse_a1111_parameters(png.text["parameters"])
  assert params["Hires schedule type"] == "SGM Uniform" and "Schedule type" not in params
  common = dict(seed=r["seed"], steps=2, guidance_scale=3.0, scheduler="euler_ancestral",
                height=16, width=16, hires_scale=1.5, hires_steps=3)
  pipe = sdjax.load_pipeline(model)
  alone = pipe.generate(r["prompt"], hires_schedule_type="SGM Uniform", **common)
  assert np.abs(alone[0] * 255 - np.asarray(png, np.float32)).max() <= 1.0
  assert np.abs(pipe.generate(r["prompt"], **common) - alone).max() > 0.01  # it matters
  with pytest.raises(run.RunError, match="--hires_schedule_type is the hires pass's"):
    run.generate_run(dataclasses.replace(config, hires_scale=0.0))


def test_hires_resize_run(model, cache, tmp_path):
  """--hires_resize_width/height: A1111's Resize to (16x16 -> cover 32x32 -> cut to 32x24), with
  its pixel upscaler Lanczos (the first pass's images enlarged) and --hires_scheduler (A1111's
  Hires sampler) and --hires_guidance_scale (Forge's Hires CFG Scale): the images are
  generate(hires_resize=..., hires_upscaler="lanczos", hires_scheduler=...,
  hires_guidance_scale=...)'s; the PNG text says `Hires resize` (not an upscale), `Hires
  upscaler: Lanczos`, `Hires sampler`, `Hires CFG Scale`."""
  import sdjax  # noqa: PLC0415

  out = str(tmp_path / "out")
  config = dataclasses.replace(
      _config(model, out, cache, hires_resize_width=32, hires_resize_height=24, hires_steps=2,
              hires_scheduler="ddim", hires_upscaler="lanczos", hires_guidance_scale=5.0),
      prompts=(PROMPTS[0],))
  assert run.generate_run(config).images == 1
  (r,) = sinks.iter_records(sinks.Store(out), 1)
  assert (r["height"], r["width"]) == (24, 32)
  assert r["hires"] == {"resize_width": 32, "resize_height": 24, "steps": 2, "strength": 0.7,
                        "upscaler": "lanczos", "scheduler": "ddim", "guidance_scale": 5.0,
                        "first_height": 16, "first_width": 16}
  png = Image.open(os.path.join(out, r["file"]))
  params = outputs.parse_a1111_parameters(png.text["parameters"])
  assert params["Hires resize"] == "32x24" and "Hires upscale" not in params
  assert params["Hires upscaler"] == "Lanczos"
  assert (params["Sampler"], params["Hires sampler"]) == ("Euler a", "DDIM")
  assert (params["CFG scale"], params["Hires CFG Scale"]) == ("3.0", "5.0")
  alone = sdjax.load_pipeline(model).generate(
      r["prompt"], seed=r["seed"], steps=2, guidance_scale=3.0, scheduler="euler_ancestral",
      height=16, width=16, hires_resize=(32, 24), hires_steps=2, hires_scheduler="ddim",
      hires_upscaler="lanczos", hires_guidance_scale=5.0)
  assert alone.shape == (1, 24, 32, 3)
  assert np.abs(alone[0] * 255 - np.asarray(png, np.float32)).max() <= 1.0
  with pytest.raises(run.RunError, match="--hires_resize_. must be >= 0"):
    run.generate_run(dataclasses.replace(config, hires_resize_width=-32))
  with pytest.raises(run.RunError, match="--hires_.*: unknown hires scheduler 'k_euler'"):
    run.generate_run(dataclasses.replace(config, hires_scheduler="k_euler"))
  with pytest.raises(run.RunError, match="hires guidance scale must be a number >= 0"):
    run.generate_run(dataclasses.replace(config, hires_guidance_scale=-1.0))
  with pytest.raises(run.RunError, match="--hires_guidance_scale is the hires pass's"):
    run.generate_run(dataclasses.replace(config, hires_resize_width=0, hires_resize_height=0))


def test_hires_model_run(model, cache, tmp_path):
  """--hires_model (A1111's Hires checkpoint): the second pass runs another model in the run's
  program, a prompt's <lora:...> tags merged into both models as A1111 applies them; the images
  are generate(hires_model=...)'s, the record keeps its path, the PNG text its A1111 short
  title (`Hires checkpoint: name [short hash]`)."""
  from safetensors.numpy import save_file  # noqa: PLC0415

  import sdjax  # noqa: PLC0415
  from sdjax import testing  # noqa: PLC0415

  other = str(tmp_path / "fine-tune")
  testing.write_torch_pipeline(other, "sd1", seed=32)
  rng = np.random.default_rng(1)
  style = str(tmp_path / "loras" / "style.safetensors")
  os.makedirs(os.path.dirname(style))
  save_file({"lora_unet_conv_in.lora_down.weight": rng.standard_normal((2, 4, 3, 3), np.float32),
             "lora_unet_conv_in.lora_up.weight": rng.standard_normal((32, 2, 1, 1), np.float32)},
            style)
  out = str(tmp_path / "out")
  config = dataclasses.replace(
      _config(model, out, cache, hires_scale=1.5, hires_steps=2, hires_model=other,
              prompt_syntax="a1111", lora_dir=os.path.dirname(style)),
      prompts=(run.PromptLine("a cat <lora:style:0.5>"),))
  assert run.generate_run(config).images == 1
  (r,) = sinks.iter_records(sinks.Store(out), 1)
  assert r["hires"]["model"] == other and (r["height"], r["width"]) == (24, 24)
  png = Image.open(os.path.join(out, r["file"]))
  params = outputs.parse_a1111_parameters(png.text["parameters"])
  unet = os.path.join(other, "unet", "diffusion_pytorch_model.safetensors")
  assert params["Hires checkpoint"] == f"fine-tune [{outputs.short_hash(unet)}]"
  assert other not in png.text["parameters"]  # no local path in shared images
  kw = dict(seed=r["seed"], steps=2, guidance_scale=3.0, scheduler="euler_ancestral",
            height=16, width=16, hires_scale=1.5, hires_steps=2, prompt_syntax="a1111")
  pipe, hires_model = (sdjax.load_pipeline(m, loras=[(style, 0.5)]) for m in (model, other))
  alone = pipe.generate("a cat", hires_model=hires_model, **kw)
  assert np.abs(alone[0] * 255 - np.asarray(png, np.float32)).max() <= 1.0
  assert np.abs(pipe.generate("a cat", **kw)[0] - alone[0]).max() > 0.05  # its own model's
  without = pipe.generate("a cat", hires_model=sdjax.load_pipeline(other), **kw)
  assert np.abs(without[0] - alone[0]).max() > 0.05  # the hires model without the LoRA
  with pytest.raises(run.RunError, match="--hires_model is the hires pass's model: give "):
    run.generate_run(dataclasses.replace(config, hires_scale=0.0))
  with pytest.raises(run.RunError, match=r"--hires_model /nowhere: model folder '/nowhere' "):
    run.generate_run(dataclasses.replace(config, hires_model="/nowhere", overwrite=True,
                                         output_dir=str(tmp_path / "bad")))


def test_hires_prompt_takes_its_prompts_loras():
  """One LoRA set per image: a hires prompt with other <lora:...> tags is refused."""
  jobs = [run.ImageJob(0, "a <lora:ink:0.5> cat", "", 0)]
  run._Sampler._check_hires_loras(jobs, ["a dog, detailed <lora:ink:0.5>"])  # noqa: SLF001
  for other in ("a dog", "a <lora:ink:0.7> dog", "a <lora:ink:0.5> <lora:oil:1> dog"):
    with pytest.raises(run.RunError, match=r"image 0: its hires prompt's <lora:\.\.\.> tags"):
      run._Sampler._check_hires_loras(jobs, [other])  # noqa: SLF001


def test_png_metadata_is_shareable(model, single_run):
  text = Image.open(os.path.join(single_run, "00000", "000000.png")).text["parameters"]
  params = outputs.parse_a1111_parameters(text)
  unet = os.path.join(model, "unet", "diffusion_pytorch_model.safetensors")
  assert params["Model"] == "pipe" and model not in text  # no local path in shared images
  assert params["Model hash"] == outputs.short_hash(unet) == outputs._sha256_file(unet)[:10]  # noqa: SLF001
  assert params["Version"].startswith("sdjax ")


def test_cpu_devices_after_jax_started():
  """In a process whose CPU backend is up, the same count is fine and another a clear error."""
  import jax  # noqa: PLC0415

  from sdjax import parallel  # noqa: PLC0415

  started = len(jax.devices("cpu"))
  parallel.set_cpu_devices(started)
  with pytest.raises(ValueError, match=f"already started with {started} CPU devices"):
    parallel.set_cpu_devices(started + 1)


def _batches(groups, size, lookahead):
  """The batches of jobs whose groups are `groups` (one per job, in file order), as job indices
  (None: padding), with their groups."""
  jobs = iter([(0, run.ImageJob(i, f"p{i}", "", i, size=(g, g))) for i, g in enumerate(groups)])
  made = run._Batches(jobs, size, lambda job: job.size, lookahead)  # noqa: SLF001
  return [([None if s is None else j.index for s, j in batch], g) for batch, g in made]


def _check_batches(groups, batches, size):
  made = [i for batch, _ in batches for i in batch if i is not None]
  assert sorted(made) == list(range(len(groups)))  # every job exactly once
  for batch, group in batches:
    assert len(batch) == size and all(groups[i] == group[0] for i in batch if i is not None)
  for g in set(groups):  # a group's jobs keep their order
    assert [i for i in made if groups[i] == g] == [i for i, x in enumerate(groups) if x == g]


def test_batches_of_interleaved_groups_are_full():
  """Lines of five sizes in turn: read ahead and queued per size, every batch is full but the
  last of each size; without read-ahead (lookahead 1) almost every row was padding."""
  groups = [8 * (1 + i % 5) for i in range(203)]
  batches = _batches(groups, 4, 64)
  _check_batches(groups, batches, 4)
  padded = [b for b, _ in batches if None in b]
  assert len(batches) == 3 * 11 + 2 * 10 and len(padded) == 3  # sizes of 41, 41, 41, 40, 40 jobs
  naive = _batches(groups, 4, 1)
  _check_batches(groups, naive, 4)
  assert len(naive) == 203  # one job per batch


def test_batches_of_one_group_keep_file_order():
  groups = [16] * 10
  batches = _batches(groups, 4, 1024)
  assert [b for b, _ in batches] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, None, None]]


def test_batches_make_a_rare_job_within_the_lookahead():
  """A job of a size no later line has waits while at most `lookahead` later jobs are read
  (so its shard closes), not until the file ends."""
  groups = [24] + [16] * 300 + [24] * 3
  batches = _batches(groups, 4, 32)
  _check_batches(groups, batches, 4)
  first = next(k for k, (b, _) in enumerate(batches) if 0 in b)
  assert batches[first][0] == [0, None, None, None]
  assert 32 // 4 - 1 <= first <= 32 // 4  # after the batches of the 32 jobs read after it
  assert [b for b, _ in batches[-1:]] == [[301, 302, 303, None]]


def test_batches_of_two_processes_take_turns():
  """Two processes (their agreement simulated): each step both make the group one of them
  proposes, in turn, so each one's lines of several sizes still fill most of its batches."""
  files = [[8 * (1 + i % 3) for i in range(60)], [8 * (1 + i % 2) for i in range(41)]]
  procs = []
  for p, groups in enumerate(files):
    jobs = iter([(p, run.ImageJob(i, "", "", i, size=(g, g))) for i, g in enumerate(groups)])
    procs.append(run._Batches(jobs, 4, lambda job: job.size, 64))  # noqa: SLF001
  made, step = [[], []], 0
  while any(wanted := [b._proposal() for b in procs]):  # noqa: SLF001
    group = next(w for w in (*wanted[step % 2:], *wanted[:step % 2]) if w is not None)
    for p, b in enumerate(procs):
      made[p].append([None if s is None else j.index for s, j in b._take(group)])  # noqa: SLF001
      assert all(files[p][i] == group[0] for i in made[p][-1] if i is not None)
    step += 1
  for p, groups in enumerate(files):
    _check_batches(groups, [(b, (groups[next(i for i in b if i is not None)],)) for b in made[p]
                            if any(i is not None for i in b)], 4)
  assert step <= 16  # the longer file alone needs 15 (each process's last batch of a size
  # may be short); reading ahead for its own proposal only, a process padded more: 18


def test_per_line_image_sizes(model, cache, tmp_path, monkeypatch):
  """jsonl lines with their own width / height: batches keep one size (a program per size),
  each image is the one generate() makes at its size, and records and PNGs say the size. One
  program kept at a time: a size's program dropped and made again gives the same images."""
  import sdjax  # noqa: PLC0415

  monkeypatch.setattr(run, "MAX_PROGRAMS", 1)

  lines = ['{"prompt": "a cat"}', '{"prompt": "a wide dog", "width": 24, "num_images": 2}',
           '{"prompt": "a tall bird", "height": 24}', '{"prompt": "a fish"}']
  path = tmp_path / "sizes.jsonl"
  path.write_text("\n".join(lines) + "\n")
  out = str(tmp_path / "out")
  config = dataclasses.replace(_config(model, out, cache), prompts=(), prompts_file=str(path))
  summary = run.generate_run(config)
  assert (summary.images, summary.merged) == (5, True)
  records = _records(out)
  sizes = [(r["height"], r["width"]) for r in records]
  assert sizes == [(16, 16), (16, 24), (16, 24), (24, 16), (16, 16)]
  pipe = sdjax.load_pipeline(model)
  for record, (height, width) in zip(records, sizes, strict=True):
    png = Image.open(os.path.join(out, record["file"]))
    assert png.size == (width, height)
    assert outputs.parse_a1111_parameters(png.text["parameters"])["Size"] == f"{width}x{height}"
    alone = pipe.generate(record["prompt"], seed=record["seed"], steps=2, guidance_scale=3.0,
                          scheduler="euler_ancestral", height=height, width=width)
    assert np.abs(alone[0] * 255 - np.asarray(png, np.float32)).max() <= 1.0


def test_bad_line_size(model, cache, tmp_path):
  path = tmp_path / "bad.jsonl"
  path.write_text('{"prompt": "a cat", "width": 20}\n')
  config = dataclasses.replace(_config(model, str(tmp_path / "out"), cache), prompts=(),
                               prompts_file=str(path))
  with pytest.raises(run.RunError, match=r'bad.jsonl line 1: "width" must be a multiple of 8'):
    run.generate_run(config)
  path.write_text('{"prompt": "a cat", "prompt_2": 3}\n')
  config = dataclasses.replace(config, overwrite=True)
  with pytest.raises(run.RunError, match=r'bad.jsonl line 1: "prompt_2" must be a string'):
    run.generate_run(config)
  # SDXL's second encoder's prompts: refused on a model of one encoder, the run's at once, a
  # line's when its batch is made
  match = "prompt_2 and negative_prompt_2 are the prompts of SDXL's second text encoder: "
  with pytest.raises(run.RunError, match=match):
    run.generate_run(dataclasses.replace(config, negative_prompt_2="blurry"))
  path.write_text('{"prompt": "a cat", "prompt_2": "a dog"}\n')
  with pytest.raises(run.RunError, match=match):
    run.generate_run(config)


def test_init_image_lines(model, cache, tmp_path):
  """jsonl lines with an init_image run img2img at the run's --strength (here A1111's "Crop
  and resize" of the image to the image size, its Noise multiplier and Extra noise), beside
  text-to-image lines; records and PNGs say so."""
  import sdjax  # noqa: PLC0415

  rng = np.random.default_rng(0)
  Image.fromarray(rng.integers(0, 255, (20, 12, 3), np.uint8)).save(tmp_path / "a.png")
  os.makedirs(tmp_path / "sub")
  Image.fromarray(rng.integers(0, 255, (16, 16, 3), np.uint8)).save(tmp_path / "sub" / "b.png")
  path = tmp_path / "img2img.jsonl"
  path.write_text('{"prompt": "a cat", "init_image": "a.png"}\n{"prompt": "a dog"}\n'
                  '{"prompt": "a bird", "init_image": "sub/b.png"}\n')
  out = str(tmp_path / "out")
  config = dataclasses.replace(_config(model, out, cache), prompts=(), prompts_file=str(path),
                               strength=0.6, resize_mode="crop", noise_multiplier=0.8,
                               extra_noise=0.3)
  assert run.generate_run(config).images == 3
  records = _records(out)
  pipe = sdjax.load_pipeline(model)
  kw = dict(steps=2, guidance_scale=3.0, scheduler="euler_ancestral")
  for record, init in zip(records, ["a.png", None, "sub/b.png"], strict=True):
    png = Image.open(os.path.join(out, record["file"]))
    params = outputs.parse_a1111_parameters(png.text["parameters"])
    size = (record["height"], record["width"])
    if init is None:
      assert "init_image" not in record and "Denoising strength" not in params
      assert "noise_multiplier" not in record and "Noise multiplier" not in params
      assert "extra_noise" not in record and "Extra noise" not in params
      alone = pipe.generate(record["prompt"], seed=record["seed"], height=16, width=16, **kw)
    else:
      assert record["init_image"] == str(tmp_path / init) and record["strength"] == 0.6
      assert params["Denoising strength"] == "0.6" and record["resize_mode"] == "crop"
      assert params["Noise multiplier"] == "0.8" and record["noise_multiplier"] == 0.8
      assert params["Extra noise"] == "0.3" and record["extra_noise"] == 0.3
      image = np.asarray(outputs.resize_cover(Image.open(tmp_path / init), *size)) / 255
      alone = pipe.generate(record["prompt"], seed=record["seed"], init_images=image[None],
                            strength=0.6, noise_multiplier=0.8, extra_noise=0.3, **kw)
    assert np.abs(alone[0] * 255 - np.asarray(png, np.float32)).max() <= 1.0
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"prompt": "a cat", "init_image": "missing.png"}\n')
  with pytest.raises(run.RunError, match=r"image 0 \('a cat'\): cannot read image .*missing.png"):
    run.generate_run(dataclasses.replace(config, prompts_file=str(bad),
                                         output_dir=str(tmp_path / "bad")))


def test_per_line_schedule(model, cache, tmp_path):
  """jsonl steps, scheduler, strength and schedule type: each line's images under its own (a
  program each, a schedule type sharing its scheduler's), batched with the lines that share
  them; records and PNGs say them (A1111's sampler and schedule type names)."""
  import sdjax  # noqa: PLC0415

  Image.fromarray(np.random.default_rng(1).integers(0, 255, (16, 16, 3), np.uint8)).save(
      tmp_path / "a.png")
  lines = [{"prompt": "a cat", "steps": 3, "scheduler": "ddim"}, {"prompt": "a dog"},
           {"prompt": "a bird", "init_image": "a.png", "strength": 0.5},
           {"prompt": "a cow", "steps": 3, "scheduler": "ddim"},
           {"prompt": "a fox", "schedule_type": "SGM Uniform"}]
  path = tmp_path / "schedule.jsonl"
  path.write_text("".join(json.dumps(line) + "\n" for line in lines))
  out = str(tmp_path / "out")
  config = dataclasses.replace(_config(model, out, cache), prompts=(), prompts_file=str(path))
  assert run.generate_run(config).images == 5
  records = _records(out)
  assert [(r["steps"], r["scheduler"], r.get("strength")) for r in records] == [
      (3, "ddim", None), (2, "euler_ancestral", None), (2, "euler_ancestral", 0.5),
      (3, "ddim", None), (2, "euler_ancestral", None)]
  assert records[-1]["scheduler_options"] == {"schedule_type": "sgm_uniform"}
  assert all("scheduler_options" not in r for r in records[:-1])
  pipe = sdjax.load_pipeline(model)
  for record in records:
    png = Image.open(os.path.join(out, record["file"]))
    params = outputs.parse_a1111_parameters(png.text["parameters"])
    assert params["Steps"] == str(record["steps"])
    assert params["Sampler"] == {"ddim": "DDIM", "euler_ancestral": "Euler a"}[
        record["scheduler"]]
    init = {}
    if "scheduler_options" in record:
      assert params["Schedule type"] == "SGM Uniform"
      init = dict(schedule_type="sgm_uniform")
      plain = pipe.generate(record["prompt"], seed=record["seed"], steps=2, height=16, width=16,
                          guidance_scale=3.0, scheduler="euler_ancestral")
      assert np.abs(plain[0] * 255 - np.asarray(png, np.float32)).max() > 10  # it matters
    if "strength" in record:
      assert params["Denoising strength"] == "0.5"
      init = dict(init_images=outputs.read_image(str(tmp_path / "a.png"), (16, 16))[None],
                  strength=0.5)
    alone = pipe.generate(record["prompt"], seed=record["seed"], steps=record["steps"],
                          height=16, width=16, guidance_scale=3.0,
                          scheduler=record["scheduler"], **init)
    assert np.abs(alone[0] * 255 - np.asarray(png, np.float32)).max() <= 1.0


def test_run_schedule_type_and_a_lines_own_scheduler(model, cache, tmp_path):
  """The run's schedule type applies to lines under schedulers that have it; a line's scheduler
  without it (DDIM) places its own noise levels, as A1111 runs such a sampler, and its record
  and PNG say no schedule type."""
  import sdjax  # noqa: PLC0415

  path = tmp_path / "lines.jsonl"
  path.write_text('{"prompt": "a cat", "steps": 3, "scheduler": "ddim"}\n{"prompt": "a dog"}\n')
  out = str(tmp_path / "out")
  options = (("schedule_type", "sgm_uniform"),)
  config = dataclasses.replace(_config(model, out, cache), prompts=(), prompts_file=str(path),
                               scheduler_options=options)
  assert run.generate_run(config).images == 2
  records = _records(out)
  assert [r.get("scheduler_options") for r in records] == [None, dict(options)]
  pipe = sdjax.load_pipeline(model)
  for record in records:
    png = Image.open(os.path.join(out, record["file"]))
    params = outputs.parse_a1111_parameters(png.text["parameters"])
    assert params.get("Schedule type") == (None if record["scheduler"] == "ddim" else "SGM Uniform")
    alone = pipe.generate(record["prompt"], seed=record["seed"], steps=record["steps"],
                          height=16, width=16, guidance_scale=3.0, scheduler=record["scheduler"],
                          scheduler_options=record.get("scheduler_options"))
    assert np.abs(alone[0] * 255 - np.asarray(png, np.float32)).max() <= 1.0


def test_a1111_prompt_options_file(model, cache, tmp_path):
  """A .txt prompts file in A1111's "Prompts from file" form: each options line's images take
  its negative prompt, seed, CFG scale and count (its steps and sampler as jsonl's do,
  test_per_line_schedule); records and PNGs say them; a plain line keeps the run's."""
  import sdjax  # noqa: PLC0415

  path = tmp_path / "prompts.txt"
  path.write_text('--prompt "a cat" --negative_prompt red --seed 11 --cfg_scale 5 --n_iter 2 '
                  '--sampler_name "Euler a" --steps 2\na dog\n')
  out = str(tmp_path / "out")
  config = dataclasses.replace(_config(model, out, cache), prompts=(), prompts_file=str(path))
  assert run.generate_run(config).images == 3
  records = _records(out)
  assert [(r["prompt"], r["negative_prompt"], r["seed"], r["guidance_scale"]) for r in records] == [
      ("a cat", "red", 11, 5.0), ("a cat", "red", 12, 5.0), ("a dog", "", 102, 3.0)]
  pipe = sdjax.load_pipeline(model)
  for record in records:
    png = Image.open(os.path.join(out, record["file"]))
    params = outputs.parse_a1111_parameters(png.text["parameters"])
    assert (float(params["CFG scale"]), int(params["Seed"])) == (record["guidance_scale"],
                                                                record["seed"])
    alone = pipe.generate(record["prompt"], negative_prompts=record["negative_prompt"],
                          seed=record["seed"], steps=2, height=16, width=16,
                          guidance_scale=record["guidance_scale"], scheduler="euler_ancestral")
    assert np.abs(alone[0] * 255 - np.asarray(png, np.float32)).max() <= 1.0


def test_per_line_variation_seeds(model, cache, tmp_path):
  """A1111's variation seeds per line (its "Prompts from file" options, jsonl's fields): a line's
  j-th image varied towards subseed + j, in a batch beside an image without variation, which
  stays as it is; each image is generate()'s; records and PNGs say them."""
  import sdjax  # noqa: PLC0415

  path = tmp_path / "prompts.txt"
  path.write_text('--prompt "a cat" --seed 11 --subseed 50 --subseed_strength 0.4\na dog\n'
                  '--prompt "a bird" --subseed 70 --subseed_strength 0.6 --n_iter 2\n')
  out = str(tmp_path / "out")
  config = dataclasses.replace(_config(model, out, cache), prompts=(), prompts_file=str(path))
  assert run.generate_run(config).images == 4
  records = _records(out)
  assert [(r["seed"], r.get("subseed"), r.get("subseed_strength")) for r in records] == [
      (11, 50, 0.4), (101, None, None), (102, 70, 0.6), (103, 71, 0.6)]
  pipe = sdjax.load_pipeline(model)
  for record in records:
    png = Image.open(os.path.join(out, record["file"]))
    params = outputs.parse_a1111_parameters(png.text["parameters"])
    assert params.get("Variation seed") == (None if "subseed" not in record
                                            else str(record["subseed"]))
    alone = pipe.generate(record["prompt"], seed=record["seed"], steps=2, height=16, width=16,
                          guidance_scale=3.0, scheduler="euler_ancestral",
                          subseed=record.get("subseed"),
                          subseed_strength=record.get("subseed_strength", 0.0))
    assert np.abs(alone[0] * 255 - np.asarray(png, np.float32)).max() <= 1.0
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"prompt": "a cat", "subseed_strength": 0.5}\n')
  with pytest.raises(run.RunError, match=r'bad.jsonl line 1: "subseed_strength" moves the noise '
                                         r'towards a variation seed\'s: give "subseed" too'):
    run.generate_run(dataclasses.replace(config, prompts_file=str(bad),
                                         output_dir=str(tmp_path / "bad")))


def test_noise_batch_run(model, cache, tmp_path):
  """--noise_batch 2 (ComfyUI's batches): the run's images take seeds 100, 100, 101..., a line
  with its own seed s: s, s, s + 1; image k of a batch is generate()'s k-th of that batch, in the
  run's own batches beside any other line's; records and PNGs say the batch and the place, from
  which the infotext reader makes the batch again."""
  import sdjax  # noqa: PLC0415
  from sdjax import infotext  # noqa: PLC0415

  path = tmp_path / "prompts.txt"
  path.write_text('--prompt "a cat" --seed 11 --n_iter 3\na dog\na bird\n')
  out = str(tmp_path / "out")
  config = dataclasses.replace(_config(model, out, cache, rng="torch_cpu", noise_batch=2),
                               prompts=(), prompts_file=str(path))
  assert run.generate_run(config).images == 5
  records = _records(out)
  assert [(r["seed"], r["batch_place"], r["noise_batch"]) for r in records] == [
      (11, 0, 2), (11, 1, 2), (12, 0, 2), (101, 1, 2), (102, 0, 2)]
  pipe = sdjax.load_pipeline(model)
  for record in records:
    png = Image.open(os.path.join(out, record["file"]))
    params = outputs.parse_a1111_parameters(png.text["parameters"])
    assert (params["Noise batch"], params["Noise batch place"]) == (
        "2", str(record["batch_place"]))
    place = record["batch_place"]
    batch = pipe.generate([record["prompt"]] * (place + 1), seed=record["seed"], steps=2,
                          height=16, width=16, guidance_scale=3.0, scheduler="euler_ancestral",
                          rng="torch_cpu", noise_batch=2)
    assert np.abs(batch[place] * 255 - np.asarray(png, np.float32)).max() <= 1.0
  alone = pipe.generate("a cat", seed=11, steps=2, height=16, width=16, guidance_scale=3.0,
                        scheduler="euler_ancestral", rng="torch_cpu")
  second = np.asarray(Image.open(os.path.join(out, records[1]["file"])), np.float32)
  assert np.abs(alone[0] * 255 - second).max() > 8  # not its seed's own noise
  found = infotext.reproduce(png.text["parameters"])
  assert (found.flags["noise_batch"], found.flags["num_images_per_prompt"]) == ("2", "2")
  assert any("its image 0 (from 0)" in text for _, text in found.notes)
  # The hires fix: its second pass's noise from the batch's draws too, as generate()'s.
  path.write_text('--prompt "a cat" --seed 11 --n_iter 2\n')
  hires = dataclasses.replace(config, hires_scale=1.5, hires_steps=2, output_dir=out + "-hires")
  assert run.generate_run(hires).images == 2
  batch = pipe.generate(["a cat"] * 2, seed=11, steps=2, height=16, width=16, guidance_scale=3.0,
                        scheduler="euler_ancestral", rng="torch_cpu", noise_batch=2,
                        hires_scale=1.5, hires_steps=2)
  for record in _records(out + "-hires"):
    png = np.asarray(Image.open(os.path.join(out + "-hires", record["file"])), np.float32)
    assert np.abs(batch[record["batch_place"]] * 255 - png).max() <= 1.0
  for bad, match in ((dict(rng="jax"), "--noise_batch is ComfyUI's batch noise"),
                     (dict(noise_batch=0), "--noise_batch must be an integer >= 1"),
                     (dict(subseed=3, subseed_strength=0.5), "--noise_batch and "
                                                             "--subseed_strength")):
    with pytest.raises(run.RunError, match=match):
      run.generate_run(dataclasses.replace(config, **bad))
  varied = tmp_path / "varied.txt"
  varied.write_text('a dog\n--prompt "a cat" --subseed 50 --subseed_strength 0.4\n')
  with pytest.raises(run.RunError, match="image 1: its line's variation seeds"):
    run.generate_run(dataclasses.replace(config, prompts_file=str(varied),
                                         output_dir=str(tmp_path / "varied")))


def test_clip_skip(model, cache, tmp_path):
  """--clip_skip N (A1111's Clip skip): every image is generate()'s with diffusers' clip_skip
  N - 1; records, PNGs (`Clip skip: 2`) and the settings say it; bad values are one-line
  errors."""
  import sdjax  # noqa: PLC0415

  out = str(tmp_path / "out")
  config = dataclasses.replace(_config(model, out, cache), prompts=PROMPTS[:1], clip_skip=2)
  assert run.generate_run(config).images == 1
  record = json.loads(open(os.path.join(out, outputs.MANIFEST_NAME)).readline())
  assert record["clip_skip"] == 2
  png = Image.open(os.path.join(out, record["file"]))
  assert outputs.parse_a1111_parameters(png.text["parameters"])["Clip skip"] == "2"
  pipe = sdjax.load_pipeline(model)
  kw = dict(seed=record["seed"], steps=2, height=16, width=16, guidance_scale=3.0,
            scheduler="euler_ancestral")
  alone = pipe.generate(record["prompt"], clip_skip=1, **kw)
  assert np.abs(alone[0] * 255 - np.asarray(png, np.float32)).max() <= 1.0
  assert np.abs(pipe.generate(record["prompt"], **kw)[0] - alone[0]).max() * 255 > 2.0
  with pytest.raises(run.RunError, match="other settings"):
    run.generate_run(dataclasses.replace(config, clip_skip=1))
  layers = pipe.text_encoder.config.num_hidden_layers
  for bad in (0, layers + 1):
    with pytest.raises(run.RunError, match=f"--clip_skip must be an integer from 1 .* to "
                       f"{layers}, got {bad}"):
      run.generate_run(dataclasses.replace(config, clip_skip=bad,
                                           output_dir=str(tmp_path / "bad")))


def test_styles(model, cache, tmp_path):
  """--styles_file with --style: every image is generate()'s of its styled texts, which records
  and PNGs say; another style list (or an edited file) is another run's folder; a missing style
  is a one-line error."""
  import sdjax  # noqa: PLC0415

  styles = tmp_path / "styles.csv"
  styles.write_text("name,prompt,negative_prompt\nNoir,{prompt} in black and white,color\n")
  out = str(tmp_path / "out")
  config = dataclasses.replace(_config(model, out, cache), prompts=PROMPTS[:1],
                               styles_file=str(styles), styles=("Noir",))
  assert run.generate_run(config).images == 1
  record = json.loads(open(os.path.join(out, outputs.MANIFEST_NAME)).readline())
  assert (record["prompt"], record["negative_prompt"]) == (
      "a photo of a cat 0 in black and white", "color")
  png = Image.open(os.path.join(out, record["file"]))
  assert outputs.parse_a1111_parameters(png.text["parameters"])["prompt"] == record["prompt"]
  alone = sdjax.load_pipeline(model).generate(
      record["prompt"], negative_prompts="color", seed=record["seed"], steps=2, height=16,
      width=16, guidance_scale=3.0, scheduler="euler_ancestral")
  assert np.abs(alone[0] * 255 - np.asarray(png, np.float32)).max() <= 1.0
  with pytest.raises(run.RunError, match="other settings"):
    run.generate_run(dataclasses.replace(config, styles=()))
  styles.write_text("name,prompt,negative_prompt\nNoir,{prompt} in sepia,color\n")
  with pytest.raises(run.RunError, match="other settings"):
    run.generate_run(config)
  with pytest.raises(run.RunError, match=r"--styles_file: unknown style 'Pop' \(the styles "):
    run.generate_run(dataclasses.replace(config, styles=("Pop",), output_dir=str(tmp_path / "x")))
  with pytest.raises(run.RunError, match="--style names a style of a styles file"):
    run.generate_run(dataclasses.replace(config, styles_file=None,
                                         output_dir=str(tmp_path / "y")))


def test_scheduler_options(model, cache, tmp_path):
  """--scheduler_options: every image is generate()'s with those options; records and PNGs say
  them (a sigma spacing also as A1111's `Schedule type`), and the settings check tells the run
  from one without."""
  import sdjax  # noqa: PLC0415

  out = str(tmp_path / "out")
  options = (("timestep_spacing", "trailing"), ("use_exponential_sigmas", True))
  config = dataclasses.replace(_config(model, out, cache), prompts=PROMPTS[:2],
                               scheduler="euler", scheduler_options=options)
  assert run.generate_run(config).images == len(config.prompts)
  records = _records(out)
  pipe = sdjax.load_pipeline(model)
  for record in records:
    assert record["scheduler_options"] == dict(options)
    png = Image.open(os.path.join(out, record["file"]))
    params = outputs.parse_a1111_parameters(png.text["parameters"])
    assert params["Scheduler options"] == "timestep_spacing=trailing; use_exponential_sigmas=True"
    assert params["Sampler"] == "Euler" and params["Schedule type"] == "Exponential"
    kw = dict(seed=record["seed"], steps=2, height=16, width=16, guidance_scale=3.0,
              scheduler="euler")
    alone = pipe.generate(record["prompt"], scheduler_options=dict(options), **kw)
    assert np.abs(alone[0] * 255 - np.asarray(png, np.float32)).max() <= 1.0
    assert np.abs(pipe.generate(record["prompt"], **kw)[0] - alone[0]).max() > 0.05
  with pytest.raises(run.RunError, match="scheduler_options"):  # another run's folder
    run.generate_run(dataclasses.replace(config, scheduler_options=()))
  # A1111's schedule types: in the PNG as A1111 writes them.
  out = str(tmp_path / "ays")
  options = (("schedule_type", "align_your_steps"),)
  config = dataclasses.replace(config, output_dir=out, prompts=PROMPTS[:1],
                               scheduler_options=options)
  assert run.generate_run(config).images == 1
  record = json.loads(open(os.path.join(out, outputs.MANIFEST_NAME)).readline())
  png = Image.open(os.path.join(out, record["file"]))
  params = outputs.parse_a1111_parameters(png.text["parameters"])
  assert params["Schedule type"] == "Align Your Steps" and params["Sampler"] == "Euler"
  alone = pipe.generate(record["prompt"], schedule_type="align_your_steps",
                        **dict(kw, seed=record["seed"]))
  assert np.abs(alone[0] * 255 - np.asarray(png, np.float32)).max() <= 1.0
  # A1111's schedule settings (k-diffusion form): its fields too, and read back as given.
  from sdjax import infotext  # noqa: PLC0415

  out = str(tmp_path / "rho")
  options = (("k_diffusion", True), ("schedule_type", "karras"), ("schedule_rho", 5.0),
             ("discard_penultimate_sigma", True))
  config = dataclasses.replace(config, output_dir=out, scheduler_options=options)
  assert run.generate_run(config).images == 1
  record = json.loads(open(os.path.join(out, outputs.MANIFEST_NAME)).readline())
  png = Image.open(os.path.join(out, record["file"]))
  params = outputs.parse_a1111_parameters(png.text["parameters"])
  assert params["Schedule rho"] == "5.0" and params["Schedule type"] == "Karras"
  assert params["Discard penultimate sigma"] == "True"  # A1111's setting's field
  found = infotext.reproduce(png.text["parameters"])
  assert json.loads(found.flags["scheduler_options"])["schedule_rho"] == 5.0
  assert json.loads(found.flags["scheduler_options"])["discard_penultimate_sigma"] is True
  a1111_fields = {k: v for k, v in params.items() if k not in ("Scheduler options", "Version")}
  as_a1111 = infotext.from_fields(a1111_fields)  # as A1111 reads them
  assert json.loads(as_a1111.flags["scheduler_options"])["discard_penultimate_sigma"] is True
  assert [flag for flag, _ in found.notes] == ["model"]  # no "not reproduced: Schedule rho"
  alone = pipe.generate(record["prompt"], scheduler_options=dict(options),
                        **dict(kw, seed=record["seed"]))
  assert np.abs(alone[0] * 255 - np.asarray(png, np.float32)).max() <= 1.0


def test_per_line_guidance(model, cache, tmp_path):
  """jsonl guidance_scale: each line's images at its own scale (<= 1: no guidance, its own
  program), records and PNGs say it; a bad value is a one-line error."""
  import sdjax  # noqa: PLC0415

  path = tmp_path / "cfg.jsonl"
  path.write_text('{"prompt": "a cat", "guidance_scale": 7.5}\n{"prompt": "a dog"}\n'
                  '{"prompt": "a bird", "guidance_scale": 1}\n')
  out = str(tmp_path / "out")
  config = dataclasses.replace(_config(model, out, cache), prompts=(), prompts_file=str(path))
  assert run.generate_run(config).images == 3
  records = _records(out)
  assert [r["guidance_scale"] for r in records] == [7.5, 3.0, 1.0]
  pipe = sdjax.load_pipeline(model)
  for record in records:
    png = Image.open(os.path.join(out, record["file"]))
    params = outputs.parse_a1111_parameters(png.text["parameters"])
    assert float(params["CFG scale"]) == record["guidance_scale"]
    alone = pipe.generate(record["prompt"], seed=record["seed"], steps=2, height=16, width=16,
                          guidance_scale=record["guidance_scale"], scheduler="euler_ancestral")
    assert np.abs(alone[0] * 255 - np.asarray(png, np.float32)).max() <= 1.0
  path.write_text('{"prompt": "a cat", "guidance_scale": "high"}\n')
  with pytest.raises(run.RunError, match=r'cfg.jsonl line 1: "guidance_scale" must be a number'):
    run.generate_run(dataclasses.replace(config, output_dir=str(tmp_path / "bad")))


def test_guidance_rescale(model, cache, tmp_path):
  """--guidance_rescale: every image is generate()'s at that rescale (a line without guidance
  untouched), run.json and PNGs say it; composable prompts with it are a one-line error."""
  import sdjax  # noqa: PLC0415

  path = tmp_path / "lines.jsonl"
  # At guidance 9 the rescale moves this tiny model's pixels by ~4.6 levels (at 3: 0.45).
  path.write_text('{"prompt": "a cat", "guidance_scale": 9}\n'
                  '{"prompt": "a bird", "guidance_scale": 1}\n')
  out = str(tmp_path / "out")
  config = dataclasses.replace(_config(model, out, cache), prompts=(), prompts_file=str(path),
                               guidance_rescale=0.7)
  assert run.generate_run(config).images == 2
  assert json.load(open(os.path.join(out, "run.json")))["guidance_rescale"] == 0.7
  records = _records(out)
  pipe = sdjax.load_pipeline(model)
  for record in records:
    png = Image.open(os.path.join(out, record["file"]))
    params = outputs.parse_a1111_parameters(png.text["parameters"])
    assert params["Guidance rescale"] == "0.7"
    kw = dict(seed=record["seed"], steps=2, height=16, width=16,
              guidance_scale=record["guidance_scale"], scheduler="euler_ancestral")
    alone = pipe.generate(record["prompt"], guidance_rescale=0.7, **kw)
    assert np.abs(alone[0] * 255 - np.asarray(png, np.float32)).max() <= 1.0
    moved = np.abs(pipe.generate(record["prompt"], **kw)[0] - alone[0]).max() * 255
    assert moved > 2.0 if record["guidance_scale"] > 1 else moved == 0
  path.write_text('{"prompt": "a cat AND a dog"}\n')
  with pytest.raises(run.RunError, match=r"composable prompts .* without --guidance_rescale"):
    run.generate_run(dataclasses.replace(config, prompt_syntax="a1111",
                                         output_dir=str(tmp_path / "and")))
  with pytest.raises(run.RunError, match="--guidance_rescale must be a number >= 0"):
    run.generate_run(dataclasses.replace(config, guidance_rescale=-1.0,
                                         output_dir=str(tmp_path / "bad")))


def test_line_options_over_the_runs():
  """A prompt line's own scheduler options win over the run's; its placement (a list of sigmas,
  a spacing) replaces the run's; k_diffusion stays only where the line's scheduler takes it."""
  import types

  from sdjax import testing
  from sdjax.plan import freeze_options

  pipe = types.SimpleNamespace(scheduler_config=testing.SCHEDULER_SD15, is_sdxl=False)
  cfg = run.RunConfig(prompts=PROMPTS, scheduler_options=(("k_diffusion", True),
                                                          ("schedule_type", "karras"),
                                                          ("timestep_spacing", "trailing")))
  assert run.line_options(cfg, pipe, "euler", None) == dict(cfg.scheduler_options)
  assert run.line_options(cfg, pipe, "ddim", None) == {"timestep_spacing": "trailing"}
  own = freeze_options({"timestep_spacing": "linspace", "sigmas": [9, 1, 0]})
  assert run.line_options(cfg, None, "euler", None, own) == {
      "k_diffusion": True, "sigmas": [9, 1, 0], "timestep_spacing": "linspace"}
  assert run.line_options(cfg, None, "kdpm2", "exponential", freeze_options({"x": 1})) == {
      "k_diffusion": True, "schedule_type": "exponential", "timestep_spacing": "trailing", "x": 1}
  assert run.line_options(cfg, None, "unipc", "automatic", own) == {
      "sigmas": [9, 1, 0], "timestep_spacing": "linspace"}
  assert run.line_options(cfg, None, "dpmpp_sde", "automatic", own) == {
      "k_diffusion": True, "sigmas": [9, 1, 0], "timestep_spacing": "linspace"}
