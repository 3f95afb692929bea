"""What a profiled step spends its time on (`log.profile_steps`, rank 0): torch.profiler's top
ops by device and host time, the host reads of tensor values inside steps, and where the GPU
waited for the host. A step that keeps its GPU busy is bound by kernels; one whose GPU idles is
bound by the host (launches, DeepSpeed's per-tensor work, syncs), and no faster kernel helps it."""
from __future__ import annotations

import json
import os
from typing import Optional

import torch

HOST_READ_OPS = ("aten::_local_scalar_dense", "aten::nonzero")   # .item()/bool()/float(); boolean indexing
STEP_RANGE = "pldr:train_step"      # trainer.py: one optimizer step, every phase of it


def is_phase(name: str) -> bool:
    """A host phase's range (`pldr:forward`, train/build.py), not one of the model's custom ops
    (`pldr::glu`), which the profiler shows under their own names too."""
    return name.startswith("pldr:") and not name.startswith("pldr::")


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
            phase = next(name for name in inner if is_phase(name))
            inner = inner[:inner.index(phase)]
        elif any(start <= event.time_range.start <= end for start, end in steps):
            phase, inner = "other thread", chain
        else:
            continue
        ops = [name for name in inner if name.startswith("aten::")]
        key = f"{phase} {ops[-1] if ops else event.name}"
        counts[key] = counts.get(key, 0) + 1
    return counts


GPU_EVENTS = ("kernel", "gpu_memcpy", "gpu_memset")
KERNEL_NAME, KERNEL_MIN_MS = 100, 0.005   # gpu_idle's per-kernel times: name length kept, smallest kept
HOST_EVENTS = ("cpu_op", "python_function", "user_annotation")
OUTSIDE = "(outside the step's phases)"
# CUDA calls in which the host waits for the GPU (a blocking `.to()` is cudaMemcpyAsync, then a
# cudaStreamSynchronize); after each the GPU has nothing queued and idles while the host launches.
SYNC_CALLS = ("cudaStreamSynchronize", "cudaEventSynchronize", "cudaDeviceSynchronize", "cudaMemcpy",
              "cuStreamSynchronize", "cuEventSynchronize", "cuCtxSynchronize")


def host_waits(trace_events: list, steps: int, top: int = 5) -> dict:
    """Where the host waited for the GPU inside the profiled steps, per step: `ms` and `calls` in
    all, and `where`: {"<phase> <op>": {"ms", "calls"}} for the `top` costliest places, <phase>
    the innermost `pldr:` range around the call (any thread: on GPUs autograd runs the backward
    in a thread of its own) and <op> the outermost host op around it on its own thread (an
    autograd node names the hook or function that synchronized; "-" for none)."""
    spans = [e for e in trace_events if e.get("ph") == "X" and "dur" in e]
    host = [e for e in spans if e.get("cat") in HOST_EVENTS]
    step_spans = [(e["ts"], e["ts"] + e["dur"]) for e in host if e["name"] == STEP_RANGE]
    phases = [e for e in host if is_phase(e["name"]) and e["name"] != STEP_RANGE]
    ops = [e for e in host if not is_phase(e["name"])]
    where: dict = {}
    for w in spans:
        if w.get("cat") not in ("cuda_runtime", "cuda_driver") or w["name"] not in SYNC_CALLS:
            continue
        a, b = w["ts"], w["ts"] + w["dur"]
        if not any(lo <= a and b <= hi for lo, hi in step_spans):
            continue
        around = [e for e in phases if e["ts"] <= a and b <= e["ts"] + e["dur"]]
        phase = min(around, key=lambda e: e["dur"])["name"] if around else OUTSIDE
        outer = [e for e in ops if e.get("tid") == w.get("tid") and e["ts"] <= a and b <= e["ts"] + e["dur"]]
        op = max(outer, key=lambda e: e["dur"])["name"][:70] if outer else "-"
        entry = where.setdefault(f"{phase} {op}", {"ms": 0.0, "calls": 0})
        entry["ms"] += w["dur"] / 1e3 / steps
        entry["calls"] += 1 / steps
    ranked = sorted(where.items(), key=lambda kv: -kv[1]["ms"])
    return {"ms": sum(v["ms"] for v in where.values()), "calls": sum(v["calls"] for v in where.values()),
            "where": dict(ranked[:top])}


