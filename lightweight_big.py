"""QLoRA on GPT-Neo 1.3B: trains within a few GiB what before_big.py cannot fit in 16.

    python lightweight_big.py --gpu-memory-gib 4

`--model` takes any decoder-only causal LM; a technique that does not fit its architecture is skipped, and the run's
record says why.

The standard Hugging Face + PEFT QLoRA recipe (artidoro/qlora's qlora.py), which the benchmark compares with, is
this script with its own techniques switched: `python lightweight_big.py` followed by REFERENCE_QLORA below.
"""
import functools
import gc
import math

from common import packed_dataset, padded_dataset
from harness import Technique, session
from techniques.auto_micro_batch import LeanerMemory

# torch, the libraries and the techniques that load them are imported in the functions: --help answers at once

MODEL = "EleutherAI/gpt-neo-1.3B"
LEARNING_RATE = 5e-5                   # peak, decayed linearly to 0 (--lr)
SIZES = dict(micro_batch=32,           # one micro-batch per step: its host work (peft, bitsandbytes, recompute) is
             seq_len=1024,             # paid once, not twice (FINDINGS, lightweight_big's auto_micro_batch);
             tokens_per_step=32768,    # auto_micro_batch halves it to fit the GPU or budget
             learning_rate=LEARNING_RATE)
LORA_RANK, LORA_ALPHA = 16, 32
LORA_TARGETS = "all-linear"  # peft: every linear projection of the blocks (not the output layer), whatever its name
TECHNIQUES = {
    "nf4": Technique("base weights in 4-bit NF4, double quantization, bf16 compute (bitsandbytes)", needs=("lora",)),
    "lora": Technique(f"rank-{LORA_RANK} adapters on every attention and MLP projection; the base is frozen (peft)"),
    "grad_checkpointing": Technique("recompute activations in backward (--checkpoint-layers: how many layers)"),
    "offload_checkpoints": Technique("where the memory splits a step into micro-batches: the checkpointed blocks' "
                                     "inputs wait in pinned CPU memory, if a micro-batch at least twice as large "
                                     "then fits (the largest that does: fewer micro-batches, less host work)",
                                     cuda_only=True),
    "paged_adamw_8bit": Technique("8-bit AdamW states, paged to the CPU under pressure (bitsandbytes)"),
    "lora_autocast": Technique("the adapters compute in bf16 from fp32 weights: no fp32 copy of every input",
                               needs=("lora",)),
    "tf32": Technique("TF32 tensor cores for the matmuls left in fp32", cuda_only=True),
    "step_overlap": Technique("the next micro-batch's work queues while the GPU finishes this one: the Trainer's "
                              "NaN/inf filter of the logged loss, which reads every micro-batch's loss on the host, "
                              "is off (a NaN loss is then logged as NaN)"),
    # Tried and removed, slower (FINDINGS, lightweight_big): selective activation checkpointing (its policy runs in
    # Python for every op), torch.compile of the blocks, whole-model bf16 autocast (norms and softmax move to fp32)
    "packing": Technique("full 1024-token blocks, no pad tokens; off: one record per row, padded"),
    "document_mask": Technique("packed records attend only to themselves (the local layers' 256-token window inside "
                               "each), their positions restart at 0: what the padded baseline learns (FlexAttention "
                               "block masks); off: run_clm's attention across records"),
    "sdpa": Technique("fused scaled-dot-product attention: transformers' own, or for GPT-Neo (which it gives only "
                      "eager attention) this repo's port (scale 1, 256-token local window); off: eager"),
    "fast_gelu": Technique("GPT-Neo's tanh GELU as one fused kernel (same function); off: the 8-op Python one"),
    "fused_ce": Technique("liger fused linear cross-entropy: no logits tensor", cuda_only=True),
    "pad_vocab": Technique("output layer padded from 50,257 to 50,304 rows (a multiple of 64), the padding's logits "
                           "masked out of the loss: aligned matmuls instead of cuBLAS's slow unaligned kernels"),
    "auto_micro_batch": Technique("the largest micro-batch that fits this GPU (or --gpu-memory-gib), at most 32; "
                                  "accumulation keeps the tokens per step", cuda_only=True),
    "gc_paused": Technique("Python's garbage collector paused from the start (the imports' collections too); in "
                           "training, setup's objects frozen and the new ones collected every 50 steps, between steps",
                           at_start=gc.disable),
    # off by default: the QLoRA reference's own choices
    "kbit_prep": Technique("peft's prepare_model_for_kbit_training: norms and embeddings in fp32", default=False,
                           needs=("lora",)),
    "bf16": Technique("bf16 autocast of the whole model", default=False, cuda_only=True),
    "paged_adamw_32bit": Technique("paged 32-bit AdamW (bitsandbytes)", default=False),
    "qlora_py_adapters": Technique("LoRA as qlora.py's defaults: rank 64, alpha 16, dropout 0.05", default=False,
                                   needs=("lora",)),
}
REFERENCE_QLORA = ["--on", "kbit_prep", "--on", "bf16", "--on", "paged_adamw_32bit", "--off", "paged_adamw_8bit",
                   "--off", "lora_autocast", "--off", "tf32", "--off", "sdpa", "--off", "fast_gelu",
                   "--off", "fused_ce", "--off", "pad_vocab", "--off", "auto_micro_batch", "--off", "gc_paused",
                   "--off", "offload_checkpoints", "--off", "step_overlap", "--off", "document_mask",
                   "--micro-batch", "16"]  # qlora.py's 16 x 1024, 2 accumulation
