"""Where a process's CUDA memory goes at its peak (and at an out-of-memory error) while a training script runs.

    python scripts/memory_breakdown.py OUT_DIR -- before_big.py --max-steps 3 ...
    accelerate launch --config_file configs/accelerate/fsdp.yaml --num_processes 2 \\
        scripts/memory_breakdown.py OUT_DIR -- before_big.py --max-steps 3 ...

Each process records the CUDA allocator's history from before the script starts, runs the script's main() in
process, and then, however the script ended, writes to OUT_DIR: breakdown-rank{R}.md and .json (the allocations
live at the peak, and at the last out-of-memory error, grouped by the code that made them) and
snapshot-rank{R}.pickle (for pytorch.org/memory_viz). The exit code is the script's (3: out of memory).
"""
from __future__ import annotations

import importlib
import json
import os
import pickle
import signal
import sys
import traceback
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # the harness, and the training scripts beside it

from harness.cli import refuse  # noqa: E402  (no torch: a bad command line is answered at once)

MAX_ENTRIES = 1_000_000  # allocator events kept (a ring buffer); a 3-step run of before_big needs far fewer
LIBRARIES = ("transformers/", "peft/", "accelerate/", "torch/distributed/fsdp/", "torch/optim/")
BEFORE = "allocated before recording"
NO_FRAMES = "no Python frame (C++: e.g. autograd's backward thread)"
TOP = 25
GIB = 2**30


def where(filename: str) -> tuple[str, bool]:
    """(the file as a reader knows it: relative to site-packages or the repo; whether it is the experiment's code:
    the repo's or that of a library it is made with)."""
    for packages in ("site-packages/", "dist-packages/"):  # first: a virtualenv may live inside the repo
        if packages in filename:
            path = filename.rsplit(packages, 1)[1]
            return path, path.startswith(LIBRARIES)
    if filename.startswith(f"{REPO}/"):
        return os.path.relpath(filename, REPO), True
    return filename, False


def label(frames: list[dict] | None) -> str:
    """'file:function' of the innermost frame (frames[0]) of the experiment's code, else of the innermost frame.
    None: the allocation predates the trace."""
    if frames is None:
        return BEFORE
    if not frames:
        return NO_FRAMES
    placed = [(*where(f["filename"]), f["name"]) for f in frames]
    path, _, function = next((p for p in placed if p[1]), placed[0])
    return f"{path}:{function}"


def live_before_trace(trace: list[dict], blocks: list[dict]) -> dict:
    """addr -> (size, frames) of allocations live when the trace begins: those freed in it before any alloc at
    their address, and the snapshot's allocated blocks that no alloc in it made."""
    allocated, before = set(), {}
    for event in trace:
        if event["action"] == "alloc":
            allocated.add(event["addr"])
        elif event["action"] == "free_requested" and event["addr"] not in allocated:
            before.setdefault(event["addr"], (event["size"], None))
    for block in blocks:
        if block["state"] == "active_allocated" and block["address"] not in allocated:
            before[block["address"]] = (block.get("requested_size", block["size"]), block.get("frames") or None)
    return before


def replay(trace: list[dict], initial: dict, stop: int) -> tuple[dict, int, int]:
    """(live allocations after trace[:stop], the most bytes live on the way, the index of the event that first
    reached them: -1 if it was before the trace). Memory counts as allocated from alloc to free_requested, as
    torch.cuda.memory_allocated() counts it, but in the bytes requested: the trace's unit."""
    live = dict(initial)
    total = peak = sum(size for size, _ in live.values())
    peak_index = -1
    for i, event in enumerate(trace[:stop]):
        if event["action"] == "alloc":
            live[event["addr"]] = (event["size"], event.get("frames", []))
            total += event["size"]
        elif event["action"] == "free_requested" and event["addr"] in live:
            total -= live.pop(event["addr"])[0]
        if total > peak:
            peak, peak_index = total, i
    return live, peak, peak_index


