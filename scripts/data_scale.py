"""How the data path scales with the corpus: wall clock, CPU seconds and peak memory of whole runs on the CPU.

Corpora of 100 MB to 1 GB are made by repeating corpus.json's records with new numbering ("copy N: ..."), as
JSON Lines (with --extras, 200 MB also as a JSON list). Each run is `--model tiny --max-steps 1` (the eval-share
run: 2 steps) with a micro-batch of 2, cold (empty cache) or warm (the cache of the cold run). Results go to
results/data_scale.md. Runs already in --work's rows.json are kept, not run again: a plan can be finished later.

    python scripts/data_scale.py --work /tmp/data-scale     # the default plan: hours on 2 shared cores
    python scripts/data_scale.py --work /tmp/data-scale --no-1gb --eval-share-mb 0
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
GIB = 2**30
RUN = ["--model", "tiny", "--micro-batch", "2", "--wandb", "off", "--no-checkpoints"]
# one torch thread: on cores shared with other jobs, two OpenMP threads that wait on each other made the tiny
# model's evaluation 25x slower (195 s instead of 8 s for 1,024 blocks); tokenizing workers are processes
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def make_corpus(size_mb: int, form: str, out: Path) -> Path:
    """corpus.json's records repeated, each copy numbered, until `size_mb` MB; written record by record."""
    if out.exists():
        return out
    records = json.loads((REPO / "corpus.json").read_text())
    tmp = out.with_name(out.name + ".tmp")
    with tmp.open("w") as f:
        f.write("[\n" if form == "json" else "")
        copy, separator = 0, ""
        while f.tell() < size_mb * 10**6:
            for record in records:
                line = json.dumps({"text": f"copy {copy}: {record['text']}"}, ensure_ascii=False)
                f.write(separator + line + ("" if form == "json" else "\n"))
                separator = ",\n" if form == "json" else ""
            copy += 1
        f.write("\n]\n" if form == "json" else "")
    tmp.replace(out)
    return out


