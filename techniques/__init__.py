"""The code behind the techniques the libraries lack, one module per technique, named as the scripts' switch:
fused_ce, document_mask, sdpa (GPT-Neo's port), gc_paused, auto_micro_batch (with LeanerMemory, through which
checkpoint_to_fit and offload_checkpoints fit a larger micro-batch)."""
