"""Corpus loading and tokenization, shared by the four scripts.

The corpus is a JSON list (or JSON Lines) of {"text": ...} records. It is checked record by record while it is
streamed into an Arrow file (datasets' format, memory-mapped), so a corpus of any size is never held as Python
objects. Every 20th record is held out, up to EVAL_TOKENS_MAX tokens. The tokenizer is the model's own, or,
offline, a byte-level BPE trained on (the start of) the corpus. Records are tokenized by a batched map, cached
beside the corpus's Arrow file, then either packed into full blocks (run_clm's group_texts) or padded one record
per row (the tutorial's way); `causal_lm_collator` makes the labels of each batch.
"""
from __future__ import annotations

import codecs
import contextlib
import hashlib
import itertools
import json
import os
import re
import sys
from pathlib import Path

import numpy as np

from harness.cli import InputError

EVAL_BLOCK = 512  # held-out tokens are packed into blocks of this length, the same for every script
EVAL_EVERY_RECORD = 20  # every 20th corpus record is held out (5%), whatever the seed ...
EVAL_TOKENS_MAX = 1024 * EVAL_BLOCK  # ... until they make 1,024 blocks: evaluation stays cheap on any corpus
TOKENIZER_SAMPLE_BYTES = 100 * 2**20  # the corpus-trained tokenizer learns from at most the first 100 MB
PROGRESS_BYTES = 16 * 2**20  # datasets' progress bars for corpora above this size; smaller ones take a second


def load_corpus(path, cache_dir):
    """The corpus's non-blank texts, in order, as a memory-mapped `datasets.Dataset` with one column, "text".

    Each version of the file (path, size, modification time) is checked once, record by record, as it is
    streamed into Arrow under `cache_dir`; InputError names the first problem, before anything else is written.
    """
    import datasets

    return datasets.Dataset.from_file(str(corpus_arrow(Path(path), Path(cache_dir) / "corpora")))


def content_hash(*parts) -> str:
    """A short content hash; parts are JSON-encoded, so ("ab", "c") and ("a", "bc") differ."""
    return hashlib.sha256(json.dumps([str(p) for p in parts]).encode()).hexdigest()[:16]


def corpus_tokenizer(corpus, vocab_size: int, cache_dir: Path):
    """Byte-level BPE trained on the corpus (the offline fallback when the hub's tokenizer is unreachable), cached.

    A large corpus trains it on its first TOKENIZER_SAMPLE_BYTES only, and says so.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    path = Path(cache_dir) / "tokenizers" / f"bpe-{corpus._fingerprint}-{vocab_size}.json"
    if not path.exists():
        if corpus.data.nbytes > TOKENIZER_SAMPLE_BYTES:
            print(f"corpus tokenizer: trained on the first {TOKENIZER_SAMPLE_BYTES // 2**20} MB of the corpus's "
                  f"{corpus.data.nbytes / 2**20:,.0f} MB", file=sys.stderr)
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        tok.train_from_iterator(first_texts(corpus, TOKENIZER_SAMPLE_BYTES), trainer)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # atomic: processes of one launch may race here
        tok.save(str(tmp))
        tmp.replace(path)
    return PreTrainedTokenizerFast(tokenizer_file=str(path), eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def first_texts(corpus, max_bytes: int):
    """The corpus's texts from its start, until `max_bytes` of text (counted in characters) are reached."""
    seen = 0
    for batch in corpus.iter(batch_size=1000):
        for text in batch["text"]:
            if seen >= max_bytes:
                return
            seen += len(text)
            yield text


@contextlib.contextmanager
def progress_bars(shown: bool):
    """datasets' progress bars on or off within the block (off for a small corpus: a refusal stays one line)."""
    import datasets

    was_shown = datasets.is_progress_bar_enabled()
    if was_shown and not shown:
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_shown and not shown:
            datasets.enable_progress_bars()


def tokenized_records(tokenizer, corpus):
    """Each text's token ids (int32) followed by EOS, one row per record; cached by corpus and tokenizer."""
    from datasets import Features, List, Value

    eos = tokenizer.eos_token_id

    def tokenize(batch):
        ids = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
        return {"input_ids": [record + [eos] for record in ids]}

    large = corpus.data.nbytes > PROGRESS_BYTES
    # keyed by the tokenizer's own JSON: datasets' hash of a function that holds a tokenizer can change between runs
    with progress_bars(large):
        return corpus.map(
            tokenize, batched=True, remove_columns=["text"], features=Features({"input_ids": List(Value("int32"))}),
            num_proc=os.cpu_count() if large else None, desc="Tokenizing",
            new_fingerprint=content_hash(corpus._fingerprint, tokenizer.backend_tokenizer.to_str(), eos))


