"""Checkpoints that are whole or absent: staged under OUTPUT_DIR/.staging and renamed into place once complete;
checked before --resume loads one; a failed save ends in one line and exit 4.

Nothing here imports torch at module level: --resume's check runs before the heavy imports.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import zipfile
from pathlib import Path

from harness.cli import EXIT_SAVE_FAILED, RunEnded


STAGING = ".staging"  # not "checkpoint-*": transformers' rotation and find_checkpoint never see it
WEIGHTS = ("model.safetensors", "adapter_model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
           "pytorch_model_fsdp.bin", "adapter_model.bin")  # one of them: full, LoRA, sharded, FSDP's whole state
MADE_BY = "made_by.json"  # {"script": ..., "model": ...}: a --resume by another script or model is refused
OPTIMIZER = ("optimizer.pt", "optimizer.bin", "optimizer_0")  # one of them: plain, FSDP's whole state, sharded


class CheckpointNotSaved(RunEnded):
    """A write failed (full disk, read-only folder, any OSError): a checkpoint or the trained model was not
    published, a metrics.jsonl row or summary.json not written. What was whole before stays whole, and the line
    says what was kept. Exit code 4 (harness.outcome.finish)."""

    exit_code = EXIT_SAVE_FAILED


def step_of(folder: Path) -> int | None:
    """N of a checkpoint-N folder; None for any other name."""
    prefix, _, number = folder.name.partition("-")
    return int(number) if prefix == "checkpoint" and number.isdigit() else None


def checkpoint_problem(folder: Path) -> str | None:
    """What makes `folder` unfit to resume from (a missing, empty, cut short or unreadable file, a global_step
    that is not the folder's N), or None where it is complete. Reads headers only, never whole tensors."""
    if not folder.is_dir():
        return "not a folder"
    names = {p.name for p in folder.iterdir()}
    if not names:
        return "the folder is empty"
    missing = [what for what, options in (("trainer_state.json", ("trainer_state.json",)), ("weights", WEIGHTS),
                                          ("optimizer state", OPTIMIZER), ("scheduler.pt", ("scheduler.pt",)))
               if not names & set(options)]
    if missing:
        return f"no {', no '.join(missing)}"
    try:
        state = json.loads((folder / "trainer_state.json").read_text())
    except (ValueError, UnicodeDecodeError):
        return "trainer_state.json does not parse"
    except OSError as e:
        return f"trainer_state.json: unreadable ({e.strerror or e})"
    if not isinstance(state, dict) or state.get("global_step") != step_of(folder):
        got = state.get("global_step") if isinstance(state, dict) else None
        return f"trainer_state.json says step {got}, not {step_of(folder)}"
    for path in sorted(folder.iterdir()):
        problem = file_problem(path)
        if problem:
            return f"{path.name}: {problem}"
    return None


def file_problem(path: Path) -> str | None:
    """Why `path` is not a whole file of its kind (safetensors, JSON, torch.save's zip), or None."""
    if path.is_dir():
        return None if any(path.iterdir()) else "an empty folder"
    size = path.stat().st_size
    if size == 0:
        return "empty (0 bytes)"
    try:
        if path.suffix == ".safetensors":
            return safetensors_problem(path, size)
        if path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix in (".pt", ".pth", ".bin"):  # torch.save writes a zip; its directory is at the end
            zipfile.ZipFile(path).close()
    except (ValueError, UnicodeDecodeError):
        return "does not parse"
    except zipfile.BadZipFile:
        return f"cut short or unreadable ({size} bytes)"
    except OSError as e:  # a file this process may not read
        return f"unreadable ({e.strerror or e})"
    return None


def safetensors_problem(path: Path, size: int) -> str | None:
    """A safetensors file: an 8-byte header length, a JSON header, then the data its offsets end at."""
    with open(path, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        if size < 8 or length > size - 8:
            return f"header cut short ({size} bytes)"
        header = json.loads(f.read(length))
    try:
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    except (KeyError, IndexError, TypeError, AttributeError):
        return "unreadable header"
    if 8 + length + end > size:
        return f"cut short ({size} of {8 + length + end} bytes)"
    return None


def newest_complete(out: Path, quiet: bool = False, before: int | None = None) -> tuple[Path | None, list[Path]]:
    """(the newest complete checkpoint-N in `out` (N < `before`, if given) or None, the newer incomplete ones
    skipped). Each skipped one is named in one line on stderr (unless quiet). Staging folders are ignored: they
    never hold a checkpoint-N."""
    found = sorted((p for p in out.iterdir() if step_of(p) is not None and (before is None or step_of(p) < before)),
                   key=step_of, reverse=True) if out.is_dir() else []
    skipped = []
    for folder in found:
        problem = checkpoint_problem(folder)
        if problem is None:
            return folder, skipped
        skipped.append(folder)
        if not quiet:
            print(f"--resume: skipping {folder} (incomplete: {problem})", file=sys.stderr)
    return None, skipped


def made_by(script: str, model: str) -> dict:
    """What a checkpoint records of the run that made it: the script, and --model (a local folder by its full path)."""
    return {"script": script, "model": str(Path(model).resolve()) if Path(model).exists() else model}


def made_by_another(folder: Path, script: str, model: str) -> str | None:
    """How the run that made checkpoint `folder` differs from `script` with `model` (None: it does not, or the
    checkpoint does not say)."""
    try:
        theirs = json.loads((folder / MADE_BY).read_text())
    except (OSError, ValueError):
        return None
    ours = made_by(script, model)
    if not isinstance(theirs, dict) or all(theirs.get(k) == v for k, v in ours.items()):
        return None
    return (f"{folder} was made by {theirs.get('script')} with --model {theirs.get('model')}, not by {script} with "
            f"--model {ours['model']}")


def publish(staged: Path, final: Path) -> None:
    """Rename the complete `staged` folder to `final` (atomic on one filesystem). A `final` already there (an
    incomplete one left by an earlier run, which this resumed run replaces) is moved aside first, then deleted."""
    if final.exists():
        aside = staged.parent / f"replaced-{final.name}"
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(final, aside)
        os.replace(staged, final)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.replace(staged, final)


def is_write_failure(e: BaseException) -> bool:
    """An OSError, torch.save's RuntimeError for one (a full disk: "inline_container.cc ... unexpected pos"), or
    safetensors' SafetensorError for one ("Error while serializing: I/O error: No space left on device")."""
    return isinstance(e, OSError) or (isinstance(e, RuntimeError) and any(
        s in str(e) for s in ("inline_container", "PytorchStreamWriter", "file write failed", "No space left"))) or (
        type(e).__name__ == "SafetensorError" and "I/O error" in str(e))


def kept(run_dir: Path) -> str:
    """What a failed write leaves to go on from: the complete checkpoints in `run_dir`, for the error's line."""
    whole = [p.name for p in sorted(run_dir.glob("checkpoint-*"), key=lambda p: step_of(p) or -1)
             if step_of(p) is not None and checkpoint_problem(p) is None] if run_dir.is_dir() else []
    return (f"kept: {', '.join(whole)} in {run_dir}, to continue from with --resume" if whole else
            f"no checkpoint in {run_dir} to continue from")


def write_whole(path: Path, text: str, run_dir: Path, quiet: bool = False) -> None:
    """`path` holds `text`, or what it held before: written beside it and renamed over it. A failed write ends the
    run in one line (CheckpointNotSaved; none where `quiet`: an earlier failure's line said it) and leaves no
    partial file."""
    part = path.with_name(f".{path.name}.part")
    try:
        with open(part, "w") as f:
            f.write(text)
        os.replace(part, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            part.unlink()
        raise CheckpointNotSaved(f"could not write {path}: {e.strerror or e} ({path.name} as it was before; "
                                 f"{kept(run_dir)})", main_process=not quiet) from e


def append_line(path: Path, line: str, run_dir: Path) -> None:
    """`line` appended to `path` whole, or not at all: a failed write is cut off again where the disk allows
    (what is left of it, a torn last line, is dropped on --resume: harness.signals.restart_metrics). A failure
    ends the run in one line (CheckpointNotSaved)."""
    start = path.stat().st_size if path.exists() else 0
    try:
        with open(path, "a") as f:
            f.write(line)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.truncate(path, start)
        raise CheckpointNotSaved(f"could not append to {path}: {e.strerror or e} (its earlier rows are kept; "
                                 f"{kept(run_dir)})") from e


def save_staged(trainer, save, run_dir: Path) -> None:
    """Run the Trainer's `save` (which writes checkpoint-N into `trainer.staging`, see MeasuringTrainer), then
    publish it as run_dir/checkpoint-N once every process has written its part, and only then rotate
    (save_total_limit): the last complete checkpoint is never deleted before the new one is complete.

    Written by hand around Trainer._save_checkpoint: transformers 5.17 writes straight into checkpoint-N and
    has no staging of its own. A failed write (on any process) raises CheckpointNotSaved on every process.
    """
    name = f"checkpoint-{trainer.state.global_step}"
    staging, final = run_dir / STAGING, run_dir / name
    if trainer.args.should_save:
        shutil.rmtree(staging, ignore_errors=True)  # what a killed save left
    trainer.accelerator.wait_for_everyone()  # no process writes its part (rng_state_i.pth) into a folder removed
    error = None
    trainer.staging = staging
    try:
        save()
        if trainer.args.should_save:
            (staging / name / MADE_BY).write_text(json.dumps(trainer.made_by) + "\n")
    except Exception as e:
        if not is_write_failure(e):
            raise
        error = f"{getattr(e, 'filename', None) or staging / name}: {e}"
    finally:
        trainer.staging = None
    failed = failed_anywhere(trainer, error is not None)  # also the barrier: every process's files are written
    if not failed and trainer.args.should_save:
        problem = checkpoint_problem(staging / name)  # a short write that raised nothing is caught here
        error = problem and f"{staging / name}: {problem}"
    if failed or failed_anywhere(trainer, error is not None):  # every process learns the check's answer
        if trainer.args.should_save:
            shutil.rmtree(staging, ignore_errors=True)
        raise CheckpointNotSaved(f"could not save {name}: {error or 'another process failed to write its part'} "
                                 f"({kept(run_dir)})", trainer.is_world_process_zero())
    if trainer.args.should_save:
        try:
            publish(staging / name, final)
        except OSError as e:
            raise CheckpointNotSaved(f"could not rename {staging / name} to {final}: {e}") from e  # first process
        rotate(run_dir, trainer.args.save_total_limit)
        with contextlib.suppress(OSError):  # empty now; the next save makes it again
            staging.rmdir()


def save_model_staged(trainer) -> None:
    """trainer.save_model() into OUTPUT_DIR/.staging/model, each file checked, then moved into OUTPUT_DIR: no
    config.json there without its weights. A failed write (any process) raises CheckpointNotSaved; the files of
    a model saved there before stay as they were."""
    run_dir = Path(trainer.args.output_dir)
    staged, main = run_dir / STAGING / "model", trainer.args.should_save
    if main:
        shutil.rmtree(staged, ignore_errors=True)  # what a killed save left
    try:
        trainer.save_model(str(staged))
        problem = next((f"{p}: {q}" for p in sorted(staged.iterdir()) if (q := file_problem(p))), None) if main \
            else None
        if problem:  # a short write that raised nothing
            raise OSError(problem)
        for path in sorted(staged.iterdir()) if main else ():
            os.replace(path, run_dir / path.name)
    except Exception as e:
        if not is_write_failure(e):
            raise
        raise CheckpointNotSaved(f"could not save the trained model in {run_dir}: {e} (none of its files was put "
                                 f"there; {kept(run_dir)})", trainer.is_world_process_zero()) from e
    finally:
        if main:
            shutil.rmtree(staged, ignore_errors=True)
            with contextlib.suppress(OSError):
                staged.parent.rmdir()


def rotate(run_dir: Path, keep: int | None) -> None:
    """All but the newest `keep` checkpoints deleted, each first renamed out of sight: transformers'
    rotate_checkpoints deletes in place, and a death mid-delete left a partial checkpoint-N."""
    folders = sorted((p for p in run_dir.glob("checkpoint-*") if step_of(p) is not None), key=step_of)
    for old in folders[:-keep] if keep else ():
        aside = run_dir / STAGING / f"deleting-{old.name}"
        aside.parent.mkdir(exist_ok=True)
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(old, aside)
        shutil.rmtree(aside, ignore_errors=True)


def failed_anywhere(trainer, failed: bool) -> bool:
    """Whether any process of the launch failed (one process: `failed`); every process waits here."""
    if trainer.args.world_size <= 1:
        return failed
    import torch

    flags = trainer.accelerator.gather(torch.tensor([int(failed)], device=trainer.args.device))
    return bool(flags.max().item())
