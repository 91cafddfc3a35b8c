"""Each script end to end on a tiny model: what it trains, what it logs to W&B and to its files."""
import importlib
import json

import pytest
import torch

import lightweight_big
import lightweight_small
from conftest import TINY
from wandb_records import read_offline_run

SCRIPTS = ["before_small", "lightweight_small", "before_big", "lightweight_big"]
SUMMARY_KEYS = {"train_seconds", "job_seconds", "startup_seconds", "setup_seconds", "eval_seconds", "save_seconds",
                "micro_batch", "micro_batch_reason", "tokens_trained", "tokens_per_second", "peak_memory_gib",
                "final_train_loss", "final_eval_loss", "trainable_params", "total_params", "oom"}


def tokens_with_loss(monkeypatch) -> list[int]:
    """Filled as the run trains: each training micro-batch's tokens that carry loss, counted from the batch."""
    from harness.measure import MeasuringTrainer

    counted, compute_loss = [], MeasuringTrainer.compute_loss

    def counting(self, model, inputs, *args, **kwargs):
        if model.training:
            counted.append(int((inputs["labels"][:, 1:] != -100).sum()))
        return compute_loss(self, model, inputs, *args, **kwargs)

    monkeypatch.setattr(MeasuringTrainer, "compute_loss", counting)
    return counted


def run_script(script, out, cache_dir, *extra):
    return importlib.import_module(script).main(
        [*TINY, "--output-dir", str(out), "--cache-dir", str(cache_dir), *extra])


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_trains_and_logs(script, tmp_path, cache_dir, capsys, monkeypatch):
    out = tmp_path / "out"
    counted = tokens_with_loss(monkeypatch)
    summary = run_script(script, out, cache_dir, "--max-steps", "3", "--wandb", "offline")

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3]
    assert all(r["tokens_per_second"] > 0 and r["step_seconds"] > 0 and r["learning_rate"] > 0 for r in train)
    assert all({"memory_allocated_gib", "memory_reserved_gib", "peak_memory_gib"} <= r.keys() for r in train)
    assert any("eval_loss" in r for r in rows)

    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    assert SUMMARY_KEYS <= on_disk.keys()
    assert on_disk["oom"] is False and on_disk["steps"] == 3
    assert on_disk["parallelism"] == "none (one process on the CPU)" and "how_measured" not in on_disk  # what ran
    assert on_disk["tokens_trained"] == train[-1]["tokens_trained"]
    assert on_disk["tokens_trained"] == sum(counted)
    if "packing" in getattr(importlib.import_module(script), "TECHNIQUES", {}):  # 3 steps x 8 rows x 63 predictions,
        assert 3 * 8 * 63 - 3 * 8 * 4 < on_disk["tokens_trained"] <= 3 * 8 * 63  # less any record's first token
    assert 0 < on_disk["trainable_params"] <= on_disk["total_params"]
    assert not list(out.glob("checkpoint-*"))  # 3 steps, --save-every 100: nothing to resume from at the end
    saved = {p.name for p in out.iterdir()}  # the trained model alone, in --output-dir
    assert on_disk["save_seconds"] > 0
    if script == "lightweight_big":  # only the LoRA adapters train, and only they are saved
        assert on_disk["trainable_params"] < on_disk["total_params"] / 4
        assert {"adapter_model.safetensors", "adapter_config.json"} <= saved and "model.safetensors" not in saved
    else:
        assert {"model.safetensors", "config.json"} <= saved

    (run_dir,) = (out / "wandb").glob("offline-run-*")
    record = read_offline_run(run_dir)
    assert record["group"] == script
    logged = [h for h in record["history"] if "train/loss" in h]
    assert len(logged) == 3
    assert {"train/tokens_per_second", "train/step_seconds", "train/peak_memory_gib"} <= logged[0].keys()
    assert float(logged[0]["train/loss"]) == pytest.approx(train[0]["loss"], rel=1e-5)
    assert any("eval/loss" in h for h in record["history"])
    assert {"tokens_per_second", "peak_memory_gib", "oom", "final_eval_loss"} <= record["summary"].keys()
    assert json.loads(record["summary"]["oom"]) is False
    config = {k: json.loads(v) for k, v in record["config"].items()}
    assert config["script"] == script and config["init"] == "random"
    assert config["techniques"].keys() == getattr(importlib.import_module(script), "TECHNIQUES", {}).keys()
    assert config["versions"]["transformers"] and "gpu" in config
    assert config["lr_scheduler"] == "linear" and config["autocast"] == "None" and config["eval_steps"] >= 1
    assert "wandb sync" in capsys.readouterr().err


