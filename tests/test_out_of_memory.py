"""Running out of memory in training: the one line (exit 3) also names the micro-batch that fits.

There is no GPU in the tests: `outcome.micro_batch_after_oom` is run as on one CUDA GPU, with CUDA's allocator
simulated on the CPU (as in test_models' probe test): a trial of too many sequences raises OutOfMemoryError.
"""
import dataclasses
import json
import weakref
from types import SimpleNamespace

import pytest
import torch

import lightweight_big
import lightweight_small
from conftest import TINY, tiny_script_model
from harness import budget, outcome, step_size
from techniques import auto_micro_batch as micro_batch
from harness.cli import Switches
from techniques.fused_ce import lm_loss_sum
from harness.session import Run

ESTIMATE = {"weights": 1.2, "gradients": 1.2, "optimizer states": 2.5}
CUDA_OOM = torch.OutOfMemoryError("simulated")


def test_the_line_names_the_micro_batch_that_fits_when_known():
    plain = budget.oom_message("lightweight_small", 16, 15.9, ESTIMATE, 0, 1)
    assert plain == ("lightweight_small: out of CUDA memory under a 16 GiB budget (peak 15.9 GiB reached); before "
                     "activations this recipe needs about 4.9 GiB: weights 1.2, gradients 1.2, optimizer states 2.5")
    assert budget.oom_message("lightweight_small", 16, 15.9, ESTIMATE, 0, 1, None) == plain
    assert budget.oom_message("lightweight_small", 16, 15.9, ESTIMATE, 0, 1, 8) == \
        plain + "; micro-batch 8 fits (--micro-batch 8)"
    assert budget.oom_message("lightweight_small", 16, 15.9, ESTIMATE, 0, 1, 0) == \
        plain + "; even micro-batch 1 does not fit"


@pytest.fixture
def simulated_gpu(cache_dir, monkeypatch):
    """(run, tried): a Run after training ran out of memory at micro-batch 32 on one 1 GiB 'GPU' (the CPU).

    A trial of more than 12 sequences runs out of memory; one of n <= 12 peaks at n / 10 GiB, so 8 is the
    largest within 90% of the budget. `tried` lists each trial's micro-batch and the dtype it autocast to.
    """
    model, _ = tiny_script_model(lightweight_big, cache_dir)
    tried, peak = [], {"bytes": 0}

    def loss(hidden, head, labels, fused, vocab_size=None):
        tried.append((hidden.shape[0], torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu")))
        if hidden.shape[0] > 12:
            raise torch.OutOfMemoryError("simulated")
        peak["bytes"] = hidden.shape[0] / 10 * budget.GIB
        return lm_loss_sum(hidden, head, labels, fused, vocab_size)

    monkeypatch.setattr("techniques.fused_ce.lm_loss_sum", loss)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: tried.append("empty_cache"))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: peak["bytes"])
    run = Run.__new__(Run)  # what finish() finds after the failed step; no command line, corpus or Trainer
    run.script, run.cuda, run.world_size, run.rank, run.device = "lightweight_big", True, 1, 0, torch.device("cpu")
    run.args = SimpleNamespace(seq_len=64, gpu_memory_gib=1.0)
    run.model, run.trainer, run.optim, run.autocast_dtype = model, object(), "paged_adamw_8bit", torch.bfloat16
    run.summary = {"micro_batch": 32, "peak_memory_gib": 0.98}
    return run, tried


def as_probe(run, largest: int, script=lightweight_big, cache_dir=None) -> None:
    """Make the simulated GPU's Run what `script`'s probe finds before training: its command line (script's
    micro-batch `largest`, one micro-batch a step at it, 1 GiB budget), techniques and model (lightweight_small: its
    own tiny model, from `cache_dir`)."""
    if script is not lightweight_big:
        run.model, _ = tiny_script_model(script, cache_dir)
    run.script = script.__name__
    run.args = SimpleNamespace(seq_len=64, gpu_memory_gib=1.0, micro_batch=largest, micro_batch_given=False,
                               tokens_per_step=largest * 64)
    run.on, run.bf16_or_fp16 = Switches(script.TECHNIQUES), torch.bfloat16


