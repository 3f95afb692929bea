"""Shard writer and verifier: documents -> tokens (parallel processes) -> end-of-sequence
appended -> packed across document boundaries into fixed samples of seq_len + 1 tokens ->
webdataset .tar shards (`<key>.tokens.npy`, uint16 when the vocabulary fits) + manifest.json.

Deterministic by construction (document i's split comes from a hash of i; tar headers carry
no time stamps), so an interrupted run re-run with the same arguments rewrites exactly the
shards that are missing or incomplete and keeps the ones already finished: each shard is
written under a temporary name and renamed when complete, the manifest last.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import multiprocessing as mp
import os
import sys
import tarfile
import time
import zlib

import numpy as np

from .corpus import documents
from .manifest import Manifest, load_manifest
from .tokenizer import Tokenizer

_TOKENIZER = None


def _init_worker(path: str):
    global _TOKENIZER
    _TOKENIZER = Tokenizer(path)


def _encode(text: str) -> list[int]:
    return _TOKENIZER.encode(text, add_eos=True)


def is_valid_doc(index: int, fraction: float) -> bool:
    return fraction > 0 and zlib.crc32(index.to_bytes(8, "little")) % 1_000_000 < fraction * 1_000_000


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def sample_bytes(tokens: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, tokens, allow_pickle=False)
    return buf.getvalue()


def tar_bytes(keys_and_samples) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, sample in keys_and_samples:
            data = sample_bytes(sample)
            info = tarfile.TarInfo(f"{key}.tokens.npy")
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


class SplitWriter:
    """Packs one split's token stream into samples and samples into shards."""

    def __init__(self, out_dir, split, seq_len, samples_per_shard, dtype, log):
        self.out_dir, self.split, self.seq_len = out_dir, split, seq_len
        self.per_shard, self.dtype, self.log = samples_per_shard, dtype, log
        self.buffer: list[int] = []
        self.samples: list[np.ndarray] = []
        self.shards: list[dict] = []
        self.kept = self.written = 0

    def add(self, tokens: list[int]) -> None:
        self.buffer.extend(tokens)
        width = self.seq_len + 1
        while len(self.buffer) >= width:
            self.samples.append(np.asarray(self.buffer[:width], dtype=self.dtype))
            del self.buffer[:width]
            if len(self.samples) == self.per_shard:
                self.flush()

    def flush(self) -> None:
        if not self.samples:
            return
        index = len(self.shards)
        name = f"{self.split}-{index:06d}.tar"
        path = os.path.join(self.out_dir, name)
        keys = (f"{self.split}{index:06d}_{i:06d}" for i in range(len(self.samples)))
        data = tar_bytes(zip(keys, self.samples))
        digest = hashlib.sha256(data).hexdigest()
        if os.path.isfile(path) and os.path.getsize(path) == len(data) and sha256_file(path) == digest:
            self.kept += 1                       # finished by an earlier, interrupted run
        else:
            tmp = f"{path}.tmp{os.getpid()}"
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            self.written += 1
        self.shards.append({"name": name, "samples": len(self.samples),
                            "tokens": len(self.samples) * (self.seq_len + 1), "sha256": digest})
        self.samples = []


def write_shards(inputs, tokenizer_path: str, out_dir: str, seq_len: int, samples_per_shard: int = 2048,
                 valid_fraction: float = 0.005, workers: int = 0, log=print) -> Manifest:
    t0 = time.time()
    tok = Tokenizer(tokenizer_path)
    dtype = "uint16" if tok.vocab_size <= 65536 else "uint32"
    os.makedirs(out_dir, exist_ok=True)
    writers = {s: SplitWriter(out_dir, s, seq_len, samples_per_shard, dtype, log) for s in ("train", "valid")}
    workers = workers or max(1, (os.cpu_count() or 1))
    text_bytes = num_docs = 0

    def docs():
        nonlocal text_bytes, num_docs
        for doc in documents(inputs):
            text_bytes += len(doc.encode("utf-8"))
            num_docs += 1
            yield doc

    with mp.get_context("spawn").Pool(workers, initializer=_init_worker, initargs=(tokenizer_path,)) as pool:
        for i, ids in enumerate(pool.imap(_encode, docs(), chunksize=64)):
            writers["valid" if is_valid_doc(i, valid_fraction) else "train"].add(ids)
            if (i + 1) % 20000 == 0:
                log(f"  {i + 1:,} documents, {text_bytes / 2**20:.1f} MiB, "
                    f"{text_bytes / 2**20 / (time.time() - t0):.1f} MiB/s")
    for w in writers.values():
        w.flush()
    dt = time.time() - t0
    manifest = Manifest(os.path.join(out_dir, "manifest.json"), seq_len, dtype, tok.fingerprint, tok.vocab_size,
                        {s: w.shards for s, w in writers.items()},
                        {"documents": num_docs, "text_bytes": text_bytes,
                         "dropped_tail_tokens": {s: len(w.buffer) for s, w in writers.items()},
                         "tokenizer_path": os.path.abspath(tokenizer_path)})
    tmp = manifest.path + f".tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(manifest.to_json())
    os.replace(tmp, manifest.path)
    for s, w in writers.items():
        log(f"{s}: {sum(x['samples'] for x in w.shards):,} samples of {seq_len + 1} tokens in {len(w.shards)} shards "
            f"({w.written} written, {w.kept} already complete; {len(w.buffer)} tail tokens dropped)")
    log(f"{num_docs:,} documents, {text_bytes / 2**20:.1f} MiB of text in {dt:.1f} s "
        f"({text_bytes / 2**20 / max(dt, 1e-9):.2f} MiB/s) -> {manifest.path}")
    return manifest


