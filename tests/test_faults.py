"""Faults end cleanly: a checkpoint is whole or absent after a death mid-save, --resume skips a damaged one, a full
disk ends in one line and exit 4, and no flag value ends in a traceback (exit 2, one line, before torch)."""
import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

import lightweight_small
from conftest import TINY
from harness.checkpoints import MADE_BY, STAGING, checkpoint_problem, step_of
from harness.cli import EXIT_BAD_INPUT, EXIT_DIVERGED, EXIT_SAVE_FAILED
from harness.signals import find_checkpoint

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = ["before_small", "lightweight_small", "before_big", "lightweight_big"]
STEPS = ["--max-steps", "8", "--lr", "3e-3", "--eval-every", "8", "--save-every", "2"]
ENV = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


class Killed(BaseException):
    """A stand-in for SIGKILL: no handler of the run catches it, nothing is cleaned up."""


def losses(out: Path) -> dict:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "loss" in r]
    assert len(steps) == len(set(steps)), "a step was logged twice"
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def argv(out, cache_dir, *extra):
    return [*TINY, *STEPS, "--output-dir", str(out), "--cache-dir", str(cache_dir), "--wandb", "off", *extra]


def checkpoints(out: Path) -> list[str]:
    return sorted((p.name for p in out.iterdir() if step_of(p) is not None), key=lambda n: int(n.split("-")[1]))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, cache_dir):
    """A straight 8-step run, saving every 2 steps: its losses, and its folder (checkpoint-6 and -8)."""
    out = tmp_path_factory.mktemp("straight") / "out"
    lightweight_small.main(argv(out, cache_dir))
    return losses(out), out


def fail_save_at(monkeypatch, step: int, error: BaseException, method="_save_rng_state"):
    """Make the Trainer's save at `step` raise `error` in `method`: after the weights and the optimizer state are
    written, before the RNG state and trainer_state.json."""
    import transformers

    original = getattr(transformers.Trainer, method)

    def failing(self, *a, **kw):
        if self.state.global_step == step:
            raise error
        return original(self, *a, **kw)

    monkeypatch.setattr(transformers.Trainer, method, failing)


def test_death_mid_save_resumes_from_the_previous_checkpoint(tmp_path, cache_dir, uninterrupted, monkeypatch):
    straight, _ = uninterrupted
    out = tmp_path / "out"
    fail_save_at(monkeypatch, 6, Killed())
    with pytest.raises(Killed):
        lightweight_small.main(argv(out, cache_dir))
    assert checkpoints(out) == ["checkpoint-2", "checkpoint-4"]  # rotation had not run: both still there
    assert (out / STAGING / "checkpoint-6" / "model.safetensors").exists()  # the dead save's half
    assert not (out / STAGING / "checkpoint-6" / "trainer_state.json").exists()
    monkeypatch.undo()
    lightweight_small.main(argv(out, cache_dir, "--resume"))
    resumed = losses(out)
    assert sorted(resumed) == list(range(1, 9))
    for step in range(5, 9):  # the steps trained again after checkpoint-4
        assert resumed[step] == pytest.approx(straight[step], rel=1e-5, abs=1e-6), f"step {step}"
    assert checkpoints(out) == ["checkpoint-6", "checkpoint-8"] and not (out / STAGING).exists()


def test_full_disk_during_a_save_exits_4_with_one_line(tmp_path, cache_dir, capsys, monkeypatch):
    out = tmp_path / "out"
    fail_save_at(monkeypatch, 4, OSError(errno.ENOSPC, "No space left on device"), "_save_optimizer_and_scheduler")
    with pytest.raises(SystemExit) as e:
        lightweight_small.main(argv(out, cache_dir))
    assert e.value.code == EXIT_SAVE_FAILED == 4
    err = capsys.readouterr().err
    (line,) = [x for x in err.splitlines() if "error:" in x]
    assert "could not save checkpoint-4" in line and "No space left on device" in line and str(out) in line
    assert "Traceback" not in err
    assert checkpoints(out) == ["checkpoint-2"] and checkpoint_problem(out / "checkpoint-2") is None
    assert not (out / STAGING).exists()
    summary = json.loads((out / "summary.json").read_text())  # the run's record says why it ended
    assert summary["error"].startswith("could not save checkpoint-4") and summary["steps"] == 4


