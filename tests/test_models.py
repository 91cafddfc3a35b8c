"""Model-side pieces: 4-bit + LoRA, the GPT-Neo SDPA port, the random-init fallback, the loss, the FLOP count."""
import copy
import json
import math

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM

import before_small
import common
import lightweight_big
from conftest import SMALL_CORPUS, output_head, tiny_script_model
from harness import budget, measure, sources
from techniques import auto_micro_batch as micro_batch
from techniques.fused_ce import FUSED_CE_CHUNKS, causal_lm_parts, chunk_mem_const, lm_loss_sum
from techniques.sdpa import use_gpt_neo_sdpa


def test_qlora_holds_4bit_weights_and_trains_only_lora(cache_dir):
    import bitsandbytes as bnb

    model, source = tiny_script_model(lightweight_big, cache_dir)
    tokenizer = source.tokenizer
    four_bit = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(four_bit) == 2 * 6  # 2 layers x (q, k, v, out, c_fc, c_proj)
    assert all(m.weight.quant_type == "nf4" and m.weight.quant_state.nested for m in four_bit)  # double quant
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert len(trainable) == 2 * 6 * 2  # lora_A and lora_B on each projection

    body, head = causal_lm_parts(model)
    ids = torch.randint(0, len(tokenizer), (2, 32))
    lm_loss_sum(body(input_ids=ids).last_hidden_state, head, ids, fused=False).backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad and with_grad <= set(trainable)


def test_lora_autocast_runs_the_adapters_in_bf16_from_fp32_weights(cache_dir):
    """lora_autocast: the adapters' matmuls run in bf16, their weights (and so the optimizer) stay fp32, and the
    gradients match the fp32 adapters' to bf16 precision."""
    ids = torch.randint(0, 1000, (2, 32), generator=torch.Generator().manual_seed(0))
    grads, dtypes = {}, {}
    for extra in (["lora_autocast"], []):
        model, _ = tiny_script_model(lightweight_big, cache_dir, off=extra, seed=0)  # the same adapters both times
        lora_b = next(m for n, m in model.named_modules() if n.endswith("lora_B.default"))
        lora_b.register_forward_hook(lambda m, i, out, key=not extra: dtypes.update({key: out.dtype}))
        model(input_ids=ids, labels=ids).loss.backward()
        trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
        assert all(p.dtype == torch.float32 for p in trainable.values())
        grads[not extra] = torch.cat([p.grad.flatten() for p in trainable.values()])
    assert dtypes == {False: torch.float32, True: torch.bfloat16}
    assert grads[True].abs().sum() > 0
    torch.testing.assert_close(grads[True], grads[False], rtol=0.05, atol=0.02 * grads[False].abs().max().item())


def tiny_gpt_neo(window=8):
    config = sources.tiny_config("EleutherAI/gpt-neo-1.3B", vocab_size=128)
    config.window_size = window
    config.attn_implementation = "eager"
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()


