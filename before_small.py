"""The plain baseline: what a newcomer writes from the Hugging Face tutorial.

Full fine-tuning of OPT-350m in fp32; each corpus record tokenized on its own and padded to 512 tokens
(longer records split into 512-token pieces); otherwise the Trainer's defaults and the library's default
attention.

    python before_small.py --help
"""
from common import padded_dataset
from harness import session

MODEL = "facebook/opt-350m"
SIZES = dict(micro_batch=8,            # 8 x 512 tokens per forward pass
             seq_len=512,
             tokens_per_step=32768)    # = 8 x 512 x 8 accumulation; the same slots per step as lightweight_small


def load_model(weights, device):
    import torch
    from transformers import AutoModelForCausalLM

    from harness.loss import put_loss_in_forward

    model = AutoModelForCausalLM.from_pretrained(weights, dtype=torch.float32, use_cache=False)  # default attention
    put_loss_in_forward(model, fused=False)  # logits, then cross-entropy over the tokens of the whole step
    return model.to(device)


def main(argv=None, script="before_small", model=MODEL, sizes=SIZES):
    """Train; before_big.py runs this same recipe with its own model and sizes."""
    with session(script, model, {}, argv, **sizes) as run:
        from transformers import TrainingArguments

        model = load_model(run.weights, run.device)
        micro_batch = run.args.micro_batch
        train_set = padded_dataset(run.train_records, run.args.seq_len, run.tokenizer.pad_token_id)
        training_args = TrainingArguments(
            per_device_train_batch_size=micro_batch, gradient_accumulation_steps=run.accumulation(micro_batch, train_set),
            optim="adamw_torch",  # plain AdamW, as in the original experiment (transformers 5 defaults to fused)
            **run.shared_training_arguments(train_set, micro_batch))
        run.train(model, training_args, train_set)
    return run.summary


if __name__ == "__main__":
    main()
