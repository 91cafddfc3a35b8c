"""Where a profiled step's GPU waits: read a --profile trace (DIR/trace.json.gz) and print, per CUDA stream, the
busy time; the idle time and longest gaps of the GPU's other work (kernels, copies and memsets that are not NCCL's;
"compute" below), with what ran on either side; NCCL's time and how much of it no other work overlaps; and how
much slower each kernel runs while NCCL runs beside it.

torch.profiler's chrome trace has no such summary (profile.md sums kernel time, which counts overlap twice).

    python scripts/trace_streams.py DIR/trace.json.gz [--gaps 12]
"""
from __future__ import annotations

import argparse
import gzip
import json
import statistics
from collections import defaultdict


def spans(events) -> list[tuple[float, float]]:
    return [(e["ts"], e["ts"] + e["dur"]) for e in events]


def union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def covered(intervals: list[tuple[float, float]]) -> float:
    return sum(end - start for start, end in intervals)


def overlap(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> float:
    """Time in both unions (each sorted and disjoint)."""
    i = j = 0
    total = 0.0
    while i < len(a) and j < len(b):
        total += max(0.0, min(a[i][1], b[j][1]) - max(a[i][0], b[j][0]))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return total


def kernels_of(trace_path: str) -> list[dict]:
    """The trace's GPU work: kernels, memsets and copies."""
    with gzip.open(trace_path, "rt") as f:
        events = json.load(f)["traceEvents"]
    work = [e for e in events if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memset", "gpu_memcpy")]
    if not work:
        raise SystemExit(f"{trace_path}: no GPU work in this trace (was it profiled on a GPU?)")
    return work


def report(kernels: list[dict], gaps: int) -> list[str]:
    is_nccl = lambda e: "nccl" in e["name"].lower()  # noqa: E731
    by_stream = defaultdict(list)
    for e in kernels:
        by_stream[e["args"].get("stream")].append(e)
    start = min(e["ts"] for e in kernels)
    end = max(e["ts"] + e["dur"] for e in kernels)
    lines = [f"window {(end - start) / 1e3:.1f} ms (first kernel's start to last kernel's end)", "",
             "| stream | kernels | busy ms | NCCL ms |", "|---|---|---|---|"]
    for stream, events in sorted(by_stream.items(), key=lambda kv: -len(kv[1])):
        busy = covered(union(spans(events)))
        nccl = covered(union(spans(filter(is_nccl, events))))
        lines.append(f"| {stream} | {len(events)} | {busy / 1e3:.2f} | {nccl / 1e3:.2f} |")
    compute = [e for e in kernels if not is_nccl(e)]
    compute_busy = union(spans(compute))
    nccl_busy = union(spans(filter(is_nccl, kernels)))
    shared = overlap(compute_busy, nccl_busy)
    lines += ["", f"compute busy {covered(compute_busy) / 1e3:.2f} ms, idle "
                  f"{(end - start - covered(compute_busy)) / 1e3:.2f} ms of the window",
              f"NCCL busy {covered(nccl_busy) / 1e3:.2f} ms, of which beside compute {shared / 1e3:.2f} ms, "
              f"alone (exposed) {(covered(nccl_busy) - shared) / 1e3:.2f} ms"]
    lines += gap_lines(compute, gaps, start) + contention_lines(compute, nccl_busy)
    return lines


def gap_lines(compute: list[dict], count: int, origin: float) -> list[str]:
    """The longest stretches with no compute kernel running, and the kernels on either side."""
    ordered = sorted(compute, key=lambda e: e["ts"])
    gaps, reach, before = [], None, None
    for e in ordered:
        if reach is not None and e["ts"] > reach:
            gaps.append((e["ts"] - reach, reach, before["name"], e["name"]))
        if reach is None or e["ts"] + e["dur"] > reach:
            reach, before = e["ts"] + e["dur"], e
    lines = ["", f"## Longest {count} compute gaps", "", "| gap ms | at ms | after | before |", "|---|---|---|---|"]
    lines += [f"| {g / 1e3:.2f} | {(at - origin) / 1e3:.1f} | `{a[:60]}` | `{b[:60]}` |"
              for g, at, a, b in sorted(gaps, reverse=True)[:count]]
    long = [g[0] for g in gaps if g[0] > 50]
    lines.append(f"\ngaps over 50 us: {len(long)}, together {sum(long) / 1e3:.2f} ms; "
                 f"all gaps {sum(g[0] for g in gaps) / 1e3:.2f} ms")
    return lines


def contention_lines(compute: list[dict], nccl_busy: list[tuple[float, float]]) -> list[str]:
    """Each kernel name's median duration while NCCL runs beside it and while it does not. By name only: one name
    can cover several shapes (a matmul kernel in forward and in backward), and NCCL runs beside backward's."""
    if not nccl_busy:
        return []
    alone, beside = defaultdict(list), defaultdict(list)
    for e in compute:
        shared = overlap(spans([e]), nccl_busy)
        (beside if shared > 0.5 * e["dur"] else alone)[e["name"]].append(e["dur"])
    rows = []
    for name in set(alone) & set(beside):
        a, b = statistics.median(alone[name]), statistics.median(beside[name])
        rows.append(((b - a) * len(beside[name]), name, a, b, len(beside[name])))
    lines = ["", "## Kernels slower beside NCCL (median us alone, beside, by kernel name; extra ms over the "
             "window)", "",
             "| kernel | alone us | beside us | calls beside | extra ms |", "|---|---|---|---|---|"]
    lines += [f"| `{name[:60]}` | {a:.0f} | {b:.0f} | {n} | {extra / 1e3:.2f} |"
              for extra, name, a, b, n in sorted(rows, reverse=True)[:12]]
    lines.append(f"\nall kernels' extra beside NCCL: {sum(r[0] for r in rows) / 1e3:.2f} ms")
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("trace")
    p.add_argument("--gaps", type=int, default=12)
    args = p.parse_args(argv)
    print("\n".join(report(kernels_of(args.trace), args.gaps)))


if __name__ == "__main__":
    main()
