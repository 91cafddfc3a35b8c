"""Python's garbage collector in training: between optimizer steps, never inside them (torchtitan's `gc_freq`).

A process that holds torch, transformers and dynamo's compiled graphs has about a million objects, and a full
collection of them, which Python starts whenever enough objects were allocated, stalls the step it lands in.
Paused, lightweight_small's steps ran faster and its job shorter (FINDINGS, Python's garbage collector); a slow
window there outlived the paused collector: it has a second cause, not yet known. The Trainer has no switch for it, so it is a TrainerCallback (the public hook) here. The scripts pause the collector at the
start (their gc_paused), which also spares the imports' collections.
"""
from __future__ import annotations

import gc

from transformers import TrainerCallback


class CollectBetweenSteps(TrainerCallback):
    """Automatic collection off while training; a collection of the young generations every `every` optimizer
    steps, between steps. Automatic collection comes back on when training ends (after a failure, the session
    puts it back as it was)."""

    def __init__(self, every: int = 50):
        self.every = every

    def on_train_begin(self, args, state, control, **kwargs):
        gc.disable()
        # everything setup made moves to a generation no collection walks again: freezing is instant, where a full
        # collection of setup's heap takes a large part of a second (its garbage, the imports' objects, stays)
        gc.freeze()

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every == 0:
            gc.collect(1)  # generations 0 and 1: the objects made since the last one, not the whole heap

    def on_train_end(self, args, state, control, **kwargs):
        gc.enable()
