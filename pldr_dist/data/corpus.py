"""Read raw text corpora lazily: plain text, JSON-lines (`text` field), .gz/.zst, globs.

A *document* is what gets one end-of-sequence token in the shards:
- JSON-lines files (`*.jsonl`, `*.json`, optionally `.gz`/`.zst`): one document per line,
  taken from its `text` field (the RefinedWeb / HF-datasets export layout);
- plain text files: one document per paragraph (lines up to a blank line).
Nothing is ever read whole into memory; every function here is a generator.
"""
from __future__ import annotations

import glob
import gzip
import io
import json
import os
from typing import Iterable, Iterator

from pldr_dist.errors import PLDRError


class CorpusError(PLDRError, ValueError):
    """A corpus file is missing or malformed (the message names the file)."""


def expand_inputs(inputs: str | Iterable[str]) -> list[str]:
    """Expand globs into a sorted, de-duplicated file list (fixed order = reproducible shards)."""
    if isinstance(inputs, str):
        inputs = [inputs]
    files: list[str] = []
    for pattern in inputs:
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not matches:
            raise CorpusError(f"CorpusError: {pattern}: no file matches this pattern (check the path)")
        for path in matches:
            if not os.path.isfile(path):
                raise CorpusError(f"CorpusError: {path}: no such file (check the path)")
            if path not in files:
                files.append(path)
    return files


def open_text(path: str) -> io.TextIOBase:
    """Open a text file for reading, decompressing .gz or .zst on the fly."""
    if path.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    if path.endswith(".zst"):
        import zstandard
        raw = open(path, "rb")
        return io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(raw, closefd=True), encoding="utf-8")
    return open(path, "r", encoding="utf-8")


def _is_jsonl(path: str) -> bool:
    stem = path
    for ext in (".gz", ".zst"):
        if stem.endswith(ext):
            stem = stem[: -len(ext)]
    return stem.endswith((".jsonl", ".json"))


def _jsonl_documents(path: str) -> Iterator[str]:
    with open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                text = json.loads(line)["text"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise CorpusError(f"CorpusError: {path}:{lineno}: not a JSON object with a 'text' field "
                                  f"({type(exc).__name__}); each line must look like {{\"text\": \"...\"}}") from None
            if not isinstance(text, str):
                raise CorpusError(f"CorpusError: {path}:{lineno}: field 'text' is {type(text).__name__}, expected a string")
            yield text


def _paragraph_documents(path: str) -> Iterator[str]:
    with open_text(path) as f:
        lines: list[str] = []
        for line in f:
            if line.strip():
                lines.append(line.rstrip("\n"))
            elif lines:
                yield "\n".join(lines)
                lines = []
        if lines:
            yield "\n".join(lines)


def iter_documents(inputs: str | Iterable[str]) -> Iterator[str]:
    """Yield every document of every input file, in a fixed order."""
    for path in expand_inputs(inputs):
        yield from (_jsonl_documents(path) if _is_jsonl(path) else _paragraph_documents(path))


def iter_sentences(inputs: str | Iterable[str]) -> Iterator[str]:
    """Yield non-empty lines of every document: SentencePiece trains on lines ("sentences")."""
    for doc in iter_documents(inputs):
        for line in doc.split("\n"):
            if line.strip():
                yield line
