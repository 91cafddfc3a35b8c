"""The data path as pure functions: packing, padding, labels, the loss and the held-out split. No training."""
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import before_small  # noqa: E402
import common  # noqa: E402
import lightweight_small  # noqa: E402
from conftest import output_head  # noqa: E402
from techniques.fused_ce import causal_lm_parts, lm_loss_sum  # noqa: E402
from harness.sources import tiny_config  # noqa: E402

PAD = 0  # the tokenizer's pad id is its EOS id, which also ends every real record


def random_records(seed, n=40, low=1, high=3000, max_len=300, pad_at_end=False):
    """int32 token arrays of varied length (some empty, some longer than a block), ids in [low, high)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, max_len, n)
    lengths[:3] = [1, 0, max_len * 2]  # a one-token record, an empty one, a long one
    records = [rng.integers(low, high, size=length).astype(np.int32) for length in lengths]
    if pad_at_end:  # like tokenized_records: each record ends with EOS == pad id
        records = [np.append(r, np.int32(PAD)).astype(np.int32) for r in records]
    return records


def as_dataset(records):
    """Token records as the data path holds them: a Dataset with an int32 `input_ids` list per row."""
    import datasets

    features = datasets.Features({"input_ids": datasets.List(datasets.Value("int32"))})
    return datasets.Dataset.from_dict({"input_ids": [r.tolist() for r in records]}, features=features)


def pack(records, block):
    return common.packed_dataset(as_dataset(records), block)[:]["input_ids"].reshape(-1, block)


def pad_pieces(records, block, pad_id):
    rows = common.padded_dataset(as_dataset(records), block, pad_id)[:]
    return rows["input_ids"].reshape(-1, block), rows["attention_mask"].reshape(-1, block)


# ----------------------------------------------------------------------------- packed_dataset


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("block", [1, 7, 64, 512])
def test_pack_keeps_every_token_in_order(seed, block):
    records = random_records(seed)
    everything = np.concatenate(records)
    blocks = pack(records, block)
    n = len(everything) // block
    assert blocks.shape == (n, block)
    np.testing.assert_array_equal(blocks.reshape(-1), everything[: n * block])
    assert 0 <= len(everything) - blocks.size < block  # only the remainder, shorter than a block, is dropped
    assert PAD not in blocks  # nothing is padded: no id appears that the input did not have
    assert set(np.unique(blocks)) <= set(np.unique(everything))


def test_pack_runs_blocks_across_map_batches():
    """Blocks are cut from the whole stream, not per batch of 1,000 records (run_clm drops a remainder per batch)."""
    records = [np.full(3, i % 50 + 1, dtype=np.int32) for i in range(2500)]
    np.testing.assert_array_equal(pack(records, 8).reshape(-1), np.concatenate(records)[: 7500 // 8 * 8])


def test_pack_shorter_than_a_block_gives_no_block():
    assert len(common.packed_dataset(as_dataset([np.arange(1, 10, dtype=np.int32), np.arange(1, 5, dtype=np.int32)]),
                                     14)) == 0


def test_pack_exact_multiple_drops_nothing():
    records = [np.arange(1, 7, dtype=np.int32), np.arange(7, 13, dtype=np.int32)]
    np.testing.assert_array_equal(pack(records, 4), np.arange(1, 13).reshape(3, 4))


def test_rows_are_stored_as_int32():
    records = as_dataset(random_records(1, pad_at_end=True))
    assert records.features["input_ids"].feature.dtype == "int32"
    assert common.packed_dataset(records, 16).features["input_ids"].feature.dtype == "int32"
    padded = common.padded_dataset(records, 16, PAD).features
    assert (padded["input_ids"].feature.dtype, padded["attention_mask"].feature.dtype) == ("int32", "int8")


# ----------------------------------------------------------------------------- padded_dataset


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("block", [1, 16, 64, 512])
def test_pad_pieces_drops_nothing(seed, block):
    records = random_records(seed, pad_at_end=True)
    ids, mask = pad_pieces(records, block, PAD)
    assert ids.shape == mask.shape and ids.shape[1] == block
    assert set(np.unique(mask)) <= {0, 1}
    # un-padding by the mask (not by the pad id: real records end with it) gives back every record, in order
    np.testing.assert_array_equal(ids[mask == 1], np.concatenate(records))
    # padding is the pad id
    assert (ids[mask == 0] == PAD).all()
    # one row per block-sized piece of each record
    assert len(ids) == sum(-(-len(r) // block) for r in records)


@pytest.mark.parametrize("block", [16, 64])
def test_pad_pieces_real_tokens_are_a_prefix(block):
    ids, mask = pad_pieces(random_records(5, pad_at_end=True), block, PAD)
    lengths = mask.sum(axis=1)
    assert (lengths >= 1).all()  # no all-padding row
    expected = (np.arange(block)[None, :] < lengths[:, None]).astype(mask.dtype)
    np.testing.assert_array_equal(mask, expected)  # every row is 1...1 0...0


def test_pad_pieces_splits_a_long_record():
    long = np.arange(1, 2 * 64 + 11, dtype=np.int32)  # 138 tokens: 64 + 64 + 10
    short = np.array([7, 8, PAD], dtype=np.int32)
    ids, mask = pad_pieces([long, short], 64, PAD)
    assert ids.shape == (4, 64)
    assert mask.sum(axis=1).tolist() == [64, 64, 10, 3]
    np.testing.assert_array_equal(ids[0], long[:64])
    np.testing.assert_array_equal(ids[1], long[64:128])
    np.testing.assert_array_equal(ids[2, :10], long[128:])
    np.testing.assert_array_equal(ids[3, :3], short)


# ----------------------------------------------------------------------------- causal_lm_collator


def test_collator_labels_ignore_padding_only():
    rows = common.padded_dataset(as_dataset(random_records(7, n=12, max_len=40, pad_at_end=True)), 32, PAD)
    ids, mask = rows[:]["input_ids"], rows[:]["attention_mask"]
    assert (mask == 0).any() and ((ids == PAD) & (mask == 1)).any()  # padding, and real tokens equal to the pad id
    batch = common.causal_lm_collator([rows[i] for i in range(len(rows))])
    assert all(t.dtype == torch.int64 for t in batch.values())
    labels = batch["labels"].numpy()
    np.testing.assert_array_equal(batch["input_ids"].numpy(), ids)
    np.testing.assert_array_equal(batch["attention_mask"].numpy(), mask)
    assert ((labels == -100) == (mask == 0)).all()  # -100 exactly where the mask is 0 ...
    np.testing.assert_array_equal(labels[mask == 1], ids[mask == 1])  # ... the input ids elsewhere (EOS included)


def test_packed_labels_leave_out_each_records_first_token_only():
    rows = common.packed_dataset(as_dataset(random_records(8)), 64)
    assert "attention_mask" not in rows.column_names and "labels" not in rows.column_names  # labels: not stored
    batch = common.causal_lm_collator(rows.__getitems__([0, 2, 1]))  # as the Trainer's DataLoader fetches
    assert set(batch) == {"input_ids", "position_ids", "labels"}  # position ids: each record attends to itself
    ids, starts = rows[:]["input_ids"][[0, 2, 1]], rows[:]["position_ids"][[0, 2, 1]] == 0
    labels = batch["labels"].numpy()
    assert starts[:, 1:].any() and ((labels == -100) == starts).all()  # -100 exactly where a record starts ...
    np.testing.assert_array_equal(labels[~starts], ids[~starts])  # ... the input ids elsewhere
    assert batch["labels"].dtype == torch.int64


def test_packed_labels_across_records_train_on_every_token():
    """--off document_mask (the column dropped): run_clm's packing, every token a target."""
    rows = common.packed_dataset(as_dataset(random_records(8)), 64).remove_columns("position_ids")
    batch = common.causal_lm_collator(rows.__getitems__([0, 2, 1]))
    np.testing.assert_array_equal(batch["labels"].numpy(), rows[:]["input_ids"][[0, 2, 1]])