def split_heldout(lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(training, held-out) record indices, from each record's token count: every EVAL_EVERY_RECORD-th record
    (0, 20, 40, ...) is held out until they hold EVAL_TOKENS_MAX tokens, the rest train. The same for every seed."""
    every = np.arange(0, len(lengths), EVAL_EVERY_RECORD)
    held = every[: np.searchsorted(np.cumsum(lengths[every]), EVAL_TOKENS_MAX) + 1]
    is_held = np.zeros(len(lengths), dtype=bool)
    is_held[held] = True
    return np.flatnonzero(~is_held), held


def packed_dataset(records, block: int):
    """run_clm's group_texts as a batched map: every record concatenated, in order, and cut into full `block`-token
    rows; only the remainder < block at the very end is dropped. Cached beside the corpus.

    Each row also has position_ids that restart at 0 at every record and at the row's start (a record cut by a row
    boundary goes on at 0 in the next row): with them, each record attends only to itself (techniques/fused_ce.py); a
    script that drops the column has run_clm's attention across records, positions 0 to block - 1."""
    import pyarrow.compute as pc
    from datasets import Features, List, Value

    left_over = np.empty(0, dtype=np.int32)  # a block runs on into the next batch, so that none is cut short
    left_over_starts = np.empty(0, dtype=bool)  # whether each left-over token starts a record

    def group_texts(batch):
        nonlocal left_over, left_over_starts
        lengths = pc.list_value_length(batch["input_ids"]).to_numpy()
        starts = np.zeros(lengths.sum(), dtype=bool)
        starts[np.cumsum(lengths) - lengths] = True
        ids = np.concatenate([left_over, pc.list_flatten(batch["input_ids"]).to_numpy()])
        starts = np.concatenate([left_over_starts, starts])
        whole = len(ids) // block * block
        left_over, left_over_starts = ids[whole:], starts[whole:]
        return {"input_ids": ids[:whole].reshape(-1, block),
                "position_ids": restarting_positions(starts[:whole].reshape(-1, block))}

    features = Features({"input_ids": List(Value("int32"), length=block),
                         "position_ids": List(Value("int32"), length=block)})
    with progress_bars(records.data.nbytes > PROGRESS_BYTES):
        return records.with_format("arrow").map(  # in one process: the batches come in order
            group_texts, batched=True, remove_columns=["input_ids"], desc=f"Packing {block}-token blocks",
            features=features,
            new_fingerprint=content_hash(records._fingerprint, "packed with positions", block)).with_format("numpy")


def restarting_positions(starts: np.ndarray) -> np.ndarray:
    """Rows x block int32 positions: 0 where `starts` is True and at each row's first column, else one more than the
    column before."""
    starts = starts.copy()
    starts[:, 0] = True
    column = np.arange(starts.shape[1])
    last_start = np.maximum.accumulate(np.where(starts, column, 0), axis=1)
    return (column - last_start).astype(np.int32)


def padded_dataset(records, block: int, pad_id: int):
    """The tutorial's way as a batched map: each record on its own, split into `block`-token pieces, each padded to
    `block` (attention_mask 0 there). No token is dropped. Cached beside the corpus."""
    from datasets import Features, List, Value

    def pad_pieces(batch):
        pieces = [ids[i : i + block] for ids in batch["input_ids"] for i in range(0, len(ids), block)]
        input_ids = np.full((len(pieces), block), pad_id, dtype=np.int32)
        attention_mask = np.zeros((len(pieces), block), dtype=np.int8)
        for row, piece in enumerate(pieces):
            input_ids[row, : len(piece)] = piece
            attention_mask[row, : len(piece)] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    features = Features({"input_ids": List(Value("int32"), length=block),
                         "attention_mask": List(Value("int8"), length=block)})
    with progress_bars(records.data.nbytes > PROGRESS_BYTES):
        return records.with_format("numpy").map(
            pad_pieces, batched=True, remove_columns=["input_ids"], features=features,
            desc=f"Padding to {block} tokens",
            new_fingerprint=content_hash(records._fingerprint, "padded", block, pad_id)).with_format("numpy")


def causal_lm_collator(rows: list[dict], fill_to_rows: int = 0) -> dict:
    """The Trainer's batch: int64 input_ids (and attention_mask, position_ids), labels = the inputs with padding and
    the first token of each packed record (position 0) set to -100.

    By hand because the library's DataCollatorForLanguageModeling sets -100 wherever the id is the pad id, and
    here the pad id is EOS, which ends every real record and is learned. fill_to_rows: a shorter batch (an
    epoch's last) is filled up with copies of its first row whose labels are all -100: every batch has one
    shape, and the filler rows carry no loss, no gradient and no counted token.
    """
    import torch

    real = len(rows)
    rows = rows + rows[:1] * max(0, fill_to_rows - real)
    batch = {name: torch.from_numpy(np.stack([row[name] for row in rows]).astype(np.int64)) for name in rows[0]}
    batch["labels"] = batch["input_ids"].clone()
    if "attention_mask" in batch:
        batch["labels"][batch["attention_mask"] == 0] = -100
    if "position_ids" in batch:  # packed records kept apart: a record's first token is not predicted from the end
        batch["labels"][batch["position_ids"] == 0] = -100  # of the one before, as the padded baseline's rows never do
    batch["labels"][real:] = -100
    return batch


