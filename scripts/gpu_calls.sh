#!/usr/bin/env bash
# The device calls behind results/ for issues 11, 13 and 16 (2 x H200, one command each; see results/NOTES.md).
#   bash scripts/gpu_calls.sh steady OUT   # GPU 0: main rows with the peer; GPU 1: GPU loss tests, the 8 GiB
#                                          # settings, a profile of lightweight_big
#   bash scripts/gpu_calls.sh alone OUT    # the compared steady rows on one GPU, nothing beside them; gc_paused
#                                          # off and on at the main row's settings
#   bash scripts/gpu_calls.sh jobs OUT     # each script's default job, cold then warm (GPU 1: before_big); the
#                                          # small job with gc_paused off
#   bash scripts/gpu_calls.sh scale OUT    # 1 vs 2 processes, README's torchrun command, and before_big under FSDP:
#                                          # memory, smallest budget (FSDP_BUDGET=no skips these two)
#   bash scripts/gpu_calls.sh leads OUT    # session 6's exploratory runs (call 21)
#   bash scripts/gpu_calls.sh rows_and_jobs OUT  # session 7's last call (call 32): the four jobs, the small rows,
#                                                # lightweight_big at 4 GiB with gc_paused off and on
#   bash scripts/gpu_calls.sh final OUT    # session 8 (call 35): the four jobs (GPU 0 median of 3 warm runs; GPU 1
#                                          # before_big), then on GPU 1 lightweight_small's rows with the peer
#   bash scripts/gpu_calls.sh rows9 OUT    # session 9 (call 36): GPU 0 the rows issues 13 and 16 compare (small
#                                          # rows at 64 steps, the peer, 16 GiB, lightweight_big's budgets); GPU 1
#                                          # their A/B twins, then profiles of the rows that miss their targets
#   bash scripts/gpu_calls.sh alone9 OUT   # session 9 (call 38), one H200: the 16 GiB row with step_overlap on and
#                                          # off; the 8 GiB 20-layer row with and without offload_checkpoints
#   bash scripts/gpu_calls.sh budgets9 OUT # session 9 (call 39), one H200: lightweight_small under 16 and 8 GiB with
#                                          # checkpoint_to_fit on and off
#   bash scripts/gpu_calls.sh hosts11 OUT  # next session's, not run: 2 processes' slower hosts; torchrun --numa-binding
#   bash scripts/gpu_calls.sh stall11 OUT  # next session's, not run (one H200): call 44's stalled step 10
#   bash scripts/gpu_calls.sh chunks10 OUT # session 10 (call 42): liger's chunks, wider vs its default, 1 and 2 GPUs
#   bash scripts/gpu_calls.sh ddp10 OUT    # session 10 (call 41, commit 2abddaf's tree): 1 and 2 GPUs profiled, DDP
#                                          # settings compared (their environment knobs were removed after it)
#   bash scripts/gpu_calls.sh ddp9 OUT     # session 10 (call 40; was session 9's lead): lightweight_small on 1 and 2 GPUs logged
#                                          # every step and every 5, and a profile of each
#   bash scripts/gpu_calls.sh offload OUT  # session 8 (call 33): the compared steady rows on GPU 0 alone, with
#                                          # offload_checkpoints off at 4 and 2 GiB; profiles of lightweight_small's
#                                          # steps 9-10 (the slow window) and of lightweight_big under 4 GiB
# Each writes its JSON, logs and summaries under OUT; merge with `python benchmark.py --merge OUT/*.json`.
set -u
CALL=$1; OUT=$2; mkdir -p "$OUT"
export WANDB_MODE=offline PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # no NVLink multicast
on_gpu() {  # gpu, log name, command...: run in the background on one GPU
  local gpu=$1 log=$2; shift 2
  CUDA_VISIBLE_DEVICES=$gpu "$@" >"$OUT/$log.log" 2>&1 &
}
small_row() {  # row name, tree, processes, torchrun options...: lightweight_small with $ROW_ARGS; one line of
  # rows.txt (steady tokens/s, peak GiB, final train and eval loss) and its metrics.jsonl
  local name=$1 tree=$2 n=$3; shift 3
  (cd "$tree" && torchrun --standalone --nproc_per_node "$n" "$@" lightweight_small.py $ROW_ARGS \
    --output-dir "/tmp/row-$name" >"$OUT/$name.log" 2>&1)
  cp "/tmp/row-$name/metrics.jsonl" "$OUT/${name}_metrics.jsonl"
  python -c "import json; d = json.load(open('/tmp/row-$name/summary.json')); print('$name', *(d.get(k) for k in
    ('steady_tokens_per_second', 'peak_memory_gib', 'final_train_loss', 'final_eval_loss')))" >>"$OUT/rows.txt"
}
default_chunks_copy() {  # /tmp/default-chunks: this tree with liger's default chunks of logits (harness/loss.py)
  rm -rf /tmp/default-chunks && cp -r . /tmp/default-chunks
  sed -i 's/^LIGER_CHUNKS_AS_FOR_WIDTH = 2048$/LIGER_CHUNKS_AS_FOR_WIDTH = 1/' /tmp/default-chunks/harness/loss.py
  grep -q '^LIGER_CHUNKS_AS_FOR_WIDTH = 1$' /tmp/default-chunks/harness/loss.py \
    || { echo "the copy kept the new chunks" >&2; exit 1; }
}
case $CALL in
steady)
  on_gpu 0 steady_main python benchmark.py --only main --runs \
    lightweight_small,lightweight_small-16gib,lightweight_small-24gib,lightweight_small-8gib,peer-run_clm,lightweight_big,lightweight_big-4gib,lightweight_big-2gib,reference_qlora \
    --out "$OUT/steady_main.json" --workdir /tmp/bench0
  on_gpu 1 steady_fast8 bash -c "python -m pytest -q tests/test_models.py -k 'fused or padded';
    python benchmark.py --only fast8 --out $OUT/steady_fast8.json --workdir /tmp/bench1 &&
    python lightweight_big.py --init random --wandb off --no-checkpoints --max-steps 8 --output-dir /tmp/prof-big \
      --profile $OUT/profile-lightweight_big"
  wait ;;
