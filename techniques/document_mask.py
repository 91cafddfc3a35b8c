"""Packed documents that attend only to themselves: each token to the earlier tokens of its own document, found from
position ids that restart at 0 at every document (common.packed_dataset), through FlexAttention block masks.

Flex, not variable-length attention, for both models: measured on an H200 (attention alone, forward and backward,
bf16, 16 x 1024 tokens, documents of about 250; torch 2.11, by a one-off script not kept), OPT's head_dim 64:
causal without documents 0.60 ms, a dense document mask 1.17 ms, flex 0.77 ms, varlen 1.02 ms; head_dim 128 (GPT-Neo's
global layers): 0.92, 1.95, 1.02, 1.65 ms; GPT-Neo's local layers, today's dense window mask 1.95 ms, flex with the
window inside the document 0.99 ms, varlen 1.54 ms. Varlen also runs on CUDA in fp16/bf16 only. Flex has no backward
on the CPU, so there the same masks are dense B x 1 x T x T booleans for SDPA: the tests' path.

The masks are made once a forward, before the decoder (fused_ce.py), from the position ids alone, by a few tensor
ops on their device: nothing is read back to the host, so the CPU keeps queueing work while the GPU runs. Transformers'
own path (create_causal_mask finding packed documents, then create_block_mask) cost several times the host time
(FINDINGS, packing that keeps documents apart) and a GPU->host synchronization (find_packed_sequence_indices' `.all()`). The decoder's create_causal_mask passes a
ready 4-D mask or BlockMask on unchanged. Calls without documents (padding, the micro-batch probe without position
ids), and models this module leaves to transformers, take transformers' SDPA masks.
"""
from __future__ import annotations

import torch
from torch.nn.attention.flex_attention import BlockMask
from transformers import AttentionInterface
from transformers.integrations.flex_attention import flex_attention_forward
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, create_causal_mask, sdpa_mask

DOCUMENT_ATTENTION = "sdpa_documents"  # the attn_implementation name of this module's attention
# The same attention through dense masks on CUDA too, for a run too short to repay compiling flex's kernels at its
# first step (lightweight_small's default job, 10 steps: 19.1 s of training with flex, 2.5 s across records, row
# lightweight_small-epoch, commit ec610e7), where SDPA's kernel for an arbitrary mask needs no compiling
DENSE_DOCUMENT_ATTENTION = "sdpa_documents_dense"
TRIAL_DOCUMENT = 256  # the micro-batch probe's trial rows hold documents of this many tokens
FLEX_DEVICES = {"cuda"}  # where the masks are flex block masks: flex has no backward on the CPU
BLOCK = 128  # flex's block size (create_block_mask's default) in tokens, for queries and keys alike


def flex_or_sdpa(module, query, key, value, attention_mask, **kwargs):
    """Transformers' attention function for DOCUMENT_ATTENTION: flex for a block mask (packed documents), else SDPA."""
    if not isinstance(attention_mask, BlockMask):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if query.device.type == "cpu":  # inductor's CPU flex template fails on a transposed view (tests only)
        query, key, value = query.contiguous(), key.contiguous(), value.contiguous()
    return flex_attention_forward(module, query, key, value, attention_mask, **kwargs)


for _name in (DOCUMENT_ATTENTION, DENSE_DOCUMENT_ATTENTION):
    AttentionInterface.register(_name, flex_or_sdpa)
    ALL_MASK_ATTENTION_FUNCTIONS.register(_name, sdpa_mask)  # the masks transformers still makes


def attends(documents, window: int | None = None):
    """The mask_mod of packed documents (`documents`: B x T document ids): causal, the same document, and within
    `window` tokens if given. Also takes broadcasting index tensors (dense_mask)."""
    def mask_mod(b, h, q_idx, kv_idx):
        allowed = (kv_idx <= q_idx) & (documents[b, q_idx] == documents[b, kv_idx])
        return allowed if window is None else allowed & (q_idx - kv_idx < window)
    return mask_mod


def dense_mask(documents, window: int | None = None):
    """B x 1 x T x T booleans (True: attend) for SDPA: `attends` at every query and key."""
    batch, length = documents.shape
    tokens = torch.arange(length, device=documents.device)
    rows = torch.arange(batch, device=documents.device)[:, None, None, None]
    return attends(documents, window)(rows, None, tokens[:, None], tokens)


def ordered(blocks):
    """(count, indices) of the listed blocks in each row of a B x 1 x N x N boolean layout, in create_block_mask's
    order (its _dense_to_ordered): the listed blocks first, ascending, then the others, ascending."""
    blocks = blocks.to(torch.int32, memory_format=torch.contiguous_format)
    return blocks.sum(-1, dtype=torch.int32), blocks.argsort(dim=-1, descending=True, stable=True).to(torch.int32)


