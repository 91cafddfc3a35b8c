"""The benchmark behind the README's results: every script, each lightweight technique switched off in turn,
the reference QLoRA recipe, budgets, the whole default jobs (group `job`) and 1 vs 2 processes (group `scale`,
needs 2 GPUs).

    python benchmark.py                          # all groups (well over half an hour on an H200)
    python benchmark.py --only main,fast8        # some groups; --out names the JSON they are written to
    python benchmark.py --only job               # each script's default job, cold and warm (benchmark_jobs.py;
                                                 # --job-warm-runs 3: the median of three warm runs)
    python benchmark.py --merge a.json b.json    # merge partial runs into results/benchmark.json, then report
    python benchmark.py --report                 # results/benchmark.md and results/*.png from the JSON
    python benchmark.py --smoke                  # tiny models on the CPU: checks the machinery, writes runs/

Runs happen one after another, each in a fresh Python process (`python SCRIPT.py`, or a launcher), on the
random-init path (`--init random`), W&B off except in the jobs. tokens/s is the steady state: windows after the
first steps.
"""
from __future__ import annotations

import argparse
import importlib
import json
import math
import subprocess
import sys
from datetime import date
from pathlib import Path

import benchmark_jobs
import benchmark_scale
import lightweight_big
import lightweight_small
from harness.cli import EXIT_BAD_INPUT, EXIT_OOM, REPO, parse_args

RESULTS = REPO / "results"
SMOKE_OUT = REPO / "runs" / "benchmark" / "smoke.json"  # never the committed results

# The standard Hugging Face + PEFT QLoRA recipe (artidoro/qlora's qlora.py): 4-bit NF4 with double quantization,
# prepare_model_for_kbit_training, LoRA on every linear projection, gradient checkpointing, paged 32-bit AdamW,
# bf16 autocast, and transformers' default attention for GPT-Neo (eager). Same rank, targets and micro-batch as
# ours: lightweight_big.py with its own techniques switched (lightweight_big.REFERENCE_QLORA).
REFERENCE_QLORA = lightweight_big.REFERENCE_QLORA

# What a user would run instead of lightweight_small: transformers' run_clm with its speed flags (--bf16 --tf32
# --optim adamw_torch_fused, SDPA, 16 x 1024, group_texts packing) and nothing else.
PEER_RUN_CLM = ["--off", "fused_ce", "--off", "compile", "--off", "auto_micro_batch", "--off", "gc_paused",
                "--off", "step_overlap", "--micro-batch", "16"]

# lightweight_small compiles only runs of COMPILE_PAYS_FROM_STEPS or more: its steady rows and ablations are that long
SMALL_STEPS, BIG_STEPS, ABLATION_STEPS, SWEEP_STEPS = lightweight_small.COMPILE_PAYS_FROM_STEPS, 12, 8, 2  # a sweep
# trial: optimizer states exist after step 1
SMOKE_ARGV = ["--model", "tiny", "--seq-len", "64", "--micro-batch", "4", "--tokens-per-step", "512"]


def ablations(script, steps, logging_steps):
    techniques = importlib.import_module(script).TECHNIQUES
    # nf4 cannot train without lora; auto_micro_batch, offload_checkpoints and checkpoint_to_fit act under a
    # budget: see the budget and split_step rows (uncapped, the last two are never used)
    skip = {"lora", "auto_micro_batch", "offload_checkpoints", "checkpoint_to_fit"}
    return [dict(name=f"{script}-no-{t}", script=script, ablation=t,
                 argv=["--max-steps", str(steps), "--eval-every", str(steps), "--logging-steps", str(logging_steps),
                       "--off", t])
            for t, technique in techniques.items() if technique.default and t not in skip]


