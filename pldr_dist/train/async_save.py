"""Asynchronous checkpoint writes (`checkpoint.async_save`): the step loop pays only for a copy
of the state into host memory; a background thread writes the files.

- `HostSnapshot` copies every tensor a checkpoint holds into host buffers, page-locked when CUDA
  is available and kept for the next save (a 13.4 GB pldr-1b state: ~0.3 s to copy into them on
  the H200, while pinning that much took ~7 s). It copies whole storages and rebuilds each tensor
  as the same view of its copy, so `torch.save` writes the same bytes as from the live tensors
  (tests: sync vs async files); a GPU run's files record `cpu` as the tensors' device, which every
  loader here and in DeepSpeed maps to anyway. The rest of the state (optimizer param groups,
  counters, DeepSpeed objects) is deep-copied: the step loop goes on changing it meanwhile.
- `SnapshotEngine` stands in for DeepSpeed's checkpoint engine (`deepspeed.runtime.
  checkpoint_engine`, its interface for custom writers) during `engine.save_checkpoint`, so
  DeepSpeed lays out its usual files for any layout (ZeRO 0-3, pipelines) but each `save` only
  takes a snapshot.
- `Writer` is one daemon thread running jobs in order. A daemon, so that an error exit or SIGKILL
  never waits for it: what it leaves is a tag without COMPLETE.json, never loaded
  (train/checkpoint.py).

torch.distributed.checkpoint's async_save was not used: it writes its own format (a file per rank
plus metadata), which DeepSpeed's loader, pldr-reshard and pldr-consolidate cannot read; its
private StateDictStager (the staging half) drops requires_grad, so the files would change.
"""
from __future__ import annotations

import copy
import os
import queue
import threading
import time
from typing import Callable, Optional

import torch
from deepspeed.runtime.checkpoint_engine.checkpoint_engine import CheckpointEngine

from ..convert.consolidated import CheckpointError


def _tensors(item, out: list) -> list:
    if isinstance(item, torch.Tensor):
        out.append(item)
    elif isinstance(item, dict):
        for value in item.values():
            _tensors(value, out)
    elif isinstance(item, (list, tuple)):
        for value in item:
            _tensors(value, out)
    return out


def _pooled(t) -> bool:
    """Tensors copied through the buffers; anything else is left to deepcopy's own (correct,
    unpooled) tensor copy."""
    return type(t) in (torch.Tensor, torch.nn.Parameter) and not t.is_sparse and not t.__dict__ \
        and t.device.type != "meta"


def _remap(state, buffer_of: Callable):
    """deepcopy of `state`, each pooled tensor rebuilt as the same view of `buffer_of(storage)`."""
    memo: dict = {}
    for t in _tensors(state, []):
        if id(t) in memo or not _pooled(t):
            continue
        buf = buffer_of(t.untyped_storage())
        view = torch.empty(0, dtype=t.dtype, device=buf.device).set_(buf.untyped_storage(), t.storage_offset(),
                                                                     t.size(), t.stride())
        if type(t) is torch.nn.Parameter:
            view = torch.nn.Parameter(view, requires_grad=t.requires_grad)
        elif t.requires_grad:
            view.requires_grad_(True)
        memo[id(t)] = view
    return copy.deepcopy(state, memo)


def _bytes(storage) -> torch.Tensor:
    return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)