@pytest.mark.parametrize("padded", [False, True])
def test_gpt_neo_sdpa_matches_eager(padded):
    eager = tiny_gpt_neo(window=8)  # T=40 > window: the local layer's window matters
    sdpa = copy.deepcopy(eager)
    assert use_gpt_neo_sdpa(sdpa) == 2
    ids = torch.randint(0, 128, (2, 40))
    mask = torch.ones_like(ids)
    if padded:
        mask[1, 25:] = 0  # right padding in the second row
    out_eager = eager(input_ids=ids, attention_mask=mask, use_cache=False).logits
    out_sdpa = sdpa(input_ids=ids, attention_mask=mask, use_cache=False).logits
    keep = mask.bool()
    torch.testing.assert_close(out_sdpa[keep], out_eager[keep], rtol=1e-5, atol=1e-5)

    # and the gradients agree
    for model, out in ((eager, out_eager), (sdpa, out_sdpa)):
        out[keep].pow(2).mean().backward()
    for (name, p_eager), p_sdpa in zip(eager.named_parameters(), sdpa.parameters()):
        torch.testing.assert_close(p_sdpa.grad, p_eager.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_gpt_neo_sdpa_really_uses_the_window():
    """A token beyond the window must not influence the output of a local layer (and does for a global one)."""
    model = tiny_gpt_neo(window=4)
    use_gpt_neo_sdpa(model)
    local = model.transformer.h[1].attn.attention
    assert local.attention_type == "local"
    x = torch.randn(1, 12, model.config.hidden_size)
    y = local(x)[0]
    x2 = x.clone()
    x2[0, 0] += 1.0  # token 0 is outside the 4-token window of token 11
    y2 = local(x2)[0]
    torch.testing.assert_close(y2[0, 11], y[0, 11])
    assert not torch.allclose(y2[0, 2], y[0, 2])


def test_random_init_round_trips_through_from_pretrained(cache_dir):
    config = sources.tiny_config("facebook/opt-350m", vocab_size=256)
    folder = sources.random_init_checkpoint(config, seed=7, cache_dir=cache_dir)
    assert (folder / "config.json").exists()
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert sources.random_init_checkpoint(config, seed=7, cache_dir=cache_dir) == folder  # saved once, reused
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp
    a = AutoModelForCausalLM.from_pretrained(folder)
    b = AutoModelForCausalLM.from_pretrained(folder)
    assert type(a).__name__ == "OPTForCausalLM" and a.config.num_hidden_layers == 2
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(pa, pb, msg=name)
    other = AutoModelForCausalLM.from_pretrained(sources.random_init_checkpoint(config, seed=8, cache_dir=cache_dir))
    assert not torch.equal(other.lm_head.weight, a.lm_head.weight)


def test_unreachable_hub_falls_back_to_random_init_loudly(tmp_path, cache_dir, capsys, monkeypatch):
    configs = tmp_path / "configs"
    configs.mkdir()
    tiny = sources.tiny_config("facebook/opt-350m", vocab_size=512).to_dict()
    (configs / "nobody--tiny-opt.json").write_text(json.dumps(tiny))
    monkeypatch.setattr(sources, "CONFIGS", configs)
    out = tmp_path / "out"
    summary = before_small.main(["--model", "nobody/tiny-opt", "--init", "pretrained", "--corpus", str(SMALL_CORPUS),
                                 "--seq-len", "64",
                                 "--micro-batch", "4", "--tokens-per-step", "256", "--max-steps", "1",
                                 "--output-dir", str(out), "--cache-dir", str(cache_dir), "--wandb", "off"])
    err = capsys.readouterr().err
    assert "Falling back to --init random" in err and "NOT a pretrained model" in err
    assert summary["init"] == "random"


def test_plain_loss_is_token_mean_cross_entropy():
    hidden = torch.randn(2, 6, 8)
    weight = torch.randn(11, 8)
    labels = torch.randint(0, 11, (2, 6))
    labels[1, 4:] = -100
    total = lm_loss_sum(hidden, output_head(weight), labels, fused=False)
    logits = hidden[:, :-1] @ weight.t()
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, 11), labels[:, 1:].reshape(-1),
                                                 ignore_index=-100, reduction="sum")
    torch.testing.assert_close(total, expected)


def liger_chunk_rows(tokens: int, vocab: int, width: int, const: int) -> int:
    """The rows of each chunk liger's fused loss cuts `tokens` into (fused_linear_cross_entropy_forward: inc_factor =
    ceil(V / (chunk_mem_const x H)), chunk = the next power of 2 of ceil(BT / inc_factor), at most BT)."""
    increase = math.ceil(vocab / (const * width))
    return min(tokens, 1 << (math.ceil(tokens / increase) - 1).bit_length())


@pytest.mark.parametrize("tokens, vocab, width", [(32 * 1023, 151_936, 896), (16 * 1023, 151_936, 1536),
                                                   (32 * 1023, 50_272, 512), (4 * 1023, 50_304, 2048),
                                                   (8 * 1023, 49_152, 960), (300, 50_257, 2048)])
def test_fused_loss_takes_at_most_the_chosen_chunks_and_none_smaller_than_ligers(tokens, vocab, width):
    rows = liger_chunk_rows(tokens, vocab, width, chunk_mem_const(vocab, width))
    assert math.ceil(tokens / rows) <= FUSED_CE_CHUNKS
    assert rows >= liger_chunk_rows(tokens, vocab, width, const=1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="liger's fused kernel runs on CUDA only")
def test_fused_cross_entropy_matches_plain_on_gpu():
    torch.manual_seed(0)
    hidden = torch.randn(4, 128, 256, device="cuda", requires_grad=True)
    weight = torch.randn(5000, 256, device="cuda", requires_grad=True)
    labels = torch.randint(0, 5000, (4, 128), device="cuda")
    labels[0, 100:] = -100
    fused = lm_loss_sum(hidden, output_head(weight), labels, fused=True)
    grads_fused = torch.autograd.grad(fused, (hidden, weight))
    plain = lm_loss_sum(hidden, output_head(weight), labels, fused=False)
    grads_plain = torch.autograd.grad(plain, (hidden, weight))
    torch.testing.assert_close(fused, plain, rtol=1e-4, atol=1e-3)
    for a, b in zip(grads_fused, grads_plain):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)