jobs)  # GPU 0, after its jobs: the GPU tests, and an out-of-memory run's line (it names the micro-batch that fits)
  # GPU 0: each warm job three times, the median kept (--job-warm-runs 3; calls 23-32 ran it once); before_big once:
  # its 173-177 s moved by 2% over calls 23, 30 and 32
  on_gpu 0 jobs_small bash -c "python benchmark.py --only job --runs job-before_small,job-lightweight_small,job-lightweight_big \
    --job-warm-runs 3 --out $OUT/jobs_small.json --workdir /tmp/jobs0; python -m pytest -q tests/test_models.py -k 'fused or padded';
    python lightweight_small.py --init random --wandb off --no-checkpoints --max-steps 2 --micro-batch 32 \
      --gpu-memory-gib 16 --output-dir /tmp/oom16; echo exit \$?"
  on_gpu 1 jobs_big python benchmark.py --only job --runs job-before_big --out "$OUT/jobs_big.json" --workdir /tmp/jobs1
  wait
  # gc_paused's share of the small job: the warm job again with it off, twice (the first remembers its own trial
  # peaks, since the recipe changed), wall clock from outside as benchmark_jobs.py takes it
  C=/tmp/jobs0/job-cache-lightweight_small
  for i in 1 2; do
    s=$(date +%s.%N)
    CUDA_VISIBLE_DEVICES=0 TORCHINDUCTOR_CACHE_DIR=$C/inductor TRITON_CACHE_DIR=$C/triton python lightweight_small.py \
      --init random --off gc_paused --output-dir /tmp/job-nogc --cache-dir $C >"$OUT/job_nogc_$i.log" 2>&1
    echo "job lightweight_small --off gc_paused, run $i: exit $? in $(python -c "print(round($(date +%s.%N) - $s, 2))") s" \
      | tee -a "$OUT/job_nogc.txt"
    cp /tmp/job-nogc/summary.json "$OUT/job_nogc_${i}_summary.json"
  done ;;
