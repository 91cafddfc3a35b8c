"""The same job as before_small.py made fast, without changing what is learned.

Same model, corpus, tokens per optimizer step, learning-rate schedule, seed and held-out blocks.

    python lightweight_small.py --help
"""
from common import Recipe, main_for

RECIPE = Recipe(
    script="lightweight_small",
    model="facebook/opt-350m",
    techniques=(
        "bf16",          # bf16 autocast, fp32 master weights (fp16 where the GPU lacks bf16)
        "tf32",          # TF32 for what stays in fp32
        "packing",       # corpus cut into full 1024-token blocks: no pad tokens
        "sdpa",          # fused attention kernels
        "fused_adamw",   # one optimizer kernel for all parameters
        "fused_ce",      # liger fused linear cross-entropy: no 32 x 1024 x 50k logits tensor
        "compile",       # torch.compile of the decoder
    ),
    micro_batch=32,             # 32 x 1024 tokens per forward pass keeps the H200 busy
    seq_len=1024,
    tokens_per_step=32768,      # = 32 x 1024, no accumulation
)
main = main_for(RECIPE)

if __name__ == "__main__":
    main()
