#!/usr/bin/env bash
# The device calls behind results/ for issues 11, 13 and 16 (2 x H200, one command each; see results/NOTES.md).
#   bash scripts/gpu_calls.sh steady OUT   # GPU 0: main rows with the peer; GPU 1: the 8/4/2 GiB settings, profiles
#   bash scripts/gpu_calls.sh jobs OUT     # each script's default job, cold then warm (GPU 1: before_big)
#   bash scripts/gpu_calls.sh scale OUT    # 1 vs 2 processes, and before_big under FSDP: memory, smallest budget
# Each writes its JSON, logs and summaries under OUT; merge with `python benchmark.py --merge OUT/*.json`.
set -u
CALL=$1; OUT=$2; mkdir -p "$OUT"
export WANDB_MODE=offline PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # no NVLink multicast
on_gpu() {  # gpu, log name, command...: run in the background on one GPU
  local gpu=$1 log=$2; shift 2
  CUDA_VISIBLE_DEVICES=$gpu "$@" >"$OUT/$log.log" 2>&1 &
}
case $CALL in
steady)
  on_gpu 0 steady_main python benchmark.py --only main --runs \
    lightweight_small,lightweight_small-16gib,lightweight_small-24gib,lightweight_small-8gib,peer-run_clm,lightweight_big,lightweight_big-4gib,lightweight_big-2gib,reference_qlora \
    --out "$OUT/steady_main.json" --workdir /tmp/bench0
  on_gpu 1 steady_fast8 bash -c "python benchmark.py --only fast8 --out $OUT/steady_fast8.json --workdir /tmp/bench1 &&
    for s in lightweight_small lightweight_big; do python \$s.py --init random --wandb off --no-checkpoints \
      --max-steps 8 --output-dir /tmp/prof-\$s --profile $OUT/profile-\$s; done"
  wait ;;
jobs)
  on_gpu 0 jobs_small python benchmark.py --only job --runs job-before_small,job-lightweight_small,job-lightweight_big \
    --out "$OUT/jobs_small.json" --workdir /tmp/jobs0
  on_gpu 1 jobs_big python benchmark.py --only job --runs job-before_big --out "$OUT/jobs_big.json" --workdir /tmp/jobs1
  wait ;;
scale)
  python benchmark.py --only scale --out "$OUT/scale.json" --workdir /tmp/scale >"$OUT/scale.log" 2>&1
  FSDP="python -m accelerate.commands.launch --config_file configs/accelerate/fsdp.yaml --num_processes 2"
  ARGS="--init random --wandb off --no-checkpoints --micro-batch 1 --tokens-per-step 4096"
  $FSDP scripts/memory_breakdown.py "$OUT/fsdp-memory" -- before_big.py $ARGS --max-steps 3 \
    --output-dir /tmp/fsdp-memory >"$OUT/fsdp_memory.log" 2>&1
  for gib in ${BUDGETS:-16.5 17 17.5 18 19 20}; do  # the smallest per-GPU budget that trains 3 steps
    $FSDP before_big.py $ARGS --max-steps 3 --gpu-memory-gib "$gib" --output-dir "/tmp/fsdp-$gib" \
      >"$OUT/fsdp_budget_$gib.log" 2>&1 && { echo "trains at $gib GiB" >>"$OUT/fsdp_budget.txt"; break; }
    echo "out of memory (or failed) at $gib GiB" >>"$OUT/fsdp_budget.txt"
  done ;;
*) echo "usage: bash scripts/gpu_calls.sh steady|jobs|scale OUT" >&2; exit 2 ;;
esac
