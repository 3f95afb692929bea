"""Streaming, exactly resumable batches from tokenised webdataset shards.

The sample order is a pure function of (seed, epoch, data-parallel rank): each data-parallel
rank owns shards rank, rank + dp, ...; every epoch permutes them, and the samples inside each
shard, with generators seeded from those numbers. The loader's whole state is therefore
(epoch, samples consumed in the epoch): a resumed run yields exactly the batches the
uninterrupted one would have, whatever the number of prefetch workers, and all TP/PP ranks
of one replica (same dp rank) see identical batches. Endless: epochs follow each other.

Shards are read with webdataset (local paths, brace patterns, `pipe:` commands); local shards
are checked against the manifest's sha256 when opened.
"""
from __future__ import annotations

import hashlib
import io
import os
import tarfile
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import webdataset as wds

from .manifest import DataError, check_against_run, load_manifest
from .shards import sample_bytes


class TokenLoader:
    def __init__(self, shards: str, split: str, batch_size: int, seq_len: int | None = None,
                 dp_rank: int = 0, dp_size: int = 1, seed: int = 0, num_workers: int = 0,
                 tokenizer_fingerprint: str | None = None, on_corrupt: str = "error", shuffle: bool = True):
        self.manifest = load_manifest(shards)
        check_against_run(self.manifest, seq_len, tokenizer_fingerprint)
        all_shards = self.manifest.shards(split)
        if len(all_shards) < dp_size:
            raise DataError(f"{self.manifest.path}: {len(all_shards)} '{split}' shards for {dp_size} data-parallel ranks "
                            f"(re-shard with a smaller --samples-per-shard so every rank gets at least one)")
        self.shards = all_shards[dp_rank::dp_size]
        self.split, self.batch_size, self.seed, self.dp_rank = split, batch_size, seed, dp_rank
        self.seq_len = self.manifest.seq_len
        self.workers, self.on_corrupt, self.shuffle = num_workers, on_corrupt, shuffle
        self.epoch, self.cursor, self.skipped = 0, 0, 0
        self.samples_per_epoch = sum(s["samples"] for s in self.shards)
        if self.samples_per_epoch < batch_size:
            raise DataError(f"{self.manifest.path}: dp rank {dp_rank} has {self.samples_per_epoch} '{split}' samples, "
                            f"fewer than one batch of {batch_size} (use more data or a smaller batch)")

    # -- state ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "skipped": self.skipped,
                "dp_rank": self.dp_rank, "seed": self.seed, "shards": len(self.shards)}

    def load_state_dict(self, state: dict) -> None:
        if (state["dp_rank"], state["seed"], state["shards"]) != (self.dp_rank, self.seed, len(self.shards)):
            raise DataError(f"loader state is for dp_rank={state['dp_rank']} seed={state['seed']} with {state['shards']} "
                            f"shards, this loader has dp_rank={self.dp_rank} seed={self.seed} with {len(self.shards)} "
                            f"(resume with the same data and layout, or reshard the checkpoint)")
        self.epoch, self.cursor, self.skipped = state["epoch"], state["cursor"], state["skipped"]

    # -- order ---------------------------------------------------------------------------
    def _order(self, epoch: int):
        """[(shard index, sample permutation)] for one epoch."""
        if not self.shuffle:
            return [(i, np.arange(s["samples"])) for i, s in enumerate(self.shards)]
        rng = np.random.default_rng([self.seed, epoch, self.dp_rank])
        return [(int(i), np.random.default_rng([self.seed, epoch, self.dp_rank, int(i)]).permutation(
                 self.shards[i]["samples"])) for i in rng.permutation(len(self.shards))]

    def _read(self, index: int) -> np.ndarray:
        """All samples of one shard as [n, seq_len + 1] (corrupt ones skipped or refused)."""
        shard = self.shards[index]
        url = self.manifest.url(shard)
        data = None
        if "://" not in url and not url.startswith("pipe:"):
            if not os.path.isfile(url):
                raise DataError(f"shard {url} is missing (listed in {self.manifest.path}; re-run pldr-make-shards)")
            with open(url, "rb") as f:
                data = f.read()
            if hashlib.sha256(data).hexdigest() != shard["sha256"]:
                raise DataError(f"shard {url} does not match its sha256 in {self.manifest.path} (corrupt or altered; "
                                f"re-run pldr-make-shards, which rewrites it)")
        rows, width = [], self.seq_len + 1
        itemsize = np.dtype(self.manifest.dtype).itemsize
        header = sample_bytes(np.zeros(width, self.manifest.dtype))[: -width * itemsize]
        for key, payload in self._samples(url, data):
            try:
                # .npy: magic, header, then width * itemsize bytes of tokens
                if payload is None or payload[:6] != b"\x93NUMPY" or len(payload) < width * itemsize + 10:
                    raise ValueError("not a .npy token array")
                if payload[: len(payload) - width * itemsize] != header:
                    raise ValueError(f"expected a ({width},) {self.manifest.dtype} array")
                rows.append(np.frombuffer(payload, dtype=self.manifest.dtype, offset=len(payload) - width * itemsize))
            except ValueError as e:
                if self.on_corrupt == "error":
                    raise DataError(f"shard {url}: sample {key} is malformed ({e}); "
                                    f"set data.on_corrupt=skip to skip such samples") from None
                self.skipped += 1
                rows.append(None)
        if len(rows) != shard["samples"]:
            raise DataError(f"shard {url} has {len(rows)} samples, {self.manifest.path} says {shard['samples']}")
        return rows

    @staticmethod
    def _samples(url: str, data: bytes | None):
        """(key, .tokens.npy bytes) per sample: a local shard parsed from memory, others via webdataset."""
        if data is not None:
            with tarfile.open(fileobj=io.BytesIO(data)) as tar:
                for member in tar:
                    if member.isfile():
                        key, _, ext = member.name.partition(".")
                        yield key, tar.extractfile(member).read() if ext == "tokens.npy" else None
            return
        for sample in wds.WebDataset(url, shardshuffle=False, empty_check=False):
            yield sample.get("__key__"), sample.get("tokens.npy")

    # -- iteration -----------------------------------------------------------------------
    def __iter__(self):
        pool = ThreadPoolExecutor(self.workers) if self.workers > 0 else None
        try:
            while True:
                order = self._order(self.epoch)
                starts = np.cumsum([0] + [len(p) for _, p in order])
                first = int(np.searchsorted(starts, self.cursor, side="right") - 1)
                futures = {}

                def fetch(k):
                    if pool is None:
                        return self._read(order[k][0])
                    if k not in futures:
                        futures[k] = pool.submit(self._read, order[k][0])
                    return futures.pop(k).result()

                batch = []
                for k in range(first, len(order)):
                    if pool is not None:
                        for ahead in range(k + 1, min(k + 1 + self.workers, len(order))):
                            if ahead not in futures:
                                futures[ahead] = pool.submit(self._read, order[ahead][0])
                    rows = fetch(k)
                    perm = order[k][1]
                    for j in range(self.cursor - starts[k], len(perm)):
                        row = rows[perm[j]]
                        self.cursor += 1
                        if row is None:
                            continue
                        batch.append(row)
                        if len(batch) == self.batch_size:
                            yield self._to_batch(batch)
                            batch = []
                # a batch that straddles epochs keeps its samples from both, in order
                self.epoch, self.cursor = self.epoch + 1, 0
                if batch:
                    pending, batch = batch, []
                    for b in self._continue(pending):
                        yield b
        finally:
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)

    def _continue(self, pending):
        """Fill a partial batch from the next epoch (keeps batch size fixed across epochs)."""
        order = self._order(self.epoch)
        for idx, perm in order:
            rows = self._read(idx)
            for j in perm:
                row = rows[j]
                self.cursor += 1
                if row is None:
                    continue
                pending.append(row)
                if len(pending) == self.batch_size:
                    yield self._to_batch(pending)
                    return

    @staticmethod
    def _to_batch(rows) -> dict:
        t = torch.from_numpy(np.stack(rows).astype(np.int64))
        return {"input": t[:, :-1], "target": t[:, 1:]}
