"""The benchmark behind README's results. Each group runs its rows one after another on one GPU, each row in a fresh
Python process (`python SCRIPT.py`, or a launcher), on the random-init path (`--init random`), W&B off except in the
jobs; tokens/s is the steady state (windows after the first steps). A group writes its rows and one block (GPU, date,
library versions, commit, the command) into results/<file>.json, then results/<file>.md:

    python benchmark.py --only small          # the small model's rows and its strongest peer   -> benchmark.json
    python benchmark.py --only big            # the big model's rows, its QLoRA peers            -> benchmark.json
    python benchmark.py --only ablation_small,ablation_big,ablation_budget   # one technique off  -> ablations.json
    python benchmark.py --only packing        # document_mask and run_clm's packing, both scripts    -> packing.json
    python benchmark.py --only packing_epoch  # the small pair's default job: held-out losses          -> packing.json
    python benchmark.py --only models_small   # Qwen2.5-0.5B, SmolLM2-360M: lightweight_small, peers -> models.json
    python benchmark.py --only models_small_16gib  # the same under 16 GiB                           -> models.json
    python benchmark.py --only models_big     # Qwen2.5-1.5B through lightweight_big, its peers    -> models_big.json
    python benchmark.py --only job            # each default job, wall clock (bench/jobs.py) -> jobs.json
    python benchmark.py --only scale          # 1 and 2 processes; needs 2 GPUs (bench/scale.py) -> scale.json
    python benchmark.py --report              # the .md files and the plots from the JSON files
    python benchmark.py --smoke --only small  # tiny models on the CPU, no budgets: checks the machinery (runs/)
"""
from __future__ import annotations

import argparse
import importlib
import json
import subprocess
import sys
from datetime import date
from pathlib import Path

import lightweight_big
import lightweight_small
from bench import jobs as benchmark_jobs, plots as benchmark_plots, scale as benchmark_scale
from bench.rows import SMOKE_ARGV, fmt, load, rows_table, run_one, versions_line
from harness.cli import EXIT_BAD_INPUT, REPO, folder_problem

RESULTS = REPO / "results"
SMOKE_RESULTS = REPO / "runs" / "benchmark" / "smoke"  # never the committed results
# lightweight_small compiles only runs of COMPILE_PAYS_FROM_STEPS or more: its rows are that long
SMALL = ["--max-steps", str(lightweight_small.COMPILE_PAYS_FROM_STEPS), "--logging-steps", "5"]
BIG = ["--max-steps", "12"]
# current models of the recipes' sizes (configs/): Qwen2.5 and SmolLM2 (Llama's architecture)
CURRENT_SMALL_MODELS = {"qwen0.5b": "Qwen/Qwen2.5-0.5B", "smollm2": "HuggingFaceTB/SmolLM2-360M"}
BIG_MODEL = "Qwen/Qwen2.5-1.5B"
# qlora.py on a model other than GPT-Neo: transformers' default attention there is SDPA, not eager
REFERENCE_QLORA_SDPA = [a for i, a in enumerate(lightweight_big.REFERENCE_QLORA)
                        if "sdpa" not in lightweight_big.REFERENCE_QLORA[i:i + 2]]
QLORA_PY_DEFAULTS_SDPA = [*REFERENCE_QLORA_SDPA, *lightweight_big.QLORA_PY_DEFAULTS[len(lightweight_big.REFERENCE_QLORA):]]


def row(name, script, *argv):
    return dict(name=name, script=script, argv=list(argv))


def ablations(script, steps):
    """`script` with each default technique switched off in turn. nf4 cannot train without lora; auto_micro_batch,
    offload_checkpoints and checkpoint_to_fit act under a budget (group ablation_budget)."""
    skip = {"lora", "auto_micro_batch", "offload_checkpoints", "checkpoint_to_fit"}
    return [dict(row(f"{script}-no-{name}", script, *steps, "--off", name), ablation=name)
            for name, technique in importlib.import_module(script).TECHNIQUES.items()
            if technique.default and name not in skip]