def verify_shards(manifest_path: str, log=print) -> list[str]:
    """Every shard's size/sha256 and sample count against the manifest; returns the problems."""
    manifest = load_manifest(manifest_path)
    problems = []
    for split, shards in manifest.splits.items():
        for shard in shards:
            path = manifest.url(shard)
            if not os.path.isfile(path):
                problems.append(f"{path}: missing")
            elif sha256_file(path) != shard["sha256"]:
                problems.append(f"{path}: sha256 mismatch (corrupt or altered)")
            else:
                with tarfile.open(path) as tar:
                    n = sum(1 for m in tar.getmembers() if m.name.endswith(".tokens.npy"))
                if n != shard["samples"]:
                    problems.append(f"{path}: {n} samples, manifest says {shard['samples']}")
    for p in problems:
        log(f"BAD {p}")
    total = sum(len(s) for s in manifest.splits.values())
    log(f"{total - len(problems)}/{total} shards verified against {manifest.path}")
    return problems


def main_make_shards(argv=None) -> int:
    p = argparse.ArgumentParser(prog="pldr-make-shards", description="Tokenise documents into webdataset shards.")
    p.add_argument("--input", nargs="+", required=True, help="text / .jsonl files, .gz/.zst, or globs")
    p.add_argument("--tokenizer", required=True, help="SentencePiece .model (pldr-train-tokenizer or the paper's)")
    p.add_argument("--out", required=True, help="output folder (shards + manifest.json)")
    p.add_argument("--seq-len", type=int, default=1024, help="tokens per training input (samples hold seq_len+1)")
    p.add_argument("--samples-per-shard", type=int, default=2048)
    p.add_argument("--valid-fraction", type=float, default=0.005, help="documents held out for validation")
    p.add_argument("--workers", type=int, default=0, help="tokenising processes (default: all cores)")
    a = p.parse_args(argv)
    try:
        write_shards(a.input, a.tokenizer, a.out, a.seq_len, a.samples_per_shard, a.valid_fraction, a.workers)
    except (FileNotFoundError, ValueError) as e:
        print(f"pldr-make-shards: error: {e}", file=sys.stderr)
        return 2
    return 0


def main_verify(argv=None) -> int:
    p = argparse.ArgumentParser(prog="pldr-verify-shards", description="Check every shard against its manifest.")
    p.add_argument("manifest")
    a = p.parse_args(argv)
    try:
        return 1 if verify_shards(a.manifest) else 0
    except ValueError as e:
        print(f"pldr-verify-shards: error: {e}", file=sys.stderr)
        return 2


def main_train_tokenizer(argv=None) -> int:
    from .tokenizer import train_tokenizer
    p = argparse.ArgumentParser(prog="pldr-train-tokenizer",
                                description="Train a SentencePiece unigram tokenizer with the PLDR-LLM paper's settings.")
    p.add_argument("--input", nargs="+", required=True, help="text / .jsonl files, .gz/.zst, or globs")
    p.add_argument("--out", required=True, help="output .model path")
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--max-sentences", type=int, default=2_000_000, help="documents sampled for training")
    a = p.parse_args(argv)
    try:
        train_tokenizer(a.input, a.out, a.vocab_size, a.max_sentences)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"pldr-train-tokenizer: error: {e}", file=sys.stderr)
        return 2
    return 0
