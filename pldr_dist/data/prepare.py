"""One call from raw text to a training-ready folder (the demo's first step)."""
from __future__ import annotations

import os
from dataclasses import dataclass

from .manifest import DataError, load_manifest
from .shards import write_shards
from .tokenizer import Tokenizer, train_tokenizer


@dataclass
class Prepared:
    tokenizer: str
    manifest: str


def prepare_corpus(corpus: str, out_dir: str, vocab_size: int, seq_len: int, samples_per_shard: int = 512,
                   valid_fraction: float = 0.02, log=print) -> Prepared:
    """Train a tokenizer on `corpus` (once) and shard it; re-running reuses what is complete."""
    tok_path = os.path.join(out_dir, "tokenizer.model")
    shard_dir = os.path.join(out_dir, "shards")
    if not os.path.isfile(tok_path):
        train_tokenizer(corpus, tok_path, vocab_size, log=log)
    tok = Tokenizer(tok_path)
    try:
        manifest = load_manifest(shard_dir)
        if manifest.tokenizer_fingerprint == tok.fingerprint and manifest.seq_len == seq_len:
            log(f"shards already in {shard_dir}")
            return Prepared(tok_path, manifest.path)
    except DataError:
        pass
    manifest = write_shards(corpus, tok_path, shard_dir, seq_len, samples_per_shard, valid_fraction, log=log)
    return Prepared(tok_path, manifest.path)