def offload(run, switched: list):
    """lightweight_big's offload as its script offers it to the probe, each switch appended to `switched` instead of
    made (pinned memory needs a GPU)."""
    return dataclasses.replace(lightweight_big.offload_to_fit(run.model), switch=switched.append)


def probe(run) -> int | None:
    try:
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
    except torch.OutOfMemoryError as e:
        failure = e
    run.summary["micro_batch_that_fits"] = outcome.micro_batch_after_oom(run, failure)
    return run.summary["micro_batch_that_fits"]


def test_probe_halves_from_half_the_failed_micro_batch(simulated_gpu):
    run, tried = simulated_gpu
    assert probe(run) == 8
    assert tried[0] == "empty_cache"  # the failed step's memory is given back before the first trial
    assert [t for t in tried if t != "empty_cache"] == [(16, torch.bfloat16), (8, torch.bfloat16)]
    assert run.trainer is None and all(p.grad is None for p in run.model.parameters())
    line = outcome.oom_line(run, CUDA_OOM)
    assert line.endswith("(peak 1.0 GiB reached); before activations this recipe needs about "
                         f"{sum(budget.state_memory_estimate_gib(run.model, run.optim).values()):.1f} "
                         "GiB: weights 0.0, gradients 0.0, optimizer states 0.0; "
                         "micro-batch 8 fits (--micro-batch 8)")


def test_probe_says_when_not_even_one_fits(simulated_gpu, monkeypatch):
    run, tried = simulated_gpu

    def out_of_memory(*args):
        tried.append("trial")
        raise torch.OutOfMemoryError("simulated")

    monkeypatch.setattr("techniques.fused_ce.lm_loss_sum", out_of_memory)
    assert probe(run) == 0 and tried.count("trial") == 5  # 16, 8, 4, 2, 1
    assert outcome.oom_line(run, CUDA_OOM).endswith("; even micro-batch 1 does not fit")
    run.summary["micro_batch"], run.trainer, tried[:] = 1, object(), []
    assert probe(run) == 0 and tried == []  # training itself ran out at 1: nothing to try


def test_a_failing_probe_leaves_the_line_without_a_hint(simulated_gpu, monkeypatch):
    run, _ = simulated_gpu
    without_hint = outcome.oom_line(run, CUDA_OOM)

    def broken(*args, **kwargs):
        raise RuntimeError("probe broke")

    monkeypatch.setattr(micro_batch, "choose_micro_batch", broken)
    assert probe(run) is None
    assert run.summary["micro_batch_probe_error"] == "RuntimeError: probe broke"
    assert outcome.oom_line(run, CUDA_OOM) == without_hint and "fits" not in without_hint


@pytest.mark.parametrize("where", ["cpu", "two processes", "before training"])
def test_no_probe_where_it_cannot_run(where, simulated_gpu):
    run, tried = simulated_gpu
    if where == "cpu":
        run.cuda = False
    elif where == "two processes":  # under a launcher the others may be dead: an FSDP forward would hang
        run.world_size = 2
    else:
        run.trainer = None
    assert probe(run) is None and tried == []