alone)  # the compared steady rows on GPU 0 with nothing beside them (call 20): the host's CPUs are not shared
  CUDA_VISIBLE_DEVICES=0 python benchmark.py --only main,fast8 --runs \
    lightweight_small,lightweight_small-16gib,peer-run_clm,lightweight_big,lightweight_big-8gib-ckpt24,lightweight_big-8gib-ckpt20,lightweight_big-4gib,lightweight_big-2gib,reference_qlora \
    --out "$OUT/alone.json" --workdir /tmp/alone >"$OUT/alone.log" 2>&1
  # gc_paused at the main row's settings, off then on, each after the same warm-up run (NOTES.md, session 7)
  Q="--init random --wandb off --no-checkpoints --max-steps 30 --logging-steps 5"
  for gc in off on; do
    sw=(); [ $gc = off ] && sw=(--off gc_paused)
    CUDA_VISIBLE_DEVICES=0 python lightweight_small.py $Q --max-steps 2 --eval-every 1 "${sw[@]}" --output-dir /tmp/w \
      >/dev/null 2>&1
    CUDA_VISIBLE_DEVICES=0 python lightweight_small.py $Q "${sw[@]}" --output-dir "/tmp/gc-$gc" >"$OUT/gc_$gc.log" 2>&1
    cp "/tmp/gc-$gc/summary.json" "$OUT/gc_${gc}_summary.json"; cp "/tmp/gc-$gc/metrics.jsonl" "$OUT/gc_${gc}_metrics.jsonl"
  done ;;
rows_and_jobs)  # session 7's last call: GPU 1 before_big's job; GPU 0 the other three jobs, then the small model's
  # compared rows, then lightweight_big under 4 GiB with gc_paused off and on (NOTES.md, call 32)
  on_gpu 1 jobs_big python benchmark.py --only job --runs job-before_big --out "$OUT/jobs_big.json" --workdir /tmp/jobs1
  on_gpu 0 gpu0 bash -c "python benchmark.py --only job --runs job-before_small,job-lightweight_small,job-lightweight_big \
    --out $OUT/jobs_small.json --workdir /tmp/jobs0; python benchmark.py --only main,fast8 --runs \
    lightweight_small,peer-run_clm,lightweight_small-16gib --out $OUT/rows.json --workdir /tmp/rows
    for gc in off on; do sw=''; [ \$gc = off ] && sw='--off gc_paused'
      python lightweight_big.py --init random --wandb off --no-checkpoints --max-steps 12 --gpu-memory-gib 4 \$sw \
        --output-dir /tmp/big4-\$gc; cp /tmp/big4-\$gc/summary.json $OUT/big4_gc_\${gc}_summary.json; done"
  wait ;;
