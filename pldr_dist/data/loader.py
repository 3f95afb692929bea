"""TokenLoader: endless, deterministic, exactly resumable batches from token shards.

The sample order is one global stream, a pure function of (seed, epoch, position), the same
whatever the number of data-parallel ranks:
  1. each epoch, the split's shards are permuted with RNG(seed, epoch) and grouped into
     *blocks* of `shards_per_block` consecutive shards;
  2. the samples of a block are permuted with RNG(seed, epoch, block) (the shuffle buffer,
     made deterministic); the validation split is read in order, unshuffled;
  3. epochs follow each other endlessly; a batch may span an epoch boundary.
Data-parallel rank r of dp takes rows [r*B, (r+1)*B) of every *global* micro-batch of dp*B
samples (Megatron's global-index scheme): ranks see disjoint samples, every TP/PP rank of one
replica passes the same dp_rank and sees identical batches, and the samples of a global step
do not depend on how they are spread over ranks. So a checkpoint resharded to another DP size
(pldr-reshard) continues on exactly the batches the original layout would have seen. Every
rank reads every block and keeps its rows: token data is tiny next to what a GPU computes
(2 bytes a token; 1M tokens/s is 2 MB/s).
Loader workers read whole blocks: worker w of n reads blocks w, w + n, ...; torch's DataLoader
returns worker outputs round-robin, so the main process sees blocks in order whatever n is.
The state is just the global (epoch, position), so a resume with any worker count, or any DP
size with the same global batch, yields exactly the batches an uninterrupted run would have.

Checksums are verified lazily: each shard's bytes are hashed when a worker reads it (every
epoch; ~1 GB/s, far above the training rate), not up front, so start-up stays instant on
large corpora. Use pldr-verify-shards for an up-front check.
"""
from __future__ import annotations

import hashlib
import io
import logging
import os
import tarfile

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset

from pldr_dist.data.manifest import Manifest, ShardError

log = logging.getLogger(__name__)


SAMPLE_SUFFIXES = (".tokens.u16", ".tokens.u32")


def _fast_members(data: bytes, nbytes: int) -> list[bytes] | None:
    """Payloads of a tar made by the shard writer (plain ustar members, one sample each).

    ~10x faster than tarfile. Returns None at anything unexpected (other member types or sizes,
    long names), and the caller falls back to tarfile, which then names the problem.
    """
    rows, off, view = [], 0, memoryview(data)
    while off + 512 <= len(data):
        header = data[off:off + 512]
        if header[0] == 0:
            return rows  # end-of-archive block
        name, kind = header[:100].rstrip(b"\0"), header[156:157]
        try:
            size = int(header[124:136].strip(b"\0 ") or b"0", 8)
        except ValueError:
            return None
        if kind in (b"x", b"g"):  # pax extended header (e.g. a float mtime): nothing we need
            off += 512 + (size + 511) // 512 * 512
            continue
        if kind not in (b"0", b"\0") or not name.endswith((b".tokens.u16", b".tokens.u32")):
            return None
        if size != nbytes or off + 512 + size > len(data):
            return None
        rows.append(view[off + 512:off + 512 + size])
        off += 512 + (size + 511) // 512 * 512
    return None


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(list(key))


