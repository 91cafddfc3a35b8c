"""GPT-Neo self-attention through PyTorch's `scaled_dot_product_attention`.

Written by hand because transformers 5.17 gives GPT-Neo only eager attention (fp32 B x H x T x T scores) or
flash-attn (not installable everywhere), while SDPA picks a fused kernel by itself.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask


class GPTNeoSDPAttention(torch.nn.Module):
    """The same function and weights as GPT-Neo's eager self-attention: no 1/sqrt(d) scaling (scale=1.0) and,
    on local layers, a sliding window of `config.window_size` tokens. Training only: no KV cache.

    It takes over the eager module's projections (4-bit or plain), dropouts and causal/window mask under the
    same names, so checkpoints, LoRA targets and state dicts see no difference.
    """

    def __init__(self, eager):
        super().__init__()
        for name, child in eager.named_children():  # in its order: peft initializes adapters in module order
            self.add_module(name, child)  # q_proj, k_proj, v_proj, out_proj, attn_dropout, resid_dropout
        self.register_buffer("bias", eager.bias, persistent=False)  # causal, and within the window on local layers
        self.attention_type, self.layer_id = eager.attention_type, eager.layer_id
        self.num_heads, self.head_dim = eager.num_heads, eager.head_dim

    def forward(self, hidden_states, attention_mask=None, layer_past=None, use_cache=False,
                output_attentions=False, **kwargs):
        if layer_past is not None:
            raise NotImplementedError("GPTNeoSDPAttention is for training: no KV cache")
        bsz, length, _ = hidden_states.shape
        shape = (bsz, length, self.num_heads, self.head_dim)
        q = self.q_proj(hidden_states).view(shape).transpose(1, 2)
        k = self.k_proj(hidden_states).view(shape).transpose(1, 2)
        v = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        dropout = self.attn_dropout.p if self.training else 0.0
        if isinstance(attention_mask, BlockMask):  # packed documents on flex (techniques/document_mask.py); on
            if self.attention_type == "local":  # local layers, the block mask within the window that it carries
                attention_mask = attention_mask.local
            return self.resid_dropout(self.out_proj(self.flex(q, k, v, attention_mask, dropout))), None
        mask = None  # None: plain causal attention (is_causal below)
        if self.attention_type == "local" or attention_mask is not None:
            mask = self.bias[:, :, :length, :length]  # True: attend
        if attention_mask is not None:  # padding or packed documents: an SDPA-style boolean mask, or eager's additive
            # one (0 keep); on local layers the window comes from `bias`
            mask = mask & (attention_mask >= 0 if attention_mask.dtype != torch.bool else attention_mask)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                             is_causal=mask is None, scale=1.0)
        out = out.transpose(1, 2).reshape(bsz, length, self.num_heads * self.head_dim)
        return self.resid_dropout(self.out_proj(out)), None

    def flex(self, q, k, v, block_mask, dropout: float):
        """B x T x H*D: transformers' flex attention function (which refuses attention dropout), scale 1.0."""
        from techniques.document_mask import flex_or_sdpa

        out, _ = flex_or_sdpa(self, q, k, v, block_mask, scaling=1.0, dropout=dropout)  # B x T x H x D
        return out.reshape(*out.shape[:2], self.num_heads * self.head_dim)


def use_gpt_neo_sdpa(model, masks: str = "sdpa") -> int:
    """Put a GPTNeoSDPAttention in place of every GPT-Neo eager self-attention; returns how many. masks: the
    attention implementation whose masks it takes, "sdpa" or techniques.document_mask.DOCUMENT_ATTENTION."""
    from transformers.models.gpt_neo.modeling_gpt_neo import GPTNeoAttention, GPTNeoSelfAttention

    swapped = 0
    for module in model.modules():
        if isinstance(module, GPTNeoAttention) and type(module.attention) is GPTNeoSelfAttention:
            module.attention = GPTNeoSDPAttention(module.attention)
            swapped += 1
    # Masks as for SDPA: None without padding (global layers then take the flash kernel through is_causal),
    # else a boolean B x 1 x T x T instead of eager's float mask built at every step. A private attribute:
    # the public `set_attn_implementation("sdpa")` refuses, since transformers has no SDPA for GPT-Neo.
    model.config._attn_implementation = masks
    return swapped


def sdpa_missing(config) -> str | None:
    """Why transformers cannot run `config`'s family through SDPA (Bloom, GPT-J, CodeGen, ...), or None where it can,
    or where this module's port does (GPT-Neo). Such a family trains with eager attention."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if config.model_type == "gpt_neo":
        return None
    family = getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config.model_type])
    return None if family._supports_sdpa else f"transformers has no SDPA for {config.model_type}: eager attention"