rows9)  # session 9 (call 36): GPU 0 the rows issues 13 and 16 compare; GPU 1 beside it the A/B twins of the
  # budget rows (offload_checkpoints, step_overlap; 2 GiB again), then profiles of the rows that miss their targets
  on_gpu 0 rows python benchmark.py --only main,fast8,ablation_small --runs \
    lightweight_small,peer-run_clm,lightweight_small-16gib,lightweight_small-no-step_overlap,lightweight_big,lightweight_big-8gib-ckpt24,lightweight_big-8gib-ckpt20,lightweight_big-4gib,lightweight_big-2gib,reference_qlora \
    --out "$OUT/rows.json" --workdir /tmp/rows
  on_gpu 1 twins bash -c "python benchmark.py --only main,split_step --runs \
    lightweight_big-2gib-no-offload_checkpoints,lightweight_big-2gib,lightweight_big-2gib-no-step_overlap,lightweight_big-4gib-no-offload_checkpoints,lightweight_big-4gib-no-step_overlap,lightweight_big-8gib-ckpt20-no-offload_checkpoints \
      --out $OUT/twins.json --workdir /tmp/twins
    Q='--init random --wandb off --no-checkpoints'
    python lightweight_big.py \$Q --max-steps 8 --gpu-memory-gib 2 --profile $OUT/profile-big2 --output-dir /tmp/pb2
    python lightweight_big.py \$Q --max-steps 8 --gpu-memory-gib 8 --profile $OUT/profile-big8 --output-dir /tmp/pb8
    python lightweight_small.py \$Q --max-steps 64 --logging-steps 5 --output-dir /tmp/ps-warm
    python lightweight_small.py \$Q --max-steps 64 --logging-steps 5 --profile $OUT/profile-small --profile-first 40 \
      --output-dir /tmp/ps"
  wait
  rm -f "$OUT"/profile-*/trace.json.gz
  tar -czf "$OUT/logs.tgz" -C "$OUT" rows.log twins.log profile-big2 profile-big8 profile-small \
    && rm -rf "$OUT"/*.log "$OUT"/profile-* ;;  # few files come back from the device
final)  # session 8's last call (NOTES.md, call 35): the four jobs, then the small model's compared rows on GPU 1
  on_gpu 0 jobs_small python benchmark.py --only job --runs job-before_small,job-lightweight_small,job-lightweight_big \
    --job-warm-runs 3 --out "$OUT/jobs_small.json" --workdir /tmp/jobs0
  on_gpu 1 gpu1 bash -c "python benchmark.py --only job --runs job-before_big --out $OUT/jobs_big.json --workdir /tmp/jobs1
    python benchmark.py --only main,ablation_small --runs lightweight_small,peer-run_clm,lightweight_small-no-compile \
      --out $OUT/rows.json --workdir /tmp/rows"
  wait
  tar -czf "$OUT/logs.tgz" -C "$OUT" jobs_small.log gpu1.log ;;
alone9)  # session 9 (call 38): one H200, nothing beside it: the 16 GiB row (and step_overlap off there), and the
  # 8 GiB 20-layer row with and without offload_checkpoints one after the other (call 36 ran them on two GPUs)
  python benchmark.py --only main,fast8,split_step --runs \
    lightweight_small-16gib,lightweight_big-8gib-ckpt20,lightweight_big-8gib-ckpt20-no-offload_checkpoints \
    --out "$OUT/alone.json" --workdir /tmp/alone >"$OUT/alone.log" 2>&1
  python lightweight_small.py --init random --wandb off --no-checkpoints --max-steps 64 --logging-steps 5 \
    --gpu-memory-gib 16 --off step_overlap --output-dir /tmp/small16-nso >>"$OUT/alone.log" 2>&1
  cp /tmp/small16-nso/summary.json "$OUT/small16_no_step_overlap_summary.json"
  gzip "$OUT/alone.log" ;;
budgets9)  # session 9 (call 39): one H200: lightweight_small under 16 and 8 GiB, checkpoint_to_fit on and off
  python benchmark.py --only main,split_step --runs \
    lightweight_small-16gib,lightweight_small-8gib,lightweight_small-16gib-no-checkpoint_to_fit,lightweight_small-8gib-no-checkpoint_to_fit \
    --out "$OUT/budgets.json" --workdir /tmp/budgets >"$OUT/budgets.log" 2>&1
  gzip "$OUT/budgets.log" ;;
ddp9)  # issue 11's lead, run in session 10 as call 40 (2 x H200): lightweight_small on 1 and 2 GPUs logged every 5 steps (how much of
  # the 1.86x is the per-step log's synchronization), and steps 40-41 of each profiled (rank 0's view)
  A="--init random --wandb off --no-checkpoints --tokens-per-step 65536 --max-steps 64 --eval-every 64"
  for n in 1 2; do
    torchrun --standalone --nproc_per_node $n lightweight_small.py $A --output-dir /tmp/ddp-warm >/dev/null 2>&1
    for log in 1 5; do
      torchrun --standalone --nproc_per_node $n lightweight_small.py $A --logging-steps $log --output-dir /tmp/ddp$n-$log \
        >"$OUT/ddp${n}_log$log.log" 2>&1
      cp /tmp/ddp$n-$log/summary.json "$OUT/ddp${n}_log${log}_summary.json"
    done
    torchrun --standalone --nproc_per_node $n lightweight_small.py $A --logging-steps 1 --profile "$OUT/profile-ddp$n" \
      --profile-first 40 --output-dir /tmp/ddp$n-prof >"$OUT/ddp${n}_profile.log" 2>&1
  done
  rm -f "$OUT"/profile-*/trace.json.gz
  tar -czf /tmp/logs.tgz -C "$OUT" --exclude "*_summary.json" . && mv /tmp/logs.tgz "$OUT/" \
    && rm -rf "$OUT"/*.log "$OUT"/profile-* ;;  # few files come back from the device
ddp10)  # session 10 (call 41, 2 x H200): where a 2-GPU step's extra time goes (steps 40-41 of 1 and 2 processes
  # profiled, traces read by scripts/trace_streams.py), and DDP's settings against it, one row after another.
  # The settings came from environment knobs (LWF_DDP_*) in commit 2abddaf's harness/measure.py, removed since:
  grep -q LWF_DDP_ harness/measure.py || { echo "ddp10 needs commit 2abddaf's tree (its DDP knobs are gone)" >&2; exit 2; }
  ROW_ARGS="--init random --wandb off --no-checkpoints --tokens-per-step 65536 --max-steps 64 --eval-every 64 --logging-steps 1"
  for n in 1 2; do  # compile caches, then steps 40-41 profiled
    torchrun --standalone --nproc_per_node $n lightweight_small.py $ROW_ARGS --output-dir /tmp/d10-warm >/dev/null 2>&1
    torchrun --standalone --nproc_per_node $n lightweight_small.py $ROW_ARGS --profile "$OUT/profile-ddp$n" --profile-first 40 \
      --output-dir /tmp/d10-prof$n >"$OUT/profile_ddp$n.log" 2>&1
    python scripts/trace_streams.py "$OUT/profile-ddp$n/trace.json.gz" >"$OUT/streams_ddp$n.md" 2>&1
  done
  small_row 1gpu . 1
  small_row 2gpu . 2
  LWF_DDP_BUCKET_MB=100 small_row 2gpu-bucket100 . 2  # the setting is in the function's environment
  LWF_DDP_BUCKET_MB=400 small_row 2gpu-bucket400 . 2
  LWF_DDP_STATIC_GRAPH=1 small_row 2gpu-static . 2
  LWF_DDP_COMM_HOOK=bf16 small_row 2gpu-bf16hook . 2
  NCCL_MAX_NCHANNELS=8 small_row 2gpu-nccl8ch . 2
  small_row 1gpu-again . 1
  small_row 2gpu-again . 2
  tar -czf /tmp/traces.tgz -C "$OUT" profile-ddp1/trace.json.gz profile-ddp2/trace.json.gz && mv /tmp/traces.tgz "$OUT/"
  rm -f "$OUT"/profile-*/trace.json.gz
  tar -czf /tmp/logs.tgz -C "$OUT" --exclude traces.tgz --exclude rows.txt --exclude "streams_*" . \
    && mv /tmp/logs.tgz "$OUT/" && rm -rf "$OUT"/*.log "$OUT"/*_metrics.jsonl "$OUT"/profile-* ;;
chunks10)  # session 10 (call 42, 2 x H200): liger's chunks of logits as for a 2048-wide output (harness/loss.py)
  # against its default (a copy of the tree with LIGER_CHUNKS_AS_FOR_WIDTH = 1;
  # commit 097b747 named it LOSS_CHUNK_WIDTH), on 1 and 2 GPUs, one row after another;
  # the fused-loss GPU tests; steps 40-41 of 2 processes profiled
  python -m pytest -q tests/test_models.py -k 'fused or padded' >"$OUT/gpu_tests.log" 2>&1
  echo "exit $?" >>"$OUT/gpu_tests.log"
  ROW_ARGS="--init random --wandb off --no-checkpoints --tokens-per-step 65536 --max-steps 64 --eval-every 64 --logging-steps 1"
  for n in 1 2; do
    torchrun --standalone --nproc_per_node $n lightweight_small.py $ROW_ARGS --output-dir /tmp/c10-warm >/dev/null 2>&1
  done
  default_chunks_copy
  small_row default-1gpu /tmp/default-chunks 1
  small_row wide-1gpu . 1
  small_row default-2gpu /tmp/default-chunks 2
  small_row wide-2gpu . 2
  small_row default-2gpu-again /tmp/default-chunks 2
  small_row wide-2gpu-again . 2
  small_row wide-1gpu-again . 1
  torchrun --standalone --nproc_per_node 2 lightweight_small.py $ROW_ARGS --profile "$OUT/profile-wide2" --profile-first 40 \
    --output-dir /tmp/c10-prof >"$OUT/profile_wide2.log" 2>&1
  python scripts/trace_streams.py "$OUT/profile-wide2/trace.json.gz" >"$OUT/streams_wide2.md" 2>&1
  mv "$OUT/profile-wide2/trace.json.gz" /tmp/trace_wide2.json.gz
  tar -czf /tmp/logs.tgz -C "$OUT" --exclude rows.txt --exclude "streams_*" . && mv /tmp/logs.tgz "$OUT/" \
    && rm -rf "$OUT"/*.log "$OUT"/*_metrics.jsonl "$OUT"/profile-* && mv /tmp/trace_wide2.json.gz "$OUT/" ;;
hosts11)  # for the next session, not run (2 x H200, about 6 min): why each host op ran ~1.6x slower with two
  # processes (call 41), and torchrun's --numa-binding against it; lightweight_small as call 42's rows
  { lscpu; nvidia-smi topo -m; cat /sys/fs/cgroup/cpu.max; nproc; command -v numactl; } >"$OUT/host.txt" 2>&1
  ROW_ARGS="--init random --wandb off --no-checkpoints --tokens-per-step 65536 --max-steps 64 --eval-every 64 --logging-steps 1"
  for n in 1 2; do
    torchrun --standalone --nproc_per_node $n lightweight_small.py $ROW_ARGS --output-dir /tmp/h11-warm >/dev/null 2>&1
  done
  small_row 1gpu . 1
  small_row 2gpu . 2
  small_row 2gpu-numa-node . 2 --numa-binding node
  small_row 2gpu-numa-exclusive . 2 --numa-binding exclusive
  small_row 2gpu-again . 2
  small_row 1gpu-numa-node . 1 --numa-binding node
  small_row 1gpu-again . 1
  tar -czf /tmp/logs.tgz -C "$OUT" --exclude rows.txt --exclude host.txt . && mv /tmp/logs.tgz "$OUT/" \
    && rm -f "$OUT"/*.log "$OUT"/*_metrics.jsonl ;;
stall11)  # for the next session, not run (one H200, about 4 min): call 44's stalled step 10 (0.55 s, an epoch's end)
  # and slow first evaluation; the benchmark's lightweight_small row logged every step, larger and default chunks
  ROW_ARGS="--init random --wandb off --no-checkpoints --max-steps 64 --logging-steps 1"
  torchrun --standalone --nproc_per_node 1 lightweight_small.py $ROW_ARGS --output-dir /tmp/s11-warm >/dev/null 2>&1
  default_chunks_copy
  for i in 1 2; do small_row "wide-$i" . 1; small_row "default-$i" /tmp/default-chunks 1; done
  for f in /tmp/row-*/summary.json; do  # the per-step times of each row (CUDA events, read after training)
    python -c "import json, sys; print(sys.argv[1], json.load(open(sys.argv[1]))['step_seconds_timeline'])" "$f"
  done >"$OUT/step_seconds.txt"
  tar -czf /tmp/logs.tgz -C "$OUT" --exclude rows.txt --exclude step_seconds.txt . && mv /tmp/logs.tgz "$OUT/" \
    && rm -f "$OUT"/*.log "$OUT"/*_metrics.jsonl ;;
offload)  # session 8: the compared steady rows on GPU 0 with nothing beside them (NOTES.md, call 33)
  export CUDA_VISIBLE_DEVICES=0
  python -c "import inspect, torch.autograd.graph as g; print(inspect.getsource(g.save_on_cpu))" >"$OUT/save_on_cpu.txt"
  python benchmark.py --only main,fast8,split_step --runs \
    lightweight_small,lightweight_small-16gib,peer-run_clm,lightweight_big,lightweight_big-8gib-ckpt24,lightweight_big-8gib-ckpt20,lightweight_big-4gib,lightweight_big-2gib,reference_qlora,lightweight_big-4gib-no-offload_checkpoints,lightweight_big-2gib-no-offload_checkpoints \
    --out "$OUT/rows.json" --workdir /tmp/rows >"$OUT/rows.log" 2>&1
  # the slow window: the row's command logged every step, then with steps 9-10 profiled, each after the warm-up
  Q="--init random --wandb off --no-checkpoints --max-steps 30"
  for run in log1 profile9; do
    python lightweight_small.py $Q --max-steps 2 --eval-every 1 --output-dir /tmp/w >/dev/null 2>&1
    extra=(); [ $run = profile9 ] && extra=(--profile "$OUT/profile-small-9" --profile-first 9)
    python lightweight_small.py $Q --logging-steps 1 "${extra[@]}" --output-dir "/tmp/$run" >"$OUT/small_$run.log" 2>&1
    cp "/tmp/$run/metrics.jsonl" "$OUT/small_${run}_metrics.jsonl"
  done
  python lightweight_big.py $Q --max-steps 8 --gpu-memory-gib 4 --profile "$OUT/profile-big4" --output-dir /tmp/big4 \
    >"$OUT/big4_profile.log" 2>&1
  rm -f "$OUT"/profile-*/trace.json.gz
  tar -czf "$OUT/logs.tgz" -C "$OUT" --exclude logs.tgz --exclude rows.json . ;;
