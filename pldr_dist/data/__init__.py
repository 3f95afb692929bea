"""Data: SentencePiece tokenizer, webdataset shard writer/verifier, resumable loader."""
from .loader import TokenLoader
from .manifest import DataError, Manifest, load_manifest
from .tokenizer import Tokenizer, train_tokenizer

__all__ = ["TokenLoader", "DataError", "Manifest", "load_manifest", "Tokenizer", "train_tokenizer"]