def test_out_of_memory_in_training_ends_with_the_micro_batch_that_fits(tmp_path, cache_dir, capsys, monkeypatch):
    """lightweight_small runs out of memory in step 2 (simulated); the probe, run as on one GPU, starts from half
    the micro-batch, after the Trainer's optimizer states and gradients are gone."""
    import transformers

    original, seen = transformers.Trainer.training_step, {"calls": 0}

    def out_of_memory_in_step_2(self, *args, **kwargs):  # TINY: 2 micro-batches per step
        seen["calls"] += 1
        if seen["calls"] == 3:
            seen["optimizer"] = weakref.ref(self.optimizer.optimizer)  # its states exist after step 1
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        return original(self, *args, **kwargs)

    def choose_micro_batch(model, largest, seq_len, budget_gib, optim, autocast_dtype, device):
        seen.update(largest=largest, budget_gib=budget_gib, optim=optim, autocast_dtype=autocast_dtype,
                    optimizer_freed=seen["optimizer"]() is None,
                    grads=[p for p in model.parameters() if p.grad is not None])
        return 1

    as_on_one_gpu = outcome.micro_batch_after_oom

    def micro_batch_after_oom(run, failure):
        run.cuda = True
        try:
            return as_on_one_gpu(run, failure)
        finally:
            run.cuda = False

    monkeypatch.setattr(transformers.Trainer, "training_step", out_of_memory_in_step_2)
    monkeypatch.setattr(outcome, "micro_batch_after_oom", micro_batch_after_oom)
    monkeypatch.setattr(micro_batch, "choose_micro_batch", choose_micro_batch)
    monkeypatch.setattr(budget, "available_gib", lambda: 24.0)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        lightweight_small.main([*TINY, "--max-steps", "3", "--output-dir", str(out), "--cache-dir", str(cache_dir),
                                "--wandb", "off"])
    assert exit_info.value.code == 3
    assert seen["largest"] == 2 and seen["budget_gib"] == 24.0 and seen["optim"] == "adamw_torch_fused"
    assert seen["autocast_dtype"] is None  # the bf16 technique is CUDA only: skipped on the CPU
    assert seen["optimizer_freed"] and seen["grads"] == []
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = [line for line in err.splitlines() if "out of CUDA memory" in line]
    assert line.startswith("lightweight_small: ") and line.endswith("; micro-batch 1 fits (--micro-batch 1)")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["oom"] is True and summary["micro_batch_that_fits"] == 1 and summary["oom_message"] == line


def simulate_peak_halved_while(halved, tried, monkeypatch) -> None:
    """The simulated GPU of a probe with a LeanerMemory: a trial of n rows peaks at n / 10 GiB, n / 20 while
    `halved()` says the leaner option is on; over 12 rows (24 halved) it runs out of memory. Each trial appends
    (rows, halved) to `tried`."""
    peak = {"bytes": 0}

    def loss(hidden, head, labels, fused, vocab_size=None):
        rows, leaner = hidden.shape[0], bool(halved())
        tried.append((rows, leaner))
        if rows > (24 if leaner else 12):
            raise torch.OutOfMemoryError("simulated")
        peak["bytes"] = rows / (20 if leaner else 10) * budget.GIB
        return lm_loss_sum(hidden, head, labels, fused, vocab_size)

    monkeypatch.setattr("techniques.fused_ce.lm_loss_sum", loss)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: peak["bytes"])


@pytest.mark.parametrize("offload_halves_the_peak", [True, False])
def test_offload_is_kept_only_where_it_lets_a_larger_micro_batch_fit(simulated_gpu, monkeypatch,
                                                                     offload_halves_the_peak):
    """lightweight_big's probe with activation offload to choose: 8 of 16 fits without it; with it on, 16 is tried,
    and offload stays on only if 16 then fits."""
    run, tried = simulated_gpu
    as_probe(run, largest=16)
    switched = []
    simulate_peak_halved_while(lambda: switched[-1:] == [True] and offload_halves_the_peak, tried, monkeypatch)
    tried.clear()
    size = run.largest_micro_batch(run.model, "paged_adamw_8bit", autocast=True, leaner=offload(run, switched))
    assert [t[0] for t in tried if t != "empty_cache"] == [16, 8, 16]  # 16 (out of memory) and 8, then 16 with it
    if offload_halves_the_peak:
        assert size == 16 and switched == [True] and run.leaner_unused is None
        assert run.micro_batch_reason.endswith("with the checkpointed activations offloaded to the CPU")
    else:
        assert size == 8 and switched == [True, False]  # tried, and switched off again
        assert "offloaded" not in run.micro_batch_reason and run.micro_batch_reason.endswith("; by a trial step")
        assert run.leaner_unused == "with it, no micro-batch from 16 down to 16 fit"


