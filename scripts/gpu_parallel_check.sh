#!/usr/bin/env bash
# The multi-process wiring on one GPU (issue 5): each launcher with one process, short runs, random init.
#   bash scripts/gpu_parallel_check.sh OUTDIR     # the log and a summary per run; runs write runs/parallel/<name>
# On a machine with N GPUs, set NPROC=N to run the same commands data-parallel; ONLY=name,name runs a subset.
set -u
OUT=${1:-runs/parallel}; mkdir -p "$OUT"; NPROC=${NPROC:-1}
export WANDB_MODE=offline
run() {  # name, launcher and script, flags...
  local name=$1; shift
  [ -n "${ONLY:-}" ] && [[ ",$ONLY," != *",$name,"* ]] && return
  echo "=== $name: $*" | tee -a "$OUT/parallel.log"
  "$@" --init random --output-dir "runs/parallel/$name" >>"$OUT/parallel.log" 2>&1
  echo "exit $?" | tee -a "$OUT/parallel.log"
  [ -f "runs/parallel/$name/summary.json" ] && python -c "import json; print(json.dumps({'name': '$name', **json.load(open('runs/parallel/$name/summary.json'))}))" >>"$OUT/summaries.jsonl"
}
TORCHRUN="python -m torch.distributed.run --standalone --nproc_per_node $NPROC"
ACCELERATE="python -m accelerate.commands.launch --num_processes $NPROC"
run ddp_lightweight_small $TORCHRUN lightweight_small.py --max-steps 12 --logging-steps 4
run ddp_lightweight_big $TORCHRUN lightweight_big.py --max-steps 6
run accelerate_before_small $ACCELERATE before_small.py --max-steps 3 --tokens-per-step 8192
run fsdp_before_big $ACCELERATE --config_file configs/accelerate/fsdp.yaml before_big.py --max-steps 3 --tokens-per-step 8192
