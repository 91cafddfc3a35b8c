"""Stopping and resuming: Ctrl-C / SIGTERM finish the step and save; --resume finds the checkpoint."""
from __future__ import annotations

import ast
import contextlib
import json
import logging
import os
import signal
import sys
from pathlib import Path

from harness.checkpoints import made_by_another, newest_complete, step_of, write_whole
from harness.cli import EXIT_BAD_INPUT, InputError, RunEnded, say


def no_checkpoint_at_the_end(save_every: int):
    """A TrainerCallback that drops the Trainer's own save at the last step (model, optimizer, scheduler, RNG: a
    checkpoint to resume from), unless the step is a --save-every one. A finished run has nothing left to resume,
    and that save cost more than the training of lightweight_small's default job (3.8 s for 4 GB); the
    session saves the trained model alone instead (harness.training.train_to_the_end). A stop signal at the last
    step still saves: StopOnSignal's callback runs after this one."""
    from transformers import TrainerCallback

    class NoCheckpointAtTheEnd(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step >= state.max_steps and not (save_every and state.global_step % save_every == 0):
                control.should_save = False

    return NoCheckpointAtTheEnd()


def earlier_checkpoints(out: Path) -> list[Path]:
    """checkpoint-N folders in `out` that a fresh run there would mix with its own (those with trainer_state.json)."""
    return [p for p in out.iterdir() if step_of(p) is not None and (p / "trainer_state.json").exists()] \
        if out.is_dir() else []


def find_checkpoint(output_dir, resume: bool, script: str | None = None, model: str | None = None) -> str | None:
    """For --resume, the newest complete checkpoint in --output-dir (checkpoints.checkpoint_problem: files present
    and readable, global_step as named), each newer incomplete one named in a line and skipped; one made by
    another script or --model than `script` and `model` is refused. Without --resume, make sure there is none (a
    fresh run there would leave an older run's checkpoints for a later --resume to pick up)."""
    out = Path(output_dir)
    if not resume:
        if earlier_checkpoints(out):
            raise InputError(f"--output-dir {out} holds checkpoints of an earlier run: pass --resume to continue it, "
                             f"or choose another --output-dir (or delete them)")
        return None
    newest, skipped = newest_complete(out, quiet=os.environ.get("RANK", "0") != "0")
    if newest is None and skipped:
        raise InputError(f"--resume: no complete checkpoint in {out} ({', '.join(p.name for p in skipped)} "
                         f"incomplete); to start fresh, delete those folders or choose another --output-dir, "
                         f"and run without --resume")
    if newest is None:
        raise InputError(f"--resume: no complete checkpoint-N folder in {out} to resume from (run without --resume "
                         f"to start fresh)")
    other = script is not None and made_by_another(newest, script, model)
    if other:
        raise InputError(f"--resume: {other}: resume with that script and --model, or choose another --output-dir")
    return str(newest)


class NoCheckpointLoads(RunEnded):
    """--resume found complete checkpoints, and none of them loads: exit 2, as where none is complete."""

    exit_code = EXIT_BAD_INPUT


def train_from_one_that_loads(trainer, checkpoint: str | None):
    """trainer.train() resumed from `checkpoint`, or, where it does not load (any error before the first step
    begins: weights, trainer_state.json, optimizer, scheduler or RNG state), from the newest complete one before
    it, each that failed named in one line; none loads: NoCheckpointLoads. The Trainer is trained again in place
    (as transformers' own auto_find_batch_size retries it): the older checkpoint's load replaces everything the
    failed one loaded. One process only: under a launcher a failure is raised as it is."""
    from harness.budget import out_of_memory

    while True:
        mark = first_step_mark()
        trainer.add_callback(mark)
        try:
            return trainer.train(resume_from_checkpoint=checkpoint)
        except Exception as e:
            if (checkpoint is None or mark.began or out_of_memory(e) or isinstance(e, RunEnded)
                    or trainer.args.world_size > 1):  # RunEnded: a run's own ending (a failed write: exit 4)
                raise
            checkpoint = older_checkpoint(Path(checkpoint), f"{type(e).__name__}: {e}")
        finally:
            trainer.remove_callback(mark)


def older_checkpoint(failed: Path, error: str) -> str:
    """After `failed` did not load (`error`, first line): the newest complete checkpoint before it."""
    say(f"--resume: skipping {failed} (does not load: {error.strip().splitlines()[0][:300]})")
    older, _ = newest_complete(failed.parent, before=step_of(failed))
    if older is None:
        raise NoCheckpointLoads(f"--resume: no checkpoint in {failed.parent} loads; to start fresh, delete the "
                                f"checkpoint-N folders or choose another --output-dir, and run without --resume")
    return str(older)


def first_step_mark():
    """A TrainerCallback whose `began` turns True as the first step begins: the checkpoint has loaded by then."""
    from transformers import TrainerCallback

    class FirstStep(TrainerCallback):
        began = False

        def on_step_begin(self, args, state, control, **kwargs):
            self.began = True

    return FirstStep()


def restart_metrics(path: Path, resume_step: int | None) -> int:
    """Start metrics.jsonl afresh, or on resume keep the rows up to the checkpoint's step (later rows will be
    logged again) but the interrupted run's end-of-training row (train_runtime, ...): the resumed run writes
    its own at the end. A row cut short by a failed write, or with no step, is dropped with one line. The file is
    rewritten whole (harness.checkpoints.write_whole). Returns the tokens trained up to there."""
    rows, torn = readable_rows(path) if resume_step is not None else ([], [])
    if torn:
        say(f"--resume: dropping {len(torn)} unreadable row(s) of {path} (line {', '.join(map(str, torn))}: cut "
            f"short by a failed write, or without a step)")
    kept = [r for r in rows if r["step"] <= resume_step and "train_runtime" not in r]
    write_whole(path, "".join(json.dumps(r) + "\n" for r in kept), path.parent)
    return max((r["tokens_trained"] for r in kept if "tokens_trained" in r), default=0)


def readable_rows(path: Path) -> tuple[list[dict], list[int]]:
    """(metrics.jsonl's rows that parse and have an integer step, the line numbers of those that do not)."""
    rows, torn = [], []
    lines = path.read_text(errors="replace").splitlines() if path.exists() else []
    for number, line in enumerate(lines, 1):
        try:
            row = json.loads(line) if line.strip() else None
        except ValueError:
            row = {}
        if row is not None and isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(row)
        elif row is not None:
            torn.append(number)
    return rows, torn


@contextlib.contextmanager
def tied_embedding_not_reported_missing(model):
    """Silence the Trainer's "There were missing keys in the checkpoint model loaded: [...]" on resume where each
    key it names is the very tensor of the input embedding (OPT's and GPT-Neo's tied lm_head.weight).

    Such a key is not saved (safetensors keeps a shared tensor once) and loading the embedding restores it: the
    checkpoint is whole. transformers 5.17 compares the missing keys with `_keys_to_ignore_on_save`, empty for
    these models, not with the tied keys, so it warns (huggingface/transformers#27972). Any other missing key is
    still reported. A filter on transformers' logger: the public hook for a library's log records.
    """
    def is_tied_embedding(name: str) -> bool:
        # the embedding is looked up when a record comes, never held: under FSDP the model's weights are replaced
        # by shards in train(), and holding the original would keep 393 MiB of GPT-Neo's embedding on each GPU
        try:
            return model.get_parameter(name) is model.get_input_embeddings().weight
        except AttributeError:
            return False

    def report(record: logging.LogRecord) -> bool:
        message = record.getMessage()
        prefix = "There were missing keys in the checkpoint model loaded: "
        if not message.startswith(prefix):
            return True
        try:
            keys = ast.literal_eval(message[len(prefix):].rstrip("."))
        except (ValueError, SyntaxError):  # not the list this filter knows: report it as it is
            return True
        return not (keys and all(is_tied_embedding(k) for k in keys))

    logger = logging.getLogger("transformers.trainer")
    logger.addFilter(report)
    try:
        yield
    finally:
        logger.removeFilter(report)


class StopOnSignal:
    """Ctrl-C or SIGTERM during training: finish the optimizer step, save a checkpoint, stop cleanly.

    A second Ctrl-C exits at once. Entered before training and held by the session until the run has ended (the
    summary and W&B written); `callback()` is the TrainerCallback that turns the request into `should_save` and
    `should_training_stop`.
    """

    def __init__(self, script: str, save: bool, quiet: bool = False, launched: bool = False):
        self.script, self.save, self.quiet, self.signum, self._previous = script, save, quiet, None, {}
        self.launched = launched  # under torchrun / accelerate launch, which forward the signal
        self.training = True  # False once training and the final save are over: the run only ends then

    def __enter__(self):
        self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            os._exit(128 + signum)  # second Ctrl-C: no checkpoint, no cleanup
        self.signum = signum
        message = (f"\n{self.script}: {signal.Signals(signum).name}: "
                   + ("stopping after this optimizer step" + (" and saving a checkpoint" if self.save else "")
                      if self.training else "training is over; writing summary.json first")
                   + (" (Ctrl-C again to quit at once)\n" if not self.launched else
                      " (the launcher kills the processes after TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds, default 30)\n"))
        if not self.quiet:  # under torchrun every process gets the signal: one message is enough
            os.write(sys.stderr.fileno(), message.encode())  # not print: the signal may interrupt a stderr write

    def callback(self):
        import torch
        from transformers import TrainerCallback

        stopper = self

        class StopCallback(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if args.world_size > 1:  # all processes stop after the same step, or the others would wait forever
                    signum = torch.tensor([stopper.signum or 0], device=args.device)
                    torch.distributed.all_reduce(signum, op=torch.distributed.ReduceOp.MAX)
                    stopper.signum = stopper.signum or int(signum.item()) or None
                if stopper.signum is not None:
                    control.should_training_stop = True
                    control.should_save = stopper.save
                if control.should_training_stop or state.global_step >= state.max_steps:
                    control.should_log = True  # the steps since the last log are counted, not lost

        return StopCallback()
