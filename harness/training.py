"""Training with the measuring Trainer: the Trainer a script's TrainingArguments build, the callbacks every run
has (checkpoints, Ctrl-C / SIGTERM, --profile), the training itself and what it measured."""
from __future__ import annotations

import functools
import math
import os
import signal
from pathlib import Path

from transformers import TrainerCallback

import common
from harness.cli import EXIT_DIVERGED, RunEnded


class LossDiverged(RunEnded):
    """The logged loss or gradient norm turned NaN or infinite: training stopped there, exit 5."""

    exit_code = EXIT_DIVERGED


class StopWhenDiverged(TrainerCallback):
    """At a log whose loss or gradient norm is NaN or infinite: stop training before that step's evaluation and
    checkpoint (its weights are lost already), and keep the step in `diverged_at`. It reads the logged values,
    already on the host: no synchronization of its own. (The Trainer's NaN filter of the logged loss, on where
    step_overlap is off, hides a NaN loss; the gradient norm still shows it.)"""

    diverged_at, what = None, None

    def on_log(self, args, state, control, logs=None, **kwargs):
        # under fp16's loss scaling an infinite gradient norm is a skipped step, not divergence: the loss tells
        watched = ("loss",) if args.fp16 else ("loss", "grad_norm")
        bad = [f"{k} {v}" for k, v in (logs or {}).items() if k in watched
               and isinstance(v, (int, float)) and not math.isfinite(v)]
        if bad and self.diverged_at is None:
            self.diverged_at, self.what = state.global_step, ", ".join(bad)
            control.should_training_stop, control.should_evaluate, control.should_save = True, False, False


def measuring_trainer(model, training_args, train_set, eval_set, config, seq_len: int, processes: int,
                      peak_tflops: float | None, metrics_path, one_batch_shape: bool, evaluate_eagerly: bool,
                      wandb_on: bool):
    """harness.measure's Trainer on `train_set` and the held-out `eval_set` (evaluated in micro-batches, or one block
    at a time where none may be dropped or several processes share a step). one_batch_shape and evaluate_eagerly:
    see session.Run.train. peak_tflops: the GPU's, for MFU. wandb_on: the W&B run is started, and transformers'
    callback logs to it."""
    from harness.measure import MeasuringTrainer, flops_per_token, parameter_counts
    from harness.wandb_run import wandb_callback

    micro_batch = training_args.per_device_train_batch_size
    one_by_one = training_args.dataloader_drop_last or processes > 1
    training_args.per_device_eval_batch_size = 1 if one_by_one else micro_batch
    training_args._n_gpu = min(training_args.n_gpu, 1)  # one GPU per run, no DataParallel: no public switch
    trainable, total = parameter_counts(model)
    return MeasuringTrainer(
        model=model, args=training_args, train_dataset=train_set, eval_dataset=eval_set,
        data_collator=functools.partial(common.causal_lm_collator, fill_to_rows=micro_batch)
        if one_batch_shape and processes == 1 else common.causal_lm_collator,
        callbacks=[wandb_callback()] if wandb_on else None,
        flops_per_token=flops_per_token(model, config, seq_len, frozen_base=trainable < total),
        peak_tflops=peak_tflops, metrics_path=metrics_path, evaluate_eagerly=evaluate_eagerly)


def add_run_callbacks(trainer, script: str, callbacks, save_every: int, save: bool, main_process: bool,
                      profile_dir: str | None, profile_first: int, cuda: bool):
    """The script's own `callbacks`, then every run's: no resumable checkpoint at the end, the stop on Ctrl-C /
    SIGTERM (saving a checkpoint if `save`) and --profile. Returns the stopper, to train inside of."""
    from harness.signals import StopOnSignal, no_checkpoint_at_the_end

    for callback in callbacks:
        trainer.add_callback(callback)
    trainer.add_callback(no_checkpoint_at_the_end(save_every))  # before the stopper's: see there
    stopper = StopOnSignal(script, save=save, quiet=not main_process, launched="TORCHELASTIC_RUN_ID" in os.environ)
    trainer.add_callback(stopper.callback())
    trainer.add_callback(StopWhenDiverged())
    if profile_dir and cuda and main_process:
        from harness.profile import ProfileSteps
        trainer.add_callback(ProfileSteps(profile_dir, first=profile_first))
    return stopper