def groups(live: dict) -> list[dict]:
    """The live allocations grouped by label, the most bytes first."""
    by_label = defaultdict(lambda: [0, 0])
    for size, frames in live.values():
        by_label[label(frames)][0] += size
        by_label[label(frames)][1] += 1
    rows = [{"label": name, "bytes": size, "gib": size / GIB, "count": count}
            for name, (size, count) in by_label.items()]
    return sorted(rows, key=lambda row: -row["bytes"])


def moment(trace: list[dict], live: dict, index: int) -> dict:
    """What was live just after trace[index], with the code that made that event."""
    event = trace[index] if index >= 0 else {}
    seconds = (event["time_us"] - trace[0]["time_us"]) / 1e6 if "time_us" in event and "time_us" in trace[0] else None
    by = label(event.get("frames", [])) if index >= 0 else BEFORE
    return {"event_index": index, "seconds_into_trace": seconds, "by": by,
            "bytes": sum(size for size, _ in live.values()), "groups": groups(live)}


def breakdown(snapshot: dict, device: int, max_entries: int) -> dict:
    """Replay `device`'s trace of a torch.cuda.memory._snapshot(): the live allocations at the peak and at the
    last out-of-memory error (None if there was none), grouped by the code that allocated them."""
    traces = snapshot["device_traces"]
    trace = traces[device] if device < len(traces) else []
    blocks = [b for s in snapshot["segments"] if s.get("device", device) == device for b in s["blocks"]]
    initial = live_before_trace(trace, blocks)
    _, _, peak_index = replay(trace, initial, len(trace))
    report = {"device": device, "events": len(trace), "max_entries": max_entries,
              "buffer_full": len(trace) >= max_entries,
              "peak": moment(trace, replay(trace, initial, peak_index + 1)[0], peak_index),
              "ooms": [i for i, e in enumerate(trace) if e["action"] == "oom"], "oom": None}
    if report["ooms"]:
        index = report["ooms"][-1]  # earlier ones were caught and survived (a micro-batch probe, say)
        report["oom"] = moment(trace, replay(trace, initial, index)[0], index)
        report["oom"].update(requested_bytes=trace[index]["size"], device_free_bytes=trace[index].get("device_free"))
    return report


def table(found: dict) -> list[str]:
    """Markdown rows: the TOP groups, the rest in one row, the total."""
    rows = found["groups"]
    lines = ["| GiB | count | allocated by |", "| ---: | ---: | --- |"]
    lines += [f"| {r['gib']:.3f} | {r['count']} | `{r['label']}` |" for r in rows[:TOP]]
    if rows[TOP:]:
        rest = rows[TOP:]
        lines.append(f"| {sum(r['gib'] for r in rest):.3f} | {sum(r['count'] for r in rest)} | "
                     f"{len(rest)} other groups |")
    return lines + [f"| {found['bytes'] / GIB:.3f} | {sum(r['count'] for r in rows)} | **total** |", ""]


def when(found: dict) -> str:
    seconds = found["seconds_into_trace"]
    if found["event_index"] < 0:
        return "before the trace's first event"
    return f"event {found['event_index']:,}" + ("" if seconds is None else f", {seconds:.1f} s after the trace's first")


