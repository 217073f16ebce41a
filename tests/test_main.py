"""main.py as users run it: a subprocess on a tiny random pipeline folder."""

import hashlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import default_codegen_flags
from PIL import Image

import sdjax
from sdjax import outputs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["a red circle in the center", "a photo of a cat", "a blue square", "a dog",
           "a green triangle"]
COMMON = ["--steps", "2", "--height", "16", "--width", "16", "--guidance_scale", "3",
          "--scheduler", "euler_ancestral"]


def _env(devices: int = 1, default_codegen: bool = False):
  env = dict(os.environ)
  flags = default_codegen_flags() if default_codegen else env.get("XLA_FLAGS", "")
  env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={devices}"  # after conftest's
  env["JAX_PLATFORMS"] = "cpu"
  return env


def main_py(args, devices=1, check=True, **kwargs):
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "main.py"), *args], cwd=ROOT,
                        env=_env(devices), capture_output=True, text=True, timeout=300, **kwargs)
  if check and proc.returncode != 0:
    raise AssertionError(f"main.py failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
  return proc


def _prompt_args(prompts=PROMPTS):
  return [a for p in prompts for a in ("--prompt", p)]


def _pixels(folder):
  """{file: pixels} of every image the folder's manifest names."""
  return {r["file"]: np.asarray(Image.open(os.path.join(folder, r["file"])))
          for r in _manifest(folder)}


def _manifest(folder):
  with open(os.path.join(folder, "manifest.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="module")
def reference_run(model, cache, tmp_path_factory):
  """5 images on 1 device, 2 per device: the run every other layout must reproduce."""
  out = str(tmp_path_factory.mktemp("ref") / "out")
  main_py(["--model", model, *_prompt_args(), *COMMON, "--batch_size", "2", "--seed", "100",
           "--output_dir", out, "--compilation_cache", cache])
  return out


def test_outputs_written(reference_run, model):
  out = reference_run
  pixels = _pixels(out)
  assert sorted(pixels) == [f"00000/{k:06d}.png" for k in range(5)]  # padding never written
  assert sorted(f for f in os.listdir(os.path.join(out, "00000"))) == sorted(
      os.path.basename(f) for f in pixels)
  records = _manifest(out)
  assert [r["index"] for r in records] == list(range(5))
  for k, r in enumerate(records):
    assert r["prompt"] == PROMPTS[k] and r["seed"] == 100 + k and r["steps"] == 2
    assert r["scheduler"] == "euler_ancestral" and r["height"] == 16 and r["width"] == 16
    assert r["sdjax_version"] == sdjax.__version__ and r["model"] == model
    text = Image.open(os.path.join(out, r["file"])).text["parameters"]
    assert text.splitlines()[0] == PROMPTS[k]
    assert f"Seed: {100 + k}" in text and "Size: 16x16" in text and "Steps: 2" in text
  assert os.path.isfile(os.path.join(out, "grid.png"))
  assert "a photo of a cat" in open(os.path.join(out, "index.html")).read()
  assert not [f for f in os.listdir(out) if ".tmp" in f]


def test_regenerating_one_image_alone(reference_run, model):
  record = _manifest(reference_run)[3]
  pipe = sdjax.load_pipeline(model)
  alone = pipe.generate(record["prompt"], negative_prompts=record["negative_prompt"],
                        steps=record["steps"], guidance_scale=record["guidance_scale"],
                        scheduler=record["scheduler"], height=16, width=16, seed=record["seed"])
  written = np.asarray(Image.open(os.path.join(reference_run, record["file"])), np.float32)
  assert np.abs(alone[0] * 255 - written).max() <= 1.0


def test_eight_devices_same_pixels(reference_run, model, cache, tmp_path):
  """--cpu_devices 8 splits this CPU into 8 devices (the environment asks for one)."""
  out = str(tmp_path / "out")
  proc = main_py(["--model", model, *_prompt_args(), *COMMON, "--batch_size", "2", "--seed",
                  "100", "--output_dir", out, "--compilation_cache", cache, "--cpu_devices", "8",
                  "--verbosity", "0"], devices=1)
  ref = _pixels(reference_run)
  got = _pixels(out)
  assert sorted(got) == sorted(ref)
  for name in ref:
    np.testing.assert_array_equal(got[name], ref[name])
  assert "5 images" in proc.stderr and "2 per device on 8 devices" in proc.stderr


def test_cfg_parallel_splits_each_guidance_pair(model):
  """CFG parallelism: each device of a pair runs the UNet on its images' uncond or cond rows
  only, and two pairs make bit for bit what one device makes with the split program (scheduled
  A1111 prompts included); the default program agrees to float rounding. (XLA:CPU's default
  emitters: the classic ones round the programs of 2 and 4 rows differently.)"""
  code = f"""
import json, jax, numpy as np, sdjax
from jax.sharding import Mesh
from sdjax import conditioning, parallel, sampling
pipe = sdjax.load_pipeline({model!r})
rows, predict = [], conditioning.predict
def spy(nets, params, x, *args, **kwargs):
  rows.append(int(x.shape[0]))
  return predict(nets, params, x, *args, **kwargs)
conditioning.predict = spy
prompts = ["a [red:blue:0.5] circle", "a (cat:1.3)", "a [dog|cat]", "a green triangle"]
negatives = ["a blue square", None, "blurry", None]
seeds = np.arange(7, 11, dtype=np.uint32)
def sample(mesh, split, lo=0, hi=4):
  spec, state = sampling.prepare(pipe, 2, steps=4, scheduler="euler_ancestral", height=16,
                                 width=16, guidance_scale=6.0, cfg_split=split)
  cond = sampling.make_conditioning(pipe, prompts, negatives,
                                    a1111=sampling.a1111_options(spec, state, 4))
  cond = jax.tree.map(lambda a: np.asarray(a)[lo:hi], cond)
  rows.clear()
  out = parallel.sharded_sampler(mesh, spec, pipe)(
      parallel.replicate(pipe.params, mesh), parallel.shard_tree(mesh, cond, hi - lo),
      parallel.shard_batch(mesh, seeds[lo:hi], hi - lo), np.float32(6), np.float32(0),
      parallel.replicate(state, mesh))
  return parallel.local_rows_numpy(out), sorted(set(rows)), len(out.addressable_shards)
pairs = parallel.make_mesh(cfg_parallel=True)
one = Mesh(np.asarray(jax.devices()[:1]), (parallel.DATA,))
two = Mesh(np.asarray(jax.devices()[:2]), (parallel.DATA,))
split, split_rows, shards = sample(pairs, True)
alone = np.concatenate([sample(one, True, 0, 2)[0], sample(one, True, 2, 4)[0]])
plain, plain_rows, _ = sample(two, False)
print(json.dumps(dict(mesh=dict(pairs.shape), split_rows=split_rows, plain_rows=plain_rows,
                      shards=shards, images=split.shape[0],
                      bitwise=bool(np.array_equal(split, alone)),
                      vs_plain=float(np.abs(split - plain).max()))))
"""
  proc = subprocess.run([sys.executable, "-c", code], env=_env(4, default_codegen=True),
                        capture_output=True, text=True, timeout=300, cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-2000:]
  got = json.loads(proc.stdout.splitlines()[-1])
  assert got["mesh"] == {"data": 2, "cfg": 2}
  assert got["split_rows"] == [2] and got["plain_rows"] == [4]  # 2 images per device
  assert got["shards"] == 4 and got["images"] == 4  # each pair's copy counted once
  assert got["bitwise"]
  assert got["vs_plain"] <= 1e-5


def test_generate_cfg_parallel(model, tmp_path):
  """generate(cfg_parallel=True) on two devices: each runs the UNet on the B rows of one side,
  the first decodes, and the images are those of the split program on one device (a process of
  its own; both with XLA:CPU's default emitters, which round both programs alike)."""
  kw = dict(steps=3, scheduler="euler_ancestral", guidance_scale=5.0, height=16, width=16,
            seed=4, prompt_syntax="a1111")
  prompts = ["a [red:blue:1] circle", "a (cat:1.2) on a tree"]
  code = f"""
import sys, jax, numpy as np, sdjax
from sdjax import conditioning, sampling
rows, predict = [], conditioning.predict
def spy(nets, params, x, *args, **kwargs):
  rows.append(int(x.shape[0]))
  return predict(nets, params, x, *args, **kwargs)
conditioning.predict = spy
decodes = []
sampling.decode_images = lambda *a: decodes.append(a)  # inside sample_fn, not _jitted_decode
pipe = sdjax.load_pipeline({model!r})
np.save(sys.argv[1], pipe.generate({prompts!r}, cfg_parallel=True, **{kw!r}))
print(len(jax.devices()), sorted(set(rows)), len(sampling._replicated), len(decodes))
"""
  lines = {}
  for devices in (2, 1):
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / f"{devices}.npy")],
                          env=_env(devices, default_codegen=True), capture_output=True,
                          text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines[devices] = proc.stdout.splitlines()[-1]
  # 2 rows a call, the weights on the pair, and the pair's program ends in latents: one device
  # decodes them in a program of its own
  assert lines[2] == "2 [2] 1 0"
  assert lines[1] == "1 [2] 0 0"  # the same split program on one device: no pair to copy to
  np.testing.assert_array_equal(np.load(tmp_path / "2.npy"), np.load(tmp_path / "1.npy"))
  # (The split program against the default one: test_cfg_parallel_splits_each_guidance_pair.)


def test_cfg_parallel_run(reference_run, model, cache, tmp_path):
  """main.py --cfg_parallel on 2 devices: the reference run's images, to rounding."""
  out = str(tmp_path / "out")
  proc = main_py(["--model", model, *_prompt_args(), *COMMON, "--batch_size", "2", "--seed",
                  "100", "--output_dir", out, "--compilation_cache", cache, "--cpu_devices", "2",
                  "--cfg_parallel", "--verbosity", "0"], devices=1)
  assert "2 per device on 2 devices (guidance pairs split over 2)" in proc.stderr
  ref, got = _pixels(reference_run), _pixels(out)
  assert sorted(got) == sorted(ref)
  for name in ref:
    assert np.abs(got[name].astype(int) - ref[name]).max() <= 1
  again = main_py(["--model", model, *_prompt_args(), *COMMON, "--batch_size", "2", "--seed",
                   "100", "--output_dir", out, "--compilation_cache", cache, "--verbosity", "0"],
                  check=False)
  assert again.returncode == 2 and "cfg_parallel" in again.stderr  # not mixed into one run


def test_batch_is_split_across_devices(model):
  """The compiled program's per-device share is batch_size, not the global batch."""
  code = f"""
import jax, numpy as np, sdjax
from sdjax import parallel, sampling
pipe = sdjax.load_pipeline({model!r})
mesh = parallel.make_mesh()
spec, state = sampling.prepare(pipe, 2, steps=2, scheduler="ddim", height=16, width=16,
                               guidance_scale=3.0)
cond = parallel.shard_tree(mesh, sampling.make_conditioning(pipe, ["a"] * 16, ["a"] * 16), 16)
seeds = parallel.shard_batch(mesh, np.arange(16, dtype=np.uint32), 16)
out = parallel.sharded_sampler(mesh, spec, pipe)(
    parallel.replicate(pipe.params, mesh), cond, seeds, np.float32(3), np.float32(0),
    parallel.replicate(state, mesh))
print(mesh.size, [s.data.shape[0] for s in out.addressable_shards], len({{s.device for s in out.addressable_shards}}))
"""
  proc = subprocess.run([sys.executable, "-c", code], env=_env(8), capture_output=True,
                        text=True, timeout=300, cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.split("\n")[-2] == "8 [2, 2, 2, 2, 2, 2, 2, 2] 8"


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _two_processes(args, out):
  """main.py `args` as a run of two processes on this machine, into `out` (started)."""
  address = f"127.0.0.1:{_free_port()}"
  return [subprocess.Popen(
      [sys.executable, os.path.join(ROOT, "main.py"), *args, "--output_dir", out,
       "--coordinator_address", address, "--num_processes", "2", "--process_id", str(i)],
      cwd=ROOT, env=_env(1), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for i in range(2)]


def _two_processes_make(args, out, single, images):
  """Two processes run `args` into `out` to the end: the `images` of run folder `single`."""
  for p in _two_processes(args, out):
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]
  ref, got = _pixels(single), _pixels(out)
  assert sorted(got) == sorted(ref) and len(ref) == images
  for name in ref:
    np.testing.assert_array_equal(got[name], ref[name])


def test_two_processes_mixed_sizes(model, cache, tmp_path):
  """Two processes write their own shards (0 and 2; 1) into one folder, with per-line image
  sizes: each step the processes agree on one size (one pads); a line of variation seeds among
  them, with its own Clip skip and scheduler options (its own program, agreed on as a tuple). The
  images are the single process's, every one exactly once, the manifest in order.
  (A process passing the plain seeds beside another's variation form still ran here: these CPU
  programs have no collectives; run.py agrees on the form anyway, as a global program needs.)"""
  path = tmp_path / "sizes.jsonl"
  path.write_text("".join(json.dumps(line) + "\n" for line in [
      {"prompt": "a cat"}, {"prompt": "a dog", "width": 24}, {"prompt": "a bird", "width": 24},
      {"prompt": "a fish", "width": 24, "num_images": 2},
      {"prompt": "a frog", "subseed": 5, "subseed_strength": 0.5, "clip_skip": 2,
       "scheduler_options": {"timestep_spacing": "trailing"}}]))
  args = ["--model", model, "--prompts_file", str(path), *COMMON, "--batch_size", "2",
          "--seed", "9", "--shard_size", "2", "--compilation_cache", cache]
  single = str(tmp_path / "single")
  main_py([*args, "--output_dir", single])
  out = str(tmp_path / "out")
  _two_processes_make(args, out, single, 6)
  assert [(r["height"], r["width"]) for r in _manifest(out)] == [
      (16, 16), (16, 24), (16, 24), (16, 24), (16, 24), (16, 16)]
  frog = _manifest(out)[-1]
  assert frog["clip_skip"] == 2 and frog["scheduler_options"]["timestep_spacing"] == "trailing"
  assert [r["index"] for r in _manifest(out)] == list(range(6))
  assert sorted(os.listdir(os.path.join(out, "manifests"))) == [
      f"00000{s}.jsonl" for s in range(3)]


def test_two_processes_stop_together(model, cache, tmp_path):
  """SIGTERM to one of two processes mid-run (one host of a pod evicted): both stop at the same
  step after writing what they dispatched (before, the other waited forever in the next step's
  collective), exit non-zero, and a rerun completes the run with the single process's pixels."""
  prompts = [f"a photo of a cat {i}" for i in range(40)]
  args = ["--model", model, *_prompt_args(prompts), *COMMON, "--batch_size", "1",
          "--shard_size", "2", "--compilation_cache", cache]
  single = str(tmp_path / "single")
  main_py([*args, "--output_dir", single])
  out = str(tmp_path / "out")
  procs = _two_processes(args, out)
  manifests = os.path.join(out, "manifests")
  _wait_for(lambda: os.path.isdir(manifests) and len(os.listdir(manifests)) >= 2, procs[1])
  procs[1].send_signal(signal.SIGTERM)
  errs = [p.communicate(timeout=120)[1] for p in procs]
  assert [p.returncode for p in procs] == [130, 143], errs[0][-2000:] + errs[1][-2000:]
  assert "on another process of the run" in errs[0] and "interrupted (SIGTERM)" in errs[1]
  assert not any("Traceback" in e for e in errs)
  assert not os.path.exists(os.path.join(out, "manifest.jsonl"))  # stopped early
  _two_processes_make(args, out, single, 40)


@pytest.mark.parametrize("bad", ["line", "image"])
def test_two_processes_fail_together(bad, model, cache, tmp_path):
  """A bad prompt line in one process's shard (found reading it), or a missing init image
  (found making its batch): both processes stop at the next step, each with a one-line error
  (before, the one that found it printed its error and both then waited forever in
  collectives)."""
  path = tmp_path / "p.jsonl"
  lines = [{"prompt": f"a cat {i}"} for i in range(12)]
  # Shard 4 of 2-image shards: process 0's.
  lines[9] = ({"prompt": "a dog", "seed": -1} if bad == "line" else
              {"prompt": "a dog", "init_image": "missing.png"})
  path.write_text("".join(json.dumps(line) + "\n" for line in lines))
  args = ["--model", model, "--prompts_file", str(path), *COMMON, "--shard_size", "2",
          "--compilation_cache", cache]
  procs = _two_processes(args, str(tmp_path / "out"))
  errs = [p.communicate(timeout=120)[1] for p in procs]
  assert [p.returncode for p in procs] == [2, 2], errs[0][-2000:] + errs[1][-2000:]
  error = (f'{path} line 10: "seed" must be a non-negative integer' if bad == "line" else
           f"image 9 ('a dog'): cannot read image {tmp_path}/missing.png: [Errno 2] No such "
           f"file or directory: '{tmp_path}/missing.png'")
  assert _error_lines(errs[0]) == [f"error: {error}"]
  assert _error_lines(errs[1]) == [f"error: process 0 stopped the run: {error}"]


def _tar_pixels(folder):
  """{png file the key would have: pixels} of every sample in the folder's WebDataset shards."""
  import webdataset as wds

  shards = sorted(os.path.join(folder, "shards", f) for f in os.listdir(os.path.join(folder,
                                                                                    "shards")))
  got = {}
  for sample in wds.WebDataset(shards, shardshuffle=False, empty_check=False):
    record = json.loads(sample["json"])
    assert record["key"] == sample["__key__"] and record["index"] == int(sample["__key__"])
    assert sample["txt"].decode() == record["prompt"]  # img2dataset's caption
    key = f"00000/{sample['__key__']}.png"
    assert key not in got  # every image in exactly one shard
    got[key] = np.asarray(Image.open(io.BytesIO(sample["png"])))
  return got


def _wait_for(predicate, proc, seconds=240):
  deadline = time.time() + seconds
  while time.time() < deadline and proc.poll() is None and not predicate():
    time.sleep(0.05)


@pytest.mark.parametrize(("output_format", "signum"), [("png", signal.SIGINT),
                                                        ("webdataset", signal.SIGTERM)])
def test_interrupt_then_resume(output_format, signum, model, cache, tmp_path_factory):
  """Ctrl-C (or SIGTERM: an eviction) mid-run, rerun: every image exactly once, the pixels of
  an uninterrupted run."""
  prompts = [f"a photo of a cat {i}" for i in range(10)]
  ref_out = str(tmp_path_factory.getbasetemp() / "resume_ref")
  out = str(tmp_path_factory.mktemp(output_format) / "out")
  args = ["--model", model, *_prompt_args(prompts), *COMMON, "--batch_size", "1",
          "--compilation_cache", cache, "--shard_size", "3"]
  if not os.path.exists(os.path.join(ref_out, "manifest.jsonl")):
    main_py([*args, "--output_dir", ref_out])
  args += ["--output_format", output_format]
  proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "main.py"), *args, "--output_dir",
                           out], cwd=ROOT, env=_env(1), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  manifests = os.path.join(out, "manifests")
  _wait_for(lambda: os.path.isdir(manifests) and os.listdir(manifests), proc)
  proc.send_signal(signum)
  _, err = proc.communicate(timeout=240)
  assert proc.returncode == 128 + signum, err[-3000:]
  assert "Traceback" not in err and f"interrupted ({signal.Signals(signum).name})" in err
  finished = sorted(f for f in os.listdir(manifests) if f.endswith(".jsonl")
                    and ".part" not in f)
  assert 1 <= len(finished) < 4 and not os.path.exists(os.path.join(out, "manifest.jsonl"))
  assert not [f for _, _, files in os.walk(out) for f in files if ".tmp" in f]
  if output_format == "webdataset":  # only finished shards are published
    assert len(os.listdir(os.path.join(out, "shards"))) == len(finished)

  main_py([*args, "--output_dir", out])
  assert [r["index"] for r in _manifest(out)] == list(range(10))  # in order, each once
  ref = _pixels(ref_out)
  got = _tar_pixels(out) if output_format == "webdataset" else _pixels(out)
  assert sorted(got) == sorted(ref)
  for name in ref:
    np.testing.assert_array_equal(got[name], ref[name])
  again = main_py([*args, "--output_dir", out])
  assert "0 images" in again.stderr and "10 already done" in again.stderr