class _Plan:
    """The per-rank sample order; shared (pickled) by the main process and the workers."""

    def __init__(self, urls: list[str], sizes: list[int], shas: list[str], dtype: str, sample_len: int,
                 seed: int, shuffle: bool, shards_per_block: int, on_corrupt: str):
        self.urls, self.sizes, self.shas = urls, sizes, shas
        self.dtype, self.sample_len = np.dtype(dtype).newbyteorder("<"), sample_len
        self.seed, self.shuffle = seed, shuffle
        self.shards_per_block = shards_per_block if shuffle else 1
        self.on_corrupt = on_corrupt
        self.samples_per_epoch = sum(sizes)
        self.blocks_per_epoch = -(-len(urls) // self.shards_per_block)
        self._layouts: dict[int, tuple[list[list[int]], list[int]]] = {}

    def blocks(self, epoch: int) -> list[list[int]]:
        return self._layout(epoch)[0]

    def block_start(self, epoch: int, block: int) -> int:
        return self._layout(epoch)[1][block]

    def block_size(self, epoch: int, block: int) -> int:
        starts = self._layout(epoch)[1]
        return starts[block + 1] - starts[block]

    def locate(self, epoch: int, position: int) -> tuple[int, int]:
        """(block index, offset within block) of the sample at `position` in `epoch`."""
        starts = self._layout(epoch)[1]
        block = int(np.searchsorted(starts, position, side="right")) - 1
        if not 0 <= position < self.samples_per_epoch:
            raise ValueError(f"position {position} is beyond epoch size {self.samples_per_epoch}")
        return block, position - starts[block]

    def _layout(self, epoch: int) -> tuple[list[list[int]], list[int]]:
        """The epoch's blocks (shard lists) and their first sample positions (+ the epoch size), cached."""
        if epoch not in self._layouts:
            order = (_rng(self.seed, epoch).permutation(len(self.urls)) if self.shuffle
                     else np.arange(len(self.urls)))
            k = self.shards_per_block
            blocks = [order[i:i + k].tolist() for i in range(0, len(order), k)]
            starts = np.concatenate([[0], np.cumsum([sum(self.sizes[s] for s in b) for b in blocks])]).tolist()
            self._layouts = {**dict(list(self._layouts.items())[-2:]), epoch: (blocks, starts)}
        return self._layouts[epoch]

    def read_shard(self, s: int) -> tuple[np.ndarray, int]:
        """All samples of shard s as [n, sample_len] (bad ones dropped under `skip`), and #skipped."""
        url = self.urls[s]
        try:
            with wds.gopen(url) as stream:
                data = stream.read()
        except Exception as exc:  # noqa: BLE001  (gopen raises many types; say which file)
            raise ShardError(f"ShardError: {url}: cannot read shard ({exc})") from None
        digest_ok = hashlib.sha256(data).hexdigest() == self.shas[s]
        if not digest_ok:
            msg = f"ShardError: {url}: sha256 differs from the manifest (corrupt or replaced; re-run pldr-make-shards)"
            if self.on_corrupt == "error":
                raise ShardError(msg)
            log.warning("%s; skipping its unreadable samples", msg)
        nbytes = self.sample_len * self.dtype.itemsize
        rows = _fast_members(data, nbytes) if digest_ok else None
        if rows is None:
            rows = self._tarfile_members(url, data, nbytes)
        samples = np.frombuffer(b"".join(rows), dtype=self.dtype).reshape(-1, self.sample_len)
        if len(samples) > self.sizes[s]:
            samples = samples[: self.sizes[s]]
        skipped = self.sizes[s] - len(samples)
        if skipped and self.on_corrupt == "error":
            raise ShardError(f"ShardError: {url}: {len(samples)} samples, manifest says {self.sizes[s]} (truncated shard)")
        return samples, skipped

    def _tarfile_members(self, url: str, data: bytes, nbytes: int) -> list[bytes]:
        """Slow, forgiving path: read members with tarfile, dropping (skip) or refusing (error) bad ones."""
        rows = []
        try:
            with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
                for member in tar:
                    payload = tar.extractfile(member).read() if member.isfile() else b""
                    if not member.name.endswith(SAMPLE_SUFFIXES) or len(payload) != nbytes:
                        if self.on_corrupt == "error":
                            raise ShardError(f"ShardError: {url}: member {member.name} is not a {self.sample_len}-token "
                                             f"{self.dtype.name} sample (corrupt shard; re-run pldr-make-shards)")
                        continue
                    rows.append(payload)
        except tarfile.TarError as exc:
            if self.on_corrupt == "error":
                raise ShardError(f"ShardError: {url}: not a readable tar file ({exc})") from None
        return rows

    def read_block(self, epoch: int, block: int) -> tuple[np.ndarray, np.ndarray, int]:
        """(samples, their positions within the block, #skipped), in the block's shuffled order.

        A skipped sample keeps its position slot empty, so positions and resume stay exact.
        """
        shards = self.blocks(epoch)[block]
        parts, positions, skipped, start = [], [], 0, 0
        for s in shards:
            samples, bad = self.read_shard(s)
            parts.append(samples)
            positions.append(start + np.arange(len(samples)))  # a skip drops the shard's tail slots
            skipped += bad
            start += self.sizes[s]
        samples, positions = np.concatenate(parts), np.concatenate(positions)
        if self.shuffle:
            perm = _rng(self.seed, epoch, block).permutation(start)
            slot = np.empty(start, dtype=np.int64)
            slot[perm] = np.arange(start)  # the sample at block offset p goes to slot[p]
            positions = slot[positions]
            order = np.argsort(positions, kind="stable")
            samples, positions = samples[order], positions[order]
        return samples, positions, skipped


def _as_is(item):
    """Keep worker outputs as numpy (DataLoader would otherwise convert them to tensors)."""
    return item


class _BlockStream(IterableDataset):
    """Yields (epoch, block, samples, positions, skipped) from a start block, endlessly."""

    def __init__(self, plan: _Plan, epoch: int, block: int):
        self.plan, self.epoch, self.block = plan, epoch, block

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        torch.set_num_threads(1)
        j = self.epoch * self.plan.blocks_per_epoch + self.block + wid
        while True:
            epoch, block = divmod(j, self.plan.blocks_per_epoch)
            try:
                yield (epoch, block, *self.plan.read_block(epoch, block))
            except ShardError as exc:  # hand the one-line message to the main process, unwrapped
                yield exc
                return
            j += nw


class TokenLoader:
    """Batches {"input": [B, S] int64, "target": [B, S] int64} for one data-parallel rank:
    its B rows of each global micro-batch of dp_size * B samples.

    `manifest_path_or_dir`: manifest.json or its directory. `shuffle`: default True for "train",
    False for "valid". `shard_location`: where the shards
    live if not beside the manifest: a directory, a URL prefix, or a template with `{name}`
    such as "pipe:aws s3 cp s3://bucket/shards/{name} -" (anything webdataset's gopen opens).
    """

    def __init__(self, manifest_path_or_dir: str, split: str, batch_size: int, seq_len: int, dp_rank: int = 0,
                 dp_size: int = 1, seed: int = 0, num_workers: int = 0, tokenizer_fingerprint: str | None = None,
                 on_corrupt: str = "error", shuffle: bool | None = None, shard_location: str | None = None,
                 shards_per_block: int = 4):
        if on_corrupt not in ("error", "skip"):
            raise ValueError(f"on_corrupt={on_corrupt!r} must be 'error' or 'skip'")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} must be in [0, dp_size={dp_size})")
        m = Manifest.load(manifest_path_or_dir)
        if m.seq_len != seq_len:
            raise ShardError(f"ShardError: {m.path}: seq_len={m.seq_len} but the run's seq_len={seq_len} "
                             f"(re-shard with --seq-len {seq_len} or set the run's seq_len to {m.seq_len})")
        if tokenizer_fingerprint is not None and m.fingerprint != tokenizer_fingerprint:
            raise ShardError(f"ShardError: {m.path}: shards were tokenised with tokenizer {m.fingerprint[:16]}…, the run "
                             f"uses {tokenizer_fingerprint[:16]}… (re-shard with the run's tokenizer)")
        entries = m.shards(split)
        if not entries:
            raise ShardError(f"ShardError: {m.path}: the manifest lists no {split} shards (re-run pldr-make-shards)")
        urls = [self._url(m, shard_location, e["name"]) for e in entries]
        self.plan = _Plan(urls, [e["samples"] for e in entries], [e["sha256"] for e in entries], m.dtype, seq_len + 1,
                          seed, split == "train" if shuffle is None else shuffle, shards_per_block, on_corrupt)
        self.manifest, self.batch_size, self.num_workers = m, batch_size, num_workers
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.epoch, self.position = 0, 0  # the next sample to yield
        self.skipped_samples = 0

    @staticmethod
    def _url(m: Manifest, location: str | None, name: str) -> str:
        if location is None:
            path = os.path.join(m.root, name)
            if not os.path.isfile(path):
                raise ShardError(f"ShardError: {path}: shard listed in {m.path} is missing (copy it back or re-run pldr-make-shards)")
            return path
        if "{name}" in location:
            return location.format(name=name)
        return location.rstrip("/") + "/" + name

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "skipped_samples": self.skipped_samples}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self.skipped_samples = int(state.get("skipped_samples", 0))

    def _blocks(self):
        """Blocks from the current position on, each trimmed to the samples not yet consumed."""
        block, offset = self.plan.locate(self.epoch, self.position)
        stream = _BlockStream(self.plan, self.epoch, block)
        source = iter(DataLoader(stream, batch_size=None, num_workers=self.num_workers,
                                 prefetch_factor=2 if self.num_workers else None,
                                 collate_fn=_as_is)) if self.num_workers else iter(stream)
        for item in source:
            if isinstance(item, ShardError):
                raise ShardError(str(item)) from None
            epoch, block, samples, positions, skipped = item
            start = self.plan.block_start(epoch, block)
            keep = positions >= offset
            if skipped and offset == 0:  # a resume inside this block has counted its skips already
                log.warning("skipped %d corrupt samples in epoch %d block %d", skipped, epoch, block)
                self._uncounted_skips.append((epoch * self.plan.samples_per_epoch + start, skipped))
            yield epoch, start, samples[keep], positions[keep], start + self.plan.block_size(epoch, block)
            offset = 0

    def _count_skips(self) -> None:
        """Add a block's skipped samples once the consumed position has entered that block."""
        now = self.epoch * self.plan.samples_per_epoch + self.position
        self.skipped_samples += sum(n for at, n in self._uncounted_skips if at < now)
        self._uncounted_skips = [(at, n) for at, n in self._uncounted_skips if at >= now]

    def __iter__(self):
        self._uncounted_skips = []
        B, pending, filled = self.batch_size * self.dp_size, [], 0   # one global micro-batch
        mine = slice(self.dp_rank * self.batch_size, (self.dp_rank + 1) * self.batch_size)
        for epoch, start, samples, positions, block_end in self._blocks():
            i = 0
            while i < len(samples):
                take = min(B - filled, len(samples) - i)
                pending.append(samples[i:i + take])
                filled += take
                i += take
                # where the next sample comes from: the next kept slot here, or the end of this block
                nxt = start + positions[i] if i < len(samples) else block_end
                if filled == B:
                    self.epoch, self.position = int(epoch), int(nxt)
                    if self.position >= self.plan.samples_per_epoch:
                        self.epoch, self.position = epoch + 1, 0
                    self._count_skips()
                    tokens = np.concatenate(pending)[mine].astype(np.int64)
                    pending, filled = [], 0
                    # numpy's copies, one thread each: torch's `.contiguous()` of these slices took
                    # 7-8 ms a step on a 16-core GPU host (0.08 ms on a 2-core CPU), its cause unknown
                    yield {"input": torch.from_numpy(np.ascontiguousarray(tokens[:, :-1])),
                           "target": torch.from_numpy(np.ascontiguousarray(tokens[:, 1:]))}


