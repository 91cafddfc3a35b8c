"""--profile DIR: where a training step's time goes, from torch.profiler, over two optimizer steps after warm-up
(--profile-first: the first of them).

DIR/profile.md lists the GPU time by kind of kernel (matmul, attention, optimizer, ...), the top kernels, the host's
time by operator and its longest single events (a stall shows there); DIR/trace.json.gz is the whole trace
(chrome://tracing or https://ui.perfetto.dev).
"""
from __future__ import annotations

import gzip
import shutil
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

# kernel name fragments -> kind; first match wins (names from cuBLAS/CUTLASS, PyTorch, Triton, NCCL, liger, bnb)
KINDS = [("nccl", "communication (NCCL)"), ("memcpy", "memory copies"), ("memset", "memory copies"),
         ("flash", "attention"), ("fmha", "attention"), ("attention", "attention"), ("sdpa", "attention"),
         ("gemm", "matmul"), ("nvjet", "matmul"), ("cutlass", "matmul"), ("sm90_xmma", "matmul"), ("gemv", "matmul"),
         ("adam", "optimizer"), ("multi_tensor", "optimizer"), ("dequantize", "4-bit dequantize"),
         ("kdequant", "4-bit dequantize"), ("cross_entropy", "loss"), ("triton", "fused elementwise (Triton)"),
         ("reduce", "reductions and norms"), ("norm", "reductions and norms"), ("softmax", "reductions and norms")]


def kind_of(kernel: str) -> str:
    name = kernel.lower()
    return next((kind for fragment, kind in KINDS if fragment in name), "other elementwise")


class ProfileSteps(TrainerCallback):
    """Profile optimizer steps `first` and `first + 1` (1-based), then write DIR/profile.md and DIR/trace.json.gz."""

    def __init__(self, out_dir: Path, first: int = 6, steps: int = 2):
        self.out_dir, self.first, self.steps = Path(out_dir), first, steps
        self.profiler, self.started = None, None

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.first:  # the step about to run is the first profiled one
            torch.cuda.synchronize()
            self.profiler = torch.profiler.profile(
                activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA])
            self.profiler.start()
            self.started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self.profiler is not None and state.global_step == self.first + self.steps - 1:
            torch.cuda.synchronize()
            wall = time.perf_counter() - self.started
            self.profiler.stop()
            self.write(wall)
            self.profiler = None

    def host_lines(self, top: int = 15) -> list[str]:
        """The host's side: seconds by operator (self time), and the longest single events (inclusive)."""
        host = [e for e in self.profiler.key_averages() if e.device_type == torch.autograd.DeviceType.CPU]
        lines = [f"\n## Host time by operator, top {top} (self)\n", "| operator | host seconds | calls |",
                 "|---|---|---|"]
        lines += [f"| `{e.key[:90]}` | {e.self_cpu_time_total / 1e6:.4f} | {e.count} |"
                  for e in sorted(host, key=lambda e: -e.self_cpu_time_total)[:top]]
        events = [e for e in self.profiler.events() if e.device_type == torch.autograd.DeviceType.CPU]
        lines += [f"\n## Longest {top} host events (inclusive; nested events overlap)\n",
                  "| event | host ms | starts at ms |", "|---|---|---|"]
        first = min((e.time_range.start for e in events), default=0)
        lines += [f"| `{e.name[:90]}` | {e.cpu_time_total / 1e3:.1f} | {(e.time_range.start - first) / 1e3:.1f} |"
                  for e in sorted(events, key=lambda e: -e.cpu_time_total)[:top]]
        return lines

    def write(self, wall_seconds: float) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.profiler.export_chrome_trace(str(self.out_dir / "trace.json"))
        kernels = [e for e in self.profiler.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
        seconds = {e.key: e.self_device_time_total / 1e6 for e in kernels}  # microseconds in the profiler
        by_kind = {}
        for name, s in seconds.items():
            by_kind[kind_of(name)] = by_kind.get(kind_of(name), 0.0) + s
        busy = sum(seconds.values())
        lines = [f"# Profile of optimizer steps {self.first}-{self.first + self.steps - 1}\n",
                 f"Wall time {wall_seconds:.3f} s; GPU kernels {busy:.3f} s "
                 f"({busy / wall_seconds:.0%} of the wall time; streams that overlap count twice).\n",
                 "| kind | GPU seconds | share of kernel time |", "|---|---|---|"]
        lines += [f"| {k} | {s:.4f} | {s / busy:.1%} |" for k, s in sorted(by_kind.items(), key=lambda kv: -kv[1])]
        lines += ["\n## Top 25 kernels\n", "| kernel | kind | GPU seconds | calls |", "|---|---|---|---|"]
        for e in sorted(kernels, key=lambda e: -e.self_device_time_total)[:25]:
            lines.append(f"| `{e.key[:90]}` | {kind_of(e.key)} | {e.self_device_time_total / 1e6:.4f} | {e.count} |")
        lines += self.host_lines()
        (self.out_dir / "profile.md").write_text("\n".join(lines) + "\n")
        with open(self.out_dir / "trace.json", "rb") as raw, gzip.open(self.out_dir / "trace.json.gz", "wb") as packed:
            shutil.copyfileobj(raw, packed)
        (self.out_dir / "trace.json").unlink()
