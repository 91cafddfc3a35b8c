"""Unsloth as a peer: its full fine-tune of Qwen2.5-0.5B or its QLoRA of Qwen2.5-1.5B, on this repo's packed blocks,
measured by this repo's harness (summary.json, metrics.jsonl), so that its rows sit beside the scripts' own.

    python peers/unsloth_peer.py --mode full --max-steps 64
    python peers/unsloth_peer.py --mode qlora --max-steps 12

Unsloth's settings are those of its Qwen2.5 notebook (github.com/unslothai/notebooks, nb/Qwen2.5_(7B)-Alpaca.ipynb):
LoRA rank 16, alpha 16, no dropout, no bias, on q/k/v/o/gate/up/down; use_gradient_checkpointing="unsloth"; AdamW
8-bit; bf16; a linear schedule. What the rows compare at equal terms is the repo's: the corpus's 1024-token blocks
packed across records (run_clm's, as the other peers), 32,768 tokens per step, the recipe's peak learning rate with
no warm-up and no weight decay, the seed and the held-out blocks. Unsloth needs a CUDA GPU.
"""
import argparse
import json
import math
import os
import sys
import tempfile
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo's modules, run from anywhere
from harness.cli import build_parser  # noqa: E402  (the harness imports neither torch nor transformers)

SCRIPT = "unsloth_peer"
# per mode: the model, the micro-batch (x accumulation to 32,768 tokens a step) and the peak learning rate of the
# recipe it stands beside (lightweight_small.py's and lightweight_big.py's LEARNING_RATE)
MODES = {"full": dict(model="Qwen/Qwen2.5-0.5B", micro_batch=16, learning_rate=5e-5),
         "qlora": dict(model="Qwen/Qwen2.5-1.5B", micro_batch=32, learning_rate=5e-5)}
LORA = dict(r=16, lora_alpha=16, lora_dropout=0, bias="none", use_gradient_checkpointing="unsloth",
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])


def parse(argv):
    """(mode, the harness's argv without --mode, args); --help and bad flags answer here, before torch."""
    # the mode first: it decides the defaults that the help shows
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--mode", default="full")
    mode, rest = pre.parse_known_args(argv)
    spec = MODES.get(mode.mode, MODES["full"])  # a wrong mode: the full parser's usage line says so
    parser = build_parser(SCRIPT, spec["model"], {}, sizes(spec))
    parser.add_argument("--mode", choices=list(MODES), default="full",
                        help="full: Unsloth's full fine-tune (bf16 weights); qlora: 4-bit base, LoRA adapters "
                             "(default: %(default)s)")
    return mode.mode, rest, parser.parse_args(argv)


def sizes(spec):
    return dict(micro_batch=spec["micro_batch"], seq_len=1024, tokens_per_step=32768,
                learning_rate=spec["learning_rate"])


def first_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"


def fail(args, mode, reason, code=1):
    """End before the run starts: one line, and a summary.json that says why."""
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    summary = dict(script=SCRIPT, mode=mode, model=args.model, oom=False, error=reason)
    (Path(args.output_dir) / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"{SCRIPT}: error: {reason}", file=sys.stderr)
    raise SystemExit(code)


def main(argv=None):
    mode, rest, args = parse(sys.argv[1:] if argv is None else argv)
    import torch

    if not torch.cuda.is_available():  # `import unsloth` itself raises without one
        fail(args, mode, "Unsloth needs a CUDA GPU, and none is visible", code=2)
    os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")  # its start-up hub request, which waits when offline
    # the modules Unsloth generates go to the cache, not into the working directory
    os.environ.setdefault("UNSLOTH_COMPILE_LOCATION", str(Path(args.cache_dir) / "unsloth_compiled_cache"))
    if args.init == "random":  # weights and tokenizer are local: no hub request at all
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import unsloth  # before transformers, peft and trl, which it patches on import
        from unsloth import FastLanguageModel
    except Exception as e:
        traceback.print_exc()
        fail(args, mode, f"import unsloth failed: {first_line(e)}")

    from common import packed_dataset
    from harness import session

    spec = MODES[mode]
    with session(SCRIPT, spec["model"], {}, rest, **sizes(spec)) as run:
        from transformers import TrainingArguments

        args = run.args
        run.summary.update(mode=mode, unsloth_version=unsloth.__version__,
                           unsloth_settings={"full": "full_finetuning, bf16 weights, gradient checkpointing 'unsloth'",
                                             "qlora": f"load_in_4bit, LoRA {LORA}"}[mode])
        with tempfile.TemporaryDirectory() as tokenizer_dir:
            # Unsloth loads a tokenizer with the weights; the random-init folder has none, and the data are
            # tokenized already by the repo's own
            run.tokenizer.save_pretrained(tokenizer_dir)
            model, _ = FastLanguageModel.from_pretrained(
                model_name=str(run.weights), tokenizer_name=tokenizer_dir, max_seq_length=args.seq_len,
                dtype=torch.bfloat16, load_in_4bit=mode == "qlora", full_finetuning=mode == "full",
                use_gradient_checkpointing="unsloth")
        if mode == "qlora":
            model = FastLanguageModel.get_peft_model(model, **LORA, random_state=args.seed)
        # run_clm's packing, as the other peers train: without position ids, which Unsloth would read as packed
        # records; evaluation too, so that it runs the training's attention path
        train_set = packed_dataset(run.train_records, args.seq_len).remove_columns("position_ids")
        run.eval_set = run.eval_set.remove_columns("position_ids")
        steps = run.steps_to_train(train_set, args.micro_batch)
        training_args = TrainingArguments(
            per_device_train_batch_size=args.micro_batch,
            gradient_accumulation_steps=run.accumulation(args.micro_batch, train_set),
            num_train_epochs=args.epochs, max_steps=args.max_steps, seed=args.seed, data_seed=args.seed,
            learning_rate=args.lr, lr_scheduler_type="linear", optim="adamw_8bit", bf16=True,
            logging_steps=args.logging_steps, prediction_loss_only=True,
            eval_strategy="steps", eval_steps=args.eval_every or math.ceil(steps / 4),
            save_strategy="steps" if args.save_every and not args.no_checkpoints else "no",
            save_steps=args.save_every or steps, save_total_limit=2,
            **run.plumbing_arguments())
        # one shape: an epoch's last, shorter micro-batch filled with loss-free rows, so that Unsloth's compiled
        # kernels see one shape
        run.train(model, training_args, train_set, one_batch_shape=True)
    return run.summary


if __name__ == "__main__":
    from harness.outcome import end_the_process

    try:
        main()
    except SystemExit as e:
        end_the_process(e.code)
    except BaseException as e:  # summary.json has the error already where the run had started
        traceback.print_exc()
        print(f"{SCRIPT}: error: {first_line(e)}", file=sys.stderr)
        end_the_process(1)
    end_the_process(0)  # skips the interpreter's teardown, as the scripts' own processes do
