"""Every file a run writes is whole or as it was: a disk that fills while a checkpoint, the trained model,
metrics.jsonl or summary.json is written ends the run in one line and exit 4, and what is left resumes."""
import errno
import json
from pathlib import Path

import pytest

import lightweight_small
from conftest import TINY
from harness import checkpoints
from harness.checkpoints import STAGING, checkpoint_problem
from harness.cli import EXIT_SAVE_FAILED

STEPS = ["--max-steps", "6", "--lr", "3e-3", "--eval-every", "1000", "--save-every", "2"]
FULL = "No space left on device"


def argv(out, cache_dir, *extra):
    return [*TINY, *STEPS, "--output-dir", str(out), "--cache-dir", str(cache_dir), "--wandb", "off", *extra]


def the_one_error_line(err: str) -> str:
    assert "Traceback" not in err, err
    (line,) = [x for x in err.splitlines() if "error:" in x]
    assert line.startswith("error: "), line  # on a line of its own, not after the progress bar
    return line


def safetensors_disk_fills(monkeypatch, where: str) -> None:
    """A safetensors file whose path holds `where` is written half and then fails as safetensors fails on a full
    disk (its SafetensorError, not an OSError)."""
    import transformers.modeling_utils
    from safetensors import SafetensorError

    original = transformers.modeling_utils.safe_save_file

    def save_file(tensors, filename, metadata=None):
        if where not in str(filename):
            return original(tensors, filename, metadata=metadata)
        original(tensors, filename, metadata=metadata)
        Path(filename).write_bytes(Path(filename).read_bytes()[:1000])
        raise SafetensorError(f"Error while serializing: I/O error: {FULL} (os error 28)")

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", save_file)


def test_full_disk_in_a_checkpoints_safetensors_exits_4(tmp_path, cache_dir, capsys, monkeypatch):
    out = tmp_path / "out"
    safetensors_disk_fills(monkeypatch, f"{STAGING}/checkpoint-4/")  # checkpoint-2 is whole
    with pytest.raises(SystemExit) as e:
        lightweight_small.main(argv(out, cache_dir))
    assert e.value.code == EXIT_SAVE_FAILED
    line = the_one_error_line(capsys.readouterr().err)
    assert "could not save checkpoint-4" in line and FULL in line and "kept: checkpoint-2" in line
    assert not (out / STAGING).exists() and checkpoint_problem(out / "checkpoint-2") is None
    monkeypatch.undo()
    assert lightweight_small.main(argv(out, cache_dir, "--resume"))["steps"] == 6


def test_full_disk_in_the_trained_models_safetensors_leaves_no_config_without_weights(tmp_path, cache_dir, capsys,
                                                                                      monkeypatch):
    out = tmp_path / "out"
    safetensors_disk_fills(monkeypatch, f"{STAGING}/model/")
    with pytest.raises(SystemExit) as e:
        lightweight_small.main(argv(out, cache_dir, "--save-every", "0"))
    assert e.value.code == EXIT_SAVE_FAILED
    line = the_one_error_line(capsys.readouterr().err)
    assert "could not save the trained model" in line and FULL in line and "no checkpoint" in line
    assert not (out / STAGING).exists()
    assert not (out / "config.json").exists() and not (out / "model.safetensors").exists()
    assert json.loads((out / "summary.json").read_text())["error"].startswith("could not save the trained model")


class FillingDisk:
    """harness.checkpoints' writes (metrics.jsonl's rows, summary.json) on a disk that fills at the `row`-th row:
    that write stops half-way with ENOSPC, and every write after it fails."""

    def __init__(self, row: int):
        self.row, self.rows, self.full = row, 0, False

    def open(self, path, mode="r", *a, **kw):
        f = open(path, mode, *a, **kw)
        if "a" in mode or "w" in mode:
            disk, write = self, f.write

            def filling(text):
                disk.rows += "a" in mode
                if disk.full or disk.rows >= disk.row:
                    write(text[: len(text) // 2] if not disk.full else "")
                    f.flush()
                    disk.full = True
                    raise OSError(errno.ENOSPC, FULL)
                return write(text)

            f.write = filling
        return f


def test_full_disk_while_metrics_are_appended_exits_4_and_resumes(tmp_path, cache_dir, capsys, monkeypatch):
    out = tmp_path / "out"
    monkeypatch.setattr(checkpoints, "open", FillingDisk(row=4).open, raising=False)
    with pytest.raises(SystemExit) as e:
        lightweight_small.main(argv(out, cache_dir))
    assert e.value.code == EXIT_SAVE_FAILED
    line = the_one_error_line(capsys.readouterr().err)  # summary.json failed too: no second line
    assert f"could not append to {out / 'metrics.jsonl'}" in line and FULL in line and "kept: checkpoint-2" in line
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]  # the torn row cut off again
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert not (out / "summary.json").exists() and not list(out.glob(".*.part"))  # no 0-byte summary.json
    monkeypatch.undo()
    assert lightweight_small.main(argv(out, cache_dir, "--resume"))["steps"] == 6


def test_resume_drops_a_torn_last_row_and_a_row_without_a_step(tmp_path, cache_dir, capsys):
    out = tmp_path / "out"
    lightweight_small.main(argv(out, cache_dir, "--max-steps", "4"))
    metrics = out / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join(lines[:2] + ['{"loss": 1.0}'] + lines[2:]) + "\n" + lines[-1][:30])
    capsys.readouterr()
    summary = lightweight_small.main(argv(out, cache_dir, "--resume"))
    err = capsys.readouterr().err
    assert summary["steps"] == 6 and "Traceback" not in err
    (line,) = [x for x in err.splitlines() if "unreadable row" in x]
    assert "dropping 2 unreadable row(s)" in line and "line 3, " in line
    steps = [json.loads(x)["step"] for x in metrics.read_text().splitlines() if '"loss"' in x]
    assert steps == list(range(1, 7))