class TreeMemory(threading.Thread):
    """The peak, over time, of the summed PSS of a process and its descendants (forked workers share pages)."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.peak_bytes, self.done = pid, 0, threading.Event()
        self.start()

    def run(self):
        while not self.done.wait(0.5):
            try:
                root = psutil.Process(self.pid)
                tree = [root, *root.children(recursive=True)]
            except psutil.Error:
                continue
            total = 0
            for process in tree:
                try:
                    total += process.memory_full_info().pss
                except psutil.Error:
                    pass
            self.peak_bytes = max(self.peak_bytes, total)


def measure(script: str, corpus: Path, cache: Path, out: Path, steps: int, log: Path) -> dict:
    """One run: wall seconds, CPU seconds, peak RSS of its largest process and peak summed PSS of its tree."""
    argv = [sys.executable, str(REPO / f"{script}.py"), *RUN, "--corpus", str(corpus), "--max-steps", str(steps),
            "--cache-dir", str(cache), "--output-dir", str(out)]
    start, load_before = time.perf_counter(), os.getloadavg()[0]
    with log.open("w") as stderr:
        process = subprocess.Popen(["nice", *argv], stdout=stderr, stderr=stderr, env=ENV)
        tree = TreeMemory(process.pid)
        _, status, usage = os.wait4(process.pid, 0)  # this run's usage, its waited-for workers included
    wall = time.perf_counter() - start
    tree.done.set()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{script} on {corpus} failed; see {log}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "peak_rss_gib": usage.ru_maxrss * 1024 / GIB,
            "tree_pss_gib": tree.peak_bytes / GIB, "eval_s": sum(r.get("eval_runtime", 0) for r in rows),
            "load": (load_before + os.getloadavg()[0]) / 2}


def versions() -> str:
    import datasets
    import tokenizers
    import torch
    import transformers

    return (f"Python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, "
            f"datasets {datasets.__version__}, tokenizers {tokenizers.__version__}, pyarrow "
            f"{__import__('pyarrow').__version__}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[100, 200], help="JSON Lines corpora to run, in MB")
    p.add_argument("--eval-share-mb", type=int, default=160, help="corpus of the 2-step eval-share run (0: none)")
    p.add_argument("--no-1gb", action="store_true", help="skip the 1 GB JSON Lines run (the longest)")
    p.add_argument("--extras", action="store_true", help="also 200 MB as a JSON list, and padded (before_small)")
    p.add_argument("--work", default=None, help="folder for corpora, caches and runs (default: a new temp folder)")
    p.add_argument("--out", default=str(REPO / "results" / "data_scale.md"))
    p.add_argument("--table-only", action="store_true", help="rewrite --out from --work's rows.json, run nothing")
    args = p.parse_args(argv)
    work = Path(args.work or tempfile.mkdtemp(prefix="data-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.table_only:
        rows = json.loads((work / "rows.json").read_text())
        return write_table(rows, Path(args.out), (work / "command.txt").read_text())
    command = " ".join(sys.argv[1:] if argv is None else argv)
    (work / "command.txt").write_text(command)

    rows = json.loads((work / "rows.json").read_text()) if (work / "rows.json").exists() else []

    def run(label, script, corpus, mb, steps=1, warm=True):
        cache = work / f"cache-{label}"
        for phase in ("cold", "warm") if warm else ("cold",):
            if any(r["corpus"] == label and r["phase"] == phase for r in rows):
                continue  # measured by an earlier run of this command with this --work
            out = work / f"run-{label}-{phase}"
            result = measure(script, corpus, cache, out, steps, work / f"{label}-{phase}.log")
            rows.append({"corpus": label, "mb": mb, "script": script, "steps": steps, "phase": phase, **result})
            print(json.dumps(rows[-1]), file=sys.stderr)
            (work / "rows.json").write_text(json.dumps(rows, indent=1))

    run("corpus.json", "lightweight_small", REPO / "corpus.json", 1.6)
    for mb in args.sizes:
        corpus = make_corpus(mb, "jsonl", work / f"corpus-{mb}mb.jsonl")
        run(f"{mb} MB JSON Lines", "lightweight_small", corpus, mb)
        if mb == 200 and args.extras:
            run("200 MB JSON list", "lightweight_small", make_corpus(mb, "json", work / "corpus-200mb.json"), mb,
                warm=False)
            run("200 MB JSON Lines, padded", "before_small", corpus, mb, warm=False)
    if args.eval_share_mb:
        mb = args.eval_share_mb
        corpus = make_corpus(mb, "jsonl", work / f"corpus-{mb}mb.jsonl")
        run(f"{mb} MB JSON Lines, 2 steps", "lightweight_small", corpus, mb, steps=2, warm=False)
    if not args.no_1gb:
        run("1 GB JSON Lines", "lightweight_small", make_corpus(1000, "jsonl", work / "corpus-1000mb.jsonl"), 1000,
            warm=False)
    write_table(rows, Path(args.out), command)


def write_table(rows: list[dict], out: Path, command_args: str) -> None:
    cpu = platform.processor() or platform.machine()
    lines = [
        "# Data path against corpus size",
        "",
        f"Measured {datetime.now(timezone.utc):%Y-%m-%d} on a CPU machine ({os.cpu_count()} cores shared with other "
        f"jobs, {psutil.virtual_memory().total / GIB:.0f} GiB, {cpu}); {versions()}.",
        f"Command: `python scripts/data_scale.py {command_args}`. Each run: `--model tiny --micro-batch 2 --max-steps "
        "N`, nice'd, OMP_NUM_THREADS=1. Cold: an empty `--cache-dir`; warm: the same command again.",
        "Peak RSS: the largest single process (`wait4`'s ru_maxrss, tokenizing workers included); tree PSS: the "
        "peak of the summed proportional memory of the run's processes, sampled every 0.5 s. Load: the machine's "
        "1-minute load average (start and end); above the core count, wall time includes waiting for a core, and "
        "CPU seconds are the steadier measure.",
        "",
        "| corpus | script | steps | phase | wall s | CPU s | s per MB (wall) | peak RSS GiB | tree PSS GiB "
        "| eval s (share) | wall less eval s | load |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        load = f"{r['load']:.1f}" if "load" in r else "not kept"  # rows.json of an older data_scale.py
        lines.append(f"| {r['corpus']} | {r['script']} | {r['steps']} | {r['phase']} | {r['wall_s']:.0f} | "
                     f"{r['cpu_s']:.0f} | {r['wall_s'] / r['mb']:.2f} | {r['peak_rss_gib']:.2f} | "
                     f"{r['tree_pss_gib']:.2f} | {r['eval_s']:.1f} ({r['eval_s'] / r['wall_s']:.1%}) | "
                     f"{r['wall_s'] - r['eval_s']:.0f} | {load} |")
    out.write_text("\n".join(lines + ["", *targets(rows)]) + "\n")
    print(f"wrote {out}", file=sys.stderr)


def targets(rows: list[dict]) -> list[str]:
    """The data path's targets, checked against the rows that measure them (a missing run says so)."""
    def row(corpus, phase="cold"):
        return next((r for r in rows if r["corpus"] == corpus and r["phase"] == phase), None)

    def check(name, value, ok, target):
        return (f"| {name} | {target} | not measured |" if value is None else
                f"| {name} | {target} | {value} {'(met)' if ok else '(MISSED)'} |")

    lines = ["| target | wanted | measured |", "|---|---|---|"]
    for corpus in ("200 MB JSON Lines", "1 GB JSON Lines"):
        r = row(corpus)
        lines.append(check(f"peak RSS, {corpus}, cold", r and f"{r['peak_rss_gib']:.2f} GiB",
                           r and r["peak_rss_gib"] <= 4, "<= 4 GiB"))
    r = next((r for r in rows if r["steps"] == 2), None)
    lines.append(check(f"evaluation share, {r['corpus'] if r else '160 MB, 2 steps'}",
                       r and f"{r['eval_s'] / r['wall_s']:.1%}", r and r["eval_s"] / r["wall_s"] <= 0.10, "<= 10%"))
    warm, base = row("200 MB JSON Lines", "warm"), row("corpus.json", "warm")
    lines.append(check("warm start, 200 MB (corpus.json warm)", warm and base and
                       f"{warm['wall_s']:.0f} s ({base['wall_s']:.0f} s)",
                       warm and base and warm["wall_s"] <= 60 and warm["wall_s"] - base["wall_s"] <= 20,
                       "<= 60 s and <= corpus.json's + 20 s"))
    small = row("100 MB JSON Lines")
    for corpus in ("1 GB JSON Lines", "200 MB JSON Lines"):
        big = row(corpus)
        wall, cpu = [small and big and (big[k] / big["mb"]) / (small[k] / small["mb"]) for k in ("wall_s", "cpu_s")]
        lines.append(check(f"cold s/MB, {corpus} over 100 MB: wall (CPU)", wall and f"{wall:.2f} ({cpu:.2f})",
                           wall and wall <= 1.5, "<= 1.5" + ("" if corpus.startswith("1 GB") else " (not a target)")))
    return lines


if __name__ == "__main__":
    main()
