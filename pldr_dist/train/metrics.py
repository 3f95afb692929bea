"""Rank-0 metrics: a JSON-lines file, TensorBoard scalars and a console progress line;
plus G_LM statistics gathered from every rank (the quantity the paper is about)."""
from __future__ import annotations

import json
import math
import os
import resource
import time
from typing import Optional

import torch
import torch.distributed as dist


def peak_memory_mib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # CPU: peak RSS (KiB on Linux)


class MetricsLog:
    def __init__(self, run_dir: str, enabled: bool, tensorboard: bool, total_steps: int):
        self.enabled, self.total_steps = enabled, total_steps
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.writer = None
        if enabled:
            os.makedirs(run_dir, exist_ok=True)
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter
                self.writer = SummaryWriter(os.path.join(run_dir, "tensorboard"))
        self.started = time.time()
        self.step_times: list[float] = []

    def write(self, step: int, values: dict, console: Optional[str] = None) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": round(time.time() - self.started, 3), **values}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self.writer.add_scalar(key, value, step)
            self.writer.flush()
        if console:
            print(console, flush=True)

    def eta(self, step: int, step_time: float) -> str:
        self.step_times = (self.step_times + [step_time])[-50:]
        remaining = (self.total_steps - step) * sum(self.step_times) / len(self.step_times)
        h, rem = divmod(int(remaining), 3600)
        return f"{h}:{rem // 60:02d}:{rem % 60:02d}"

    def close(self):
        if self.writer is not None:
            self.writer.close()


class GStats:
    """Per-layer distance of G_LM from the identity, ||G - I||_F / ||I||_F, averaged over the
    batch and heads of every rank, captured by forward hooks on the PowerLaw modules during
    the ordinary training forward (no extra compute, works for any TP/PP layout).

    The hooks accumulate into a float64 tensor on the model's device and never read a value
    back: inside a compiled layer the hook is part of the graph, where a host sync or a CPU
    tensor would break it (the graph then updates the sums as an input mutation)."""

    def __init__(self, model: torch.nn.Module, num_layers: int):
        from ..model.plga import PowerLaw
        self.num_layers = num_layers
        self.active = False
        device = next(model.parameters()).device
        self.sums = torch.zeros(num_layers, 3, dtype=torch.float64, device=device)  # dist sum, mean sum, count
        self.handles = []
        index = 0
        for module in model.modules():
            if isinstance(module, PowerLaw):
                layer = getattr(module, "layer_index", index)
                self.handles.append(module.register_forward_hook(self._hook(layer)))
                index += 1

    def _hook(self, layer: int):
        def hook(module, inputs, outputs):
            if not self.active:
                return
            g = outputs[2].detach().to(self.sums.device, torch.float64)
            eye = torch.eye(g.shape[-1], dtype=g.dtype, device=g.device)
            dist_ = (g - eye).flatten(-2).norm(dim=-1) / math.sqrt(g.shape[-1])   # [B, h]
            count = torch.full((), float(dist_.numel()), dtype=g.dtype, device=g.device)
            self.sums[layer] += torch.stack((dist_.sum(), g.mean(dim=(-1, -2)).sum(), count))
        return hook

    def collect(self) -> dict:
        """All ranks call this; returns {'g_dist/layer_i': ..., 'g_mean/layer_i': ...}."""
        sums = self.sums.clone()
        self.sums.zero_()
        if dist.is_initialized():   # on the model's device: NCCL reduces device tensors only
            dist.all_reduce(sums)
        sums = sums.cpu()
        out = {}
        for i in range(self.num_layers):
            if sums[i, 2] > 0:
                out[f"g_dist/layer_{i}"] = float(sums[i, 0] / sums[i, 2])
                out[f"g_mean/layer_{i}"] = float(sums[i, 1] / sums[i, 2])
        return out
