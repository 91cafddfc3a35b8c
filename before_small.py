"""The plain baseline: what a newcomer writes from the Hugging Face tutorial.

Full fine-tuning of OPT-350m in fp32; each corpus record tokenized on its own and padded to 512 tokens
(longer records split into 512-token pieces); otherwise the Trainer's defaults and the library's default
attention.

    python before_small.py --help
"""
import math

from common import padded_dataset
from harness import session

MODEL = "facebook/opt-350m"
LEARNING_RATE = 5e-5                   # peak, decayed linearly to 0 (--lr)
SIZES = dict(micro_batch=8,            # 8 x 512 tokens per forward pass
             seq_len=512,
             tokens_per_step=32768,    # = 8 x 512 x 8 accumulation; the same slots per step as lightweight_small
             learning_rate=LEARNING_RATE)


def load_model(weights, device):
    import torch
    from transformers import AutoModelForCausalLM

    from techniques.fused_ce import put_loss_in_forward

    model = AutoModelForCausalLM.from_pretrained(weights, dtype=torch.float32, use_cache=False)  # default attention
    put_loss_in_forward(model, fused=False)  # logits, then cross-entropy over the tokens of the whole step
    return model.to(device)


def main(argv=None, script="before_small", model=MODEL, sizes=SIZES):
    """Train; before_big.py runs this same recipe with its own model and sizes."""
    with session(script, model, {}, argv, **sizes) as run:
        from transformers import TrainingArguments

        args = run.args
        model = load_model(run.weights, run.device)
        micro_batch = args.micro_batch
        train_set = padded_dataset(run.train_records, args.seq_len, run.tokenizer.pad_token_id)
        steps = run.steps_to_train(train_set, micro_batch)
        training_args = TrainingArguments(
            per_device_train_batch_size=micro_batch, gradient_accumulation_steps=run.accumulation(micro_batch, train_set),
            num_train_epochs=args.epochs, max_steps=args.max_steps, seed=args.seed, data_seed=args.seed,
            learning_rate=args.lr, lr_scheduler_type="linear",
            bf16=False, fp16=False,  # fp32 throughout, no autocast
            optim="adamw_torch",  # plain AdamW, as in the original experiment (transformers 5 defaults to fused)
            logging_steps=args.logging_steps, prediction_loss_only=True,
            eval_strategy="steps", eval_steps=args.eval_every or math.ceil(steps / 4),  # --eval-every 0: four times
            # checkpoints to resume from every --save-every steps; none at the end, where the trained model is saved
            save_strategy="steps" if args.save_every and not args.no_checkpoints else "no",
            save_steps=args.save_every or steps, save_total_limit=2,
            **run.plumbing_arguments())
        run.train(model, training_args, train_set)
    return run.summary


if __name__ == "__main__":
    main()
