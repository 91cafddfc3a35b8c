"""lightweight_small's gc_between_steps: Python's collector paused while training, run between steps."""
import gc
import json
from types import SimpleNamespace

import lightweight_small
from conftest import TINY
from harness.garbage import CollectBetweenSteps


def test_collector_is_paused_in_training_and_collects_young_generations_at_the_interval(monkeypatch):
    collected = []
    monkeypatch.setattr(gc, "collect", lambda generation=2: collected.append(generation))
    callback = CollectBetweenSteps(every=2)
    try:
        callback.on_train_begin(None, SimpleNamespace(global_step=0), None)
        assert not gc.isenabled() and collected == [2]  # setup's garbage once, then automatic collection off
        for step in (1, 2, 3, 4):
            callback.on_step_end(None, SimpleNamespace(global_step=step), None)
        assert collected == [2, 1, 1]  # after steps 2 and 4: the young generations only
        callback.on_train_end(None, SimpleNamespace(global_step=4), None)
        assert gc.isenabled()
    finally:
        gc.enable()


def test_gc_between_steps_trains_and_leaves_the_collector_on(tmp_path, cache_dir, monkeypatch):
    seen = []
    original = CollectBetweenSteps.on_step_end

    def on_step_end(self, args, state, control, **kwargs):
        seen.append(gc.isenabled())
        return original(self, args, state, control, **kwargs)

    monkeypatch.setattr(CollectBetweenSteps, "on_step_end", on_step_end)
    summary = lightweight_small.main([*TINY, "--max-steps", "2", "--on", "gc_between_steps", "--wandb", "off",
                                      "--no-checkpoints", "--output-dir", str(tmp_path / "out"),
                                      "--cache-dir", str(cache_dir)])
    assert seen == [False, False]  # off during both steps
    assert gc.isenabled() and summary["steps"] == 2
    assert "gc_between_steps" in json.loads((tmp_path / "out" / "summary.json").read_text())["techniques"]