@pytest.mark.parametrize("padded", [False, True])
def test_collator_fills_a_short_batch_with_rows_that_carry_no_loss(padded):
    """fill_to_rows (one batch shape for compiled layers): the filled batch gives the same loss and gradients."""
    records = as_dataset(random_records(9, n=12, max_len=40))
    rows = common.padded_dataset(records, 32, PAD) if padded else common.packed_dataset(records, 32)
    three = rows.__getitems__([0, 1, 2])
    plain, filled = common.causal_lm_collator(three), common.causal_lm_collator(three, fill_to_rows=8)
    assert filled["input_ids"].shape == (8, 32) and (filled["labels"][3:] == -100).all()
    for name in plain:
        torch.testing.assert_close(filled[name][:3], plain[name])
    assert common.causal_lm_collator(three, fill_to_rows=2)["input_ids"].shape == (3, 32)  # never cut

    torch.manual_seed(0)
    embedding = torch.nn.Embedding(3000, 8)  # random_records: ids below 3000
    head = output_head(embedding.weight)
    losses, grads = [], []
    for batch in (plain, filled):
        embedding.zero_grad()
        loss = lm_loss_sum(embedding(batch["input_ids"]), head, batch["labels"], fused=False)
        loss.backward()
        losses.append(loss)
        grads.append(embedding.weight.grad.clone())
    torch.testing.assert_close(losses[1], losses[0])
    torch.testing.assert_close(grads[1], grads[0])


# ----------------------------------------------------------------------------- the loss


