"""Corpus loading and tokenization, shared by the four scripts.

The corpus is a JSON list (or JSON Lines) of {"text": ...} records. Every 20th record is held out. The
tokenizer is the model's own, or, offline, a byte-level BPE trained on the corpus. Tokenized records are cached,
then either packed into full blocks (run_clm's group_texts) or padded one record per row (the tutorial's way).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from harness.cli import InputError

EVAL_BLOCK = 512  # held-out tokens are packed into blocks of this length, the same for every script
EVAL_EVERY_RECORD = 20  # every 20th corpus record is held out (5%), whatever the seed


def load_corpus(path) -> list[str]:
    """The `text` of every record of a JSON list (or JSON Lines) file; InputError on anything malformed."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"corpus {path}: is a directory, not a file")
    if not path.is_file():
        raise InputError(f"corpus {path}: no such file")
    try:
        raw = path.read_bytes().decode("utf-8-sig")  # a byte-order mark is harmless
    except UnicodeDecodeError as e:
        raise InputError(f"corpus {path}: not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise InputError(f"corpus {path}: cannot be read ({e.strerror})") from None
    if not raw.strip():
        raise InputError(f"corpus {path}: the file is empty")
    try:
        records = json.loads(raw)
    except json.JSONDecodeError as first_error:
        lines = [(n, line) for n, line in enumerate(raw.splitlines(), 1) if line.strip()]
        if len(lines) < 2 or not lines[0][1].lstrip().startswith("{"):
            raise InputError(f"corpus {path}: invalid or truncated JSON ({first_error})") from None
        records = []  # JSON Lines: one object per non-empty line
        for n, line in lines:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise InputError(f"corpus {path}: invalid JSON Lines, line {n}: {e.msg}") from None
    if not isinstance(records, list):
        raise InputError(f"corpus {path}: the top level must be a list of {{\"text\": ...}} objects, not {type(records).__name__}")
    for i, record in enumerate(records):
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise InputError(f"corpus {path}: record {i} has no string 'text' field")
    texts = [r["text"] for r in records]
    if not any(t.strip() for t in texts):
        raise InputError(f"corpus {path}: every text is empty")
    return [t for t in texts if t.strip()]


def split_heldout(records: list) -> tuple[list, list]:
    """Every EVAL_EVERY_RECORD-th record is held out: the same split for every script and seed."""
    train = [r for i, r in enumerate(records) if i % EVAL_EVERY_RECORD != 0]
    held = [r for i, r in enumerate(records) if i % EVAL_EVERY_RECORD == 0]
    return train, held


def content_hash(*parts) -> str:
    """A short content hash; parts are JSON-encoded, so ("ab", "c") and ("a", "bc") differ."""
    return hashlib.sha256(json.dumps([str(p) for p in parts]).encode()).hexdigest()[:16]


def corpus_tokenizer(texts: list[str], vocab_size: int, cache_dir: Path):
    """Byte-level BPE trained on the corpus (the offline fallback when the hub's tokenizer is unreachable), cached."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    path = Path(cache_dir) / "tokenizers" / f"bpe-{content_hash(*texts)}-{vocab_size}.json"
    if not path.exists():
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        tok.train_from_iterator(texts, trainer)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # atomic: processes of one launch may race here
        tok.save(str(tmp))
        tmp.replace(path)
    return PreTrainedTokenizerFast(tokenizer_file=str(path), eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def tokenize_records(tokenizer, texts: list[str], cache_dir: Path) -> list[np.ndarray]:
    """Token ids of each record followed by EOS; cached on disk by corpus and tokenizer, so it happens once."""
    key = content_hash(tokenizer.backend_tokenizer.to_str(), *texts)
    path = Path(cache_dir) / "tokenized" / f"{key}.npz"
    if path.exists():
        with np.load(path) as f:
            return np.split(f["ids"], f["ends"][:-1])
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    records = [np.asarray(r + [tokenizer.eos_token_id], dtype=np.int32) for r in ids]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{key}.{os.getpid()}.tmp.npz")  # atomic, as above
    np.savez(tmp, ids=np.concatenate(records), ends=np.cumsum([len(r) for r in records]))
    tmp.replace(path)
    return records


def pack(records: list[np.ndarray], block: int) -> np.ndarray:
    """run_clm's group_texts: concatenate every record and cut full blocks (the remainder < block is dropped)."""
    ids = np.concatenate(records)
    n = len(ids) // block
    return ids[: n * block].reshape(n, block)


def pad_pieces(records: list[np.ndarray], block: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """The tutorial's way: each record on its own, split into `block`-token pieces, each padded to `block`.

    Returns (input_ids, attention_mask); no token is dropped.
    """
    pieces = [r[i : i + block] for r in records for i in range(0, len(r), block)]
    ids = np.full((len(pieces), block), pad_id, dtype=np.int32)
    mask = np.zeros((len(pieces), block), dtype=np.int32)
    for row, piece in enumerate(pieces):
        ids[row, : len(piece)] = piece
        mask[row, : len(piece)] = 1
    return ids, mask


def blocks_in_whole_steps(blocks: np.ndarray, processes: int) -> np.ndarray:
    """The held-out blocks, cut to a multiple of the number of processes (at most processes - 1 fewer).

    With several processes each evaluates one block per step (batch 1); where the blocks do not fill the last
    step, accelerate fills it with blocks from the start, and those would count twice in the eval loss.
    """
    return blocks[: len(blocks) // processes * processes]


def training_records_and_heldout_blocks(tokenizer, texts, seq_len: int, processes: int, cache_dir, corpus):
    """(training records, held-out blocks): the corpus tokenized, every 20th record held out and packed into
    EVAL_BLOCK-token blocks that fill whole evaluation steps. InputError if either would be empty."""
    train_records, held_records = split_heldout(tokenize_records(tokenizer, texts, cache_dir))
    eval_block = min(EVAL_BLOCK, seq_len)
    train_tokens = sum(len(r) for r in train_records)
    eval_ids = blocks_in_whole_steps(pack(held_records, eval_block), processes)
    if train_tokens < seq_len or len(eval_ids) == 0:
        raise InputError(f"corpus {corpus}: too short ({train_tokens} training tokens, {len(eval_ids)} held-out "
                         f"blocks): needs at least one {seq_len}-token training block and {processes} "
                         f"{eval_block}-token held-out block(s), one per process (every {EVAL_EVERY_RECORD}th "
                         f"record is held out)")
    return train_records, eval_ids


def make_dataset(input_ids: np.ndarray, attention_mask: np.ndarray | None = None):
    """A `datasets.Dataset` of causal-LM rows; labels are the inputs with padding set to -100 (ignored)."""
    import datasets

    labels = input_ids.astype(np.int64).copy()
    columns = {"input_ids": input_ids.astype(np.int64)}
    if attention_mask is not None:
        labels[attention_mask == 0] = -100
        columns["attention_mask"] = attention_mask.astype(np.int64)
    columns["labels"] = labels
    return datasets.Dataset.from_dict(columns).with_format("torch")
