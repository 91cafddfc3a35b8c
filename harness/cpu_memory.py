"""A training step's memory on the CPU, estimated before any weights exist: weights, gradients and optimizer states
counted (harness/budget.py), activations measured on one row through a 2-layer copy of the model. The run takes the
largest micro-batch, halving from the script's, whose step fits the memory the machine has, or is refused: on the
CPU nothing stops a step that does not fit but the kernel's out-of-memory killer."""
from __future__ import annotations

import copy
import sys

import torch

from harness.budget import GIB
from harness.cli import InputError

HEADROOM = 0.9  # of the memory available: what the step may take; the rest for the page cache and other processes
# What a step's peak adds over what its forward keeps for backward (gradients in flight, SDPA's scores on its math
# path for masks of packed documents): the measured peaks were 1.2 to 1.7 times the kept tensors
# (tests/test_cpu_memory.py)
BACKWARD_FACTOR = 1.75


def two_layer_model(config, attention: str | None, gpt_neo_port: bool, dtype):
    """An uninitialized copy of `config`'s model with 2 decoder layers, the loss in its forward as the scripts compute
    it on the CPU (plain: fp32 logits, no fused kernel). attention: transformers' name (None: the library's default);
    gpt_neo_port: this repo's GPT-Neo SDPA in its place, taking that attention's masks."""
    from transformers import AutoModelForCausalLM

    from techniques.fused_ce import put_loss_in_forward
    from techniques.sdpa import use_gpt_neo_sdpa

    config = copy.deepcopy(config)
    config.num_hidden_layers, config.use_cache = 2, False  # each family's attribute_map names its own layers field
    if config.model_type == "gpt_neo":
        config.attention_layers = config.attention_layers[:2]
    chosen = {} if attention is None or gpt_neo_port else {"attn_implementation": attention}
    with torch.device("meta"):  # no initialization: the values change nothing of what is kept, only the time
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, **chosen)
    model.to_empty(device="cpu")
    if gpt_neo_port:
        use_gpt_neo_sdpa(model, masks=attention)
    put_loss_in_forward(model, fused=False)
    return model.train()


def saved_bytes(model, seq_len: int) -> dict:
    """What autograd keeps for backward in one forward of one `seq_len`-token row, weights left out, in bytes: "all",
    "second layer" (what the second decoder layer adds) and "largest" (the largest tensor kept)."""
    from transformers.modeling_layers import GradientCheckpointingLayer  # every family's decoder layer

    from techniques.document_mask import trial_position_ids

    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept, marks = {}, {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            kept[storage.data_ptr()] = storage.nbytes()
        return tensor

    second = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)][1]
    second.register_forward_pre_hook(lambda *_: marks.update(before=sum(kept.values())))
    second.register_forward_hook(lambda *_: marks.update(after=sum(kept.values())))
    ids = torch.randint(0, model.config.vocab_size, (1, seq_len))
    positions = trial_position_ids(1, seq_len, model, ids.device)  # packed documents: their masks, as in training
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(input_ids=ids, labels=ids, position_ids=positions)
    return {"all": sum(kept.values()), "second layer": marks["after"] - marks["before"], "largest": max(kept.values())}


def activation_gib_per_row(config, seq_len: int, attention: tuple[str | None, bool], recompute: bool,
                           dtype) -> float:
    """What one row of `seq_len` tokens adds to a training step's peak, in GiB, from `saved_bytes` of a 2-layer copy:
    each layer keeps what the second keeps, the rest (embeddings, logits, loss) does not grow with depth. In backward
    the loss's gradient briefly holds two more tensors the size of the largest kept (the logits). recompute: every
    layer keeps only its input, and one layer's activations exist at a time. attention: as `probe_attention`. All
    times BACKWARD_FACTOR."""
    with torch.random.fork_rng():  # the probe's random ids leave the run's random state as it was
        saved = saved_bytes(two_layer_model(config, *attention, dtype), seq_len)
    layer = saved["second layer"]
    rest = saved["all"] - 2 * layer
    layers = config.num_hidden_layers
    if recompute:
        kept = layers * seq_len * config.hidden_size * torch.finfo(dtype).bits // 8 + layer
    else:
        kept = layers * layer
    return BACKWARD_FACTOR * (rest + kept + 2 * saved["largest"]) / GIB


