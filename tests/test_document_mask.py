"""document_mask: a packed block computes for each record what the padded baseline computes for it alone (its own row,
positions from 0, attention to itself only), losses and gradients, fp32 on the CPU; run_clm's packing does not. The
block masks equal torch's create_block_mask's, and are made without reading anything back from the device."""
import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, create_mask

import lightweight_big
import lightweight_small
from conftest import tiny_script_model
from techniques import document_mask as document_attention
from techniques.fused_ce import causal_lm_parts

LENGTHS = [(23, 9, 32), (5, 41, 18)]  # records per packed row of 64 tokens (the tiny models' sequence length)
TOLERANCE = 1e-4  # fp32: losses 3e-6 apart here; run_clm's packing differs by about 4


def positions(row):
    return torch.cat([torch.arange(n) for n in row])


def per_token_losses(model, ids, position_ids=None):
    """Next-token cross-entropy at every position but the last, as the loss forward computes it (B x T-1)."""
    body, head = causal_lm_parts(model)
    mask = None if position_ids is None else document_attention.document_mask(body, position_ids)
    hidden = body(input_ids=ids, attention_mask=mask, position_ids=position_ids).last_hidden_state
    logits = head(hidden[:, :-1]).float()
    return F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")


def alone(model, ids, rows):
    """Each record in its own row, as the padded baseline runs it: its losses, in packed order (the last token of
    each record predicts nothing here)."""
    out = []
    for b, row in enumerate(rows):
        start = 0
        for n in row:
            out.append(per_token_losses(model, ids[b:b + 1, start:start + n])[0])
            start += n
    return out


def within(losses, rows):
    """A packed batch's losses per record, without the prediction of the next record's first token."""
    out = []
    for b, row in enumerate(rows):
        start = 0
        for n in row:
            out.append(losses[b, start:start + n - 1])
            start += n
    return out


def largest_difference(a, b):
    return max((x - y).abs().max().item() for x, y in zip(a, b))


def gradients(model, losses):
    model.zero_grad()
    sum(loss.sum() for loss in losses).backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def tiny_gpt_neo():
    """GPT-Neo of 2 layers (global, local with a 16-token window), fp32, the repo's SDPA port with document masks."""
    from transformers import AutoModelForCausalLM

    from techniques.sdpa import use_gpt_neo_sdpa
    from harness.sources import tiny_config

    torch.manual_seed(0)
    config = tiny_config(lightweight_big.MODEL, 512)
    config.update(dict(embed_dropout=0.0, attention_dropout=0.0, resid_dropout=0.0, initializer_range=0.2,
                       use_cache=False))
    eager = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    model.load_state_dict(eager.state_dict())
    use_gpt_neo_sdpa(model, masks=document_attention.DOCUMENT_ATTENTION)
    return model.eval(), eager.eval()


@pytest.fixture(scope="module")
def opt(cache_dir):
    model, _ = tiny_script_model(lightweight_small, cache_dir)
    # uncompiled (compile is CUDA only): dense masks; a compiled run takes DOCUMENT_ATTENTION's flex block masks
    assert model.config._attn_implementation == document_attention.DENSE_DOCUMENT_ATTENTION
    torch.manual_seed(0)
    with torch.no_grad():  # weights 10x the init's 0.02: attention far from uniform, so that what it sees shows
        for module in model.modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
                module.weight.normal_(0, 0.2)
    return model.eval()  # no dropout: the same function every call


def tiny_decoder(config_class, **extra):
    """A generic transformers decoder of 2 layers (hidden 64, 4 heads, 2 key-value heads), fp32, weights drawn at
    0.2 (attention far from uniform), under DOCUMENT_ATTENTION."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = config_class(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2, use_cache=False, **extra)
    return AutoModelForCausalLM.from_config(config, attn_implementation=document_attention.DOCUMENT_ATTENTION).eval()


@pytest.fixture(scope="module")
def llama():
    from transformers import LlamaConfig

    return tiny_decoder(LlamaConfig)


@pytest.fixture(scope="module")
def mistral():
    """Sliding-window layers (16 tokens, shorter than two of the records): left to transformers' own masks."""
    from transformers import MistralConfig

    return tiny_decoder(MistralConfig, sliding_window=16)