GROUPS = {
    "main": [
        # before_small's step is 24 padded micro-batches (the same corpus tokens as lightweight_small's one)
        dict(name="before_small", script="before_small", argv=["--max-steps", "10", "--logging-steps", "2"]),
        dict(name="lightweight_small", script="lightweight_small",
             argv=["--max-steps", str(SMALL_STEPS), "--logging-steps", "5"]),
        dict(name="lightweight_small-16gib", script="lightweight_small",
             argv=["--max-steps", str(SMALL_STEPS), "--logging-steps", "5", "--gpu-memory-gib", "16"]),
        dict(name="lightweight_small-24gib", script="lightweight_small",
             argv=["--max-steps", str(SMALL_STEPS), "--logging-steps", "5", "--gpu-memory-gib", "24"]),
        dict(name="lightweight_small-8gib", script="lightweight_small",
             argv=["--max-steps", str(SMALL_STEPS), "--logging-steps", "5", "--gpu-memory-gib", "8"]),
        dict(name="before_big-16gib", script="before_big", argv=["--max-steps", "2", "--gpu-memory-gib", "16"]),
        dict(name="before_big", script="before_big", argv=["--max-steps", "4"]),
        dict(name="lightweight_big", script="lightweight_big", argv=["--max-steps", str(BIG_STEPS)]),
        dict(name="lightweight_big-4gib", script="lightweight_big",
             argv=["--max-steps", str(BIG_STEPS), "--gpu-memory-gib", "4"]),
        # 12 steps, as the other budgets: 6 (until call 33) were too few to compare two rows, whose steps spread by 15%
        dict(name="lightweight_big-2gib", script="lightweight_big",
             argv=["--max-steps", str(BIG_STEPS), "--gpu-memory-gib", "2"]),
        dict(name="reference_qlora", script="lightweight_big", argv=["--max-steps", str(BIG_STEPS), *REFERENCE_QLORA]),
        dict(name="peer-run_clm", script="lightweight_small", argv=["--max-steps", str(SMALL_STEPS), "--logging-steps", "5",
                                                                    *PEER_RUN_CLM]),
    ],
    # lightweight_big's fastest setting within 8 GiB: fewer checkpointed layers, the micro-batch chosen to fit
    "fast8": [dict(name=f"lightweight_big-8gib-ckpt{k}", script="lightweight_big",
                   argv=["--max-steps", str(BIG_STEPS), "--gpu-memory-gib", "8", "--checkpoint-layers", str(k)])
              for k in (24, 20)],
    # the budgets that split a step, each technique that acts there switched off: lightweight_big's
    # offload_checkpoints (what it gives at 4 GiB; whether a refused offload costs anything at 2 GiB and at 8 GiB
    # with 20 layers checkpointed) and step_overlap (one host synchronization per micro-batch: 2 or 8 a step);
    # lightweight_small's checkpoint_to_fit at 16 and 8 GiB
    "split_step": [dict(name=f"{script}-{gib}gib{setting}-no-{technique}", script=script,
                        argv=[*steps, "--gpu-memory-gib", str(gib), *extra, "--off", technique])
                   for script, steps, technique, settings in (
                       ("lightweight_big", ["--max-steps", str(BIG_STEPS)], "offload_checkpoints",
                        ((4, "", []), (2, "", []), (8, "-ckpt20", ["--checkpoint-layers", "20"]))),
                       ("lightweight_big", ["--max-steps", str(BIG_STEPS)], "step_overlap", ((4, "", []), (2, "", []))),
                       ("lightweight_small", ["--max-steps", str(SMALL_STEPS), "--logging-steps", "5"],
                        "checkpoint_to_fit", ((16, "", []), (8, "", []))))
                   for gib, setting, extra in settings],
    "ablation_small": ablations("lightweight_small", SMALL_STEPS, logging_steps=5),  # logged as its main row
    "ablation_big": ablations("lightweight_big", ABLATION_STEPS, logging_steps=1),
    "sweep": ["before_small", "lightweight_small", "before_big", "lightweight_big"],  # expanded at run time
    "job": benchmark_jobs.SCRIPTS,  # each script's default job, cold then warm (benchmark_jobs.py)
    "scale": benchmark_scale.scale_rows(),
}