def test_other_settings_refused_unless_overwrite(reference_run, model, cache, tmp_path):
  import shutil

  out = str(tmp_path / "out")
  shutil.copytree(reference_run, out)
  args = ["--model", model, *_prompt_args(), *COMMON, "--batch_size", "2", "--seed", "100",
          "--output_dir", out, "--compilation_cache", cache]
  proc = main_py([*args[:-6], "--steps", "3", *args[-6:]], check=False)
  assert proc.returncode == 2 and "--overwrite" in proc.stderr and "steps" in proc.stderr
  main_py([*args, "--steps", "3", "--overwrite"])
  assert all(r["steps"] == 3 for r in _manifest(out)) and len(_manifest(out)) == 5


BAD_INPUT = [
    (["--steps", "0"], "--steps must be at least 1"),
    (["--subseed_strength", "0.5"], "--subseed_strength moves each image's noise towards its "),
    (["--hires_schedule_type", "Fancy"], "--hires_schedule_type: unknown schedule type 'Fancy'"),
    (["--hires_refiner", "third"], "--hires_refiner: unknown hires refiner pass 'third'; use one "
                                   "of first pass, second pass, both passes"),
    (["--hires_refiner", "Both"], "--hires_refiner 'both passes' says which pass of the hires fix "
                                  "--refiner finishes: give --refiner and --hires_scale"),
    (["--wildcards_dir", "."], "--wildcards_dir and --max_generations are options of"),
    (["--dynamic_prompts", "random", "--wildcards_dir", "nowhere"], "nowhere is not a folder"),
    (["--dynamic_prompts", "combinatorial", "--prompt", "50% off"],
     "--prompt: cannot read the dynamic prompt '50% off'"),
    (["--steps", "1001"], "steps (1001) cannot exceed the model's 1000 training timesteps"),
    (["--controlnet_config", "cn"], "--control_image, --controlnet_config, "),
    (["--control_mode", "prompt"], "--control_mode are for a ControlNet: give --controlnet"),
    (["--controlnet", "cn", "--control_guidance_end", "0"], "0 <= start < end <= 1, got 0.0 "),
    (["--controlnet", "a", "--controlnet", "b", *["--controlnet_scale", "1"] * 3],
     "--controlnet_scale: give one, or one per --controlnet (2), got 3"),
    (["--ip_adapter_image", "x.png"], "are for an IP-Adapter: give --ip_adapter too"),
    (["--ip_adapter", "a", "--ip_adapter", "b", "--ip_adapter_mask", "m.png"],
     "--ip_adapter_mask: give one per --ip_adapter (2), got 1"),
    (["--ip_adapter", "a", *["--ip_adapter_scale", "1"] * 2],
     "--ip_adapter_scale: give one, or one per --ip_adapter (1), got 2"),
    (["--ip_adapter", "/nonexistent/ip.bin"], "--ip_adapter: cannot load IP-Adapter "),
    (["--ip_adapter", "a", "--ip_adapter_scale", "{up"], "--ip_adapter_scale: a number, or "),
    (["--scheduler_options", "{spacing: 1}"], "--scheduler_options is not JSON"),
    (["--scheduler_options", "[1]"], "--scheduler_options must be a JSON object"),
    (["--scheduler", "euler", "--scheduler_options", '{"spacing": "trailing"}'],
     "--scheduler_options: scheduler 'euler' has no option 'spacing'; its options: "),
    (["--scheduler", "euler", "--scheduler_options", '{"use_karras_sigmas": "no"}'],
     "--scheduler_options: scheduler 'euler': option use_karras_sigmas is true or false, got "),
    (["--scheduler", "kdpm2", "--scheduler_options", '{"k_diffusion": 1}'],
     "scheduler 'kdpm2': option k_diffusion is true or false, got 1"),
    (["--guidance_scale", "nan"], "--guidance_scale must be finite, got nan"),
    (["--aesthetic_score", "inf"], "--aesthetic_score must be finite, got inf"),
    (["--controlnet", "cn", "--controlnet_scale", "nan"], "--controlnet_scale must be finite"),
    (["--scheduler", "euler", "--scheduler_options", '{"timestep_spacing": "middle"}'],
     "--scheduler_options: scheduler 'euler': option timestep_spacing='middle' is not "),
    (["--scheduler", "euler", "--sigmas", "14,3,1,0", "--steps", "5"],
     "--sigmas: 4 sigmas make 3 steps, not 5"),
    (["--sigmas", "1,x"], "--sigmas must be numbers separated by commas, got 1,x"),
    (["--schedule_type", "fast"], "--schedule_type: unknown schedule type 'fast'; pick one of "),
    (["--scheduler", "ddim", "--schedule_type", "SGM Uniform"],
     "--schedule_type: scheduler 'ddim' places its own noise levels: schedule_type is an "),
    (["--scheduler", "ddim", "--schedule_type", "Karras"],
     "--schedule_type: scheduler 'ddim' places its own noise levels: schedule_type is an "),
    (["--sigmas", "1,0", "--scheduler_options", '{"sigmas": [1, 0]}'],
     "--scheduler_options sets sigmas, which --schedule_type, --sigmas or --timesteps sets "),
    (["--scheduler", "heun", "--timesteps", "999,500,500"],
     "--timesteps: scheduler 'heun': timesteps must decrease strictly and lie in [0, 999]"),
    (["--height", "12"], "--height must be a multiple of 8"),
    (["--width", "100000"], "--width must be a multiple of 8"),
    (["--scheduler", "magic"], "--scheduler 'magic' must be one of ddim, pndm, "),
    (["--hires_scheduler", "DPM++ 9M"], "--hires_scheduler 'DPM++ 9M' must be one of ddim, "),
    (["--scheduler", "euler", "--eta", "0.5"], "eta is an option of ddim, tcd, ddim_cfg_pp only"),
    (["--scheduler", "ddim", "--eta=-1"], "--eta must be >= 0"),
    (["--prompts_file", "/nonexistent/prompts.txt"], "prompts file /nonexistent/prompts.txt does"),
    (["--model", "/nonexistent/model"], "does not exist"),
    (["--lora", "/nonexistent/style.safetensors:0.5"], "LoRA file '/nonexistent/style.safetensors"),
    (["--embedding", "/nonexistent/neg.pt:neg"], "embedding file '/nonexistent/neg.pt' does"),
    (["--embeddings_dir", "/nonexistent"], "--embeddings_dir /nonexistent is not a folder"),
    (["--lora_dir", "/", "--prompt_syntax", "plain"], "--lora_dir applies <lora:...> tags"),
    (["--strength", "0"], "--strength must be in (0, 1], got 0.0"),
    (["--hires_negative_prompt", "blurry"], "--hires_prompt and --hires_negative_prompt are"),
    (["--hires_model", "/nonexistent"], "--hires_model is the hires pass's model: give"),
    (["--hires_scale", "2", "--hires_upscaler", "R-ESRGAN 4x+"],
     "--hires_upscaler 'R-ESRGAN 4x+' is neither one of sdjax's (latent, "),
    (["--hires_scale", "2", "--hires_upscaler", "README.md"],
     "README.md: expected one of .pth, .pt, .safetensors"),
    (["--hires_scale", "2", "--hires_model", "/nonexistent"],
     "--hires_model /nonexistent: model folder '/nonexistent' does not exist"),
    (["--mask_blur", "-2"], "--mask_blur and --inpaint_full_res_padding must be >= 0"),
    (["--emphasis", "no norm", "--prompt_syntax", "plain"],
     "--emphasis is a mode of --prompt_syntax a1111"),
    (["--cpu_devices=-1"], "--cpu_devices must be 0 (one per core) or more, got -1"),
    (["--cfg_parallel", "--guidance_scale", "1"], "--cfg_parallel splits classifier-free"),
    (["--prompt", "a (cat:1.2.3)"], "bad attention weight '1.2.3'"),
    (["--prompt", "<lora:style:0.5> a cat"], "<lora:...> tags, which only main.py applies"),
    (["--prompt", "<lora:style:0.5> a cat", "--lora_dir", "/"], "<lora:style>: no style{"),
    # Overflows: which image, what settings. (At 1e38 the tiny model's latents can stay
    # finite, their decode grey: its GroupNorms divide by an infinite variance.)
    (["--guidance_scale", "3e38", "--steps", "2"],
     "image 0 ('a cat'): NaN or inf pixels, the sampler diverged (2 "),
    (["--parameters_file", "no/such.png"], "--parameters_file: cannot read no/such.png"),
    (["--safety_checker", "/nonexistent/checker"],
     "--safety_checker: cannot load safety checker /nonexistent/checker: model folder "),
    (["--nsfw_action", "keep"], "--nsfw_action is for a run with --safety_checker"),
    (["--image_guidance_scale", "1.5"], "--image_guidance_scale is an instruct-pix2pix model's"),
    (["--mask_image", "m.png"], "--mask_image marks what to repaint in --init_image: give both"),
    (["--parameters_file", "pyproject.toml"], "--parameters_file pyproject.toml: no A1111 "
                                              "parameters line"),
    # Last: its own process (a process sets its CPU devices once, before JAX starts).
    (["--cfg_parallel", "--cpu_devices", "3"], "--cfg_parallel: CFG parallelism pairs devices"),
]
# main.main on each bad command line in turn, in one process: flags parsed afresh per line.
_MAIN_LOOP = """
import contextlib, io, json, sys
import main
from absl import flags
results = []
for args in json.loads(sys.argv[1]):
  flags.FLAGS.unparse_flags()
  argv = flags.FLAGS(["main.py", *args])
  err, code = io.StringIO(), 0
  with contextlib.redirect_stderr(err):
    try:
      main.main(argv)
    except SystemExit as e:
      code = e.code
  results.append([code, err.getvalue()])
print(json.dumps(results))
"""