def batch(vocab_size, rows=LENGTHS, seed=0):
    ids = torch.randint(1, vocab_size, (len(rows), sum(rows[0])), generator=torch.Generator().manual_seed(seed))
    return ids, torch.stack([positions(row) for row in rows])


@pytest.mark.parametrize("architecture", ["opt", "llama", "mistral"])
def test_packed_documents_compute_what_each_record_alone_computes(architecture, request):
    model = request.getfixturevalue(architecture)
    ids, pos = batch(model.config.vocab_size)
    reference = alone(model, ids, LENGTHS)
    packed = within(per_token_losses(model, ids, pos), LENGTHS)
    assert largest_difference(packed, reference) < TOLERANCE
    expected, got = gradients(model, reference), gradients(model, packed)
    assert expected.keys() == got.keys()
    scale = max(g.abs().max().item() for g in expected.values())
    assert max((got[n] - expected[n]).abs().max().item() for n in expected) < TOLERANCE * scale


@pytest.mark.parametrize("architecture", ["opt", "llama", "mistral"])
def test_run_clm_packing_does_not(architecture, request):
    model = request.getfixturevalue(architecture)
    ids, pos = batch(model.config.vocab_size)
    with torch.no_grad():
        across = within(per_token_losses(model, ids), LENGTHS)  # no position ids: today's packing
        assert largest_difference(across, alone(model, ids, LENGTHS)) > 100 * TOLERANCE


def test_a_record_is_unchanged_by_the_record_packed_before_it(opt):
    rows = [(7, 30, 27), (19, 18, 27)]  # the last record the same, after others
    ids, pos = batch(opt.config.vocab_size, rows)
    ids[1, 37:] = ids[0, 37:]
    with torch.no_grad():
        last = per_token_losses(opt, ids, pos)[:, 37:]
        assert (last[0] - last[1]).abs().max() < TOLERANCE
        across = per_token_losses(opt, ids)[:, 37:]
        assert (across[0] - across[1]).abs().max() > 100 * TOLERANCE


def test_gpt_neo_local_window_stays_inside_a_document_longer_than_it():
    model, eager = tiny_gpt_neo()
    assert model.config.window_size == 16 and max(max(row) for row in LENGTHS) > 2 * 16
    ids, pos = batch(model.config.vocab_size)
    reference = alone(eager, ids, LENGTHS)  # transformers' own GPT-Neo, each record alone
    packed = within(per_token_losses(model, ids, pos), LENGTHS)
    assert largest_difference(packed, reference) < TOLERANCE
    expected, got = gradients(eager, reference), gradients(model, packed)
    scale = max(g.abs().max().item() for g in expected.values())
    assert max((got[n] - expected[n]).abs().max().item() for n in expected) < TOLERANCE * scale
    with torch.no_grad():
        assert largest_difference(within(per_token_losses(eager, ids), LENGTHS), reference) > 100 * TOLERANCE


@pytest.mark.parametrize("architecture", ["opt", "gpt_neo", "llama"])
def test_flex_block_masks_compute_the_same_forward(architecture, request, monkeypatch):
    """The CUDA path's block masks (flex's forward runs on the CPU too, compiled; its backward does not)."""
    model = tiny_gpt_neo()[0] if architecture == "gpt_neo" else request.getfixturevalue(architecture)
    ids, pos = batch(model.config.vocab_size)
    with torch.no_grad():
        dense = per_token_losses(model, ids, pos)
        monkeypatch.setattr(document_attention, "FLEX_DEVICES", {"cuda", "cpu"})
        flex = per_token_losses(model, ids, pos)
    assert (flex - dense).abs().max() < TOLERANCE


