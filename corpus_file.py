"""The corpus file, checked record by record as it is streamed into an Arrow file: bounded memory at any size.

By hand because datasets' JSON loader reads a JSON list whole into Python objects, and neither it nor pyarrow
names the record at fault. A JSON list is decoded one element at a time from a sliding window of the text;
JSON Lines one line at a time. Every InputError is one line that names the file and the place: "line N" (1-based)
in JSON Lines, "record N (counting from 1, on line L)" in a JSON list.
"""
from __future__ import annotations

import codecs
import hashlib
import itertools
import json
import os
import re
from pathlib import Path

from harness.cli import InputError

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
