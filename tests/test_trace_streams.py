"""scripts/trace_streams.py: where the GPU waits, read from a hand-made chrome trace."""
import gzip
import importlib.util
import json

from conftest import REPO

spec = importlib.util.spec_from_file_location("trace_streams", REPO / "scripts" / "trace_streams.py")
trace_streams = importlib.util.module_from_spec(spec)
spec.loader.exec_module(trace_streams)


def kernel(name, start, duration, stream):
    return {"ph": "X", "cat": "kernel", "name": name, "ts": start, "dur": duration, "args": {"stream": stream}}


def test_idle_exposed_communication_and_contention(tmp_path, capsys):
    """Compute runs 0-250 and 300-400 us on stream 7; NCCL 110-200 (beside a matmul for most of it) and 400-450 (alone); the
    same matmul takes 100 us alone and 150 beside NCCL."""
    events = [kernel("gemm", 0, 100, 7), kernel("gemm", 100, 150, 7), kernel("ncclAllReduce", 110, 90, 20),
              kernel("gemm", 300, 100, 7), kernel("ncclAllReduce", 400, 50, 20),
              {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 1000}]  # a host event: not counted
    path = tmp_path / "trace.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events}, f)
    trace_streams.main([str(path)])
    out = capsys.readouterr().out
    assert "window 0.5 ms" in out  # 0 to 450 us
    assert "compute kernels busy 0.35 ms, idle 0.10 ms" in out  # idle: 250-300 and 400-450
    assert "NCCL busy 0.14 ms, of which beside compute 0.09 ms, alone (exposed) 0.05 ms" in out
    assert "| 0.05 | 0.2 | `gemm` | `gemm` |" in out  # the one gap between compute kernels, at 250 us
    assert "| `gemm` | 100 | 150 | 1 | 0.05 |" in out  # beside NCCL: 50 us slower, once
