#!/bin/bash
# One device-machine session of benchmarks (see BENCHMARKS.md, GPU section).
#   bash tools/gpu_bench.sh OUTDIR [PARTS]
# PARTS (default "sdxl run sd15"), in the order of what the open issues still lack: sdxl (issues
# 13, 17: SDXL 1024x1024 bf16 vs diffusers fp16, ~6 min), run (issue 16: main.py vs the bare
# sampler on SD1.5-sized networks, ~5 min), sd15 (issue 17: SD1.5 MFU, ~6 min), compile (issue
# 17: diffusers fp16 with a max-autotune torch.compile'd channels_last UNet, SD1.5 batch 16; its
# compile alone may take minutes, so run it as its own command), lcm (4-step LCM sampling
# without CFG, LCM-LoRA's way, SD1.5 batch 16 vs diffusers fp16, ~2 min), rng (--rng
# torch_cpu's noise for 8 SDXL images x 31 draws against jax.random, ~20 s), safety (the safety
# checker, ViT-L/14, on 8 512x512 images vs diffusers', ~1 min), brownian (--brownian's tree
# for 8 SDXL images' 30 DPM++ SDE steps vs torchsde's on the GPU, ~1 min), upscaler (an
# R-ESRGAN 4x+ pass of a 512x512 image in A1111's 192-pixel tiles vs A1111's torch loop,
# float32, ~2 min), tome (token merging at ratio 0.5 against none, SD1.5 768x768 bf16 batch
# 8, ~2 min). A
# device command may run 10 minutes and a session has about 15 in all: pick the parts that fit,
# in this order.
# Needs diffusers (and importlib_metadata) as wheels in .whl/ where the image lacks them.
# SMOKE=1 (on a CPU, before a device session): every command at toy size (sdxl_small for sdxl's
# networks, 64x64, batch 1, 2 steps, 1 timed call, 4 images a run) to catch a flag or code path
# that no longer works (all parts but compile: about 15 min on 2 cores, 4 of them torch float16
# on a CPU, which is slow). Its numbers mean nothing.
set -u
OUTDIR=${1:-/tmp/gpu_bench}  # results.jsonl, gpu.txt and errors.log land here
PARTS=${2:-sdxl run sd15}
WORK=$(mktemp -d)
mkdir -p "$OUTDIR"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$OUTDIR/gpu.txt"
PEAK=989  # H100 SXM dense bf16/fp16 TFLOP/s (datasheet)
GEN_FLOPS=82.5e12  # per image: 50 steps x 2 (CFG) x 0.80 TFLOP UNet + 2.5 TFLOP VAE decode
bench() {  # label, then benchmark flags; T=seconds before it is stopped (default 240)
  local label=$1; shift
  if [[ -n "${SMOKE:-}" ]]; then
    local args=() a
    for a in "$@"; do [[ $a == sdxl ]] && args+=(sdxl_small) || args+=("$a"); done
    set -- "${args[@]}" --height 64 --width 64 --batch 1 --steps 2 --repeats 1 --images 4
  fi
  echo "== $label $*"
  if timeout "${T:-240}" python3 tools/benchmark.py --json --peak_tflops $PEAK "$@" \
      >"$WORK/$label.json" 2>"$WORK/$label.err"; then
    sed "s/^{/{\"label\": \"$label\", /" "$WORK/$label.json" | tee -a "$OUTDIR/results.jsonl"
  else
    echo "FAILED $label"; tail -4 "$WORK/$label.err"
    { echo "== $label"; tail -40 "$WORK/$label.err"; } >>"$OUTDIR/errors.log"
  fi
}
flops() { python3 -c "print($1 * $GEN_FLOPS)"; }
part() { [[ " $PARTS " == *" $1 "* ]]; }
if part sdxl; then
  # Per image: 30 steps x 13.52 TFLOP (UNet, CFG) + 10.47 TFLOP (VAE decode at 1024x1024).
  SDXL_FLOPS=416.1e12
  for b in 1 4; do
    bench "jax_sdxl_b$b" --arch sdxl --what generate --steps 30 --scheduler euler \
        --dtype bfloat16 --batch $b --repeats 2 --flops "$(python3 -c "print($b * $SDXL_FLOPS)")"
    bench "torch_sdxl_b$b" --backend torch --arch sdxl --what generate --steps 30 \
        --scheduler euler --dtype float16 --batch $b --repeats 1 \
        --flops "$(python3 -c "print($b * $SDXL_FLOPS)")"
  done
