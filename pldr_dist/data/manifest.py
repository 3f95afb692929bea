"""The shard manifest: what the shard writer produced, and what a run checks before training."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

FORMAT = "pldr-shards-v1"


class DataError(ValueError):
    """Bad or mismatched training data; the message names the file and the fix."""


@dataclass
class Manifest:
    path: str
    seq_len: int
    dtype: str
    tokenizer_fingerprint: str
    vocab_size: int
    splits: dict = field(default_factory=dict)   # split -> [{"name", "samples", "tokens", "sha256"}]
    extra: dict = field(default_factory=dict)

    @property
    def root(self) -> str:
        return os.path.dirname(os.path.abspath(self.path))

    def shards(self, split: str) -> list[dict]:
        if split not in self.splits or not self.splits[split]:
            raise DataError(f"{self.path} has no '{split}' shards (re-run pldr-make-shards with a "
                            f"{'--valid-fraction > 0' if split == 'valid' else 'larger corpus'})")
        return self.splits[split]

    def url(self, shard: dict) -> str:
        name = shard["name"]
        return name if ("://" in name or name.startswith("pipe:") or os.path.isabs(name)) else os.path.join(self.root, name)

    def to_json(self) -> str:
        return json.dumps({"format": FORMAT, "seq_len": self.seq_len, "dtype": self.dtype,
                           "tokenizer": {"fingerprint": self.tokenizer_fingerprint, "vocab_size": self.vocab_size},
                           "splits": self.splits, **self.extra}, indent=1)


def load_manifest(path: str) -> Manifest:
    if os.path.isdir(path):
        path = os.path.join(path, "manifest.json")
    if not os.path.isfile(path):
        raise DataError(f"shard manifest {path!r} not found (run pldr-make-shards, or point data.shards at its manifest.json)")
    try:
        with open(path) as f:
            raw = json.load(f)
        if raw.get("format") != FORMAT:
            raise KeyError("format")
        tok = raw["tokenizer"]
        extra = {k: v for k, v in raw.items() if k not in ("format", "seq_len", "dtype", "tokenizer", "splits")}
        return Manifest(path, int(raw["seq_len"]), raw["dtype"], tok["fingerprint"], int(tok["vocab_size"]),
                        raw["splits"], extra)
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"{path} is not a pldr_dist shard manifest ({type(e).__name__}: {e}); re-run pldr-make-shards") from None


def check_against_run(manifest: Manifest, seq_len: int | None = None, fingerprint: str | None = None) -> None:
    if seq_len is not None and manifest.seq_len != seq_len:
        raise DataError(f"{manifest.path}: shards have seq_len={manifest.seq_len} but the run expects {seq_len} "
                        f"(re-shard with --seq-len {seq_len})")
    if fingerprint and manifest.tokenizer_fingerprint != fingerprint:
        raise DataError(f"{manifest.path}: shards were tokenised with tokenizer {manifest.tokenizer_fingerprint} but the "
                        f"run uses {fingerprint} (re-shard with the run's tokenizer)")
