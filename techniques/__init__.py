"""The code behind the techniques the libraries lack, one module per technique, named as the scripts' switch:

- fused_ce: the causal-LM loss inside the model's forward, plain or liger's fused linear cross-entropy (no logits)
- document_mask: packed documents that attend only to themselves (FlexAttention block masks or dense masks)
- sdpa: GPT-Neo's attention through PyTorch's SDPA (transformers gives GPT-Neo eager attention alone)
- gc_paused: Python's garbage collector paused, the new objects collected between optimizer steps
- auto_micro_batch: the largest micro-batch that fits, and LeanerMemory, the recompute or offload that fits a larger
  one (lightweight_small's checkpoint_to_fit, lightweight_big's offload_checkpoints)

The other techniques are a library's switch, set where the scripts load the model or build TrainingArguments.
"""
