"""How big an optimizer step is: micro-batch, accumulation, and processes, so that both scripts of a pair take
the same steps over the same data."""
from __future__ import annotations

import math


def accumulation(micro_batch: int, processes: int, seq_len: int, tokens_per_step: int, padded: bool,
                 train_rows: int, train_tokens: int) -> int:
    """Micro-batches per optimizer step, per process.

    A step is --tokens-per-step tokens of the corpus. Packed rows are all tokens, so that is tokens-per-step /
    (micro-batch x seq-len x processes). Padded rows carry fewer (about a third here), so a padded baseline
    accumulates as many micro-batches as make its epoch the same number of steps as `train_tokens /
    tokens_per_step`: its pair's packed epoch. The count is taken for one process and split over the processes,
    so a launch with several takes the same rows per step as one process where the count divides.
    """
    if not padded:
        return max(1, tokens_per_step // (micro_batch * seq_len * processes))
    steps_per_epoch = max(1, round(train_tokens / tokens_per_step))
    micro_batches_per_step = math.ceil(math.ceil(train_rows / micro_batch) / steps_per_epoch)
    return max(1, math.ceil(micro_batches_per_step / processes))


def steps_per_epoch(train_rows: int, micro_batch: int, accumulation_steps: int, processes: int) -> int:
    """Optimizer steps in one epoch, counted as the Trainer counts them (a last partial step included)."""
    micro_batches = math.ceil(train_rows / (micro_batch * processes))
    return max(1, math.ceil(micro_batches / accumulation_steps))


def smallest_over_processes(micro_batch: int, device) -> int:
    """The smallest of the processes' micro-batches, so that every process of a launch uses one that fits."""
    import torch
    from accelerate import PartialState

    PartialState()  # the launch's process group, as the Trainer will use it
    agreed = torch.tensor([micro_batch], device=device)
    torch.distributed.all_reduce(agreed, op=torch.distributed.ReduceOp.MIN)
    return int(agreed.item())