def damage(folder: Path, how: str) -> None:
    if how == "empty-folder":  # a newer checkpoint folder with nothing in it
        folder = folder.parent / "checkpoint-10"
        folder.mkdir()
    elif how == "step-mismatch":
        state = json.loads((folder / "trainer_state.json").read_text())
        (folder / "trainer_state.json").write_text(json.dumps({**state, "global_step": 7}))
    elif how.startswith("missing-"):
        (folder / how.removeprefix("missing-")).unlink()
    else:  # truncate-NAME-SIZE
        _, name, size = how.split(":")
        os.truncate(folder / name, int(size))


DAMAGES = ["truncate:model.safetensors:1000", "truncate:model.safetensors:0", "truncate:model.safetensors:5",
           "truncate:trainer_state.json:0", "truncate:trainer_state.json:20", "truncate:optimizer.pt:1000",
           "truncate:rng_state.pth:100", "missing-model.safetensors", "missing-optimizer.pt", "missing-scheduler.pt",
           "missing-trainer_state.json", "empty-folder", "step-mismatch"]


@pytest.mark.parametrize("how", DAMAGES)
def test_resume_skips_a_damaged_newest_checkpoint(how, tmp_path, uninterrupted, capsys):
    out = tmp_path / "out"
    shutil.copytree(uninterrupted[1], out)
    damage(out / "checkpoint-8", how)
    skipped = "checkpoint-10" if how == "empty-folder" else "checkpoint-8"
    expected = "checkpoint-8" if how == "empty-folder" else "checkpoint-6"
    assert Path(find_checkpoint(out, resume=True)).name == expected
    lines = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert len(lines) == 1 and f"skipping {out / skipped} (incomplete: " in lines[0]


def test_resume_finishes_from_the_previous_checkpoint_past_a_cut_short_one(tmp_path, cache_dir, uninterrupted,
                                                                          capsys):
    """The issue's repro on the tiny run: the newest checkpoint cut short as a death mid-save leaves it."""
    straight, folder = uninterrupted
    out = tmp_path / "out"
    shutil.copytree(folder, out)
    os.truncate(out / "checkpoint-8" / "model.safetensors", 1000)
    os.truncate(out / "checkpoint-8" / "trainer_state.json", 0)
    summary = lightweight_small.main(argv(out, cache_dir, "--max-steps", "10", "--resume"))
    err = capsys.readouterr().err
    assert summary["steps"] == 10 and "Traceback" not in err
    assert sum("skipping" in line for line in err.splitlines()) == 1
    assert sorted(losses(out)) == list(range(1, 11))  # the rows after step 6 replaced, none twice
    assert checkpoint_problem(out / "checkpoint-8") is None  # written again, whole


def test_no_complete_checkpoint_exits_2_saying_how_to_start_fresh(tmp_path, cache_dir, uninterrupted, capsys):
    out = tmp_path / "out"
    shutil.copytree(uninterrupted[1], out)
    for name in ("checkpoint-6", "checkpoint-8"):
        os.truncate(out / name / "model.safetensors", 0)
    (out / STAGING / "checkpoint-10").mkdir(parents=True)  # a leftover staging folder: never loaded
    with pytest.raises(SystemExit) as e:
        lightweight_small.main(argv(out, cache_dir, "--resume"))
    assert e.value.code == EXIT_BAD_INPUT
    lines = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert len([x for x in lines if "skipping" in x]) == 2
    (refusal,) = [x for x in lines if "skipping" not in x]
    assert "no complete checkpoint" in refusal and "without --resume" in refusal and "delete" in refusal


KILL_TRIALS = 20
KILL_WINDOW_SECONDS = 1.2  # kills spread over the first seconds of training, a save at every step


def test_sigkill_at_many_points_of_a_save_heavy_run(tmp_path, cache_dir):
    """SIGKILL at spread times of a run that saves every step; each trial's run resumes the one before (one
    process start per trial). After each kill every checkpoint-N is whole, and the next run resumes or starts
    afresh, never with a traceback; the last one finishes. Reports how many kills landed inside a save."""
    out, chance, inside = tmp_path / "out", random.Random(0), 0
    cmd = [sys.executable, str(REPO / "lightweight_small.py"), *TINY, "--lr", "3e-3", "--eval-every", "100000",
           "--save-every", "1", "--output-dir", str(out), "--cache-dir", str(cache_dir), "--wandb", "off"]
    for trial in range(KILL_TRIALS):
        resume = ["--resume"] if out.exists() and checkpoints(out) else []
        err = run_and_kill(cmd + ["--max-steps", "100000"] + resume, tmp_path / f"err{trial}",
                           chance.uniform(0, KILL_WINDOW_SECONDS))
        assert "Traceback" not in err, err
        staged = out / STAGING
        inside += staged.is_dir() and any(staged.iterdir())
        assert all(checkpoint_problem(out / name) is None for name in checkpoints(out)), checkpoints(out)
    newest = int(checkpoints(out)[-1].split("-")[1])
    done = subprocess.run(cmd + ["--max-steps", str(newest + 2), "--resume"], capture_output=True, text=True,
                          env=ENV, timeout=120)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    print(f"\n{inside} of {KILL_TRIALS} SIGKILLs landed inside a save")
    assert inside >= 1


