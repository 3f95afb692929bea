"""The `kernels` suite: the metric learner's kernels on one GPU, against a matmul and attention.

For each shape (B*h*dk learner rows: a preset's heads at a micro-batch) and each path
  eager    `MetricLearner` under bf16 autocast (PyTorch ops, one per GLU product),
  per-glu  `FusedMetricLearner` with one Triton kernel per GLU (`glu_kernel`, today's path),
  fused    `FusedMetricLearner` with the whole-learner op (`metric_kernel`, issue #24),
it reports the forward (no grad) and forward+backward time and TFLOP/s, and the errors of
the output, of dA0 and of the weight gradients against the same learner in fp32. Once per
run, two roofs: `matmul`, an N^3 bf16 torch.matmul (8192^3 by default), the device's practical
roof for large products; and `flash` / `cudnn`, torch's scaled_dot_product_attention kernels at
head width 64 (S = 1024, non-causal), the best-tuned kernels torch ships for a chain of products
over rows of width 64 (the learner's width), forward and backward, with their FLOPs counted the
same way (no recomputation).

Times are GPU times: each measured call is captured once as a CUDA graph and replayed (the
eager paths launch ~100-300 kernels per call, whose host overhead would otherwise be timed;
in training the layers are compiled and graph-captured too), median over replays. The
per-glu and eager paths run eagerly inside the graph: their LayerNorms and residual adds are
separate kernels, where training's compiled layers fuse some of them. TFLOP/s count the
model's FLOPs (spec §9: 6*R*n*a*dk per row forward, x3 forward+backward; a = 170, neither
the kernels' padding to 192 nor their recomputation counted).

A path that fails (a Triton kernel that does not compile, a wrong result) is a FAILED row
with its error, its traceback goes to stderr, the other rows still run, and the command
exits 1. `--smoke` runs on the CPU: the eager path in fp32 at a small shape; the CUDA rows
are listed as skipped.

    pldr-bench kernels --out benchmarks/results/kernels/h200
    pldr-bench kernels --resources --out benchmarks/results/kernels/sm90   # any machine: occupancy
"""
from __future__ import annotations

import json
import math
import os
import statistics
import sys
import time
import traceback
from dataclasses import asdict, dataclass

from ..errors import InputError
from . import report

SHAPES = "pldr-110m:16,pldr-110m:128,pldr-1b:16,pldr-1b:32"   # preset:micro-batch
SMOKE_SHAPES = "pldr-110m:1"
PATHS = ("eager", "per-glu", "fused")


@dataclass
class Row:
    shape: str                    # "pldr-110m mb16", "8192^3" for the matmul, "attn d64" for SDPA
    path: str                     # eager, per-glu, fused, matmul, flash, cudnn
    rows: int = 0                 # learner rows B*h*dk
    status: str = "ok"            # ok, skipped (...), FAILED: ...
    fwd_ms: float = 0.0
    fwd_bwd_ms: float = 0.0
    fwd_tflops: float = 0.0
    fwd_bwd_tflops: float = 0.0
    err_out: float = float("nan")   # max |A - A_fp32|
    err_dx: float = float("nan")    # max |dA0 - dA0_fp32| / max |dA0_fp32|
    err_dw: float = float("nan")    # max over parameters of max |g - g_fp32| / max |g_fp32|
    note: str = ""
    exit_code: int = 0


def parse_shapes(text: str) -> list:
    """'pldr-110m:16,pldr-1b:32' -> [(preset, micro_batch), ...]."""
    from ..model.config import PRESETS
    out = []
    for item in text.split(","):
        name, _, mb = item.strip().partition(":")
        if name not in PRESETS or not mb.isdigit() or int(mb) < 1:
            raise InputError(f"--shapes {item!r}: give PRESET:MICRO_BATCH with a preset of {', '.join(PRESETS)}")
        out.append((name, int(mb)))
    return out


def learner_flops(cfg, n_rows: int) -> float:
    """Forward model FLOPs of a metric learner over n_rows rows (spec §9)."""
    return 6.0 * cfg.num_residual_units * cfg.glus_per_unit * cfg.a_dff * cfg.head_dim * n_rows


