"""Documents from plain text, JSON-lines (`text` field) and .gz / .zst files or globs,
streamed one at a time so a corpus never has to fit in memory.

Plain text: one document per block of lines separated by a blank line (a file with no blank
lines is one document per 200 lines, so a corpus like tinyshakespeare still gives many)."""
from __future__ import annotations

import glob
import gzip
import io
import json
import os
from typing import Iterator


def expand(patterns: list[str] | str) -> list[str]:
    if isinstance(patterns, str):
        patterns = [patterns]
    files = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) if any(c in pattern for c in "*?[") else [pattern]
        if not matches:
            raise FileNotFoundError(f"no input files match {pattern!r}")
        for path in matches:
            if not os.path.isfile(path):
                raise FileNotFoundError(f"input file {path!r} not found")
        files += matches
    return files


def open_text(path: str):
    if path.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    if path.endswith(".zst"):
        import zstandard
        return io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(open(path, "rb")), encoding="utf-8")
    return open(path, encoding="utf-8")


def documents(patterns, max_lines: int = 200) -> Iterator[str]:
    for path in expand(patterns):
        base = path[:-3] if path.endswith(".gz") else path[:-4] if path.endswith(".zst") else path
        with open_text(path) as f:
            if base.endswith((".jsonl", ".json")):
                for n, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            text = json.loads(line)["text"]
                        except (ValueError, KeyError, TypeError):
                            raise ValueError(f"{path}:{n}: not a JSON object with a 'text' field") from None
                        yield text
                continue
            block: list[str] = []
            for line in f:
                if line.strip():
                    block.append(line)
                    if len(block) < max_lines:
                        continue
                if block:
                    yield "".join(block).rstrip("\n")
                    block = []
            if block:
                yield "".join(block).rstrip("\n")
