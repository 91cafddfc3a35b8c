"""benchmark.py's `job` group: each script's default job (one epoch of the corpus, no --max-steps), run as a user
runs it, with the wall clock taken from outside the process; first with cold caches, then warm.

Cold: a fresh --cache-dir (corpus tokenizer, tokenized corpus, random-init checkpoint) and fresh torch.compile
caches. Warm: the same command again. Python's bytecode cache is warmed once before the group (a user's machine
keeps it), and W&B runs offline, as without credentials.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from harness.cli import REPO

SCRIPTS = ["before_small", "lightweight_small", "before_big", "lightweight_big"]
PARTS = ("startup_seconds", "setup_seconds", "compile_and_warmup_seconds", "train_seconds", "eval_seconds",
         "save_seconds")


def warm_bytecode() -> None:
    """Import what the scripts import once, so that every timed job finds Python's bytecode cache warm."""
    subprocess.run([sys.executable, "-c", "import torch, transformers, peft, datasets, accelerate, wandb, "
                    "bitsandbytes, liger_kernel, harness.session, harness.measure, common"], cwd=REPO, check=False)


def timed_job(script: str, out: Path, cache: Path, argv=()) -> tuple[float, int, dict]:
    """(wall seconds, exit code, summary) of `python SCRIPT.py` with the default job, as a user runs it."""
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache / "inductor"), "TRITON_CACHE_DIR": str(cache / "triton"),
           "WANDB_MODE": "offline"}
    command = [sys.executable, f"{script}.py", "--init", "random", "--output-dir", str(out), "--cache-dir", str(cache),
               *argv]
    print(f"\n=== job {script}: {' '.join(command[1:])}", file=sys.stderr, flush=True)
    start = time.perf_counter()
    code = subprocess.run(command, cwd=REPO, env=env).returncode
    seconds = time.perf_counter() - start
    summary = json.loads((out / "summary.json").read_text()) if (out / "summary.json").exists() else {}
    return seconds, code, summary


def job_row(script: str, workdir: Path, argv=(), warm_runs: int = 1) -> dict:
    """The `job-<script>` row: warm and cold wall clock, the parts the script measured, steps and eval loss.

    warm_runs: the warm job is run that many times and the row is the median run (its parts and curves too): the
    same job's setup was seen to move by 1-3.5 s between runs on one GPU, more than a short job's ratio can absorb.
    """
    from bench.rows import read_curves

    cache, out = workdir / f"job-cache-{script}", workdir / f"job-{script}"
    shutil.rmtree(cache, ignore_errors=True)
    cold_seconds, cold_code, _ = timed_job(script, out, cache, argv)
    warm = []
    for _ in range(warm_runs):
        seconds, code, summary = timed_job(script, out, cache, argv)
        warm.append((seconds, code, summary, read_curves(out) if (out / "metrics.jsonl").exists() else None))
    seconds, _, summary, curves = sorted(warm, key=lambda run: run[0])[warm_runs // 2]  # the median run
    code = next((run[1] for run in warm if run[1] != 0), 0)  # a failed warm run fails the row
    return {
        "name": f"job-{script}", "script": script, "job": True, "argv": list(argv),
        "job_seconds": seconds, "job_seconds_warm_runs": [run[0] for run in warm], "job_seconds_cold": cold_seconds,
        "job_seconds_inside": summary.get("job_seconds"),
        "parts": {part: summary.get(part) for part in PARTS}, "setup_parts": summary.get("setup_parts"),
        "steps": summary.get("steps"),
        "micro_batch": summary.get("micro_batch"), "eval_loss": summary.get("final_eval_loss"),
        "train_loss": summary.get("final_train_loss"), "tokens_trained": summary.get("tokens_trained"),
        "peak_memory_gib": summary.get("peak_memory_gib"), "oom": summary.get("oom"),
        "error": None if code == cold_code == 0 else f"exit {cold_code} cold, {code} warm",
        "curves": curves,
    }


def job_table(runs: dict) -> list[str]:
    """jobs.md's table: each pair's wall clock (one epoch, timed from outside the process) and the ratio."""
    lines = [
             "| job | steps | micro-batch | job s (warm) | job s (cold) | train s | startup s | setup s | compile s "
             "| eval s | save s | eval loss |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    fmt = lambda v, spec=".1f": "—" if v is None else format(v, spec)  # noqa: E731
    for script in SCRIPTS:
        r = runs.get(f"job-{script}")
        if r:
            p = r["parts"]
            lines.append(f"| {script} | {fmt(r['steps'], 'd')} | {fmt(r['micro_batch'], 'd')} | {fmt(r['job_seconds'])} "
                         f"| {fmt(r['job_seconds_cold'])} | {fmt(p['train_seconds'])} | {fmt(p['startup_seconds'])} "
                         f"| {fmt(p['setup_seconds'])} | {fmt(p['compile_and_warmup_seconds'])} | {fmt(p['eval_seconds'])} "
                         f"| {fmt(p['save_seconds'])} | {fmt(r['eval_loss'], '.4f')} |" + (f" {r['error']}" if r["error"] else ""))
    for before, light in (("before_small", "lightweight_small"), ("before_big", "lightweight_big")):
        a, b = runs.get(f"job-{before}"), runs.get(f"job-{light}")
        if a and b and a["job_seconds"] and b["job_seconds"] and a["parts"]["train_seconds"] and b["parts"]["train_seconds"]:
            runs_seen = "; ".join(f"{r['script']} warm runs {', '.join(f'{t:.1f}' for t in r['job_seconds_warm_runs'])} s"
                                  for r in (a, b) if len(r.get("job_seconds_warm_runs") or []) > 1)
            lines.append(f"\n{light} vs {before}: the whole job {a['job_seconds'] / b['job_seconds']:.2f}x sooner "
                         f"(warm), {a['job_seconds_cold'] / b['job_seconds_cold']:.2f}x cold; Trainer's train time "
                         f"{a['parts']['train_seconds'] / b['parts']['train_seconds']:.2f}x."
                         + (f" Medians of: {runs_seen}." if runs_seen else ""))
    return lines