GROUPS = {
    "small": [  # the strongest peer: transformers' Trainer with its speed flags and torch_compile, at the largest of
        # 32, 16 or 8 x 1024 that fits (uncapped 32; under 16 GiB 8; under 8 GiB none of them)
        row("lightweight_small", "lightweight_small", *SMALL),
        row("peer-trainer_compile", "lightweight_small", *SMALL, *lightweight_small.STRONGEST_PEER, "--micro-batch", "32"),
        row("lightweight_small-16gib", "lightweight_small", *SMALL, "--gpu-memory-gib", "16"),
        row("peer-trainer_compile-16gib", "lightweight_small", *SMALL, *lightweight_small.STRONGEST_PEER,
            "--micro-batch", "8", "--gpu-memory-gib", "16"),
        row("lightweight_small-8gib", "lightweight_small", *SMALL, "--gpu-memory-gib", "8"),
        # its step is 24 padded micro-batches of 8 x 512 (the corpus tokens of lightweight_small's one)
        row("before_small", "before_small", "--max-steps", "6", "--logging-steps", "2"),
    ],
    "big": [
        row("lightweight_big", "lightweight_big", *BIG),
        row("lightweight_big-8gib", "lightweight_big", *BIG, "--gpu-memory-gib", "8"),
        row("lightweight_big-4gib", "lightweight_big", *BIG, "--gpu-memory-gib", "4"),
        row("lightweight_big-2gib", "lightweight_big", *BIG, "--gpu-memory-gib", "2"),
        row("reference_qlora", "lightweight_big", *BIG, *lightweight_big.REFERENCE_QLORA),  # qlora.py at our rank
        row("qlora_py_defaults", "lightweight_big", "--max-steps", "6", *lightweight_big.QLORA_PY_DEFAULTS),
        row("before_big", "before_big", "--max-steps", "4"),
        row("before_big-16gib", "before_big", "--max-steps", "2", "--gpu-memory-gib", "16"),  # out of memory
    ],
    "ablation_small": ablations("lightweight_small", SMALL),
    "ablation_big": ablations("lightweight_big", ["--max-steps", "8"]),
    # what acts only where the memory splits a step: each switched off under the budgets where it is used
    "ablation_budget": [dict(row(f"{script}-{gib}gib-no-{name}", script, *steps, "--gpu-memory-gib", str(gib),
                                 "--off", name), ablation=name)
                        for script, steps, name, budgets in (("lightweight_small", SMALL, "checkpoint_to_fit", (16, 8)),
                                                             ("lightweight_big", BIG, "offload_checkpoints", (4, 2)),
                                                             ("lightweight_big", BIG, "step_overlap", (4, 2)))
                        for gib in budgets],
    # document_mask against run_clm's packing across records (--off document_mask), one after the other
    "packing": [
        row("lightweight_small", "lightweight_small", *SMALL),
        row("lightweight_small-cross_document", "lightweight_small", *SMALL, "--off", "document_mask"),
        row("lightweight_big", "lightweight_big", *BIG),
        row("lightweight_big-cross_document", "lightweight_big", *BIG, "--off", "document_mask"),
    ],
    # the default job, one epoch: the held-out loss of the padded baseline and of packing, with and without documents
    # kept apart
    "packing_epoch": [
        row("before_small-epoch", "before_small"),
        row("lightweight_small-epoch", "lightweight_small"),
        row("lightweight_small-cross_document-epoch", "lightweight_small", "--off", "document_mask"),
    ],
    # current models through lightweight_small, each beside the strongest peer (the Trainer with torch_compile), and
    # Unsloth's full fine-tune
    "models_small": [
        *[row(f"{name}-{kind}", "lightweight_small", *SMALL, "--model", model, *argv)
          for name, model in CURRENT_SMALL_MODELS.items()
          for kind, argv in (("lightweight_small", []),
                             ("peer-trainer_compile", [*lightweight_small.STRONGEST_PEER, "--micro-batch", "16"]))],
        row("qwen0.5b-peer-unsloth", "peers/unsloth_peer", *SMALL, "--model", CURRENT_SMALL_MODELS["qwen0.5b"],
            "--mode", "full", "--micro-batch", "16"),
    ],
    # the same under 16 GiB: the peer at the largest of 32, 16 or 8 x 1024 that fits
    "models_small_16gib": [
        row(f"{name}-{kind}-16gib", "lightweight_small", *SMALL, "--model", model, "--gpu-memory-gib", "16", *argv)
        for name, model in CURRENT_SMALL_MODELS.items()
        for kind, argv in (("lightweight_small", []),
                           ("peer-trainer_compile", [*lightweight_small.STRONGEST_PEER, "--micro-batch", "8"]))],
    "models_big": [
        row("qwen1.5b-lightweight_big", "lightweight_big", *BIG, "--model", BIG_MODEL),
        row("qwen1.5b-lightweight_big-8gib", "lightweight_big", *BIG, "--model", BIG_MODEL, "--gpu-memory-gib", "8"),
        row("qwen1.5b-lightweight_big-4gib", "lightweight_big", *BIG, "--model", BIG_MODEL, "--gpu-memory-gib", "4"),
        row("qwen1.5b-reference_qlora", "lightweight_big", *BIG, "--model", BIG_MODEL, *REFERENCE_QLORA_SDPA),
        row("qwen1.5b-qlora_py_defaults", "lightweight_big", "--max-steps", "6", "--model", BIG_MODEL,
            *QLORA_PY_DEFAULTS_SDPA),
        row("qwen1.5b-before_big", "before_big", "--max-steps", "4", "--model", BIG_MODEL),
        row("qwen1.5b-before_big-16gib", "before_big", "--max-steps", "2", "--model", BIG_MODEL, "--gpu-memory-gib", "16"),
        row("qwen1.5b-peer-unsloth", "peers/unsloth_peer", *BIG, "--model", BIG_MODEL, "--mode", "qlora",
            "--micro-batch", "32"),
    ],
    "job": [dict(name=f"job-{script}", script=script, job=True) for script in benchmark_jobs.SCRIPTS],
    "scale": benchmark_scale.scale_rows(),
}
FILES = {"small": "benchmark", "big": "benchmark", "ablation_small": "ablations", "ablation_big": "ablations",
         "ablation_budget": "ablations", "job": "jobs", "scale": "scale", "packing": "packing", "packing_epoch": "packing",
         "models_small": "models", "models_small_16gib": "models", "models_big": "models_big"}
