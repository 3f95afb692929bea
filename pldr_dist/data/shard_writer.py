"""pldr-make-shards: tokenise a corpus in parallel and pack it into webdataset token shards.

Every document gets eos appended; documents of one split are concatenated and cut into
samples of exactly `seq_len + 1` tokens with no reset at document boundaries (spec §8). The
tokens left after the last full sample of a split (< seq_len + 1) are dropped and counted in
the manifest. A document goes to the validation split when crc32(its index) falls below
`valid_fraction`: a pure function of the index, so the assignment never depends on timing.

Resumable: after each shard is renamed into place, `.progress.json` records its sha256 and
the stream position where it ended (document index, token offset inside that document).
A re-run with the same arguments keeps the shards that verify, skips the documents before
that position without tokenising them, and continues; the output is byte-identical to an
uninterrupted run (tar mtimes are fixed).
"""
from __future__ import annotations

import argparse
import glob
import itertools
import json
import logging
import multiprocessing as mp
import os
import tarfile
import time
import zlib

import numpy as np
import webdataset as wds
from tqdm import tqdm

from pldr_dist.data.corpus import expand_inputs, iter_documents
from pldr_dist.data.manifest import FORMAT, SPLITS, Manifest, ShardError, sha256_file, write_json_atomic
from pldr_dist.data.tokenizer import Tokenizer
from pldr_dist.errors import cli_main

log = logging.getLogger(__name__)
PROGRESS = ".progress.json"
_worker_tok: Tokenizer | None = None


def token_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def is_valid_document(index: int, valid_fraction: float) -> bool:
    return zlib.crc32(index.to_bytes(8, "little")) < valid_fraction * 2**32


def _init_worker(tok: Tokenizer) -> None:
    global _worker_tok
    os.environ["OMP_NUM_THREADS"] = "1"
    _worker_tok = tok


def _encode_chunk(texts: list[str]) -> tuple[list[np.ndarray], int]:
    """Tokenise documents, append eos; also return the UTF-8 size of the text (for MB/s)."""
    tok = _worker_tok
    dtype = np.dtype(token_dtype(tok.vocab_size)).newbyteorder("<")
    eos = tok.eos_id
    out = [np.array(ids + [eos], dtype=dtype) for ids in tok.encode(texts)]
    return out, sum(len(t.encode("utf-8")) for t in texts)


def write_shard(path: str, samples: np.ndarray, first_index: int) -> str:
    """Write one tar shard under a temporary name, rename it into place; return its sha256."""
    ext = "tokens." + {2: "u16", 4: "u32"}[samples.dtype.itemsize]
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        writer = wds.TarWriter(f, mtime=1, format=tarfile.USTAR_FORMAT)  # fixed mtime: reproducible bytes
        for j, row in enumerate(samples):
            writer.write({"__key__": f"{first_index + j:010d}", ext: row.tobytes()})
        writer.close()
        f.flush()
        os.fsync(f.fileno())
    digest = sha256_file(tmp)
    os.replace(tmp, path)
    return digest


class _SplitPacker:
    """Concatenates one split's documents and cuts full shards, remembering where each ended."""

    def __init__(self, split: str, out_dir: str, sample_len: int, samples_per_shard: int, entries: list[dict], on_shard):
        self.split, self.out_dir, self.sample_len = split, out_dir, sample_len
        self.shard_tokens = sample_len * samples_per_shard
        self.samples_per_shard = samples_per_shard
        self.entries, self.on_shard = entries, on_shard
        self.pending: list[tuple[int, int, np.ndarray]] = []  # (doc index, offset of arr[0] in doc, tokens)
        self.pending_tokens = 0

    def add(self, doc_index: int, offset: int, tokens: np.ndarray) -> None:
        if len(tokens):
            self.pending.append((doc_index, offset, tokens))
            self.pending_tokens += len(tokens)
        while self.pending_tokens >= self.shard_tokens:
            self._cut(self.shard_tokens)

    def finish(self) -> int:
        """Write the last (smaller) shard; return the number of dropped tail tokens."""
        full = self.pending_tokens // self.sample_len * self.sample_len
        if full:
            self._cut(full)
        return self.pending_tokens

    def _cut(self, n: int) -> None:
        parts, need = [], n
        while need:
            doc, off, arr = self.pending[0]
            take = min(need, len(arr))
            parts.append(arr[:take])
            need -= take
            end = (doc, off + take)
            if take == len(arr):
                self.pending.pop(0)
            else:
                self.pending[0] = (doc, off + take, arr[take:])
        self.pending_tokens -= n
        index = len(self.entries)
        name = f"{self.split}-{index:06d}.tar"
        samples = np.concatenate(parts).reshape(-1, self.sample_len)
        digest = write_shard(os.path.join(self.out_dir, name), samples, index * self.samples_per_shard)
        self.entries.append({"name": name, "samples": len(samples), "tokens": int(samples.size),
                             "sha256": digest, "end": list(end)})
        self.on_shard()