def test_offload_on_the_largest_micro_batch_is_not_tried(simulated_gpu):
    """Where the script's micro-batch fits (one micro-batch per step), offload is never switched on."""
    run, tried = simulated_gpu
    as_probe(run, largest=8)
    switched = []
    assert run.largest_micro_batch(run.model, "paged_adamw_8bit", autocast=True, leaner=offload(run, switched)) == 8
    assert switched == [] and run.leaner_unused == "one micro-batch a step: nothing to halve"


def test_offloaded_checkpoints_keep_each_block_input_on_the_cpu(cache_dir, monkeypatch):
    """checkpoint_blocks(offload=True) routes every checkpointed block's saved input through transformers' CPU
    offload (pinned memory needs a GPU, so the offload is recorded here), and offload=False takes it out again."""
    import transformers.modeling_utils

    model, _ = tiny_script_model(lightweight_big, cache_dir)
    packed = []

    class RecordedOffload(torch.autograd.graph.saved_tensors_hooks):
        def __init__(self, pin_memory, device_type):
            super().__init__(lambda t: packed.append(tuple(t.shape)) or t, lambda t: t)

    monkeypatch.setattr(transformers.modeling_utils, "save_on_cpu", RecordedOffload)
    ids = torch.randint(0, 100, (2, 16))
    blocks = [m for m in model.modules() if m.__class__.__name__ == "GPTNeoBlock"]
    model.train()
    for offload, hidden_states_packed in ((True, len(blocks)), (False, 0)):
        packed.clear()
        lightweight_big.checkpoint_blocks(model, None, offload=offload)
        model(input_ids=ids, labels=ids).loss.backward()
        assert packed.count((2, 16, model.config.hidden_size)) == hidden_states_packed
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("script_micro_batch, tried_with_recompute", [(32, True), (16, False)])
def test_lightweight_small_recomputes_only_where_the_step_splits_into_four(simulated_gpu, monkeypatch,
                                                                        cache_dir, script_micro_batch,
                                                                        tried_with_recompute):
    """lightweight_small's checkpoint_to_fit through the probe (recompute_to_fit, as the script offers it): 8 rows
    fit without it, 16 with every layer recomputed. Of 32 rows a step (4 micro-batches) it is tried from 32 down
    and kept at 16; of 16 (2 micro-batches) never tried."""
    run, tried = simulated_gpu
    as_probe(run, script_micro_batch, script=lightweight_small, cache_dir=cache_dir)
    simulate_peak_halved_while(lambda: run.model.is_gradient_checkpointing, tried, monkeypatch)
    size = run.largest_micro_batch(run.model, "adamw_torch_fused", autocast=True,
                                   leaner=lightweight_small.recompute_to_fit(run.model))
    trials = [t for t in tried if t != "empty_cache"]
    if tried_with_recompute:
        assert size == 16 and run.model.is_gradient_checkpointing and run.leaner_unused is None
        assert trials == [(32, False), (16, False), (8, False), (32, True), (16, True)]
        assert run.micro_batch_reason.endswith("with every layer recomputed in backward")
    else:
        assert size == 8 and not run.model.is_gradient_checkpointing
        assert trials == [(16, False), (8, False)]
        assert run.leaner_unused == "2 micro-batches a step; used from 4"


