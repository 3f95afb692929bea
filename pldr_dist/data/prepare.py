"""prepare_corpus: raw text -> trained tokenizer + token shards, in one call (used by the demo)."""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

from pldr_dist.data.shard_writer import make_shards
from pldr_dist.data.tokenizer import Tokenizer, train_tokenizer

log = logging.getLogger(__name__)


@dataclass
class Prepared:
    tokenizer: str      # path of the .model file
    manifest: str       # path of shards/manifest.json
    train_shards: int
    valid_shards: int


def prepare_corpus(text_path: str, out_dir: str, vocab_size: int, seq_len: int, samples_per_shard: int = 64,
                   valid_fraction: float = 0.05, num_procs: int = 1, log=log.info) -> Prepared:
    """Train a tokenizer on `text_path` (kept if one with this vocab size exists) and shard the text.

    Writes `out_dir/tokenizer.model` and `out_dir/shards/` (manifest.json + .tar shards).
    Re-running with the same arguments returns the existing output at once. The small default
    shard size gives the bundled corpus enough validation shards for several data-parallel ranks.
    `log`: a callable taking one string (progress lines).
    """
    os.makedirs(out_dir, exist_ok=True)
    model_path = os.path.join(out_dir, "tokenizer.model")
    start = time.perf_counter()
    if os.path.isfile(model_path) and Tokenizer.from_file(model_path).vocab_size == vocab_size:
        log(f"reusing {model_path}")
    else:
        train_tokenizer(text_path, model_path, vocab_size)
        log(f"trained {model_path} ({vocab_size} pieces) in {time.perf_counter() - start:.1f} s")
    m = make_shards(text_path, model_path, os.path.join(out_dir, "shards"), seq_len, samples_per_shard,
                    valid_fraction, num_procs, show_progress=False)
    prepared = Prepared(model_path, m.path, len(m.shards("train")), len(m.shards("valid")))
    log(f"corpus ready in {out_dir} ({time.perf_counter() - start:.1f} s): {prepared.train_shards} train / "
        f"{prepared.valid_shards} valid shards of {samples_per_shard} x {seq_len + 1} tokens")
    return prepared
