"""Python's garbage collector between optimizer steps, not inside them (torchtitan's `gc_freq` does the same).

A process that holds torch, transformers and dynamo's compiled graphs has millions of objects, and a full
collection of them, which Python starts whenever enough objects were allocated, stalls the step it lands in:
lightweight_small's steps 6-10 ran at 135k tokens/s where the others ran at 186k; with the collector off, the
same run's steps 6-10 ran at 186k (results/NOTES.md, calls 25-28). The Trainer has no switch for it, so it is a
TrainerCallback (the public hook) here.
"""
from __future__ import annotations

import gc

from transformers import TrainerCallback


class CollectBetweenSteps(TrainerCallback):
    """Automatic collection off while training; a collection of the young generations every `every` optimizer
    steps, between steps. Collection is switched back on when training ends (and by the session if it fails)."""

    def __init__(self, every: int = 50):
        self.every = every

    def on_train_begin(self, args, state, control, **kwargs):
        gc.collect()  # setup's garbage, once, before the first step
        gc.disable()

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every == 0:
            gc.collect(1)  # generations 0 and 1: the objects made since the last one, not the whole heap

    def on_train_end(self, args, state, control, **kwargs):
        gc.enable()
