"""How a run ends: summary.json, the end of the W&B run, the exit code and the last line it prints."""
from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import signal
import sys
from pathlib import Path

from harness.checkpoints import CheckpointNotSaved, write_whole
from harness.cli import EXIT_OOM, RunEnded, say
from harness.clock import seconds_since_process_start


GIB = 2**30


def finish(run, failure: Exception | None, startup_seconds: float, argv) -> None:
    """Complete `run`'s summary (harness.session.Run), write summary.json and end W&B whatever happened; then exit
    as the outcome says (or return). A crash other than running out of memory is raised again, with its traceback."""
    import torch

    from harness.budget import out_of_memory

    summary, crash = run.summary, None
    if out_of_memory(failure):  # CUDA's or the CPU's
        summary["oom"] = True
    elif isinstance(failure, RunEnded):  # its line is printed; no traceback
        summary["error"] = str(failure)
    elif failure is not None:
        crash = failure
        summary["error"] = f"{type(failure).__name__}: {failure}"
    if failure is not None and run.trainer is not None:
        summary.update(steps=run.trainer.state.global_step, tokens_trained=run.trainer.tokens_trained)
    summary.update(peak_memory_gib=peak_memory_gib(run.cuda, run.world_size, run.device, failure is None),
                   startup_seconds=startup_seconds)
    if run.train_started is not None:  # setup: corpus, tokenizer, model, quantization, probe
        summary["setup_seconds"] = run.train_started - startup_seconds
        summary["setup_parts"] = run.setup_parts()
    if run.trainer is not None and summary.get("steady_tokens_per_second"):
        summary["mfu"] = run.trainer.mfu(summary["steady_tokens_per_second"])
    if run.cuda:  # times the allocator hit the cap (or the GPU's end), freed its cache and retried: slow
        summary["cuda_alloc_retries"] = torch.cuda.memory_stats().get("num_alloc_retries")
    if summary["oom"]:  # after the peak and the retries are read: the probe makes its own
        summary["micro_batch_that_fits"] = micro_batch_after_oom(run, failure)
        summary["oom_message"] = oom_line(run, failure)
    summary["job_seconds"] = seconds_since_process_start()  # until summary.json is written
    try:
        write_summary(summary, run.output_dir, run.rank, failure, run.wandb_run, run.script)
    except CheckpointNotSaved as e:  # its line is printed; a failure before it keeps its own exit code
        failure = failure if isinstance(failure, RunEnded) or summary["oom"] or crash else e
    run.trainer = run.model = None
    if crash is not None:
        raise crash
    if isinstance(failure, RunEnded):
        raise SystemExit(failure.exit_code)
    exit_as_the_outcome_says(summary, run.script, run.main_process, run.world_size, not run.args.no_checkpoints, argv)


def micro_batch_after_oom(run, failure: BaseException) -> int | None:
    """After `run` ran out of memory in training on one GPU: techniques.auto_micro_batch.micro_batch_that_fits, once the
    Trainer is dropped (run.trainer: None); None where none was probed, or where the probe failed otherwise (its
    error in the summary: the out-of-memory line still comes).

    One process only: under a launcher the others may have died, and an FSDP forward would then hang in an
    all-gather that waits for them."""
    from techniques.auto_micro_batch import micro_batch_that_fits

    import torch

    if (not run.cuda or not isinstance(failure, torch.OutOfMemoryError) or run.world_size > 1
            or run.trainer is None or run.model is None):  # the host's memory ran out, not the GPU's: no probe
        return None
    run.trainer = None  # the optimizer states, and the accelerator's references to them
    try:
        return micro_batch_that_fits(run.model, run.summary["micro_batch"], failure, run.args.seq_len,
                                     run.args.gpu_memory_gib, run.optim, run.autocast_dtype, run.device)
    except Exception as e:
        run.summary["micro_batch_probe_error"] = f"{type(e).__name__}: {e}"
        return None


def oom_line(run, failure: BaseException) -> str:
    """The line `run` ends with after running out of memory: CUDA's (harness.budget.oom_message) or, where the
    failure is not CUDA's OutOfMemoryError, the CPU's, on a GPU machine too."""
    import torch

    from harness.budget import cpu_oom_message, oom_message, state_memory_estimate_gib

    estimate = state_memory_estimate_gib(run.model, run.optim) if run.model is not None else None
    if not isinstance(failure, torch.OutOfMemoryError):
        return cpu_oom_message(run.script, estimate, run.rank, run.world_size)
    return oom_message(run.script, run.args.gpu_memory_gib, run.summary["peak_memory_gib"], estimate, run.rank,
                       run.world_size, run.summary.get("micro_batch_that_fits"))


def peak_memory_gib(cuda: bool, processes: int, device, all_processes_alive: bool) -> float | None:
    """Peak CUDA memory since the budget was applied; the maximum over the processes where all can join."""
    import torch

    if not cuda:
        return None
    peak = torch.cuda.max_memory_allocated() / GIB
    if processes > 1 and all_processes_alive:  # a failed process would not join this
        peak_over_processes = torch.tensor([peak], device=device)
        torch.distributed.all_reduce(peak_over_processes, op=torch.distributed.ReduceOp.MAX)
        peak = peak_over_processes.item()
    return peak


def write_summary(summary: dict, output_dir: Path, rank: int, failure, wandb_run, script: str) -> None:
    """summary.json from the first process (rank 0), summary-rank{rank}.json from another that failed (the first may
    never get to write its own); the W&B run, if one was started, ends with the summary. A failed write raises
    CheckpointNotSaved, with its own line unless the `failure` that ended the run printed one."""
    from harness.wandb_run import finish_wandb

    failed = failure is not None
    try:
        if rank == 0 or failed:  # whole or as before: a full disk leaves no 0-byte summary.json
            name = "summary.json" if rank == 0 else f"summary-rank{rank}.json"
            write_whole(output_dir / name, json.dumps(summary, indent=2) + "\n", output_dir,
                        quiet=isinstance(failure, RunEnded))
    finally:
        if wandb_run is not None:
            finish_wandb(wandb_run, summary, failed, script)


def exit_as_the_outcome_says(summary: dict, script: str, main_process: bool, processes: int, saved: bool,
                             argv) -> None:
    """Exit 3 after an out-of-memory, 128 + signal after Ctrl-C / SIGTERM; else print the results (first
    process). `saved`: checkpoints were saved, so the run can be resumed."""
    if summary["oom"]:
        say(summary["oom_message"])
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
    transformers created: 1.4-2.3 s of a whole job on the H200. `gc.freeze()` shortened it
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
