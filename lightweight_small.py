"""The same job as before_small.py made fast, without changing what is learned.

Same model, corpus, tokens per optimizer step, learning-rate schedule, seed and held-out blocks. Each technique
is one guarded block below; `--off NAME` switches one off (the ablation). OPT-350m by default; `--model` takes any
decoder-only causal LM (a full fine-tune of it).

    python lightweight_small.py --help
"""
import functools
import gc
import math

from common import packed_dataset, padded_dataset
from harness import Technique, session
from techniques.auto_micro_batch import LeanerMemory

# torch, the libraries and the techniques that load them are imported in the functions: --help answers at once

MODEL = "facebook/opt-350m"
LEARNING_RATE = 5e-5                   # peak, decayed linearly to 0 (--lr); before_small's
# compiling costs seconds of a job and saves a fraction of each step: it pays from this many steps (rows
# lightweight_small and lightweight_small-no-compile; FINDINGS, the compile threshold); the default job is shorter
COMPILE_PAYS_FROM_STEPS = 64
SIZES = dict(micro_batch=32,           # 32 x 1024 tokens per forward pass keeps the H200 busy
             seq_len=1024,
             tokens_per_step=32768,    # = 32 x 1024, no accumulation; the same slots per step as before_small
             learning_rate=LEARNING_RATE)
TECHNIQUES = {
    "bf16": Technique("bf16 autocast, fp32 master weights (fp16 where the GPU lacks bf16)", cuda_only=True),
    "tf32": Technique("TF32 tensor cores for the matmuls left in fp32", cuda_only=True),
    "packing": Technique("corpus cut into full blocks, no pad tokens; off: one record per row, padded"),
    "document_mask": Technique("packed records attend only to themselves, their positions restart at 0: what the "
                               "padded baseline learns (FlexAttention block masks where the layers are compiled, "
                               "else dense masks); off: run_clm's attention across records"),
    "sdpa": Technique("fused scaled-dot-product attention kernels; off: eager attention"),
    "fused_adamw": Technique("one optimizer kernel for all parameters; off: for-each AdamW"),
    "fused_ce": Technique("liger fused linear cross-entropy: no 32 x 1024 x 50k logits tensor", cuda_only=True),
    "compile": Technique(f"torch.compile of each decoder layer (compiled once, reused by all of them; evaluation runs "
                         f"them uncompiled), in runs of at least {COMPILE_PAYS_FROM_STEPS} steps", cuda_only=True),
    "step_overlap": Technique("the next step's work queues while the GPU finishes this one: the Trainer's NaN/inf "
                              "filter of the logged loss, which reads every micro-batch's loss on the host, is off "
                              "(a NaN loss is then logged as NaN)"),
    "auto_micro_batch": Technique("the largest micro-batch that fits this GPU (or --gpu-memory-gib), at most 32; "
                                  "accumulation keeps the tokens per step", cuda_only=True),
    "checkpoint_to_fit": Technique("where the memory splits a step into 4 or more micro-batches: every decoder layer "
                                   "recomputed in backward, if a micro-batch at least twice as large then fits "
                                   "(the largest that does: fewer micro-batches, less host work)", cuda_only=True),
    "gc_paused": Technique("Python's garbage collector paused from the start (the imports' collections too); in "
                           "training, setup's objects frozen and the new ones collected every 50 steps, between steps",
                           at_start=gc.disable),
    # off by default: the benchmark's strongest peers
    "trainer_compile": Technique("transformers' Trainer compiling the whole model (TrainingArguments torch_compile), "
                                 "the peer's choice", default=False, cuda_only=True),
    "trainer_liger": Technique("transformers' Trainer patching the model with liger's kernels (TrainingArguments "
                               "use_liger_kernel: its norms, MLP, rotary embedding and fused loss), for the families "
                               "liger patches; the peer's choice", default=False, cuda_only=True),
}
# The strongest peer the benchmark compares with: transformers' Trainer with --bf16 --tf32 --optim adamw_torch_fused
# --torch_compile, SDPA and run_clm's packing, as this script with its own techniques switched
STRONGEST_PEER = ["--off", "fused_ce", "--off", "compile", "--on", "trainer_compile", "--off", "auto_micro_batch",
                  "--off", "gc_paused", "--off", "step_overlap", "--off", "checkpoint_to_fit", "--off", "document_mask"]


def load_model(weights, on, device):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from techniques.document_mask import DENSE_DOCUMENT_ATTENTION, DOCUMENT_ATTENTION
    from techniques.fused_ce import put_loss_in_forward
    from techniques.sdpa import use_gpt_neo_sdpa

    gpt_neo = AutoConfig.from_pretrained(weights).model_type == "gpt_neo"  # transformers gives it eager attention
    # alone (besides flash-attn), and this repo's port (use_gpt_neo_sdpa) replaces it
    sdpa = "sdpa"
    if on("document_mask") and on("sdpa"):  # SDPA, and for packed documents FlexAttention inside the compiled
        # layers; uncompiled, dense masks: flex's kernels would compile at the first step
        sdpa = DOCUMENT_ATTENTION if on("compile") else DENSE_DOCUMENT_ATTENTION
    attention = sdpa if on("sdpa") and not gpt_neo else "eager"  # eager: packed documents through a dense mask
    model = AutoModelForCausalLM.from_pretrained(weights, dtype=torch.float32, use_cache=False,
                                                 attn_implementation=attention)
    if on("sdpa") and gpt_neo:
        use_gpt_neo_sdpa(model, masks=sdpa)
    if not on("trainer_liger"):  # the peer's liger computes its fused loss in the model's own (patched) forward
        put_loss_in_forward(model, fused=on("fused_ce"))  # fused: the logits are never materialized
    return model.to(device)


