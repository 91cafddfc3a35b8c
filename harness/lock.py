"""One run per output folder: an exclusive flock on OUTPUT_DIR/.lock, held by the run's first process until it ends.

The kernel releases a flock when its process dies, kill -9 included: a killed run's lock is simply taken over, and
there is no stale lock file to judge by a pid that may have been reused.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

from harness.cli import InputError

LOCK = ".lock"


def lock_output_dir(out: Path, script: str):
    """`out`'s lock, held (the folder made where missing): an open file, to close when the run ends. A run that
    holds it already is named in an InputError (one line, exit 2) before this one reads or writes anything else."""
    import fcntl

    out.mkdir(parents=True, exist_ok=True)
    held = open(out / LOCK, "a+")
    try:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        held.seek(0)
        holder = held.read().strip() or "another process"
        held.close()
        raise InputError(f"--output-dir {out} is in use by {holder}, which is still running: wait for it to end "
                         f"(or stop it), or choose another --output-dir") from None
    with contextlib.suppress(OSError):  # who holds it, for the refusal above; a full disk only loses the name
        held.truncate(0)
        held.write(f"{script} (pid {os.getpid()})\n")
        held.flush()
    return held