def _batched(iterable, n):
    it = iter(iterable)
    while chunk := list(itertools.islice(it, n)):
        yield chunk


def _resume_entries(out_dir: str, progress: dict) -> dict[str, list[dict]]:
    """Keep, per split, the longest prefix of recorded shards that are present and verify."""
    kept = {}
    for split in SPLITS:
        kept[split] = []
        for entry in progress["splits"][split]:
            path = os.path.join(out_dir, entry["name"])
            if not os.path.isfile(path) or sha256_file(path) != entry["sha256"]:
                log.warning("%s does not verify; rewriting it and the %s shards after it", path, split)
                break
            kept[split].append(entry)
    return kept


def make_shards(inputs, tokenizer_path: str, out_dir: str, seq_len: int, samples_per_shard: int = 2048,
                valid_fraction: float = 0.005, num_procs: int = 1, show_progress: bool = True) -> Manifest:
    """Tokenise `inputs` and write train/valid shards + manifest.json into `out_dir` (resumable)."""
    files = expand_inputs(inputs)
    tok = Tokenizer.from_file(tokenizer_path)
    if tok.eos_id < 0:
        raise ShardError(f"ShardError: {tokenizer_path}: the tokenizer has no end-of-sequence piece; documents need one "
                         f"(train it with pldr-train-tokenizer)")
    dtype = token_dtype(tok.vocab_size)
    sample_len = seq_len + 1
    args = {"inputs": [os.path.abspath(f) for f in files], "input_bytes": [os.path.getsize(f) for f in files],
            "tokenizer": tok.fingerprint, "seq_len": seq_len, "samples_per_shard": samples_per_shard,
            "valid_fraction": valid_fraction}
    os.makedirs(out_dir, exist_ok=True)
    manifest_path = os.path.join(out_dir, "manifest.json")
    if os.path.isfile(manifest_path):
        existing = Manifest.load(manifest_path)
        if existing.data["args"] == args:
            log.info("%s is already complete (verify it with pldr-verify-shards)", manifest_path)
            return existing
        raise ShardError(f"ShardError: {manifest_path}: shards made with other arguments already live here "
                         f"(choose another output directory or delete this one)")
    for stale in glob.glob(os.path.join(out_dir, "*.tmp")):
        os.remove(stale)  # half-written shard of an interrupted run
    progress_path = os.path.join(out_dir, PROGRESS)
    progress = {"args": args, "splits": {s: [] for s in SPLITS}}
    if os.path.isfile(progress_path):
        with open(progress_path, encoding="utf-8") as f:
            previous = json.load(f)
        if previous["args"] != args:
            raise ShardError(f"ShardError: {progress_path}: an interrupted run with other arguments left shards here "
                             f"(re-run it with the same arguments, or delete {out_dir})")
        progress["splits"] = _resume_entries(out_dir, previous)
    resume_at = {s: tuple(progress["splits"][s][-1]["end"]) if progress["splits"][s] else (0, 0) for s in SPLITS}
    if any(progress["splits"].values()):
        log.info("resuming: %s", ", ".join(f"{s} from document {d} token {o}" for s, (d, o) in resume_at.items()))

    save = lambda: write_json_atomic(progress_path, progress)  # noqa: E731
    packers = {s: _SplitPacker(s, out_dir, sample_len, samples_per_shard, progress["splits"][s], save) for s in SPLITS}
    doc_counts = {s: 0 for s in SPLITS}

    def documents_to_encode():
        for index, text in enumerate(iter_documents(files)):
            split = "valid" if is_valid_document(index, valid_fraction) else "train"
            doc_counts[split] += 1
            if index >= resume_at[split][0]:
                yield index, split, text

    bar = tqdm(total=sum(args["input_bytes"]), unit="B", unit_scale=True, desc="shards", disable=not show_progress)
    start, text_bytes = time.perf_counter(), 0
    pool = mp.get_context("fork").Pool(num_procs, _init_worker, (tok,)) if num_procs > 1 else None
    if pool is None:
        _init_worker(tok)
    try:
        for window in _batched(_batched(documents_to_encode(), 64), 4 * num_procs):
            texts = [[t for _, _, t in chunk] for chunk in window]
            results = pool.map(_encode_chunk, texts) if pool else map(_encode_chunk, texts)
            for chunk, (arrays, nbytes) in zip(window, results):
                text_bytes += nbytes
                bar.update(nbytes)
                for (index, split, _), tokens in zip(chunk, arrays):
                    offset = resume_at[split][1] if index == resume_at[split][0] else 0
                    packers[split].add(index, offset, tokens[offset:])
    finally:
        if pool:
            pool.terminate()
        bar.close()
    dropped = {s: packers[s].finish() for s in SPLITS}
    seconds = time.perf_counter() - start

    splits = {s: [{k: e[k] for k in ("name", "samples", "tokens", "sha256")} for e in progress["splits"][s]] for s in SPLITS}
    manifest = Manifest(manifest_path, {
        "format": FORMAT, "seq_len": seq_len, "sample_len": sample_len, "dtype": dtype,
        "tokenizer": {"fingerprint": tok.fingerprint, "vocab_size": tok.vocab_size, "pad_id": tok.pad_id,
                      "eos_id": tok.eos_id, "source": os.path.abspath(tokenizer_path)},
        "splits": splits, "documents": doc_counts, "dropped_tail_tokens": dropped, "args": args})
    manifest.save()
    os.remove(progress_path)
    manifest.data["stats"] = {"seconds": seconds, "text_bytes": text_bytes}  # this run only, not saved
    return manifest


