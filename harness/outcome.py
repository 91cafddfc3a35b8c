"""How a run ends: the exit code and the last line it prints."""
from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import sys

from harness.cli import EXIT_OOM


def exit_as_the_outcome_says(summary: dict, script: str, main_process: bool, processes: int, saved: bool,
                             argv) -> None:
    """Exit 3 after an out-of-memory, 128 + signal after Ctrl-C / SIGTERM; else print the results (first
    process). `saved`: checkpoints were saved, so the run can be resumed."""
    if summary["oom"]:
        print(summary["oom_message"], file=sys.stderr)
        raise SystemExit(EXIT_OOM)
    if "interrupted" in summary:
        again = [a for a in (sys.argv[1:] if argv is None else argv) if a != "--resume"]
        command = f"python {script}.py" if processes == 1 else "the same launcher command"
        if main_process:
            print(f"{script}: stopped by {summary['interrupted']} after step {summary.get('steps')}"
                  + (f"; resume with: {command} {' '.join(again + ['--resume'])}"
                     if saved else " (no checkpoints: --no-checkpoints)"), file=sys.stderr)
        raise SystemExit(128 + getattr(signal, summary["interrupted"]))
    if main_process:
        print(f"{script}: done: " + ", ".join(
            f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in summary.items()
            if k in ("tokens_per_second", "steady_tokens_per_second", "mfu", "peak_memory_gib", "train_seconds",
                     "final_train_loss", "final_eval_loss") and v is not None), file=sys.stderr)


def end_the_process(code: int | str | None) -> None:
    """Exit now with `code`, skipping the interpreter's teardown; for a script's own process, after its last line.

    Everything the run writes is written and closed by then (summary.json, metrics.jsonl, checkpoints, the W&B
    run, finished explicitly). What is left is the final garbage collection over every object torch and
    transformers created: 1.4-2.3 s of a whole job on the H200 (NOTES.md, call 14). `gc.freeze()` shortened it
    too, but left Triton's bindings printing "leaked" objects at exit; `os._exit` runs no finalizers at all.
    """
    if watched_by_a_tool():  # a profiler or coverage writes its report at exit: a normal exit, slow or not
        raise SystemExit(code)
    if not isinstance(code, int):  # SystemExit's other codes: None is success; a message is printed, and fails
        if code is not None:
            print(code, file=sys.stderr)
        code = 0 if code is None else 1
    logging.shutdown()  # flushes the log handlers, as the atexit hook would
    sys.stdout.flush()
    sys.stderr.flush()
    with contextlib.suppress(OSError, AttributeError, TypeError):  # no C library to call (Windows)
        ctypes.CDLL(None).fflush(None)  # what C and C++ libraries printed, still in the C library's buffers
    os._exit(code)


def watched_by_a_tool() -> bool:
    """A profiler, tracer, debugger or coverage tool is active (`python -m cProfile SCRIPT.py`, coverage, pdb; Nsight
    Systems and Compute, which inject a library through CUDA_INJECTION64_PATH and write their data at exit)."""
    if sys.gettrace() is not None or sys.getprofile() is not None or os.environ.get("CUDA_INJECTION64_PATH"):
        return True
    monitoring = getattr(sys, "monitoring", None)  # Python 3.12+: cProfile and coverage may use sys.monitoring
    return monitoring is not None and any(monitoring.get_tool(tool) is not None for tool in (
        monitoring.DEBUGGER_ID, monitoring.COVERAGE_ID, monitoring.PROFILER_ID))
