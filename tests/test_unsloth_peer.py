"""peers/unsloth_peer.py on the CPU: its command line answers before torch, and without a GPU it ends in one line
and a summary.json that says why (Unsloth itself is never imported here)."""
import json
import subprocess
import sys

import pytest

from conftest import REPO

PEER = str(REPO / "peers" / "unsloth_peer.py")


def run_peer(*argv, cwd):
    return subprocess.run([sys.executable, PEER, *argv], capture_output=True, text=True, cwd=cwd)


@pytest.mark.parametrize("mode, model, micro_batch", [("full", "Qwen/Qwen2.5-0.5B", "16"),
                                                      ("qlora", "Qwen/Qwen2.5-1.5B", "32")])
def test_help_shows_each_modes_defaults(mode, model, micro_batch, tmp_path):
    done = run_peer("--mode", mode, "--help", cwd=tmp_path)
    text = " ".join(done.stdout.split())
    assert done.returncode == 0 and "--mode {full,qlora}" in text, done.stderr
    assert f"(default: {model})" in text and f"(default: {micro_batch};" in text


def test_bad_mode_exits_2_with_the_usage(tmp_path):
    done = run_peer("--mode", "lora", cwd=tmp_path)
    assert done.returncode == 2 and "argument --mode: invalid choice: 'lora'" in done.stderr


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="the CPU's ending")
def test_without_a_gpu_one_line_and_a_summary(tmp_path):
    out = tmp_path / "out"
    done = run_peer("--mode", "qlora", "--init", "random", "--wandb", "off", "--no-checkpoints", "--output-dir",
                    str(out), "--max-steps", "2", cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == ["unsloth_peer: error: Unsloth needs a CUDA GPU, and none is visible"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["error"].startswith("Unsloth needs a CUDA GPU") and summary["oom"] is False