leads)  # session 6's leads on GPU 0 alone (results/NOTES.md, call 21): the small job's setup parts; lightweight_big at
  # one micro-batch of 32 per step, uncapped and under 8 GiB; lightweight_small's slow window without the first eval
  export CUDA_VISIBLE_DEVICES=0
  Q="--init random --wandb off --no-checkpoints"
  for k in cold warm; do  # the default job as a user runs it (W&B offline), cold compile cache then warm
    python lightweight_small.py --init random --output-dir "/tmp/job-small-$k" --cache-dir /tmp/leads-cache \
      >"$OUT/job_small_$k.log" 2>&1; cp "/tmp/job-small-$k/summary.json" "$OUT/job_small_${k}_summary.json"
  done
  for budget in 0 8; do  # 0: uncapped
    cap=(); [ "$budget" != 0 ] && cap=(--gpu-memory-gib "$budget")
    python lightweight_big.py $Q --max-steps 12 --logging-steps 1 --micro-batch 32 "${cap[@]}" \
      --output-dir "/tmp/big32-$budget" >"$OUT/big32_$budget.log" 2>&1
    cp "/tmp/big32-$budget/summary.json" "$OUT/big32_${budget}_summary.json"; cp "/tmp/big32-$budget/metrics.jsonl" "$OUT/big32_${budget}_metrics.jsonl"
  done
  for every in 8 30; do  # 8: the benchmark's (30 steps / 4); 30: no evaluation before the end
    python lightweight_small.py $Q --max-steps 30 --logging-steps 1 --eval-every "$every" --output-dir "/tmp/small-eval$every" \
      >"$OUT/small_eval$every.log" 2>&1
    cp "/tmp/small-eval$every/metrics.jsonl" "$OUT/small_eval${every}_metrics.jsonl"; cp "/tmp/small-eval$every/summary.json" "$OUT/small_eval${every}_summary.json"
  done ;;