fi
if part run; then  # random SD1.5 weights written as a folder; main.py's loop vs the bare sampler
  for format in png webdataset; do
    T=360 bench "run_sd15_$format" --arch sd15 --what run --steps 20 --batch 8 --images 96 \
        --dtype bfloat16 --output_format $format
  done
fi
if part sd15; then
  for b in 16 32; do
    bench "jax_gen_b$b" --arch sd15 --what generate --steps 50 --dtype bfloat16 --batch $b \
        --repeats 2 --flops "$(flops $b)"
  done
  bench "torch_gen_b16" --backend torch --arch sd15 --what generate --steps 50 \
      --dtype float16 --batch 16 --repeats 2 --flops "$(flops 16)"
  # The VAE decode one image at a time (the default since 2026-12-02) against the whole batch.
  bench "jax_gen_b16_batch_decode" --arch sd15 --what generate --steps 50 --dtype bfloat16 \
      --batch 16 --repeats 2 --decode_latent_pixels 0 --flops "$(flops 16)"
fi
if part lcm; then  # few-step sampling: 4 LCM steps, no CFG pass (LCM-LoRA's settings)
  LCM_FLOPS=5.7e12  # per image: 4 steps x 0.80 TFLOP UNet + 2.5 TFLOP VAE decode
  bench "jax_lcm4_b16" --arch sd15 --what generate --steps 4 --scheduler lcm --guidance_scale 1 \
      --dtype bfloat16 --batch 16 --repeats 3 --flops "$(python3 -c "print(16 * $LCM_FLOPS)")"
  bench "torch_lcm4_b16" --backend torch --arch sd15 --what generate --steps 4 --scheduler lcm \
      --guidance_scale 1 --dtype float16 --batch 16 --repeats 3 \
      --flops "$(python3 -c "print(16 * $LCM_FLOPS)")"
fi
if part rng; then  # --rng torch_cpu's noise: torch's MT19937 scanned on device vs jax.random
  T=90 bench "rng_sdxl_b8" --what rng --arch sdxl --batch 8 --steps 30 --repeats 5
fi
if part brownian; then  # --brownian's tree for 8 SDXL images, 30 DPM++ SDE steps, vs torchsde
  T=120 bench "brownian_sdxl_b8" --what brownian --arch sdxl --batch 8 --steps 30 --repeats 3
fi
if part safety; then  # --safety_checker's cost per batch: sdjax vs diffusers on the same GPU
  T=150 bench "safety_b8" --what safety_checker --arch sd15 --batch 8 --repeats 5
fi
if part upscaler; then  # a hires fix's R-ESRGAN 4x+ pass (512 -> 2048): sdjax vs A1111's loop
  T=200 bench "upscaler_512" --what upscaler --batch 1 --height 512 --width 512 \
      --upscaler_tile 192 --repeats 3
fi
if part tome; then  # --token_merging_ratio 0.5 against 0: SD1.5 bf16 generate at 768x768
  for r in 0 0.5; do
    bench "jax_sd15_768_tome$r" --arch sd15 --what generate --steps 30 --dtype bfloat16 \
        --batch 8 --height 768 --width 768 --token_merging_ratio $r --repeats 2
  done
fi
if part compile; then  # the strongest PyTorch baseline the issue names
  T=580 bench "torch_compiled_gen_b16" --backend torch --arch sd15 --what generate --steps 50 \
      --dtype float16 --batch 16 --repeats 2 --torch_compile max-autotune --flops "$(flops 16)"
fi
python3 - "$OUTDIR/results.jsonl" <<'PY'
import json, sys
for line in open(sys.argv[1]):
  r = json.loads(line)
  print(f"{r['label']:>22} {r.get('median_s', 0):8.3f}s {r.get('images_per_s', 0):7.2f} img/s "
        f"{r.get('tflops_per_s', 0):7.1f} TFLOP/s mfu {r.get('mfu', 0):.3f} "
        f"compile {r.get('compile_s', 0):.1f}s peak {r.get('peak_bytes', 0) / 2**30:.1f} GiB"
        + (f" main.py/bare {r['run_vs_bare']:.3f}" if "run_vs_bare" in r else ""))
PY
