"""Times sdjax against diffusers on the same architecture, machine and run.

  python tools/benchmark.py --arch sd15 --what unet_step --batch 2 --height 512 --width 512
  python tools/benchmark.py --arch sd15 --what unet_step --batch 2 --token_merging_ratio 0.5
  python tools/benchmark.py --arch sd15 --what unet_step --batch 2 --backend torch
  python tools/benchmark.py --arch sd15 --what unet_step --batch 4 --cpu_devices 2
  python tools/benchmark.py --arch sd15 --what unet_step --batch 2 --cpu_devices 2 --cfg_parallel
  python tools/benchmark.py --arch sd15 --what generate --batch 8 --steps 50 --dtype bfloat16 \
      --peak_tflops 989 --json
  python tools/benchmark.py --arch sdxl --what generate --batch 4 --steps 30 --dtype bfloat16 \
      --scheduler euler --peak_tflops 989 --json
  python tools/benchmark.py --arch sdxl_small --what unet_step --batch 2 --height 512 --width 512
  python tools/benchmark.py --arch builtin --what run --batch 8 --steps 4 --images 256
  python tools/benchmark.py --arch builtin --what first_image --prompts 2000000 --steps 2
  python tools/benchmark.py --what dynamic_prompts --prompts 100000 --json
  python tools/benchmark.py --arch sdxl --what programs --programs euler,dpmpp_2m --batch 1
  python tools/benchmark.py --arch sd15 --what unet_step --backend both \
      --kernels blocked,chunked --repeats 2 --json   # interleaved in one process
  python tools/benchmark.py --arch sd15 --what unet_step --backend both --kernels blocked \
      --convs xla,matmul --repeats 3 --json          # convolution forms (SDJAX_CONV)

Networks have random weights of the real architecture (no download). Reports compile time, the
median of several timed calls after warm-up, images/s for `generate`, achieved TFLOP/s (the matmul and
convolution FLOPs of the single-device program, counted from its jaxpr with loops times their
trip counts, used for both backends; XLA's cost analysis, reported beside as `xla_flops`, counts
a loop body once) with model-FLOPs utilisation against `--peak_tflops`, and peak memory (and
XLA's buffer assignment: `xla_argument_bytes`, `xla_temp_bytes`, `xla_output_bytes`, known from
the compile alone, so `--repeats 0` gives them for shapes too slow to run here).
`--what generate --cfg_parallel` times `generate(cfg_parallel=True)`'s two programs (the pair's
latents, one device's decode); its compile time is the first call's. `--what generate
--s_min_uncond S` times A1111's NGMS (the negative prompt's rows left out of every other call
below noise level S: a second, half-batch UNet program inside the loop). Run each backend in its own process so
peak memory is its own.

`--what run` times main.py's whole job (`run.generate_run`: prompts, sampler, PNG encoding and
writing, manifests) on the built-in model against the bare compiled sampler at the same shape,
both after compiling, and reports both images/s and their ratio. `--what first_image` starts
main.py on a synthetic `--prompts`-line jsonl file (built-in model, warm compilation cache) and
reports the seconds until its first PNG exists and the process's peak resident memory then.
`--what programs --programs euler,dpmpp_2m,heun` compiles those schedulers' samplers (`--batch`
images, `--steps`) one after the other in one process and reports each one's seconds of
tracing, lowering and XLA compile (jax's monitoring events); `--inline_networks` traces the
networks into every program again, as before `conditioning.apply` shared their traces.
`--what encode` times writing one image in each `--image_format` (milliseconds and bytes), and
`--what run --line_groups N` feeds the run jsonl lines of N guidance scales in turn.
`--what image_encoder --encoder vit-h` times an IP-Adapter's CLIP image encoder (`--batch`
images at its 224x224) in sdjax and in transformers, calls interleaved in one process: what an
IP-Adapter adds per image (its penultimate hidden states or image embeds; once per image, not
per step). `--what rng --steps 30` times making `--batch` images' noise at the arch's latent size
for an ancestral sampler (the initial draw and one per step) with torch's CPU generator on device
(`--rng torch_cpu`'s) and with JAX's keys, in one process. `--what safety_checker` times the
safety checker (the released one's ViT-L/14 shape, random weights) on `--batch` 8-bit images of
the arch's size in sdjax (`SafetyChecker.check`: CLIP's image processor on the host, the encoder
on device, the decision) and as diffusers' pipelines run it (the same processor, then its
StableDiffusionSafetyChecker), calls interleaved; the host preprocessing apart.
`--what upscaler` times one A1111 model-upscaler pass (R-ESRGAN 4x+'s RRDBNet shape, random
weights) of `--batch` 8-bit images of `--height` x `--width` (default 64) in tiles of
`--upscaler_tile` overlapping by 8: sdjax's compiled pass (`Upscaler.upscale`) against A1111's
loop (each tile through the torch network in turn, PIL blends; tests/esrgan_reference.py, the
network BasicSR's), calls interleaved.
`--what brownian --steps 20` times k-diffusion's Brownian-tree noise of a DPM++ SDE Karras run
of `--steps` (two queries a step, SD1.5's noise levels) for `--batch` images at the arch's latent
size: sdjax's program (`brownian_tree.increments`, torch's CPU generator and CUDA's) after its
compile, against diffusers' `BrownianTreeNoiseSampler` (torchsde's tree, one per image) making
the same answers on the CPU, calls interleaved; and the host plan's time.

`sdxl` is SDXL base 1.0's architecture (2.6B-parameter UNet, CLIP-L + OpenCLIP-bigG encoders,
1024x1024). `sdxl_small` keeps SDXL's layout (no attention at the first level, linear
projections, transformer depth growing with depth, two encoders, text_time conditioning) at
half the UNet width, depths (1, 2, 4) and small encoders, so that CPU comparisons finish.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import os
import resource
import statistics
import sys
import time

from absl import app, flags

_ARCH = flags.DEFINE_enum("arch", "sd15", ["sd15", "sd21_base", "sd21", "sdxl", "sdxl_small",
                                          "builtin"],
                          "architecture (random weights)")
_WHAT = flags.DEFINE_enum("what", "unet_step", ["unet_step", "vae_decode", "generate", "run",
                                               "first_image", "lora_merge", "encode",
                                               "image_encoder", "dynamic_prompts", "rng",
                                               "safety_checker", "upscaler", "brownian",
                                               "programs"],
                          "what to time")
_PROGRAMS = flags.DEFINE_list("programs", ["euler", "dpmpp_2m", "heun"], "programs: the "
                              "schedulers whose samplers compile in turn, in one process")
_INLINE = flags.DEFINE_bool("inline_networks", False, "programs: trace the networks inline in "
                            "each program (as before conditioning.apply traced them once)")
_ENCODER = flags.DEFINE_enum("encoder", "vit-h", ["vit-bigg", "vit-h", "vit-l"],
                             "image_encoder: which (testing.CLIP_VISION_SIZES)")
_LORA_RANK = flags.DEFINE_integer("lora_rank", 32, "lora_merge: rank of the synthetic LoRA, "
                                  "on every linear layer of the UNet and text encoders")
_PROMPTS = flags.DEFINE_integer("prompts", 1, "first_image: lines of the synthetic prompts file")
_IMAGES = flags.DEFINE_integer("images", 256, "run: images per timed run")
_LINE_GROUPS = flags.DEFINE_integer("line_groups", 0, "run: the prompts as a jsonl file whose "
                                    "lines take this many guidance scales in turn (4.0, 4.5, "
                                    "...: one compiled program, as many batch groups); 0: "
                                    "--prompt lines, one group")
_FORMAT = flags.DEFINE_enum("output_format", "png", ["png", "webdataset"], "run: output format")
_OUTPUT = flags.DEFINE_string("output_dir", None, "run: output folder (default: a temporary one)")
_BATCH = flags.DEFINE_integer("batch", 2, "batch (unet_step: 2 = one CFG step of one image)")
_HEIGHT = flags.DEFINE_integer("height", None, "image height (default: the arch's native)")
_WIDTH = flags.DEFINE_integer("width", None, "image width (default: the arch's native)")
_STEPS = flags.DEFINE_integer("steps", 50, "generate: denoising steps")
_SCHEDULER = flags.DEFINE_enum("scheduler", "dpmpp_2m",
                               ["dpmpp_2m", "euler", "unipc", "dpmpp_2m_sde_karras", "lcm",
                                "euler_ancestral"],
                               "generate: scheduler (both backends)")
_RNG = flags.DEFINE_enum("rng", "jax", ["jax", "torch_cpu"], "generate: where the noise comes "
                         "from (torch_cpu: torch's CPU generator run on device)")
_GUIDANCE = flags.DEFINE_float("guidance_scale", 7.5, "generate: guidance scale (<= 1: no CFG "
                               "pass, as LCM-LoRA runs; both backends)")
_S_MIN_UNCOND = flags.DEFINE_float("s_min_uncond", 0.0, "generate: A1111's NGMS (every other call "
                                   "below this noise level without the negative prompt's rows; "
                                   "sampling.CfgSkip)")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16", "float16"], "dtype")
_BACKEND = flags.DEFINE_enum("backend", "jax", ["jax", "torch", "both"], "sdjax or diffusers; "
                              "both: unet_step of each in one process, calls interleaved")
_KERNELS = flags.DEFINE_list("kernels", [], "--backend both: one sdjax program per attention "
                             "kernel (SDJAX_ATTENTION), e.g. blocked,chunked (default: the choice)")
_CONVS = flags.DEFINE_list("convs", [], "--backend both: one sdjax program per convolution form "
                           "(SDJAX_CONV) and attention kernel, e.g. xla,matmul (default: the "
                           "choice)")
_DEVICES = flags.DEFINE_integer("cpu_devices", None, "jax unet_step: split the CPU into this many "
                                "devices (main.py --cpu_devices) and the batch across them, "
                                "--batch 2 per device = one image's CFG pair each as main.py runs")
_CFG_PARALLEL = flags.DEFINE_bool("cfg_parallel", False, "jax unet_step with --cpu_devices: "
                                   "--batch UNet rows = batch/2 images, each image's CFG pair "
                                   "split over two devices as main.py --cfg_parallel runs it "
                                   "(guidance combined); generate: as generate(cfg_parallel="
                                   "True), on the first two devices")
_TORCH_COMPILE = flags.DEFINE_string("torch_compile", "", "torch: torch.compile the UNet with this "
                                      "mode (default, max-autotune, ...), channels_last; empty: "
                                      "eager. compile_s: the first call's extra time")
_UPSCALER_TILE = flags.DEFINE_integer("upscaler_tile", 32, "upscaler: tile size (A1111: 192)")
_TOME = flags.DEFINE_float("token_merging_ratio", 0.0, "jax unet_step / generate: ToMe's ratio "
                           "(A1111's Token merging ratio; 0: off)")
_REPEATS = flags.DEFINE_integer("repeats", 5, "timed calls after one warm-up call (0: compile "
                                "only)")
_CACHE = flags.DEFINE_string("compilation_cache", "", "jax: persistent compilation cache folder "
                             "(empty: off), to measure cold and warm starts")
_PEAK = flags.DEFINE_float("peak_tflops", None, "hardware peak TFLOP/s at this dtype, for MFU")
_FLOPS = flags.DEFINE_float("flops", None, "FLOPs per call (default: counted from the jax "
                            "program's jaxpr; "
                            "pass the jax run's value to the torch run)")
_DECODE = flags.DEFINE_integer("decode_latent_pixels", None, "jax generate: latent pixels the VAE "
                              "decodes at once (sampling.DECODE_LATENT_PIXELS; default sdjax's; "
                              "0: the whole batch in one call, as before 2026-12-02)")
_JSON = flags.DEFINE_bool("json", False, "print one JSON line instead of text")

CLIP_SD1 = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu")
CLIP_SD2 = dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu")
VAE_SD = dict(block_out_channels=[128, 256, 512, 512], layers_per_block=2, sample_size=512,
              down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4)
UNET_SD2 = dict(attention_head_dim=[5, 10, 20, 20], cross_attention_dim=1024,
                use_linear_projection=True)
_SDXL_LEVELS = dict(down_block_types=["DownBlock2D", "CrossAttnDownBlock2D",
                                      "CrossAttnDownBlock2D"],
                    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                    use_linear_projection=True, addition_embed_type="text_time",
                    addition_time_embed_dim=256)
UNET_SDXL = dict(_SDXL_LEVELS, block_out_channels=[320, 640, 1280], attention_head_dim=[5, 10, 20],
                 transformer_layers_per_block=[1, 2, 10], cross_attention_dim=2048,
                 projection_class_embeddings_input_dim=1280 + 6 * 256, sample_size=128)
UNET_SDXL_SMALL = dict(_SDXL_LEVELS, block_out_channels=[160, 320, 640],
                       attention_head_dim=[5, 10, 20], transformer_layers_per_block=[1, 2, 4],
                       cross_attention_dim=384 + 512,
                       projection_class_embeddings_input_dim=512 + 6 * 256, sample_size=64)
CLIP_SDXL_SMALL = dict(CLIP_SD1, hidden_size=384, intermediate_size=1536, num_hidden_layers=6,
                       num_attention_heads=6)
# The second encoder of each SDXL arch (with projection).
CLIP_2 = {
    "sdxl": dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                 num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu",
                 projection_dim=1280),
    "sdxl_small": dict(CLIP_SD2, hidden_size=512, intermediate_size=2048, num_hidden_layers=8,
                       num_attention_heads=8, projection_dim=512),
}
VAE_SDXL = dict(VAE_SD, scaling_factor=0.13025, sample_size=1024)
ARCHS = {
    # arch -> (unet config, clip config, vae config, native size, prediction type)
    "sd15": (dict(cross_attention_dim=768, sample_size=64), CLIP_SD1, VAE_SD, 512, "epsilon"),
    "sd21_base": (dict(UNET_SD2, sample_size=64), CLIP_SD2, VAE_SD, 512, "epsilon"),
    "sd21": (dict(UNET_SD2, sample_size=96, upcast_attention=True), CLIP_SD2, VAE_SD, 768,
             "v_prediction"),
    "sdxl": (UNET_SDXL, CLIP_SD1, VAE_SDXL, 1024, "epsilon"),
    "sdxl_small": (UNET_SDXL_SMALL, CLIP_SDXL_SMALL, VAE_SDXL, 512, "epsilon"),
}


def _configs():
  if _ARCH.value == "builtin":
    import sdjax  # noqa: PLC0415
    from sdjax.models import config_utils  # noqa: PLC0415

    def read(name):
      return config_utils.read_json(f"{sdjax.BUILTIN_MODEL}/{name}/config.json")

    return read("unet"), read("text_encoder"), read("vae"), 64, "epsilon"
  return ARCHS[_ARCH.value]


def _size():
  native = _configs()[3]
  return _HEIGHT.value or native, _WIDTH.value or native


def _timed(fn, repeats):
  fn()  # warm-up
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def _jax_pipeline():
  """sdjax networks of the arch with random weights (no init compile)."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415

  from sdjax import pipeline, testing  # noqa: PLC0415
  from sdjax.models.clip import CLIPTextConfig  # noqa: PLC0415
  from sdjax.models.unet import UNetConfig  # noqa: PLC0415
  from sdjax.models.vae import VAEConfig  # noqa: PLC0415

  if _CACHE.value:
    from sdjax import run  # noqa: PLC0415

    run.enable_compilation_cache(_CACHE.value)
  unet_cfg, clip_cfg, vae_cfg, _, prediction = _configs()
  unet_c, vae_c = UNetConfig.from_dict(unet_cfg), VAEConfig.from_dict(vae_cfg)
  clip_c = CLIPTextConfig.from_dict(clip_cfg)
  clip_2 = CLIPTextConfig.from_dict(CLIP_2[_ARCH.value]) if _ARCH.value in CLIP_2 else None
  dtype = pipeline.parse_dtype(_DTYPE.value)
  examples = pipeline._example_inputs(unet_c, clip_c, vae_c, clip_2)  # noqa: SLF001
  pipe = pipeline.build_pipeline(
      unet_c, vae_c, clip_c, None, {**testing.SCHEDULER_SD15, "prediction_type": prediction},
      params={}, dtype=_DTYPE.value, text_cfg_2=clip_2)
  # Timing does not depend on the values: random normal weights, without compiling init.
  rng = np.random.default_rng(0)
  for name, module in (("unet", pipe.unet), ("vae", pipe.vae), ("text_encoder", pipe.text_encoder),
                       ("text_encoder_2", pipe.text_encoder_2)):
    if module is None:
      continue
    shapes = pipeline._expected_params(module, *examples[name])  # noqa: SLF001
    pipe.params[name] = jax.tree.map(
        lambda x: jnp.asarray(rng.standard_normal(x.shape, np.float32) * 0.02, dtype), shapes)
  return pipe, dtype


