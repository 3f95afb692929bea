"""prepare_corpus: raw text -> trained tokenizer + token shards, in one call (used by the demo)."""
from __future__ import annotations

import logging
import os
import time

from pldr_dist.data.manifest import Manifest
from pldr_dist.data.shard_writer import make_shards
from pldr_dist.data.tokenizer import Tokenizer, train_tokenizer

log = logging.getLogger(__name__)


def prepare_corpus(text_path: str, out_dir: str, vocab_size: int, seq_len: int, samples_per_shard: int = 64,
                   valid_fraction: float = 0.05, num_procs: int = 1, show_progress: bool = False) -> Manifest:
    """Train a tokenizer on `text_path` (kept if one with this vocab size exists) and shard the text.

    Writes `out_dir/tokenizer.model` and `out_dir/shards/` (manifest.json + .tar shards) and
    returns the Manifest; `manifest.data["tokenizer"]["source"]` is the tokenizer's path.
    Re-running with the same arguments returns the existing output at once. The small default
    shard size gives the bundled corpus enough validation shards for several data-parallel ranks.
    """
    os.makedirs(out_dir, exist_ok=True)
    model_path = os.path.join(out_dir, "tokenizer.model")
    start = time.perf_counter()
    if os.path.isfile(model_path) and Tokenizer.from_file(model_path).vocab_size == vocab_size:
        log.info("reusing %s", model_path)
    else:
        train_tokenizer(text_path, model_path, vocab_size)
        log.info("trained %s (%d pieces) in %.1f s", model_path, vocab_size, time.perf_counter() - start)
    manifest = make_shards(text_path, model_path, os.path.join(out_dir, "shards"), seq_len, samples_per_shard,
                           valid_fraction, num_procs, show_progress)
    log.info("corpus ready in %s (%.1f s): %d train / %d valid shards", out_dir, time.perf_counter() - start,
             len(manifest.shards("train")), len(manifest.shards("valid")))
    return manifest