def test_loss_falls(tmp_path, cache_dir):
    summary = run_script("lightweight_small", tmp_path / "out", cache_dir,
                         "--max-steps", "30", "--lr", "3e-3", "--wandb", "off", "--eval-every", "30")
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5
    assert summary["final_eval_loss"] < losses[0] - 0.5


def test_out_of_memory_exits_3_with_one_line(tmp_path, cache_dir, capsys, monkeypatch):
    import transformers

    def no_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")

    monkeypatch.setattr(transformers.Trainer, "training_step", no_memory)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        run_script("before_big", out, cache_dir, "--max-steps", "3", "--wandb", "offline")
    assert exit_info.value.code == 3
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if "out of CUDA memory" in line]
    assert len(lines) == 1 and lines[0].startswith("before_big:")
    assert "weights" in lines[0] and "gradients" in lines[0] and "optimizer states" in lines[0]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["oom"] is True and summary["oom_message"] == lines[0]
    (run_dir,) = (out / "wandb").glob("offline-run-*")
    assert json.loads(read_offline_run(run_dir)["summary"]["oom"]) is True


def test_steps_after_the_last_log_are_counted(tmp_path, cache_dir, monkeypatch):
    """--logging-steps that does not divide --max-steps: the last step is logged anyway, its tokens counted."""
    counted = tokens_with_loss(monkeypatch)
    summary = run_script("lightweight_small", tmp_path / "out", cache_dir, "--max-steps", "5", "--logging-steps", "3",
                         "--wandb", "off")
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [3, 5]
    assert summary["tokens_trained"] == sum(counted) and len(counted) == 5 * 2  # 5 steps of 2 micro-batches


@pytest.mark.parametrize("script", [lightweight_small, lightweight_big])
@pytest.mark.parametrize("argv, filtered", [([], False), (["--off", "step_overlap"], True)])
def test_step_overlap_turns_off_the_loss_nan_filter_on_the_host(script, argv, filtered, tmp_path, cache_dir,
                                                               monkeypatch):
    """step_overlap: the Trainer's NaN/inf filter, which reads every micro-batch's loss on the host (a
    synchronization), is off; the peer and reference rows (--off step_overlap) keep the library default."""
    from harness.session import Run

    seen = {}
    monkeypatch.setattr(Run, "train", lambda self, model, training_args, *a, **kw: seen.update(args=training_args))
    script.main([*TINY, "--max-steps", "1", "--wandb", "off", "--no-checkpoints", *argv,
                 "--output-dir", str(tmp_path / "out"), "--cache-dir", str(cache_dir)])
    assert seen["args"].logging_nan_inf_filter is filtered


def test_step_ends_time_each_step_on_the_gpu_timeline_without_waiting(monkeypatch):
    """StepEnds records a CUDA event at the start and after each step (here fake events on a fake clock) and reads
    them only once, after training: each step's seconds, the first `steps` steps only; None without CUDA."""
    from harness.measure import StepEnds

    clock, synchronized = {"ms": 0.0}, []

    class FakeEvent:
        def __init__(self, enable_timing):
            assert enable_timing

        def record(self):
            self.at = clock["ms"]

        def elapsed_time(self, later):
            return later.at - self.at

        def synchronize(self):
            synchronized.append(self.at)

    assert StepEnds().seconds() is None  # the CPU: no events at all
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    step_ends = StepEnds(steps=3)
    step_ends.on_train_begin(None, None, None)
    for ms in (180, 175, 440, 176, 181):  # step 3 stalls
        clock["ms"] += ms
        step_ends.on_step_end(None, None, None)
    assert synchronized == []  # training never waited for an event
    assert step_ends.seconds() == [0.18, 0.175, 0.44]  # the first 3 steps
    assert len(synchronized) == 1