def train_to_the_end(trainer, model, stopper, checkpoint: str | None, save: bool) -> tuple[float, str | None]:
    """(training seconds, the signal that stopped it early or None). A run that trained every step ends by saving the
    trained model, if `save`: weights and config (LoRA runs: the adapters), as `from_pretrained` loads them,
    counted as save time outside the Trainer's train_runtime. `stopper` is entered already, and stays until the
    run has ended (summary.json, W&B): a signal after the last step defers to that end too."""
    from harness.checkpoints import save_model_staged
    from harness.signals import tied_embedding_not_reported_missing, train_from_one_that_loads

    with tied_embedding_not_reported_missing(model):
        result = train_from_one_that_loads(trainer, checkpoint)
        end_if_diverged(trainer)
        # finished: every step trained (the same on every process). A signal that came after the last
        # step changes nothing: the model is saved, here where a signal waits for the save to end.
        finished = trainer.state.global_step >= trainer.state.max_steps
        if finished and save:
            with trainer._paused("save"):  # MeasuringTrainer's own pause: evaluation and saving time
                save_model_staged(trainer)
    stopper.training = False
    stopped = signal.Signals(stopper.signum).name if stopper.signum is not None and not finished else None
    return result.metrics["train_runtime"], stopped


def end_if_diverged(trainer) -> None:
    """LossDiverged, with the step and what to try, where StopWhenDiverged stopped the training."""
    from harness.checkpoints import kept

    (watch,) = [c for c in trainer.callback_handler.callbacks if isinstance(c, StopWhenDiverged)]
    if watch.diverged_at is not None:
        lr = trainer.args.learning_rate
        raise LossDiverged(f"training diverged at step {watch.diverged_at} ({watch.what}): try a lower --lr than "
                           f"{lr:g} (e.g. {lr / 10:g}); nothing of that step was saved "
                           f"({kept(Path(trainer.args.output_dir))})", trainer.is_world_process_zero())


def training_summary(trainer, train_seconds: float, processes: int) -> dict:
    """What training measured, for summary.json: time, tokens, tokens/s, losses, steps, compile, evaluation, saving."""
    history = trainer.state.log_history
    train_losses = [h["loss"] for h in history if "loss" in h]
    eval_losses = [h["eval_loss"] for h in history if "eval_loss" in h]
    summary = dict(
        train_seconds=train_seconds, tokens_trained=trainer.tokens_trained,
        tokens_per_second=(trainer.tokens_trained - trainer.tokens_before) / train_seconds,
        # warm-up: 10 steps where the run is long enough; transformers' Trainer compiling the whole model (the
        # peer-trainer_compile row) compiles again in steps 6-10, at 3.2 s a step against 0.2 s later
        steady_tokens_per_second=trainer.steady_tokens_per_second(warmup_steps=min(10, trainer.state.max_steps // 3)),
        final_train_loss=train_losses[-1] if train_losses else None,
        final_eval_loss=eval_losses[-1] if eval_losses else None, steps=trainer.state.global_step,
        compile_and_warmup_seconds=trainer.first_step_extra_seconds(),
        eval_seconds=trainer.seconds_in["eval"], save_seconds=trainer.seconds_in["save"],
        step_seconds_timeline=trainer.step_ends.seconds())
    if processes > 1:  # DistributedDataParallel's: gradients as views into its buckets (one copy)
        summary["ddp_gradient_as_bucket_view"] = getattr(trainer.model_wrapped, "gradient_as_bucket_view", None)
    return summary
