"""A CUDA GPU without bf16 (V100, T4) trains in fp16 with loss scaling, tested on the CPU.

The run decides its half dtype as on such a GPU (`torch.cuda.is_bf16_supported()` reports False) and keeps the
CUDA-only bf16 technique on. accelerate 1.15 takes TrainingArguments(fp16=True) on the CPU but drops it there
(no autocast, no GradScaler: `Accelerator.native_amp` is only set off the CPU), so the fixture also gives the
Accelerator what it gives a CUDA device: fp16 autocast and a GradScaler, here torch's CPU one. The steps below
then really run in fp16 autocast with loss scaling.
"""
import importlib
import math

import pytest
import torch

import lightweight_big
import lightweight_small
from conftest import TINY
from harness.cli import Switches
from harness.session import Run

session = importlib.import_module("harness.session")  # the module: `harness.session` is also its function


def test_half_precision_is_fp16_only_on_a_gpu_without_bf16(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert session.half_precision_dtype(cuda=True) == torch.float16
    assert session.half_precision_dtype(cuda=False) == torch.bfloat16  # the CPU autocasts to bf16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert session.half_precision_dtype(cuda=True) == torch.bfloat16


@pytest.fixture
def gpu_without_bf16(monkeypatch):
    """Runs in this test decide as on a CUDA GPU without bf16 and train as accelerate trains fp16 on CUDA.
    Returns what the run trained with: its Run (`run`), TrainingArguments and Trainer, and the matmuls' dtypes."""
    from accelerate import Accelerator

    seen = {"matmul_dtypes": set()}
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    decide = session.half_precision_dtype
    monkeypatch.setattr(session, "half_precision_dtype", lambda cuda: decide(cuda=True))
    skip = Switches.skip_cuda_only

    def skip_all_but_bf16(self, reason):
        skip(self, reason)
        self.skipped.pop("bf16", None)

    monkeypatch.setattr(Switches, "skip_cuda_only", skip_all_but_bf16)
    accelerator_init = Accelerator.__init__

    def as_on_cuda(self, *args, **kwargs):
        accelerator_init(self, *args, **kwargs)
        if self.mixed_precision == "fp16" and self.device.type == "cpu":
            self.native_amp, self.scaler = True, torch.amp.GradScaler("cpu")

    monkeypatch.setattr(Accelerator, "__init__", as_on_cuda)
    train = Run.train

    def record_matmul_dtypes(self, model, training_args, train_set, **options):
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module.weight.requires_grad:
                module.register_forward_hook(lambda m, i, out: seen["matmul_dtypes"].add(out.dtype))
        train(self, model, training_args, train_set, **options)
        seen.update(run=self, trainer=self.trainer, training_args=self.trainer.args)

    monkeypatch.setattr(Run, "train", record_matmul_dtypes)
    return seen


def trains_in_fp16_with_loss_scaling(seen, summary):
    args, trainer = seen["training_args"], seen["trainer"]
    assert args.fp16 and not args.bf16
    assert seen["run"].autocast_dtype == torch.float16  # what an out-of-memory probe would autocast to
    assert "bf16" in summary["techniques"] and summary["steps"] == 3
    scaler = trainer.accelerator.scaler
    assert isinstance(scaler, torch.amp.GradScaler) and scaler.is_enabled()
    assert scaler._scale is not None  # set up by the first scaled backward: the loss was scaled
    assert seen["matmul_dtypes"] == {torch.float16}  # the trained layers ran in fp16 autocast
    assert math.isfinite(summary["final_train_loss"]) and math.isfinite(summary["final_eval_loss"])


def test_lightweight_small_trains_in_fp16_with_loss_scaling(gpu_without_bf16, tmp_path, cache_dir):
    summary = lightweight_small.main([*TINY, "--max-steps", "3", "--output-dir", str(tmp_path / "out"),
                                      "--cache-dir", str(cache_dir), "--wandb", "off"])
    trains_in_fp16_with_loss_scaling(gpu_without_bf16, summary)


def test_lightweight_big_with_bf16_on_trains_in_fp16_with_loss_scaling(gpu_without_bf16, tmp_path, cache_dir):
    """bf16 is off by default here (the QLoRA reference's choice); on, it is fp16 autocast with loss scaling, and
    the frozen base and 4-bit compute are fp16 too."""
    summary = lightweight_big.main([*TINY, "--on", "bf16", "--max-steps", "3", "--output-dir", str(tmp_path / "out"),
                                    "--cache-dir", str(cache_dir), "--wandb", "off"])
    trains_in_fp16_with_loss_scaling(gpu_without_bf16, summary)
    import bitsandbytes as bnb

    model = gpu_without_bf16["trainer"].model
    assert {m.compute_dtype for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)} == {torch.float16}
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    assert torch.float16 in frozen and torch.bfloat16 not in frozen  # the base: fp16 (and uint8: 4-bit packed)
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}  # adapters: fp32 masters


def test_lightweight_big_scales_the_loss_without_bf16_by_default(gpu_without_bf16, tmp_path, cache_dir):
    """bf16 off (the default): on such a GPU the base and the adapters still compute in fp16, and fp16 gradients
    underflow without loss scaling, so the run uses fp16=True (autocast and a GradScaler) all the same."""
    summary = lightweight_big.main([*TINY, "--max-steps", "3", "--output-dir", str(tmp_path / "out"),
                                    "--cache-dir", str(cache_dir), "--wandb", "off"])
    args, trainer = gpu_without_bf16["training_args"], gpu_without_bf16["trainer"]
    assert "bf16" not in summary["techniques"] and args.fp16 and not args.bf16
    scaler = trainer.accelerator.scaler
    assert isinstance(scaler, torch.amp.GradScaler) and scaler.is_enabled() and scaler._scale is not None
    assert summary["steps"] == 3 and math.isfinite(summary["final_train_loss"])