def read_curves(output_dir: Path) -> dict:
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {"train": [[r["step"], r["loss"]] for r in rows if "loss" in r],
            "eval": [[r["step"], r["eval_loss"]] for r in rows if "eval_loss" in r],
            "train_time": [[r["job_seconds"], r["loss"]] for r in rows if "loss" in r and "job_seconds" in r],
            "eval_time": [[r["job_seconds"], r["eval_loss"]] for r in rows if "eval_loss" in r and "job_seconds" in r]}


def run_one(spec: dict, workdir: Path, smoke: bool = False, warm: bool = True) -> dict:
    """Run one script in a fresh Python process; return its benchmark row (oom rows included).

    A process per run, because runs in one process were seen to leak into each other: TF32 left on
    (session 1), and the micro-batch probe choosing differently for the same budget (call 8).
    """
    out = workdir / spec["name"]
    (out / "summary.json").unlink(missing_ok=True)  # a run that dies early must not report an older summary
    argv = ["--init", "random", "--wandb", "off", "--no-checkpoints", "--output-dir", str(out), *spec["argv"], *(SMOKE_ARGV if smoke else [])]
    if warm and compiles(spec) and not smoke:  # warm: the steady rows (a memory sweep's trial needs no warm-up)
        warm_the_compile_cache(spec, argv)
    print(f"\n=== {spec['name']}: {spec['script']}.py {' '.join(argv)}", file=sys.stderr, flush=True)
    code = subprocess.run([*benchmark_scale.launch_command(spec), *argv], cwd=REPO).returncode
    error = None if code in (0, EXIT_OOM) else f"exit {code}"  # one failed run must not lose the others
    summary = json.loads((out / "summary.json").read_text()) if (out / "summary.json").exists() else {}
    if error:
        print(f"!!! {spec['name']} failed: {error}", file=sys.stderr)
    return {
        "name": spec["name"], "script": spec["script"], "techniques": summary.get("techniques"),
        "ablation": spec.get("ablation"), "budget_gib": summary.get("budget_gib"),
        "micro_batch": summary.get("micro_batch"), "seq_len": summary.get("seq_len"),
        "tokens_per_second": summary.get("steady_tokens_per_second"), "mfu": summary.get("mfu"),
        "peak_memory_gib": summary.get("peak_memory_gib"), "train_seconds": summary.get("train_seconds"),
        "eval_loss": summary.get("final_eval_loss"), "oom": summary.get("oom"), "steps": summary.get("steps"),
        "argv": spec["argv"], "error": error, "curves": read_curves(out) if (out / "metrics.jsonl").exists() else None,
        "processes": summary.get("processes"), "parallelism": summary.get("parallelism"),
        "micro_batch_reason": summary.get("micro_batch_reason"), "gradient_accumulation": summary.get("gradient_accumulation"),
        "step_seconds_timeline": summary.get("step_seconds_timeline"),
    }


def compiles(spec: dict) -> bool:
    """Whether the row's run uses torch.compile: its script's `compile` technique, not switched off, in a run of
    at least the steps from which the script compiles."""
    script = importlib.import_module(spec["script"])
    if "compile" not in getattr(script, "TECHNIQUES", {}):  # before_*: no techniques
        return False
    args, on = parse_args(spec["script"], script.MODEL, script.TECHNIQUES, script.SIZES, spec["argv"])
    return on.chosen["compile"] and args.max_steps >= script.COMPILE_PAYS_FROM_STEPS