def checkpoint_layers(model, recompute: bool) -> None:
    """Every decoder layer recomputed in backward (its compiled graph too), or none."""
    if recompute:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()


def recompute_to_fit(model) -> LeanerMemory:
    """checkpoint_to_fit, as the micro-batch probe tries it: from 4 micro-batches a step, which are bound by each one's
    host work (rows lightweight_small-16gib-no-checkpoint_to_fit, 8 rows x 4, and lightweight_small-16gib,
    recomputed, 32 x 1). At 2 (24 GiB, 16 x 2) the recompute's third more GPU work is predicted to cost about what
    one micro-batch less saves (not measured)."""
    return LeanerMemory(functools.partial(checkpoint_layers, model), "with every layer recomputed in backward",
                        from_split=4)


def main(argv=None):
    with session("lightweight_small", MODEL, TECHNIQUES, argv, **SIZES) as run:
        import torch
        from transformers import TrainingArguments

        from techniques.gc_paused import CollectBetweenSteps
        from techniques.sdpa import sdpa_missing

        on, args = run.on, run.args
        if not on("packing"):  # padded rows keep each record to itself already
            on.skip("document_mask", "needs packing")
        if why := sdpa_missing(run.config):
            on.skip("sdpa", why)
        if on("trainer_liger"):
            from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
            if run.config.model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
                on.skip("trainer_liger", f"liger does not patch {run.config.model_type}")
        if on("packing"):  # run_clm's group_texts: concatenate the records, cut full blocks
            train_set = packed_dataset(run.train_records, args.seq_len)
            if not on("document_mask"):  # without position ids: positions 0-1023, attention across records
                train_set = train_set.remove_columns("position_ids")
        else:
            train_set = padded_dataset(run.train_records, args.seq_len, run.tokenizer.pad_token_id)
        # as many at any micro-batch the probe halves to (packed rows: the same rows per step; padded: to a step)
        steps = run.steps_to_train(train_set, args.micro_batch)
        if on("compile") and steps < COMPILE_PAYS_FROM_STEPS:
            on.skip("compile", f"{steps} steps; it pays for itself from about {COMPILE_PAYS_FROM_STEPS}")
        model = load_model(run.weights, on, run.device)
        optim = "adamw_torch_fused" if on("fused_adamw") else "adamw_torch"
        micro_batch = args.micro_batch
        if on("auto_micro_batch"):  # a 16 or 24 GiB GPU takes a smaller one than the H200's 32
            recompute = recompute_to_fit(model) if on("checkpoint_to_fit") else None
            micro_batch = run.largest_micro_batch(model, optim, autocast=on("bf16"), leaner=recompute)
        if on("checkpoint_to_fit") and run.leaner_unused:  # the record says it was not used, and why
            on.skip("checkpoint_to_fit", run.leaner_unused)
        if on("compile"):  # each layer: one compilation serves all (the whole decoder took longer than it saved)
            from transformers.modeling_layers import GradientCheckpointingLayer  # every family's decoder layer
            for layer in [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]:
                layer.compile()
            # under DDP, keep each layer one graph: dynamo would split it at DDP's 25 MB gradient buckets, losing
            # fusions: more memory per GPU and fewer tokens/s (FINDINGS, several GPUs)
            torch._dynamo.config.optimize_ddp = False  # a documented dynamo setting (torch._dynamo.config)
        training_args = TrainingArguments(
            per_device_train_batch_size=micro_batch, gradient_accumulation_steps=run.accumulation(micro_batch, train_set),
            num_train_epochs=args.epochs, max_steps=args.max_steps, seed=args.seed, data_seed=args.seed,
            learning_rate=args.lr, lr_scheduler_type="linear",
            bf16=on("bf16") and run.bf16_or_fp16 == torch.bfloat16,  # autocast; fp32 master weights
            fp16=on("bf16") and run.bf16_or_fp16 == torch.float16,
            tf32=on("tf32"), optim=optim, torch_compile=on("trainer_compile"), use_liger_kernel=on("trainer_liger"),
            logging_steps=args.logging_steps, prediction_loss_only=True,
            logging_nan_inf_filter=not on("step_overlap"),  # the filter waited for each micro-batch's loss
            eval_strategy="steps", eval_steps=args.eval_every or math.ceil(steps / 4),  # --eval-every 0: four times
            # checkpoints to resume from every --save-every steps; none at the end, where the trained model is saved
            save_strategy="steps" if args.save_every and not args.no_checkpoints else "no",
            save_steps=args.save_every or steps, save_total_limit=2,
            **run.plumbing_arguments())
        callbacks = []
        if on("gc_paused"):  # no collection of the whole heap inside a step
            callbacks.append(CollectBetweenSteps(every=50))
        run.train(model, training_args, train_set, one_batch_shape=on("compile"),  # compile: no recompilation,
                  # and evaluation uncompiled: loading its own graphs at the first evaluation took many times
                  # longer than an evaluation
                  evaluate_eagerly=on("compile"), callbacks=callbacks)
    return run.summary


if __name__ == "__main__":
    main()