def random_documents(rows: int, length: int, seed: int):
    """rows x length document ids (document_attention's: a running count of position 0) of random layouts: records of
    1 to 600 tokens, short ones as often as long ones, so that blocks hold one document, several, or part of one."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(rows):
        sizes = []
        while sum(sizes) < length:
            longest = 20 if torch.rand((), generator=generator) < 0.5 else 600
            sizes.append(int(torch.randint(1, longest + 1, (), generator=generator)))
        out.append(positions(sizes)[:length])
    return (torch.stack(out) == 0).cumsum(-1)


@pytest.mark.parametrize("window", [None, 16, 200, 256])
@pytest.mark.parametrize("length", [1024, 333, 64])
def test_block_masks_are_those_create_block_mask_makes(length, window):
    """Every tensor of the BlockMask (key blocks and query blocks, partial and full, in the same order) equals what
    torch's create_block_mask makes from the same mask_mod, a row's length a multiple of the block size or not; and
    that mask_mod is the dense masks' function."""
    documents = random_documents(4, length, seed=length + (window or 0))
    documents[0] = 0  # a row of one document: full blocks below the diagonal
    ours = document_attention.block_mask(documents, window)
    theirs = create_block_mask(ours.mask_mod, len(documents), 1, length, length, device="cpu")
    for name in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices",
                 "q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices"):
        assert torch.equal(getattr(ours, name), getattr(theirs, name)), name
    assert (ours.seq_lengths, ours.BLOCK_SIZE) == (theirs.seq_lengths, theirs.BLOCK_SIZE)
    assert torch.equal(create_mask(ours.mask_mod, len(documents), 1, length, length, device="cpu"),
                       document_attention.dense_mask(documents, window))


def test_masks_are_made_without_reading_the_device(opt, llama, monkeypatch):
    """On the meta device a tensor holds no data, so whatever reads one back to the host (.item(), bool(), .tolist(),
    nonzero: a synchronization on a GPU) raises there. The masks are made there, block masks and dense ones;
    transformers' detection of packed documents is not."""
    from transformers.masking_utils import find_packed_sequence_indices

    pos = torch.stack([positions([200, 700, 124]), positions([1024])]).to("meta")
    gpt_neo = tiny_gpt_neo()[0]
    for flex in ({"meta"}, set()):
        monkeypatch.setattr(document_attention, "FLEX_DEVICES", flex)
        for model in opt, llama, gpt_neo:
            body, _ = causal_lm_parts(model)
            monkeypatch.setattr(body.config, "_attn_implementation", document_attention.DOCUMENT_ATTENTION)
            mask = document_attention.document_mask(body, pos)
            assert isinstance(mask, BlockMask if flex else torch.Tensor) and mask.shape == (2, 1, 1024, 1024)
        if flex:
            assert mask.local.kv_indices.device.type == "meta"  # GPT-Neo's local layers'
    monkeypatch.setattr(document_attention, "FLEX_DEVICES", {"meta"})  # DENSE_DOCUMENT_ATTENTION: dense there too
    body, _ = causal_lm_parts(opt)
    monkeypatch.setattr(body.config, "_attn_implementation", document_attention.DENSE_DOCUMENT_ATTENTION)
    assert isinstance(document_attention.document_mask(body, pos), torch.Tensor)
    with pytest.raises(RuntimeError, match="meta"):
        find_packed_sequence_indices(pos)


@pytest.mark.parametrize("script", ["lightweight_small", "lightweight_big"])
def test_off_document_mask_trains_run_clm_packing(script, tmp_path, cache_dir):
    import importlib
    import json

    from conftest import TINY

    summary = importlib.import_module(script).main(
        [*TINY, "--output-dir", str(tmp_path / "out"), "--cache-dir", str(cache_dir), "--max-steps", "2",
         "--off", "document_mask"])
    assert summary["steps"] == 2 and "document_mask" not in summary["techniques"] and "packing" in summary["techniques"]
    assert summary["final_eval_loss"] is not None  # held-out blocks are still evaluated document by document
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["loss"] > 0 for r in rows if "loss" in r)