def _time_graph(fn, iters: int, reset=None) -> tuple:
    """(median ms, note) of fn() on the GPU: warmed up (autotuning, compiling, allocations) on
    a side stream, reset() (gradients dropped, so that the captured backward writes fresh
    ones instead of accumulating), captured as a CUDA graph and replayed; timed eagerly if
    the capture fails."""
    import torch
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    if reset is not None:
        reset()
    note, run = "", fn
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        run = graph.replay
    except Exception as e:   # still timed, but with launch overheads: say so
        note = f"no CUDA graph ({type(e).__name__}); eager timing"
        torch.cuda.synchronize()
    run()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times), note


def _time_cpu(fn, iters: int) -> float:
    fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(1000 * (time.perf_counter() - t0))
    return statistics.median(times)


def make_learner(cfg, path: str, device):
    """The learner of one path, with the model's initialisation (xavier, zero biases) and
    the same weights for every path (same seed)."""
    import torch
    from ..model.fast import FusedMetricLearner
    from ..model.plga import MetricLearner
    torch.manual_seed(0)
    m = (MetricLearner if path in ("eager", "fp32") else FusedMetricLearner)(cfg)
    m.reset_xavier()
    if path == "per-glu":
        m.use_fused_learner = False
    elif path == "fused":
        m.use_fused_learner = True
    return m.to(device)


def _kernels_here(path: str, device) -> bool:
    """Whether a path's Triton kernels can run on device (CUDA; the CPU only in Triton's
    interpreter, which the tests use)."""
    import torch
    from ..model import glu_kernel, metric_kernel
    module = {"per-glu": glu_kernel, "fused": metric_kernel}.get(path)
    return module is None or module.available(torch.empty(0, device=device))


def _errors(cfg, path: str, x0, dy, ref, bf16: bool) -> tuple:
    """(err_out, err_dx, err_dw) of one path against the fp32 learner: max |out - ref|, and
    max |g - g_ref| / max |g_ref| for dA0 and for the worst parameter."""
    import torch
    m = make_learner(cfg, path, x0.device)
    x = x0.clone().requires_grad_(True)
    with torch.autocast(x0.device.type, torch.bfloat16, enabled=bf16):
        out = m(x)
    out.backward(dy)
    ref_out, ref_dx, ref_grads = ref
    err_out = (out.float() - ref_out).abs().max().item()
    err_dx = ((x.grad.float() - ref_dx).abs().max() / ref_dx.abs().max()).item()
    err_dw = max(((p.grad.float() - g).abs().max() / g.abs().max().clamp_min(1e-30)).item()
                 for p, g in zip(m.parameters(), ref_grads))
    if not (err_out < 0.25 * ref_out.abs().max().item() and err_dx < 0.25 and err_dw < 0.25):   # NaN fails too
        raise RuntimeError(f"{path} is wrong against fp32: errors out {err_out:.3g}, dx {err_dx:.3g}, dW {err_dw:.3g}")
    return err_out, err_dx, err_dw


def kernel_breakdown(fn, reset, calls: int = 3) -> str:
    """'kernel ms, ...' per call of fn (eager, under torch.profiler): which kernel a path's
    time goes to, largest first."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    reset()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    totals = {}
    for e in prof.key_averages():
        if e.device_type == torch.autograd.DeviceType.CUDA and e.self_device_time_total > 0:
            name = e.key.split("(")[0][:40]
            totals[name] = totals.get(name, 0.0) + e.self_device_time_total / 1e3 / calls
    top = sorted(totals.items(), key=lambda kv: -kv[1])[:6]
    return "kernels ms/call: " + ", ".join(f"{k} {v:.3f}" for k, v in top)


def _failed(e: Exception) -> str:
    """A row's status for an exception: its type and the first line of its message."""
    text = str(e).strip()
    return f"FAILED: {type(e).__name__}: {text.splitlines()[0][:200] if text else ''}"