scale)
  python benchmark.py --only scale --out "$OUT/scale.json" --workdir /tmp/scale >"$OUT/scale.log" 2>&1
  # README's command as written (the default job on 2 GPUs); then before_big's FSDP memory and smallest budget
  torchrun --nproc_per_node 2 lightweight_small.py >"$OUT/readme_torchrun.log" 2>&1; echo "exit $?" >>"$OUT/readme_torchrun.log"
  [ "${FSDP_BUDGET:-yes}" = yes ] || exit 0  # FSDP_BUDGET=no: skip the memory breakdown and the budget search
  FSDP="python -m accelerate.commands.launch --config_file configs/accelerate/fsdp.yaml --num_processes 2"
  ARGS="--init random --wandb off --no-checkpoints --micro-batch 1 --tokens-per-step 4096"
  TORCH_ELASTIC_SHUTDOWN_TIMEOUT=60 $FSDP scripts/memory_breakdown.py "$OUT/fsdp-memory" -- before_big.py $ARGS \
    --max-steps 3 --gpu-memory-gib 16 --output-dir /tmp/fsdp-memory >"$OUT/fsdp_memory.log" 2>&1
  trains_at() {  # gib: 3 steps under that per-GPU budget; the answer goes to fsdp_budget.txt
    [ "$SECONDS" -gt "${DEADLINE:-420}" ] && { echo "no time left for $1 GiB" >>"$OUT/fsdp_budget.txt"; return 2; }
    $FSDP before_big.py $ARGS --max-steps 3 --gpu-memory-gib "$1" --output-dir "/tmp/fsdp-$1" \
      >"$OUT/fsdp_budget_$1.log" 2>&1 && { echo "trains at $1 GiB" >>"$OUT/fsdp_budget.txt"; return 0; }
    echo "does not train at $1 GiB" >>"$OUT/fsdp_budget.txt"; return 1
  }
  step() { python -c "print(f'{$1 + $2:g}')"; }
  gib=${START_GIB:-13.5}  # the smallest budget in 0.5 GiB steps: down while it trains, else up until it does
  if trains_at "$gib"; then while trains_at "$(step "$gib" -0.5)"; do gib=$(step "$gib" -0.5); done
  else for _ in 1 2 3 4 5; do gib=$(step "$gib" 0.5); trains_at "$gib"; [ $? -ne 1 ] && break; done; fi ;;
*) echo "usage: bash scripts/gpu_calls.sh steady|jobs|alone|rows_and_jobs|rows9|final|alone9|budgets9|ddp9|ddp10|chunks10|hosts11|stall11|offload|leads|scale OUT" >&2; exit 2 ;;
esac
