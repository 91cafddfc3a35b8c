"""The micro-batch probe: the largest micro-batch whose trial step fits the GPU (auto_micro_batch), a way to hold
fewer activations where that lets a larger one fit (LeanerMemory), and the micro-batch that fits after training ran
out of memory. Tokens per optimizer step stay the same: accumulation makes up for a smaller micro-batch."""
from __future__ import annotations

import dataclasses
from typing import Callable

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class LeanerMemory:
    """A way to hold fewer activations that costs time on every micro-batch, for the probe (`largest_micro_batch`):
    worth it only where the memory splits the step into `from_split` or more micro-batches, each paying its host
    work (launches, Python), and where it then fits one at least twice as large.

    switch: turns it on (True) or off (False) on the model. how: what the console line adds when it is used.
    """
    switch: Callable[[bool], None]
    how: str
    from_split: int = 2


def choose_micro_batch(model, largest: int, seq_len: int, budget_gib: float, optim: str, autocast_dtype,
                       device, smallest: int = 1) -> int:
    """The largest micro-batch (halving from `largest`, down to `smallest`) whose forward and backward fit 90% of
    the budget; 0 if none of them fits and `smallest` is above 1 (at 1, running out of memory raises).

    Optimizer states do not exist yet, so their estimated size is held in a placeholder during the trial.
    Transformers' `auto_find_batch_size` retries after a failure but changes tokens per step; this keeps them.
    autocast_dtype: the dtype the training step autocasts to (None: no autocast).
    """
    import gc

    import torch

    from harness.budget import state_memory_estimate_gib
    from techniques.document_mask import trial_position_ids

    estimate = state_memory_estimate_gib(model, optim)["optimizer states"]
    headroom = 0.9 * budget_gib * GIB  # the trial must leave 10% for fragmentation and evaluation

    def trial_peak(micro: int) -> int:
        # a function, so that a trial's tensors (its graph too, when backward ran out of memory) are freed
        # once it ends, before the next, smaller trial starts
        placeholder = torch.empty(int(estimate * GIB), dtype=torch.uint8, device=device)
        ids = torch.randint(0, 100, (micro, seq_len), device=device)
        positions = trial_position_ids(micro, seq_len, model, device)  # packed documents: the same kernels as training
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            loss = model(input_ids=ids, labels=ids, position_ids=positions).loss
        loss.backward()
        del placeholder
        return torch.cuda.max_memory_allocated()

    model.train()  # from_pretrained returns eval mode, where gradient checkpointing is inactive
    micro = largest
    while micro >= smallest:
        torch.cuda.reset_peak_memory_stats()
        try:
            if trial_peak(micro) <= headroom or micro == 1:
                return micro
        except torch.OutOfMemoryError:
            if micro == 1:
                raise
        finally:
            model.zero_grad(set_to_none=True)
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        micro //= 2
    return 0


def largest_micro_batch(model, largest: int, seq_len: int, rows_per_step: int, budget_gib: float, optim: str,
                        autocast_dtype, device, processes: int,
                        leaner: LeanerMemory | None = None) -> tuple[int, str, str | None]:
    """(micro-batch, how it was found, why `leaner` is off or None where it is on): the largest micro-batch, halving
    from `largest`, whose trial step fits 90% of `budget_gib` on every one of the launch's `processes`.

    leaner: where that micro-batch splits a step of `rows_per_step` rows into `leaner.from_split` or more, the probe
    switches it on and looks again, halving from `largest` down to twice the one without it; it stays on only if
    one of those fits.
    """
    from harness import step_size

    def agreed(micro_batch: int) -> int:  # every process must agree: the smallest (so on using `leaner` too)
        return step_size.smallest_over_processes(micro_batch, device) if processes > 1 else micro_batch

    micro_batch = agreed(choose_micro_batch(model, largest, seq_len, budget_gib, optim, autocast_dtype, device))
    unused = why_not_leaner(micro_batch, largest, rows_per_step, leaner)
    if unused is not None:
        return micro_batch, "a trial step", unused
    leaner.switch(True)
    larger = agreed(choose_micro_batch(model, largest, seq_len, budget_gib, optim, autocast_dtype, device,
                                       smallest=2 * micro_batch))
    if larger > micro_batch:
        return larger, f"a trial step, {leaner.how}", None
    leaner.switch(False)  # no larger micro-batch fits with it: not worth its cost
    return micro_batch, "a trial step", (f"with it, no micro-batch from {largest} down to {2 * micro_batch} fit"
                                         + (" on every process" if processes > 1 else ""))


def why_not_leaner(micro_batch: int, largest: int, rows_per_step: int, leaner: LeanerMemory | None) -> str | None:
    """Why the probe does not try `leaner` after choosing `micro_batch` without it (None: it tries)."""
    split = -(-rows_per_step // micro_batch)  # micro-batches a step (at least: padded rows carry fewer tokens)
    if micro_batch >= largest:
        return ("one micro-batch a step: nothing to halve" if split <= 1 else
                f"micro-batch {micro_batch} is the script's largest: the memory does not split the step")
    if leaner is None:
        return "not offered"
    if split < leaner.from_split:
        return f"{split} micro-batches a step; used from {leaner.from_split}"
    return None


def micro_batch_that_fits(model, failed: int, failure: BaseException, seq_len: int, budget_gib: float | None,
                          optim: str, autocast_dtype, device) -> int:
    """After training ran out of memory at micro-batch `failed` on one GPU: the largest micro-batch, halving from
    half of it, whose trial step fits the same budget (None: what the GPU has free); 0 where not even 1 does.

    The caller has dropped the Trainer (optimizer states, the accelerator's references to them); this frees the
    failed step's tensors: nothing trains after it.
    """
    import gc
    import traceback

    import torch

    from harness import budget

    if failed == 1:
        return 0  # training itself ran out at 1
    traceback.clear_frames(failure.__traceback__)  # the failed step's frames hold its activations
    model.zero_grad(set_to_none=True)
    gc.unfreeze()  # gc_paused froze what existed at the first step, the Trainer too: frozen is never freed
    gc.collect()  # the Trainer and its callbacks reference each other
    torch.cuda.empty_cache()
    try:
        return choose_micro_batch(model, failed // 2, seq_len, budget_gib or budget.available_gib(), optim,
                                  autocast_dtype, device)
    except torch.OutOfMemoryError:
        return 0  # the trial at 1 ran out too
