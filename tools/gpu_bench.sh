#!/bin/bash
# One device-machine session of benchmarks (see BENCHMARKS.md, GPU section).
#   bash tools/gpu_bench.sh OUTDIR
# Needs diffusers (and importlib_metadata) as wheels in .whl/ where the image lacks them.
set -u
OUTDIR=${1:-/tmp/gpu_bench}  # results.jsonl, gpu.txt and errors.log land here
WORK=$(mktemp -d)
mkdir -p "$OUTDIR"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUTDIR/gpu.txt"
PEAK=989  # H100 SXM dense bf16/fp16 TFLOP/s (datasheet)
GEN_FLOPS=82.5e12  # per image: 50 steps x 2 (CFG) x 0.80 TFLOP UNet + 2.5 TFLOP VAE decode
bench() {  # label, then benchmark flags
  local label=$1; shift
  echo "== $label $*"
  if timeout 240 python3 tools/benchmark.py --json --peak_tflops $PEAK "$@" \
      >"$WORK/$label.json" 2>"$WORK/$label.err"; then
    sed "s/^{/{\"label\": \"$label\", /" "$WORK/$label.json" | tee -a "$OUTDIR/results.jsonl"
  else
    echo "FAILED $label"; tail -4 "$WORK/$label.err"
    { echo "== $label"; tail -40 "$WORK/$label.err"; } >>"$OUTDIR/errors.log"
  fi
}
flops() { python3 -c "print($1 * $GEN_FLOPS)"; }
for b in 8 32 1; do
  r=3; [ "$b" = 32 ] && r=2
  bench "jax_gen_b$b" --arch sd15 --what generate --steps 50 --dtype bfloat16 --batch $b \
      --repeats $r --flops "$(flops $b)"
  bench "torch_gen_b$b" --backend torch --arch sd15 --what generate --steps 50 --dtype float16 \
      --batch $b --repeats $r --flops "$(flops $b)"
done
# Attention kernels on the UNet step (batch 16 = 8 images with CFG).
for k in cudnn xla einsum; do
  SDJAX_ATTENTION=$k bench "jax_unet_b16_$k" --arch sd15 --what unet_step --dtype bfloat16 \
      --batch 16 --repeats 10 --flops 12.8e12
done
bench "torch_unet_b16" --backend torch --arch sd15 --what unet_step --dtype float16 --batch 16 \
    --repeats 10 --flops 12.8e12
python3 - "$OUTDIR/results.jsonl" <<'PY'
import json, sys
for line in open(sys.argv[1]):
  r = json.loads(line)
  print(f"{r['label']:>22} {r['median_s']:8.3f}s {r.get('images_per_s', 0):7.2f} img/s "
        f"{r.get('tflops_per_s', 0):7.1f} TFLOP/s mfu {r.get('mfu', 0):.3f} "
        f"compile {r['compile_s']:.1f}s peak {r['peak_bytes'] / 2**30:.1f} GiB")
PY
