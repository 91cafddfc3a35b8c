"""benchmark.py's rows: a script run in a fresh Python process, read back from its files; the rows' table."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from bench.scale import launch_command
from harness.cli import EXIT_OOM, REPO

SMOKE_ARGV = ["--model", "tiny", "--seq-len", "64", "--micro-batch", "4", "--tokens-per-step", "512"]


def read_curves(output_dir: Path) -> dict:
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {"train": [[r["step"], r["loss"]] for r in rows if "loss" in r],
            "eval": [[r["step"], r["eval_loss"]] for r in rows if "eval_loss" in r],
            "train_time": [[r["job_seconds"], r["loss"]] for r in rows if "loss" in r and "job_seconds" in r],
            "eval_time": [[r["job_seconds"], r["eval_loss"]] for r in rows if "eval_loss" in r and "job_seconds" in r]}


def run_one(spec: dict, workdir: Path, smoke: bool = False) -> dict:
    """Run one script in a fresh Python process (runs sharing one were seen to leak into each other: TF32 left on,
    another micro-batch chosen for the same budget); return its row, out-of-memory rows included."""
    out = workdir / spec["name"]
    for old in ("summary.json", "metrics.jsonl"):  # a run that dies early must not report an older run's
        (out / old).unlink(missing_ok=True)
    argv = ["--init", "random", "--wandb", "off", "--no-checkpoints", "--output-dir", str(out), *spec["argv"],
            *(SMOKE_ARGV if smoke else [])]
    print(f"\n=== {spec['name']}: {spec['script']}.py {' '.join(argv)}", file=sys.stderr, flush=True)
    code = subprocess.run([*launch_command(spec), *argv], cwd=REPO).returncode
    summary = json.loads((out / "summary.json").read_text()) if (out / "summary.json").exists() else {}
    # one failed run must not lose the others; out of memory is a result (a launcher exits 1 for it)
    error = None if code in (0, EXIT_OOM) or summary.get("oom") else f"exit {code}"
    if error:
        print(f"!!! {spec['name']} failed: {error}", file=sys.stderr)
    keys = ("techniques", "budget_gib", "micro_batch", "seq_len", "mfu", "peak_memory_gib", "train_seconds", "oom",
            "steps", "processes", "parallelism", "micro_batch_reason", "gradient_accumulation")
    return {"name": spec["name"], "script": spec["script"], "ablation": spec.get("ablation"), "argv": spec["argv"],
            **{key: summary.get(key) for key in keys}, "tokens_per_second": summary.get("steady_tokens_per_second"),
            "eval_loss": summary.get("final_eval_loss"), "error": error,
            "curves": read_curves(out) if (out / "metrics.jsonl").exists() else None}


def load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {"commands": {}, "runs": []}


def fmt(v, spec=".3g"):
    return "—" if v is None else format(v, spec)


def versions_line(v: dict) -> str:
    return ", ".join(f"{k} {v[k]}" for k in ("python", "torch", "transformers", "peft", "bitsandbytes",
                                             "liger-kernel") if v.get(k))


def rows_table(rows: list[dict]) -> list[str]:
    lines = ["| run | techniques off | budget GiB | micro-batch | tokens/s | MFU | peak GiB | train s | eval loss | OOM |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r.get('ablation') or ''} | {fmt(r.get('budget_gib'), 'g')} "
                     f"| {fmt(r.get('micro_batch'), 'd')} | {fmt(r.get('tokens_per_second'), ',.0f')} "
                     f"| {fmt(r.get('mfu'), '.1%')} | {fmt(r.get('peak_memory_gib'), '.2f')} "
                     f"| {fmt(r.get('train_seconds'), '.1f')} "
                     f"| {fmt(r.get('eval_loss'), '.4f')} | {'yes' if r.get('oom') else ''}"
                     + (f" {r['error']}" if r.get("error") else "") + " |")
    return lines