class BatchesAhead:
    """A loader's batches, with the next one built early, while the GPU is busy.

    Why: the loader assembles each batch on the host (concatenate, slice, copy). Done at the
    start of a step, the GPU waits for it: ~1 ms a step, and now and then ~20 ms (a trainer
    profile on the H100 at commit fdd9ee8), a sixth of a pldr-110m step.
    The trainer calls `prepare()` right after it has launched a backward pass.
    `state_dict()` is the loader's position before the prepared batch, so a checkpoint taken
    while a batch is prepared resumes with that batch: runs stay exactly resumable.
    """

    _END = object()

    def __init__(self, loader):
        self.loader, self.source, self.ready = loader, iter(loader), None

    def __iter__(self):
        return self

    def prepare(self) -> None:
        if self.ready is None:
            state = self.loader.state_dict()
            self.ready = (state, next(self.source, self._END))

    def peek(self):
        """The prepared batch, without taking it (None before `prepare()` and at the end)."""
        if self.ready is None or self.ready[1] is self._END:
            return None
        return self.ready[1]

    def __next__(self):
        self.prepare()
        batch, self.ready = self.ready[1], None
        if batch is self._END:
            raise StopIteration
        return batch

    def state_dict(self) -> dict:
        return self.ready[0] if self.ready is not None else self.loader.state_dict()

    def close(self) -> None:
        """Ends the iteration now. With data.num_workers > 0 this stops and joins the DataLoader's
        workers (their iterator is freed with the generator that holds it), instead of leaving
        them to the interpreter's exit: there multiprocessing terminates and joins them, and a
        worker forked by the batch prepared after the last step, still starting, could miss
        that SIGTERM and leave its trainer waiting for ever (a dp=2 run's exit hung so)."""
        close = getattr(self.source, "close", None)
        if close is not None:
            close()
        self.ready = None
