"""Regenerate corpus.json: English prose that ships with every CPython.

Sources (Python Software Foundation License, see README):
  1. pydoc's help topics (`pydoc_data.topics`), the text of `help('topics')`;
  2. docstrings of the standard library's modules, classes and functions,
     read from the source files with `ast` (nothing is imported).

    python scripts/make_corpus.py [--out corpus.json] [--min-chars 300]

The output depends on the Python version that runs it (3.11 made the committed file).
"""
import argparse
import ast
import json
import sys
import sysconfig
from pathlib import Path

from pydoc_data.topics import topics

SKIP_DIRS = {"test", "tests", "idlelib", "lib2to3", "site-packages", "turtledemo", "__pycache__", "ensurepip"}


def docstrings(path: Path, min_chars: int):
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError):
        return
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            text = ast.get_docstring(node)
            if text and len(text) >= min_chars:
                yield text


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "corpus.json"))
    parser.add_argument("--min-chars", type=int, default=300, help="skip docstrings shorter than this")
    args = parser.parse_args(argv)

    records = [{"text": topics[name].strip(), "source": f"pydoc_data.topics:{name}"} for name in sorted(topics)]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    seen = set()
    for path in sorted(stdlib.rglob("*.py")):
        rel = path.relative_to(stdlib)
        if SKIP_DIRS.intersection(rel.parts):
            continue
        for text in docstrings(path, args.min_chars):
            if text not in seen:  # the same docstring is often repeated in subclasses
                seen.add(text)
                records.append({"text": text, "source": f"Lib/{rel.as_posix()}"})
    Path(args.out).write_text(json.dumps(records, ensure_ascii=False, indent=0) + "\n", encoding="utf-8")
    size = Path(args.out).stat().st_size
    print(f"wrote {args.out}: {len(records)} records, {size / 1e6:.2f} MB, Python {sys.version.split()[0]}")


if __name__ == "__main__":
    main()