def run_and_kill(cmd, err_path: Path, delay: float) -> str:
    """Start `cmd`; `delay` seconds after it starts training, SIGKILL it; its stderr."""
    with open(err_path, "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=ENV)
        deadline = time.time() + 60
        while proc.poll() is None and time.time() < deadline and "parameters train" not in err_path.read_text():
            time.sleep(0.02)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    return err_path.read_text()


BAD_VALUES = {
    "lr-nan": (["--lr", "nan"], "--lr must be positive and finite"),
    "lr-inf": (["--lr", "inf"], "--lr must be positive and finite"),
    "output-dir-in-proc": (["--output-dir", "/proc/no-such-place"], "--output-dir /proc/no-such-place: cannot write"),
    "cache-dir-in-proc": (["--cache-dir", "/proc/no-such-cache"], "--cache-dir /proc/no-such-cache: cannot write"),
    "epochs-inf": (["--epochs", "inf"], "--epochs must be positive and finite"),
    "epochs-nan": (["--epochs", "nan"], "--epochs must be positive and finite"),
    "gpu-memory-nan": (["--gpu-memory-gib", "nan"], "--gpu-memory-gib must be positive and finite"),
    "seed-negative": (["--seed", "-1"], "--seed must be from 0 to"),
    "seed-too-large": (["--seed", str(2**32)], "--seed must be from 0 to"),
    "seq-len-1": (["--seq-len", "1"], "--seq-len must be at least 2"),
    "logging-steps-0": (["--logging-steps", "0"], "--logging-steps must be positive"),
    "save-every-negative": (["--save-every", "-1"], "--save-every must be 0 or positive"),
    "eval-every-negative": (["--eval-every", "-3"], "--eval-every must be 0 or positive"),
    "profile-first-0": (["--profile-first", "0"], "--profile-first must be positive"),
}


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("extra, phrase", BAD_VALUES.values(), ids=BAD_VALUES.keys())
def test_bad_value_exits_2_with_one_line(script, extra, phrase, tmp_path, cache_dir, capsys):
    module = __import__(script)
    with pytest.raises(SystemExit) as e:
        module.main([*TINY, "--max-steps", "2", "--output-dir", str(tmp_path / "out"), "--cache-dir", str(cache_dir),
                     "--wandb", "off", *extra])
    assert e.value.code == EXIT_BAD_INPUT
    lines = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"{script}: error: ") and phrase in lines[0], lines
    assert not (tmp_path / "out").exists()  # tried, and removed again


def test_every_problem_is_reported_at_once(tmp_path, cache_dir, capsys):
    with pytest.raises(SystemExit):
        lightweight_small.main([*TINY, "--lr", "nan", "--seed", "-1", "--output-dir", "/proc/no-such-place",
                                "--cache-dir", str(cache_dir), "--wandb", "off"])
    lines = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert len(lines) == 3 and all(line.startswith("lightweight_small: error: ") for line in lines)
    assert ["--lr" in lines[0], "--seed" in lines[1], "--output-dir" in lines[2]] == [True] * 3


@pytest.mark.parametrize("script", SCRIPTS)
def test_the_issues_values_exit_2_before_torch_in_a_process_of_their_own(script, tmp_path):
    for extra in (["--lr", "nan"], ["--output-dir", "/proc/no-such-place"]):
        code = (f"import sys, {script}\ntry:\n    {script}.main(sys.argv[1:])\nexcept SystemExit as e:\n"
                f"    print('torch' in sys.modules, file=sys.stderr); raise")
        done = subprocess.run([sys.executable, "-c", code, "--model", "tiny", *extra], capture_output=True,
                              text=True, cwd=tmp_path, env={**ENV, "PYTHONPATH": str(REPO)}, timeout=60)
        lines = done.stderr.splitlines()
        assert done.returncode == 2 and lines[-1] == "False" and len(lines) == 2, done.stderr
        assert lines[0].startswith(f"{script}: error: ")


