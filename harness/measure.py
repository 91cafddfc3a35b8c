"""What a run measures: tokens/s over loss-carrying tokens, step time, GPU memory and MFU, at every log."""
from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path

import torch
from accelerate import DistributedDataParallelKwargs
from transformers import Trainer, TrainerCallback

from harness.checkpoints import append_line, save_staged
from harness.clock import seconds_since_process_start
from harness.signals import restart_metrics

GIB = 2**30
# Dense bf16 tensor-core peaks in TFLOP/s (no sparsity, fp32 accumulate), by a part of the GPU's name, first
# match wins. Sources: NVIDIA's datasheets and architecture whitepapers; fp16 for GPUs without bf16 (T4, V100).
PEAK_TFLOPS = [
    ("H200", 790.0, "measured on the benchmark H200, 8192^3 bf16 matmuls (datasheet: 989)"),
    ("H100 PCIe", 756.0, "NVIDIA H100 datasheet (PCIe)"),
    ("H100", 989.0, "NVIDIA H100 datasheet (SXM)"),
    ("A100", 312.0, "NVIDIA A100 datasheet"),
    ("L40S", 362.0, "NVIDIA L40S datasheet"),
    ("L4", 121.0, "NVIDIA L4 datasheet"),
    ("A10", 125.0, "NVIDIA A10 datasheet"),
    ("RTX 4090", 165.2, "NVIDIA Ada Lovelace architecture whitepaper (FP32 accumulate)"),
    ("RTX 3090", 71.0, "NVIDIA Ampere GA102 whitepaper (FP32 accumulate)"),
    ("T4", 65.0, "NVIDIA T4 datasheet (fp16: no bf16)"),
    ("V100", 125.0, "NVIDIA V100 datasheet (SXM2, fp16: no bf16)"),
]


def peak_tflops(gpu_name: str) -> tuple[float, str] | tuple[None, None]:
    """(TFLOP/s, source) of the GPU's dense bf16 peak, or (None, None) for a GPU not in PEAK_TFLOPS."""
    return next(((tflops, source) for part, tflops, source in PEAK_TFLOPS if part in gpu_name), (None, None))


def cuda_memory_gib() -> dict:
    """Allocated, reserved and peak CUDA memory in GiB (peak since the start: never reset); None on the CPU."""
    if not torch.cuda.is_available():
        return dict.fromkeys(("memory_allocated_gib", "memory_reserved_gib", "peak_memory_gib"))
    return {"memory_allocated_gib": torch.cuda.memory_allocated() / GIB,
            "memory_reserved_gib": torch.cuda.memory_reserved() / GIB,
            "peak_memory_gib": torch.cuda.max_memory_allocated() / GIB}


def parameter_counts(model) -> tuple[int, int]:
    """(trainable, total) parameters; a 4-bit weight counts as its unpacked size."""
    trainable = total = 0
    for p in model.parameters():
        n = p.numel() * 2 if p.__class__.__name__ == "Params4bit" else p.numel()
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


def flops_per_token(model, config, seq_len: int, frozen_base: bool) -> float:
    """Training FLOPs per token: 6N (4N with a frozen base: no weight gradients) + 12 L T (heads x head_dim).

    N: the weights of every matmul a token passes through, read off the model: each nn.Linear (a bitsandbytes 4-bit
    one too, by its unpacked shape) and transformers' Conv1D, the output layer included whether tied or not; not the
    embedding lookup, nor LoRA's adapters (about 1% of N at rank 16). The second term is attention's scores and
    weighted sum over T = seq_len positions, L = config.num_hidden_layers.
    """
    from transformers.pytorch_utils import Conv1D

    adapters = {id(m) for layer in model.modules() for name in getattr(layer, "adapter_layer_names", ())
                for m in getattr(layer, name).modules()}  # peft's tuner layers name their adapters' modules
    n = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and id(module) not in adapters:
            n += module.in_features * module.out_features
        elif isinstance(module, Conv1D):  # GPT-2's projections: weight (in, out)
            n += module.weight.shape[0] * module.weight.shape[1]
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return (4 if frozen_base else 6) * n + 12 * config.num_hidden_layers * seq_len * heads * head_dim