def _in_one_process(command_lines):
  """(exit code, stderr) of main.main on each command line, all in one process (a process each
  spent most of its time starting Python and JAX)."""
  proc = subprocess.run([sys.executable, "-c", _MAIN_LOOP, json.dumps(command_lines)], cwd=ROOT,
                        env=_env(), capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return [tuple(r) for r in json.loads(proc.stdout.splitlines()[-1])]


@pytest.fixture(scope="module")
def bad_input_runs(model, tmp_path_factory):
  """(exit code, stderr) of main.main on each of BAD_INPUT's command lines but the last in one
  process (each into a folder of its own), and of the last command line as its own main.py:
  the process's exit status and output end to end."""
  out, args = str(tmp_path_factory.mktemp("bad")), ["--model", model, "--prompt", "a cat"]
  runs = _in_one_process([[*args, "--output_dir", f"{out}/{i}", *extra]
                          for i, (extra, _) in enumerate(BAD_INPUT[:-1])])
  alone = main_py([*args, "--output_dir", f"{out}/last", *BAD_INPUT[-1][0]], check=False)
  return [*runs, (alone.returncode, alone.stderr)]


def _error_lines(stderr):
  return [line for line in stderr.splitlines() if line.startswith("error:")]


@pytest.mark.parametrize("case", range(len(BAD_INPUT)))
def test_bad_input_one_line(case, bad_input_runs):
  code, stderr = bad_input_runs[case]
  assert code == 2
  assert BAD_INPUT[case][1] in stderr and "Traceback" not in stderr
  assert len(_error_lines(stderr)) == 1


def test_bad_prompt_files(model, tmp_path):
  empty = tmp_path / "empty.txt"
  empty.write_text("\n  \n")
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"prompt": "a cat"}\n{"prompt": "a dog", "seed": "x"}\n')
  broken = tmp_path / "broken.jsonl"
  broken.write_text('{"prompt": "a cat"}\n\n{"prompt": \n')
  unreadable = tmp_path / "binary.txt"
  unreadable.write_bytes(b"\xff\xfe\x00bad")
  cases = [(empty, "holds no prompts"), (bad, "bad.jsonl line 2"),
           (broken, "broken.jsonl line 3: not valid JSON"),
           (unreadable, "cannot read prompts file")]
  # Lines are parsed when reached (the file is streamed): bad.jsonl and broken.jsonl fail after
  # their first line's image.
  runs = _in_one_process([["--model", model, "--prompts_file", str(path), "--output_dir",
                           str(tmp_path / f"out-{path.name}"), *COMMON] for path, _ in cases])
  for (code, stderr), (_, message) in zip(runs, cases, strict=True):
    assert code == 2 and message in stderr, stderr
    assert "Traceback" not in stderr and len(_error_lines(stderr)) == 1
  # The image the first line made before line 2 or 3 failed is kept.
  for name in ("bad.jsonl", "broken.jsonl"):
    assert os.listdir(tmp_path / f"out-{name}" / "00000") == ["000000.png"]


