"""The `step` suite: one GPU's stand-alone training step, PLGA against the same model with G = I.

Why: what the model costs by itself, without the trainer's data, DeepSpeed or host work. For
each model and micro-batch it times PLGA and the same model in mode v510G with G fixed to the
identity and the q@G product skipped (plain SDPA attention: the upper bound, so PLGA / G = I is
what the deductive path costs). fp32 master weights, bf16 autocast, fused AdamW, packed random
tokens (no pads), loss `model(x, targets=y)`. Paths: `graphs` is the trainer's
(`optimize_for_training`: Triton metric learner, each layer compiled and replayed as a CUDA
graph, head and loss fused), `compiled` the same without CUDA graphs, `uncompiled` its parts
without torch.compile, `eager` the plain model with `lm_loss` on the logits. `--metric-kernel`
picks the fast path's metric learner as `train.metric_kernel` does (learner, glu, pytorch; a
comma list times PLGA once per kernel against one G = I run).

Reported per run: the median of timed steps after warm-up (CUDA events), its spread, tokens/s,
TFLOP/s and MFU (model FLOPs of `model.flops` / --peak-tflops), peak memory, the warm-up's
time (compilation and capture), and PLGA / G = I. On the CPU (`--smoke`) fp32, no autocast.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

from ..errors import InputError
from . import report

PATHS = ("graphs", "compiled", "uncompiled", "eager")
METRIC_KERNELS = ("learner", "glu", "pytorch")
ATTENTION = ("plga", "identity")


@dataclass
class Row:
    model: str
    attention: str                    # plga, or identity (G = I, q@G skipped)
    path: str
    micro_batch: int
    seq_len: int
    metric_kernel: str = ""           # the learner's kernels on the fast path (PLGA rows)
    exit_code: int = 0
    tokens_per_s: float = 0.0
    step_ms: float = 0.0
    spread: float = 0.0               # (slowest - fastest) / median of the timed steps
    tflops: float = 0.0
    mfu: float = 0.0
    memory_mib: float = 0.0           # peak allocated (CUDA; 0 on the CPU)
    warmup_s: float = 0.0             # the warm-up steps: compilation and graph capture
    plga_over_identity: float = 0.0   # PLGA rows: tokens/s over the G = I row of the same batch
    error: str = ""


def parse_model(text: str) -> tuple[str, list]:
    """'pldr-110m:64,128' -> ('pldr-110m', [64, 128])."""
    from ..model.config import PRESETS
    name, _, batches = text.partition(":")
    if name not in PRESETS or not batches:
        raise InputError(f"--model {text!r}: give PRESET:MICRO_BATCH[,MICRO_BATCH...] with PRESET one of "
                         f"{', '.join(PRESETS)}")
    return name, report.int_list(batches)


def build(name: str, attention: str, path: str, seq_len: int, device: str, metric_kernel: str = "learner"):
    """(cfg, model, loss_of(tokens), optimizer) for one run."""
    import torch
    from ..model import PLDRModel, lm_loss, preset
    from ..model.fast import optimize_for_training

    torch.manual_seed(0)
    extra = {"mode": "v510G", "fixed_g": "identity"} if attention == "identity" else {}
    cfg = preset(name, **extra)
    if seq_len > cfg.context_length:
        cfg = preset(name, **extra, context_length=seq_len)
    model = PLDRModel(cfg).to(device)
    for layer in model.layers:
        layer.attn.skip_identity_g = attention == "identity"
    if path != "eager":
        optimize_for_training(model, compile=path != "uncompiled", cuda_graphs=path == "graphs",
                              triton_glu=metric_kernel != "pytorch", fused_learner=metric_kernel == "learner")
        loss_of = lambda t: model(t[:, :-1], targets=t[:, 1:])  # noqa: E731
    else:
        loss_of = lambda t: lm_loss(model(t[:, :-1]), t[:, 1:])  # noqa: E731
    model.assume_unpadded = True
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device == "cuda")
    return cfg, model, loss_of, opt


def time_run(a, name: str, attention: str, batch: int, device: str, log, metric_kernel: str = "learner") -> Row:
    import torch
    from ..model.flops import flops_per_token

    row = Row(name, attention, a.path, batch, a.seq_len, metric_kernel if attention == "plga" else "")
    cuda = device == "cuda"
    if cuda:
        torch._dynamo.reset()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    try:
        cfg, model, loss_of, opt = build(name, attention, a.path, a.seq_len, device, metric_kernel)
        tokens = torch.randint(4, cfg.vocab_size, (batch, a.seq_len + 1), device=device)

        def step():
            if a.path == "graphs":
                torch.compiler.cudagraph_mark_step_begin()
            with torch.autocast("cuda", torch.bfloat16, enabled=cuda):
                loss = loss_of(tokens)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        t0 = time.perf_counter()
        for _ in range(a.warmup):
            step()
        if cuda:
            torch.cuda.synchronize()
        row.warmup_s = time.perf_counter() - t0
        times = []
        for _ in range(a.iters):
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                step()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                t = time.perf_counter()
                step()
                times.append(time.perf_counter() - t)
    except Exception as e:   # out of memory, a compile failure: reported, the other runs go on
        row.exit_code, row.error = 1, f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        log(f"  {name} {attention} {row.metric_kernel} mb {batch}: {row.error}")
        return row
    sec = statistics.median(times)
    row.step_ms, row.spread = 1e3 * sec, (max(times) - min(times)) / sec
    row.tokens_per_s = batch * a.seq_len / sec
    row.tflops = row.tokens_per_s * flops_per_token(cfg, a.seq_len) / 1e12
    row.mfu = row.tflops / a.peak_tflops
    row.memory_mib = torch.cuda.max_memory_allocated() / 2**20 if cuda else 0.0
    log(f"  {name} {attention:<8} {row.metric_kernel:<7} mb {batch:>4}: {row.tokens_per_s:,.0f} tokens/s, {100 * row.mfu:.1f}% MFU, "
        f"{row.step_ms:.1f} ms/step, warm-up {row.warmup_s:.0f} s")
    del model, opt
    return row


def table(rows: list, device: str, a) -> str:
    lines = [f"# {device}: stand-alone training step, path {a.path}, seq {a.seq_len}, "
             f"median of {a.iters} steps after {a.warmup}; MFU of {a.peak_tflops:g} TFLOP/s",
             f"{'model':<10} {'attention':<9} {'learner':<7} {'mb':>4} {'tokens/s':>10} {'TFLOP/s':>8} {'MFU':>6} {'step ms':>8} "
             f"{'spread':>6} {'mem MiB':>8} {'warm-up s':>9} {'PLGA/G=I':>8}"]
    for r in rows:
        if r.exit_code:
            lines.append(f"{r.model:<10} {r.attention:<9} {r.metric_kernel:<7} {r.micro_batch:>4} FAILED: {r.error}")
            continue
        ratio = f"{r.plga_over_identity:8.3f}" if r.plga_over_identity else ""
        lines.append(f"{r.model:<10} {r.attention:<9} {r.metric_kernel:<7} {r.micro_batch:>4} {r.tokens_per_s:>10,.0f} {r.tflops:>8.1f} "
                     f"{100 * r.mfu:>5.1f}% {r.step_ms:>8.1f} {r.spread:>6.3f} {r.memory_mib:>8.0f} "
                     f"{r.warmup_s:>9.1f} {ratio:>8}")
    return "\n".join(lines)


def run(a, log=print) -> list:
    import torch
    if a.smoke:
        a.model, a.seq_len, a.path = a.model or ["tiny:2"], 32, "uncompiled"
        a.warmup, a.iters = 1, 3
    models = [parse_model(m) for m in (a.model or ["pldr-110m:64,128", "pldr-1b:16,32"])]
    if a.iters < 1 or a.warmup < 0 or a.seq_len < 1:
        raise InputError("--iters and --seq-len must be positive, --warmup not negative")
    if not a.attention or set(a.attention) - set(ATTENTION):
        raise InputError(f"--attention {','.join(a.attention)}: give plga, identity or plga,identity")
    if not a.metric_kernel or set(a.metric_kernel) - set(METRIC_KERNELS):
        raise InputError(f"--metric-kernel {','.join(a.metric_kernel)}: give a comma list of {', '.join(METRIC_KERNELS)}")
    device = "cuda" if torch.cuda.is_available() and not a.smoke else "cpu"
    if device == "cpu" and a.path in ("graphs", "compiled") and not a.smoke:
        raise InputError(f"--path {a.path} needs a GPU; on the CPU use --path uncompiled or eager (or --smoke)")
    name = report.device_name(device)
    rows = []
    for model, batches in models:
        for batch in batches:
            plga = [time_run(a, model, "plga", batch, device, log, mk) for mk in a.metric_kernel] \
                if "plga" in a.attention else []
            identity = [time_run(a, model, "identity", batch, device, log)] if "identity" in a.attention else []
            for row in plga:
                if identity and identity[0].tokens_per_s:
                    row.plga_over_identity = row.tokens_per_s / identity[0].tokens_per_s
            rows += plga + identity
            report.write(a, rows, table(rows, name, a), name)   # after every pair: a time limit keeps the rest
    log(table(rows, name, a))
    return rows


def add_parser(sub) -> None:
    p = sub.add_parser("step", help="stand-alone training step: PLGA vs G = I, tokens/s, MFU, memory",
                       description=__doc__.splitlines()[0])
    p.add_argument("--model", action="append",
                   help="PRESET:MICRO_BATCH[,...] (repeat; default pldr-110m:64,128 and pldr-1b:16,32)")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--path", choices=PATHS, default="graphs", help="fast-path variant (default: the trainer's)")
    p.add_argument("--attention", type=lambda s: s.split(","), default=list(ATTENTION),
                   help="plga,identity (default both)")
    p.add_argument("--metric-kernel", type=lambda s: s.split(","), default=["learner"],
                   help="the PLGA rows' metric learner: glu, learner, pytorch or a comma list (default learner, the trainer's)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--peak-tflops", type=float, default=989.0, help="MFU denominator (H100/H200 dense bf16: 989)")
    report.add_common(p, "step")
    p.set_defaults(func=run)
