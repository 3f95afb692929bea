"""What a profiled step reports (train/profiling.py): the host reads of tensor values inside
steps, and where the GPU waited for the host, from profiler events made here."""
from types import SimpleNamespace

import pytest
import torch
from torch.profiler import profile, record_function

from pldr_dist.train.profiling import STEP_RANGE, gpu_idle, gpu_idle_lines, host_reads, host_waits


def test_host_reads_count_the_reads_inside_steps_by_phase_and_op():
    """host_reads over profiler events (real ones on one thread; the autograd
    thread of a GPU backward, which the CPU does not have, as events built here): reads inside a
    step count by phase and outermost op, reads of another thread during a step as "other
    thread", reads between steps not at all."""

    x = torch.ones(3)
    with profile() as prof:
        with record_function(STEP_RANGE):
            with record_function("pldr:optimizer_step"):
                x.sum().item()                                    # aten::item
                x.masked_fill_(x > 5, torch.tensor(0.0))          # reads its 0-dim fill value
            bool(x[x > 0].numel())                                # boolean indexing: aten::nonzero
            with record_function("pldr:forward"), record_function("pldr::glu"):   # a custom op is no phase
                x.max().item()
        x.sum().item()                                            # between steps
    assert host_reads(prof.events()) == {"pldr:optimizer_step aten::item": 1,
                                         "pldr:optimizer_step aten::masked_fill_": 1,
                                         "pldr:train_step aten::index": 1, "pldr:forward aten::item": 1}

    def event(name, start, parent=None):
        return SimpleNamespace(name=name, cpu_parent=parent, time_range=SimpleNamespace(start=start, end=start + 1))
    step = SimpleNamespace(name=STEP_RANGE, cpu_parent=None, time_range=SimpleNamespace(start=10, end=20))
    hook = event("aten::add_", 12)
    inside = event("aten::_local_scalar_dense", 13, event("aten::item", 13, hook))
    after = event("aten::_local_scalar_dense", 25, event("aten::item", 25))
    assert host_reads([step, hook, inside, after]) == {"other thread aten::add_": 1}


