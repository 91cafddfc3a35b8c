"""`--model FOLDER` with any decoder-only causal LM: tiny Llama, Qwen2 and Gemma folders train, evaluate, save and
resume in each script; GPT-Neo and GPT-J, which transformers runs without SDPA, train; an encoder-decoder, an
encoder or a folder without its tokenizer is refused in one line; the FLOP count follows the model's own layers
(grouped-query attention, gated MLPs, 4-bit weights, LoRA)."""
import importlib
import json
import math

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from conftest import SMALL_CORPUS
from harness import measure, sources
from harness.cli import InputError
from tiny_models import FAMILIES, SIZES, WITHOUT_TRANSFORMERS_SDPA, save_tiny_encoder_decoder, save_tiny_model

SCRIPTS = ["before_small", "lightweight_small", "before_big", "lightweight_big"]
SMALL = ["--seq-len", "64", "--micro-batch", "2", "--tokens-per-step", "128"]
# every linear projection of a Llama, Qwen2 or Gemma decoder block
PROJECTIONS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """The first 20 records of the test corpus: one is held out, 6 evaluation blocks of 64 tokens (the 4-bit
    model's evaluation on the CPU takes a second, not the half minute of 148 blocks)."""
    path = tmp_path_factory.mktemp("corpus") / "corpus.json"
    path.write_text(json.dumps(json.loads(SMALL_CORPUS.read_text())[:20]))
    return path


@pytest.fixture(scope="session")
def folders(tmp_path_factory, cache_dir, corpus) -> dict:
    """A saved tiny model folder per family of FAMILIES and WITHOUT_TRANSFORMERS_SDPA, and a tiny T5 ('t5'), all with
    the corpus's tokenizer."""
    import common

    tokenizer = common.corpus_tokenizer(common.load_corpus(corpus, cache_dir), 1024, cache_dir)
    root = tmp_path_factory.mktemp("models")
    saved = {family: save_tiny_model(family, root / family, tokenizer)
             for family in [*FAMILIES, *WITHOUT_TRANSFORMERS_SDPA]}
    saved["t5"] = save_tiny_encoder_decoder(root / "t5", tokenizer)
    return saved


def run(script: str, model, corpus, out, cache_dir, *extra) -> dict:
    return importlib.import_module(script).main(
        ["--model", str(model), "--corpus", str(corpus), *SMALL, "--output-dir", str(out), "--cache-dir",
         str(cache_dir), "--wandb", "off", *extra])


def refusal(script: str, model, corpus, tmp_path, cache_dir, capsys, *extra) -> str:
    """Run `script` on `model`; assert exit 2, one line on stderr and nothing written; return that line."""
    with pytest.raises(SystemExit) as exit_info:
        run(script, model, corpus, tmp_path / "out", cache_dir, "--max-steps", "1", *extra)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"{script}: error: model {model}: ")
    assert not (tmp_path / "out").exists()
    return lines[0]


@pytest.mark.parametrize("script", SCRIPTS)
def test_an_encoder_decoder_is_refused_in_one_line(script, folders, corpus, tmp_path, cache_dir, capsys):
    line = refusal(script, folders["t5"], corpus, tmp_path, cache_dir, capsys)
    assert "t5 is an encoder-decoder model" in line


def test_an_encoder_or_an_unknown_model_type_is_refused_in_one_line(corpus, tmp_path, cache_dir, capsys):
    bert = tmp_path / "bert"
    AutoConfig.for_model("bert", hidden_size=64, num_hidden_layers=2, num_attention_heads=4).save_pretrained(bert)
    assert "bert is a bidirectional encoder" in refusal("before_small", bert, corpus, tmp_path, cache_dir, capsys)
    unknown = tmp_path / "unknown"
    unknown.mkdir()
    (unknown / "config.json").write_text(json.dumps({"model_type": "no-such-family", "hidden_size": 64}))
    for init in ("pretrained", "random"):
        line = refusal("lightweight_small", unknown, corpus, tmp_path, cache_dir, capsys, "--init", init)
        assert "does not know its model_type 'no-such-family'" in line


def test_a_folder_without_its_tokenizer_is_refused_in_one_line(folders, corpus, tmp_path, cache_dir, capsys):
    weights_only = tmp_path / "weights_only"
    AutoModelForCausalLM.from_pretrained(folders["llama"]).save_pretrained(weights_only)
    capsys.readouterr()  # the loading's progress bar
    line = refusal("lightweight_small", weights_only, corpus, tmp_path, cache_dir, capsys)
    assert "its tokenizer cannot be loaded" in line