def test_full_disk_at_the_final_save_exits_4_with_one_line(tmp_path, cache_dir, capsys, monkeypatch):
    from transformers import Trainer

    def full_disk(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Trainer, "save_model", full_disk)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        lightweight_small.main([*TINY, "--max-steps", "2", "--output-dir", str(out), "--cache-dir", str(cache_dir),
                                "--wandb", "off"])
    assert e.value.code == EXIT_SAVE_FAILED
    err = capsys.readouterr().err
    (line,) = [x for x in err.splitlines() if "error:" in x]
    assert "could not save the trained model" in line and "No space left on device" in line
    assert "Traceback" not in err
    assert json.loads((out / "summary.json").read_text())["error"].startswith("could not save the trained model")


def damage_that_passes_the_check(folder: Path, how: str) -> None:
    """Damage a checkpoint so that it looks complete (checkpoint_problem: None) and still does not load."""
    state = json.loads((folder / "trainer_state.json").read_text())
    if how == "unknown-key":  # TrainerState(**state): an unexpected keyword argument
        (folder / "trainer_state.json").write_text(json.dumps({**state, "from_a_later_version": 1}))
    elif how == "only-global-step":
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": state["global_step"]}))
    else:  # a zip whose pickle is garbage: torch.load fails, the zip's directory is intact
        path = folder / how
        with zipfile.ZipFile(path) as z:
            members = {name: z.read(name) for name in z.namelist()}
        with zipfile.ZipFile(path, "w") as z:
            for name, data in members.items():
                z.writestr(name, b"garbage" if name.endswith("data.pkl") else data)
    assert checkpoint_problem(folder) is None


@pytest.mark.parametrize("how", ["unknown-key", "only-global-step", "optimizer.pt", "rng_state.pth"])
def test_resume_falls_back_past_a_checkpoint_that_does_not_load(how, tmp_path, cache_dir, uninterrupted, capsys):
    straight, folder = uninterrupted
    out = tmp_path / "out"
    shutil.copytree(folder, out)
    damage_that_passes_the_check(out / "checkpoint-8", how)
    summary = lightweight_small.main(argv(out, cache_dir, "--max-steps", "10", "--resume"))  # 8: complete
    err = capsys.readouterr().err
    assert summary["steps"] == 10 and "Traceback" not in err
    (line,) = [x for x in err.splitlines() if "skipping" in x]
    assert f"skipping {out / 'checkpoint-8'} (does not load: " in line
    resumed = losses(out)
    assert sorted(resumed) == list(range(1, 11))
    # step 7's loss: checkpoint-6's weights on step 7's data, as in the straight run (later steps follow a schedule
    # stretched to 10 steps)
    assert resumed[7] == pytest.approx(straight[7], rel=1e-5, abs=1e-6)


def test_resume_where_no_checkpoint_loads_exits_2_in_one_line(tmp_path, cache_dir, uninterrupted, capsys):
    out = tmp_path / "out"
    shutil.copytree(uninterrupted[1], out)
    for name in ("checkpoint-6", "checkpoint-8"):
        damage_that_passes_the_check(out / name, "unknown-key")
    with pytest.raises(SystemExit) as e:
        lightweight_small.main(argv(out, cache_dir, "--max-steps", "10", "--resume"))
    assert e.value.code == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "Traceback" not in err and sum("does not load" in x for x in err.splitlines()) == 2
    (line,) = [x for x in err.splitlines() if "error:" in x]
    assert "no checkpoint in" in line and "loads" in line and "without --resume" in line


def test_an_unreadable_file_is_named_as_a_problem(tmp_path, uninterrupted, monkeypatch):
    out = tmp_path / "out"
    shutil.copytree(uninterrupted[1], out)

    def unreadable(path, *a, **kw):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(zipfile, "ZipFile", unreadable)
    assert checkpoint_problem(out / "checkpoint-8") == "optimizer.pt: unreadable (Permission denied)"