def test_the_processes_agree_on_recomputing(simulated_gpu, monkeypatch, cache_dir):
    """Under a launcher each process probes its own GPU and all take the smallest choice: here the other process fits
    8 rows as this one does, but nothing larger with the recompute (it reports 0), so every process leaves it off."""
    run, tried = simulated_gpu
    as_probe(run, 32, script=lightweight_small, cache_dir=cache_dir)
    run.world_size, run.args.tokens_per_step = 2, 2 * 32 * 64  # 32 rows a step on each of two processes
    simulate_peak_halved_while(lambda: run.model.is_gradient_checkpointing, tried, monkeypatch)
    others = [8, 0]  # what the other process chose: without the recompute, then with it
    monkeypatch.setattr(step_size, "smallest_over_processes", lambda mine, device: min(mine, others.pop(0)))
    size = run.largest_micro_batch(run.model, "adamw_torch_fused", autocast=True,
                                   leaner=lightweight_small.recompute_to_fit(run.model))
    assert size == 8 and others == [] and not run.model.is_gradient_checkpointing
    assert run.leaner_unused == "with it, no micro-batch from 32 down to 16 fit on every process"


def test_a_step_larger_than_the_script_micro_batch_counts_its_micro_batches(simulated_gpu):
    """The split that decides is the step's: 64 rows a step where the script's micro-batch is 32. Uncapped (32
    fits) nothing is tried, the memory does not split the step; where only 16 fits the step is 4 micro-batches."""
    run, _ = simulated_gpu
    leaner = offload(run, [])
    assert micro_batch.why_not_leaner(32, 32, 64, leaner) == ("micro-batch 32 is the script's largest: the memory "
                                                              "does not split the step")
    assert micro_batch.why_not_leaner(16, 32, 64, dataclasses.replace(leaner, from_split=4)) is None
    assert micro_batch.why_not_leaner(16, 32, 64, dataclasses.replace(leaner, from_split=5)) == \
        "4 micro-batches a step; used from 5"


@pytest.mark.parametrize("compiled", [False, True])
def test_recomputed_layers_give_the_gradients_stored_ones_give(cache_dir, compiled):
    """checkpoint_layers: with every OPT layer recomputed in backward (dropout on), the loss and every gradient
    equal those of the model that stores its activations; switched off again, nothing is recomputed. Compiled as
    lightweight_small compiles its layers (here with dynamo and AOTAutograd, without inductor's code generation):
    the compiled layer runs inside the checkpoint, its recompute too."""
    model, _ = tiny_script_model(lightweight_small, cache_dir)
    if compiled:
        for layer in model.model.decoder.layers:
            layer.compile(backend="aot_eager")
    model.train()
    ids = torch.randint(0, 100, (2, 16))

    def loss_and_gradients():
        model.zero_grad(set_to_none=True)
        torch.manual_seed(0)  # the same dropout masks
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.item(), [p.grad.clone() for p in model.parameters()]

    stored = loss_and_gradients()
    lightweight_small.checkpoint_layers(model, True)
    assert model.is_gradient_checkpointing and all(layer.gradient_checkpointing for layer in model.model.decoder.layers)
    recomputed = loss_and_gradients()
    assert recomputed[0] == pytest.approx(stored[0], rel=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(recomputed[1], stored[1]))
    lightweight_small.checkpoint_layers(model, False)
    assert not any(layer.gradient_checkpointing for layer in model.model.decoder.layers)


@pytest.mark.parametrize("script", ["before_small", "lightweight_small", "before_big", "lightweight_big"])
def test_out_of_cpu_memory_ends_in_one_line_and_exit_3(script, tmp_path, cache_dir, capsys, monkeypatch):
    """The CPU allocator's failure (a RuntimeError, not OutOfMemoryError) ends as CUDA's does."""
    import transformers

    def too_large_a_step(self, *a, **kw):
        torch.empty(2**50, dtype=torch.uint8)  # 1 PiB: the allocator refuses at once

    monkeypatch.setattr(transformers.Trainer, "training_step", too_large_a_step)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        __import__(script).main([*TINY, "--max-steps", "2", "--output-dir", str(out), "--cache-dir", str(cache_dir),
                                 "--wandb", "off"])
    assert e.value.code == 3
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = [x for x in err.splitlines() if "out of" in x]  # on a line of its own, not the progress bar's
    assert line.startswith(f"{script}: out of CPU memory; before activations this recipe needs about ")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["oom"] is True and summary["oom_message"] == line
