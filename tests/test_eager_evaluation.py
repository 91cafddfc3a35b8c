"""lightweight_small's compile technique: training runs the compiled layers, evaluation runs them uncompiled; a run
too short for compiling to pay for itself runs uncompiled."""
import dataclasses

import pytest
import torch

import lightweight_small
from conftest import TINY


def graphs_compiled_with_gradients(script, extra_argv, tmp_path, cache_dir, monkeypatch, compile_from=1):
    """Run `script` for 2 steps, evaluating after each, with its compile technique allowed on the CPU (in runs of at
    least `compile_from` steps) and a backend that runs graphs as traced; return (per graph dynamo compiled, whether
    gradients were on; the run's summary)."""
    compiled = []
    monkeypatch.setattr(script, "COMPILE_PAYS_FROM_STEPS", compile_from)

    def recording_backend(graph_module, example_inputs):
        compiled.append(torch.is_grad_enabled())  # off: an evaluation graph (Trainer evaluates under no_grad)
        return graph_module.forward

    compile_layer = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self: compile_layer(self, backend=recording_backend))
    monkeypatch.setitem(script.TECHNIQUES, "compile", dataclasses.replace(script.TECHNIQUES["compile"], cuda_only=False))
    torch._dynamo.reset()  # no graph cached by an earlier test
    try:
        summary = script.main([*TINY, "--max-steps", "2", "--eval-every", "1", "--wandb", "off", "--no-checkpoints",
                               "--output-dir", str(tmp_path / "out"), "--cache-dir", str(cache_dir), *extra_argv])
    finally:
        torch._dynamo.reset()
    assert summary["steps"] == 2 and summary["final_eval_loss"] is not None
    return compiled, summary


@pytest.mark.parametrize("eager", [True, False])
def test_evaluation_runs_the_compiled_layers_uncompiled(eager, tmp_path, cache_dir, monkeypatch):
    if not eager:  # the control: the same run evaluating compiled code, as MeasuringTrainer does unasked
        from harness.measure import MeasuringTrainer

        init = MeasuringTrainer.__init__
        monkeypatch.setattr(MeasuringTrainer, "__init__",
                            lambda self, *a, **kw: init(self, *a, **{**kw, "evaluate_eagerly": False}))
    compiled, summary = graphs_compiled_with_gradients(lightweight_small, [], tmp_path, cache_dir, monkeypatch)
    assert True in compiled  # training ran compiled layers
    assert (False in compiled) is not eager  # eager: no evaluation graph was ever compiled
    assert "compile" in summary["techniques"]


def test_a_run_too_short_to_pay_for_compiling_runs_uncompiled(tmp_path, cache_dir, monkeypatch):
    compiled, summary = graphs_compiled_with_gradients(lightweight_small, [], tmp_path, cache_dir, monkeypatch,
                                                       compile_from=3)
    assert compiled == []  # 2 steps: no graph at all
    assert "compile" not in summary["techniques"]
    assert summary["techniques_skipped"]["compile"] == "2 steps; it pays for itself from about 3"