def test_output_dir_is_a_file(model, tmp_path):
  target = tmp_path / "file"
  target.write_text("x")
  proc = main_py(["--model", model, "--prompt", "a cat", "--output_dir", str(target)],
                 check=False)
  assert proc.returncode == 2 and "Traceback" not in proc.stderr and str(target) in proc.stderr


def test_jsonl_prompts_and_seeds(model, cache, tmp_path):
  prompts = tmp_path / "p.jsonl"
  prompts.write_text('{"prompt": "a cat", "seed": 7, "num_images": 2}\n'
                     '{"prompt": "a dog", "negative_prompt": "red"}\n')
  out = str(tmp_path / "out")
  main_py(["--model", model, "--prompts_file", str(prompts), *COMMON, "--seed", "50",
           "--output_dir", out, "--compilation_cache", cache, "--image_format", "jpg",
           "--image_quality", "95"])
  records = _manifest(out)
  assert [(r["prompt"], r["seed"], r["negative_prompt"]) for r in records] == [
      ("a cat", 7, ""), ("a cat", 8, ""), ("a dog", 52, "red")]
  assert records[2]["file"] == "00000/000002.jpg"
  with open(os.path.join(out, records[2]["file"]), "rb") as f:
    text = outputs.read_parameters(f.read())  # --image_format jpg: the text in EXIF
  assert outputs.parse_a1111_parameters(text)["negative_prompt"] == "red"
  assert json.load(open(os.path.join(out, "run.json")))["image_quality"] == 95