@cli_main("pldr-make-shards")
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="pldr-make-shards", description=(
        "Tokenise a corpus (text / JSON-lines / .gz / .zst files or globs) in parallel, append eos to every "
        "document, pack into seq_len+1 token samples and write webdataset .tar shards + manifest.json. "
        "Re-run with the same arguments to resume an interrupted run."))
    p.add_argument("inputs", nargs="+", help="corpus files or globs")
    p.add_argument("--tokenizer", required=True, help="SentencePiece .model file")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--seq-len", type=int, default=1023, help="tokens per training input (sample = seq_len+1); paper: 1023")
    p.add_argument("--samples-per-shard", type=int, default=2048)
    p.add_argument("--valid-fraction", type=float, default=0.005, help="share of documents held out for validation")
    p.add_argument("--procs", type=int, default=os.cpu_count() or 1, help="tokeniser processes")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    m = make_shards(args.inputs, args.tokenizer, args.out, args.seq_len, args.samples_per_shard,
                    args.valid_fraction, args.procs)
    for s in SPLITS:
        shards = m.shards(s)
        print(f"{s}: {m.data['documents'][s]} documents -> {len(shards)} shards, {sum(e['samples'] for e in shards)} "
              f"samples of {m.seq_len + 1} tokens ({m.data['dropped_tail_tokens'][s]} tail tokens dropped)")
    stats = m.data.get("stats")
    if stats:
        print(f"wrote {m.path} ({m.dtype}); {stats['text_bytes'] / 1e6:.1f} MB of text in {stats['seconds']:.1f} s "
              f"= {stats['text_bytes'] / 1e6 / max(stats['seconds'], 1e-9):.2f} MB/s")


if __name__ == "__main__":
    main()