def padded_copy(weight, rows):
    """`weight` with random rows appended up to `rows`: an output layer padded for aligned matmuls."""
    extra = 5 * torch.randn(rows - weight.shape[0], weight.shape[1], device=weight.device, dtype=weight.dtype)
    return torch.cat([weight.detach(), extra]).requires_grad_()


ON_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="liger's fused kernel runs on CUDA only")


@pytest.mark.parametrize("fused, dtype", [(False, torch.float32), pytest.param(True, torch.float32, marks=ON_CUDA),
                                          pytest.param(True, torch.bfloat16, marks=ON_CUDA)])
def test_padded_output_rows_leave_loss_and_gradients_unchanged(fused, dtype):
    """vocab_size masks the padding rows: the loss and the hidden states' gradient equal the unpadded layer's
    (in bf16 too, where the -1e4 bias itself is bf16)."""
    torch.manual_seed(0)
    device = "cuda" if fused else "cpu"
    hidden = torch.randn(2, 6, 8, device=device, dtype=dtype, requires_grad=True)
    weight = torch.randn(11, 8, device=device, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, 11, (2, 6), device=device)
    labels[1, 4:] = -100
    unpadded = lm_loss_sum(hidden, output_head(weight), labels, fused)
    (grad_unpadded,) = torch.autograd.grad(unpadded, hidden)
    padded_weight = padded_copy(weight, 64)
    padded = lm_loss_sum(hidden, output_head(padded_weight), labels, fused, vocab_size=11)
    grad_padded, grad_weight = torch.autograd.grad(padded, (hidden, padded_weight))
    bf16 = dict(rtol=2e-2, atol=2e-2)  # the two matmuls differ in shape, and so in their bf16 rounding
    torch.testing.assert_close(padded, unpadded, **(bf16 if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-4)))
    torch.testing.assert_close(grad_padded, grad_unpadded,
                               **(bf16 if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-5)))
    assert grad_weight[11:].abs().max() == 0  # the padding takes no part
    unmasked = lm_loss_sum(hidden, output_head(padded_weight), labels, fused)  # the test can tell the difference
    assert unmasked.item() > padded.item() + 1


def test_pad_vocab_pads_the_output_rows_and_keeps_the_loss_and_the_adapter(cache_dir, monkeypatch, tmp_path):
    """lightweight_big's pad_vocab: output rows a multiple of 64, the same loss as without it, and a saved adapter
    without the padded embedding (the tiny model's vocabulary made odd, as GPT-Neo's 50,257)."""
    real_config = sources.tiny_config
    monkeypatch.setattr(sources, "tiny_config", lambda model_id, vocab_size: real_config(model_id, vocab_size + 1))
    losses, rows = {}, {}
    for off in (("pad_vocab",), ()):
        model, source = tiny_script_model(lightweight_big, cache_dir, off=off)
        ids = torch.randint(0, len(source.tokenizer), (2, 32), generator=torch.Generator().manual_seed(0))
        batch = common.causal_lm_collator([{"input_ids": row} for row in ids.tolist()])
        with torch.no_grad():
            losses[off] = model(**batch).loss.item()
        rows[off] = causal_lm_parts(model)[1].weight.shape[0]
    assert rows[()] % 64 == 0 and rows[("pad_vocab",)] == source.config.vocab_size != rows[()]
    assert losses[()] == pytest.approx(losses[("pad_vocab",)], rel=1e-6)
    model.save_pretrained(tmp_path / "adapter")  # the last model built: pad_vocab on
    with safe_open(tmp_path / "adapter" / "adapter_model.safetensors", "pt") as saved:
        assert all("lora_" in name for name in saved.keys())  # the adapters alone, loadable onto the base


