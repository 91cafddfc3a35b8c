"""4-bit layers on CPUs where bitsandbytes repacks weights for inference (AVX512-BF16): training after an evaluation.

The CPU check and the repacking are stood in for, so the test takes the same path on a CPU without AVX512-BF16.
"""
import json

import lightweight_big
from conftest import TINY


PACKED = []


def mark_packed_for_inference(weight, quant_state):
    """Stands in for bitsandbytes' `_convert_weight_packed_for_cpu`: the weight is then read as packed (on a CPU
    without AVX512-BF16 the packed route's kernel still reads it right, but it must not be taken in training)."""
    PACKED.append(quant_state.shape)
    quant_state.packing_format_for_cpu = True
    return weight, quant_state


def train_losses(out, cache_dir, *extra):
    lightweight_big.main([*TINY, "--output-dir", str(out), "--cache-dir", str(cache_dir), "--max-steps", "4",
                          "--wandb", "off", "--no-checkpoints", *extra])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r], [r for r in rows if "eval_loss" in r]


def test_training_after_an_evaluation_matches_training_without_one(monkeypatch, tmp_path, cache_dir):
    import bitsandbytes.nn.modules

    PACKED.clear()
    monkeypatch.setattr(bitsandbytes.nn.modules, "has_avx512bf16", lambda: True)
    monkeypatch.setattr(bitsandbytes.nn.modules, "_convert_weight_packed_for_cpu", mark_packed_for_inference)
    evaluated, evaluations = train_losses(tmp_path / "evaluated", cache_dir, "--eval-every", "2")
    plain, _ = train_losses(tmp_path / "plain", cache_dir)
    assert evaluations and evaluations[0]["step"] == 2  # an evaluation, then two more training steps
    assert len(evaluated) == len(plain) == 4
    assert evaluated == plain
    assert not PACKED  # no 4-bit weight of a model that trains is repacked for inference


def test_only_the_optional_kernel_notice_is_dropped(caplog):
    import logging

    import harness  # noqa: F401  (installs the filter)

    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with caplog.at_level(logging.WARNING, logger=logger.name):
        logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s.", "No module named 'kernels'")
        logger.warning("a real problem")
    assert [r.getMessage() for r in caplog.records] == ["a real problem"]
