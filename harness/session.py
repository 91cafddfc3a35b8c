"""One training run, from the command line to summary.json: `with session(...) as run:` in each script.

Before the block: flags and corpus are checked (bad input: one line, exit 2, nothing written), the corpus is
tokenized, the weights are located (a random-init checkpoint is saved on first use) and the memory budget is
applied. In the block the script builds its model, data and TrainingArguments and calls `run.train(...)`.
After it, whatever happened: summary.json, the end of the W&B run, and the exit code (3: out of memory).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import json
import math
import os
import signal
import sys
from pathlib import Path
from typing import Callable

import common
from harness import step_size
from harness.cli import InputError, fsdp_launch, parse_args, processes_in_launch, refuse, validate_args
from harness.clock import seconds_since_process_start
from harness.outcome import end_the_process, exit_as_the_outcome_says
from harness.signals import find_checkpoint

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class LeanerMemory:
    """A way to hold fewer activations that costs time on every micro-batch, for the micro-batch probe
    (`Run.largest_micro_batch`): worth it only where the memory splits the step into `from_split` or more
    micro-batches, each paying its host work (launches, Python), and where it then fits one at least twice as large.

    switch: turns it on (True) or off (False) on the model. how: what the console line adds when it is used.
    variant: its trials' peaks are remembered apart from those without it.
    """
    switch: Callable[[bool], None]
    how: str
    variant: str
    from_split: int = 2


@contextlib.contextmanager
def session(script: str, model: str, techniques: dict, argv=None, **sizes):
    """Yield a `Run` for `script` (defaults: `model`, `sizes`) as the command line `argv` asks."""
    startup_seconds = seconds_since_process_start()  # interpreter, imports
    args, on = parse_args(script, model, techniques, sizes, argv)
    with collector_as_it_was():  # an at_start may pause Python's garbage collector (the lightweight scripts' gc_paused)
        for name, technique in techniques.items():
            if technique.at_start is not None and on(name):
                technique.at_start()
        try:
            run = Run(script, model, args, on)
        except InputError as e:
            refuse(f"{script}: error: {e}")  # exit 2; under torchrun printed by the first process only
        except KeyboardInterrupt:
            interrupted(script)
        failure = None
        try:
            run.load_weights()
            yield run
        except KeyboardInterrupt:
            interrupted(script)
        except Exception as e:  # out of memory or a crash: summary.json and the W&B run still end consistent
            failure = e
        try:
            run.finish(failure, startup_seconds, argv)
        except SystemExit as e:  # out of memory (3) or stopped by a signal
            if argv is None:
                end_the_process(e.code)
            raise
    if argv is None:  # the script's own process (`python lightweight_small.py`); main(argv) returns to its caller
        end_the_process(0)


@contextlib.contextmanager
def collector_as_it_was():
    """Python's garbage collector on or off, and frozen or not, afterwards as before: for a caller of main(argv)
    in the same process (the tests run many), whatever a run did to it."""
    enabled, frozen = gc.isenabled(), gc.get_freeze_count()
    try:
        yield
    finally:
        if not frozen:
            gc.unfreeze()
        if enabled:
            gc.enable()
        else:
            gc.disable()


def half_precision_dtype(cuda: bool):
    """The dtype of the bf16 technique and of half-precision weights: bf16 on the CPU and on GPUs that have it;
    fp16 on a CUDA GPU without bf16 (V100, T4), where the bf16 technique's TrainingArguments(fp16=True) adds loss
    scaling."""
    import torch

    return torch.bfloat16 if not cuda or torch.cuda.is_bf16_supported() else torch.float16


def interrupted(script: str):
    """Ctrl-C outside the training loop (setup, loading, the final save): nothing to save, exit 130."""
    print(f"\n{script}: interrupted", file=sys.stderr)
    raise SystemExit(128 + signal.SIGINT) from None


class Run:
    """What a script's block works with (args, on, device, tokenizer, records, weights) and `train()`."""

    def __init__(self, script: str, model: str, args, on):
        self.script, self.args, self.on = script, args, on
        # torchrun and `accelerate launch` describe the process group in the environment; one process: 1, 0, 0
        self.world_size = processes_in_launch()
        self.rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
        self.main_process = self.rank == 0  # the one that writes metrics.jsonl, summary.json and the W&B run
        validate_args(args, on, self.world_size)
        self.checkpoint = find_checkpoint(args.output_dir, args.resume)
        self.setup_marks = {"startup": seconds_since_process_start()}  # setup's parts: see setup_parts()
        self.corpus = common.load_corpus(args.corpus, args.cache_dir)
        self.mark("corpus")

        import torch  # after the cheap checks: a refusal above comes before this import

        from harness.budget import check_cpu_memory, check_memory_budget
        from harness.sources import resolve_model

        check_memory_budget(args.gpu_memory_gib)
        self.mark("torch_import")
        self.source = resolve_model(args.model, args.init, model, self.corpus, args.cache_dir)
        self.tokenizer, self.config = self.source.tokenizer, self.source.config
        self.mark("tokenizer_and_config")
        if args.model != "tiny" and not torch.cuda.is_available():  # before any weights are built or loaded
            check_cpu_memory(script, args.model, self.config, frozen_base=on.chosen.get("lora", False),
                             processes=self.world_size, quiet=not self.main_process)  # lora: lightweight_big's
        self.prepare_records()
        self.mark("records")

        self.cuda = torch.cuda.is_available()
        self.device = torch.device("cuda", local_rank) if self.cuda else torch.device("cpu")
        if self.cuda:
            torch.cuda.set_device(self.device)  # one GPU per process (torchrun: LOCAL_RANK)
        else:
            on.skip_cuda_only("CUDA only (this run is on the CPU)")
        if args.profile and not self.cuda:
            raise InputError("--profile times CUDA kernels and needs a CUDA GPU (none is visible)")
        self.bf16_or_fp16 = half_precision_dtype(self.cuda)
        self.summary = {"script": script, "model": args.model, "init": self.source.init, "oom": False,
                        "budget_gib": args.gpu_memory_gib, "techniques": on.names_on(),
                        "techniques_skipped": dict(on.skipped), "seq_len": args.seq_len,
                        "processes": self.world_size, "eval_blocks": len(self.eval_set), "micro_batch": None}
        if self.world_size > 1:
            self.summary["how_measured"] = (
                "tokens, tokens/s and MFU: total over the processes (MFU per GPU); memory: the maximum over the "
                "processes, each on its own GPU" if self.cuda else
                "tokens and tokens/s: total over the processes; no memory or MFU figures on the CPU")
        self.output_dir = Path(args.output_dir)
        self.metrics_path = self.output_dir / "metrics.jsonl" if self.main_process else None
        self.trainer = self.wandb_run = self.model = self.train_started = None
        self.autocast_dtype = None  # what the training step autocasts to (TrainingArguments bf16 / fp16)
        self.optim = "adamw_torch"  # for the out-of-memory estimate, until the script names its optimizer
        self.micro_batch_reason = "given by --micro-batch" if args.micro_batch_given else "the script's default"
        self.leaner_unused = "no micro-batch probe"  # why a LeanerMemory is off (largest_micro_batch)

    def prepare_records(self) -> None:
        """Tokenized training records and held-out blocks; InputError if the corpus cannot fill them."""
        args = self.args
        if args.seq_len > self.config.max_position_embeddings:
            raise InputError(f"--seq-len {args.seq_len} is beyond {args.model}'s "
                             f"{self.config.max_position_embeddings} positions")
        self.train_records, self.eval_set, self.train_tokens = common.training_records_and_heldout_blocks(
            self.tokenizer, self.corpus, args.seq_len, self.world_size, args.corpus)

    def load_weights(self) -> None:
        """Seed, output folder, weights on disk (random init saved once) and the budget: all before the model."""
        from transformers import set_seed

        from harness.budget import apply_memory_budget

        set_seed(self.args.seed)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.weights = self.source.from_pretrained_path(self.args.seed, self.args.cache_dir)  # before the cap:
        apply_memory_budget(self.args.gpu_memory_gib)  # a random init may be built on the GPU
        self.mark("weights_located")

    def mark(self, part: str) -> None:
        """Record that setup's `part` ends now (its seconds: from the previous mark)."""
        self.setup_marks[part] = seconds_since_process_start()

    def setup_parts(self) -> dict:
        """Seconds per part of setup, in order; the model part includes the script's micro-batch probe."""
        names, times = list(self.setup_marks), list(self.setup_marks.values())
        return {names[i]: round(times[i] - times[i - 1], 3) for i in range(1, len(names))}

    def accumulation(self, micro_batch: int, train_set) -> int:
        """Micro-batches per optimizer step per process (harness.step_size.accumulation: fair at equal data)."""
        return step_size.accumulation(micro_batch, self.world_size, self.args.seq_len, self.args.tokens_per_step,
                                      "attention_mask" in train_set.column_names, len(train_set), self.train_tokens)

    def largest_micro_batch(self, model, optim: str, autocast: bool, leaner: LeanerMemory | None = None) -> int:
        """--micro-batch if given; else the largest, halving from the script's, whose trial step fits the GPU's
        free memory or --gpu-memory-gib (the smallest over the processes of a launch).

        leaner: where that micro-batch splits the step into `leaner.from_split` or more, the probe switches it on
        and looks again, halving from the script's micro-batch down to twice the one without it; it stays on only
        if one of those fits. `leaner_unused` then says why it is off (None: on).
        """
        from harness.budget import available_gib

        args, self.optim = self.args, optim
        if args.micro_batch_given or not self.cuda:
            self.micro_batch_reason = "given by --micro-batch" if args.micro_batch_given else "default (no GPU)"
            self.leaner_unused = f"no micro-batch probe ({self.micro_batch_reason})"
            return args.micro_batch
        budget = args.gpu_memory_gib or available_gib()
        autocast_dtype = self.bf16_or_fp16 if autocast else None
        micro_batch, how = self.micro_batch_within(model, budget, optim, autocast_dtype, args.micro_batch)
        if self.world_size > 1:  # every process must agree: the smallest (and so on whether to use `leaner`)
            micro_batch = step_size.smallest_over_processes(micro_batch, self.device)
        self.leaner_unused = self.why_not_leaner(micro_batch, leaner)
        if self.leaner_unused is None:
            leaner.switch(True)
            larger, how_larger = self.micro_batch_within(model, budget, optim, autocast_dtype, args.micro_batch,
                                                         variant=leaner.variant, smallest=2 * micro_batch)
            if self.world_size > 1:
                larger = step_size.smallest_over_processes(larger, self.device)
            if larger > micro_batch:  # leaner_unused stays None: it is used
                micro_batch, how = larger, f"{how_larger}, {leaner.how}"
            else:
                leaner.switch(False)  # no larger micro-batch fits with it: not worth its cost
                self.leaner_unused = (f"with it, no micro-batch from {args.micro_batch} down to {2 * micro_batch} "
                                      f"fit" + (" on every process" if self.world_size > 1 else ""))
        where = f"--gpu-memory-gib {budget:g}" if args.gpu_memory_gib else f"the {budget:.1f} GiB this GPU has free"
        self.micro_batch_reason = f"the largest that fits 90% of {where}, at most {args.micro_batch}; by {how}"
        return micro_batch

    def why_not_leaner(self, micro_batch: int, leaner: LeanerMemory | None) -> str | None:
        """Why the probe does not try `leaner` after choosing `micro_batch` without it (None: it tries)."""
        args = self.args
        rows = max(1, args.tokens_per_step // (args.seq_len * self.world_size))  # a step's rows per process
        split = -(-rows // micro_batch)  # micro-batches a step (at least: padded rows carry fewer tokens)
        if micro_batch >= args.micro_batch:
            return ("one micro-batch a step: nothing to halve" if split <= 1 else
                    f"micro-batch {micro_batch} is the script's largest: the memory does not split the step")
        if leaner is None:
            return "not offered"
        if split < leaner.from_split:
            return f"{split} micro-batches a step; used from {leaner.from_split}"
        return None

    def micro_batch_within(self, model, budget: float, optim: str, autocast_dtype, largest: int,
                           variant: str = "", smallest: int = 1) -> tuple[int, str]:
        """(the largest micro-batch, halving from `largest` down to `smallest`, whose trial step fits 90% of `budget`
        GiB, 0 if none; how that was found). variant: what else the trial's peak depends on (part of the recipe its
        peaks are kept under)."""
        from harness.budget import choose_micro_batch, load_trial_peaks, save_trial_peaks

        # a trial step's peak is the same on every run of this recipe on this GPU: remembered in --cache-dir, a
        # later run skips the trials it already made (lightweight_small's probe took about 1.8 s of its job)
        peaks_file = Path(self.args.cache_dir) / "micro_batch_trial_peaks.json"
        recipe = self.trial_recipe(optim, autocast_dtype) + variant
        peaks = load_trial_peaks(peaks_file, recipe)
        remembered = set(peaks)
        micro_batch = choose_micro_batch(model, largest, self.args.seq_len, budget, optim, autocast_dtype,
                                         self.device, known_peaks=peaks, smallest=smallest)
        if self.main_process and set(peaks) != remembered:  # one writer per launch, and only what is new
            save_trial_peaks(peaks_file, recipe, peaks)
        return micro_batch, (f"its trial's peak remembered in {peaks_file}" if micro_batch in remembered
                             else "a trial step")

    def trial_recipe(self, optim: str, autocast_dtype) -> str:
        """A hash of what a micro-batch trial's peak memory depends on: script, techniques, model, sizes, optimizer,
        autocast, the fused loss's chunks, GPU and library versions."""
        import torch

        from harness.loss import LIGER_CHUNKS_AS_FOR_WIDTH
        from harness.measure import versions

        return common.content_hash(self.script, self.on.names_on(), self.config.to_json_string(), self.args.seq_len,
                                   getattr(self.args, "checkpoint_layers", None), optim, autocast_dtype,
                                   LIGER_CHUNKS_AS_FOR_WIDTH, torch.cuda.get_device_name(self.device), versions())

    def steps_to_train(self, train_set, micro_batch: int) -> int:
        """The optimizer steps this run takes: --max-steps, or --epochs over `train_set`."""
        per_epoch = step_size.steps_per_epoch(len(train_set), micro_batch, self.accumulation(micro_batch, train_set),
                                              self.world_size)
        return self.args.max_steps if self.args.max_steps > 0 else math.ceil(per_epoch * self.args.epochs)

    def shared_training_arguments(self, train_set, micro_batch: int) -> dict:
        """TrainingArguments every script shares: output, schedule, evaluation, saving, logging, devices."""
        args = self.args
        total_steps = self.steps_to_train(train_set, micro_batch)
        return dict(
            output_dir=str(self.output_dir), num_train_epochs=args.epochs, max_steps=args.max_steps,
            learning_rate=args.lr, lr_scheduler_type="linear", seed=args.seed, data_seed=args.seed,
            logging_steps=args.logging_steps, eval_strategy="steps",
            eval_steps=args.eval_every or math.ceil(total_steps / 4),
            # checkpoints every --save-every steps (and on a stop signal); none at the end: see save_final_model
            save_strategy="no" if args.no_checkpoints or not args.save_every else "steps",
            save_steps=args.save_every or total_steps,
            save_total_limit=2, report_to="none",  # W&B: the run started by `train`, through its callback
            prediction_loss_only=True, use_cpu=not self.cuda, dataloader_pin_memory=self.cuda,
            disable_tqdm=False, remove_unused_columns=False,
            ddp_find_unused_parameters=False,  # every trainable parameter is used; the search costs a graph walk
            # FSDP: reduce-scatter the gradients after every micro-batch, so each GPU keeps only its shard. By
            # default accelerate skips that while accumulating, and FSDP2 then holds them whole: +2.5 GiB per GPU
            # for before_big on 2 GPUs (results/raw/issue11_memory)
            accelerator_config={"gradient_accumulation_kwargs": {"sync_each_batch": True}} if fsdp_launch() else None,
        )

    def train(self, model, training_args, train_set, one_batch_shape: bool = False, evaluate_eagerly: bool = False,
              callbacks=()) -> None:
        """Start W&B, train with the measuring Trainer, and record the results in the summary.

        one_batch_shape: fill an epoch's last, shorter micro-batch (and evaluation's) with rows that carry no loss
        (common.causal_lm_collator), so that compiled code and kernels tuned per shape see one shape. One process only:
        with several, accelerate already completes the last training batch (`even_batches`, with rows from the
        epoch's start) and evaluation goes one block at a time. evaluate_eagerly: torch.compile'd code runs
        uncompiled in evaluation (`torch.compiler.set_stance("force_eager")`). callbacks: the script's own
        TrainerCallbacks.
        A run that trained every step ends by saving the trained model (`save_final_model`), unless --no-checkpoints.
        """
        import torch

        from harness.measure import MeasuringTrainer, flops_per_token, parameter_counts, peak_tflops
        from harness.signals import (StopOnSignal, no_checkpoint_at_the_end, restart_metrics,
                                     tied_embedding_not_reported_missing)
        from harness.wandb_run import wandb_callback

        self.mark("model_and_micro_batch")  # the script's block: model load, quantization, probe, dataset
        args, micro_batch = self.args, training_args.per_device_train_batch_size
        self.model, self.optim = model, str(getattr(training_args.optim, "value", training_args.optim))
        self.autocast_dtype = (torch.bfloat16 if training_args.bf16 else
                               torch.float16 if training_args.fp16 else None)
        self.summary.update(micro_batch=micro_batch, micro_batch_reason=self.micro_batch_reason,
                            gradient_accumulation=training_args.gradient_accumulation_steps,
                            techniques=self.on.names_on(), techniques_skipped=dict(self.on.skipped))  # as decided
        # evaluation in micro-batches, or one block at a time where no held-out block may be dropped (drop_last)
        # or several processes share a step (blocks_in_whole_steps)
        one_by_one = training_args.dataloader_drop_last or self.world_size > 1
        training_args.per_device_eval_batch_size = 1 if one_by_one else micro_batch
        training_args._n_gpu = min(training_args.n_gpu, 1)  # one GPU per run, no DataParallel: no public switch
        resume_step = int(Path(self.checkpoint).name.split("-")[-1]) if self.checkpoint else None
        tokens_before = restart_metrics(self.metrics_path, resume_step) if self.main_process else 0
        self.summary["trainable_params"], self.summary["total_params"] = trainable, total = parameter_counts(model)
        self.start_wandb(training_args)
        self.mark("wandb")
        peak, self.summary["mfu_peak_source"] = peak_tflops(torch.cuda.get_device_name(0) if self.cuda else "")
        self.summary["mfu_peak_tflops"] = peak
        self.trainer = MeasuringTrainer(
            model=model, args=training_args, train_dataset=train_set, eval_dataset=self.eval_set,
            data_collator=functools.partial(common.causal_lm_collator, fill_to_rows=micro_batch)
            if one_batch_shape and self.world_size == 1 else common.causal_lm_collator,
            callbacks=[wandb_callback()] if self.wandb_run is not None else None,
            flops_per_token=flops_per_token(self.config, args.seq_len, frozen_base=trainable < total),
            peak_tflops=peak, metrics_path=self.metrics_path, evaluate_eagerly=evaluate_eagerly)
        self.trainer.tokens_trained = tokens_before
        self.summary["parallelism"] = (  # accelerate's MULTI_GPU (DDP), FSDP, MULTI_CPU (gloo); it says MULTI_CPU
            self.trainer.accelerator.distributed_type.value if self.world_size > 1  # for one CPU process too
            else f"none (one process on the {'GPU' if self.cuda else 'CPU'})")
        for callback in callbacks:
            self.trainer.add_callback(callback)
        self.trainer.add_callback(no_checkpoint_at_the_end(args.save_every))  # before the stopper's: see there
        stopper = StopOnSignal(self.script, save=not args.no_checkpoints, quiet=not self.main_process,
                               launched="TORCHELASTIC_RUN_ID" in os.environ)
        self.trainer.add_callback(stopper.callback())
        if args.profile and self.cuda and self.main_process:
            from harness.profile import ProfileSteps
            self.trainer.add_callback(ProfileSteps(args.profile, first=args.profile_first))
        if self.cuda:
            torch.cuda.reset_accumulated_memory_stats()  # count the allocator's retries in training only
        self.mark("trainer")
        self.train_started = self.setup_marks["trainer"]
        with stopper, tied_embedding_not_reported_missing(model):
            result = self.trainer.train(resume_from_checkpoint=self.checkpoint)
            # finished: every step trained (the same on every process). A signal that came after the last
            # step changes nothing: the model is saved, here where a signal waits for the save to end.
            finished = self.trainer.state.global_step >= self.trainer.state.max_steps
            if finished and not args.no_checkpoints:
                self.save_final_model()
        if stopper.signum is not None and not finished:
            self.summary["interrupted"] = signal.Signals(stopper.signum).name
        self.summarize_training(result.metrics["train_runtime"], tokens_before)

    def save_final_model(self) -> None:
        """The trained model in --output-dir, as `from_pretrained` loads it: weights and config (LoRA runs: the
        adapters). Counted as save time, outside the Trainer's train_runtime."""
        with self.trainer._paused("save"):  # MeasuringTrainer's own pause: evaluation and saving time
            self.trainer.save_model()

    def summarize_training(self, train_seconds: float, tokens_before: int) -> None:
        trainer = self.trainer
        train_losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        eval_losses = [h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h]
        total_steps = trainer.state.max_steps
        self.summary.update(
            train_seconds=train_seconds, tokens_trained=trainer.tokens_trained,
            tokens_per_second=(trainer.tokens_trained - tokens_before) / train_seconds,
            steady_tokens_per_second=trainer.steady_tokens_per_second(warmup_steps=min(5, total_steps // 3)),
            final_train_loss=train_losses[-1] if train_losses else None,
            final_eval_loss=eval_losses[-1] if eval_losses else None, steps=trainer.state.global_step,
            compile_and_warmup_seconds=trainer.first_step_extra_seconds(),
            eval_seconds=trainer.seconds_in["eval"], save_seconds=trainer.seconds_in["save"],
            step_seconds_timeline=trainer.step_ends.seconds())
        if self.world_size > 1:  # DistributedDataParallel's: gradients as views into its buckets (one copy)
            self.summary["ddp_gradient_as_bucket_view"] = getattr(trainer.model_wrapped, "gradient_as_bucket_view", None)

    def start_wandb(self, training_args) -> None:
        """Print the run's line and start W&B with the whole configuration (first process only)."""
        from harness.wandb_run import run_config, start_wandb

        if not self.main_process:
            return
        args, micro_batch = self.args, training_args.per_device_train_batch_size
        accumulation = training_args.gradient_accumulation_steps
        trainable, total = self.summary["trainable_params"], self.summary["total_params"]
        processes = f" x {self.world_size} processes" if self.world_size > 1 else ""
        print(f"{self.script}: {args.model} ({self.source.note}), {trainable:,} of {total:,} parameters train; "
              f"micro-batch {micro_batch} ({self.micro_batch_reason}) x {args.seq_len} x {accumulation} "
              f"accumulation{processes}; "
              f"techniques: {', '.join(self.on.names_on()) or 'none'}", file=sys.stderr)
        self.wandb_run = start_wandb(self.script, args.wandb, args.resume, run_config(self, training_args),
                                     self.output_dir)

    def finish(self, failure: Exception | None, startup_seconds: float, argv) -> None:
        """Write summary.json and end W&B whatever happened; then exit as the outcome says (or return)."""
        import torch

        crash = None
        if isinstance(failure, torch.OutOfMemoryError):
            self.summary["oom"] = True
        elif failure is not None:
            crash = failure  # re-raised below, with its traceback
            self.summary["error"] = f"{type(failure).__name__}: {failure}"
        if failure is not None and self.trainer is not None:
            self.summary.update(steps=self.trainer.state.global_step, tokens_trained=self.trainer.tokens_trained)
        self.summary.update(peak_memory_gib=self.peak_memory_gib(failure is None), startup_seconds=startup_seconds)
        if self.train_started is not None:  # setup: corpus, tokenizer, model, quantization, probe
            self.summary["setup_seconds"] = self.train_started - startup_seconds
            self.summary["setup_parts"] = self.setup_parts()
        if self.trainer is not None and self.summary.get("steady_tokens_per_second"):
            self.summary["mfu"] = self.trainer.mfu(self.summary["steady_tokens_per_second"])
        if self.cuda:  # times the allocator hit the cap (or the GPU's end), freed its cache and retried: slow
            self.summary["cuda_alloc_retries"] = torch.cuda.memory_stats().get("num_alloc_retries")
        if self.summary["oom"]:  # after the peak and the retries are read: the probe makes its own
            self.summary["micro_batch_that_fits"] = self.micro_batch_that_fits(failure)
            self.summary["oom_message"] = self.oom_message()
        self.summary["job_seconds"] = seconds_since_process_start()  # until summary.json is written
        self.write_summary(failed=failure is not None)
        self.trainer = self.model = None
        if crash is not None:
            raise crash
        exit_as_the_outcome_says(self.summary, self.script, self.main_process, self.world_size,
                                 not self.args.no_checkpoints, argv)

    def peak_memory_gib(self, all_processes_alive: bool) -> float | None:
        """Peak CUDA memory since the budget was applied; the maximum over the processes where all can join."""
        import torch

        if not self.cuda:
            return None
        peak = torch.cuda.max_memory_allocated() / GIB
        if self.world_size > 1 and all_processes_alive:  # a failed process would not join this
            peak_over_processes = torch.tensor([peak], device=self.device)
            torch.distributed.all_reduce(peak_over_processes, op=torch.distributed.ReduceOp.MAX)
            peak = peak_over_processes.item()
        return peak

    def micro_batch_that_fits(self, failure: BaseException) -> int | None:
        """After training ran out of memory on one GPU: the largest micro-batch, halving from half the one that
        failed, whose trial step fits the same budget; 0 where not even 1 does; None where none was probed.

        It frees the Trainer first (optimizer states, the failed step's tensors): nothing trains after this.
        A probe that fails otherwise gives None (its error in the summary): the out-of-memory line still comes.
        """
        import gc
        import traceback

        import torch

        from harness.budget import available_gib, choose_micro_batch

        # One process only: under a launcher the others may have died, and an FSDP forward would then hang in
        # an all-gather that waits for them.
        if not self.cuda or self.world_size > 1 or self.trainer is None or self.model is None:
            return None
        failed = self.summary["micro_batch"]
        if failed == 1:
            return 0  # training itself ran out at 1
        try:
            traceback.clear_frames(failure.__traceback__)  # the failed step's frames hold its activations
            self.trainer = None  # the optimizer states, and the accelerator's references to them
            self.model.zero_grad(set_to_none=True)
            gc.unfreeze()  # gc_paused froze what existed at the first step, the Trainer too: frozen is never freed
            gc.collect()  # the Trainer and its callbacks reference each other
            torch.cuda.empty_cache()
            return choose_micro_batch(self.model, failed // 2, self.args.seq_len,
                                      self.args.gpu_memory_gib or available_gib(), self.optim, self.autocast_dtype,
                                      self.device)
        except torch.OutOfMemoryError:
            return 0  # the trial at 1 ran out too
        except Exception as e:
            self.summary["micro_batch_probe_error"] = f"{type(e).__name__}: {e}"
            return None

    def oom_message(self) -> str:
        from harness.budget import oom_message, state_memory_estimate_gib

        estimate = state_memory_estimate_gib(self.model, self.optim) if self.model is not None else None
        return oom_message(self.script, self.args.gpu_memory_gib, self.summary["peak_memory_gib"], estimate,
                           self.rank, self.world_size, self.summary.get("micro_batch_that_fits"))

    def write_summary(self, failed: bool) -> None:
        from harness.wandb_run import finish_wandb

        if self.main_process:
            (self.output_dir / "summary.json").write_text(json.dumps(self.summary, indent=2) + "\n")
        elif failed:  # the first process may never get to write its summary
            (self.output_dir / f"summary-rank{self.rank}.json").write_text(json.dumps(self.summary, indent=2) + "\n")
        if self.wandb_run is not None:
            finish_wandb(self.wandb_run, self.summary, failed, self.script)
