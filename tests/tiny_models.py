"""Tiny models of other families, saved as local pretrained folders (config, weights, tokenizer) that the scripts
load with `--model FOLDER`: 2 layers, width 64, 4 heads (2 key-value heads), MLP width 128, on the CPU in seconds.
"""
from pathlib import Path

# family: its config's own fields beyond the shared sizes (Gemma's head_dim would default to 256)
FAMILIES = {
    "llama": {},
    "qwen2": {},
    "gemma": {"head_dim": 16},
}
# families that transformers runs without SDPA: GPT-Neo (this repo's port gives it SDPA) and GPT-J (eager)
WITHOUT_TRANSFORMERS_SDPA = {
    "gpt_neo": {"attention_types": [[["global", "local"], 1]], "window_size": 16},
    "gptj": {"rotary_dim": 8},
}
SIZES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=1024)


def save_tiny_model(family: str, folder: Path, tokenizer, seed: int = 0) -> Path:
    """A randomly initialized `family` model (a transformers model_type of FAMILIES) and `tokenizer`, saved in
    `folder` as `from_pretrained` and `AutoTokenizer.from_pretrained` load them; the vocabulary is the tokenizer's."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    eos = tokenizer.eos_token_id
    config = AutoConfig.for_model(family, vocab_size=len(tokenizer), bos_token_id=eos, eos_token_id=eos,
                                  pad_token_id=tokenizer.pad_token_id, **SIZES,
                                  **{**FAMILIES, **WITHOUT_TRANSFORMERS_SDPA}[family])
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return Path(folder)


def save_tiny_encoder_decoder(folder: Path, tokenizer) -> Path:
    """A tiny T5 (encoder-decoder) and `tokenizer` in `folder`: a model the causal-LM scripts refuse."""
    from transformers import T5Config, T5ForConditionalGeneration

    eos = tokenizer.eos_token_id
    config = T5Config(vocab_size=len(tokenizer), d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                      eos_token_id=eos, pad_token_id=tokenizer.pad_token_id, decoder_start_token_id=eos)
    T5ForConditionalGeneration(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return Path(folder)