def _added_cond(pipe, b):
  """SDXL UNets' text_embeds and time_ids (none for SD1/SD2)."""
  import jax.numpy as jnp  # noqa: PLC0415

  if pipe.text_encoder_2 is None:
    return ()
  width = pipe.text_encoder_2.config.projection_dim
  return jnp.ones((b, width), pipe.dtype), jnp.full((b, 6), 512.0)


def _conditioning(pipe, b, h, w):
  """Token ids of zeros (and SDXL's pooled / time-id inputs), the shapes a real batch has."""
  import jax.numpy as jnp  # noqa: PLC0415

  from sdjax import conditioning  # noqa: PLC0415

  ids = jnp.zeros((b, 77), jnp.int32)
  if pipe.text_encoder_2 is None:
    return conditioning.Conditioning(conditioning.PromptIds(ids), conditioning.PromptIds(ids))
  time_ids = jnp.tile(jnp.asarray([h, w, 0, 0, h, w], jnp.float32), (b, 1))
  side = conditioning.PromptIds(ids, ids)
  return conditioning.Conditioning(side, side, jnp.zeros((b,), bool), time_ids, time_ids)


def _cfg_parallel_step(pipe, args):
  """One CFG step of --batch/2 images on a (data, cfg) mesh, as main.py --cfg_parallel runs it:
  x [n], each side's embeddings [n], each pair split over a device pair, guidance combined."""
  import jax  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415
  from jax.sharding import PartitionSpec as P  # noqa: PLC0415

  from sdjax import conditioning, parallel, sampling  # noqa: PLC0415

  mesh = parallel.make_mesh(cfg_parallel=True)
  n = _BATCH.value // 2  # images
  if parallel.CFG not in mesh.axis_names or _BATCH.value % 2 or n % parallel.data_size(mesh):
    raise app.UsageError(f"--cfg_parallel needs an even --cpu_devices and --batch twice a "
                         f"multiple of the pairs; got {mesh.size} devices, batch {_BATCH.value}")
  params, x, t, context, *added = (args[0], *(a[:n] for a in args[1:]))
  side = conditioning.Embeddings(context, *added)

  def step(p, x, t, negative, positive):
    eps_u, eps_c = sampling._split_guidance_pair(  # noqa: SLF001 - what the sampler runs
        pipe.networks, {"unet": p}, x, t, negative, positive, parallel.CFG)
    return sampling.guide(eps_u, eps_c, 7.5)

  rows = P(parallel.DATA)
  fn = jax.shard_map(step, mesh=mesh, in_specs=(P(), rows, rows, rows, rows), out_specs=rows,
                     check_vma=False)
  put = lambda a: parallel.shard_batch(mesh, np.asarray(a), n)  # noqa: E731
  side = jax.tree.map(put, side)
  return jax.jit(fn), (parallel.replicate(params, mesh), put(x), put(t), side, side)