# qlora.py's own defaults: r=64, alpha 16, dropout 0.05, paged 32-bit AdamW, 1 x 16 accumulation
QLORA_PY_DEFAULTS = [*REFERENCE_QLORA, "--on", "qlora_py_adapters", "--micro-batch", "1", "--tokens-per-step", "16384"]


def load_model(weights, on, device, half, checkpoint_layers=None):
    """The model as QLoRA wants it; `half` is bf16, or fp16 on a GPU without bf16."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from peft.tuners.lora import LoraLayer
    from transformers import AutoConfig, AutoModelForCausalLM, BitsAndBytesConfig

    from techniques.document_mask import DOCUMENT_ATTENTION
    from techniques.fused_ce import put_loss_in_forward
    from techniques.sdpa import use_gpt_neo_sdpa

    gpt_neo = AutoConfig.from_pretrained(weights).model_type == "gpt_neo"  # transformers gives it eager attention
    # alone (besides flash-attn), and this repo's port (use_gpt_neo_sdpa) replaces it
    attention = "sdpa" if on("sdpa") and not gpt_neo else "eager"
    if attention == "sdpa" and on("document_mask"):  # SDPA, and FlexAttention where a batch holds packed documents
        attention = DOCUMENT_ATTENTION
    options = dict(dtype=half if on("lora") else torch.float32,  # a frozen base needs no fp32 master copy
                   use_cache=False, attn_implementation=attention)
    if on("nf4"):
        options["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=half)
        options["device_map"] = {"": device}  # this process's GPU (one per process under torchrun)
    if on("fast_gelu"):  # gelu_new == tanh-approximated GELU; gelu_pytorch_tanh is PyTorch's fused kernel
        options["activation_function"] = "gelu_pytorch_tanh"
    model = AutoModelForCausalLM.from_pretrained(weights, **options)
    if not on("nf4"):
        model.to(device)
    elif device.type == "cpu":  # bitsandbytes 0.50 repacks a 4-bit weight for its CPU inference kernel at the first
        # forward without grad in eval mode, on CPUs with AVX512-BF16, and never unpacks it for training: the next
        # training step fails (`result += bias` in matmul_4bit). A model that trains keeps the trainable layout.
        for module in model.modules():
            if hasattr(module, "support_avx512bf16_for_cpu"):  # bitsandbytes.nn.Linear4bit
                module.support_avx512bf16_for_cpu = False
    if on("sdpa") and gpt_neo:  # document_mask: FlexAttention where a batch holds packed documents (eager: dense)
        use_gpt_neo_sdpa(model, masks=DOCUMENT_ATTENTION if on("document_mask") else "sdpa")
    vocab_size = model.config.vocab_size
    if on("pad_vocab"):  # an odd vocabulary (50,257) leaves the output matmuls unaligned: cuBLAS's slow
        # cutlass_75 ... align1 kernels (--profile; FINDINGS, pad_vocab). The tied embedding grows with it; the
        # new rows are never looked up (token ids < vocab_size), and the loss masks their logits.
        model.resize_token_embeddings(pad_to_multiple_of=64, mean_resizing=False)
        model.config.vocab_size = vocab_size  # the vocabulary itself is unchanged: peft, which saves the embedding
        # too when the config's vocabulary differs from the base model's, then saves the adapters alone (a merged
        # model saved whole would need `resize_token_embeddings(vocab_size)` first)
    if on("kbit_prep"):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if on("lora"):
        rank, alpha, dropout = (64, 16, 0.05) if on("qlora_py_adapters") else (LORA_RANK, LORA_ALPHA, 0.0)
        model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, bias="none",
                                                 target_modules=LORA_TARGETS, task_type="CAUSAL_LM"))
    if on("lora_autocast"):
        # Without autocast, peft casts each adapted layer's input to the adapters' fp32 and their output back:
        # two full-size copies per projection, in forward and again in recompute. Under autocast it
        # skips them and the adapters' matmuls run in bf16 (fp32 weights and optimizer kept). Only these layers:
        # whole-model autocast would also run layer norms and softmax in fp32.
        for module in model.modules():
            if isinstance(module, LoraLayer):
                module.forward = torch.autocast(device.type, dtype=half)(module.forward)
    put_loss_in_forward(model, fused=on("fused_ce"), vocab_size=vocab_size)  # fused: no logits tensor
    if on("grad_checkpointing"):
        checkpoint_blocks(model, checkpoint_layers)
    return model


def skip_what_the_model_lacks(on, config) -> None:
    """Skipped where the model lacks what they fit: GPT-Neo's GELU (fast_gelu), a vocabulary not a multiple of 64
    (pad_vocab), SDPA in transformers or this repo's GPT-Neo port (sdpa)."""
    from techniques.sdpa import sdpa_missing

    if why := sdpa_missing(config):
        on.skip("sdpa", why)
    if config.model_type != "gpt_neo":
        on.skip("fast_gelu", f"GPT-Neo's GELU; {config.model_type} has its own activation")
    if config.vocab_size % 64 == 0:
        on.skip("pad_vocab", f"the vocabulary ({config.vocab_size:,}) is a multiple of 64 already")