def test_one_run_per_output_folder(tmp_path, cache_dir, capsys):
    """A second run, or a --resume, while a run trains in the folder is refused in one line naming it, before it
    reads or writes anything there; once that run is killed, its lock is taken over."""
    out = tmp_path / "out"
    cmd = [sys.executable, str(REPO / "lightweight_small.py"), *argv(out, cache_dir, "--max-steps", "100000",
                                                                     "--save-every", "1")]
    with open(tmp_path / "err", "w") as err:
        first = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=ENV)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (out / "checkpoint-2").is_dir():
            time.sleep(0.05)
        for extra in ([], ["--resume"]):
            rows = (out / "metrics.jsonl").read_text()
            with pytest.raises(SystemExit) as e:
                lightweight_small.main(argv(out, cache_dir, *extra))
            assert e.value.code == EXIT_BAD_INPUT
            lines = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
            assert len(lines) == 1 and f"is in use by lightweight_small (pid {first.pid})" in lines[0], lines
            assert (out / "metrics.jsonl").read_text().startswith(rows)  # not cut back: the first run goes on
        assert first.poll() is None
    finally:
        first.kill()
        first.wait(timeout=60)
    newest = step_of(Path(find_checkpoint(out, resume=True)))
    resumed = lightweight_small.main(argv(out, cache_dir, "--max-steps", str(newest + 1), "--resume"))
    assert resumed["steps"] == newest + 1


def test_resume_by_another_script_or_model_is_refused_before_anything_is_cut(tmp_path, cache_dir, uninterrupted,
                                                                             capsys):
    import lightweight_big

    out = tmp_path / "out"
    shutil.copytree(uninterrupted[1], out)
    rows = (out / "metrics.jsonl").read_text()
    assert json.loads((out / "checkpoint-8" / MADE_BY).read_text()) == {"script": "lightweight_small", "model": "tiny"}
    (out / "checkpoint-6" / MADE_BY).write_text(json.dumps({"script": "lightweight_small", "model": "other/model"}))
    shutil.rmtree(out / "checkpoint-8")
    for main, expected in ((lightweight_big.main, "made by lightweight_small with --model other/model, not by "
                                                  "lightweight_big with --model tiny"),
                           (lightweight_small.main, "not by lightweight_small with --model tiny")):
        with pytest.raises(SystemExit) as e:
            main(argv(out, cache_dir, "--resume"))
        assert e.value.code == EXIT_BAD_INPUT
        lines = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
        assert len(lines) == 1 and expected in lines[0] and "choose another --output-dir" in lines[0], lines
        assert (out / "metrics.jsonl").read_text() == rows


def test_resume_of_a_finished_run_trains_no_further(tmp_path, cache_dir, uninterrupted, capsys):
    out = tmp_path / "out"
    shutil.copytree(uninterrupted[1], out)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    with pytest.raises(SystemExit) as e:
        lightweight_small.main(argv(out, cache_dir, "--resume"))
    assert e.value.code == 0
    lines = [x for x in capsys.readouterr().err.splitlines() if x.strip() and "Loading weights" not in x]
    assert len(lines) == 1 and "checkpoint-8 is step 8 of 8: the run is complete" in lines[0], lines
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


def test_a_loss_that_diverges_stops_the_run_with_one_line(tmp_path, cache_dir, capsys):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:  # this learning rate: a NaN gradient norm at step 2
        lightweight_small.main(argv(out, cache_dir, "--lr", "1e4"))
    assert e.value.code == EXIT_DIVERGED == 5
    err = capsys.readouterr().err
    (line,) = [x for x in err.splitlines() if "error:" in x]
    assert "Traceback" not in err and "done" not in err
    assert "training diverged at step 2 (grad_norm nan" in line and "try a lower --lr than 10000" in line
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 2 and checkpoints(out) == []  # checkpoint-2 would hold NaN weights: not saved
    assert json.loads((out / "summary.json").read_text())["error"].startswith("training diverged at step 2")


@pytest.mark.parametrize("fp16, stops", [(False, True), (True, False)])
def test_an_infinite_gradient_norm_is_divergence_except_under_fp16_loss_scaling(fp16, stops):
    """Under fp16 the loss scaler's overflow logs an infinite gradient norm for a step it skips: not divergence."""
    from types import SimpleNamespace

    from transformers import TrainerControl

    from harness.training import StopWhenDiverged

    stopper, control = StopWhenDiverged(), TrainerControl()
    stopper.on_log(SimpleNamespace(fp16=fp16), SimpleNamespace(global_step=3), control,
                   logs={"loss": 9.1, "grad_norm": float("inf")})
    assert control.should_training_stop == stops and (stopper.diverged_at == 3) == stops