def versions() -> dict:
    import importlib.metadata as md

    out = {"python": sys.version.split()[0]}
    for name in ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "liger-kernel", "datasets", "wandb"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


class StepEnds(TrainerCallback):
    """Each optimizer step's end on the GPU's timeline (a CUDA event, first `steps` steps), read once after
    training: seconds per step without the synchronization a per-step log makes, which changes how far the host
    runs ahead (lightweight_small's slow window showed with a log every 5 steps, not every step)."""

    def __init__(self, steps: int = 100):
        self.steps, self.events = steps, []

    def on_train_begin(self, args, state, control, **kwargs):
        self.record()

    def on_step_end(self, args, state, control, **kwargs):
        if len(self.events) <= self.steps:
            self.record()

    def record(self) -> None:
        if torch.cuda.is_available():
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.events.append(event)

    def seconds(self) -> list[float] | None:
        """Seconds from each step's end to the next's (an evaluation between two steps counts in the later one);
        None on the CPU."""
        if len(self.events) < 2:
            return None
        self.events[-1].synchronize()
        return [round(a.elapsed_time(b) / 1e3, 4) for a, b in zip(self.events, self.events[1:])]


class MeasuringTrainer(Trainer):
    """Trainer that measures, at every log, tokens/s, step time, memory and MFU, and appends metrics.jsonl.

    tokens/s counts tokens that carry loss (not padding) over the wall time since the last log,
    evaluation and checkpoint-saving time excluded; step_seconds is that time per optimizer step.
    """

    def __init__(self, *a, flops_per_token=None, peak_tflops=None, metrics_path=None, evaluate_eagerly=False, **kw):
        super().__init__(*a, **kw)
        self.evaluate_eagerly = evaluate_eagerly  # compiled code runs uncompiled in evaluation
        self.model_accepts_loss_kwargs = True  # our forward divides by the tokens of the whole accumulated step
        self.flops_per_token = flops_per_token
        self.peak_tflops = peak_tflops
        self.metrics_path = metrics_path  # None on every process but the first
        self.tokens_trained = self.tokens_before = 0  # before: trained up to the checkpoint resumed from
        self.windows = []  # (end_step, tokens, seconds) per training log
        self._pending_tokens = torch.zeros((), dtype=torch.long, device=self.args.device)
        self._window_start = None
        self._window_step = 0
        self._paused_seconds = 0.0  # evaluation and checkpoint saving inside the current window
        self.seconds_in = {"eval": 0.0, "save": 0.0}  # over the whole run
        self.staging = None  # where a checkpoint is being written (harness.checkpoints.save_staged)
        self.made_by = {}  # the script and model, recorded in each checkpoint (harness.checkpoints.made_by)
        trainer = self

        class WindowStart(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):  # after a resumed state is loaded
                trainer._window_start, trainer._window_step = time.perf_counter(), state.global_step
                # metrics.jsonl cut back to the step actually resumed from (not an earlier try's: see signals)
                trainer.tokens_trained = trainer.tokens_before = restart_metrics(
                    trainer.metrics_path, state.global_step or None) if trainer.metrics_path is not None else 0

        self.add_callback(WindowStart())
        self.step_ends = StepEnds()
        self.add_callback(self.step_ends)

    def _build_accelerator_args(self, **kwargs):  # private; TrainingArguments has no gradient_as_bucket_view
        accelerator_args = super()._build_accelerator_args(**kwargs)
        for handler in accelerator_args.get("kwargs_handlers", []):
            if isinstance(handler, DistributedDataParallelKwargs):  # DDP only (one process: no DDP at all)
                handler.gradient_as_bucket_view = True  # gradients live in DDP's buckets: no second copy of them
        return accelerator_args

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training:  # the loss itself is the model's forward (put_loss_in_forward)
            self._pending_tokens += (inputs["labels"][:, 1:] != -100).sum()
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    @contextlib.contextmanager
    def _paused(self, part: str):
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # queued training kernels belong to the training window
        start = time.perf_counter()
        try:
            yield
        finally:
            seconds = time.perf_counter() - start
            self._paused_seconds += seconds
            self.seconds_in[part] += seconds

    def evaluate(self, *a, **kw):
        with self._paused("eval"):
            with torch.compiler.set_stance("force_eager") if self.evaluate_eagerly else contextlib.nullcontext():
                return super().evaluate(*a, **kw)

    def _save_checkpoint(self, model, trial):  # private, but no callback runs before a save (on_save runs after)
        with self._paused("save"):  # written into OUTPUT_DIR/.staging, renamed to checkpoint-N once complete
            save_staged(self, lambda: super(MeasuringTrainer, self)._save_checkpoint(model, trial),
                        Path(self._get_output_dir(trial)))

    def _get_output_dir(self, trial):  # private: the folder Trainer._save_checkpoint writes checkpoint-N into
        return str(self.staging) if self.staging is not None else super()._get_output_dir(trial)

    def log(self, logs, start_time=None):
        logs = dict(logs)
        training = "loss" in logs and self._window_start is not None  # a training log: close the window
        tokens, memory = self._gather_tokens_and_memory(window_tokens=training)
        if training:
            now = time.perf_counter()
            seconds = now - self._window_start - self._paused_seconds
            steps = max(1, self.state.global_step - self._window_step)
            self._pending_tokens.zero_()
            self._window_start, self._window_step, self._paused_seconds = now, self.state.global_step, 0.0
            self.tokens_trained += tokens
            self.windows.append((self.state.global_step, tokens, seconds))
            logs.update(tokens_per_second=tokens / seconds, step_seconds=seconds / steps,
                        tokens_trained=self.tokens_trained)
            mfu = self.mfu(tokens / seconds)
            if mfu is not None:
                logs["mfu"] = mfu
        logs["job_seconds"] = seconds_since_process_start()  # for loss against wall-clock time
        logs.update(memory)
        if self.metrics_path is not None:  # a failed write ends the run in one line, exit 4
            append_line(self.metrics_path, json.dumps({"step": self.state.global_step, **logs}) + "\n",
                        self.metrics_path.parent)
        super().log(logs, start_time)

    def _gather_tokens_and_memory(self, window_tokens: bool) -> tuple[int | None, dict]:
        """The window's tokens summed over the processes (if window_tokens), and cuda_memory_gib() with each value the
        largest over them, in one gather (two gathers showed in a profile at every log). Every process logs here.
        Copying the memory values to the GPU waits for the window's work; reading the gather back, for the gather."""
        memory = cuda_memory_gib()
        measured = [torch.tensor(list(memory.values()), dtype=torch.float64, device=self.args.device)] \
            if memory["peak_memory_gib"] is not None else []
        tokens = [self._pending_tokens.view(1).double()] if window_tokens else []
        if not (tokens or measured):
            return None, memory
        rows = self.accelerator.gather(torch.cat(tokens + measured).view(1, -1)).tolist()  # one row per process
        if measured:
            memory = dict(zip(memory, map(max, zip(*(row[len(tokens):] for row in rows)))))
        return (int(sum(row[0] for row in rows)) if tokens else None), memory

    def mfu(self, tokens_per_second: float) -> float | None:
        """Model FLOPs utilization: tokens/s x FLOPs per token / the GPU's peak (None where it is unknown)."""
        if not (self.flops_per_token and self.peak_tflops):
            return None
        return tokens_per_second * self.flops_per_token / (self.peak_tflops * 1e12 * self.args.world_size)

    def first_step_extra_seconds(self) -> float | None:
        """The first logged step's time beyond a later step's median: compilation and warm-up (logging every step)."""
        later = sorted(s / max(1, step - previous) for (previous, _, _), (step, _, s) in zip(self.windows, self.windows[1:]))
        if not self.windows or not later or self.windows[0][0] != 1:
            return None
        return max(0.0, self.windows[0][2] - later[len(later) // 2])

    def steady_tokens_per_second(self, warmup_steps: int) -> float | None:
        """tokens/s over the windows that end after `warmup_steps` (compilation and allocator warm-up)."""
        steady = [(t, s) for step, t, s in self.windows if step > warmup_steps] or \
            [(t, s) for _, t, s in self.windows]
        seconds = sum(s for _, s in steady)
        return sum(t for t, _ in steady) / seconds if seconds > 0 else None
