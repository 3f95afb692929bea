"""Prompt encoding for inference, on top of the data pipeline's SentencePiece tokenizer.

An empty prompt encodes to the single end-of-sequence token, as the reference does
(add_eos on ""), so it is the same source as the G-cache artifact's `eos`.
"""
from __future__ import annotations

from pathlib import Path

from ..data.tokenizer import Tokenizer, TokenizerError


class PromptTokenizer:
    def __init__(self, path):
        self.tok = Tokenizer.from_file(str(path))
        self.eos_id = self.tok.eos_id
        self.vocab_size = self.tok.vocab_size

    def encode(self, text: str) -> list:
        ids = self.tok.encode(text)
        return ids if ids else [self.eos_id]

    def decode(self, ids) -> str:
        return self.tok.decode(list(ids))

    def id_to_piece(self, i: int) -> str:
        return self.tok.id_to_piece(i)


def load_tokenizer(path) -> PromptTokenizer:
    if path is None or not Path(path).is_file():
        raise TokenizerError(f"{path}: no tokenizer.model; pass --tokenizer FILE.model or give --token-ids prompts")
    return PromptTokenizer(path)
