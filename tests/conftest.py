import json
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# The first 200 records of corpus.json: the same kind of text, a tenth of the tokenizing and evaluating.
SMALL_CORPUS = Path(tempfile.mkdtemp(prefix="test-corpus-")) / "corpus.json"
SMALL_CORPUS.write_text(json.dumps(json.loads((REPO / "corpus.json").read_text())[:200]))

# Small sizes for the tiny CPU model: a few optimizer steps in seconds.
TINY = ["--model", "tiny", "--corpus", str(SMALL_CORPUS), "--seq-len", "64", "--micro-batch", "4",
        "--tokens-per-step", "512"]


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """One cache (tokenizer, tokenized corpus, tiny random-init checkpoints) for the whole session."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path):
    """W&B offline and pointed at tmp_path; the working directory too, so a stray write would land there."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # tests never reach for the hub
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.chdir(tmp_path)


def tiny_script_model(script, cache_dir, off=(), seed=42, on=()):
    """(model, source): `script.load_model` on the tiny model of its architecture, on the CPU."""
    import inspect

    import torch

    import common
    from harness.cli import Switches
    from harness.sources import resolve_model

    source = resolve_model("tiny", "random", script.MODEL, common.load_corpus(SMALL_CORPUS, cache_dir), cache_dir)
    weights = source.from_pretrained_path(42, cache_dir)
    on = Switches(script.TECHNIQUES, off=off, on=on)
    on.skip_cuda_only("CUDA only")
    torch.manual_seed(seed)
    half = (torch.bfloat16,) if "half" in inspect.signature(script.load_model).parameters else ()  # lightweight_big's
    return script.load_model(weights, on, torch.device("cpu"), *half), source


def output_head(weight):
    """A bias-free lm_head whose weight is the tensor `weight` itself, so that gradients reach that tensor."""
    import torch

    head = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    del head.weight
    head.weight = weight  # a plain tensor attribute: Linear's forward computes with it
    return head