def test_ddim_eta(model, cache, tmp_path):
  """--eta: recorded in the PNG parameters and the manifest; the pixels are generate()'s."""
  out = str(tmp_path / "out")
  main_py(["--model", model, "--prompt", "a cat", "--prompt", "a dog", "--steps", "2",
           "--height", "16", "--width", "16", "--guidance_scale", "3", "--scheduler", "ddim",
           "--eta", "0.5", "--seed", "5", "--batch_size", "2", "--output_dir", out,
           "--compilation_cache", cache])
  assert [r["eta"] for r in _manifest(out)] == [0.5, 0.5]
  text = Image.open(os.path.join(out, "00000", "000001.png")).text["parameters"]
  assert outputs.parse_a1111_parameters(text)["Eta DDIM"] == "0.5"  # A1111's key
  want = sdjax.load_pipeline(model).generate(["a cat", "a dog"], steps=2, height=16, width=16,
                                             guidance_scale=3.0, scheduler="ddim", eta=0.5, seed=5)
  got = np.stack(list(_pixels(out).values())).astype(np.float32) / 255
  assert np.abs(got - want).max() <= 1 / 255 + 1e-6


def test_torch_rng_run_on_two_devices_matches_diffusers(model, cache, tmp_path):
  """--rng torch_cpu: each image is diffusers' for a CPU generator of its seed, on 2 devices with
  a padded last batch; the PNG parameters say "RNG: CPU" as A1111's do, the manifest the rng."""
  import diffusers  # noqa: PLC0415
  import torch  # noqa: PLC0415

  torch.set_num_threads(1)
  out, prompts = str(tmp_path / "out"), PROMPTS[:3]
  main_py(["--model", model, *_prompt_args(prompts), *COMMON, "--seed", "60", "--rng",
           "torch_cpu", "--cpu_devices", "2", "--output_dir", out, "--compilation_cache", cache])
  records = _manifest(out)
  assert [r["rng"] for r in records] == ["torch_cpu"] * 3
  text = Image.open(os.path.join(out, records[2]["file"])).text["parameters"]
  assert outputs.parse_a1111_parameters(text)["RNG"] == "CPU"
  ref = diffusers.StableDiffusionPipeline.from_pretrained(model, safety_checker=None)
  ref.scheduler = diffusers.EulerAncestralDiscreteScheduler.from_config(ref.scheduler.config)
  ref.set_progress_bar_config(disable=True)
  want = ref(prompts, num_inference_steps=2, height=16, width=16, guidance_scale=3.0,
             generator=[torch.Generator().manual_seed(60 + k) for k in range(3)],
             output_type="np").images
  got = np.stack([_pixels(out)[r["file"]] for r in records]).astype(np.float32) / 255
  assert np.abs(got - want).max() <= 1 / 255 + 1e-6


def test_variation_seed_flags(model, cache, tmp_path):
  """--subseed / --subseed_strength: image k varied towards subseed + k, --ensd (A1111's Eta
  noise seed delta) and --seed_resize_from_w/_h, as generate() does; the PNG parameters say
  "Variation seed", its strength, "ENSD" and "Seed resize from" as A1111's, the manifest too."""
  out = str(tmp_path / "out")
  main_py(["--model", model, "--prompt", "a cat", "--prompt", "a dog", *COMMON, "--seed", "5",
           "--subseed", "77", "--subseed_strength", "0.25", "--ensd", "31337",
           "--seed_resize_from_w", "24", "--seed_resize_from_h", "8", "--batch_size", "2",
           "--output_dir", out, "--compilation_cache", cache])
  records = _manifest(out)
  assert [(r["subseed"], r["subseed_strength"]) for r in records] == [(77, 0.25), (78, 0.25)]
  params = outputs.parse_a1111_parameters(
    Image.open(os.path.join(out, records[1]["file"])).text["parameters"])
  assert params["Variation seed"] == "78" and params["Variation seed strength"] == "0.25"
  assert params["ENSD"] == "31337" and records[0]["ensd"] == 31337
  assert params["Seed resize from"] == "24x8" and records[0]["seed_resize_from"] == [24, 8]
  want = sdjax.load_pipeline(model).generate(["a cat", "a dog"], steps=2, height=16, width=16,
                                             guidance_scale=3.0, scheduler="euler_ancestral",
                                             seed=5, subseed=77, subseed_strength=0.25,
                                             ensd=31337, seed_resize_from=(24, 8))
  got = np.stack([_pixels(out)[r["file"]] for r in records]).astype(np.float32) / 255
  assert np.abs(got - want).max() <= 1 / 255 + 1e-6


