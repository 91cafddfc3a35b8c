"""The fused linear cross-entropy alone, forward and backward, at each model's vocabulary and width: liger's chunk
sizes (its chunk_mem_const; techniques/fused_ce.py chooses it) and Apple's cut-cross-entropy where it is installed.

    python scripts/fused_loss_speed.py > results/fused_loss.md      # on a CUDA GPU
"""
import sys
import time
from datetime import date
from pathlib import Path

import torch
from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from techniques.fused_ce import chunk_mem_const  # noqa: E402
from harness.measure import versions  # noqa: E402

SHAPES = {"Qwen2.5-0.5B": (151_936, 896), "SmolLM2-360M": (49_152, 960), "OPT-350m": (50_272, 1024),
          "Qwen2.5-1.5B": (151_936, 1536), "GPT-Neo-1.3B": (50_257, 2048)}  # (vocabulary, width)
TOKENS = (32 * 1023, 16 * 1023)  # micro-batches of 32 and 16 rows of 1024 (the loss predicts 1023 of each)


def milliseconds_and_gib(loss_fn, hidden, weight, labels, repeats=10):
    """Mean time of forward + backward, and the peak memory above the inputs."""
    for _ in range(2):
        loss_fn(hidden, weight, labels).backward()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before, start = torch.cuda.memory_allocated(), time.perf_counter()
    for _ in range(repeats):
        loss_fn(hidden, weight, labels).backward()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats * 1e3, (torch.cuda.max_memory_allocated() - before) / 2**30


def losses(tokens, vocab, width):
    """(name, loss function) pairs to compare at this shape."""
    chosen = chunk_mem_const(tokens, vocab, width)
    for const in sorted({1, chosen, 4 * chosen}):
        yield (f"liger chunk_mem_const={const}" + (" (chosen)" if const == chosen else ""),
               lambda h, w, y, c=const: liger_fused_linear_cross_entropy(h, w, y, reduction="sum", chunk_mem_const=c))
    try:
        from cut_cross_entropy import linear_cross_entropy
    except ImportError:
        return
    for eps in ("high", None):  # "high": its default, gradients below a threshold skipped; None: exact
        yield (f"cut-cross-entropy filter_eps={eps}",
               lambda h, w, y, e=eps: linear_cross_entropy(h, w, y, reduction="sum", filter_eps=e))


def main():
    print(f"# The fused loss alone (forward + backward, bf16)\n\n`python scripts/fused_loss_speed.py` on "
          f"{torch.cuda.get_device_name(0)}, {date.today()}; "
          f"{', '.join(f'{name} {version}' for name, version in versions().items() if version)}.\n")
    print("| model | tokens | loss | ms | GiB above inputs |\n|---|---|---|---|---|")
    for model, (vocab, width) in SHAPES.items():
        for tokens in TOKENS:
            hidden = torch.randn(tokens, width, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            weight = (0.02 * torch.randn(vocab, width, device="cuda", dtype=torch.bfloat16)).requires_grad_()
            labels = torch.randint(0, vocab, (tokens,), device="cuda")
            for name, loss_fn in losses(tokens, vocab, width):
                ms, gib = milliseconds_and_gib(loss_fn, hidden, weight, labels)
                print(f"| {model} | {tokens:,} | {name} | {ms:.2f} | {gib:.2f} |", flush=True)


if __name__ == "__main__":
    main()