def bench_jax():
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415
  from flops import jaxpr_flops  # noqa: PLC0415 - tools/flops.py
  from jax.sharding import PartitionSpec as P  # noqa: PLC0415

  from sdjax import parallel, sampling  # noqa: PLC0415

  if _DECODE.value is not None:
    sampling.DECODE_LATENT_PIXELS = _DECODE.value or 2**62
  if _DEVICES.value is not None:
    if _WHAT.value != "unet_step" and not (_WHAT.value == "generate" and _CFG_PARALLEL.value):
      raise app.UsageError("--cpu_devices times a unet_step, or a generate with --cfg_parallel")
    parallel.set_cpu_devices(_DEVICES.value)
  pipe, dtype = _jax_pipeline()
  h, w = _size()
  b = _BATCH.value
  lat = (b, h // 8, w // 8, 4)
  if _WHAT.value == "unet_step":
    args = (pipe.params["unet"], jnp.ones(lat, dtype), jnp.full((b,), 500.0),
            jnp.ones((b, 77, pipe.unet.config.cross_attention_dim), dtype), *_added_cond(pipe, b))
    module = pipe.unet.clone(token_merging=_TOME.value)
    unet = lambda p, x, t, c, *added: module.apply({"params": p}, x, t, c, *added)  # noqa: E731
    counted = (unet, args)
    if _DEVICES.value is not None and not _CFG_PARALLEL.value:  # each device its share
      mesh = parallel.make_mesh()
      if b % mesh.size:
        raise app.UsageError(f"--batch {b} does not split over {mesh.size} devices")
      unet = jax.shard_map(unet, mesh=mesh, in_specs=(P(),) + (P(parallel.DATA),) * (len(args) - 1),
                           out_specs=P(parallel.DATA))
      args = (parallel.replicate(args[0], mesh),
              *(parallel.shard_batch(mesh, np.asarray(a), b) for a in args[1:]))
    if _CFG_PARALLEL.value:
      fn, args = _cfg_parallel_step(pipe, args)
    else:
      fn = jax.jit(unet)
  elif _WHAT.value == "vae_decode":
    args = (pipe.params["vae"], jnp.ones(lat, dtype))
    fn = jax.jit(lambda p, z: pipe.vae.apply({"params": p}, z, method=pipe.vae.decode))
    counted = (fn, args)
  else:
    spec, state = sampling.prepare(pipe, b, steps=_STEPS.value, scheduler=_SCHEDULER.value,
                                   height=h, width=w, guidance_scale=_GUIDANCE.value,
                                   cfg_split=_CFG_PARALLEL.value, rng=_RNG.value)
    spec = sampling.with_cfg_skip(dataclasses.replace(spec, token_merging=_TOME.value), state,
                                  sampling.CfgSkip(_S_MIN_UNCOND.value), _STEPS.value)
    seeds = jnp.arange(b, dtype=jnp.uint32)
    args = (spec, pipe.networks, pipe.params, _conditioning(pipe, b, h, w), seeds,
            sampling.initial_noise(seeds, lat[1:]), jnp.float32(_GUIDANCE.value),
            jnp.float32(0.0), None, state)
    fn = jax.jit(sampling.sample_fn, static_argnums=(0, 1))
    one_device = sampling.prepare(pipe, b, steps=_STEPS.value, scheduler=_SCHEDULER.value,
                                  height=h, width=w, guidance_scale=_GUIDANCE.value,
                                  rng=_RNG.value)[0]
    counted = (functools.partial(sampling.sample_fn, one_device, pipe.networks), args[2:])
    if _CFG_PARALLEL.value:  # generate(cfg_parallel=True): the pair's program, then the decode
      cond, seeds, noise, scale, rescale, init, state = args[3:]
      fn = lambda: sampling._sample(  # noqa: E731, SLF001
          spec, pipe.networks, pipe.params, cond, seeds, noise, (scale, rescale), init, state)
  start = time.perf_counter()
  if _WHAT.value == "generate" and _CFG_PARALLEL.value:  # two programs: compile = first call
    jax.block_until_ready(fn())
    compiled, cost, memory = (lambda: fn()), {}, {}
  else:
    compiled = fn.lower(*args).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    memory = _xla_memory(compiled)
  compile_s = time.perf_counter() - start
  # The single-device program's work (a shard_map'ed program's cost would be one device's).
  flops = _FLOPS.value or jaxpr_flops(jax.make_jaxpr(counted[0])(*counted[1]))
  call_args = () if _CFG_PARALLEL.value and _WHAT.value == "generate" else (
      args if _WHAT.value != "generate" else args[2:])
  median = float("nan")
  if _REPEATS.value:
    median = _timed(lambda: jax.block_until_ready(compiled(*call_args)), _REPEATS.value)
  stats = jax.devices()[0].memory_stats() or {}
  # Accelerators report their peak; on CPU the process's peak resident memory stands in.
  peak = stats.get("peak_bytes_in_use") or resource.getrusage(
      resource.RUSAGE_SELF).ru_maxrss * 1024
  return dict(compile_s=compile_s, median_s=median, flops=flops,
              xla_flops=float(cost.get("flops", 0.0)), peak_bytes=peak, **memory,
              device=str(jax.devices()[0].device_kind), version=f"jax {jax.__version__}")


def _xla_memory(compiled) -> dict[str, int]:
  """XLA's buffer assignment for the compiled program (known before it runs, so `--repeats 0`
  gives it): argument bytes (the weights), temporaries' peak, output bytes."""
  try:
    m = compiled.memory_analysis()
  except Exception:  # noqa: BLE001 - not every backend implements it
    return {}
  if m is None:
    return {}
  return dict(xla_argument_bytes=int(m.argument_size_in_bytes),
              xla_temp_bytes=int(m.temp_size_in_bytes),
              xla_output_bytes=int(m.output_size_in_bytes))


def bench_programs() -> list[dict]:
  """Trace, lowering and XLA compile seconds of each of --programs' samplers, in turn."""
  import collections  # noqa: PLC0415

  import jax  # noqa: PLC0415
  import jax.monitoring  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415

  from sdjax import conditioning, sampling  # noqa: PLC0415

  if _INLINE.value:
    conditioning.apply = lambda module, params, *args, method=None, **kwargs: module.apply(
        {"params": params}, *args, method=method, **kwargs)
  seconds = collections.Counter()
  jax.monitoring.register_event_duration_secs_listener(
      lambda event, duration, **_: seconds.update({event.rsplit("/", 1)[-1]: duration}))
  pipe, _ = _jax_pipeline()
  (h, w), b = _size(), _BATCH.value
  seeds = jnp.arange(b, dtype=jnp.uint32)
  rows = []
  for name in _PROGRAMS.value:
    spec, state = sampling.prepare(pipe, b, steps=_STEPS.value, scheduler=name, height=h,
                                   width=w, guidance_scale=_GUIDANCE.value)
    args = (spec, pipe.networks, pipe.params, _conditioning(pipe, b, h, w), seeds,
            sampling.initial_noise(seeds, (h // 8, w // 8, 4)), jnp.float32(_GUIDANCE.value),
            jnp.float32(0.0), None, state)
    seconds.clear()
    start = time.perf_counter()
    jax.jit(sampling.sample_fn, static_argnums=(0, 1)).lower(*args).compile()
    rows.append(dict(program=name, wall_s=time.perf_counter() - start,
                     trace_s=seconds["jaxpr_trace_duration"],
                     lower_s=seconds["jaxpr_to_mlir_module_duration"],
                     compile_s=seconds["backend_compile_duration"]))
  return rows


def bench_run():
  """main.py's job vs the bare sharded sampler it runs, same model, shape and batch."""
  import tempfile  # noqa: PLC0415

  import jax  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415

  import sdjax  # noqa: PLC0415
  from sdjax import parallel, run, sampling  # noqa: PLC0415

  if _ARCH.value in CLIP_2:
    raise app.UsageError("--what run takes the built-in model or an SD1/SD2 arch")
  h, w = _size()
  b = _BATCH.value
  cache = _CACHE.value or tempfile.mkdtemp()
  run.enable_compilation_cache(cache)
  model = None if _ARCH.value == "builtin" else _random_model_folder()
  pipe = sdjax.load_pipeline(model, _DTYPE.value)
  mesh = parallel.make_mesh()
  per_batch = b * mesh.size
  spec, state = sampling.prepare(pipe, b, steps=_STEPS.value, scheduler="dpmpp_2m", height=h,
                                 width=w, guidance_scale=4.0)
  cond = sampling.make_conditioning(pipe, ["a red circle"] * per_batch, [""] * per_batch)
  seeds = parallel.shard_batch(mesh, np.arange(per_batch, dtype=np.uint32), per_batch)
  args = (parallel.replicate(pipe.params, mesh), parallel.shard_tree(mesh, cond, per_batch), seeds,
          *parallel.replicate((np.float32(4.0), np.float32(0.0)), mesh),
          parallel.replicate(state, mesh))
  compiled = parallel.sharded_sampler(mesh, spec, pipe).lower(*args).compile()
  jax.block_until_ready(compiled(*args))
  batches = max(_IMAGES.value // per_batch, 1)
  start = time.perf_counter()
  outs = [compiled(*args) for _ in range(batches)]  # back to back, as a perfect host would
  jax.block_until_ready(outs)
  bare = batches * per_batch / (time.perf_counter() - start)

  prompts, prompts_file = tuple(run.PromptLine(f"a red circle {i}")
                                for i in range(batches * per_batch)), None
  if _LINE_GROUPS.value:  # lines of several guidance scales in turn: the same device work
    prompts_file = os.path.join(tempfile.mkdtemp(), "prompts.jsonl")
    with open(prompts_file, "w") as f:
      for i, line in enumerate(prompts):
        scale = 4.0 + 0.5 * (i % _LINE_GROUPS.value)
        f.write(json.dumps({"prompt": line.prompt, "guidance_scale": scale}) + "\n")
    prompts = ()
  cfg = run.RunConfig(prompts=prompts, prompts_file=prompts_file, model=model, steps=_STEPS.value, guidance_scale=4.0,
                      scheduler="dpmpp_2m", height=h, width=w, batch_size=b,
                      dtype=_DTYPE.value, output_dir=_OUTPUT.value or tempfile.mkdtemp(),
                      output_format=_FORMAT.value, compilation_cache=cache,
                      show_progress=False, overwrite=True)
  summary = run.generate_run(cfg)
  return dict(compile_s=summary.compile_seconds, median_s=summary.seconds / batches, flops=0.0,
              peak_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
              device=str(jax.devices()[0].device_kind), version=f"jax {jax.__version__}",
              images=summary.images, bare_images_per_s=bare,
              run_images_per_s=summary.images_per_second,
              run_vs_bare=summary.images_per_second / bare, line_groups=_LINE_GROUPS.value)


def bench_encode():
  """Milliseconds and bytes per image of each `--image_format` (`outputs.image_bytes`, with the
  A1111 text) at --height x --width (default 512), on a photo-like image: 1/f ("pink") noise,
  whose spectrum falls off as natural images' do (random-weight networks make white noise, the
  worst case for every codec, and the built-in model's flat shapes the best)."""
  import numpy as np  # noqa: PLC0415

  from sdjax import outputs  # noqa: PLC0415

  h, w = _HEIGHT.value or 512, _WIDTH.value or 512
  rng = np.random.default_rng(0)
  fy, fx = np.fft.fftfreq(h)[:, None], np.fft.rfftfreq(w)[None, :]
  falloff = 1.0 / np.maximum(np.hypot(fy, fx), 1.0 / max(h, w))
  channels = [np.fft.irfft2(falloff * np.exp(2j * np.pi * rng.random(falloff.shape)), (h, w))
              for _ in range(3)]
  image = np.stack(channels, -1)
  image = ((image - image.min()) / (image.max() - image.min()) * 255).astype(np.uint8)
  text = "a photo of a cat\nNegative prompt: blurry\nSteps: 30, Sampler: Euler, CFG scale: 7"
  result = {"flops": None}
  for name, kwargs in (("png", {}), ("jpg", {"quality": 80}), ("jpg_q95", {"quality": 95}),
                       ("webp", {"quality": 80}), ("webp_lossless", {"lossless": True})):
    fmt = name.split("_")[0]
    data = outputs.image_bytes(image, text, fmt, **kwargs)
    result[f"{name}_ms"] = 1e3 * _timed(lambda f=fmt, k=kwargs: outputs.image_bytes(
        image, text, f, **k), max(_REPEATS.value, 1))
    result[f"{name}_kb"] = len(data) / 1e3
  result["median_s"] = result["png_ms"] / 1e3
  return result


def bench_rng():
  """Seconds to draw --batch images' initial and --steps steps' noise at the arch's latent size:
  torch's CPU generator on device (sdjax.torch_rng) and A1111's NV generator (sdjax.nv_rng)
  against jax.random, and the former's compile."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415

  from sdjax import nv_rng, torch_rng  # noqa: PLC0415

  h, w = _size()
  shape, draws = (h // 8, w // 8, 4), _STEPS.value + 1
  seeds = jnp.arange(_BATCH.value, dtype=jnp.uint32)
  torch_cpu = jax.jit(lambda s: torch_rng.randn_nchw(s, draws, shape))
  nv = jax.jit(lambda s: nv_rng.randn_nchw(s, draws, shape))
  keyed = jax.jit(lambda s: jax.vmap(lambda k: jax.random.normal(k, (draws, *shape)))(
      jax.vmap(jax.random.key)(s)))
  start = time.perf_counter()
  torch_cpu = torch_cpu.lower(seeds).compile()
  compile_s = time.perf_counter() - start
  start = time.perf_counter()
  nv = nv.lower(seeds).compile()
  nv_compile_s = time.perf_counter() - start
  repeats = max(_REPEATS.value, 1)
  result = {"flops": None, "draws": draws, "compile_s": compile_s,
            "torch_cpu_s": _timed(lambda: jax.block_until_ready(torch_cpu(seeds)), repeats),
            "nv_s": _timed(lambda: jax.block_until_ready(nv(seeds)), repeats),
            "nv_compile_s": nv_compile_s,
            "jax_s": _timed(lambda: jax.block_until_ready(keyed(seeds)), repeats),
            "device": str(jax.devices()[0].device_kind)}
  result["median_s"] = result["torch_cpu_s"]
  return result


def bench_brownian():
  """Seconds to make --batch images' Brownian answers for a DPM++ SDE Karras run of --steps:
  sdjax's program with each generator (and its compile) against torchsde's trees, interleaved."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415
  import torch  # noqa: PLC0415

  from sdjax import brownian_tree, schedulers, testing  # noqa: PLC0415

  try:  # needs torchsde
    from diffusers.schedulers.scheduling_dpmsolver_sde import (  # noqa: PLC0415
      BrownianTreeNoiseSampler,
    )
  except ImportError:
    BrownianTreeNoiseSampler = None
  torch.set_num_threads(1)
  h, w = _size()
  shape = (h // 8, w // 8, 4)
  sched = schedulers.get_scheduler("dpmpp_sde_karras", dict(testing.SCHEDULER_SD15))
  state = sched.set_timesteps(_STEPS.value, sample_shape=(1, *shape))
  queries = [q for q in sched.brownian_queries(state) if q is not None]
  sigmas = np.asarray(state.sigmas)
  start = time.perf_counter()
  tree = brownian_tree.plan(sigmas[sigmas > 0].min(), sigmas.max(), queries)
  result = {"flops": None, "queries": len(queries), "ops": len(tree.ops),
            "draws": len(tree.spawn) + 1, "slots": tree.slots,
            "plan_s": time.perf_counter() - start, "device": str(jax.devices()[0].device_kind)}
  seeds = jnp.arange(_BATCH.value, dtype=jnp.uint32)
  programs = {}
  for generator in brownian_tree.GENERATORS:
    start = time.perf_counter()
    programs[generator] = jax.jit(
        lambda s, g=generator: brownian_tree.increments(tree, g, s, shape)).lower(seeds).compile()
    result[f"{generator}_compile_s"] = time.perf_counter() - start
  # the reference's tree on the GPU where there is one, as A1111's
  device = "cuda" if torch.cuda.is_available() else "cpu"
  x = torch.zeros(_BATCH.value, 4, h // 8, w // 8, device=device)

  def reference():
    sampler = BrownianTreeNoiseSampler(x, float(sigmas[sigmas > 0].min()), float(sigmas.max()),
                                       seed=list(range(_BATCH.value)))
    out = [sampler(torch.tensor(a, device=device), torch.tensor(b, device=device))
           for a, b in queries]
    if device == "cuda":
      torch.cuda.synchronize()
    return out

  result["torchsde_device"] = device if BrownianTreeNoiseSampler else None
  times = {name: [] for name in (*programs, *(("torchsde",) if BrownianTreeNoiseSampler else ()))}
  for _ in range(max(_REPEATS.value, 1) + 1):  # the first round warms up
    for name, program in programs.items():
      start = time.perf_counter()
      jax.block_until_ready(program(seeds))
      times[name].append(time.perf_counter() - start)
    if BrownianTreeNoiseSampler is not None:
      start = time.perf_counter()
      reference()
      times["torchsde"].append(time.perf_counter() - start)
  for name, values in times.items():
    result[f"{name}_s"] = statistics.median(values[1:])
  result["median_s"] = result["torch_cpu_s"]
  return result


def bench_dynamic_prompts():
  """Host time of dynamic prompts (`sdjax.dynamic_prompts`) in a run's plan: --prompts lines of
  distinct templates, for random runs with variants and a wildcard of 1,000 lines, for
  combinatorial ones with 4 texts each: the first pass (combinatorial: every line counted),
  the jobs of a shard (random: each image sampled by its seed), and one template sampled again
  and again; the library's own parser on the same templates beside."""
  import tempfile  # noqa: PLC0415

  from dynamicprompts.parser.parse import parse  # noqa: PLC0415

  from sdjax.dynamic_prompts import DynamicPrompts  # noqa: PLC0415
  from sdjax.plan import Plan  # noqa: PLC0415

  folder = tempfile.mkdtemp()
  os.makedirs(os.path.join(folder, "wildcards"))
  with open(os.path.join(folder, "wildcards", "things.txt"), "w") as f:
    f.write("\n".join(f"thing {i}" for i in range(1000)))
  lines = _PROMPTS.value
  texts = {"random": "a {{photo|painting}} of __things__ {}, {{in snow|at night|at dawn}}\n",
           "combinatorial": "a {{photo|painting}} of a {{red|blue}} thing {}\n"}
  wildcards = os.path.join(folder, "wildcards")
  result = {"flops": None, "prompts": lines}
  for mode, text in texts.items():
    path = os.path.join(folder, f"{mode}.txt")
    with open(path, "w") as f:
      f.writelines(text.format(i) for i in range(lines))
    t0 = time.perf_counter()
    plan = Plan((), path, num_images_per_prompt=1, seed=0, negative_prompt="", shard_size=1000,
                comments=True, dynamic=DynamicPrompts(mode, wildcards))
    result[f"{mode}_first_pass_s"] = time.perf_counter() - t0
    result[f"{mode}_images"] = plan.total
    t0 = time.perf_counter()
    jobs = list(plan.jobs(plan.num_shards // 2))
    result[f"{mode}_ms_per_image"] = 1e3 * (time.perf_counter() - t0) / len(jobs)
  one = DynamicPrompts("random", wildcards)
  template = "a {photo|painting} of __things__, {in snow|at night|at dawn}"
  result["same_template_sample_ms"] = 1e3 * _timed(lambda: [one.sample(template, s)
                                                             for s in range(1000)], 3) / 1000
  sample = [f"a {{photo|painting}} of __things__ {i}, {{in snow|at night|at dawn}}"
            for i in range(200)]
  result["library_parse_ms"] = 1e3 * _timed(lambda: [parse(t) for t in sample], 1) / 200
  result["median_s"] = result["random_ms_per_image"] / 1e3
  return result


def _random_model_folder() -> str:
  """The arch with random weights as a diffusers folder (float32, the test tokenizer), for
  main.py's run to load: the real networks' device time against the host's per-image work."""
  import dataclasses  # noqa: PLC0415
  import tempfile  # noqa: PLC0415

  from sdjax import pipeline, testing  # noqa: PLC0415

  folder = tempfile.mkdtemp()
  testing.write_tokenizer(os.path.join(folder, "tokenizer_src"))
  pipe, _ = _jax_pipeline()
  pipe = dataclasses.replace(pipe, tokenizer=testing.torch_tokenizer(
      os.path.join(folder, "tokenizer_src")))
  pipeline.save_pretrained(pipe, os.path.join(folder, "model"))
  return os.path.join(folder, "model")


def bench_lora_merge():
  """Seconds to merge a kohya LoRA on every linear layer of the UNet and text encoders: reading
  and resolving the file, and merging the parsed LoRA (what main.py pays per change of LoRA set),
  plainly and with the same file carrying DoRA magnitudes."""
  import tempfile  # noqa: PLC0415

  import jax  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415
  from flax import traverse_util  # noqa: PLC0415
  from safetensors.numpy import save_file  # noqa: PLC0415

  from sdjax.checkpoints import lora  # noqa: PLC0415
  from sdjax.checkpoints.weights import torch_key  # noqa: PLC0415

  pipe, _ = _jax_pipeline()
  rng, rank, plain, layers = np.random.default_rng(0), _LORA_RANK.value, {}, 0
  magnitudes = {}
  prefixes = {"unet": "lora_unet_", "text_encoder": "lora_te1_" if pipe.is_sdxl else "lora_te_",
              "text_encoder_2": "lora_te2_"}
  for component, prefix in prefixes.items():
    if component not in pipe.params:
      continue
    for path, kernel in traverse_util.flatten_dict(pipe.params[component]).items():
      if path[-1] != "kernel" or kernel.ndim != 2:
        continue
      key = prefix + torch_key(path).rsplit(".", 1)[0].replace(".", "_")
      fan_in, fan_out = kernel.shape
      plain[f"{key}.lora_down.weight"] = (rng.standard_normal((rank, fan_in)) * 0.01).astype(
          np.float32)
      plain[f"{key}.lora_up.weight"] = (rng.standard_normal((fan_out, rank)) * 0.01).astype(
          np.float32)
      plain[f"{key}.alpha"] = np.asarray(rank, np.float32)
      norms = np.linalg.norm(np.asarray(kernel, np.float32), axis=0)  # per output channel
      magnitudes[f"{key}.dora_scale"] = norms.reshape(-1, 1).astype(np.float32)
      layers += 1
  folder = tempfile.mkdtemp()
  files = {"plain": os.path.join(folder, "plain.safetensors"),
           "dora": os.path.join(folder, "dora.safetensors")}
  save_file(plain, files["plain"])
  save_file({**plain, **magnitudes}, files["dora"])
  result = {"layers": layers, "lora_rank": rank, "flops": None,
            "file_mb": os.path.getsize(files["plain"]) / 1e6}
  for name, path in files.items():
    result[f"{name}_read_s"] = _timed(
        lambda path=path: lora.read_lora(path, pipe.params, pipe.unet.config), _REPEATS.value)
    parsed = lora.read_lora(path, pipe.params, pipe.unet.config)
    result[f"{name}_merge_s"] = _timed(lambda parsed=parsed: jax.block_until_ready(
        lora.apply_loras(pipe, [parsed])), _REPEATS.value)
  result["median_s"] = result["plain_read_s"] + result["plain_merge_s"]
  return result


def bench_first_image():
  """main.py's time to its first image and its peak memory, for a synthetic prompts file."""
  import json as json_  # noqa: PLC0415
  import signal  # noqa: PLC0415
  import subprocess  # noqa: PLC0415
  import tempfile  # noqa: PLC0415

  work = tempfile.mkdtemp()
  prompts = os.path.join(work, "prompts.jsonl")
  with open(prompts, "w") as f:
    for i in range(_PROMPTS.value):
      f.write(json_.dumps({"prompt": f"a red circle in the center on a blue background {i}"})
              + "\n")
  cache = _CACHE.value or os.path.join(work, "cache")
  h, w = _size()
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

  warm = os.path.join(work, "warm.jsonl")
  with open(warm, "w") as f:
    f.write('{"prompt": "a red circle"}\n')

  def main_py(out, prompts=prompts):
    return subprocess.Popen(
        [sys.executable, os.path.join(root, "main.py"), "--prompts_file", prompts, "--steps",
         str(_STEPS.value), "--batch_size", str(_BATCH.value), "--height", str(h), "--width",
         str(w), "--output_dir", out, "--compilation_cache", cache, "--output_format",
         _FORMAT.value], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

  main_py(os.path.join(work, "warm"), warm).wait()  # fills the compilation cache
  out = os.path.join(work, "out")
  start = time.perf_counter()
  proc = main_py(out)
  first, peak = None, 0
  while first is None:
    running = proc.poll() is None
    if running:
      with open(f"/proc/{proc.pid}/status") as f:
        peak = max([peak] + [int(line.split()[1]) * 1024 for line in f
                             if line.startswith("VmHWM")])
    if any(n.endswith(".png") for _, _, files in os.walk(out) for n in files):
      first = time.perf_counter() - start
    elif not running:
      break
    time.sleep(0.02)
  proc.send_signal(signal.SIGINT)
  proc.wait()
  return dict(compile_s=0.0, median_s=first or float("nan"), flops=0.0, peak_bytes=peak,
              device="cpu", version="", prompts=_PROMPTS.value, first_image_s=first)


def bench_torch():
  import diffusers  # noqa: PLC0415
  import torch  # noqa: PLC0415
  from transformers import CLIPTextConfig, CLIPTextModel  # noqa: PLC0415

  unet_cfg, clip_cfg, vae_cfg, _, prediction = _configs()
  h, w = _size()
  b = _BATCH.value
  device = "cuda" if torch.cuda.is_available() else "cpu"
  dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16,
           "float16": torch.float16}[_DTYPE.value]
  with torch.device(device):
    unet = diffusers.UNet2DConditionModel(**unet_cfg).to(dtype).eval()
    vae = diffusers.AutoencoderKL(**vae_cfg).to(dtype).eval()
  if _TORCH_COMPILE.value:  # the strongest PyTorch setup: compiled UNet, NHWC weights
    unet = torch.compile(unet.to(memory_format=torch.channels_last), mode=_TORCH_COMPILE.value)
  lat = (b, 4, h // 8, w // 8)
  sdxl = _ARCH.value in CLIP_2
  if _WHAT.value == "unet_step":
    x = torch.ones(lat, dtype=dtype, device=device)
    t = torch.full((b,), 500.0, device=device)
    ctx = torch.ones((b, 77, unet.config.cross_attention_dim), dtype=dtype, device=device)
    added = None if not sdxl else {
        "text_embeds": torch.ones((b, CLIP_2[_ARCH.value]["projection_dim"]), dtype=dtype,
                                  device=device),
        "time_ids": torch.full((b, 6), 512.0, dtype=dtype, device=device)}

    def fn():
      return unet(x, t, ctx, added_cond_kwargs=added).sample
  elif _WHAT.value == "vae_decode":
    z = torch.ones(lat, dtype=dtype, device=device)

    def fn():
      return vae.decode(z).sample
  else:
    import tempfile  # noqa: PLC0415

    import sdjax  # noqa: PLC0415
    from sdjax import testing  # noqa: PLC0415

    if _ARCH.value == "builtin":  # its own words and length
      tok_dir = f"{sdjax.BUILTIN_MODEL}/tokenizer"
    else:
      tok_dir = tempfile.mkdtemp()
      testing.write_tokenizer(tok_dir)
    text = CLIPTextModel(CLIPTextConfig(**clip_cfg)).to(device, dtype).eval()
    cls, options = {
        "dpmpp_2m": (diffusers.DPMSolverMultistepScheduler, {}),
        "euler": (diffusers.EulerDiscreteScheduler, {}),
        "unipc": (diffusers.UniPCMultistepScheduler, {}),
        "dpmpp_2m_sde_karras": (diffusers.DPMSolverMultistepScheduler,
                                {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True}),
        "lcm": (diffusers.LCMScheduler, {}),
        "euler_ancestral": (diffusers.EulerAncestralDiscreteScheduler, {}),
    }[_SCHEDULER.value]
    sched = cls.from_config({**testing.SCHEDULER_SD15, "prediction_type": prediction}, **options)
    tokenizer = testing.torch_tokenizer(tok_dir)
    if sdxl:
      from transformers import CLIPTextModelWithProjection  # noqa: PLC0415

      text_2 = CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_2[_ARCH.value]))
      pipe = diffusers.StableDiffusionXLPipeline(
          vae=vae, text_encoder=text, text_encoder_2=text_2.to(device, dtype).eval(),
          tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet, scheduler=sched,
          add_watermarker=False)
    else:
      pipe = diffusers.StableDiffusionPipeline(
          vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet,
          scheduler=sched, safety_checker=None, feature_extractor=None,
          requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)

    def fn():
      return pipe([""] * b, num_inference_steps=_STEPS.value, height=h, width=w,
                  guidance_scale=_GUIDANCE.value, output_type="np").images

  def sync_fn():
    with torch.no_grad():
      fn()
    if device == "cuda":
      torch.cuda.synchronize()

  compile_s = 0.0
  if _TORCH_COMPILE.value:
    start = time.perf_counter()
    sync_fn()  # compiles (and autotunes)
    compile_s = time.perf_counter() - start
  median = _timed(sync_fn, _REPEATS.value)
  if _TORCH_COMPILE.value:
    compile_s = max(compile_s - median, 0.0)
  if device == "cuda":
    peak = torch.cuda.max_memory_allocated()
    kind = torch.cuda.get_device_name()
  else:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    kind = "cpu"
  return dict(compile_s=compile_s, median_s=median, flops=_FLOPS.value or 0.0, peak_bytes=peak,
              device=kind, version=f"torch {torch.__version__}, diffusers {diffusers.__version__}",
              torch_compile=_TORCH_COMPILE.value or None)


def torch_threads() -> int:
  import torch  # noqa: PLC0415

  return torch.get_num_threads()


def bench_both():
  """One CFG UNet step of diffusers and of sdjax (one program per kernel), calls interleaved.

  On a shared machine each round runs every program once, in turn, so load hits them alike;
  reports the best and median wall time and the best process CPU time (all threads) per program.
  """

  import diffusers  # noqa: PLC0415
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  import torch  # noqa: PLC0415

  if _WHAT.value != "unet_step" or _DTYPE.value != "float32":
    raise app.UsageError("--backend both times a float32 unet_step")
  pipe, dtype = _jax_pipeline()
  h, w = _size()
  b = _BATCH.value
  args = (pipe.params["unet"], jnp.ones((b, h // 8, w // 8, 4), dtype), jnp.full((b,), 500.0),
          jnp.ones((b, 77, pipe.unet.config.cross_attention_dim), dtype))
  programs, results = {}, {}
  for kernel, conv in itertools.product(_KERNELS.value or [""], _CONVS.value or [""]):
    for var, value in (("SDJAX_ATTENTION", kernel), ("SDJAX_CONV", conv)):  # read while tracing
      os.environ.pop(var, None)
      if value:
        os.environ[var] = value
    fn = jax.jit(lambda p, x, t, c: pipe.unet.apply({"params": p}, x, t, c))
    start = time.perf_counter()
    compiled = fn.lower(*args).compile()
    name = f"sdjax {kernel or 'default'}" + (f" conv={conv}" if conv else "")
    results[name] = dict(compile_s=time.perf_counter() - start)
    programs[name] = lambda compiled=compiled: jax.block_until_ready(compiled(*args))
  os.environ.pop("SDJAX_ATTENTION", None)
  os.environ.pop("SDJAX_CONV", None)
  unet = diffusers.UNet2DConditionModel(**_configs()[0]).eval()
  x, t = torch.ones((b, 4, h // 8, w // 8)), torch.full((b,), 500.0)
  ctx = torch.ones((b, 77, unet.config.cross_attention_dim))
  programs["diffusers"] = lambda: unet(x, t, ctx).sample
  results["diffusers"] = dict(compile_s=0.0)
  wall = {name: [] for name in programs}
  cpu = {name: [] for name in programs}
  with torch.no_grad():
    for fn in programs.values():
      fn()  # warm-up
    for _ in range(_REPEATS.value):
      for name, fn in programs.items():
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall[name].append(time.perf_counter() - w0)
        cpu[name].append(time.process_time() - c0)
  for name in programs:
    results[name].update(best_s=min(wall[name]), median_s=statistics.median(wall[name]),
                         best_cpu_s=min(cpu[name]), wall_s=wall[name], cpu_s=cpu[name],
                         ratio_best=min(wall[name]) / min(wall["diffusers"]),
                         ratio_cpu=min(cpu[name]) / min(cpu["diffusers"]))
  return results


def _interleaved(programs) -> dict[str, list[float]]:
  """Wall seconds of each of `programs` ({name: call}) per round, after one warm-up call each,
  the calls interleaved round by round (so drifting machine load hits them alike)."""
  import torch  # noqa: PLC0415

  wall = {name: [] for name in programs}
  with torch.no_grad():
    for fn in programs.values():
      fn()
    for _ in range(_REPEATS.value):
      for name, fn in programs.items():
        t0 = time.perf_counter()
        fn()
        wall[name].append(time.perf_counter() - t0)
  return wall


def bench_image_encoder():
  """An IP-Adapter image encoder (random weights) in sdjax and transformers, float32, calls
  interleaved; best and median wall seconds of each, and their ratio."""
  import jax  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415
  import torch  # noqa: PLC0415
  import transformers  # noqa: PLC0415

  from sdjax import testing  # noqa: PLC0415
  from sdjax.checkpoints import ip_adapter as ip_files  # noqa: PLC0415
  from sdjax.checkpoints.weights import torch_to_flax  # noqa: PLC0415
  from sdjax.models.clip import CLIPVisionConfig, CLIPVisionModelWithProjection  # noqa: PLC0415

  raw = dict(testing.CLIP_VISION_SIZES[_ENCODER.value], image_size=224)
  model = transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(**raw)).eval()
  ours = CLIPVisionModelWithProjection(CLIPVisionConfig(**raw))
  b = _BATCH.value
  pixels = np.random.default_rng(0).standard_normal((b, 224, 224, 3)).astype(np.float32)
  expected = jax.eval_shape(ours.init, jax.random.key(0), pixels[:1])["params"]
  params = jax.device_put(torch_to_flax(ip_files.vision_state(
      {k: v.numpy() for k, v in model.state_dict().items()}), expected, "image_encoder"))
  fn = jax.jit(lambda p, x: ours.apply({"params": p}, x)["hidden_states"][-2])
  start = time.perf_counter()
  compiled = fn.lower(params, pixels).compile()
  compile_s = time.perf_counter() - start
  x = torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy())
  programs = {"sdjax": lambda: jax.block_until_ready(compiled(params, pixels)),
              "transformers": lambda: model(x, output_hidden_states=True).hidden_states[-2]}
  wall = _interleaved(programs)
  return {"encoder": _ENCODER.value, "batch": b, "compile_s": compile_s,
          **{f"{name}_best_s": min(w) for name, w in wall.items()},
          **{f"{name}_median_s": statistics.median(w) for name, w in wall.items()},
          "ratio_best": min(wall["sdjax"]) / min(wall["transformers"]),
          "params": sum(p.numel() for p in model.parameters()), "torch_threads": torch_threads(),
          "date": time.strftime("%Y-%m-%d %H:%M")}


def bench_safety_checker():
  """The safety checker (ViT-L/14, random weights) on `--batch` uint8 images in sdjax and as
  diffusers runs it, float32, calls interleaved; best and median wall seconds of each."""
  import tempfile  # noqa: PLC0415

  import numpy as np  # noqa: PLC0415
  import torch  # noqa: PLC0415
  import transformers  # noqa: PLC0415
  from diffusers.pipelines.stable_diffusion.safety_checker import (  # noqa: PLC0415
    StableDiffusionSafetyChecker,
  )
  from PIL import Image  # noqa: PLC0415

  from sdjax import safety, testing  # noqa: PLC0415

  vision = {k: v for k, v in testing.CLIP_VISION_SIZES["vit-l"].items() if k != "projection_dim"}
  config = transformers.CLIPConfig(vision_config=dict(vision, image_size=224), projection_dim=768)
  ref = StableDiffusionSafetyChecker(config).eval()
  processor = transformers.CLIPImageProcessor(size={"shortest_edge": 224},
                                              crop_size={"height": 224, "width": 224})
  with tempfile.TemporaryDirectory() as folder:
    ref.save_pretrained(folder)
    processor.save_pretrained(folder)
    ours = safety.load_safety_checker(folder)
  h, w = _size()
  b = _BATCH.value
  images = np.random.default_rng(0).integers(0, 256, (b, h, w, 3), dtype=np.uint8)
  start = time.perf_counter()
  ours.check(images)  # compiles
  compile_s = time.perf_counter() - start

  device = "cuda" if torch.cuda.is_available() else "cpu"  # diffusers' on the same device
  ref.to(device)

  def diffusers_run():  # its forward brings the similarities to the host: synchronized
    pixels = processor([Image.fromarray(x) for x in images], return_tensors="pt").pixel_values
    return ref(clip_input=pixels.to(device), images=images.copy())

  programs = {"sdjax": lambda: ours.check(images), "diffusers": diffusers_run,
              "preprocess": lambda: ours.pixels(images)}
  wall = _interleaved(programs)
  return {"what": "safety_checker", "batch": b, "height": h, "width": w, "compile_s": compile_s,
          "median_s": statistics.median(wall["sdjax"]),
          **{f"{name}_best_s": min(t) for name, t in wall.items()},
          **{f"{name}_median_s": statistics.median(t) for name, t in wall.items()},
          "ratio_best": min(wall["sdjax"]) / min(wall["diffusers"]),
          "params": sum(p.numel() for p in ref.parameters()), "torch_threads": torch_threads(),
          "date": time.strftime("%Y-%m-%d %H:%M")}


def bench_upscaler():
  """One model-upscaler pass in sdjax and as A1111 runs it in torch, float32, calls interleaved;
  best and median wall seconds of each."""
  import tempfile  # noqa: PLC0415

  import numpy as np  # noqa: PLC0415
  import torch  # noqa: PLC0415
  from PIL import Image  # noqa: PLC0415

  from sdjax import upscaling  # noqa: PLC0415

  sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "tests"))
  import esrgan_reference  # noqa: PLC0415

  net = esrgan_reference.random_rrdbnet(blocks=23, feat=64, grow=32)  # R-ESRGAN 4x+
  tile, overlap = _UPSCALER_TILE.value, upscaling.DEFAULT_OVERLAP
  with tempfile.TemporaryDirectory() as folder:
    path = os.path.join(folder, "RealESRGAN_x4plus.pth")
    torch.save({"params_ema": net.state_dict()}, path)
    ours = upscaling.load_upscaler(path, tile, overlap)
  h, w, b = _HEIGHT.value or 64, _WIDTH.value or 64, _BATCH.value
  images = np.random.default_rng(0).integers(0, 256, (b, h, w, 3), dtype=np.uint8)
  start = time.perf_counter()
  ours.upscale(images)  # compiles
  compile_s = time.perf_counter() - start

  device = "cuda" if torch.cuda.is_available() else "cpu"  # torch's on the same device
  net.to(device)

  def network(x):
    y = net(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).to(device))
    return y.cpu().numpy().transpose(0, 2, 3, 1)

  def a1111():
    return [esrgan_reference.a1111_upscale_pass(network, Image.fromarray(x), tile, overlap)
            for x in images]

  wall = _interleaved({"sdjax": lambda: ours.upscale(images), "a1111_torch": a1111})
  return {"what": "upscaler", "batch": b, "height": h, "width": w, "tile": tile,
          "overlap": overlap, "compile_s": compile_s, "median_s": statistics.median(wall["sdjax"]),
          **{f"{name}_best_s": min(t) for name, t in wall.items()},
          **{f"{name}_median_s": statistics.median(t) for name, t in wall.items()},
          "ratio_best": min(wall["sdjax"]) / min(wall["a1111_torch"]),
          "params": sum(p.numel() for p in net.parameters()), "torch_threads": torch_threads(),
          "date": time.strftime("%Y-%m-%d %H:%M")}


def main(argv):
  del argv
  if _WHAT.value == "upscaler":
    print(json.dumps(bench_upscaler()))
    return
  if _WHAT.value == "image_encoder":
    print(json.dumps(bench_image_encoder()))
    return
  if _WHAT.value == "safety_checker":
    print(json.dumps(bench_safety_checker()))
    return
  if _WHAT.value == "programs":
    h, w = _size()
    for row in bench_programs():
      print(json.dumps(dict(arch=_ARCH.value, what="programs", batch=_BATCH.value, height=h,
                            width=w, steps=_STEPS.value, inline_networks=_INLINE.value,
                            **{k: round(v, 3) if isinstance(v, float) else v
                               for k, v in row.items()})))
    return
  if _BACKEND.value == "both":
    h, w = _size()
    for name, result in bench_both().items():
      print(json.dumps(dict(program=name, arch=_ARCH.value, what="unet_step", batch=_BATCH.value,
                            height=h, width=w, dtype="float32", torch_threads=torch_threads(),
                            date=time.strftime("%Y-%m-%d %H:%M"), **result)))
    return
  if _WHAT.value == "run":
    result = bench_run()
  elif _WHAT.value == "first_image":
    result = bench_first_image()
  elif _WHAT.value == "lora_merge":
    result = bench_lora_merge()
  elif _WHAT.value == "encode":
    result = bench_encode()
  elif _WHAT.value == "dynamic_prompts":
    result = bench_dynamic_prompts()
  elif _WHAT.value == "rng":
    result = bench_rng()
  elif _WHAT.value == "brownian":
    result = bench_brownian()
  else:
    result = bench_jax() if _BACKEND.value == "jax" else bench_torch()
  h, w = _size()
  result.update(arch=_ARCH.value, what=_WHAT.value, batch=_BATCH.value, height=h, width=w,
                dtype=_DTYPE.value, backend=_BACKEND.value,
                steps=_STEPS.value if _WHAT.value in ("generate", "brownian") else None)
  if _DEVICES.value is not None:
    result["cpu_devices"] = _DEVICES.value
  if _CFG_PARALLEL.value:
    result["cfg_parallel"] = True
  if _DECODE.value is not None:
    result["decode_latent_pixels"] = _DECODE.value
  if _WHAT.value == "generate":
    result["images_per_s"] = _BATCH.value / result["median_s"]
  if result["flops"]:
    result["tflops_per_s"] = result["flops"] / result["median_s"] / 1e12
    if _PEAK.value:
      result["mfu"] = result["tflops_per_s"] / _PEAK.value
  if _JSON.value:
    print(json.dumps(result))
    return
  for key, value in result.items():
    print(f"{key:>14}: {value:.4g}" if isinstance(value, float) else f"{key:>14}: {value}")


if __name__ == "__main__":
  sys.exit(app.run(main))