def test_parameters_file_makes_the_image_again(model, cache, tmp_path):
  """--parameters_file: an image's A1111 parameters make its pixels and parameters again with
  no flag but the model (the built-in one needs none); flags given win over the file's, and
  what the file asks for that sdjax cannot give is a warning."""
  first, again, other = (str(tmp_path / name) for name in ("first", "again", "other"))
  main_py(["--model", model, "--prompt", "a (cat:1.2)", "--negative_prompt", "a dog", "--steps",
           "3", "--height", "16", "--width", "24", "--guidance_scale", "3.5", "--scheduler",
           "DPM++ 2M SDE", "--schedule_type", "Karras", "--seed", "11", "--rng", "torch_cpu",
           "--ensd", "31337", "--subseed", "4", "--subseed_strength", "0.2", "--clip_skip", "2",
           "--guidance_rescale", "0.5", "--tiling", "--freeu", "0.9,0.2,1.5,1.6",
           "--hires_scale", "1.5", "--hires_steps", "1", "--hires_upscaler", "latent-nearest",
           "--output_dir", first, "--compilation_cache", cache])
  image = os.path.join(first, "00000", "000000.png")
  proc = main_py(["--model", model, "--parameters_file", image, "--output_dir", again,
                  "--compilation_cache", cache])
  assert "warning" not in proc.stderr.lower()
  (name, want), = _pixels(first).items()
  np.testing.assert_array_equal(_pixels(again)[name], want)
  text = Image.open(image).text["parameters"]
  assert Image.open(os.path.join(again, name)).text["parameters"] == text

  # A text file, as an A1111 image's: the flags given win (no warning for the sampler they
  # replace); a field of an extension is one warning line.
  params = tmp_path / "params.txt"
  params.write_text(text.replace("DPM++ 2M SDE", "Euler SMEA Dy") + ", ADetailer model: face.pt")
  proc = main_py(["--model", model, "--parameters_file", str(params), "--scheduler",
                  "DPM++ 2M SDE", "--seed", "12", "--output_dir", other, "--compilation_cache",
                  cache])
  assert [line for line in proc.stderr.splitlines() if "warning" in line.lower()] == [
      f"warning: {params}: not reproduced: ADetailer model: face.pt"]
  record, = _manifest(other)
  assert (record["seed"], record["steps"], record["prompt"]) == (12, 3, "a (cat:1.2)")
  assert record["scheduler"] == "dpmpp_2m_sde" and record["negative_prompt"] == "a dog"
  assert not np.array_equal(_pixels(other)[name], want)
  # A refiner named only by its file: a warning, and its Hires refiner pass is dropped with it
  # (not an error for a --hires_refiner without --refiner).
  params.write_text(text + ", Refiner: sd_xl_refiner_1.0 [7440042bbd], Refiner switch at: 0.8, "
                           "Hires refiner: first pass")
  # So are the settings of ControlNet units without --controlnet (no error for a
  # --control_mode without one): the note names the model.
  units = tmp_path / "units.txt"
  units.write_text(text + ', ControlNet 0: "Module: none, Model: canny [0123456789], Weight: '
                          '0.5, Control Mode: ControlNet is more important", ControlNet 1: '
                          '"Module: ip-adapter_clip_h, Model: ip-adapter_sd15, Weight: 0.6"')
  (code, err), (code_units, err_units) = _in_one_process([
      ["--model", model, "--parameters_file", str(params), "--output_dir",
       str(tmp_path / "refined"), "--compilation_cache", cache],
      ["--model", model, "--parameters_file", str(units), "--output_dir",
       str(tmp_path / "units"), "--compilation_cache", cache]])
  assert code == 0 and "Refiner: sd_xl_refiner_1.0 [7440042bbd]: give it with --refiner" in err
  assert code_units == 0, err_units
  assert "made with the ControlNet(s) canny [0123456789]: give each with --controlnet" in err_units
  assert "made with the IP-Adapter(s) ip-adapter_sd15 (ip-adapter_clip_h)" in err_units
  np.testing.assert_array_equal(_pixels(str(tmp_path / "units"))[name], want)


def test_model_hires_upscaler(model, cache, tmp_path):
  """--hires_upscaler with an ESRGAN file found in --upscaler_dir by A1111's name: the pixels of
  generate() with that upscaler and tiling, A1111's name in the PNG; --parameters_file finds it
  again with --upscaler_dir (the same pixels), and without warns and uses Latent."""
  import esrgan_reference  # noqa: PLC0415
  import torch  # noqa: PLC0415

  folder = tmp_path / "upscalers" / "RealESRGAN"
  folder.mkdir(parents=True)
  net = esrgan_reference.random_rrdbnet(seed=2, blocks=1, feat=8, grow=8)
  torch.save({"params_ema": net.state_dict()}, str(folder / "RealESRGAN_x4plus.pth"))
  outs = [str(tmp_path / name) for name in "abc"]
  image = os.path.join(outs[0], "00000", "000000.png")
  common = ["--model", model, "--compilation_cache", cache]
  hires = ["--hires_scale", "1.5", "--hires_steps", "1", "--hires_strength", "0.5"]
  runs = _in_one_process([
      [*common, "--prompt", "a cat", *COMMON, *hires, "--hires_upscaler", "R-ESRGAN 4x+",
       "--upscaler_dir", str(tmp_path / "upscalers"), "--upscaler_tile", "8",
       "--upscaler_tile_overlap", "2", "--output_dir", outs[0]],
      [*common, "--parameters_file", image, "--upscaler_dir", str(tmp_path / "upscalers"),
       "--upscaler_tile", "8", "--upscaler_tile_overlap", "2", "--output_dir", outs[1]],
      [*common, "--parameters_file", image, "--output_dir", outs[2]],
      # A1111's name of the upscaler run 3 falls back to (its program: compiled already)
      [*common, "--parameters_file", image, "--hires_upscaler", "Latent", "--output_dir",
       str(tmp_path / "d")]])
  assert [code for code, _ in runs] == [0, 0, 0, 0], runs
  params = outputs.parse_a1111_parameters(Image.open(image).text["parameters"])
  assert params["Hires upscaler"] == "R-ESRGAN 4x+"
  hires_record = json.load(open(os.path.join(outs[0], "run.json")))["hires"]
  assert (hires_record["upscaler_name"], hires_record["upscaler_tile"]) == ("R-ESRGAN 4x+", 8)
  upscaler = sdjax.load_upscaler(str(folder / "RealESRGAN_x4plus.pth"), tile=8, overlap=2)
  want = sdjax.load_pipeline(model).generate(
      ["a cat"], steps=2, height=16, width=16, guidance_scale=3.0, scheduler="euler_ancestral",
      seed=0, hires_scale=1.5, hires_steps=1, hires_strength=0.5, hires_upscaler=upscaler)
  (name, got), = _pixels(outs[0]).items()
  assert np.abs(got.astype(np.float32) / 255 - want[0]).max() <= 1 / 255 + 1e-6
  assert "warning" not in runs[1][1]
  np.testing.assert_array_equal(_pixels(outs[1])[name], got)
  assert "Hires upscaler: R-ESRGAN 4x+ is an upscaler model, not found" in runs[2][1]
  assert Image.open(os.path.join(outs[2], name)).text["parameters"].count(
      "Hires upscaler: Latent") == 1
  latent = _pixels(outs[2])[name].astype(np.int32)
  assert np.abs(latent - got).max() > 10  # the model made a difference
  assert "warning" not in runs[3][1]  # the flag settles the file's upscaler
  np.testing.assert_array_equal(_pixels(str(tmp_path / "d"))[name], latent)


def test_vae_recorded_and_read_back(model, cache, tmp_path):
  """--vae: PNGs say A1111's `VAE hash` and `VAE` (the file's or folder's name, no path);
  --parameters_file on such an image asks for --vae, and with it makes the same pixels."""
  vae, outs = os.path.join(model, "vae"), [str(tmp_path / name) for name in "abc"]
  image = os.path.join(outs[0], "00000", "000000.png")
  common = ["--model", model, "--compilation_cache", cache]
  runs = _in_one_process([
      [*common, "--vae", vae, "--prompt", "a cat", *COMMON, "--output_dir", outs[0]],
      [*common, "--parameters_file", image, "--output_dir", outs[1]],
      [*common, "--parameters_file", f"file://{image}", "--vae", vae, "--output_dir",
       outs[2]]])  # a URL: read through fsspec
  assert [code for code, _ in runs] == [0, 0, 0], runs
  params = outputs.parse_a1111_parameters(Image.open(image).text["parameters"])
  assert params["VAE"] == "vae" and params["VAE hash"] == outputs.short_hash(
      os.path.join(vae, "diffusion_pytorch_model.safetensors"))
  assert f"warning: {image}: made with the VAE vae: give it with --vae" in runs[1][1]
  assert "warning" not in runs[2][1]
  (name, want), = _pixels(outs[0]).items()
  np.testing.assert_array_equal(_pixels(outs[2])[name], want)


