"""Shared pieces of the evaluation tests: a byte tokenizer and a tiny model."""
from __future__ import annotations

import os

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from pldr_dist.model import PLDRModel, preset


class ByteTokenizer:
    """Bytes shifted past the four special ids (pad 0, unk 1, bos 2, eos 3)."""

    eos_id, pad_id = 3, 0

    def encode(self, text: str) -> list[int]:
        return [b + 4 for b in text.encode("utf-8")]

    def decode(self, ids) -> str:
        return bytes(i - 4 for i in ids if 4 <= i < 260).decode("utf-8", errors="replace")


def tiny_model(seed: int = 0, dtype=torch.float64, **overrides) -> PLDRModel:
    torch.manual_seed(seed)
    return PLDRModel(preset("tiny", **overrides)).to(dtype).eval()