@pytest.mark.parametrize("model_type, fields, refused", [
    ("llama", {}, None), ("gpt2", {}, None), ("bert", {"is_decoder": True}, None),  # BERT as a decoder trains
    ("t5", {}, "encoder-decoder"), ("bart", {}, "encoder-decoder"),
    ("bert", {}, "bidirectional encoder"), ("roberta", {}, "bidirectional encoder"),
    ("vit", {}, "no causal-LM class")])
def test_only_decoder_only_causal_lms_pass(model_type, fields, refused):
    config = AutoConfig.for_model(model_type, **fields)
    if refused is None:
        sources.refuse_untrainable("m", config)
    else:
        with pytest.raises(InputError, match=refused):
            sources.refuse_untrainable("m", config)


def test_flops_per_token_of_a_grouped_query_llama_is_the_hand_count():
    """6 x the matmul weights a token passes through (k and v 2 heads of 16 wide, gate, up and down, the untied
    output layer; not the embedding) + 12 L T x the query heads' width; a frozen base: 4 x; LoRA's adapters not."""
    from peft import LoraConfig, get_peft_model

    config = AutoConfig.for_model("llama", vocab_size=1024, **SIZES)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    d, kv, mlp, layers, vocab, seq_len = 64, 2 * 16, 128, 2, 1024, 64
    n = layers * (d * d + 2 * d * kv + d * d + 3 * d * mlp) + vocab * d
    attention = 12 * layers * seq_len * d
    assert measure.flops_per_token(model, config, seq_len, frozen_base=False) == 6 * n + attention
    lora = get_peft_model(model, LoraConfig(r=8, target_modules="all-linear"))
    assert measure.flops_per_token(lora, config, seq_len, frozen_base=True) == 4 * n + attention


def test_flops_per_token_counts_a_4bit_lora_model_as_its_plain_self(cache_dir):
    """lightweight_big's tiny GPT-Neo, 4-bit (packed weights) with LoRA adapters: the count of the same model built
    plain; the tied output layer counted once, as a matmul."""
    import lightweight_big
    from conftest import tiny_script_model

    model, source = tiny_script_model(lightweight_big, cache_dir, off=("pad_vocab",))
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(source.config)
    assert plain.config.tie_word_embeddings
    config = source.config
    for frozen in (False, True):
        assert measure.flops_per_token(model, config, 64, frozen) == measure.flops_per_token(plain, config, 64, frozen)


def metrics(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("script", SCRIPTS)
def test_a_tiny_model_of_each_family_trains_evaluates_saves_and_resumes(script, family, folders, corpus, tmp_path,
                                                                        cache_dir):
    out, steps = tmp_path / "out", ["--save-every", "1", "--eval-every", "2"]
    first = run(script, folders[family], corpus, out, cache_dir, "--max-steps", "2", *steps)
    assert first["init"] == "pretrained" and first["steps"] == 2 and math.isfinite(first["final_eval_loss"])
    assert (out / "checkpoint-2").is_dir()
    saved = {p.name for p in out.iterdir()}
    if script == "lightweight_big":  # LoRA adapters on every projection of the decoder blocks, saved alone
        assert {"adapter_model.safetensors", "adapter_config.json"} <= saved
        targets = json.loads((out / "adapter_config.json").read_text())["target_modules"]
        assert {name.rsplit(".", 1)[-1] for name in targets} == PROJECTIONS
    else:
        assert {"model.safetensors", "config.json"} <= saved
    skipped = first["techniques_skipped"]
    assert all(isinstance(why, str) and why for why in skipped.values())  # each skipped technique says why
    if script == "lightweight_big":  # GPT-Neo's tanh GELU as a fused kernel: not these families' MLPs
        assert "fast_gelu" in skipped and "fast_gelu" not in first["techniques"]

    resumed = run(script, folders[family], corpus, out, cache_dir, "--max-steps", "3", *steps, "--resume")
    assert resumed["steps"] == 3 and math.isfinite(resumed["final_eval_loss"])  # evaluated at the end
    assert [r["step"] for r in metrics(out) if "loss" in r] == [1, 2, 3]  # steps 1-2 kept, step 3 trained on top


@pytest.mark.parametrize("script", ["lightweight_small", "lightweight_big"])
def test_a_family_without_transformers_sdpa_trains_through_the_port_or_eager(script, folders, corpus, tmp_path,
                                                                             cache_dir):
    neo = run(script, folders["gpt_neo"], corpus, tmp_path / "neo", cache_dir, "--max-steps", "1")
    assert "sdpa" in neo["techniques"]  # GPT-Neo: this repo's port
    gptj = run(script, folders["gptj"], corpus, tmp_path / "gptj", cache_dir, "--max-steps", "1")
    assert gptj["techniques_skipped"]["sdpa"] == "transformers has no SDPA for gptj: eager attention"
    assert math.isfinite(gptj["final_eval_loss"])
