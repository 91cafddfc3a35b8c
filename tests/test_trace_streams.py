"""scripts/trace_streams.py: where the GPU waits, read from a hand-made chrome trace."""
import gzip
import importlib.util
import json

import pytest
from conftest import REPO

spec = importlib.util.spec_from_file_location("trace_streams", REPO / "scripts" / "trace_streams.py")
trace_streams = importlib.util.module_from_spec(spec)
spec.loader.exec_module(trace_streams)


def kernel(name, start, duration, stream):
    return {"ph": "X", "cat": "kernel", "name": name, "ts": start, "dur": duration, "args": {"stream": stream}}


def test_idle_exposed_communication_and_contention(tmp_path, capsys):
    """Compute runs 0-240 and 330-430 us on stream 7; NCCL 110-200 (beside a matmul for most of it) and 430-470
    (alone); the same matmul takes 100 us alone and 140 beside NCCL."""
    events = [kernel("gemm", 0, 100, 7), kernel("gemm", 100, 140, 7), kernel("ncclAllReduce", 110, 90, 20),
              kernel("gemm", 330, 100, 7), kernel("ncclAllReduce", 430, 40, 20),
              {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 1000}]  # the host's: left out
    path = tmp_path / "trace.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events}, f)
    trace_streams.main([str(path)])
    out = capsys.readouterr().out
    assert "window 0.5 ms" in out  # 0 to 470 us
    assert "compute busy 0.34 ms, idle 0.13 ms" in out  # idle: 240-330 and 430-470
    assert "NCCL busy 0.13 ms, of which beside compute 0.09 ms, alone (exposed) 0.04 ms" in out
    assert "| 0.09 | 0.2 | `gemm` | `gemm` |" in out  # the one gap between compute kernels: 90 us, at 240 us
    assert "| `gemm` | 100 | 140 | 1 | 0.04 |" in out  # beside NCCL: 40 us slower, once


def test_a_trace_without_gpu_work_is_refused(tmp_path):
    path = tmp_path / "trace.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": [{"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 5}]}, f)
    with pytest.raises(SystemExit, match="no GPU work"):
        trace_streams.main([str(path)])