def blocks_in_whole_steps(blocks, processes: int):
    """The held-out blocks, cut to a multiple of the number of processes (at most processes - 1 fewer).

    With several processes each evaluates one block per step (batch 1); where the blocks do not fill the last
    step, accelerate fills it with blocks from the start, and those would count twice in the eval loss.
    """
    return blocks.select(range(len(blocks) // processes * processes))


def training_records_and_heldout_blocks(tokenizer, corpus, seq_len: int, processes: int, corpus_path):
    """(training records, held-out blocks, training tokens): the corpus tokenized, the held-out records packed into
    at most EVAL_TOKENS_MAX tokens of EVAL_BLOCK-token blocks that fill whole evaluation steps. InputError if the
    training tokens or the held-out blocks would be empty."""
    import pyarrow.compute as pc

    records = tokenized_records(tokenizer, corpus)
    lengths = pc.list_value_length(records.data.column("input_ids")).to_numpy()
    train, held = split_heldout(lengths)
    train_tokens = int(lengths[train].sum())
    eval_block = min(EVAL_BLOCK, seq_len)
    key = records._fingerprint  # datasets' name for this tokenization: what is made from it is cached under it
    held_records = records.select(held, keep_in_memory=True, new_fingerprint=content_hash(key, "held", len(held)))
    eval_blocks = packed_dataset(held_records, eval_block)  # the last held-out record may run past the cap
    eval_blocks = eval_blocks.select(range(min(len(eval_blocks), EVAL_TOKENS_MAX // eval_block)))
    eval_blocks = blocks_in_whole_steps(eval_blocks, processes)
    if train_tokens < seq_len or len(eval_blocks) == 0:
        raise InputError(f"corpus {corpus_path}: too short ({train_tokens} training tokens, {len(eval_blocks)} "
                         f"held-out blocks): needs at least one {seq_len}-token training block and {processes} "
                         f"{eval_block}-token held-out block(s), one per process (every {EVAL_EVERY_RECORD}th "
                         f"record is held out)")
    train_records = records.select(train, keep_in_memory=True, new_fingerprint=content_hash(key, "train", len(held)))
    return train_records, eval_blocks, train_tokens


# The corpus reader, by hand: datasets' JSON loader reads a JSON list whole into Python objects, and neither it nor
# pyarrow names the record at fault. A JSON list is decoded one element at a time from a sliding window of the text,
# JSON Lines one line at a time; an InputError names "line N", or "record N (counting from 1, on line L)".
READ_BYTES = 8 * 2**20  # the file is read this much at a time
WRITE_RECORDS = 10_000  # texts per Arrow record batch
WHITESPACE = re.compile(r"[ \t\n\r]*")
DECODER = json.JSONDecoder()
LAYOUT = 1  # bump when what the Arrow file holds changes, so older cached files are not used


def corpus_arrow(path: Path, folder: Path) -> Path:
    """The Arrow file of the corpus's non-blank texts, made once per version of the file (path, size, mtime)."""
    if path.is_dir():
        raise InputError(f"corpus {path}: is a directory, not a file")
    if not path.is_file():
        raise InputError(f"corpus {path}: no such file")
    stat = path.stat()
    key = json.dumps([str(path.resolve()), stat.st_size, stat.st_mtime_ns, LAYOUT])
    arrow = folder / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.arrow"
    if not arrow.exists():
        folder.mkdir(parents=True, exist_ok=True)
        tmp = arrow.with_name(f"{arrow.name}.{os.getpid()}.tmp")  # atomic: processes of one launch may race here
        try:
            write_texts(path, tmp)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        tmp.replace(arrow)
    return arrow


def write_texts(path: Path, arrow: Path) -> None:
    """Check every record of `path` and write its non-blank texts to `arrow`; InputError at the first bad one."""
    from datasets import Features, Value
    from datasets.arrow_writer import ArrowWriter

    records, texts = 0, []
    with ArrowWriter(features=Features({"text": Value("string")}), path=str(arrow)) as writer:
        for where, record in records_of(path):
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise InputError(f"corpus {path}: {where} has no string 'text' field")
            records += 1
            if record["text"].strip():
                texts.append(record["text"])
            if len(texts) == WRITE_RECORDS:
                writer.write_batch({"text": texts})
                texts = []
        if texts:
            writer.write_batch({"text": texts})
        written, _ = writer.finalize()
    if written == 0:
        raise InputError(f"corpus {path}: " + ("every text is empty" if records else "the list is empty"))


def records_of(path: Path):
    """(where, record) for each record of a JSON list (the file starts with '[') or JSON Lines (with '{')."""
    chunks = text_chunks(path)
    start = ""
    for chunk in chunks:  # up to the first character that is not white space
        start += chunk
        if start.strip():
            break
    if not start.strip():
        raise InputError(f"corpus {path}: the file is empty")
    chunks = itertools.chain([start], chunks)
    first = start.lstrip()[0]
    if first == "[":
        yield from json_list_records(path, chunks)
    elif first == "{":
        yield from json_lines_records(path, chunks)
    else:
        raise InputError(f"corpus {path}: not a JSON list or JSON Lines of {{\"text\": ...}} records "
                         f"(its first line starts {start.lstrip().splitlines()[0][:40]!r})")


def text_chunks(path: Path):
    """The file's text, READ_BYTES at a time; InputError at the first byte that is not UTF-8."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        with path.open("rb") as f:
            if f.read(len(codecs.BOM_UTF8)) != codecs.BOM_UTF8:  # a byte-order mark is harmless
                f.seek(0)
            offset = f.tell()
            while True:
                raw = f.read(READ_BYTES)
                pending = len(decoder.getstate()[0])  # bytes of a character cut by the previous read
                try:
                    text = decoder.decode(raw, final=not raw)
                except UnicodeDecodeError as e:
                    raise InputError(f"corpus {path}: not UTF-8 text (byte {offset - pending + e.start})") from None
                if not raw:
                    return
                offset += len(raw)
                yield text
    except OSError as e:
        raise InputError(f"corpus {path}: cannot be read ({e.strerror})") from None


def json_lines_records(path: Path, chunks):
    """("line N", record) for each non-blank line."""
    tail, number = "", 0
    for chunk in itertools.chain(chunks, ["\n"]):  # the newline ends a last line that has none
        lines = (tail + chunk).split("\n")  # not splitlines(): JSON strings may hold U+2028 and the like
        tail = lines.pop()
        for line in lines:
            number += 1
            if line.strip():
                try:
                    yield f"line {number}", json.loads(line)
                except json.JSONDecodeError as e:
                    raise InputError(f"corpus {path}: invalid or truncated JSON Lines, line {number}: {e.msg} "
                                     f"(one {{\"text\": ...}} object per line)") from None


def json_list_records(path: Path, chunks):
    """("record N (counting from 1, on line L)", record) for each element of the top-level list."""
    window = Window(path, chunks)
    window.expect("[")
    number = 0
    if window.next_char() == "]":
        window.pos += 1
    else:
        while True:
            number += 1
            window.next_char()
            line = window.line_at(window.pos)
            yield f"record {number} (counting from 1, on line {line})", window.value()
            separator = window.expect(",]")
            if separator == "]":
                break
    if window.next_char():
        window.fail("Extra data after the list", window.pos)


class Window:
    """The part of a streamed JSON text not parsed yet, `text[pos:]`; `text[counted]` is on line `line`."""

    def __init__(self, path: Path, chunks):
        self.path, self.chunks, self.text, self.pos, self.line, self.counted = path, chunks, "", 0, 1, 0

    def more(self) -> bool:
        """Drop the parsed text and append the next chunk; False at the end of the file."""
        chunk = next(self.chunks, None)
        if chunk is None:
            return False
        self.line_at(self.pos)
        self.text, self.pos, self.counted = self.text[self.pos:] + chunk, 0, 0
        return True

    def next_char(self) -> str:
        """The next character that is not white space ("" at the end of the file), not consumed."""
        while True:
            self.pos = WHITESPACE.match(self.text, self.pos).end()
            if self.pos < len(self.text):
                return self.text[self.pos]
            if not self.more():
                return ""

    def expect(self, allowed: str) -> str:
        char = self.next_char()
        if not char or char not in allowed:
            self.fail(f"Expecting {' or '.join(repr(c) for c in allowed)}", self.pos)
        self.pos += 1
        return char

    def value(self):
        """The JSON value at `pos`, reading on where the window's end cuts it."""
        self.next_char()
        while True:
            try:
                value, self.pos = DECODER.raw_decode(self.text, self.pos)
                return value
            except json.JSONDecodeError as e:
                cut = e.pos >= len(self.text) - 6 or e.msg.startswith("Unterminated string")
                if not (cut and self.more()):
                    self.fail(e.msg, e.pos)

    def line_at(self, pos: int) -> int:
        """The line number at `pos`, counting on from the last position asked (they only grow): linear time."""
        self.line += self.text.count("\n", self.counted, pos)
        self.counted = pos
        return self.line

    def fail(self, message: str, pos: int):
        raise InputError(f"corpus {self.path}: invalid or truncated JSON list, line {self.line_at(pos)}: {message}")