class HostSnapshot:
    """The first save of a GPU run has no host buffers yet: it clones the state on the GPU instead
    (milliseconds; transient GPU memory the size of the checkpoint, freed after the write), and the
    writer thread makes the buffers and copies the clones into them (`materialize`). Without room
    on the GPU it makes them in the step loop.

    A buffer is ordinary memory, touched, then page-locked with cudaHostRegister (`_new_buffer`):
    on the H200 host, torch's pinned allocation (cudaHostAlloc) of 12 GiB took 6 s and held up
    every CUDA call of the step loop meanwhile, even from another thread; registering touched
    memory took 0.05 s a GiB. Unregistered memory is still correct, only slower to copy into
    (12 GiB from the GPU: 0.87 s, pinned ~0.3 s)."""

    def __init__(self):
        self.pin = torch.cuda.is_available()
        self.device = torch.cuda.current_device() if self.pin else None   # the step loop's GPU
        self.buffers: dict[tuple, torch.Tensor] = {}     # (file, storage index) -> uint8 host buffer
        self.staged: dict[tuple, tuple] = {}             # GPU clone's (device, data_ptr) -> (buffer key, clone)
        self.registered: set[int] = set()                # page-locked buffers' addresses

    def _new_buffer(self, key: tuple, nbytes: int) -> torch.Tensor:
        """As torch.distributed.checkpoint's StateDictStager pins (cudaHostRegister, portable),
        but on memory touched first, and unregistered when a buffer is replaced."""
        old = self.buffers.pop(key, None)
        if old is not None and old.data_ptr() in self.registered:
            self.registered.discard(old.data_ptr())
            torch.cuda.cudart().cudaHostUnregister(old.data_ptr())
        buf = self.buffers[key] = torch.empty(nbytes, dtype=torch.uint8)
        if self.pin and nbytes:
            buf.zero_()      # the pages are faulted in here, not inside the driver's lock
            code = int(torch.cuda.cudart().cudaHostRegister(buf.data_ptr(), nbytes, 1))
            if code:
                raise CheckpointError(f"page-locking {nbytes:,} bytes of host memory for an asynchronous checkpoint "
                                      f"failed (CUDA error {code}); set checkpoint.async_save=false")
            self.registered.add(buf.data_ptr())
        return buf

    def copy(self, state, name: str):
        """A copy of `state` whose tensors live in this snapshot's buffers (reused: the caller makes
        sure the previous write has finished) or, for a GPU tensor without one yet, in a GPU clone."""
        copies: dict = {}   # source storage's (device, data_ptr) -> its copy
        on_gpu = False

        def buffer_of(storage) -> torch.Tensor:
            nonlocal on_gpu
            key = (storage.device, storage.data_ptr())
            if not storage.nbytes():
                return torch.empty(0, dtype=torch.uint8)
            if key not in copies:
                pool_key, nbytes = (name, len(copies)), storage.nbytes()
                buf = self.buffers.get(pool_key)
                on_gpu |= storage.device.type == "cuda"
                if (buf is None or buf.numel() != nbytes) and storage.device.type == "cuda" and self.pin:
                    try:
                        clone = _bytes(storage).clone()
                        self.staged[(clone.device, clone.data_ptr())] = (pool_key, clone)
                        copies[key] = clone
                        return clone
                    except torch.OutOfMemoryError:
                        pass
                if buf is None or buf.numel() != nbytes:
                    buf = self._new_buffer(pool_key, nbytes)
                buf.copy_(_bytes(storage), non_blocking=True)
                copies[key] = buf
            return copies[key]
        out = _remap(state, buffer_of)
        if on_gpu:
            torch.cuda.synchronize()   # the step loop may change the sources once this returns
        return out

    def materialize(self, state):
        """In the writer thread: the GPU clones in `state` moved into new pinned buffers (kept for
        the next saves), on a side stream so the copy overlaps the training step."""
        if not self.staged:
            return state
        torch.cuda.set_device(self.device)   # per thread: else this thread would open a context on GPU 0
        stream = torch.cuda.Stream()

        def buffer_of(storage) -> torch.Tensor:
            key = (storage.device, storage.data_ptr())
            if key not in self.staged or storage.device.type != "cuda":
                return _bytes(storage)
            pool_key, clone = self.staged[key]
            if self.buffers.get(pool_key) is None or self.buffers[pool_key].numel() != clone.numel():
                with torch.cuda.stream(stream):
                    self._new_buffer(pool_key, clone.numel()).copy_(clone, non_blocking=True)
            return self.buffers[pool_key]
        out = _remap(state, buffer_of)
        stream.synchronize()
        return out

    def release(self) -> None:
        """After the write: the GPU clones go back to the allocator."""
        self.staged.clear()


class SnapshotEngine(CheckpointEngine):
    """DeepSpeed's checkpoint engine during an asynchronous save: `save` snapshots, writes nothing."""

    def __init__(self, inner: CheckpointEngine, host: HostSnapshot):
        super().__init__()
        self.name, self.inner, self.host = "PLDRSnapshotEngine", inner, host
        self.staged: list[tuple] = []     # (host copy of the state, final path)

    def create(self, info):
        return self.inner.create(info)

    def save(self, state_dict, path: str):
        self.staged.append((self.host.copy(state_dict, os.path.basename(path)), path))

    def load(self, path: str, map_location=None):
        return self.inner.load(path, map_location=map_location)

    def commit(self, info):
        return True     # the files are not written yet: checkpoint.py finalises the tag


class Writer:
    """One background thread running jobs in order; after a job fails, later ones are skipped and
    `error` names the first failure (the step loop reports it)."""

    def __init__(self):
        self.jobs: queue.Queue = queue.Queue()
        self.pending = 0
        self.error: Optional[str] = None
        self.cond = threading.Condition()
        threading.Thread(target=self._loop, name="pldr-checkpoint-writer", daemon=True).start()

    def submit(self, what: str, job: Callable[[], None]) -> None:
        with self.cond:
            self.pending += 1
        self.jobs.put((what, job))

    def _loop(self) -> None:
        while True:
            what, job = self.jobs.get()
            try:
                if self.error is None:
                    job()
            except Exception as e:    # noqa: BLE001 - reported by the step loop as one line
                self.error = f"{what} failed in the background ({type(e).__name__}: {e})"
            what = job = None     # drop the job's state (host or GPU copies) now
            with self.cond:
                self.pending -= 1
                self.cond.notify_all()

    def idle(self) -> bool:
        return self.pending == 0

    def wait(self) -> float:
        t0 = time.time()
        with self.cond:
            self.cond.wait_for(lambda: self.pending == 0)
        return time.time() - t0
