"""SentencePiece tokenizer: train one with the paper's settings, or load an existing model.

Settings (spec §8): unigram, nmt_nfkc normalisation, byte fallback, split digits, and the
special pieces pad 0 `[PAD]`, unk 1 `[UNK]`, bos 2 `[START]`, eos 3 `[END]`. The paper's own
model (data/reference/refinedweb-tokenizer-pldrllm-paper.model) loads the same way.
A tokenizer is identified by its *fingerprint*: sha256 of its serialized model proto;
shards record it so a run can refuse shards made with another tokenizer.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import logging
import os
import time
from typing import Iterable

import sentencepiece as spm

from pldr_dist.data.corpus import iter_sentences
from pldr_dist.errors import PLDRError, cli_main

log = logging.getLogger(__name__)

SPECIAL_PIECES = {"pad": (0, "[PAD]"), "unk": (1, "[UNK]"), "bos": (2, "[START]"), "eos": (3, "[END]")}


class TokenizerError(PLDRError, ValueError):
    """The tokenizer does not fit the run (the message says which id and how to fix it)."""


class Tokenizer:
    """A thin, picklable wrapper around a SentencePiece model."""

    def __init__(self, model: str | bytes, source: str = "<bytes>"):
        """`model`: a .model file path, or the serialized model proto itself."""
        if isinstance(model, str):
            tok = self.from_file(model)
            model, source = tok.model_proto, model
        self.model_proto = model
        self.source = self.path = source
        self.sp = spm.SentencePieceProcessor(model_proto=model)
        self.fingerprint = hashlib.sha256(model).hexdigest()

    @classmethod
    def from_file(cls, path: str) -> "Tokenizer":
        if not os.path.isfile(path):
            raise TokenizerError(f"TokenizerError: {path}: no such tokenizer model file (train one with pldr-train-tokenizer)")
        with open(path, "rb") as f:
            proto = f.read()
        try:
            return cls(proto, source=path)
        except RuntimeError as exc:
            raise TokenizerError(f"TokenizerError: {path}: not a SentencePiece model ({exc})") from None

    def __getstate__(self):  # SentencePieceProcessor is rebuilt from the proto in worker processes
        return {"model_proto": self.model_proto, "source": self.source}

    def __setstate__(self, state):
        self.__init__(state["model_proto"], state["source"])

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    @property
    def pad_id(self) -> int:
        return self.sp.pad_id()

    @property
    def unk_id(self) -> int:
        return self.sp.unk_id()

    @property
    def bos_id(self) -> int:
        return self.sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self.sp.eos_id()

    def encode(self, text: str | list[str], add_eos: bool = False) -> list[int] | list[list[int]]:
        return self.sp.encode(text, add_eos=add_eos)

    def decode(self, ids: list[int] | list[list[int]]) -> str | list[str]:
        return self.sp.decode(ids)

    def id_to_piece(self, i: int) -> str:
        return self.sp.id_to_piece(i)

    def check_model(self, cfg) -> None:
        """Refuse a tokenizer that does not fit a PLDRConfig (pad/eos ids, vocabulary size)."""
        self.check_compatible(cfg.pad_id, cfg.eos_id, cfg.vocab_size)

    def check_compatible(self, pad_id: int, eos_id: int, vocab_size: int | None = None, where: str = "model") -> None:
        """Refuse a tokenizer whose pad/eos ids (or vocab size) differ from the model config's."""
        for name, want, have in (("pad_id", pad_id, self.pad_id), ("eos_id", eos_id, self.eos_id)):
            if want != have:
                raise TokenizerError(f"TokenizerError: {self.source}: {name}={have} but {where}.{name}={want} "
                                     f"(set {where}.{name}={have} or use a tokenizer trained with {name}={want})")
        if vocab_size is not None and self.vocab_size > vocab_size:
            raise TokenizerError(f"TokenizerError: {self.source}: {self.vocab_size} pieces do not fit "
                                 f"{where}.vocab_size={vocab_size} (set {where}.vocab_size={self.vocab_size})")


def _write_atomic(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def train_tokenizer(inputs: str | Iterable[str], model_path: str, vocab_size: int,
                    input_sentence_size: int = 10_000_000, num_threads: int = 2) -> Tokenizer:
    """Train a unigram SentencePiece model with the paper's settings, streaming the corpus.

    Sentences come from a generator (SentencePiece's `sentence_iterator`), so corpus files are
    never loaded whole; SentencePiece itself keeps a uniform sample of at most
    `input_sentence_size` sentences in memory.
    """
    proto = io.BytesIO()
    try:
        _train(inputs, proto, vocab_size, input_sentence_size, num_threads)
    except RuntimeError as exc:
        hint = ("; with byte fallback vocab_size must exceed 256 bytes + 4 specials + the corpus's distinct characters"
                if "Vocabulary size" in str(exc) else "")
        raise TokenizerError(f"TokenizerError: training {model_path} with vocab_size={vocab_size} failed: "
                             f"{str(exc).splitlines()[-1]}{hint}") from None
    os.makedirs(os.path.dirname(os.path.abspath(model_path)), exist_ok=True)
    _write_atomic(model_path, proto.getvalue())
    return Tokenizer(proto.getvalue(), source=model_path)


def _train(inputs, proto: io.BytesIO, vocab_size: int, input_sentence_size: int, num_threads: int) -> None:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter_sentences(inputs), model_writer=proto,
        model_type="unigram", vocab_size=vocab_size, character_coverage=1.0,
        normalization_rule_name="nmt_nfkc", byte_fallback=True, split_digits=True,
        input_sentence_size=input_sentence_size, shuffle_input_sentence=True,
        pad_id=0, unk_id=1, bos_id=2, eos_id=3,
        pad_piece="[PAD]", unk_piece="[UNK]", bos_piece="[START]", eos_piece="[END]",
        num_threads=num_threads, minloglevel=2)


@cli_main("pldr-train-tokenizer")
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="pldr-train-tokenizer", description=(
        "Train a SentencePiece unigram tokenizer with the PLDR-LLM paper's settings (nmt_nfkc, byte "
        "fallback, split digits, [PAD]=0 [UNK]=1 [START]=2 [END]=3) from text/JSON-lines/.gz/.zst files."))
    p.add_argument("inputs", nargs="+", help="corpus files or globs (*.txt, *.jsonl with a 'text' field, .gz/.zst)")
    p.add_argument("--out", required=True, help="path of the .model file to write")
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--input-sentence-size", type=int, default=10_000_000,
                   help="max sentences SentencePiece samples into memory (default 10M)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    log.info("training a %d-piece unigram tokenizer on %s", args.vocab_size, " ".join(args.inputs))
    start = time.perf_counter()
    tok = train_tokenizer(args.inputs, args.out, args.vocab_size, args.input_sentence_size, args.threads)
    specials = " ".join(f"{tok.id_to_piece(i)}={i}" for i in range(4))
    print(f"wrote {args.out}: {tok.vocab_size} pieces ({specials}), fingerprint {tok.fingerprint[:16]}, "
          f"{time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