def bench_path(cfg, shape: str, path: str, n_rows: int, device, iters: int, ref, log,
               breakdown: bool = False) -> Row:
    """One path at one shape: times, TFLOP/s and (given the fp32 reference) errors. bf16
    autocast except for the eager path on a CPU (the smoke run). breakdown: the time per
    kernel too (in the note)."""
    import torch
    row = Row(shape, path, n_rows)
    cuda = device.type == "cuda"
    if not _kernels_here(path, device):
        row.status = "skipped (needs CUDA)"
        return row
    bf16 = cuda or path != "eager"
    try:
        torch.manual_seed(1)
        x = torch.randn(n_rows, cfg.head_dim, device=device)
        dy = torch.randn(n_rows, cfg.head_dim, device=device)
        m = make_learner(cfg, path, device)
        xg = x.clone().requires_grad_(True)

        # (no autocast weight-cast cache: these calls are captured into CUDA graphs)
        def forward():
            with torch.no_grad(), torch.autocast(device.type, torch.bfloat16, enabled=bf16, cache_enabled=False):
                m(x)

        def forward_backward():
            with torch.autocast(device.type, torch.bfloat16, enabled=bf16, cache_enabled=False):
                out = m(xg)
            out.backward(dy)

        def drop_grads():
            xg.grad = None
            m.zero_grad(set_to_none=True)

        if ref is not None:       # first: a wrong path is reported as such, not timed
            row.err_out, row.err_dx, row.err_dw = _errors(cfg, path, x, dy, ref, bf16)
        if cuda:
            row.fwd_ms, note1 = _time_graph(forward, iters)
            row.fwd_bwd_ms, note2 = _time_graph(forward_backward, iters, drop_grads)
            row.note = "; ".join(n for n in (note1, note2) if n)
            if breakdown:
                row.note = "; ".join(n for n in (row.note, kernel_breakdown(forward_backward, drop_grads)) if n)
        else:
            row.fwd_ms = _time_cpu(forward, iters)
            row.fwd_bwd_ms = _time_cpu(forward_backward, iters)
            row.note = "CPU, " + ("bf16" if bf16 else "fp32")
        flops = learner_flops(cfg, n_rows)
        row.fwd_tflops = flops / row.fwd_ms / 1e9
        row.fwd_bwd_tflops = 3 * flops / row.fwd_bwd_ms / 1e9
    except Exception as e:   # noqa: BLE001 - a failing path is a reported row, not the end of the suite
        row.status, row.exit_code = _failed(e), 1
        log(f"{shape} {path} FAILED (traceback on stderr)")
        traceback.print_exc(file=sys.stderr)
    finally:
        if cuda:
            torch.cuda.empty_cache()
    return row


def reference(cfg, n_rows: int, device) -> tuple:
    """The fp32 learner's output, dA0 and parameter gradients for the timed inputs."""
    import torch
    torch.manual_seed(1)
    x = torch.randn(n_rows, cfg.head_dim, device=device).requires_grad_(True)
    dy = torch.randn(n_rows, cfg.head_dim, device=device)
    m = make_learner(cfg, "fp32", device)
    out = m(x)
    out.backward(dy)
    return out.detach(), x.grad, [p.grad for p in m.parameters()]


def bench_matmul(size: int, iters: int, device, log) -> Row:
    import torch
    row = Row(f"{size}^3", "matmul")
    if device.type != "cuda":
        row.status = "skipped (needs CUDA)"
        return row
    try:
        a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
        b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
        c = torch.empty(size, size, device=device, dtype=torch.bfloat16)
        ms, row.note = _time_graph(lambda: torch.matmul(a, b, out=c), iters)
        row.fwd_ms, row.fwd_tflops = ms, 2.0 * size ** 3 / ms / 1e9
    except Exception as e:   # noqa: BLE001
        row.status, row.exit_code = _failed(e), 1
        traceback.print_exc(file=sys.stderr)
    return row


ATTENTION_BACKENDS = ("flash", "cudnn")