def probe_attention(on, config) -> tuple[str | None, bool]:
    """(attention, gpt_neo_port) as `two_layer_model` takes them: what a script's model trains with on the CPU. The
    lightweight scripts' sdpa switch, with dense masks of packed documents where document_mask is on (this repo's
    port for GPT-Neo; eager where the family has no SDPA); the before scripts: the library's default."""
    from techniques.document_mask import DENSE_DOCUMENT_ATTENTION
    from techniques.sdpa import sdpa_missing

    if "sdpa" not in on.declared:
        return None, False
    if not on.chosen["sdpa"] or sdpa_missing(config):
        return "eager", False
    documents = on.chosen.get("document_mask", False) and on.chosen.get("packing", False)
    return DENSE_DOCUMENT_ATTENTION if documents else "sdpa", config.model_type == "gpt_neo"


def step_estimate_gib(script_args, on, config) -> tuple[dict, float]:
    """(weights, gradients and optimizer states in GiB, activations per row in GiB) of one process's step on the CPU,
    for the script's command line `script_args` and switches `on`. lora: a frozen base in bf16 (lightweight_big's)."""
    from harness.budget import state_estimate_before_building_gib

    frozen_base = on.chosen.get("lora", False)
    recompute = on.chosen.get("grad_checkpointing", False) and getattr(script_args, "checkpoint_layers", None) is None
    states = state_estimate_before_building_gib(config, frozen_base)
    per_row = activation_gib_per_row(config, script_args.seq_len, probe_attention(on, config), recompute,
                                     torch.bfloat16 if frozen_base else torch.float32)
    return states, per_row


def largest_fitting(states_gib: float, per_row_gib: float, largest: int, available_gib: float) -> int:
    """The largest micro-batch, halving from `largest`, whose step fits HEADROOM of `available_gib`; 0 if not even 1."""
    micro = largest
    while micro >= 1 and states_gib + micro * per_row_gib > HEADROOM * available_gib:
        micro //= 2
    return micro


def fit_the_cpu(script: str, args, on, config, processes: int, quiet: bool) -> str | None:
    """On the CPU, before any weights exist: the step's estimate in one line, and the micro-batch it takes. Where
    the script's default micro-batch does not fit HEADROOM of the memory available and a smaller one does, that one
    is set in `args` (accumulation keeps the tokens per step) and the reason returned; where none fits, or a
    --micro-batch given does not, InputError (one line, exit 2): the kernel would kill the run otherwise."""
    from harness.budget import available_memory_gib

    states, per_row = step_estimate_gib(args, on, config)
    available = available_memory_gib()
    if available is not None:  # one process's share of what the machine has
        available /= processes
    micro = args.micro_batch
    fits = micro if available is None else largest_fitting(sum(states.values()), per_row, micro, available)
    line = estimate_line(args.model, micro, args.seq_len, states, per_row, processes, available)
    if fits == micro:
        if not quiet:
            print(f"{script}: {line} (for a short CPU run: --model tiny)", file=sys.stderr)
        return None
    if fits == 0:
        raise InputError(f"{line}: too much even at micro-batch 1 ({sum(states.values()) + per_row:.1f} GiB); "
                         f"use --model tiny for a CPU run, or a CUDA GPU")
    smaller = f"micro-batch {fits} fits ({sum(states.values()) + fits * per_row:.1f} GiB)"
    if args.micro_batch_given:
        raise InputError(f"{line}: too much; {smaller}: --micro-batch {fits}, or --model tiny for a short CPU run")
    if not quiet:
        print(f"{script}: {line}: too much; {smaller} and is taken, accumulation keeping the tokens per step "
              f"(for a short CPU run: --model tiny)", file=sys.stderr)
    args.micro_batch = fits
    return f"the largest that fits {HEADROOM:.0%} of the {available:.1f} GiB available (CPU estimate), at most {micro}"


def estimate_line(model: str, micro: int, seq_len: int, states: dict, per_row: float, processes: int,
                  available: float | None) -> str:
    """'MODEL on the CPU: a step of micro-batch M x T needs about X GiB: weights ..., activations ...; this machine
    has Y GiB available' (per process, where a launch has several)."""
    parts = {**states, "activations": micro * per_row}
    each = f" ({processes} processes, each)" if processes > 1 else ""
    return (f"{model} on the CPU{each}: a step of micro-batch {micro} x {seq_len} needs about "
            f"{sum(parts.values()):.1f} GiB: " + ", ".join(f"{k} {v:.1f}" for k, v in parts.items())
            + ("" if available is None else f"; this machine has {available:.1f} GiB available"
               + (" for each" if processes > 1 else "")))
