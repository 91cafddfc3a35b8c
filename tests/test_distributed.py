"""Data-parallel training: two processes (torchrun, gloo on the CPU) train exactly as one process does.

Each script is run twice as a subprocess, by `torchrun --standalone`: with one process, and with two. Both see
the same rows per optimizer step (two processes take alternate micro-batches, each with half the accumulation),
so with a model without dropout the per-step losses and gradient norms must agree: that holds only if DDP
averages the gradients and the loss is divided by the tokens of the whole step over both processes.
"""
import json
import re
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
    assert two["ddp_gradient_as_bucket_view"] is True  # MeasuringTrainer's: no second copy of the gradients
    assert "total over the processes" in two["how_measured"] and "GPU" not in two["how_measured"]
    assert stderr.count("micro-batch 2 (given by --micro-batch) x 128 x ") == 1  # printed once, by rank 0
    assert stderr.count(" accumulation x 2 processes") == 1
    assert two["tokens_trained"] == one["tokens_trained"] > 0
    if script == "before_big":  # padded rows: fewer real tokens than slots, so the normalization is exercised
        assert two["gradient_accumulation"] * 2 == one["gradient_accumulation"]  # the same rows per step
        assert one["tokens_trained"] < 2 * 2 * one["gradient_accumulation"] * 127  # steps x rows x predicted slots
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
    assert (tmp_path / "two" / "adapter_model.safetensors" if script == "lightweight_big" else
            tmp_path / "two" / "model.safetensors").exists()  # the trained model, saved once, at the end


@pytest.mark.parametrize("bad, error", [(["--max-steps", "0"], "before_small: error: --max-steps must be positive"),
                                        (["--no-such-flag"], "before_small.py: error: unrecognized arguments")])
def test_a_refusal_under_torchrun_is_printed_once(bad, error, tmp_path, cache_dir):
    """Each process refuses (exit 2); only the first prints. The launcher then reports the failed child and
    exits with its own code, 1 (torchrun's: any child failed), naming the child's exit code 2."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(REPO / "before_small.py"), "--model", "tiny", "--output-dir", str(tmp_path / "out"),
               "--cache-dir", str(cache_dir), *bad]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr[-3000:]
    assert done.stderr.count(error) == 1, done.stderr[-3000:]
    assert re.search(r"exitcode\s*:\s*2", done.stderr)
    assert not (tmp_path / "out").exists()


def test_tokens_per_step_must_split_over_the_processes(tmp_path, cache_dir, monkeypatch):
    """Packed rows: accumulation = tokens-per-step / (micro-batch x seq-len x processes); a step that cannot be
    split evenly is refused (padded rows accumulate by their tokens instead, see test_step_size.py)."""
    import lightweight_small

    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(SystemExit) as stopped:
        lightweight_small.main(["--model", "tiny", "--seq-len", "128", "--micro-batch", "2", "--tokens-per-step", "1024",
                                "--output-dir", str(tmp_path / "out"), "--cache-dir", str(cache_dir)])
    assert stopped.value.code == 2
    assert not (tmp_path / "out").exists()


def test_readme_torchrun_command_divides_the_step(tmp_path, cache_dir):
    """`torchrun --nproc_per_node 2 lightweight_small.py`, as README writes it (here on the tiny model, one step):
    the default micro-batch (32) is capped so that a step of 32,768 tokens splits over two processes."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(REPO / "lightweight_small.py"), "--model", "tiny", "--corpus", str(SMALL_CORPUS), "--max-steps", "1",
               "--wandb", "off", "--output-dir", str(tmp_path / "out"), "--cache-dir", str(cache_dir)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["micro_batch"] == 16 and summary["steps"] == 1
    # one step: 16 rows of 1,024 tokens on each process, less each record's first token (at most 7 a row here)
    assert 2 * 16 * 1023 - 2 * 16 * 7 <= summary["tokens_trained"] < 2 * 16 * 1023


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



def test_four_processes_train_as_one(tmp_path, cache_dir, short_records_corpus):
    """A CPU stand-in for 4 GPUs: 4 gloo processes under torchrun take the same per-step losses and
    gradient norms as one process (packed rows: 4 micro-batches of 2 per step, one on each process)."""
    one, one_rows, _ = launch("lightweight_big", 1, tmp_path / "one", cache_dir, short_records_corpus)
    four, four_rows, stderr = launch("lightweight_big", 4, tmp_path / "four", cache_dir, short_records_corpus)
    assert four["processes"] == 4 and four["gradient_accumulation"] == 1 and one["gradient_accumulation"] == 4
    assert stderr.count(" accumulation x 4 processes") == 1
    assert [r["step"] for r in four_rows] == [r["step"] for r in one_rows] == [1, 2]
    for a, b in zip(one_rows, four_rows):
        assert b["tokens_trained"] == a["tokens_trained"]
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
