"""Step accounting: a pair takes the same optimizer steps over the same epoch; the micro-batch agreed by a launch."""
import os

import pytest
import torch

import before_small
import common
import lightweight_small
from conftest import REPO
from harness import step_size
from harness.sources import corpus_tokenizer


def epoch_steps(records, train_tokens, sizes, padded, pad_id, processes=1):
    """(steps per epoch, accumulation) of a script's default sizes on the training `records`."""
    seq, micro = sizes["seq_len"], sizes["micro_batch"]
    rows = len(common.padded_dataset(records, seq, pad_id) if padded else common.packed_dataset(records, seq))
    accumulation = step_size.accumulation(micro, processes, seq, sizes["tokens_per_step"], padded, rows, train_tokens)
    return step_size.steps_per_epoch(rows, micro, accumulation, processes), accumulation


def test_a_pair_takes_the_same_steps_over_an_epoch_of_corpus_json(cache_dir):
    """before_small pads each record (about a third of its slots are tokens), lightweight_small packs; both take
    one optimizer step per 32,768 corpus tokens, so the same number of steps (within 5%) and schedule."""
    corpus = common.load_corpus(REPO / "corpus.json", cache_dir)
    tokenizer = corpus_tokenizer(corpus, 8000, cache_dir)
    train, _, train_tokens = common.training_records_and_heldout_blocks(tokenizer, corpus, 512, 1, "corpus.json")
    pad_id = tokenizer.pad_token_id
    padded_steps, padded_accumulation = epoch_steps(train, train_tokens, before_small.SIZES, True, pad_id)
    packed_steps, packed_accumulation = epoch_steps(train, train_tokens, lightweight_small.SIZES, False, pad_id)
    assert packed_accumulation == 1 and padded_accumulation > 8  # 8 would be equal slots, not equal tokens
    assert abs(padded_steps - packed_steps) <= 0.05 * packed_steps
    assert packed_steps == pytest.approx(train_tokens / 32768, abs=1)


def test_padded_accumulation_splits_over_processes():
    """Two processes take half the micro-batches each, so a step holds the same rows as one process's."""
    one = step_size.accumulation(8, 1, 512, 32768, True, train_rows=1664, train_tokens=295_000)
    two = step_size.accumulation(8, 2, 512, 32768, True, train_rows=1664, train_tokens=295_000)
    assert one == 24 and two == 12  # 208 micro-batches in 9 steps
    assert step_size.accumulation(16, 2, 1024, 32768, False, 288, 295_000) == 1  # packed: 32768 / (16 x 1024 x 2)


def agree(rank, port, chosen, results):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    results[rank] = step_size.smallest_over_processes(chosen[rank], torch.device("cpu"))


def test_a_launch_agrees_on_the_smallest_micro_batch(tmp_path):
    """Each process probes its own GPU; all use the smallest choice (gloo on the CPU here)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(agree, args=(port, {0: 16, 1: 8}, results), nprocs=2, join=True)
    assert dict(results) == {0: 8, 1: 8}


@pytest.mark.parametrize("fsdp", [False, True])
def test_fsdp_reduce_scatters_every_micro_batch(fsdp, monkeypatch, tmp_path):
    """Under FSDP the gradients are synchronized (reduce-scattered) after each micro-batch, so that each GPU keeps
    only its shard: accelerate's default keeps them whole while accumulating."""
    from transformers import TrainingArguments

    from harness.session import Run

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true" if fsdp else "false")
    run = Run.__new__(Run)
    run.output_dir, run.cuda = tmp_path, False
    accumulation_kwargs = TrainingArguments(**run.plumbing_arguments()).accelerator_config.gradient_accumulation_kwargs
    assert (accumulation_kwargs or {}).get("sync_each_batch", False) is fsdp
