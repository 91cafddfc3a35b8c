"""Plain full fine-tuning of GPT-Neo 1.3B: before_small.py's recipe (fp32, each record padded, library defaults:
eager attention for GPT-Neo, plain AdamW) on the big model.

Weights, gradients and AdamW states alone take about 20 GiB (19.6), so it runs out of memory on a 16 GiB GPU
(try `--gpu-memory-gib 16`): the original experiment's result.

    python before_big.py --help
"""
import before_small

MODEL = "EleutherAI/gpt-neo-1.3B"
SIZES = dict(micro_batch=8, seq_len=512,
             tokens_per_step=32768,    # = 8 x 512 x 8 accumulation; the same slots per step as lightweight_big
             learning_rate=before_small.LEARNING_RATE)


def main(argv=None):
    return before_small.main(argv, script="before_big", model=MODEL, sizes=SIZES)


if __name__ == "__main__":
    main()
