"""Token batches onto the device, the next one copied while the GPU runs the backward.

Why: a copy from pageable host memory on the compute stream is where the host waits for the GPU.
CUDA stages such a copy through a pinned buffer of its own and synchronizes the stream it is
queued on first, with `non_blocking` or without. So the host stalled at the start of every
step until the previous step's kernels had run, and the GPU then idled while the host launched
the next forward: 3.4 ms a step in a pldr-110m ZeRO-1 profile on an H200 (91% GPU busy).
Pinning each batch to copy it asynchronously was slower (`aten::pin_memory` 4-9 ms a call:
benchmarks/results/trainer/h100/pinned_batches_pldr-110m).

Here the batch that `data.loader.BatchesAhead` has prepared is copied on a side stream, which
is idle, so no wait for the compute stream; the compute stream waits for the copy on the GPU
when the batch is used, and the copied tensors are recorded on it, so the allocator keeps them
until its kernels are done. On a CPU, and for any batch not copied ahead, the plain copy.
"""
from __future__ import annotations

import torch


def to_device(batch, device) -> tuple:
    """(input, target) of a host batch on `device`, copied on the current stream (as before this
    module: the measured pinned alternative is in its docstring)."""
    return batch["input"].to(device, non_blocking=True), batch["target"].to(device, non_blocking=True)


class DeviceBatches:
    """`start(batch)` copies a host batch ahead on a side stream; `take(batch)` returns its
    (input, target) on the device, the ahead copy if it is of this very batch."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.ahead = None     # (host batch, device tensors)

    def start(self, batch) -> None:
        if self.stream is None or batch is None:
            return
        with torch.cuda.stream(self.stream):
            self.ahead = (batch, tuple(batch[k].to(self.device, non_blocking=True) for k in ("input", "target")))

    def take(self, batch) -> tuple:
        ahead, self.ahead = self.ahead, None
        if ahead is None or ahead[0] is not batch:
            return to_device(batch, self.device)
        current = torch.cuda.current_stream(self.device)
        current.wait_stream(self.stream)
        for t in ahead[1]:
            t.record_stream(current)
        return ahead[1]
