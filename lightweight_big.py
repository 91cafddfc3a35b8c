"""QLoRA on GPT-Neo 1.3B: trains within a few GiB what before_big.py cannot fit in 16.

    python lightweight_big.py --gpu-memory-gib 4
"""
from common import Recipe, main_for

RECIPE = Recipe(
    script="lightweight_big",
    model="EleutherAI/gpt-neo-1.3B",
    techniques=(
        "nf4",                 # base weights in 4-bit NF4, double quantization, bf16 compute
        "lora",                # rank-16 adapters on every attention and MLP projection; the base is frozen
        "grad_checkpointing",  # recompute activations in backward (--checkpoint-layers: how many layers)
        "paged_adamw_8bit",    # 8-bit optimizer states, paged to the CPU under pressure
        "lora_autocast",       # the adapters compute in bf16 (fp32 weights): no fp32 copy of every input
        "tf32",                # TF32 for the matmuls left in fp32
        # No whole-model bf16 autocast: nf4 already computes in bf16, and autocast would also move layer norms
        # and softmax to fp32: slower (23.3k vs 27.3k tokens/s) and more memory (6.6 vs 5.2 GiB), NOTES.md.
        "packing",             # full 1024-token blocks, no pad tokens
        "sdpa",                # this repo's SDPA port of GPT-Neo attention (scale 1, 256-token local window)
        "fast_gelu",           # GPT-Neo's tanh GELU as one kernel
        "fused_ce",            # liger fused linear cross-entropy: no logits tensor
        "auto_micro_batch",    # under --gpu-memory-gib, the largest micro-batch that fits
    ),
    micro_batch=16,
    seq_len=1024,
    tokens_per_step=32768,     # = 16 x 1024 x 2 accumulation; the same slots per step as before_big
    lora_rank=16,
    lora_alpha=32,
)
main = main_for(RECIPE)

if __name__ == "__main__":
    main()
