"""Interrupted runs resume with nothing lost; crashes and W&B trouble leave consistent files."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch

import lightweight_small
from conftest import TINY
from harness import training
from harness.signals import find_checkpoint

REPO = Path(__file__).resolve().parent.parent
STEPS = ["--max-steps", "10", "--lr", "3e-3", "--eval-every", "10", "--save-every", "100"]
# the signalled runs: the tiny model trains about 30 steps a second, so 10 steps could end between the poll that
# saw step 3 and the signal (then the run finished, correctly, with exit 0); 40 leave a second to spare
SIGNALLED = 40
SIGNALLED_STEPS = ["--max-steps", str(SIGNALLED), "--lr", "3e-3", "--eval-every", str(SIGNALLED), "--save-every", "100"]


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def losses(out: Path) -> dict:
    steps = [r["step"] for r in rows(out) if "loss" in r]
    assert len(steps) == len(set(steps)), "a step was logged twice"
    return {r["step"]: r["loss"] for r in rows(out) if "loss" in r}


def script_cmd(out, cache_dir, *extra):
    return [sys.executable, str(REPO / "lightweight_small.py"), *TINY, *SIGNALLED_STEPS, "--output-dir", str(out),
            "--cache-dir", str(cache_dir), "--wandb", "offline", *extra]


def start_and_signal(cmd, out, signals, after_steps=3):
    """Start a run, wait until it has logged `after_steps` steps, send `signals`; return (code, stderr)."""
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        metrics = out / "metrics.jsonl"
        if metrics.exists() and sum('"loss"' in line for line in metrics.read_text().splitlines()) >= after_steps:
            break
        time.sleep(0.02)
    seen = []
    for i, sig in enumerate(signals):
        proc.send_signal(sig)
        if i + 1 < len(signals):  # the next signal only once this one was handled (same signals coalesce)
            for line in proc.stderr:
                seen.append(line)
                if "stopping after this optimizer step" in line:
                    break
    _, err = proc.communicate(timeout=240)
    return proc.returncode, "".join(seen) + err


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, cache_dir):
    out = tmp_path_factory.mktemp("straight") / "out"
    lightweight_small.main([*TINY, *SIGNALLED_STEPS, "--output-dir", str(out), "--cache-dir", str(cache_dir),
                            "--wandb", "off"])
    return losses(out)


def test_sigint_checkpoints_and_resume_matches_an_uninterrupted_run(tmp_path, cache_dir, uninterrupted):
    out = tmp_path / "out"
    code, err = start_and_signal(script_cmd(out, cache_dir), out, [signal.SIGINT])
    assert code == 130, err
    assert "Traceback" not in err
    assert "resume with: python lightweight_small.py" in err and err.rstrip().endswith("--resume")
    stopped_at = max(losses(out))
    assert 3 <= stopped_at < SIGNALLED
    assert (out / f"checkpoint-{stopped_at}").is_dir()
    assert json.loads((out / "summary.json").read_text())["interrupted"] == "SIGINT"
    assert sum("train_runtime" in r for r in rows(out)) == 1  # the interrupted run's end-of-training row

    resumed = subprocess.run(script_cmd(out, cache_dir, "--resume"), capture_output=True, text=True,
                             env={**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"})
    assert resumed.returncode == 0, resumed.stderr
    assert "There were missing keys" not in resumed.stderr  # lm_head.weight: the tied embedding, not lost
    ends = [i for i, r in enumerate(rows(out)) if "train_runtime" in r]
    assert ends == [len(rows(out)) - 1]  # only the resumed run's, at the end
    combined = losses(out)
    assert sorted(combined) == list(range(1, SIGNALLED + 1))
    for step, loss in uninterrupted.items():
        assert combined[step] == pytest.approx(loss, rel=1e-5, abs=1e-6), f"step {step}"
    assert uninterrupted[SIGNALLED] < uninterrupted[1] - 0.1  # the run really trained: the comparison means something
    runs = sorted((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and len({r.name.split("-")[-1] for r in runs}) == 1  # the same W&B run id, resumed
    (sync,) = [line for line in resumed.stderr.splitlines() if "upload it with: wandb sync" in line]
    assert sync.split("wandb sync ")[1].split() == [str(r) for r in runs]  # both starts, oldest first
    assert json.loads((out / "summary.json").read_text())["steps"] == SIGNALLED


def test_sigterm_saves_and_exits_143(tmp_path, cache_dir):
    out = tmp_path / "out"
    code, err = start_and_signal(script_cmd(out, cache_dir), out, [signal.SIGTERM])
    assert code == 143, err
    assert "Traceback" not in err and "SIGTERM" in err
    assert list(out.glob("checkpoint-*"))


def test_second_ctrl_c_exits_at_once(tmp_path, cache_dir):
    out = tmp_path / "out"
    code, err = start_and_signal(script_cmd(out, cache_dir), out, [signal.SIGINT, signal.SIGINT])
    assert code == 130
    assert "stopped by SIGINT" not in err  # it left at once: no orderly stop, no resume hint
    assert "Traceback" not in err


def test_resume_without_checkpoint_is_refused(tmp_path, cache_dir, capsys):
    with pytest.raises(SystemExit) as e:
        lightweight_small.main([*TINY, "--output-dir", str(tmp_path / "empty"), "--cache-dir", str(cache_dir),
                                "--resume", "--wandb", "off"])
    assert e.value.code == 2
    assert "--resume: no complete checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "empty").exists()


def test_crash_leaves_checkpoint_metrics_and_summary_consistent(tmp_path, cache_dir, monkeypatch):
    import transformers

    original = transformers.Trainer.training_step
    calls = {"n": 0}

    def crash_in_step_3(self, *args, **kwargs):  # TINY: 2 micro-batches per step
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("simulated crash")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(transformers.Trainer, "training_step", crash_in_step_3)
    out = tmp_path / "out"
    argv = [*TINY, *STEPS, "--save-every", "1", "--output-dir", str(out), "--cache-dir", str(cache_dir),
            "--wandb", "offline"]
    with pytest.raises(RuntimeError, match="simulated crash"):
        lightweight_small.main(argv)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["error"] == "RuntimeError: simulated crash" and summary["steps"] == 2
    assert sorted(losses(out)) == [1, 2]
    assert (out / "checkpoint-2").is_dir()

    assert "lm_head.weight" not in safetensors.torch.load_file(out / "checkpoint-2" / "model.safetensors")  # tied

    monkeypatch.setattr(transformers.Trainer, "training_step", original)
    resumed = {}
    summarize = training.training_summary

    def keep_model(trainer, *args):
        resumed["model"] = trainer.model
        return summarize(trainer, *args)

    monkeypatch.setattr(training, "training_summary", keep_model)
    lightweight_small.main([*argv, "--resume"])
    assert sorted(losses(out)) == list(range(1, 11))
    model = resumed["model"]  # its lm_head.weight, not in the checkpoint, is the embedding itself, as before
    assert model.lm_head.weight is model.get_input_embeddings().weight


def test_only_a_tied_embedding_is_silenced_as_missing():
    import logging

    from transformers import AutoModelForCausalLM

    from harness.signals import tied_embedding_not_reported_missing
    from harness.sources import tiny_config

    model = AutoModelForCausalLM.from_config(tiny_config(lightweight_small.MODEL, vocab_size=128))
    logger, seen = logging.getLogger("transformers.trainer"), []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logger.addHandler(handler)
    missing = "There were missing keys in the checkpoint model loaded: {}."
    try:
        with tied_embedding_not_reported_missing(model):
            logger.warning(missing.format(["lm_head.weight"]))  # tied: silenced
            logger.warning(missing.format(["model.decoder.final_layer_norm.weight"]))  # reported
        logger.warning(missing.format(["lm_head.weight"]))  # outside a resume: reported
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())  # untied
        with tied_embedding_not_reported_missing(model):
            logger.warning(missing.format(["lm_head.weight"]))  # reported: it would be lost
    finally:
        logger.removeHandler(handler)
    assert seen == [missing.format(["model.decoder.final_layer_norm.weight"])] + [missing.format(["lm_head.weight"])] * 2


def test_the_tied_embedding_filter_holds_no_weight():
    """FSDP replaces the weights by shards inside train(): the filter must not keep the original embedding alive."""
    import gc
    import weakref

    from transformers import AutoModelForCausalLM

    from harness.signals import tied_embedding_not_reported_missing
    from harness.sources import tiny_config

    model = AutoModelForCausalLM.from_config(tiny_config(lightweight_small.MODEL, vocab_size=128))
    original = weakref.ref(model.get_input_embeddings().weight)
    with tied_embedding_not_reported_missing(model):
        shard = torch.nn.Parameter(model.get_input_embeddings().weight.detach()[:64].clone())  # as FSDP swaps it
        model.get_input_embeddings().weight = model.lm_head.weight = shard
        gc.collect()
        assert original() is None


def test_wandb_network_failure_falls_back_to_offline(tmp_path, cache_dir, capsys, monkeypatch):
    import wandb

    real_init = wandb.init

    def init(*args, mode=None, **kwargs):
        if mode == "online":
            raise wandb.errors.CommError("simulated: network unreachable")
        return real_init(*args, mode=mode, **kwargs)

    monkeypatch.setattr(wandb, "init", init)
    out = tmp_path / "out"
    summary = lightweight_small.main([*TINY, "--max-steps", "2", "--output-dir", str(out), "--cache-dir",
                                      str(cache_dir), "--wandb", "online"])
    err = capsys.readouterr().err
    assert err.count("warning: W&B unavailable") == 1
    assert summary["steps"] == 2 and list((out / "wandb").glob("offline-run-*"))


def test_missing_wandb_logs_locally(tmp_path, cache_dir, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    out = tmp_path / "out"
    summary = lightweight_small.main([*TINY, "--max-steps", "2", "--output-dir", str(out), "--cache-dir",
                                      str(cache_dir)])
    assert "wandb is not installed" in capsys.readouterr().err
    assert summary["steps"] == 2 and (out / "metrics.jsonl").exists() and not (out / "wandb").exists()


def test_no_hub_and_unknown_architecture_says_what_to_do(tmp_path, cache_dir, capsys):
    with pytest.raises(SystemExit) as e:  # HF_HUB_OFFLINE=1 (conftest): the hub is out of reach
        lightweight_small.main(["--model", "nobody/unknown-arch", "--output-dir", str(tmp_path / "out"),
                                "--cache-dir", str(cache_dir), "--wandb", "off"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "not cached" in err and "--init random" in err and "local folder" in err
    assert not (tmp_path / "out").exists()


def test_fresh_run_over_an_earlier_runs_checkpoints_is_refused(tmp_path, cache_dir, capsys):
    out = tmp_path / "out"
    argv = [*TINY, "--max-steps", "2", "--save-every", "1", "--output-dir", str(out), "--cache-dir", str(cache_dir),
            "--wandb", "off"]
    lightweight_small.main(argv)
    assert (out / "checkpoint-2" / "trainer_state.json").exists()  # on --save-every's steps, the last one too
    before = (out / "metrics.jsonl").read_text()
    with pytest.raises(SystemExit) as e:
        lightweight_small.main(argv)
    assert e.value.code == 2 and "holds checkpoints of an earlier run" in capsys.readouterr().err
    assert (out / "metrics.jsonl").read_text() == before  # nothing touched


def test_resume_skips_a_half_written_checkpoint(tmp_path, cache_dir, capsys):
    out = tmp_path / "out"
    argv = [*TINY, "--max-steps", "4", "--save-every", "2", "--output-dir", str(out), "--cache-dir",
            str(cache_dir), "--wandb", "off"]
    lightweight_small.main(argv)
    (out / "checkpoint-4" / "trainer_state.json").unlink()  # as if killed while saving
    assert Path(find_checkpoint(out, resume=True)).name == "checkpoint-2"


def test_a_signal_after_the_last_step_still_saves_the_model(tmp_path, cache_dir, monkeypatch):
    """Ctrl-C during the final evaluation, after every step has trained: the run ends as finished (no resume
    hint, no "interrupted"), with the trained model saved, instead of losing both model and checkpoint."""
    from harness.measure import MeasuringTrainer

    evaluate = MeasuringTrainer.evaluate

    def evaluate_then_ctrl_c(self, *a, **kw):
        result = evaluate(self, *a, **kw)
        if self.state.global_step >= self.state.max_steps:
            os.kill(os.getpid(), signal.SIGINT)  # caught by the run's stopper, which defers it
        return result

    monkeypatch.setattr(MeasuringTrainer, "evaluate", evaluate_then_ctrl_c)
    out = tmp_path / "out"
    summary = lightweight_small.main([*TINY, "--max-steps", "2", "--output-dir", str(out), "--cache-dir",
                                      str(cache_dir), "--wandb", "off"])
    assert summary["steps"] == 2 and "interrupted" not in summary
    assert (out / "model.safetensors").exists() and (out / "config.json").exists()


def test_a_signal_after_the_final_save_still_ends_with_the_summary(tmp_path, cache_dir, capfd, monkeypatch):
    """Ctrl-C once the model is saved, while the summary is made: the run ends as finished, summary.json written."""
    summarize = training.training_summary

    def ctrl_c_then_summarize(*args):
        os.kill(os.getpid(), signal.SIGINT)
        return summarize(*args)

    monkeypatch.setattr(training, "training_summary", ctrl_c_then_summarize)
    out = tmp_path / "out"
    summary = lightweight_small.main([*TINY, "--max-steps", "2", "--output-dir", str(out), "--cache-dir",
                                      str(cache_dir), "--wandb", "off"])
    err = capfd.readouterr().err  # the handler writes to the file descriptor itself
    assert summary["steps"] == 2 and "interrupted" not in summary and "SIGINT: training is over" in err
    assert json.loads((out / "summary.json").read_text())["steps"] == 2 and (out / "model.safetensors").exists()
