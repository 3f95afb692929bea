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


HOST_READ_OPS = ("aten::_local_scalar_dense", "aten::nonzero")   # .item()/bool()/float(); boolean indexing
STEP_RANGE = "pldr:train_step"      # trainer.py: one optimizer step, every phase of it


def host_reads(events) -> dict:
    """{"<phase> <op>": count} of the ops inside training steps that read a tensor's value on the
    host. On a GPU each one waits for every kernel queued before it, and the GPU then idles
    while the host launches what follows; a step without any lets the host run ahead. <phase> is
    the innermost `pldr:` range (train/build.py), or "other thread" for ops that run during a
    step in another thread (on GPUs autograd runs the backward, and its hooks, in a thread of
    its own); <op> is the outermost op that reads (a direct `.item()` is `aten::item`;
    `aten::masked_fill_` reads a tensor-valued fill value). The trainer's own reads between
    steps are not counted: the loss when it logs, and the previous step's skip flag
    (trainer.py), which is already on the host."""
    events = list(events)
    steps = [(e.time_range.start, e.time_range.end) for e in events if e.name == STEP_RANGE]
    counts: dict = {}
    for event in events:
        if event.name not in HOST_READ_OPS:
            continue
        chain, parent = [], event.cpu_parent
        while parent is not None:
            chain.append(parent.name)
            parent = parent.cpu_parent
        if STEP_RANGE in chain:
            inner = chain[:chain.index(STEP_RANGE) + 1]      # innermost first
            phase = next(name for name in inner if name.startswith("pldr:"))
            inner = inner[:inner.index(phase)]
        elif any(start <= event.time_range.start <= end for start, end in steps):
            phase, inner = "other thread", chain
        else:
            continue
        ops = [name for name in inner if name.startswith("aten::")]
        key = f"{phase} {ops[-1] if ops else event.name}"
        counts[key] = counts.get(key, 0) + 1
    return counts


class StepProfiler:
    """torch.profiler over steps [first, last] (rank 0): the top kernels and ops by device time,
    then by host time (what keeps the CPU from launching the next kernels), go to
    run_dir/profile.txt, the timeline to run_dir/profile_trace.json (chrome://tracing, Perfetto),
    and the host reads of tensor values per step (`host_reads`) to the log and to metrics.jsonl:
    what makes the GPU wait for the host inside a step."""

    def __init__(self, steps: list, run_dir: str, log):
        self.first, self.last = steps if steps else (0, 0)
        self.run_dir, self.log, self.prof = run_dir, log, None

    def before(self, step: int) -> None:
        if step == self.first:
            from torch.profiler import ProfilerActivity, profile
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
            self.prof = profile(activities=activities)
            self.prof.__enter__()

    def after(self, step: int) -> Optional[dict]:
        """At the last profiled step: writes the reports, returns the host reads per step
        (`host_reads`, divided by the number of steps)."""
        if self.prof is None or step != self.last:
            return None
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.prof.__exit__(None, None, None)
        key = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
        averages = self.prof.key_averages()
        steps = self.last - self.first + 1
        reads = {k: n / steps for k, n in host_reads(self.prof.events()).items()}
        where = ", ".join(f"{n:g} in {k}" for k, n in sorted(reads.items(), key=lambda kv: -kv[1]))
        summary = (f"host reads of tensor values inside the step: {sum(reads.values()):g} per step"
                   + (f" ({where})" if where else ""))
        path = os.path.join(self.run_dir, "profile.txt")
        with open(path + ".tmp", "w") as f:      # temporary names, renamed: never half a report
            f.write(f"# steps {self.first}-{self.last}: {summary}\n")
            f.write(f"# steps {self.first}-{self.last}, sorted by {key}\n{averages.table(sort_by=key, row_limit=30)}\n")
            if key != "self_cpu_time_total":
                f.write(f"\n# the same steps, sorted by cpu_time_total (host time, children included)\n"
                        f"{averages.table(sort_by='cpu_time_total', row_limit=40)}\n")
        os.replace(path + ".tmp", path)
        trace = os.path.join(self.run_dir, "profile_trace.json")
        self.prof.export_chrome_trace(trace + ".tmp.json")
        os.replace(trace + ".tmp.json", trace)
        self.log(f"profile of steps {self.first}-{self.last} written to {path}; {summary}")
        self.prof = None
        return reads
