#!/bin/bash
# One device-machine session: train the built-in shapes model, judge it there, bring it back.
#   bash tools/gpu_train.sh OUTDIR [train_tiny.py flags...]
#   bash tools/gpu_train.sh /tmp/out --config configs/train_tiny.py:gpu   # the GPU-sized recipe
# OUTDIR gets model.tar.gz (the exported folder and each stage's metrics.jsonl), train.log and
# eval.jsonl (VAE round trip, then held-out prompts at two settings, selection seed 1: the
# reported numbers come from tools/eval_tiny.py's own seed afterwards). ml_collections (and
# anything else the image lacks) travels as wheels in .whl/.
set -u
OUTDIR=${1:-/tmp/gpu_train}; shift
mkdir -p "$OUTDIR"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1 TQDM_MININTERVAL=20
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null
WORK=$(mktemp -d)
python3 tools/train_tiny.py --workdir "$WORK/train" --output "$WORK/model" "$@" \
    2>&1 | grep -v -E "^I[0-9]{4}|tpu" | tee "$OUTDIR/train.log"
ev() { python3 tools/eval_tiny.py --model "$WORK/model" --seed 1 --json "$@" 2>/dev/null |
       tee -a "$OUTDIR/eval.jsonl"; }
ev --vae 1024
ev
ev --steps 20 --guidance_scale 4
cp "$WORK/train/sdjax_training.json" "$OUTDIR/" 2>/dev/null
tar -czf "$OUTDIR/model.tar.gz" -C "$WORK" model $(cd "$WORK" && ls train/*/metrics.jsonl)
ls -la "$OUTDIR"