@pytest.mark.parametrize("model_id", ["facebook/opt-350m", "EleutherAI/gpt-neo-1.3B"])
def test_flops_per_token_counts_the_real_parameters(model_id):
    config = AutoConfig.for_model(**json.loads(sources.config_file(model_id).read_text()))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    n = sum(p.numel() for name, p in model.named_parameters()
            if "embed_positions" not in name and "wpe" not in name and "bias" not in name
            and "layer_norm" not in name and ".ln_" not in name and "final_layer_norm" not in name)
    layers, d = config.num_hidden_layers, config.hidden_size
    assert measure.flops_per_token(model, config, 1024, frozen_base=False) == 6 * n + 12 * layers * d * 1024
    assert measure.flops_per_token(model, config, 1024, frozen_base=True) == 4 * n + 12 * layers * d * 1024


@pytest.mark.parametrize("model_id", ["facebook/opt-350m", "EleutherAI/gpt-neo-1.3B"])
def test_state_estimate_before_building_is_the_out_of_memory_lines(model_id):
    """The CPU check counts on the meta device what the out-of-memory line counts on the built model."""
    config = sources.tiny_config(model_id, vocab_size=512)
    built = AutoModelForCausalLM.from_config(copy.deepcopy(config), dtype=torch.float32)
    expected = budget.state_memory_estimate_gib(built, "adamw_torch")
    assert budget.state_estimate_before_building_gib(config, frozen_base=False) == expected
    frozen = budget.state_estimate_before_building_gib(config, frozen_base=True)
    assert frozen == {"weights": expected["weights"] / 2, "gradients": 0, "optimizer states": 0}  # bf16, no states


def test_auto_micro_batch_takes_the_largest_that_fits(cache_dir, monkeypatch):
    """The probe halves from the requested size until a trial forward+backward fits in 90% of the budget.

    CUDA's allocator is simulated on the CPU: a trial of more than 4 sequences raises OutOfMemoryError, and a
    trial of 4 reports a peak above 90% of the budget, so 2 is the answer."""
    model, _ = tiny_script_model(lightweight_big, cache_dir)
    tried, peak = [], {"bytes": 0}
    real_loss = lm_loss_sum

    def loss(hidden, head, labels, fused, vocab_size=None):
        tried.append(hidden.shape[0])
        if hidden.shape[0] > 4:
            raise torch.OutOfMemoryError("simulated")
        peak["bytes"] = (0.95 if hidden.shape[0] == 4 else 0.5) * budget.GIB
        return real_loss(hidden, head, labels, fused, vocab_size)

    monkeypatch.setattr("techniques.fused_ce.lm_loss_sum", loss)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: peak["bytes"])
    assert micro_batch.choose_micro_batch(model, largest=16, seq_len=64, budget_gib=1, optim="paged_adamw_8bit",
                                         autocast_dtype=None, device=torch.device("cpu")) == 2
    assert tried == [16, 8, 4, 2]
    assert all(p.grad is None for p in model.parameters())  # the trials leave no gradients behind


def test_qlora_py_adapters_take_qlora_pys_rank_alpha_and_dropout(cache_dir):
    """lightweight_big's qlora_py_adapters: rank 64, alpha 16, dropout 0.05 on the same projections; off, its own."""
    for on, expected in (((), (lightweight_big.LORA_RANK, lightweight_big.LORA_ALPHA, 0.0)),
                         (("qlora_py_adapters",), (64, 16, 0.05))):
        model, _ = tiny_script_model(lightweight_big, cache_dir, on=on)
        config = model.peft_config["default"]
        assert (config.r, config.lora_alpha, config.lora_dropout) == expected
        # peft's "all-linear": every projection of GPT-Neo's blocks, not the output layer
        assert {name.rsplit(".", 1)[-1] for name in config.target_modules} == {
            "q_proj", "k_proj", "v_proj", "out_proj", "c_fc", "c_proj"}


def test_checkpoint_layers_checkpoints_only_the_first_blocks(cache_dir):
    """--checkpoint-layers K: the first K GPT-Neo blocks recompute in backward, the others keep activations."""
    import common
    from conftest import SMALL_CORPUS
    from harness.cli import Switches

    source = sources.resolve_model("tiny", "random", lightweight_big.MODEL, common.load_corpus(SMALL_CORPUS, cache_dir),
                                   cache_dir)
    on = Switches(lightweight_big.TECHNIQUES)
    on.skip_cuda_only("CUDA only")
    for layers, expected in ((None, [True, True]), (1, [True, False]), (0, [False, False])):
        model = lightweight_big.load_model(source.from_pretrained_path(42, cache_dir), on, torch.device("cpu"),
                                           torch.bfloat16, checkpoint_layers=layers)
        assert [b.gradient_checkpointing for b in model.modules() if b.__class__.__name__ == "GPTNeoBlock"] == expected
