"""Plain full fine-tuning of GPT-Neo 1.3B, as before_small.py: fp32, padded batches, library defaults.

Weights, gradients and AdamW states alone take about 20 GiB (19.6), so it runs out of memory on a 16 GiB GPU
(try `--gpu-memory-gib 16`): the original experiment's result.

    python before_big.py --help
"""
from common import Recipe, main_for

RECIPE = Recipe(
    script="before_big",
    model="EleutherAI/gpt-neo-1.3B",
    techniques=(),              # fp32, padded batches, eager attention (GPT-Neo's default), plain AdamW
    micro_batch=8,
    seq_len=512,
    tokens_per_step=32768,      # = 8 x 512 x 8 accumulation; the same slots per step as lightweight_big
)
main = main_for(RECIPE)

if __name__ == "__main__":
    main()
