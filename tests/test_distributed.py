"""Data-parallel training: two processes (torchrun, gloo on the CPU) train exactly as one process does.

Each script is run twice as a subprocess, by `torchrun --standalone`: with one process, and with two. Both see
the same rows per optimizer step (two processes take alternate micro-batches, each with half the accumulation),
so with a model without dropout the per-step losses and gradient norms must agree: that holds only if DDP
averages the gradients and the loss is divided by the tokens of the whole step over both processes.
"""
import json
import subprocess
import sys

import pytest

from conftest import REPO, SMALL_CORPUS
from wandb_records import read_offline_run

SIZES = ["--model", "tiny", "--seq-len", "128", "--micro-batch", "2", "--tokens-per-step", "1024",
         "--max-steps", "2", "--wandb", "offline"]


@pytest.fixture(scope="module")
def short_records_corpus(tmp_path_factory):
    """Records of many lengths, most shorter than a row: padded batches hold different numbers of real tokens."""
    texts = [r["text"] for r in json.loads(SMALL_CORPUS.read_text())]
    path = tmp_path_factory.mktemp("corpus") / "short.json"
    path.write_text(json.dumps([{"text": t[: 40 + (i * 53) % 400]} for i, t in enumerate(texts)]))
    return path


def launch(script, processes, out, cache_dir, corpus):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               str(REPO / f"{script}.py"), *SIZES, "--corpus", str(corpus), "--output-dir", str(out),
               "--cache-dir", str(cache_dir)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return json.loads((out / "summary.json").read_text()), [r for r in rows if "loss" in r], done.stderr


@pytest.mark.parametrize("script", ["before_big", "lightweight_big"])  # GPT-Neo: no dropout, so runs can agree
def test_two_processes_train_as_one(script, tmp_path, cache_dir, short_records_corpus):
    one, one_rows, _ = launch(script, 1, tmp_path / "one", cache_dir, short_records_corpus)
    two, two_rows, stderr = launch(script, 2, tmp_path / "two", cache_dir, short_records_corpus)

    assert one["processes"] == 1 and two["processes"] == 2
    assert two["parallelism"] == "MULTI_CPU"  # DistributedDataParallel over gloo
    assert "total over the processes" in two["how_measured"]
    assert stderr.count("micro-batch 2 x 128 x 2 accumulation x 2 processes") == 1  # printed once, by rank 0
    assert two["tokens_trained"] == one["tokens_trained"] > 0
    if script == "before_big":  # padded rows: fewer real tokens than slots, so the normalization is exercised
        assert one["tokens_trained"] < 2 * 8 * 127
    # one metrics row per step (written by one process), the same numbers as one process
    assert [r["step"] for r in two_rows] == [r["step"] for r in one_rows] == [1, 2]
    for a, b in zip(one_rows, two_rows):
        assert b["tokens_trained"] == a["tokens_trained"]
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    assert two["eval_blocks"] == one["eval_blocks"] and two["eval_blocks"] % 2 == 0  # so eval losses can agree
    assert two["final_eval_loss"] == pytest.approx(one["final_eval_loss"], rel=1e-5)

    (run_dir,) = (tmp_path / "two" / "wandb").glob("offline-run-*")  # one W&B run, not one per process
    record = read_offline_run(run_dir)
    assert len([h for h in record["history"] if "train/loss" in h]) == 2
    assert json.loads(record["config"]["processes"]) == 2
    (checkpoint,) = (tmp_path / "two").glob("checkpoint-*")
    assert (checkpoint / "trainer_state.json").exists()


def test_tokens_per_step_must_split_over_the_processes(tmp_path, cache_dir, monkeypatch):
    """Accumulation adapts to the number of processes; a step that cannot be split evenly is refused."""
    import before_big

    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(SystemExit) as stopped:
        before_big.main(["--model", "tiny", "--seq-len", "128", "--micro-batch", "2", "--tokens-per-step", "1024",
                         "--output-dir", str(tmp_path / "out"), "--cache-dir", str(cache_dir)])
    assert stopped.value.code == 2
    assert not (tmp_path / "out").exists()


def test_held_out_blocks_fill_whole_steps_over_the_processes():
    """Each process evaluates one block per step; blocks that would leave a last step part-filled are dropped
    (accelerate would fill it with repeated blocks, counted twice in the eval loss)."""
    import datasets

    import common

    blocks = datasets.Dataset.from_dict({"input_ids": [[i] * 4 for i in range(5)]})
    assert len(common.blocks_in_whole_steps(blocks, 1)) == 5
    assert len(common.blocks_in_whole_steps(blocks, 2)) == 4
    assert common.blocks_in_whole_steps(blocks, 3)["input_ids"] == blocks[:3]["input_ids"]
    assert len(common.blocks_in_whole_steps(blocks.select([0]), 2)) == 0  # run() refuses this corpus (exit 2)
