"""Reading a device value of an earlier step without waiting for the steps queued after it."""
from __future__ import annotations

import torch


class HostCopy:
    """Device values copied to pinned host memory at this point of the stream; reading them
    waits for that point only.

    Why: `.item()` or `float()` on a CUDA tensor synchronizes the whole stream, so a value
    of step N read once step N+1 is queued waits for step N+1 as well. The trainer's log line
    did that (H100, pldr-110m: ~3 ms of GPU idle at every step's start while the host launched
    the next step; docs/performance.md). Values: tensors of one element, numbers or None."""

    def __init__(self, *values):
        self.values, self.event, self.host = list(values), None, None
        self.on_device = [i for i, v in enumerate(values) if isinstance(v, torch.Tensor) and v.is_cuda]
        if self.on_device:
            stacked = torch.stack([values[i].detach().reshape(()).to(torch.float64) for i in self.on_device])
            self.host = torch.empty(stacked.shape, dtype=torch.float64, pin_memory=True)
            self.host.copy_(stacked, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()

    def read(self) -> list:
        """The values as Python numbers (None stays None)."""
        if self.event is not None:
            self.event.synchronize()
            for k, i in enumerate(self.on_device):
                self.values[i] = self.host[k].item()
            self.event = None
        return [v.item() if isinstance(v, torch.Tensor) else v for v in self.values]
