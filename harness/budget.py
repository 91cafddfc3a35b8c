"""GPU memory: the --gpu-memory-gib budget, what a recipe's states need, and the out-of-memory report (the probe for
the micro-batch that fits: techniques/auto_micro_batch.py)."""
from __future__ import annotations

import gc
import os

import torch

from harness.cli import InputError

GIB = 2**30


def check_memory_budget(gib: float | None) -> None:
    """Refuse a budget that cannot be applied. Without CUDA there is nothing to cap: an error, not a silent no-op."""
    if gib is None:
        return
    if not torch.cuda.is_available():
        raise InputError("--gpu-memory-gib needs a CUDA GPU (none is visible); drop the flag on the CPU")
    total = torch.cuda.get_device_properties(0).total_memory
    if gib * GIB > total:
        raise InputError(f"--gpu-memory-gib {gib:g} is more than this GPU has ({total / GIB:.1f} GiB)")


def apply_memory_budget(gib: float | None) -> None:
    """Cap this process's CUDA caching allocator at `gib` GiB (None: the whole GPU) and reset the peak counter.

    Under a cap the allocator uses expandable segments: with fixed-size segments, fragmentation alone made
    lightweight_big fail under 2 GiB (1.3 GiB allocated at its peak). Set both ways, since one process may run
    several recipes (the tests do); a PYTORCH_CUDA_ALLOC_CONF that names expandable_segments is left as it is.
    """
    if not torch.cuda.is_available():
        return
    if torch.cuda.memory_reserved():  # what a random init built on the GPU, or an earlier run in this process, left
        gc.collect()
        torch.cuda.empty_cache()
    if "expandable_segments" not in os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""):
        # the runtime form of PYTORCH_CUDA_ALLOC_CONF; it applies to segments allocated from now on
        setter = getattr(torch._C, "_accelerator_setAllocatorSettings", None) or \
            torch.cuda.memory._set_allocator_settings  # the older name (deprecated in torch 2.11)
        setter(f"expandable_segments:{gib is not None}")
    device = torch.cuda.current_device()
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(1.0 if gib is None else gib * GIB / total, device)
    torch.cuda.reset_peak_memory_stats()


def optimizer_bytes_per_parameter(optim: str) -> int:
    """AdamW's two states per trainable parameter: 8 bytes in fp32, 2 in bitsandbytes' 8-bit optimizers."""
    return 2 if "8bit" in optim else 8


def state_memory_estimate_gib(model, optim: str) -> dict:
    """What the recipe holds before activations: weights, gradients and optimizer states, in GiB."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters()) / GIB
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    grads = trainable * 4 / GIB
    optimizer = trainable * optimizer_bytes_per_parameter(optim) / GIB
    return {"weights": weights, "gradients": grads, "optimizer states": optimizer}


def available_gib() -> float:
    """What this process can use of the current GPU: what is free plus what its allocator already holds."""
    free, _ = torch.cuda.mem_get_info()
    return (free + torch.cuda.memory_reserved()) / GIB


def state_estimate_before_building_gib(config, frozen_base: bool) -> dict:
    """state_memory_estimate_gib of a model not built yet: the same count, on a meta-device copy (no memory).

    The script names its optimizer and trainable weights only once it builds the model, so this assumes AdamW
    in fp32 on every weight; for a frozen base (LoRA) the weights in bf16, the most such a base is loaded in,
    and no gradients or optimizer states (the adapters' are under 2% of the parameters).
    """
    import copy

    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(copy.deepcopy(config),
                                                 dtype=torch.bfloat16 if frozen_base else torch.float32)
    model.requires_grad_(not frozen_base)
    return state_memory_estimate_gib(model, "adamw_torch")


def available_memory_gib() -> float | None:
    """The memory new allocations can have without swapping (/proc/meminfo MemAvailable), in GiB; None off Linux."""
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024 / GIB
    except OSError:
        pass
    return None


def out_of_memory(e: BaseException) -> bool:
    """CUDA's OutOfMemoryError, or the CPU allocator's failure (a RuntimeError: "DefaultCPUAllocator: can't allocate
    memory") or Python's MemoryError."""
    return isinstance(e, (torch.OutOfMemoryError, MemoryError)) or (
        isinstance(e, RuntimeError) and "DefaultCPUAllocator: can't allocate memory" in str(e))


def oom_message(script: str, budget_gib, peak_gib, estimate: dict | None, rank: int, world_size: int,
                micro_batch_that_fits: int | None = None) -> str:
    """The one line an out-of-memory run ends with: where, under what budget, what the states need, and the
    micro-batch that fits (0: not even 1; None: not known, nothing said)."""
    budget = f"a {budget_gib:g} GiB budget" if budget_gib else "the GPU's memory"
    fits = ("" if micro_batch_that_fits is None else "; even micro-batch 1 does not fit" if micro_batch_that_fits == 0
            else f"; micro-batch {micro_batch_that_fits} fits (--micro-batch {micro_batch_that_fits})")
    return (f"{script}: out of CUDA memory{in_process(rank, world_size)} under {budget} (peak {peak_gib or 0:.1f} "
            f"GiB reached){states_need(estimate)}{fits}")


def cpu_oom_message(script: str, estimate: dict | None, rank: int, world_size: int) -> str:
    """The one line a run on the CPU ends with where the machine's memory ran out."""
    return (f"{script}: out of CPU memory{in_process(rank, world_size)}{states_need(estimate)}; try a smaller "
            f"--micro-batch or --seq-len, or a machine with more memory")


def in_process(rank: int, world_size: int) -> str:
    """Which process ran out, under a launcher."""
    return f" in process {rank} of {world_size}" if world_size > 1 else ""


def states_need(estimate: dict | None) -> str:
    """What the states need ("; before activations this recipe needs about N GiB: weights ..."), or "" where
    there is no estimate."""
    if estimate is None:
        return ""
    return (f"; before activations this recipe needs about {sum(estimate.values()):.1f} GiB: "
            + ", ".join(f"{k} {v:.1f}" for k, v in estimate.items()))