def test_gpu_idle_splits_the_idle_time_by_the_innermost_phase_and_names_the_host_ops_of_the_gaps():
    """Two steps of a timeline (chrome-trace events, us): kernels on two streams overlap (counted
    once), idle time goes to the innermost `pldr:` range above it (the step's own range is not a
    phase) or outside them, and each long gap lists the host ops that ran during it."""
    def span(cat, name, start, end, tid=1):
        return {"ph": "X", "cat": cat, "name": name, "ts": start * 1000, "dur": (end - start) * 1000, "tid": tid}
    events = [span("user_annotation", STEP_RANGE, 0, 100), span("user_annotation", STEP_RANGE, 120, 220)]
    for offset in (0, 120):
        events += [span("user_annotation", "pldr:forward", offset, offset + 40),
                   span("user_annotation", "pldr:backward", offset + 40, offset + 80),
                   span("user_annotation", "pldr:optimizer_step", offset + 80, offset + 100)]
    events += [span("cpu_op", "aten::copy_", 45, 60), span("cpu_op", "pldr::glu", 60, 75),   # an op, not a phase
               span("kernel", "k1", 5, 30), span("kernel", "k2", 20, 45), span("kernel", "k3", 70, 90),
               span("kernel", "k4", 130, 210), span("gpu_memcpy", "copy", 205, 215), span("kernel", "k5", 225, 230),
               {"ph": "i", "cat": "kernel", "name": "instant", "ts": 1}]
    # where the host waited for the GPU: a blocking copy in step 1's forward (named by its outermost
    # op), a hook's sync in step 2's backward on the autograd thread (an op of the main thread
    # around it in time is not its op), a driver sync under no op; not counted: a sync between
    # steps, a launch (no wait)
    events += [span("cpu_op", "aten::to", 2, 8), span("cpu_op", "aten::copy_", 3, 7),
               span("cuda_runtime", "cudaStreamSynchronize", 4, 6),
               span("cpu_op", "autograd::engine::evaluate_function: PreBackwardFunctionForModuleBackward", 165, 175, tid=2),
               span("cpu_op", "aten::mm", 160, 180), span("cuda_runtime", "cudaEventSynchronize", 170, 173, tid=2),
               span("cuda_driver", "cuStreamSynchronize", 85, 86), span("cuda_runtime", "cudaStreamSynchronize", 105, 110),
               span("cuda_runtime", "cudaLaunchKernel", 10, 11)]
    summary = gpu_idle(events, steps=2, top=2)
    # busy 25 + 15 + 20 + 80 + 5 + 5 = 150 ms of 0..230; gaps 0-5, 45-70, 90-130, 215-225
    assert summary["span_ms"] == pytest.approx(115) and summary["busy_ms"] == pytest.approx(75)
    assert summary["busy"] == pytest.approx(150 / 230)
    assert summary["idle_by_phase"] == pytest.approx({"pldr:backward": 12.5, "(outside the step's phases)": 12.5,
                                                      "pldr:forward": 7.5, "pldr:optimizer_step": 7.5})
    assert list(summary["idle_by_phase"])[:2] == ["pldr:backward", "(outside the step's phases)"]
    assert [(g["ms"], g["at_ms"]) for g in summary["gaps"]] == [(40, 90), (25, 45)]
    # each kernel's own time a step (overlaps not removed: k1 and k2 both count), largest first
    assert summary["kernels"] == pytest.approx({"k4": 40, "k2": 12.5, "k1": 12.5, "k3": 10, "copy": 5, "k5": 2.5})
    assert list(summary["kernels"])[0] == "k4"
    assert summary["gaps"][0]["host"] == {}
    assert summary["gaps"][1]["host"] == pytest.approx({"aten::copy_": 15, "pldr::glu": 10})
    lines = gpu_idle_lines(summary)
    assert lines[0] == ("GPU busy 75.0 ms of 115.0 ms a step (65.2%); idle 40.0 ms a step, by host phase (ms): "
                        "pldr:backward 12.50, (outside the step's phases) 12.50, pldr:forward 7.50, pldr:optimizer_step 7.50")
    assert lines[3] == "GPU idle 25.00 ms at +45.0 ms; host meanwhile (ms): aten::copy_ 15.00; pldr::glu 10.00"
    hook = "pldr:backward autograd::engine::evaluate_function: PreBackwardFunctionForModuleBackward"[:14 + 70]
    waits = summary["host_waits"]
    assert waits["ms"] == pytest.approx(3.0) and waits["calls"] == pytest.approx(1.5)
    rounded = lambda where: {k: (round(v["ms"], 9), round(v["calls"], 9)) for k, v in where.items()}  # noqa: E731
    assert rounded(waits["where"]) == {hook: (1.5, 0.5), "pldr:forward aten::to": (1.0, 0.5)}
    assert lines[1] == (f"host waited for the GPU 3.00 ms a step in 1.5 sync calls, by phase and op (ms): "
                        f"{hook} 1.50 (0.5 calls); pldr:forward aten::to 1.00 (0.5 calls)")
    assert rounded(host_waits(events, steps=2, top=3)["where"])["pldr:optimizer_step -"] == (0.5, 0.5)
    # a CPU run's timeline has no GPU events
    assert gpu_idle([e for e in events if e["cat"] not in ("kernel", "gpu_memcpy")], steps=2) is None


def test_host_copy_returns_each_value_as_a_number():
    """The trainer's log line reads its step's loss and gradient norm through HostCopy (on GPUs a
    pinned copy waited on by event, so the read does not wait for the next step): tensors come
    back as numbers, numbers and None as they are."""
    from pldr_dist.parallel.host_copy import HostCopy

    copy = HostCopy(torch.tensor(2.5), None, 3, torch.tensor([True]))
    assert copy.read() == [2.5, None, 3, True]
    assert copy.read() == [2.5, None, 3, True]     # a second read gives the same
