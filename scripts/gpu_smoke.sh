#!/usr/bin/env bash
# Short runs of the four scripts on the random-init path (issue 2's GPU check).
#   bash scripts/gpu_smoke.sh OUTDIR
set -u
OUT=${1:-runs/smoke}; mkdir -p "$OUT"
export WANDB_MODE=offline
run() {  # name, script, flags...
  local name=$1; shift
  echo "=== $name: python $* " | tee -a "$OUT/smoke.log"
  python "$@" --init random --output-dir "runs/smoke/$name" >>"$OUT/smoke.log" 2>&1
  echo "exit $?" | tee -a "$OUT/smoke.log"
  [ -f "runs/smoke/$name/summary.json" ] && python -c "import json,sys; print(json.dumps({'name': '$name', **json.load(open('runs/smoke/$name/summary.json'))}))" >>"$OUT/summaries.jsonl"
}
run before_small before_small.py --max-steps 6
run lightweight_small lightweight_small.py --max-steps 12
run lightweight_big_4gib lightweight_big.py --max-steps 8 --gpu-memory-gib 4
run before_big_16gib before_big.py --max-steps 4 --gpu-memory-gib 16
run lightweight_big lightweight_big.py --max-steps 8
