"""scripts/memory_breakdown.py: its replay of a hand-made allocator snapshot, and its refusals on the CPU."""
import importlib.util
import os
import subprocess
import sys

import pytest

from conftest import REPO

spec = importlib.util.spec_from_file_location("memory_breakdown", REPO / "scripts" / "memory_breakdown.py")
mb = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mb)

MIB = 2**20
PACKAGES = "/venv/lib/python3.11/site-packages"


def frames(*where):
    """Frames, innermost first, from 'filename:function' strings."""
    return [{"filename": w.rsplit(":", 1)[0], "name": w.rsplit(":", 1)[1], "line": 1} for w in where]


ADAM = frames(f"{PACKAGES}/torch/optim/adam.py:_multi_tensor_adam", f"{PACKAGES}/torch/optim/optimizer.py:wrapper",
              f"{PACKAGES}/transformers/trainer.py:_inner_training_loop")
LINEAR = frames(f"{PACKAGES}/torch/nn/modules/linear.py:forward",
                f"{PACKAGES}/transformers/models/gpt_neo/modeling_gpt_neo.py:forward")
LOSS = frames(f"{PACKAGES}/torch/nn/functional.py:cross_entropy", f"{REPO}/techniques/fused_ce.py:forward")
# a virtualenv inside the repo is a library's code, not the repo's
VENV_IN_REPO = frames(f"{REPO}/.venv/lib/python3.11/site-packages/torch/nn/modules/module.py:_call_impl",
                      f"{REPO}/before_small.py:main")

TRACE = [  # device 1's events, sizes in MiB; 100 MiB at 0x1000 and 30 at 0x4000 were allocated before recording
    {"action": "alloc", "addr": 0x2000, "size": 50, "frames": LINEAR, "time_us": 1_000_000},  # 0
    {"action": "alloc", "addr": 0x5000, "size": 200, "frames": ADAM, "time_us": 1_500_000},  # 1
    {"action": "free_requested", "addr": 0x4000, "size": 30, "time_us": 1_600_000},  # 2: no longer allocated
    {"action": "oom", "device_free": 5, "size": 1000, "frames": LINEAR, "time_us": 1_800_000},  # 3: caught
    {"action": "alloc", "addr": 0x6000, "size": 20, "frames": LOSS, "time_us": 2_000_000},  # 4
    {"action": "alloc", "addr": 0x7000, "size": 40, "frames": [], "time_us": 3_000_000},  # 5: the peak, 410
    {"action": "free_completed", "addr": 0x4000, "size": 30, "time_us": 3_050_000},  # 6: reusable from now on
    {"action": "free_requested", "addr": 0x5000, "size": 200, "time_us": 3_100_000},  # 7
    {"action": "free_completed", "addr": 0x5000, "size": 200, "time_us": 3_200_000},  # 8
    {"action": "segment_alloc", "addr": 0x9000, "size": 5000, "time_us": 3_300_000},  # 9: reserved, not allocated
    {"action": "alloc", "addr": 0x5000, "size": 60, "frames": ADAM, "time_us": 3_400_000},  # 10: address reused
    {"action": "oom", "device_free": 10, "size": 500, "frames": ADAM, "time_us": 4_000_000},  # 11: the fatal one
    {"action": "free_requested", "addr": 0x6000, "size": 20, "time_us": 4_100_000},  # 12
    {"action": "free_requested", "addr": 0x5000, "size": 60, "time_us": 4_200_000},  # 13
    {"action": "alloc", "addr": 0x8000, "size": 210, "frames": VENV_IN_REPO, "time_us": 4_300_000},  # 14: 410 again
]


def in_bytes(event):
    return {**event, "size": event["size"] * MIB, **({"device_free": event["device_free"] * MIB}
                                                       if "device_free" in event else {})}


def block(address, requested, state="active_allocated", frames_=()):
    """A segment's block: the allocator rounds it up from the size requested (the trace's unit)."""
    return {"address": address, "size": requested + 2 * MIB, "requested_size": requested, "state": state,
            "frames": list(frames_)}


