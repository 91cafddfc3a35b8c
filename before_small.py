"""The plain baseline: what a newcomer writes from the Hugging Face tutorial.

Full fine-tuning of OPT-350m in fp32; each corpus record tokenized on its own and padded to 512 tokens
(longer records split into 512-token pieces); otherwise the Trainer's defaults and the library's default
attention. The optimizer is pinned to plain AdamW (transformers 5 defaults to the fused one on torch >= 2.8),
as in the original experiment, so the fused optimizer shows up as a technique of its own.

    python before_small.py --help
"""
from common import Recipe, main_for

RECIPE = Recipe(
    script="before_small",
    model="facebook/opt-350m",
    techniques=(),              # fp32, padded batches, library defaults
    micro_batch=8,              # 8 x 512 tokens per forward pass
    seq_len=512,
    tokens_per_step=32768,      # = 8 x 512 x 8 accumulation; the same slots per step as lightweight_small
)
main = main_for(RECIPE)

if __name__ == "__main__":
    main()
