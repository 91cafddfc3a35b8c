"""The lightweight scripts' gc_paused: Python's collector paused from the start, run between steps in training."""
import gc
import json
from types import SimpleNamespace

import pytest

import lightweight_big
import lightweight_small
from conftest import TINY
from techniques.gc_paused import CollectBetweenSteps


def test_collector_is_paused_in_training_and_collects_young_generations_at_the_interval(monkeypatch):
    collected = []
    monkeypatch.setattr(gc, "collect", lambda generation=2: collected.append(generation))
    callback = CollectBetweenSteps(every=2)
    try:
        callback.on_train_begin(None, SimpleNamespace(global_step=0), None)
        assert not gc.isenabled() and gc.get_freeze_count() > 0  # setup's objects frozen, no full collection
        for step in (1, 2, 3, 4):
            callback.on_step_end(None, SimpleNamespace(global_step=step), None)
        assert collected == [1, 1]  # after steps 2 and 4: the young generations only
        callback.on_train_end(None, SimpleNamespace(global_step=4), None)
        assert gc.isenabled()
    finally:
        gc.unfreeze()
        gc.enable()


def run_watching_the_collector(script, argv, monkeypatch) -> tuple[dict, dict]:
    """(summary, seen): whether the collector was on when the run was built and at each step's end."""
    from harness.session import Run

    seen = {"setup": None, "steps": []}
    build, step_end = Run.__init__, CollectBetweenSteps.on_step_end

    def watch_setup(self, *args, **kwargs):
        seen["setup"] = gc.isenabled()
        build(self, *args, **kwargs)

    def watch_step(self, args, state, control, **kwargs):
        seen["steps"].append(gc.isenabled())
        return step_end(self, args, state, control, **kwargs)

    monkeypatch.setattr(Run, "__init__", watch_setup)
    monkeypatch.setattr(CollectBetweenSteps, "on_step_end", watch_step)
    return script.main(argv), seen


@pytest.mark.parametrize("script", [lightweight_small, lightweight_big])
def test_gc_paused_from_the_start_and_left_as_it_was(script, tmp_path, cache_dir, monkeypatch):
    argv = [*TINY, "--max-steps", "2", "--wandb", "off", "--no-checkpoints", "--output-dir", str(tmp_path / "out"),
            "--cache-dir", str(cache_dir)]
    summary, seen = run_watching_the_collector(script, argv, monkeypatch)
    assert seen == {"setup": False, "steps": [False, False]}  # paused before setup's imports, and in both steps
    assert gc.isenabled() and gc.get_freeze_count() == 0  # the caller's collector as it was
    assert summary["steps"] == 2
    assert "gc_paused" in json.loads((tmp_path / "out" / "summary.json").read_text())["techniques"]


def test_gc_paused_off_leaves_the_collector_on(tmp_path, cache_dir, monkeypatch):
    argv = [*TINY, "--max-steps", "2", "--off", "gc_paused", "--wandb", "off", "--no-checkpoints",
            "--output-dir", str(tmp_path / "out"), "--cache-dir", str(cache_dir)]
    summary, seen = run_watching_the_collector(lightweight_small, argv, monkeypatch)
    assert seen == {"setup": True, "steps": []} and summary["steps"] == 2  # no callback: no steps seen


def test_a_refused_run_leaves_the_collector_on(tmp_path, cache_dir):
    with pytest.raises(SystemExit) as exit_info:
        lightweight_small.main([*TINY, "--seq-len", "4096", "--wandb", "off", "--output-dir", str(tmp_path / "out"),
                                "--cache-dir", str(cache_dir)])
    assert exit_info.value.code == 2 and gc.isenabled()  # refused in setup, after gc_paused paused the collector


def test_a_caller_with_the_collector_off_and_objects_frozen_gets_them_back_so(tmp_path, cache_dir):
    argv = [*TINY, "--max-steps", "2", "--wandb", "off", "--no-checkpoints", "--output-dir", str(tmp_path / "out"),
            "--cache-dir", str(cache_dir)]
    gc.disable()
    gc.freeze()
    frozen = gc.get_freeze_count()
    try:
        lightweight_small.main(argv)
        assert not gc.isenabled()  # the callback's on_train_end switched it on; the session put it back off
        assert gc.get_freeze_count() >= frozen  # the caller's frozen objects stay frozen
    finally:
        gc.unfreeze()
        gc.enable()


def test_an_at_start_is_not_for_a_cuda_only_technique():
    from harness.cli import Technique

    with pytest.raises(ValueError, match="not for a CUDA-only technique"):
        Technique("x", cuda_only=True, at_start=gc.disable)
