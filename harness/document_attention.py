"""Packed documents that attend only to themselves: each token to the earlier tokens of its own document, found from
position ids that restart at 0 at every document (common.packed_dataset), through FlexAttention block masks.

Flex, not variable-length attention, for both models: measured on an H200 (attention alone, forward and backward,
bf16, 16 x 1024 tokens, documents of about 250; torch 2.11, by a one-off script not kept), OPT's head_dim 64:
causal without documents 0.60 ms, a dense document mask 1.17 ms, flex 0.77 ms, varlen 1.02 ms; head_dim 128 (GPT-Neo's
global layers): 0.92, 1.95, 1.02, 1.65 ms; GPT-Neo's local layers, today's dense window mask 1.95 ms, flex with the
window inside the document 0.99 ms, varlen 1.54 ms. Varlen also runs on CUDA in fp16/bf16 only. Building a block mask
costs 3-4.6 ms of host time per batch (once a forward, before the layers). Flex has no backward on the CPU, so there
the same masks are dense B x 1 x T x T booleans for SDPA: the tests' path.

The masks come from transformers' own create_causal_mask, which finds packed documents from position ids, through two
public hooks: the attention function DOCUMENT_ATTENTION (AttentionInterface) and its mask function
(ALL_MASK_ATTENTION_FUNCTIONS). Calls without documents (padding, the micro-batch probe without position ids) take
transformers' SDPA path unchanged.
"""
from __future__ import annotations

import torch
from torch.nn.attention.flex_attention import BlockMask
from transformers import AttentionInterface
from transformers.integrations.flex_attention import flex_attention_forward
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import (ALL_MASK_ATTENTION_FUNCTIONS, and_masks, causal_mask_function,
                                        create_causal_mask, flex_attention_mask, sdpa_mask, sliding_window_overlay)

DOCUMENT_ATTENTION = "sdpa_documents"  # the attn_implementation name of this module's attention and masks
TRIAL_DOCUMENT = 256  # the micro-batch probe's trial rows hold documents of this many tokens
FLEX_DEVICES = {"cuda"}  # where the masks are flex block masks: flex has no backward on the CPU


def flex_or_sdpa(module, query, key, value, attention_mask, **kwargs):
    """Transformers' attention function for DOCUMENT_ATTENTION: flex for a block mask (packed documents), else SDPA."""
    if not isinstance(attention_mask, BlockMask):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if query.device.type == "cpu":  # inductor's CPU flex template fails on a transposed view (tests only)
        query, key, value = query.contiguous(), key.contiguous(), value.contiguous()
    return flex_attention_forward(module, query, key, value, attention_mask, **kwargs)


def document_masks(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=causal_mask_function,
                   attention_mask=None, device="cpu", config=None, **kwargs):
    """create_causal_mask's mask for DOCUMENT_ATTENTION. Without documents, SDPA's (None: causal, or padding). With
    them (mask_function is then causal AND same document): a flex BlockMask on CUDA, a dense boolean elsewhere; for
    a model with local layers (GPT-Neo) a dict of both kinds, {"global": ..., "local": ...}, the local one also within
    `config.window_size` tokens (harness/gpt_neo_sdpa.py picks its layer's)."""
    sizes = dict(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                 kv_offset=kv_offset, attention_mask=attention_mask, device=device)
    if mask_function is causal_mask_function:
        return sdpa_mask(mask_function=mask_function, **sizes, **kwargs)
    if torch.device(device).type in FLEX_DEVICES:
        def build(mask):
            return flex_attention_mask(mask_function=mask, **sizes)
    else:
        def build(mask):
            return sdpa_mask(mask_function=mask, **sizes, **dict(kwargs, allow_is_causal_skip=False))
    if "local" not in getattr(config, "attention_layers", ()):
        return build(mask_function)
    return {"global": build(mask_function),
            "local": build(and_masks(mask_function, sliding_window_overlay(config.window_size)))}


AttentionInterface.register(DOCUMENT_ATTENTION, flex_or_sdpa)
ALL_MASK_ATTENTION_FUNCTIONS.register(DOCUMENT_ATTENTION, document_masks)


def document_mask(body, position_ids, attention_mask=None):
    """The attention mask to give `body` (a transformers decoder) for packed documents numbered by `position_ids`.

    GPT-Neo hands position ids to create_causal_mask itself, and gets the document mask there: `attention_mask` is
    returned as it is. OPT's decoder does not (modeling_opt.py calls create_causal_mask without them), so its mask is
    made here, once a forward and outside any compiled layer, in the form its attention takes (a block mask, a dense
    boolean for SDPA, an additive one for eager attention); the decoder passes it on unchanged."""
    if body.config.model_type != "opt":
        return attention_mask
    shape_only = torch.empty(*position_ids.shape, 0, dtype=body.dtype, device=position_ids.device)
    return create_causal_mask(config=body.config, inputs_embeds=shape_only, attention_mask=attention_mask,
                              past_key_values=None, position_ids=position_ids)


def trial_position_ids(rows: int, seq_len: int, model, device):
    """Position ids for the micro-batch probe's trial (documents of TRIAL_DOCUMENT tokens), where `model` trains on
    packed documents through DOCUMENT_ATTENTION, so that the trial runs the same kernels; None otherwise."""
    if model.config._attn_implementation != DOCUMENT_ATTENTION:
        return None
    return (torch.arange(seq_len, device=device) % TRIAL_DOCUMENT).expand(rows, seq_len)
