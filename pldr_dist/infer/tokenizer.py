"""The smallest tokenizer interface inference needs; swap for pldr_dist.data.tokenizer once it lands.

A SentencePiece model file (the consolidated folder's tokenizer.model). An empty prompt
encodes to the single end-of-sequence token, as the reference does (add_eos on "").
"""
from __future__ import annotations

from pathlib import Path


class Tokenizer:
    def __init__(self, path):
        import sentencepiece as spm
        self.sp = spm.SentencePieceProcessor(model_file=str(path))
        self.eos_id = self.sp.eos_id()

    def encode(self, text: str) -> list:
        ids = self.sp.encode(text)
        return ids if ids else [self.eos_id]

    def decode(self, ids) -> str:
        return self.sp.decode(list(ids))


def load_tokenizer(path) -> Tokenizer:
    if path is None or not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no tokenizer.model; pass --tokenizer FILE.model or give --token-ids prompts")
    return Tokenizer(path)
