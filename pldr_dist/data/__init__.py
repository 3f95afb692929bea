"""Data pipeline: SentencePiece tokenizer, tokenised webdataset shards, a resumable loader.

See docs/data.md. Public entry points:
  Tokenizer, train_tokenizer   (tokenizer.py)   pldr-train-tokenizer
  make_shards                  (shard_writer.py) pldr-make-shards
  Manifest, verify_shards      (manifest.py)    pldr-verify-shards
  TokenLoader                  (loader.py)
  prepare_corpus               (prepare.py)     tokenizer + shards in one call, for the demo
"""
from pldr_dist.data.loader import TokenLoader
from pldr_dist.data.manifest import Manifest, ShardError, verify_shards
from pldr_dist.data.prepare import prepare_corpus
from pldr_dist.data.shard_writer import make_shards
from pldr_dist.data.tokenizer import Tokenizer, TokenizerError, train_tokenizer

__all__ = ["TokenLoader", "Manifest", "ShardError", "verify_shards", "prepare_corpus", "make_shards",
           "Tokenizer", "TokenizerError", "train_tokenizer"]