def test_prompts_file_lines_from_images(reference_run, model, cache, tmp_path):
  """jsonl lines of `{"parameters": image}`: each image of a run made again from its PNG alone
  (prompt, seed, steps, sampler, size and CFG scale from the file)."""
  records = _manifest(reference_run)
  prompts = tmp_path / "again.jsonl"
  prompts.write_text("".join(json.dumps({"parameters": os.path.join(reference_run, r["file"])})
                             + "\n" for r in records))
  out = str(tmp_path / "out")
  main_py(["--model", model, "--prompts_file", str(prompts), "--batch_size", "2",
           "--output_dir", out, "--compilation_cache", cache])
  want, got = _pixels(reference_run), _pixels(out)
  for ref, record in zip(records, _manifest(out), strict=True):
    keys = ("prompt", "seed", "steps", "scheduler", "height", "width", "guidance_scale")
    assert [record[k] for k in keys] == [ref[k] for k in keys]
    np.testing.assert_array_equal(got[record["file"]], want[ref["file"]])


def test_a1111_image_by_flag_and_by_line(model, cache, tmp_path):
  """An A1111 image's parameters make the same pixels by --parameters_file and by a jsonl line:
  the line carries what the flags would set beside its fields, A1111's placement of the noise
  levels and its DPM2's form (scheduler options); its run-wide settings (torch's CPU noise,
  A1111's truncated 8-bit levels) are the run's flags."""
  params = tmp_path / "a1111.txt"
  params.write_text("a (cat:1.2)\nNegative prompt: a dog\nSteps: 3, Sampler: DPM2 a, "
                    "Schedule type: Automatic, CFG scale: 3.5, Seed: 11, Size: 24x16, RNG: CPU, "
                    "Eta: 0.5, Sigma noise: 0.8, Clip skip: 2, Version: v1.10.1")
  prompts = tmp_path / "p.jsonl"
  prompts.write_text(json.dumps({"parameters": str(params)}) + "\n")
  by_flag, by_line = str(tmp_path / "flag"), str(tmp_path / "line")
  main_py(["--model", model, "--parameters_file", str(params), "--output_dir", by_flag,
           "--compilation_cache", cache])
  main_py(["--model", model, "--prompts_file", str(prompts), "--rng", "torch_cpu",
           "--pixel_levels", "floor", "--output_dir", by_line, "--compilation_cache", cache])
  (flag, line) = (_manifest(out)[0] for out in (by_flag, by_line))
  assert flag["scheduler"] == line["scheduler"] == "kdpm2_ancestral"
  assert flag["scheduler_options"] == line["scheduler_options"]
  assert flag["scheduler_options"]["k_diffusion"] is True
  assert flag["scheduler_options"]["eta"] == 0.5  # A1111's Eta of its ancestral samplers
  assert flag["scheduler_options"]["s_noise"] == 0.8  # and its Sigma noise
  assert flag["clip_skip"] == line["clip_skip"] == 2
  (name, want), = _pixels(by_flag).items()
  np.testing.assert_array_equal(_pixels(by_line)[line["file"]], want)
  written = outputs.parse_a1111_parameters(
      Image.open(os.path.join(by_flag, name)).text["parameters"])
  assert written["Eta"] == "0.5" and written["Schedule type"] == "Karras"
  assert written["Sigma noise"] == "0.8"
  assert written["Clip skip"] == "2"
  # A line's Clip skip the model lacks: one line when the run reaches it.
  prompts.write_text(json.dumps({"prompt": "a cat", "clip_skip": 9}) + "\n")
  proc = main_py(["--model", model, "--prompts_file", str(prompts), "--output_dir",
                  str(tmp_path / "bad"), "--compilation_cache", cache], check=False)
  assert proc.returncode == 2 and _error_lines(proc.stderr) == [
      "error: a prompt line's \"clip_skip\" must be an integer from 1 (the last layer) to 3, got 9"]


def test_a1111_gpu_noise_is_nvs(model, cache, tmp_path):
  """An A1111 image without an RNG field was made with its GPU source: --parameters_file draws
  A1111's NV noise (an NVIDIA GPU's) and says so once; the PNG says RNG: NV."""
  params = tmp_path / "a1111.txt"
  params.write_text("a cat\nSteps: 2, Sampler: Euler a, CFG scale: 3, Seed: 5, Size: 16x16, "
                    "Version: v1.10.1")
  out = str(tmp_path / "out")
  proc = main_py(["--model", model, "--parameters_file", str(params), "--output_dir", out,
                  "--compilation_cache", cache])
  assert [line for line in proc.stderr.splitlines() if "warning" in line.lower()] == [
      f"warning: {params}: RNG: GPU (A1111 writes none for it): sdjax draws A1111's NV noise, "
      "which is an NVIDIA GPU's (to a few float32 ulps); an AMD, Intel or Apple GPU's noise "
      "differs"]
  record, = _manifest(out)
  assert record["rng"] == "nv"
  written = outputs.parse_a1111_parameters(
      Image.open(os.path.join(out, record["file"])).text["parameters"])
  assert written["RNG"] == "NV"


def test_an_older_a1111_image(model, cache, tmp_path):
  """An image of an A1111 before 1.6.0: its Version says how it scheduled prompt editing and
  held the model's alphas_cumprod (float16, for an SD1/SD2 model: the built-in's is SD1), and
  the run says both again in its manifest and PNG."""
  params = tmp_path / "a1111.txt"
  params.write_text("a [cat:dog:1.0]\nSteps: 2, Sampler: Euler a, CFG scale: 3, Seed: 5, "
                    "Size: 16x16, RNG: CPU, Version: v1.5.2")
  out = str(tmp_path / "out")
  main_py(["--model", model, "--parameters_file", str(params), "--output_dir", out,
           "--compilation_cache", cache])
  record, = _manifest(out)
  assert record["scheduler_options"]["downcast_alphas_cumprod"] == "sd1_sd2"
  assert record["old_prompt_editing_timelines"] is True
  written = outputs.parse_a1111_parameters(
      Image.open(os.path.join(out, record["file"])).text["parameters"])
  assert written["Old prompt editing timelines"] == "True"
  assert "downcast_alphas_cumprod=sd1_sd2" in written["Scheduler options"]
  assert written["Downcast alphas_cumprod"] == "True"  # A1111's word: it was, for this model
  want = sdjax.load_pipeline(model).generate(
      ["a [cat:dog:1]"], steps=2, scheduler="euler_ancestral", guidance_scale=3.0, seed=5,
      height=16, width=16, rng="torch_cpu", prompt_syntax="a1111",
      scheduler_options={"timestep_spacing": "linspace", "k_diffusion": True,
                         "schedule_type": "uniform", "downcast_alphas_cumprod": True})
  got = np.stack(list(_pixels(out).values())).astype(np.float32) / 255
  assert np.abs(got - want).max() <= 1 / 255 + 1e-6


def test_sigmas_flag(model, cache, tmp_path):
  """--sigmas: the steps follow the list; the PNG parameters and the manifest say it; the
  pixels are generate()'s. --scheduler takes A1111's sampler names too."""
  out = str(tmp_path / "out")
  sigmas = [14.6, 2.5, 0.4, 0.0]
  main_py(["--model", model, "--prompt", "a cat", "--height", "16", "--width", "16",
           "--guidance_scale", "3", "--scheduler", "DPM++ 2M", "--sigmas",
           ",".join(map(str, sigmas)), "--output_dir", out, "--compilation_cache", cache])
  assert [(r["scheduler"], r["scheduler_options"]) for r in _manifest(out)] == [
    ("dpmpp_2m", {"sigmas": sigmas})]
  params = outputs.parse_a1111_parameters(
    Image.open(os.path.join(out, "00000", "000000.png")).text["parameters"])
  assert params["Steps"] == "3" and params["Scheduler options"] == f"sigmas={sigmas}"
  assert "Schedule type" not in params  # A1111 has no word for a list
  want = sdjax.load_pipeline(model).generate(["a cat"], sigmas=sigmas, height=16, width=16,
                                             guidance_scale=3.0, scheduler="dpmpp_2m")
  got = np.stack(list(_pixels(out).values())).astype(np.float32) / 255
  assert np.abs(got - want).max() <= 1 / 255 + 1e-6