def bench_attention(backend: str, iters: int, device, log, batch_heads: int = 256, seq: int = 1024,
                    dk: int = 64) -> Row:
    """SDPA at head width 64 through one of torch's fused kernels: what a tuned kernel for
    chained width-64 products reaches here (the learner's op is such a chain). Model FLOPs:
    4*S^2*dk per head forward (QK^T and PV), x3 forward+backward."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    row = Row(f"attn d{dk}", backend, batch_heads * seq)
    if device.type != "cuda":
        row.status = "skipped (needs CUDA)"
        return row
    which = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}[backend]
    try:
        q, k, v = (torch.randn(1, batch_heads, seq, dk, device=device, dtype=torch.bfloat16, requires_grad=True)
                   for _ in range(3))
        dy = torch.randn_like(q)

        def forward():
            with torch.no_grad(), sdpa_kernel(which):
                torch.nn.functional.scaled_dot_product_attention(q, k, v)

        def forward_backward():
            with sdpa_kernel(which):
                out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
            out.backward(dy)

        def drop_grads():
            q.grad = k.grad = v.grad = None

        row.fwd_ms, note1 = _time_graph(forward, iters)
        row.fwd_bwd_ms, note2 = _time_graph(forward_backward, iters, drop_grads)
        row.note = "; ".join(n for n in (note1, note2) if n)
        flops = 4.0 * batch_heads * seq * seq * dk
        row.fwd_tflops, row.fwd_bwd_tflops = flops / row.fwd_ms / 1e9, 3 * flops / row.fwd_bwd_ms / 1e9
    except Exception as e:   # noqa: BLE001 - a backend torch lacks here is a reported row
        row.status = _failed(e)
        log(f"attention {backend} FAILED (traceback on stderr)")
        traceback.print_exc(file=sys.stderr)
    finally:
        torch.cuda.empty_cache()
    return row


def _num(v: float, fmt: str, width: int) -> str:
    return f"{'-':>{width}}" if v is None or math.isnan(v) else f"{v:{width}{fmt}}"


def table(rows: list, device: str) -> str:
    how = ("eager in fp32 on the CPU, wall-clock median" if device.startswith("CPU") else
           "bf16 autocast; times: CUDA-graph replays, median")
    lines = [f"# {device}: metric learner, {how}. TFLOP/s: model FLOPs. "
             f"Errors vs fp32: out max abs; dx, dW max abs / max |ref| (dW: worst parameter)",
             f"{'shape':<16} {'path':<8} {'rows':>7} {'fwd ms':>8} {'TFLOP/s':>8} {'f+b ms':>8} {'TFLOP/s':>8} "
             f"{'err out':>8} {'err dx':>8} {'err dW':>8}  status"]
    for r in rows:
        ok = r.status == "ok"
        num = lambda v, fmt: _num(v if ok else None, fmt, 8)  # noqa: E731
        lines.append(f"{r.shape:<16} {r.path:<8} {r.rows or '':>7} {num(r.fwd_ms, '.3f')} {num(r.fwd_tflops, '.2f')} "
                     f"{num(r.fwd_bwd_ms or math.nan, '.3f')} {num(r.fwd_bwd_tflops or math.nan, '.2f')} "
                     f"{num(r.err_out, '.1e')} {num(r.err_dx, '.1e')} {num(r.err_dw, '.1e')}  "
                     + r.status + (f" ({r.note})" if r.note else ""))
    return "\n".join(lines)


def write(a, rows: list, meta: dict) -> None:
    if not a.out:
        return
    os.makedirs(a.out, exist_ok=True)
    stem = os.path.join(a.out, a.name or "kernels")
    with open(stem + ".txt", "w") as f:
        f.write(table(rows, meta["device"]) + "\n")
    with open(stem + ".json", "w") as f:
        results = [report.strict(asdict(r)) for r in rows]
        json.dump({"suite": "kernels", **meta, "time": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                   "args": {k: v for k, v in vars(a).items() if k != "func"}, "results": results}, f, indent=1)


def run(a, log=print) -> list:
    shapes = parse_shapes(a.shapes or (SMOKE_SHAPES if a.smoke else SHAPES))   # bad input refused first
    from ..model.config import preset
    if a.resources:
        from .kernel_resources import run as resources
        return resources(a, preset("tiny" if a.smoke and not a.shapes else shapes[0][0]), log)
    import torch
    if a.head_products:
        from .head_products_bench import run as head_products
        return head_products(a, shapes, torch.device("cuda" if torch.cuda.is_available() and not a.smoke else "cpu"),
                             log)
    from ..model import metric_kernel
    t0 = time.time()
    cuda = torch.cuda.is_available() and not a.smoke
    device = torch.device("cuda" if cuda else "cpu")
    meta = {"device": report.device_name(device.type), "torch": torch.__version__}
    try:
        import triton
        meta["triton"] = triton.__version__
    except ImportError:
        meta["triton"] = None
    iters = a.iters or (2 if a.smoke else 20)
    rows = [bench_matmul(a.matmul_size, iters, device, log)]
    rows += [bench_attention(backend, iters, device, log) for backend in ATTENTION_BACKENDS]
    write(a, rows, meta)
    refs = {}
    # Path by path, the new kernel last: a GPU fault there (sticky for the process) cannot
    # take the other paths' rows with it.
    for path in PATHS:
        for name, mb in shapes:
            cfg = preset(name)
            n_rows = mb * cfg.num_heads * cfg.head_dim
            shape = f"{name} mb{mb}"
            if cuda and shape not in refs:
                try:
                    refs[shape] = reference(cfg, n_rows, device)
                except Exception:   # noqa: BLE001 - the rows are still timed, without errors
                    log(f"{shape}: no fp32 reference (traceback on stderr)")
                    traceback.print_exc(file=sys.stderr)
                    refs[shape] = None
            rows.append(bench_path(cfg, shape, path, n_rows, device, iters, refs.get(shape), log))
            log(table(rows[-1:], meta["device"]).splitlines()[-1])
            meta["kernel_configs"] = metric_kernel.chosen_configs()
            write(a, rows, meta)      # after every row: a time limit still leaves the finished ones
    meta["wall_s"] = round(time.time() - t0, 1)
    rank = {f"{name} mb{mb}": i for i, (name, mb) in enumerate(shapes)}     # the table: shape by shape
    order = ("matmul",) + ATTENTION_BACKENDS + PATHS
    rows.sort(key=lambda r: (rank.get(r.shape, -1), order.index(r.path)))
    if a.sweep and cuda:
        from .kernel_sweep import sweep
        rows += sweep(shapes, device, iters, refs, log, lambda: write(a, rows, meta))
    write(a, rows, meta)
    log(table(rows, meta["device"]))
    log(f"kernel configs: {meta.get('kernel_configs')}; {meta['wall_s']} s")
    return rows


def add_parser(sub) -> None:
    p = sub.add_parser("kernels", help="metric-learner kernels: eager vs per-GLU Triton vs whole-learner op",
                       description=__doc__.splitlines()[0])
    p.add_argument("--shapes", help=f"PRESET:MICRO_BATCH,... (default {SHAPES}; smoke {SMOKE_SHAPES})")
    p.add_argument("--iters", type=int, default=0, help="timed replays per measurement (default 20; smoke 2)")
    p.add_argument("--matmul-size", type=int, default=8192, help="N of the N^3 bf16 matmul roof")
    p.add_argument("--sweep", action="store_true",
                   help="then time the whole-learner op under each candidate kernel config (kernel_sweep.py)")
    p.add_argument("--resources", action="store_true",
                   help="instead, no GPU needed: registers, spills, shared memory and programs per SM of each "
                        "whole-learner kernel config compiled for sm_90, for the first shape's learner "
                        "(kernel_resources.py; smoke: the tiny preset)")
    p.add_argument("--head-products", action="store_true",
                   help="instead: the A0 and q G Triton ops (model/head_products.py) against torch.matmul "
                        "(head_products_bench.py)")
    report.add_common(p, "kernels")     # --out, --name, --smoke (CPU: the eager path at a small shape)
    p.set_defaults(func=run)