def warm_the_compile_cache(spec: dict, argv: list) -> None:
    """Run the row's command for as few steps as compile (lightweight_small.COMPILE_PAYS_FROM_STEPS), so that the
    row measures a warm compile cache, as a user's second run: inductor's first compilation is then no part of it.
    Its effect on the steady figure was small: steps 6-10 at 129k tokens/s with the caches removed, 135k warm,
    later windows alike (NOTES.md, call 27; the slow window itself is not explained, calls 25-35). A user's
    first run pays the compilation once; the job rows measure it (cold)."""
    steps = str(lightweight_small.COMPILE_PAYS_FROM_STEPS)
    warm = [*argv, "--max-steps", steps, "--eval-every", steps,
            "--output-dir", f"{argv[argv.index('--output-dir') + 1]}-warm"]
    print(f"\n=== {spec['name']}: warming the compile cache ({steps} steps)", file=sys.stderr, flush=True)
    subprocess.run([*benchmark_scale.launch_command(spec), *warm], cwd=REPO, check=False)


def sweep(script: str, workdir: Path, save) -> None:
    """Smallest --gpu-memory-gib (0.5 GiB steps) at which `script` trains SWEEP_STEPS steps."""
    def trial(budget):
        row = run_one(dict(name=f"{script}-sweep-{budget:g}gib", script=script,
                           argv=["--max-steps", str(SWEEP_STEPS), "--gpu-memory-gib", f"{budget:g}"]), workdir,
                      warm=False)
        row["sweep"] = True
        save(row)
        return row["error"] is None and not row["oom"]

    # start from the uncapped peak: the script's main row if results/benchmark.json has one, else a run
    main_row = next((r for r in load(RESULTS / "benchmark.json")["runs"] if r["name"] == script), None)
    uncapped = main_row or run_one(dict(name=f"{script}-sweep-peak", script=script,
                                        argv=["--max-steps", str(SWEEP_STEPS)]), workdir)
    budget = max(0.5, math.ceil((uncapped["peak_memory_gib"] or 1) * 2) / 2)
    if "auto_micro_batch" in (uncapped["techniques"] or []):
        budget = min(budget, 2.0)  # the micro-batch shrinks to fit: start at the target's 2 GiB and walk
    if trial(budget):
        while budget > 0.5 and trial(budget - 0.5):
            budget -= 0.5
    else:
        for _ in range(6):
            budget += 0.5
            if trial(budget):
                break


def versions_line(v: dict) -> str:
    return ", ".join(f"{k} {v[k]}" for k in ("torch", "transformers", "peft", "bitsandbytes", "liger-kernel") if v.get(k))


def load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {"runs": []}


def merge(paths, into: Path) -> dict:
    merged = load(into)
    for path in paths:
        part = load(Path(path))
        merged.update({k: v for k, v in part.items() if k not in ("runs", "commands")})
        merged["commands"] = {**merged.get("commands", {}), **part.get("commands", {})}
        names = {r["name"] for r in part["runs"]}
        merged["runs"] = [r for r in merged.get("runs", []) if r["name"] not in names] + part["runs"]
    into.write_text(json.dumps(merged, indent=1) + "\n")
    return merged


def fmt(v, spec=".3g"):
    return "—" if v is None else format(v, spec)


