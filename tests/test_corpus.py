"""The data path on datasets' Arrow files: the streamed corpus reader, the tokenization cache, the held-out cap."""
import json
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import common  # noqa: E402
from conftest import SMALL_CORPUS  # noqa: E402
from harness.cli import InputError  # noqa: E402

TRICKY = ["plain", "with \"quotes\", commas, ] and } inside", "a\nnewline and a \\ backslash",
          "caf\u00e9 \u2014 \U0001F600 and a line separator \u2028 in the text", "  ", "x" * 50, "last"]


@pytest.mark.parametrize("read_bytes", [1, 3, 7, 64, 8 * 2**20])
def test_both_forms_give_the_same_texts_whatever_the_chunk_size(read_bytes, tmp_path, monkeypatch):
    """A JSON list (pretty-printed, with a byte-order mark and CRLF line ends) and JSON Lines read the same,
    even where a record, an escape or a multi-byte character is cut by the end of a read."""
    monkeypatch.setattr(common, "READ_BYTES", read_bytes)
    records = [{"text": t, "n": i * 1.5, "tags": [True, None]} for i, t in enumerate(TRICKY)]
    as_list = tmp_path / "list.json"
    as_list.write_bytes(b"\xef\xbb\xbf" + json.dumps(records, indent=2).replace("\n", "\r\n").encode())
    as_lines = tmp_path / "lines.jsonl"
    as_lines.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records) + "\n\n")
    expected = [t for t in TRICKY if t.strip()]  # blank records dropped, order kept
    assert common.load_corpus(as_list, tmp_path / "cache")["text"] == expected
    assert common.load_corpus(as_lines, tmp_path / "cache")["text"] == expected


@pytest.mark.parametrize("contents, message", [
    (b'[{"text": "ok"},\n {"text": "caf\xe9"}]', "not UTF-8 text (byte 31)"),
    (b'[{"text": "ok"}\n {"text": "no comma"}]', "invalid or truncated JSON list, line 2: Expecting ',' or ']'"),
    (b'[{"text": "ok"}] and more', "invalid or truncated JSON list, line 1: Extra data after the list"),
    (b'{"text": "ok"}\n{"text": "cut', "invalid or truncated JSON Lines, line 2: Unterminated string"),
])
def test_errors_name_the_place(contents, message, tmp_path, monkeypatch):
    monkeypatch.setattr(common, "READ_BYTES", 5)
    corpus = tmp_path / "c.json"
    corpus.write_bytes(contents)
    with pytest.raises(InputError, match="^corpus .*c.json: " + re.escape(message)):
        common.load_corpus(corpus, tmp_path / "cache")


def test_a_changed_file_is_checked_again(tmp_path):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"text": "one"}\n')
    assert common.load_corpus(corpus, tmp_path / "cache")["text"] == ["one"]
    corpus.write_text('{"text": "one"}\n{"no": "text"}\n')
    with pytest.raises(InputError, match="line 2 has no string 'text' field"):
        common.load_corpus(corpus, tmp_path / "cache")


def test_a_second_run_does_not_tokenize_again(tmp_path, monkeypatch):
    """The tokenized records, packed and padded rows are datasets cache files, reused as they are."""
    cache = tmp_path / "cache"
    corpus = common.load_corpus(SMALL_CORPUS, cache)
    tokenizer = common.corpus_tokenizer(corpus, 1024, cache)
    calls = []
    tokenize = type(tokenizer).__call__
    monkeypatch.setattr(type(tokenizer), "__call__", lambda self, *a, **kw: calls.append(1) or tokenize(self, *a, **kw))

    def prepare():
        train, held_out, _ = common.training_records_and_heldout_blocks(tokenizer, corpus, 64, 1, SMALL_CORPUS)
        return [common.packed_dataset(train, 64), common.padded_dataset(train, 64, tokenizer.pad_token_id), held_out]

    first = prepare()
    assert calls, "the first run tokenizes"
    files = {f: f.stat().st_mtime_ns for f in (cache / "corpora").iterdir()}
    calls.clear()
    second = prepare()
    assert calls == [], "the second run does not"
    assert {f: f.stat().st_mtime_ns for f in (cache / "corpora").iterdir()} == files  # nothing written again
    for a, b in zip(first, second):
        assert a.cache_files == b.cache_files and a[:]["input_ids"].tolist() == b[:]["input_ids"].tolist()


def test_held_out_blocks_are_capped(tmp_path, monkeypatch):
    """Past EVAL_TOKENS_MAX held-out tokens, every record trains: evaluation stays small on any corpus."""
    cache = tmp_path / "cache"
    corpus = common.load_corpus(SMALL_CORPUS, cache)
    tokenizer = common.corpus_tokenizer(corpus, 1024, cache)
    train, held_out, train_tokens = common.training_records_and_heldout_blocks(tokenizer, corpus, 64, 1, SMALL_CORPUS)
    monkeypatch.setattr(common, "EVAL_TOKENS_MAX", 3 * 64)
    capped_train, capped_held_out, capped_tokens = common.training_records_and_heldout_blocks(
        tokenizer, corpus, 64, 1, SMALL_CORPUS)
    assert len(held_out) > 3 and len(capped_held_out) == 3
    assert capped_held_out[:]["input_ids"].tolist() == held_out[:3]["input_ids"].tolist()  # the same first blocks
    assert len(capped_train) > len(train) and capped_tokens > train_tokens


def test_the_fallback_tokenizer_learns_from_the_start_of_a_large_corpus(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(common, "TOKENIZER_SAMPLE_BYTES", 10_000)
    corpus = common.load_corpus(SMALL_CORPUS, tmp_path / "cache")
    sample = list(common.first_texts(corpus, 10_000))
    assert sample == corpus[: len(sample)]["text"] and len(sample) < len(corpus)
    assert sum(map(len, sample[:-1])) < 10_000 <= sum(map(len, sample))
    common.corpus_tokenizer(corpus, 300, tmp_path / "cache")
    assert "corpus tokenizer: trained on the first" in capsys.readouterr().err
