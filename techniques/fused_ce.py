"""The causal-LM loss, computed inside the model's forward: plain, or liger's fused linear cross-entropy."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


# liger cuts its fused loss into about V / H chunks (its chunk_mem_const=1), however many tokens a micro-batch has.
# Where the vocabulary is large against the width (Qwen2.5-0.5B: 151,936 / 896, 128 chunks of 256 rows at 32 x 1024)
# those are many small matmuls; at most this many chunks keep them large, each chunk's logits an eighth of what the
# unfused loss would hold, so they shrink with the micro-batch under a small budget (row qwen0.5b-lightweight_small
# in results/models.json; FINDINGS, fused_ce)
FUSED_CE_CHUNKS = 8


def chunk_mem_const(vocab: int, width: int) -> int:
    """liger's chunk_mem_const that cuts a micro-batch into at most FUSED_CE_CHUNKS chunks, never smaller ones than
    liger's own (chunk_mem_const=1)."""
    return max(1, math.ceil(vocab / (FUSED_CE_CHUNKS * width)))


def unwrap_peft(model):
    """The transformers model itself: under peft, the model it wraps."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def causal_lm_parts(model):
    """(body, lm_head) of a causal LM, unwrapping peft: the body returns hidden states, lm_head maps them to logits."""
    hf = unwrap_peft(model)
    return getattr(hf, hf.base_model_prefix), hf.get_output_embeddings()


def put_loss_in_forward(model, fused: bool, vocab_size: int | None = None) -> None:
    """Make the model's forward return this repo's loss (fused or plain, see `lm_loss_sum`) and no logits.

    Replaces the causal LM's own forward (under peft, the wrapped model's), so that `model(input_ids=...,
    labels=...)` through peft, accelerate's autocast, DistributedDataParallel or FSDP runs it: DDP synchronizes
    gradients, and FSDP gathers the sharded weights (the tied output embedding too), only for work done inside
    a forward call. The loss is summed over predicted tokens and divided by `num_items_in_batch` (the Trainer's
    count over the whole accumulated step and all processes) or, without it, by this batch's count.
    position_ids: positions that restart at 0 at each packed document, which then attends only to itself.
    vocab_size: the real vocabulary, where the output layer has more rows (padded for aligned matmuls).
    """
    from transformers.modeling_outputs import CausalLMOutput

    hf = unwrap_peft(model)

    def forward(input_ids=None, attention_mask=None, position_ids=None, labels=None, num_items_in_batch=None,
                **unused):
        body, head = causal_lm_parts(hf)  # looked up per call: FSDP swaps in gathered weights during forward
        if position_ids is not None:  # packed documents (common.packed_dataset): each attends only to itself; the
            # mask is made once a forward, here, outside the compiled layers
            from techniques.document_mask import document_mask
            attention_mask = document_mask(body, position_ids, attention_mask)
        hidden = body(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).last_hidden_state
        loss = lm_loss_sum(hidden, head, labels, fused, vocab_size)
        count = num_items_in_batch if num_items_in_batch is not None else (labels[:, 1:] != -100).sum()
        return CausalLMOutput(loss=loss / count)

    # An instance attribute, not a patch of the class: no public hook runs a custom loss inside forward.
    hf.forward = forward


def lm_loss_sum(hidden, head, labels, fused: bool, vocab_size: int | None = None):
    """Summed next-token cross-entropy over labels != -100, from hidden states and the output layer `head`.

    fused: liger's fused linear cross-entropy with head's weight (chunks the vocabulary projection; the B x T x V
    logits never exist). Liger does not patch OPT or GPT-Neo, so the loss is wired here. Plain: head's own
    forward (under FSDP its hooks gather the tied weight there), logits in fp32, F.cross_entropy.
    vocab_size: output rows from this index on are padding; their logits are left out of the softmax, so the
    loss and gradients equal those of the unpadded layer.
    """
    hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    labels = labels[:, 1:].reshape(-1)
    rows = head.weight.shape[0]
    padded = vocab_size is not None and rows > vocab_size
    if fused:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        weight = head.weight.to(hidden.dtype)
        # liger adds a bias to each chunk of logits: -10,000 on the padding rows makes their softmax share 0
        # (exp(-1e4) underflows in fp32), and their gradient with it; finite, unlike -inf, in every kernel's arithmetic
        bias = torch.zeros(rows, dtype=hidden.dtype, device=hidden.device).index_fill_(
            0, torch.arange(vocab_size, rows, device=hidden.device), -1e4) if padded else None
        return liger_fused_linear_cross_entropy(hidden, weight, labels, bias, reduction="sum", chunk_mem_const=
                                                chunk_mem_const(rows, hidden.shape[1]))
    logits = head(hidden)
    if padded:
        logits = logits[:, :vocab_size]
    return F.cross_entropy(logits.float(), labels, ignore_index=-100, reduction="sum")