def report(results: dict) -> None:
    """results/benchmark.md and the plots, from the JSON."""
    runs = {r["name"]: r for r in results["runs"]}
    order = [spec["name"] for group, specs in GROUPS.items() if group not in ("sweep", "job") for spec in specs]
    ordered = sorted((r for r in results["runs"] if not r.get("job")), key=lambda r: (order.index(r["name"]), 0) if r["name"] in order
                     else (len(order), r["script"], -(r.get("budget_gib") or 0)))  # then the sweep, per script
    lines = [f"# Benchmark results\n", f"GPU: {results.get('gpu')}; date: {results.get('date')}; "
             f"{versions_line(results.get('versions', {}))}.\n", "Command: `python benchmark.py` (see its docstring); "
             "each call's command and commit are in `benchmark.json` under `commands`.\n",
             *([results["notes"] + "\n"] if results.get("notes") else []),
             "| run | techniques off | budget GiB | micro-batch | tokens/s | MFU | peak GiB | eval loss | OOM | measured |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in ordered:
        lines.append(f"| {r['name']} | {r.get('ablation') or ''} | {fmt(r.get('budget_gib'), 'g')} | {fmt(r.get('micro_batch'), 'd')} "
                     f"| {fmt(r.get('tokens_per_second'), ',.0f')} | {fmt(r.get('mfu'), '.1%')} "
                     f"| {fmt(r.get('peak_memory_gib'), '.2f')} | {fmt(r.get('eval_loss'), '.4f')} | {'yes' if r.get('oom') else ''}"
                     + (f" {r['error']}" if r.get("error") else "") + (" (caveat)" if r.get("caveat") else "")
                     + f" | {r.get('measured') or ''} |")
    caveats = [f"- {r['name']}: {r['caveat']}" for r in results["runs"] if r.get("caveat")]
    if caveats:
        lines += ["\nCaveats:\n", *caveats]
    sweeps = {}
    for r in results["runs"]:
        if r.get("sweep") and not r.get("oom") and not r.get("error"):
            sweeps[r["script"]] = min(sweeps.get(r["script"], 1e9), r["budget_gib"])
    if sweeps:
        lines += ["\n## Smallest budget that trains (0.5 GiB steps)\n", "| script | --gpu-memory-gib |", "|---|---|"]
        lines += [f"| {s} | {b:g} |" for s, b in sweeps.items()]
    lines += benchmark_jobs.job_table(runs) + benchmark_scale.scale_table(runs)
    (RESULTS / "benchmark.md").write_text("\n".join(lines) + "\n")
    plots(results)
    benchmark_jobs.loss_against_time_plot(runs, RESULTS)
    print(f"wrote {RESULTS}/benchmark.md and plots", file=sys.stderr)


def plots(results: dict) -> None:
    """results/loss_small.png, loss_big.png, speed_memory.png and ablation.png."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {r["name"]: r for r in results["runs"]}
    for model, pair in (("small", ("before_small", "lightweight_small")),
                        ("big", ("before_big", "lightweight_big", "reference_qlora"))):
        fig, ax = plt.subplots(figsize=(7, 4))
        for name in pair:
            curves = (runs.get(name) or {}).get("curves")
            if curves:
                line, = ax.plot(*zip(*curves["train"]), label=f"{name} train") if curves["train"] else (None,)
                if curves["eval"]:
                    ax.plot(*zip(*curves["eval"]), "o--", color=line.get_color() if line else None, label=f"{name} eval")
        ax.set(xlabel="optimizer step", ylabel="loss", title=f"{model} model: loss (random init)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(RESULTS / f"loss_{model}.png", dpi=100)
        plt.close(fig)

    main = [runs[n] for n in ("before_small", "lightweight_small", "before_big", "lightweight_big",
                              "lightweight_big-8gib-ckpt20", "lightweight_big-4gib", "lightweight_big-2gib",
                              "reference_qlora") if n in runs]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4))
    names = [r["name"] for r in main]
    a1.barh(names, [r.get("tokens_per_second") or 0 for r in main]); a1.set(xlabel="tokens/s (steady)")
    a2.barh(names, [r.get("peak_memory_gib") or 0 for r in main]); a2.set(xlabel="peak GPU memory (GiB)")
    a2.set_yticklabels([])
    fig.tight_layout(); fig.savefig(RESULTS / "speed_memory.png", dpi=100); plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for ax, script in zip(axes, ("lightweight_small", "lightweight_big")):
        rows = [r for r in results["runs"] if r["script"] == script and r.get("ablation")
                and "INVALID" not in (r.get("caveat") or "")]
        full = runs.get(script)
        if full:
            rows = [dict(full, ablation="(all on)")] + rows
        ax.barh([r["ablation"] for r in rows], [r.get("tokens_per_second") or 0 for r in rows])
        ax.set(xlabel="tokens/s", title=f"{script}: one technique off")
    fig.tight_layout(); fig.savefig(RESULTS / "ablation.png", dpi=100); plt.close(fig)


def refuse(message: str):
    """A request that cannot be run as asked: one line, exit 2, as the scripts do."""
    print(f"benchmark.py: error: {message}", file=sys.stderr)
    raise SystemExit(EXIT_BAD_INPUT)


def refuse_another_gpu(out: Path, gpu: str, replace: bool) -> None:
    """Rows of different GPU models never mix in one file unless asked (--replace-gpu)."""
    measured_on = load(out).get("gpu")
    if measured_on not in (None, gpu) and not replace:
        refuse(f"{out} holds rows measured on {measured_on}, and this machine is {gpu}: "
               f"write elsewhere with --out, or pass --replace-gpu")
    out.parent.mkdir(parents=True, exist_ok=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default=",".join(GROUPS), help=f"groups to run: {', '.join(GROUPS)}")
    p.add_argument("--runs", default=None, help="only these run names (comma-separated) from the chosen groups")
    p.add_argument("--out", default=None, help="JSON to write the runs into, merged by name (default: "
                   "results/benchmark.json; with --smoke runs/benchmark/smoke.json)")
    p.add_argument("--replace-gpu", action="store_true",
                   help="let this run replace rows that --out holds from another GPU model")
    p.add_argument("--workdir", default=str(REPO / "runs" / "benchmark"))
    p.add_argument("--merge", nargs="+", metavar="JSON", help="merge these partial results into results/benchmark.json")
    p.add_argument("--report", action="store_true", help="only write results/benchmark.md and plots from the JSON")
    p.add_argument("--job-warm-runs", type=int, default=1, metavar="N",
                   help="job group: run each warm job N times and keep the median run (default: %(default)s)")
    p.add_argument("--smoke", action="store_true", help="tiny models on the CPU, no budgets or sweep: tests the "
                   "machinery in a few minutes; writes runs/benchmark/smoke.json unless --out says otherwise")
    args = p.parse_args(argv)
    if args.job_warm_runs < 1:
        p.error(f"--job-warm-runs must be at least 1 (got {args.job_warm_runs})")
    RESULTS.mkdir(exist_ok=True)
    if args.merge:
        return report(merge(args.merge, RESULTS / "benchmark.json"))
    if args.report:
        return report(load(RESULTS / "benchmark.json"))

    import torch

    from harness.measure import versions

    if not torch.cuda.is_available() and not args.smoke:
        refuse("needs a CUDA GPU (--smoke runs tiny models on the CPU)")
    groups = args.only.split(",")
    unknown = set(groups) - set(GROUPS)
    if unknown:
        refuse(f"unknown group(s): {', '.join(sorted(unknown))}; known: {', '.join(GROUPS)}")
    out = Path(args.out or (SMOKE_OUT if args.smoke else RESULTS / "benchmark.json"))
    workdir = Path(args.workdir)
    header = {"gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
              "date": date.today().isoformat(), "versions": versions()}
    refuse_another_gpu(out, header["gpu"], args.replace_gpu)

    def save(row):
        part = load(out)
        part.update(header)
        part["runs"] = [r for r in part["runs"] if r["name"] != row["name"]] + [row]
        out.write_text(json.dumps(part, indent=1) + "\n")

    wanted = set(args.runs.split(",")) if args.runs else None
    if "job" in groups and not args.smoke:
        benchmark_jobs.warm_bytecode()
    for group in groups:
        for spec in GROUPS[group]:
            name = spec if group == "sweep" else f"job-{spec}" if group == "job" else spec["name"]
            if wanted is not None and name not in wanted:
                continue
            if group == "job":
                save(benchmark_jobs.job_row(spec, workdir, SMOKE_ARGV + ["--max-steps", "2"] if args.smoke else (),
                                            warm_runs=args.job_warm_runs))
            elif group == "sweep":
                if not args.smoke:
                    sweep(spec, workdir, save)
            elif not (args.smoke and "--gpu-memory-gib" in spec["argv"]):
                save(run_one(spec, workdir, smoke=args.smoke))


if __name__ == "__main__":
    main()