# README's ratios, each between two rows of one file's group (one command): (the row, compared with)
RATIOS = [("lightweight_small", "before_small"), ("lightweight_small", "peer-trainer_compile"),
          ("lightweight_small-16gib", "peer-trainer_compile-16gib"), ("lightweight_big", "reference_qlora"),
          ("lightweight_big", "qlora_py_defaults"), ("lightweight_big-4gib", "reference_qlora"),
          ("lightweight_small", "lightweight_small-cross_document"), ("lightweight_big", "lightweight_big-cross_document"),
          *[(f"{name}-lightweight_small{budget}", f"{name}-peer-trainer_compile{budget}")
            for name in CURRENT_SMALL_MODELS for budget in ("", "-16gib")],
          ("qwen0.5b-lightweight_small", "qwen0.5b-peer-unsloth"), ("qwen1.5b-lightweight_big", "qwen1.5b-peer-unsloth"),
          ("qwen1.5b-lightweight_big", "qwen1.5b-reference_qlora"), ("qwen1.5b-lightweight_big", "qwen1.5b-qlora_py_defaults")]


def ratio_lines(runs: dict) -> list[str]:
    lines = []
    for fast, slow in RATIOS:
        a, b = runs.get(fast), runs.get(slow)
        if a and b and a.get("group") == b.get("group") and a.get("tokens_per_second") and b.get("tokens_per_second"):
            lines.append(f"- {fast} vs {slow}: {a['tokens_per_second'] / b['tokens_per_second']:.2f}x the tokens/s, "
                         f"{fmt(a.get('peak_memory_gib'), '.1f')} vs {fmt(b.get('peak_memory_gib'), '.1f')} GiB peak")
    return ["\nRatios (tokens/s; rows of one command):\n", *lines] if lines else []


def report(results_dir: Path = RESULTS) -> None:
    """results/<file>.md for each JSON file there, and the plots."""
    for stem in sorted(set(FILES.values())):
        results = load(results_dir / f"{stem}.json")
        if not results["runs"]:
            continue
        runs = {r["name"]: r for r in results["runs"]}
        lines = [f"# Benchmark: {stem}\n", "Written by benchmark.py from the JSON beside this file.\n"]
        for group, block in results["commands"].items():
            rows = [r for r in results["runs"] if r.get("group") == group]
            lines += [f"\n## {group}\n", f"`{block.get('command')}` on {block.get('gpu')}, {block.get('date')}, "
                      f"commit {block.get('commit')}; {versions_line(block.get('versions', {}))}.\n"]
            if group == "job":
                lines += benchmark_jobs.job_table(runs)
            elif group == "scale":
                lines += benchmark_scale.scale_table(runs)
            else:
                lines += rows_table(rows)
        lines += ratio_lines(runs)
        (results_dir / f"{stem}.md").write_text("\n".join(lines) + "\n")
    benchmark_plots.plots({stem: load(results_dir / f"{stem}.json") for stem in set(FILES.values())}, results_dir)
    print(f"wrote {results_dir}/*.md and plots", file=sys.stderr)


def refuse(message: str):
    """A request that cannot be run as asked: one line, exit 2, as the scripts do."""
    print(f"benchmark.py: error: {message}", file=sys.stderr)
    raise SystemExit(EXIT_BAD_INPUT)


