"""The CPU step's memory estimate (harness/cpu_memory.py) against measured peaks, and what a run does with it: the
micro-batch that fits, or one line and exit 2 before any weights exist.

The peak is the process's maximum resident set (ru_maxrss) less its resident set just before the estimate (torch,
the tokenizer and the corpus loaded): what the run adds. The estimate may be above it, never below, and by at most
MARGIN: an estimate that under-counts lets the kernel kill the run; one far above refuses runs that fit.
"""
import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

import lightweight_small
from conftest import REPO, SMALL_CORPUS, tiny_script_model
from harness import budget, cpu_memory
from harness.cli import InputError, Switches
from harness.sources import architecture_config

MARGIN = 1.5  # the estimate is at most this many times the measured peak

MEASURE = """
import json, resource, sys
sys.path.insert(0, {repo!r})
import lightweight_small
from harness import cpu_memory
from harness.session import Run

def resident_gib():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**30

seen, prepare = {{}}, Run.prepare_records
def prepare_records(self):  # after the config is known, before the weights: measured from here
    seen["before"] = resident_gib()
    states, per_row = cpu_memory.step_estimate_gib(self.args, self.on, self.config)
    seen["states"], seen["per_row"] = sum(states.values()), per_row
    prepare(self)
Run.prepare_records = prepare_records
summary = lightweight_small.main(sys.argv[1:])
seen["estimate"] = seen["states"] + summary["micro_batch"] * seen["per_row"]
seen["peak"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20 - seen["before"]
print(json.dumps(seen))
"""


def measured(args, tmp_path) -> dict:
    """lightweight_small's run of `args` in a fresh process: {"estimate", "peak", ...} in GiB."""
    done = subprocess.run([sys.executable, "-c", MEASURE.format(repo=str(REPO)), *args, "--max-steps", "1",
                           "--wandb", "off", "--no-checkpoints", "--output-dir", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def opt_folder(tmp_path, cache_dir):
    """A 4-layer OPT of width 512 (MLP 2048, 8 heads), random weights, saved with the tiny model's tokenizer: 51M
    parameters, whose step at 4 x 512 tokens is mostly activations."""
    from transformers import AutoConfig, AutoModelForCausalLM

    _, source = tiny_script_model(lightweight_small, cache_dir)
    tokenizer = source.tokenizer
    fields = json.loads((REPO / "configs" / "facebook--opt-350m.json").read_text())
    fields.update(hidden_size=512, ffn_dim=2048, num_hidden_layers=4, num_attention_heads=8, word_embed_proj_dim=512,
                  vocab_size=len(tokenizer), bos_token_id=0, eos_token_id=0, pad_token_id=0)
    AutoModelForCausalLM.from_config(AutoConfig.for_model(**fields)).save_pretrained(tmp_path / "opt")
    tokenizer.save_pretrained(tmp_path / "opt")
    return tmp_path / "opt"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
@pytest.mark.parametrize("size", ["tiny", "4-layer OPT"])
def test_the_estimate_is_within_its_margin_above_the_measured_peak(size, tmp_path, cache_dir):
    if size == "tiny":  # the script's own sizes, 32 x 1024
        args = ["--model", "tiny", "--corpus", str(SMALL_CORPUS)]
    else:
        args = ["--model", str(opt_folder(tmp_path, cache_dir)), "--corpus", str(SMALL_CORPUS), "--seq-len", "512",
                "--micro-batch", "4", "--tokens-per-step", "2048"]
    found = measured([*args, "--cache-dir", str(cache_dir)], tmp_path)
    assert found["peak"] <= found["estimate"] <= MARGIN * found["peak"], found


def script_args(**given):
    """lightweight_small's command line as parse_args makes it, on the CPU: `given` flags only."""
    args = SimpleNamespace(model=lightweight_small.MODEL, micro_batch=32, micro_batch_given=False, seq_len=1024)
    for name, value in given.items():
        setattr(args, name, value)
    on = Switches(lightweight_small.TECHNIQUES)
    on.skip_cuda_only("CUDA only")
    return args, on


@pytest.fixture(scope="module")
def opt_350m_step():
    """(states GiB, activations GiB per row) of lightweight_small's OPT-350m step on the CPU, at 1024 tokens."""
    args, on = script_args()
    states, per_row = cpu_memory.step_estimate_gib(args, on, architecture_config(lightweight_small.MODEL))
    return sum(states.values()), per_row


def available_for(micro: int, step) -> float:
    """The memory available at which micro-batch `micro` is the largest that fits."""
    states, per_row = step
    return (states + micro * per_row) / cpu_memory.HEADROOM + per_row / 4


@pytest.mark.parametrize("micro", [32, 4, 1])
def test_the_largest_micro_batch_that_fits_is_taken(micro, opt_350m_step, monkeypatch, capsys):
    monkeypatch.setattr(budget, "available_memory_gib", lambda: available_for(micro, opt_350m_step))
    args, on = script_args()
    reason = cpu_memory.fit_the_cpu("lightweight_small", args, on, architecture_config(args.model), 1, False)
    assert args.micro_batch == micro
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("lightweight_small: facebook/opt-350m on the CPU: a step of micro-batch 32 x 1024 needs ")
    if micro == 32:
        assert reason is None and "too much" not in line
    else:
        assert reason.startswith("the largest that fits 90% of the ") and reason.endswith("at most 32")
        assert f"; micro-batch {micro} fits (" in line and "accumulation keeping the tokens per step" in line


@pytest.mark.parametrize("given", [False, True])
def test_a_step_that_cannot_fit_is_refused_in_one_line(given, opt_350m_step, monkeypatch):
    """Not even micro-batch 1 fits, or a --micro-batch given does not: InputError (the session's exit 2)."""
    monkeypatch.setattr(budget, "available_memory_gib",
                        lambda: available_for(4, opt_350m_step) if given else opt_350m_step[0])
    args, on = script_args(micro_batch_given=given)
    with pytest.raises(InputError) as refused:
        cpu_memory.fit_the_cpu("lightweight_small", args, on, architecture_config(args.model), 1, False)
    (line,) = str(refused.value).splitlines()
    if given:
        assert line.endswith("too much; micro-batch 4 fits (" + line.split("micro-batch 4 fits (")[1])
        assert "--micro-batch 4, or --model tiny" in line
    else:
        assert "too much even at micro-batch 1" in line and "--model tiny" in line


def test_recompute_keeps_less_than_every_layers_activations():
    """lightweight_big's grad_checkpointing: each layer keeps its input only."""
    config = architecture_config("EleutherAI/gpt-neo-1.3B")
    attention = ("sdpa", True)
    kept = cpu_memory.activation_gib_per_row(config, 256, attention, False, torch.bfloat16)
    recomputed = cpu_memory.activation_gib_per_row(config, 256, attention, True, torch.bfloat16)
    assert recomputed < kept / 2