def checkpoint_blocks(model, layers=None, offload=False):
    """Recompute the first `layers` blocks (None: all) in backward; offload: their saved inputs (one hidden state per
    block) wait in pinned CPU memory, copied out in forward and back in backward on the compute stream."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False}, offload=offload)
    blocks = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]  # every family's blocks
    for block in blocks[layers:] if layers is not None else []:
        block.gradient_checkpointing = False  # checkpoint only as many blocks as the memory needs


def offload_to_fit(model, layers=None) -> LeanerMemory:
    """offload_checkpoints, as the micro-batch probe tries it: a split step is bound by each micro-batch's host work
    (peft, bitsandbytes, launches) whatever its rows, so fewer micro-batches are worth a copy of each checkpointed
    block's input to the CPU and back (rows lightweight_big-4gib, 16 x 2 offloaded, and
    lightweight_big-4gib-no-offload_checkpoints, 8 x 4)."""
    return LeanerMemory(functools.partial(checkpoint_blocks, model, layers),
                        "with the checkpointed activations offloaded to the CPU")


def main(argv=None):
    with session("lightweight_big", MODEL, TECHNIQUES, argv, **SIZES) as run:
        import torch
        from transformers import TrainingArguments

        from techniques.gc_paused import CollectBetweenSteps

        on, half, args = run.on, run.bf16_or_fp16, run.args
        checkpoint_layers = getattr(args, "checkpoint_layers", None)
        if not on("packing"):  # padded rows keep each record to itself already
            on.skip("document_mask", "needs packing")
        skip_what_the_model_lacks(on, run.config)
        model = load_model(run.weights, on, run.device, half, checkpoint_layers)
        if on("packing"):  # run_clm's group_texts: concatenate the records, cut full blocks
            train_set = packed_dataset(run.train_records, args.seq_len)
            if not on("document_mask"):  # without position ids: positions 0-1023, attention across records
                train_set = train_set.remove_columns("position_ids")
        else:
            train_set = padded_dataset(run.train_records, args.seq_len, run.tokenizer.pad_token_id)
        optim = ("paged_adamw_8bit" if on("paged_adamw_8bit") else
                 "paged_adamw_32bit" if on("paged_adamw_32bit") else "adamw_torch")
        # whole-model autocast: the bf16 technique; on a GPU without bf16 always, since the fp16 base's gradients
        # need loss scaling, and TrainingArguments gives a GradScaler only with fp16 autocast
        autocast = on("bf16") or half == torch.float16
        micro_batch = args.micro_batch
        if on("auto_micro_batch"):
            offload = None
            if on("offload_checkpoints") and on("grad_checkpointing"):
                offload = offload_to_fit(model, checkpoint_layers)
            micro_batch = run.largest_micro_batch(model, optim, autocast=autocast, leaner=offload)
        if on("offload_checkpoints") and run.leaner_unused:  # the record says it was not used, and why
            on.skip("offload_checkpoints", run.leaner_unused if on("grad_checkpointing") else
                    "needs grad_checkpointing")
        steps = run.steps_to_train(train_set, micro_batch)
        training_args = TrainingArguments(
            per_device_train_batch_size=micro_batch, gradient_accumulation_steps=run.accumulation(micro_batch, train_set),
            num_train_epochs=args.epochs, max_steps=args.max_steps, seed=args.seed, data_seed=args.seed,
            learning_rate=args.lr, lr_scheduler_type="linear",
            bf16=autocast and half == torch.bfloat16, fp16=autocast and half == torch.float16,
            tf32=on("tf32"), optim=optim,
            logging_steps=args.logging_steps, prediction_loss_only=True,
            logging_nan_inf_filter=not on("step_overlap"),  # the filter waited for each micro-batch's loss
            eval_strategy="steps", eval_steps=args.eval_every or math.ceil(steps / 4),  # --eval-every 0: four times
            # checkpoints to resume from every --save-every steps; none at the end, where the trained model is saved
            save_strategy="steps" if args.save_every and not args.no_checkpoints else "no",
            save_steps=args.save_every or steps, save_total_limit=2,
            **run.plumbing_arguments())
        # one shape: an epoch's short last micro-batch ran slower than its fewer rows explain; filled to the
        # micro-batch's shape it did not
        callbacks = []
        if on("gc_paused"):  # no collection of the whole heap inside a step
            callbacks.append(CollectBetweenSteps(every=50))
        run.train(model, training_args, train_set, one_batch_shape=True, callbacks=callbacks)
    return run.summary


if __name__ == "__main__":
    main()