def padded_batch(seed, vocab=50, block=12, dim=8):
    """Hidden states, output embedding and labels of a padded batch (rows of 12, 9, 5 and 1 real tokens)."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(4, block, dim, generator=g)
    weight = torch.randn(vocab, dim, generator=g)
    ids = torch.randint(1, vocab, (4, block), generator=g)
    mask = (torch.arange(block)[None, :] < torch.tensor([12, 9, 5, 1])[:, None]).long()
    labels = ids.masked_fill(mask == 0, -100)
    return hidden, weight, ids, mask, labels


def hand_loss(hidden, weight, labels):
    """Sum over every (row, t) whose next label is kept of -log softmax(hidden[t] W^T)[labels[t+1]]."""
    total = torch.zeros((), dtype=torch.float64)
    count = 0
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1] - 1):
            target = int(labels[b, t + 1])
            if target == -100:
                continue
            logits = (hidden[b, t] @ weight.t()).double()
            total = total + F.cross_entropy(logits[None], torch.tensor([target]), reduction="sum")
            count += 1
    return total, count


@pytest.mark.parametrize("seed", range(3))
def test_loss_is_the_sum_over_kept_next_tokens(seed):
    hidden, weight, _, mask, labels = padded_batch(seed)
    expected, count = hand_loss(hidden, weight, labels)
    assert count == int(mask[:, 1:].sum()) == 11 + 8 + 4 + 0  # the first token of a row is never a target
    loss = lm_loss_sum(hidden, output_head(weight), labels, fused=False)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("seed", range(3))
def test_loss_ignores_positions_whose_next_label_is_padding(seed):
    hidden, weight, _, mask, labels = padded_batch(seed)
    before = lm_loss_sum(hidden, output_head(weight), labels, fused=False)
    ignored = torch.ones_like(mask, dtype=torch.bool)  # hidden[t] predicts labels[t+1]: unused where that is -100
    ignored[:, :-1] = labels[:, 1:] == -100  # the last position predicts nothing
    assert ignored.any() and not ignored.all()
    changed = hidden.clone()
    changed[ignored] = torch.randn(int(ignored.sum()), hidden.shape[-1]) * 100
    after = lm_loss_sum(changed, output_head(weight), labels, fused=False)
    assert after.item() == pytest.approx(before.item(), rel=1e-6)
    # and a kept position does count: the test can tell
    changed[~ignored] += 1.0
    assert lm_loss_sum(changed, output_head(weight), labels, fused=False).item() != pytest.approx(before.item(), rel=1e-3)


def test_padded_model_loss_ignores_the_pad_tokens():
    """Through a tiny OPT: the ids written at padded positions do not change the loss of a padded batch."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = tiny_config(before_small.MODEL, vocab_size=50)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    body, head = causal_lm_parts(model)
    _, _, ids, mask, labels = padded_batch(1)

    def loss(input_ids):
        with torch.no_grad():
            hidden = body(input_ids=input_ids, attention_mask=mask).last_hidden_state
            return lm_loss_sum(hidden, head, labels, fused=False).item()

    other = ids.clone()
    other[mask == 0] = torch.randint(1, 50, (int((mask == 0).sum()),))
    assert (other != ids).any()
    base = loss(ids)
    assert loss(other) == pytest.approx(base, rel=1e-6, abs=1e-6)
    # a real token does matter (random init: a small but clear change), so the comparison above can fail
    real = ids.clone()
    real[0, 3] = (real[0, 3] % 49) + 1
    assert abs(loss(real) - base) > 1e-4


# ----------------------------------------------------------------------------- held-out split


@pytest.mark.parametrize("n", [0, 1, 19, 20, 21, 100, 1234])
def test_split_heldout_every_20th_record(n):
    train, held = common.split_heldout(np.full(n, 100))
    assert common.EVAL_EVERY_RECORD == 20
    assert held.tolist() == list(range(0, n, 20))  # indices 0, 20, 40, ...
    assert train.tolist() == [i for i in range(n) if i % 20]  # the rest, in order


def test_split_heldout_is_capped():
    """Held-out records stop once they hold EVAL_TOKENS_MAX tokens; every later record trains."""
    lengths = np.random.default_rng(0).integers(1, 1000, 50_000)
    train, held = common.split_heldout(lengths)
    assert held.tolist() == list(range(0, 20 * len(held), 20))
    assert lengths[held[:-1]].sum() < common.EVAL_TOKENS_MAX <= lengths[held].sum()
    assert sorted(np.concatenate([train, held]).tolist()) == list(range(len(lengths)))  # a partition
    assert train[-1] == len(lengths) - 1 and 20 * len(held) in train


def test_split_heldout_depends_on_position_only():
    lengths = np.arange(1, 62)
    np.random.seed(1)
    torch.manual_seed(1)
    first = common.split_heldout(lengths)
    np.random.seed(2)
    torch.manual_seed(2)
    second = common.split_heldout(lengths[::-1])  # other lengths, other seed: the same positions held out
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)
    assert first[1].tolist() == [0, 20, 40, 60]


def test_held_out_blocks_are_the_same_for_both_scripts_of_a_pair():
    before, light = before_small.SIZES["seq_len"], lightweight_small.SIZES["seq_len"]
    assert (before, light) == (512, 1024)
    assert common.EVAL_BLOCK == 512
    eval_blocks = {min(common.EVAL_BLOCK, seq_len) for seq_len in (before, light)}
    assert eval_blocks == {512}
    records = random_records(9, n=200)
    _, held = common.split_heldout(np.array([len(r) for r in records]))
    blocks = [pack([records[i] for i in held], min(common.EVAL_BLOCK, seq_len)) for seq_len in (before, light)]
    assert len(blocks[0]) > 0
    np.testing.assert_array_equal(blocks[0], blocks[1])