def block_mask(documents, window: int | None = None) -> BlockMask:
    """The BlockMask create_block_mask makes from `attends(documents, window)`, from bounds per BLOCK-token block.

    Document ids rise along a row, so a block's documents run from its first token's to its last's. A key block
    before a query block is reached iff its last token and the query block's first share a document (and lie within
    the window); it is full iff its first token and the query block's last do (and lie within the window), the query
    block is not cut short by the end of the row (flex's padding attends nowhere), and the key block ends before it.
    The block on the diagonal is always reached (a token sees itself) and never full."""
    batch, length = documents.shape
    starts = torch.arange(0, length, BLOCK, device=documents.device)
    first, last = documents[:, starts], documents[:, (starts + BLOCK - 1).clamp(max=length - 1)]  # B x N
    q, kv = starts[:, None], starts  # N x 1 query blocks, N key blocks: their first tokens
    before = kv < q
    reached = (kv == q) | (before & (first[:, :, None] == last[:, None, :]))
    full = before & (q + BLOCK <= length) & (last[:, :, None] == first[:, None, :])
    if window is not None:
        reached = reached & (q - (kv + BLOCK - 1) < window)
        full = full & (q + BLOCK - 1 - kv < window)
    partial, full = (reached & ~full)[:, None], full[:, None]  # B x 1 x N x N: query blocks x key blocks
    # Both ways round from the layouts: BlockMask.from_kv_blocks would find the query-block lists from the key-block
    # ones through torch.vmap, several times the host time of this whole function.
    return BlockMask((length, length), *ordered(partial), *ordered(full), *ordered(partial.mT), *ordered(full.mT),
                     BLOCK_SIZE=(BLOCK, BLOCK), mask_mod=attends(documents, window))


def made_here(config) -> bool:
    """Whether this module makes the masks of a model under DOCUMENT_ATTENTION: OPT, GPT-Neo (techniques/sdpa.py)
    and decoders whose every layer is plain causal (Llama, Qwen2 without its window, ...). Models with sliding-window
    or chunked layers (Mistral, Gemma2/3, ...) are left to transformers' path, which is correct there but reads packed
    documents back to the host: their per-layer masks are not built here."""
    return config.model_type in ("opt", "gpt_neo") or (
        set(getattr(config, "layer_types", None) or ["full_attention"]) == {"full_attention"}
        and getattr(config, "sliding_window", None) is None and getattr(config, "attention_chunk_size", None) is None)


def document_mask(body, position_ids, attention_mask=None):
    """The attention mask to give `body` (a transformers decoder) for packed documents numbered by `position_ids`.

    Under DOCUMENT_ATTENTION (made_here): made here, from `position_ids` alone (document ids: a running count of the
    zeros), without reading anything back to the host: a flex BlockMask on CUDA, dense booleans elsewhere. GPT-Neo's
    local layers take a BlockMask within `config.window_size` tokens, carried by the global one as `.local` (a dict
    would not pass create_causal_mask); on dense masks they add their window themselves (techniques/sdpa.py).
    Otherwise transformers makes the mask from the position ids: OPT's here (modeling_opt.py calls
    create_causal_mask without them), and in the form its attention takes; others' in the decoder (None returned)."""
    if attention_mask is not None:
        raise ValueError("packed documents (position_ids) come without a padding attention_mask")
    config = body.config
    if config._attn_implementation in (DOCUMENT_ATTENTION, DENSE_DOCUMENT_ATTENTION) and made_here(config):
        documents = (position_ids == 0).cumsum(-1)
        if position_ids.device.type not in FLEX_DEVICES or config._attn_implementation == DENSE_DOCUMENT_ATTENTION:
            return dense_mask(documents)
        mask = block_mask(documents)
        if "local" in getattr(config, "attention_layers", ()):  # GPT-Neo
            mask.local = block_mask(documents, config.window_size)
        return mask
    if config.model_type != "opt":
        return None
    shape_only = torch.empty(*position_ids.shape, 0, dtype=body.dtype, device=position_ids.device)
    return create_causal_mask(config=body.config, inputs_embeds=shape_only, attention_mask=None,
                              past_key_values=None, position_ids=position_ids)


def trial_position_ids(rows: int, seq_len: int, model, device):
    """Position ids for the micro-batch probe's trial (documents of TRIAL_DOCUMENT tokens), where `model` trains on
    packed documents through DOCUMENT_ATTENTION, so that the trial runs the same kernels; None otherwise."""
    if model.config._attn_implementation not in (DOCUMENT_ATTENTION, DENSE_DOCUMENT_ATTENTION):
        return None
    return (torch.arange(seq_len, device=device) % TRIAL_DOCUMENT).expand(rows, seq_len)
