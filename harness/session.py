"""One training run, from the command line to summary.json: `with session(...) as run:` in each script.

Before the block: flags and corpus are checked (bad input: one line, exit 2, nothing written), the corpus is
tokenized, the weights are located (a random-init checkpoint is saved on first use) and the memory budget is
applied. In the block the script builds its model, data and TrainingArguments and calls `run.train(...)`
(harness/training.py). After it, whatever happened: summary.json, the end of the W&B run, and the exit code
(3: out of memory; harness/outcome.py).
"""
from __future__ import annotations

import contextlib
import gc
import math
import os
import signal
import sys
from pathlib import Path

import common
from harness import step_size
from harness.cli import InputError, fsdp_launch, parse_args, processes_in_launch, refuse, validate_args
from harness.clock import seconds_since_process_start
from harness.lock import lock_output_dir
from techniques.auto_micro_batch import LeanerMemory
from harness.outcome import end_the_process, finish
from harness.signals import find_checkpoint


@contextlib.contextmanager
def session(script: str, model: str, techniques: dict, argv=None, **sizes):
    """Yield a `Run` for `script` (defaults: `model`, `sizes`) as the command line `argv` asks."""
    startup_seconds = seconds_since_process_start()  # interpreter, imports
    args, on = parse_args(script, model, techniques, sizes, argv)
    # an at_start may pause Python's garbage collector (the lightweight scripts' gc_paused); `held`: what the run
    # holds until it ends, however it ends (the output folder's lock)
    with collector_as_it_was(), contextlib.ExitStack() as held:
        for name, technique in techniques.items():
            if technique.at_start is not None and on(name):
                technique.at_start()
        try:
            run = Run(script, model, args, on, held)
        except InputError as e:
            refuse("\n".join(f"{script}: error: {problem}" for problem in str(e).splitlines()))  # exit 2; under
            # torchrun printed by the first process only
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
            finish(run, failure, startup_seconds, argv)
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

    def __init__(self, script: str, model: str, args, on, held: contextlib.ExitStack):
        self.script, self.args, self.on = script, args, on
        # torchrun and `accelerate launch` describe the process group in the environment; one process: 1, 0, 0
        self.world_size = processes_in_launch()
        self.rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
        self.main_process = self.rank == 0  # the one that writes metrics.jsonl, summary.json and the W&B run
        validate_args(args, on, self.world_size)
        self.output_dir, self.held = Path(args.output_dir), held
        # one run per folder: taken before --resume reads it, or, for a new folder, once nothing else can refuse
        locked = self.main_process and self.output_dir.is_dir() and held.enter_context(
            lock_output_dir(self.output_dir, script))
        self.checkpoint = find_checkpoint(args.output_dir, args.resume, script, args.model)
        self.setup_marks = {"startup": seconds_since_process_start()}  # setup's parts: see setup_parts()
        self.corpus = common.load_corpus(args.corpus, args.cache_dir)
        self.mark("corpus")

        import torch  # after the cheap checks: a refusal above comes before this import

        from harness.budget import check_memory_budget
        from harness.cpu_memory import fit_the_cpu
        from harness.sources import resolve_model

        check_memory_budget(args.gpu_memory_gib)
        self.mark("torch_import")
        self.source = resolve_model(args.model, args.init, model, self.corpus, args.cache_dir)
        self.tokenizer, self.config = self.source.tokenizer, self.source.config
        self.mark("tokenizer_and_config")
        self.prepare_records()  # first: its refusal of a --seq-len beyond the model's positions
        self.mark("records")
        fitted = None  # why the micro-batch is smaller than the script's default on the CPU
        if args.model != "tiny" and not torch.cuda.is_available():  # before any weights are built or loaded
            fitted = fit_the_cpu(script, args, on, self.config, self.world_size, quiet=not self.main_process)

        self.cuda = torch.cuda.is_available()
        self.device = torch.device("cuda", local_rank) if self.cuda else torch.device("cpu")
        if self.cuda:
            torch.cuda.set_device(self.device)  # one GPU per process (torchrun: LOCAL_RANK)
            if "tf32" in on.declared and torch.cuda.get_device_capability(self.device)[0] < 8:  # TrainingArguments
                on.skip("tf32", "needs an Ampere or newer GPU")  # refuses tf32 on a V100 or T4
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
        if self.main_process and not locked:
            held.enter_context(lock_output_dir(self.output_dir, script))
        self.metrics_path = self.output_dir / "metrics.jsonl" if self.main_process else None
        self.trainer = self.wandb_run = self.model = self.train_started = None
        self.autocast_dtype = None  # what the training step autocasts to (TrainingArguments bf16 / fp16)
        self.optim = "adamw_torch"  # for the out-of-memory estimate, until the script names its optimizer
        self.micro_batch_reason = fitted or ("given by --micro-batch" if args.micro_batch_given else
                                             "the script's default")
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

    def steps_to_train(self, train_set, micro_batch: int) -> int:
        """The optimizer steps this run takes: --max-steps, or --epochs over `train_set`."""
        per_epoch = step_size.steps_per_epoch(len(train_set), micro_batch, self.accumulation(micro_batch, train_set),
                                              self.world_size)
        return self.args.max_steps if self.args.max_steps > 0 else math.ceil(per_epoch * self.args.epochs)

    def largest_micro_batch(self, model, optim: str, autocast: bool, leaner: LeanerMemory | None = None) -> int:
        """--micro-batch if given; else the largest, halving from the script's, whose trial step fits the GPU's
        free memory or --gpu-memory-gib (the smallest over the processes of a launch); techniques.auto_micro_batch.
        `leaner_unused` then says why `leaner` is off (None: on)."""
        from harness.budget import available_gib
        from techniques.auto_micro_batch import largest_micro_batch

        args, self.optim = self.args, optim
        if args.micro_batch_given or not self.cuda:
            self.micro_batch_reason = "given by --micro-batch" if args.micro_batch_given else "default (no GPU)"
            self.leaner_unused = f"no micro-batch probe ({self.micro_batch_reason})"
            return args.micro_batch
        budget = args.gpu_memory_gib or available_gib()
        rows_per_step = max(1, args.tokens_per_step // (args.seq_len * self.world_size))  # per process
        micro_batch, how, self.leaner_unused = largest_micro_batch(
            model, args.micro_batch, args.seq_len, rows_per_step, budget, optim,
            self.bf16_or_fp16 if autocast else None, self.device, self.world_size, leaner)
        where = f"--gpu-memory-gib {budget:g}" if args.gpu_memory_gib else f"the {budget:.1f} GiB this GPU has free"
        self.micro_batch_reason = f"the largest that fits 90% of {where}, at most {args.micro_batch}; by {how}"
        return micro_batch

    def plumbing_arguments(self) -> dict:
        """TrainingArguments that are plumbing, not the experiment: output, devices, W&B, data columns, FSDP."""
        return dict(
            output_dir=str(self.output_dir), report_to="none",  # W&B: the run started by `train`, through its callback
            use_cpu=not self.cuda, dataloader_pin_memory=self.cuda, disable_tqdm=False, remove_unused_columns=False,
            ddp_find_unused_parameters=False,  # every trainable parameter is used; the search costs a graph walk
            # FSDP: reduce-scatter the gradients after every micro-batch, so each GPU keeps only its shard. By
            # default accelerate skips that while accumulating, and FSDP2 then holds them whole: +2.5 GiB per GPU
            # for before_big on 2 GPUs
            accelerator_config={"gradient_accumulation_kwargs": {"sync_each_batch": True}} if fsdp_launch() else None,
        )

    def train(self, model, training_args, train_set, one_batch_shape: bool = False, evaluate_eagerly: bool = False,
              callbacks=()) -> None:
        """Start W&B, train with the measuring Trainer (harness/training.py), and record the results in the summary.

        one_batch_shape: fill an epoch's last, shorter micro-batch (and evaluation's) with rows that carry no loss
        (common.causal_lm_collator), so that compiled code and kernels tuned per shape see one shape. One process only:
        with several, accelerate already completes the last training batch (`even_batches`, with rows from the
        epoch's start) and evaluation goes one block at a time. evaluate_eagerly: torch.compile'd code runs
        uncompiled in evaluation (`torch.compiler.set_stance("force_eager")`). callbacks: the script's own
        TrainerCallbacks.
        A run that trained every step ends by saving the trained model, unless --no-checkpoints.
        """
        import torch

        from harness.checkpoints import made_by
        from harness.measure import parameter_counts, peak_tflops
        from harness.training import add_run_callbacks, measuring_trainer, train_to_the_end, training_summary

        self.mark("model_and_micro_batch")  # the script's block: model load, quantization, probe, dataset
        args = self.args
        self.end_if_complete(train_set, training_args.per_device_train_batch_size)
        self.model, self.optim = model, str(getattr(training_args.optim, "value", training_args.optim))
        self.autocast_dtype = (torch.bfloat16 if training_args.bf16 else
                               torch.float16 if training_args.fp16 else None)
        self.summary.update(micro_batch=training_args.per_device_train_batch_size,
                            micro_batch_reason=self.micro_batch_reason,
                            gradient_accumulation=training_args.gradient_accumulation_steps,
                            techniques=self.on.names_on(), techniques_skipped=dict(self.on.skipped))  # as decided
        self.summary["trainable_params"], self.summary["total_params"] = parameter_counts(model)
        self.start_wandb(training_args)
        self.mark("wandb")
        peak, self.summary["mfu_peak_source"] = peak_tflops(torch.cuda.get_device_name(0) if self.cuda else "")
        self.summary["mfu_peak_tflops"] = peak
        self.trainer = measuring_trainer(model, training_args, train_set, self.eval_set, self.config, args.seq_len,
                                         self.world_size, peak, self.metrics_path, one_batch_shape, evaluate_eagerly,
                                         wandb_on=self.wandb_run is not None)
        self.trainer.made_by = made_by(self.script, args.model)
        self.summary["parallelism"] = (  # accelerate's MULTI_GPU (DDP), FSDP, MULTI_CPU (gloo); it says MULTI_CPU
            self.trainer.accelerator.distributed_type.value if self.world_size > 1  # for one CPU process too
            else f"none (one process on the {'GPU' if self.cuda else 'CPU'})")
        stopper = add_run_callbacks(self.trainer, self.script, callbacks, args.save_every, not args.no_checkpoints,
                                    self.main_process, args.profile, args.profile_first, self.cuda)
        self.held.enter_context(stopper)  # until the run has ended: summary.json and W&B too
        if self.cuda:
            torch.cuda.reset_accumulated_memory_stats()  # count the allocator's retries in training only
        self.mark("trainer")
        self.train_started = self.setup_marks["trainer"]
        train_seconds, stopped_by = train_to_the_end(self.trainer, model, stopper, self.checkpoint,
                                                     save=not args.no_checkpoints)
        if stopped_by is not None:
            self.summary["interrupted"] = stopped_by
        self.summary.update(training_summary(self.trainer, train_seconds, self.world_size))

    def end_if_complete(self, train_set, micro_batch: int) -> None:
        """A --resume from a checkpoint at this run's last step or past it: one line, exit 0, nothing written (the
        Trainer would train one more step, at learning rate 0)."""
        from harness.checkpoints import WEIGHTS, step_of

        steps = self.steps_to_train(train_set, micro_batch)
        done = step_of(Path(self.checkpoint)) if self.checkpoint else None
        if done is None or done < steps:
            return
        saved = any((self.output_dir / name).exists() for name in WEIGHTS)
        if self.main_process:
            print(f"{self.script}: {self.checkpoint} is step {done} of {steps}: the run is complete, nothing to train "
                  f"(its trained model: {self.output_dir if saved else self.checkpoint}); to train on, raise "
                  f"--max-steps or --epochs", file=sys.stderr)
        raise SystemExit(0)

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
