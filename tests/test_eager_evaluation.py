"""lightweight_small's compile technique: training runs the compiled layers, evaluation runs them uncompiled."""
import dataclasses

import pytest
import torch

import lightweight_small
from conftest import TINY


def graphs_compiled_with_gradients(script, extra_argv, tmp_path, cache_dir, monkeypatch) -> list[bool]:
    """Run `script` for 2 steps, evaluating after each, with its compile technique allowed on the CPU and a
    backend that runs graphs as traced; return, per graph dynamo compiled, whether gradients were on."""
    compiled = []

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
    return compiled


@pytest.mark.parametrize("eager", [True, False])
def test_evaluation_runs_the_compiled_layers_uncompiled(eager, tmp_path, cache_dir, monkeypatch):
    if not eager:  # the control: the same run evaluating compiled code, as MeasuringTrainer does unasked
        from harness.measure import MeasuringTrainer

        init = MeasuringTrainer.__init__
        monkeypatch.setattr(MeasuringTrainer, "__init__",
                            lambda self, *a, **kw: init(self, *a, **{**kw, "evaluate_eagerly": False}))
    compiled = graphs_compiled_with_gradients(lightweight_small, [], tmp_path, cache_dir, monkeypatch)
    assert True in compiled  # training ran compiled layers
    assert (False in compiled) is not eager  # eager: no evaluation graph was ever compiled