def gpu_idle(trace_events: list, steps: int, top: int = 5) -> Optional[dict]:
    """Where the GPU waited over the profiled steps, from the timeline's events (chrome-trace
    dicts, times in us), per step: `span_ms` (from the first step's start, or its first kernel, to
    the last kernel's end), `busy_ms` (some kernel, copy or memset running, on any stream),
    `busy` (their ratio), `idle_by_phase` (the idle time under each innermost `pldr:` range of
    the step, train/build.py, or OUTSIDE them: the trainer's bookkeeping), the `top`
    longest `gaps` with the host ops that ran during each, and `kernels`: each kernel's (copy's,
    memset's) GPU time a step by name, largest first, those of at least KERNEL_MIN_MS (what
    `pldr-bench trainer` compares between runs). None without GPU events (a CPU run)."""
    spans = [e for e in trace_events if e.get("ph") == "X" and "dur" in e]
    gpu = sorted((e["ts"], e["ts"] + e["dur"]) for e in spans if e.get("cat") in GPU_EVENTS)
    if not gpu:
        return None
    host = [e for e in spans if e.get("cat") in HOST_EVENTS]
    step_starts = [e["ts"] for e in host if e["name"] == STEP_RANGE]
    start = min([gpu[0][0]] + step_starts)
    busy, gaps, end = 0.0, [], start
    for a, b in gpu:
        if a > end:
            gaps.append((end, a))
        busy += max(0.0, b - max(a, end))
        end = max(end, b)
    phases = [(e["ts"], e["ts"] + e["dur"], e["name"]) for e in host
              if is_phase(e["name"]) and e["name"] != STEP_RANGE]
    idle_by_phase: dict = {}
    for a, b in gaps:
        cuts = sorted({a, b} | {t for lo, hi, _ in phases for t in (lo, hi) if a < t < b})
        for lo, hi in zip(cuts, cuts[1:]):       # each piece lies under one innermost range, or none
            under = [(p_hi - p_lo, name) for p_lo, p_hi, name in phases if p_lo <= lo and hi <= p_hi]
            name = min(under)[1] if under else OUTSIDE
            idle_by_phase[name] = idle_by_phase.get(name, 0.0) + (hi - lo)
    longest = []
    for a, b in sorted(gaps, key=lambda g: g[1] - g[0], reverse=True)[:top]:
        during: dict = {}
        for e in host:              # host ops overlapping the gap, by the time they overlap it
            overlap = min(b, e["ts"] + e["dur"]) - max(a, e["ts"])
            if overlap > 0 and not is_phase(e["name"]):
                during[e["name"][:70]] = during.get(e["name"][:70], 0.0) + overlap
        ops = sorted(during.items(), key=lambda kv: -kv[1])[:4]
        longest.append({"ms": (b - a) / 1e3, "at_ms": (a - start) / 1e3, "host": {n: t / 1e3 for n, t in ops}})
    per_step = 1e3 * steps
    kernels: dict = {}
    for e in spans:
        if e.get("cat") in GPU_EVENTS:
            name = e["name"][:KERNEL_NAME]
            kernels[name] = kernels.get(name, 0.0) + e["dur"] / per_step
    return {"span_ms": (end - start) / per_step, "busy_ms": busy / per_step, "busy": busy / (end - start),
            "idle_by_phase": {n: t / per_step for n, t in sorted(idle_by_phase.items(), key=lambda kv: -kv[1])},
            "gaps": longest, "host_waits": host_waits(trace_events, steps, top),
            "kernels": {n: ms for n, ms in sorted(kernels.items(), key=lambda kv: -kv[1]) if ms >= KERNEL_MIN_MS}}


def gpu_idle_lines(summary: dict) -> list:
    """gpu_idle's summary as the lines profile.txt and the log show."""
    phases = ", ".join(f"{name} {ms:.2f}" for name, ms in summary["idle_by_phase"].items())
    lines = [f"GPU busy {summary['busy_ms']:.1f} ms of {summary['span_ms']:.1f} ms a step ({100 * summary['busy']:.1f}%); "
             f"idle {summary['span_ms'] - summary['busy_ms']:.1f} ms a step, by host phase (ms): {phases or '-'}"]
    waits = summary.get("host_waits")
    if waits:
        places = "; ".join(f"{name} {w['ms']:.2f} ({w['calls']:g} calls)" for name, w in waits["where"].items())
        lines.append(f"host waited for the GPU {waits['ms']:.2f} ms a step in {waits['calls']:g} sync calls"
                     + (f", by phase and op (ms): {places}" if places else ""))
    for gap in summary["gaps"]:
        ops = "; ".join(f"{name} {ms:.2f}" for name, ms in gap["host"].items())
        lines.append(f"GPU idle {gap['ms']:.2f} ms at +{gap['at_ms']:.1f} ms; host meanwhile (ms): {ops or '-'}")
    return lines


class StepProfiler:
    """torch.profiler over steps [first, last] (rank 0). Writes run_dir/profile.txt: where the GPU
    waited for the host (gpu_idle) and the host reads inside the steps on top, then the top
    kernels and ops by device time and by host time (what keeps the CPU from launching the next
    kernels); and the timeline, run_dir/profile_trace.json (chrome://tracing, Perfetto). The
    summary also goes to the log and, through the trainer, to metrics.jsonl."""

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
        """At the last profiled step: writes the reports and returns what metrics.jsonl keeps:
        `host_reads` (per step), and on GPUs `gpu_busy` and `gpu_idle` (gpu_idle's summary)."""
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
        trace = os.path.join(self.run_dir, "profile_trace.json")
        self.prof.export_chrome_trace(trace + ".tmp.json")
        os.replace(trace + ".tmp.json", trace)
        try:        # the report is an aid: a timeline it cannot read must not end the run
            with open(trace) as f:
                idle = gpu_idle(json.load(f).get("traceEvents", []), steps)
        except (OSError, ValueError, KeyError, TypeError) as err:
            idle = None
            self.log(f"profile: {trace} could not be read back for the GPU's idle time ({err})")
        idle_lines = gpu_idle_lines(idle) if idle else []
        path = os.path.join(self.run_dir, "profile.txt")
        with open(path + ".tmp", "w") as f:      # temporary names, renamed: never half a report
            for line in idle_lines + [summary]:
                f.write(f"# steps {self.first}-{self.last}: {line}\n")
            f.write(f"# steps {self.first}-{self.last}, sorted by {key}\n{averages.table(sort_by=key, row_limit=30)}\n")
            if key != "self_cpu_time_total":
                f.write(f"\n# the same steps, sorted by cpu_time_total (host time, children included)\n"
                        f"{averages.table(sort_by='cpu_time_total', row_limit=40)}\n")
        os.replace(path + ".tmp", path)
        self.log(f"profile of steps {self.first}-{self.last} written to {path}; {summary}"
                 + (f"; {idle_lines[0]}" if idle_lines else ""))
        self.prof = None
        out = {"host_reads_per_step": sum(reads.values()), "host_reads": reads}
        if idle:
            out.update(gpu_busy=idle["busy"], gpu_idle=idle)
        return out
