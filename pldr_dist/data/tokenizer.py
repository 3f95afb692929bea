"""SentencePiece tokenizer with the paper's settings (spec §8), and loading of existing models
(the paper's own RefinedWeb tokenizer included)."""
from __future__ import annotations

import hashlib
import os
import time

import sentencepiece as spm

from .corpus import documents

SPECIAL = {"pad": (0, "[PAD]"), "unk": (1, "[UNK]"), "bos": (2, "[START]"), "eos": (3, "[END]")}


class Tokenizer:
    def __init__(self, path: str):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"tokenizer model {path!r} not found (train one with pldr-train-tokenizer)")
        self.path = path
        with open(path, "rb") as f:
            self.proto = f.read()
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.LoadFromSerializedProto(self.proto)
        except Exception:  # sentencepiece raises a bare RuntimeError/OSError on junk
            raise ValueError(f"{path} is not a SentencePiece model") from None
        self.fingerprint = hashlib.sha256(self.proto).hexdigest()[:16]

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    pad_id = property(lambda self: self.sp.pad_id())
    eos_id = property(lambda self: self.sp.eos_id())
    bos_id = property(lambda self: self.sp.bos_id())

    def encode(self, text: str, add_eos: bool = False) -> list[int]:
        ids = self.sp.encode(text)
        return ids + [self.eos_id] if add_eos else ids

    def decode(self, ids) -> str:
        return self.sp.decode([int(i) for i in ids if int(i) >= 0])

    def check_model(self, cfg) -> None:
        """The model's special ids and vocabulary must agree with the tokenizer's."""
        for name in ("pad_id", "eos_id"):
            if getattr(self, name) != getattr(cfg, name):
                raise ValueError(f"tokenizer {self.path} has {name}={getattr(self, name)} but the model config has "
                                 f"{getattr(cfg, name)} (use a tokenizer trained with pldr-train-tokenizer)")
        if self.vocab_size > cfg.vocab_size:
            raise ValueError(f"tokenizer {self.path} has {self.vocab_size} pieces, more than model.vocab_size="
                             f"{cfg.vocab_size}")


def train_tokenizer(inputs, out_model: str, vocab_size: int, max_sentences: int = 2_000_000,
                    log=print) -> Tokenizer:
    """Unigram model: nmt_nfkc, byte fallback, split digits, [PAD]=0 [UNK]=1 [START]=2 [END]=3."""
    t0 = time.time()
    prefix = out_model[:-len(".model")] if out_model.endswith(".model") else out_model
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    tmp_prefix = f"{prefix}.tmp{os.getpid()}"
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(documents(inputs)), model_prefix=tmp_prefix, vocab_size=vocab_size,
        model_type="unigram", normalization_rule_name="nmt_nfkc", byte_fallback=True, split_digits=True,
        pad_id=0, unk_id=1, bos_id=2, eos_id=3, pad_piece="[PAD]", unk_piece="[UNK]", bos_piece="[START]",
        eos_piece="[END]", input_sentence_size=max_sentences, shuffle_input_sentence=True,
        max_sentence_length=1 << 16, train_extremely_large_corpus=False, minloglevel=2,
        num_threads=os.cpu_count() or 1)
    os.replace(tmp_prefix + ".model", prefix + ".model")
    os.replace(tmp_prefix + ".vocab", prefix + ".vocab")
    tok = Tokenizer(prefix + ".model")
    log(f"trained a {tok.vocab_size}-piece unigram tokenizer in {time.time() - t0:.1f} s -> {prefix}.model "
        f"(fingerprint {tok.fingerprint})")
    return tok
