"""Wall-clock time since the process started: what a user waits for, imports included. No torch here."""
from __future__ import annotations

import os
import time

IMPORTED = time.perf_counter()


def seconds_since_process_start() -> float:
    """Seconds since this process started (Linux: /proc); elsewhere, since this module was imported."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22: start time, clock ticks after boot
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return time.perf_counter() - IMPORTED