def header(command: str) -> dict:
    import torch

    from harness.measure import versions

    # "-dirty" where the working tree differs from the commit: the rows then ran code no commit holds
    commit = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=7"], cwd=REPO, capture_output=True,
                            text=True)
    return {"command": command, "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
            "date": date.today().isoformat(), "versions": versions(), "commit": commit.stdout.strip() or None}


def run_group(group: str, path: Path, block: dict, workdir: Path, wanted, smoke: bool, warm_runs: int) -> None:
    """Run `group`'s rows (those in `wanted`, if given), each saved into `path` as it ends."""
    results = load(path)
    other_gpu = {b.get("gpu") for g, b in results["commands"].items() if g != group} - {block["gpu"]}
    if other_gpu:  # rows of different GPU models never mix in one file
        refuse(f"{path} holds rows measured on {', '.join(sorted(other_gpu))}, and this machine is {block['gpu']}: "
               f"write elsewhere with --results-dir")
    if wanted is None:  # the whole group again: none of its old rows stay
        results["runs"] = [r for r in results["runs"] if r.get("group") != group]
    for spec in GROUPS[group]:
        if (wanted is not None and spec["name"] not in wanted) or (smoke and "--gpu-memory-gib" in spec.get("argv", [])):
            continue
        if spec.get("job"):
            result = benchmark_jobs.job_row(spec["script"], workdir, [*SMOKE_ARGV, "--max-steps", "2"] if smoke else (),
                                            warm_runs=warm_runs)
        else:
            result = run_one(spec, workdir, smoke=smoke)
        results["runs"] = [r for r in results["runs"] if r["name"] != spec["name"]] + [dict(result, group=group)]
        results["commands"][group] = block  # once a row of this command is in
        path.write_text(json.dumps(results, indent=1) + "\n")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--only", default="small,big", help=f"groups to run: {', '.join(GROUPS)} (default: %(default)s)")
    p.add_argument("--runs", default=None, help="only these row names (comma-separated) of the chosen groups")
    p.add_argument("--results-dir", default=None, help="where the JSON and .md files go (default: results/; "
                   "with --smoke runs/benchmark/smoke)")
    p.add_argument("--workdir", default=str(REPO / "runs" / "benchmark"), help="the runs' output folders")
    p.add_argument("--report", action="store_true", help="only write the .md files and plots from the JSON files")
    p.add_argument("--job-warm-runs", type=int, default=1, metavar="N",
                   help="job group: run each warm job N times and keep the median run (default: %(default)s)")
    p.add_argument("--smoke", action="store_true", help="tiny models on the CPU, no budgets: tests the machinery")
    args = p.parse_args(argv)
    if args.job_warm_runs < 1:
        refuse(f"--job-warm-runs must be at least 1 (got {args.job_warm_runs})")
    results_dir = Path(args.results_dir or (SMOKE_RESULTS if args.smoke else RESULTS))
    problems = [p for flag, folder in (("--results-dir", results_dir), ("--workdir", Path(args.workdir)))
                for p in [folder_problem(flag, folder)] if p]  # a file there, or no write access: not a traceback
    if problems:
        refuse("; ".join(problems))
    results_dir.mkdir(parents=True, exist_ok=True)
    if args.report:
        return report(results_dir)
    groups = args.only.split(",")
    unknown = set(groups) - set(GROUPS)
    if unknown:
        refuse(f"unknown group(s): {', '.join(sorted(unknown))}; known: {', '.join(GROUPS)}")
    wanted = set(args.runs.split(",")) if args.runs else None
    if wanted is not None:
        unknown = wanted - {spec["name"] for group in groups for spec in GROUPS[group]}
        if unknown:
            refuse(f"--runs: no row {', '.join(sorted(unknown))} in {args.only}")
        if args.results_dir is None and not args.smoke:  # a block's command and commit stand for its whole group
            refuse("--runs reruns part of a group: give --results-dir, so that results/ keeps whole groups")

    import torch

    if not torch.cuda.is_available() and not args.smoke:
        refuse("needs a CUDA GPU (--smoke runs tiny models on the CPU)")
    if "job" in groups and not args.smoke:
        benchmark_jobs.warm_bytecode()
    given = argv if argv is not None else sys.argv[1:]
    where = ("--results-dir", "--workdir")  # where the files went, not what ran: left out of the block's command
    command = " ".join(["python benchmark.py", *(a for i, a in enumerate(given) if not a.startswith(where)
                                                 and not (i and given[i - 1] in where))])
    for group in groups:
        block = header(command)
        run_group(group, results_dir / f"{FILES[group]}.json", block, Path(args.workdir), wanted, args.smoke,
                  args.job_warm_runs)
    report(results_dir)


if __name__ == "__main__":
    main()