def test_lora_and_embedding_flags(reference_run, model, cache, tmp_path):
  """--lora and --embedding reach the model: the same seed gives other pixels, run.json says why."""
  from safetensors.numpy import save_file

  rng = np.random.default_rng(0)
  lora = str(tmp_path / "style.safetensors")
  save_file({"lora_unet_conv_in.lora_down.weight": rng.standard_normal((2, 4, 3, 3), np.float32),
             "lora_unet_conv_in.lora_up.weight": rng.standard_normal((32, 2, 1, 1), np.float32)},
            lora)
  emb = str(tmp_path / "my-style.safetensors")
  save_file({"emb_params": rng.standard_normal((2, 32), np.float32)}, emb)
  out = str(tmp_path / "out")
  main_py(["--model", model, "--prompt", PROMPTS[0], *COMMON, "--batch_size", "2", "--seed",
           "100", "--output_dir", out, "--compilation_cache", cache, "--lora", f"{lora}:0.5",
           "--embedding", emb, "--negative_prompt", "blurry, My-Style"])
  with open(os.path.join(out, "run.json")) as f:
    settings = json.load(f)
  assert settings["loras"] == [[lora, 0.5]] and settings["embeddings"] == [[emb, None]]
  first = {r["index"]: r["file"] for r in _manifest(reference_run)}[0]
  (name, ours), = _pixels(out).items()
  assert name == first
  assert np.abs(ours.astype(int) - _pixels(reference_run)[first]).max() > 10
  # A1111's hashes, which model sites index: the LoRA's of its tensor bytes after the header,
  # the embedding's of its file; the trigger word was used (in the negative prompt).
  params = outputs.parse_a1111_parameters(
      Image.open(os.path.join(out, first)).text["parameters"])
  data = open(lora, "rb").read()
  tensors = data[8 + int.from_bytes(data[:8], "little"):]
  assert params["Lora hashes"] == f"style: {hashlib.sha256(tensors).hexdigest()[:12]}"
  assert params["TI hashes"] == (
      f"my-style: {hashlib.sha256(open(emb, 'rb').read()).hexdigest()[:12]}")


def test_a1111_prompt_syntax(model, cache, tmp_path):
  """A1111 prompts from a file: kept as written in manifest and PNG, each image as if alone
  (the second composable: two parts, one weighted)."""
  prompts = ["a (red:1.3) circle, " * 16 + "BREAK [cat|dog]",
             "a [blue:green:1] (square:0.7) AND a cat :0.5"]
  path = tmp_path / "prompts.jsonl"
  path.write_text("".join(json.dumps({"prompt": p, "negative_prompt": "[red|blue]"}) + "\n"
                          for p in prompts))
  out = str(tmp_path / "out")
  main_py(["--model", model, "--prompts_file", str(path), *COMMON, "--batch_size", "2",
           "--seed", "7", "--output_dir", out, "--compilation_cache", cache])
  records = _manifest(out)
  assert [r["prompt"] for r in records] == prompts
  assert Image.open(os.path.join(out, records[0]["file"])).text["parameters"].startswith(
      prompts[0] + "\nNegative prompt: [red|blue]\n")
  pipe = sdjax.load_pipeline(model)
  alone = pipe.generate(prompts[1], negative_prompts="[red|blue]", steps=2, guidance_scale=3,
                        scheduler="euler_ancestral", height=16, width=16, seed=8,
                        prompt_syntax="a1111")
  written = np.asarray(Image.open(os.path.join(out, records[1]["file"])), np.float32)
  assert np.abs(alone[0] * 255 - written).max() <= 1.0
  plain = pipe.generate(prompts[1], negative_prompts="[red|blue]", steps=2, guidance_scale=3,
                        scheduler="euler_ancestral", height=16, width=16, seed=8)
  assert np.abs(plain[0] * 255 - written).max() > 1.0


def test_emphasis_flag(model, cache, tmp_path):
  """--emphasis (None: brackets read as text): the run's setting, generate()'s pixels, and
  A1111's `Emphasis` field on the images whose prompts have brackets."""
  prompts = ["a (red:1.4) circle", "a cat"]
  out = str(tmp_path / "out")
  main_py(["--model", model, *sum((["--prompt", p] for p in prompts), []), *COMMON,
           "--batch_size", "2", "--seed", "7", "--emphasis", "none", "--output_dir", out,
           "--compilation_cache", cache])
  with open(os.path.join(out, "run.json")) as f:
    assert json.load(f)["emphasis"] == "None"
  records = _manifest(out)
  pipe = sdjax.load_pipeline(model)
  kw = dict(steps=2, guidance_scale=3, scheduler="euler_ancestral", height=16, width=16,
            prompt_syntax="a1111")
  for i, record in enumerate(records):
    png = Image.open(os.path.join(out, record["file"]))
    params = outputs.parse_a1111_parameters(png.text["parameters"])
    assert params.get("Emphasis") == ("None" if i == 0 else None)
    alone = pipe.generate(record["prompt"], seed=record["seed"], emphasis="None", **kw)
    assert np.abs(alone[0] * 255 - np.asarray(png, np.float32)).max() <= 1.0
  original = pipe.generate(prompts[0], seed=records[0]["seed"], **kw)
  assert np.abs(original[0] * 255 - np.asarray(Image.open(
      os.path.join(out, records[0]["file"])), np.float32)).max() > 1.0


def test_lora_tags(reference_run, model, cache, tmp_path):
  """<lora:name:w> tags with --lora_dir: each image as with loras=[...] in-process or none."""
  from safetensors.numpy import save_file

  rng = np.random.default_rng(1)
  loras = tmp_path / "loras"
  loras.mkdir()
  save_file({"lora_unet_conv_in.lora_down.weight": rng.standard_normal((2, 4, 3, 3), np.float32),
             "lora_unet_conv_in.lora_up.weight": rng.standard_normal((32, 2, 1, 1), np.float32)},
            str(loras / "style.safetensors"))
  out = str(tmp_path / "out")
  prompts = [PROMPTS[0] + " <lora:style:0.5>", PROMPTS[1], PROMPTS[2] + "<lora:style:0.5>"]
  main_py(["--model", model, *_prompt_args(prompts), *COMMON, "--batch_size", "2", "--seed",
           "100", "--output_dir", out, "--compilation_cache", cache, "--lora_dir", str(loras)])
  got, ref = _pixels(out), _pixels(reference_run)
  np.testing.assert_array_equal(got["00000/000001.png"], ref["00000/000001.png"])  # no tag: no LoRA
  pipe = sdjax.load_pipeline(model, loras=[(str(loras / "style.safetensors"), 0.5)])
  alone = pipe.generate(PROMPTS[2], steps=2, guidance_scale=3, scheduler="euler_ancestral",
                        height=16, width=16, seed=102, prompt_syntax="a1111")
  assert np.abs(alone[0] * 255 - got["00000/000002.png"]).max() <= 1.0
  assert np.abs(got["00000/000002.png"].astype(int) - ref["00000/000002.png"]).max() > 10
  assert _manifest(out)[0]["prompt"] == prompts[0]
  hashes = [outputs.parse_a1111_parameters(Image.open(os.path.join(out, f)).text["parameters"])
            .get("Lora hashes") for f in sorted(got)]
  short = outputs.short_hash(loras / "style.safetensors", kind="lora")
  assert hashes == [f"style: {short}", None, f"style: {short}"]
  # Two processes (shards of one image: process 0 makes the two tagged images, process 1 the
  # untagged one) agree on one set per step, padding meanwhile: the same images.
  out2 = str(tmp_path / "out2")
  address = f"127.0.0.1:{_free_port()}"
  procs = [subprocess.Popen(
      [sys.executable, os.path.join(ROOT, "main.py"), "--model", model, *_prompt_args(prompts),
       *COMMON, "--batch_size", "2", "--seed", "100", "--output_dir", out2, "--shard_size", "1",
       "--compilation_cache", cache, "--lora_dir", str(loras), "--coordinator_address", address,
       "--num_processes", "2", "--process_id", str(i)], cwd=ROOT, env=_env(1),
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
  for p in procs:
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]
  two = _pixels(out2)
  assert sorted(two) == sorted(got)
  for name in got:
    np.testing.assert_array_equal(two[name], got[name])