def markdown(report: dict, rank: int, command: list[str]) -> str:
    buffer = (f"FULL: the oldest events were dropped, so '{BEFORE}' also holds what was allocated before the "
              f"oldest event kept" if report["buffer_full"] else "not full: every event since recording began")
    peak = report["peak"]
    lines = [f"# Memory breakdown, rank {rank} (cuda:{report['device']})", "", f"    {' '.join(command)}", "",
             f"{report['events']:,} allocator events; ring buffer of {report['max_entries']:,}: {buffer}.", "",
             "Sizes are the bytes requested (the trace's unit): the allocator rounds each block up, so its own "
             "counters read a little higher" + ("" if "allocator_peaks" not in report else
             ": max_memory_allocated {allocated:.3f} GiB, max_memory_reserved {reserved:.3f} GiB (since the "
             "script last reset them)".format(**report["allocator_peaks"])) + ".", "",
             f"## Peak: {peak['bytes'] / GIB:.3f} GiB allocated ({when(peak)}; reached by an allocation in "
             f"`{peak['by']}`)", "", *table(peak)]
    if report["oom"]:
        oom = report["oom"]
        free = oom["device_free_bytes"]
        lines += [f"## Out of memory ({when(oom)}, in `{oom['by']}`; {len(report['ooms'])} in all): "
                  f"{oom['requested_bytes'] / GIB:.3f} GiB requested with {oom['bytes'] / GIB:.3f} GiB allocated"
                  + (f" and {free / GIB:.3f} GiB free on the device" if free is not None else ""), "", *table(oom)]
    return "\n".join(lines)


def write_outputs(out_dir: Path, rank: int, command: list[str]) -> None:
    """This process's breakdown (.md, .json), then the snapshot itself, written even if the breakdown fails."""
    import torch

    # when one process exits the launcher SIGTERMs the others (SIGKILL after TORCH_ELASTIC_SHUTDOWN_TIMEOUT):
    # one that ran out of memory too is writing these files
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    snapshot = torch.cuda.memory._snapshot()
    try:
        report = breakdown(snapshot, torch.cuda.current_device(), MAX_ENTRIES)
        report["allocator_peaks"] = {"allocated": torch.cuda.max_memory_allocated() / GIB,
                                     "reserved": torch.cuda.max_memory_reserved() / GIB}
        (out_dir / f"breakdown-rank{rank}.json").write_text(json.dumps(report, indent=1) + "\n")
        (out_dir / f"breakdown-rank{rank}.md").write_text(markdown(report, rank, command) + "\n")
        print(f"memory_breakdown: rank {rank}: peak {report['peak']['bytes'] / GIB:.2f} GiB allocated; see "
              f"{out_dir}/breakdown-rank{rank}.md", file=sys.stderr)
    finally:
        with open(out_dir / f"snapshot-rank{rank}.pickle", "wb") as f:
            pickle.dump(snapshot, f)


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        refuse("memory_breakdown: usage: python scripts/memory_breakdown.py OUT_DIR -- SCRIPT.py [script args...]")
    out_dir, command = Path(argv[0]), argv[2:] if argv[1] == "--" else argv[1:]  # a launcher may eat the "--"
    script = Path(command[0]) if command else Path("")
    if script.suffix != ".py" or not script.is_file():
        refuse(f"memory_breakdown: no training script {str(script)!r}: give SCRIPT.py after OUT_DIR --")
    import torch

    if not torch.cuda.is_available():
        refuse("memory_breakdown: needs a CUDA GPU (none is visible): it records the CUDA caching allocator")
    rank = int(os.environ.get("RANK", "0"))
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))  # the script's own device, before recording
    # private APIs, but the documented way ("Understanding CUDA Memory Usage"); python stacks, only for allocs:
    # C++ frames make the snapshot slow to symbolize and large, and a free's stack says nothing we use
    torch.cuda.memory._record_memory_history(enabled="all", context="alloc", stacks="python",
                                             max_entries=MAX_ENTRIES)
    sys.path.insert(0, str(script.resolve().parent))  # the repo root, for the repo's scripts
    sys.argv = [str(script), *command[1:]]
    code = 1
    try:
        module = importlib.import_module(script.stem)
        module.main(command[1:])
        code = 0
    except SystemExit as e:  # exit_as_the_outcome_says raises it, even on success; 3 after out of memory
        code = e.code
    except BaseException:  # a crash (or Ctrl-C) still leaves its breakdown
        traceback.print_exc()
    finally:
        try:
            write_outputs(out_dir, rank, command)
        except Exception:  # a bug here: its traceback, but the script's exit code
            traceback.print_exc()
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