SNAPSHOT = {
    "device_traces": [
        [{"action": "alloc", "addr": 0xA000, "size": 999, "frames": ADAM}],  # device 0's: not this process's
        [in_bytes(e) for e in TRACE],
    ],
    "segments": [
        {"device": 1, "address": 0x1000, "total_size": 500 * MIB,
         "blocks": [block(0x1000, 100 * MIB), block(0x2000, 50 * MIB, frames_=LINEAR),
                    block(0x3000, 70 * MIB, "inactive"), block(0x7000, 40 * MIB),
                    block(0x8000, 210 * MIB, frames_=VENV_IN_REPO)]},
        {"device": 0, "address": 0xA000, "total_size": 999, "blocks": [block(0xA000, 999, frames_=ADAM)]},
    ],
}


def by_label(found):
    return {g["label"]: (g["bytes"] // MIB, g["count"]) for g in found["groups"]}


def test_labels_name_the_innermost_frame_of_the_experiments_code():
    assert mb.label(ADAM) == "torch/optim/adam.py:_multi_tensor_adam"
    assert mb.label(LINEAR) == "transformers/models/gpt_neo/modeling_gpt_neo.py:forward"
    assert mb.label(LOSS) == "techniques/fused_ce.py:forward"
    assert mb.label(VENV_IN_REPO) == "before_small.py:main"
    assert mb.label(frames("/usr/lib/python3.11/threading.py:run", "/usr/lib/python3.11/x.py:y")) == \
        "/usr/lib/python3.11/threading.py:run"  # none of ours: the innermost
    assert mb.label([]) == mb.NO_FRAMES
    assert mb.label(None) == mb.BEFORE


def test_peak_is_the_most_bytes_live_with_what_was_allocated_before_recording():
    report = mb.breakdown(SNAPSHOT, device=1, max_entries=1000)
    peak = report["peak"]
    assert peak["bytes"] == 410 * MIB and peak["event_index"] == 5  # the first time, not event 14
    assert peak["seconds_into_trace"] == pytest.approx(2.0)
    assert peak["by"] == mb.NO_FRAMES
    assert by_label(peak) == {mb.BEFORE: (100, 1), "torch/optim/adam.py:_multi_tensor_adam": (200, 1),
                              "transformers/models/gpt_neo/modeling_gpt_neo.py:forward": (50, 1),
                              mb.NO_FRAMES: (40, 1), "techniques/fused_ce.py:forward": (20, 1)}
    assert [g["label"] for g in peak["groups"]][:2] == [
        "torch/optim/adam.py:_multi_tensor_adam", mb.BEFORE]  # the most bytes first
    assert report["events"] == len(TRACE) and report["buffer_full"] is False


def test_the_last_out_of_memory_is_broken_down_as_it_happened():
    report = mb.breakdown(SNAPSHOT, device=1, max_entries=1000)
    assert report["ooms"] == [3, 11]
    oom = report["oom"]
    assert oom["event_index"] == 11 and oom["by"] == "torch/optim/adam.py:_multi_tensor_adam"
    assert oom["requested_bytes"] == 500 * MIB and oom["device_free_bytes"] == 10 * MIB
    assert oom["bytes"] == 270 * MIB
    assert by_label(oom) == {mb.BEFORE: (100, 1), "torch/optim/adam.py:_multi_tensor_adam": (60, 1),
                             "transformers/models/gpt_neo/modeling_gpt_neo.py:forward": (50, 1),
                             mb.NO_FRAMES: (40, 1), "techniques/fused_ce.py:forward": (20, 1)}


def test_without_out_of_memory_there_is_no_oom_moment_and_a_full_buffer_is_said():
    trace = [in_bytes(e) for e in TRACE[:7] if e["action"] != "oom"]
    allocs = [e for e in trace if e["action"] == "alloc"]  # all still live at this trace's end
    live_at_the_end = [block(0x1000, 100 * MIB)] + [block(e["addr"], e["size"]) for e in allocs]
    snapshot = {"device_traces": [[], trace], "segments": [{"device": 1, "blocks": live_at_the_end}]}
    report = mb.breakdown(snapshot, device=1, max_entries=len(trace))
    assert report["oom"] is None and report["ooms"] == []
    assert report["peak"]["bytes"] == 410 * MIB and report["buffer_full"] is True
    text = mb.markdown(report, rank=1, command=["before_big.py", "--max-steps", "3"])
    assert "FULL: the oldest events were dropped" in text and "Out of memory" not in text
    assert "## Peak: 0.400 GiB allocated (event 4, 2.0 s after the trace's first" in text
    assert "| 0.195 | 1 | `torch/optim/adam.py:_multi_tensor_adam` |" in text


def test_markdown_has_the_peak_and_the_out_of_memory_tables():
    report = mb.breakdown(SNAPSHOT, device=1, max_entries=1000)
    report["allocator_peaks"] = {"allocated": 15.9, "reserved": 16.0}
    text = mb.markdown(report, rank=0, command=["before_big.py"])
    assert "not full" in text and "max_memory_allocated 15.900 GiB, max_memory_reserved 16.000 GiB" in text
    assert ("## Out of memory (event 11, 3.0 s after the trace's first, in `torch/optim/adam.py:_multi_tensor_adam`; "
            "2 in all): 0.488 GiB requested with 0.264 GiB allocated and 0.010 GiB free on the device") in text
    assert text.count("**total**") == 2


def breakdown_cli(*args):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # as on a machine without a GPU, even on one with
    return subprocess.run([sys.executable, str(REPO / "scripts" / "memory_breakdown.py"), *args],
                          capture_output=True, text=True, env=env, timeout=120)


def test_without_cuda_it_refuses_in_one_line(tmp_path):
    out = tmp_path / "out"
    done = breakdown_cli(str(out), "--", str(REPO / "before_big.py"), "--max-steps", "1")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "memory_breakdown: needs a CUDA GPU (none is visible): it records the CUDA caching allocator"]
    assert not out.exists()


@pytest.mark.parametrize("args", [[], ["out"], ["out", "--"], ["out", "--", "no_such_script.py"],
                                  ["out", "--", str(REPO / "README.md")]])
def test_a_bad_command_line_is_refused_in_one_line(args):
    done = breakdown_cli(*args)
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1 and done.stderr.startswith("memory_breakdown: ")


@pytest.mark.parametrize("ending, code", [("raise SystemExit(3)", 3), ("raise RuntimeError('boom')", 1),
                                          ("return {'oom': False}", 0)])
def test_however_the_script_ends_the_files_are_written_and_its_exit_code_kept(ending, code, tmp_path, monkeypatch,
                                                                               capsys):
    import pickle
    import signal

    import torch

    script = tmp_path / f"fake_train_{code}.py"
    script.write_text(f"def main(argv):\n    assert argv == ['--max-steps', '3']\n    {ending}\n")
    recorded = {}
    monkeypatch.setattr(sys, "path", list(sys.path))  # main() puts the script's folder first
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    monkeypatch.setattr(signal, "signal", lambda *args: None)  # not this test process's SIGTERM handler
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: 15.9 * 2**30)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda: 16 * 2**30)
    monkeypatch.setattr(torch.cuda.memory, "_record_memory_history", lambda **kwargs: recorded.update(kwargs))
    monkeypatch.setattr(torch.cuda.memory, "_snapshot", lambda: SNAPSHOT)
    monkeypatch.setenv("RANK", "1")

    assert mb.main([str(tmp_path / "out"), "--", str(script), "--max-steps", "3"]) == code
    assert recorded["enabled"] == "all" and recorded["max_entries"] == mb.MAX_ENTRIES
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "breakdown-rank1.json", "breakdown-rank1.md", "snapshot-rank1.pickle"]
    assert pickle.loads((tmp_path / "out" / "snapshot-rank1.pickle").read_bytes()) == SNAPSHOT
    assert "## Out of memory (event 11" in (tmp_path / "out" / "breakdown-rank1.md").read_text()
    assert "memory_breakdown: rank 1: peak 0.40 GiB allocated" in capsys.readouterr().err
    sys.modules.pop(script.stem, None)
