"""Training-step throughput of PLDR-LLM on one GPU, against the same model with G = I.

Precision: fp32 master parameters, bf16 autocast, fused AdamW. Sequence 1024, packed
random tokens (no pads). For each preset and micro-batch it times the eager model, the
fast path (`pldr_dist.model.fast.optimize_for_training`) and the fast path of the same
model in mode v510G with G fixed to the identity and the q@G product skipped (plain SDPA,
the upper bound). Median of CUDA-event timed steps after warm-up. Also: a bf16 numerics
check of the fast path against eager, a torch.profiler summary, and KV+G decode latency.

    PYTHONPATH=. python benchmarks/train_step.py --out results_dir
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

import torch

from pldr_dist.model import PLDRModel
from pldr_dist.model.config import preset
from pldr_dist.model.fast import optimize_for_training
from pldr_dist.model.flops import flops_per_token
from pldr_dist.model.model import InferenceCache, lm_loss

SEQ = 1024
PEAK, MATMUL_CEILING = 989e12, 798e12


def build(name, identity_g, fast, batch, graphs=True, triton_glu=True, fused_loss=True, keep_qg=False, **fast_opts):
    """(cfg, model, loss_of(tokens), optimizer). The fast path's loss is model(x, targets=y)
    (head and loss fused); fused_loss=False applies the compiled lm_loss to the logits instead
    (the previous fast path, for comparison); eager: lm_loss on the logits. keep_qg: the G = I
    model still multiplies q by I (gap_ladder.py: what the q@G product costs)."""
    torch.manual_seed(0)
    cfg = preset(name, mode="v510G", fixed_g="identity") if identity_g else preset(name)
    model = PLDRModel(cfg).cuda()
    for layer in model.layers:
        layer.attn.skip_identity_g = identity_g and not keep_qg
    if fast:
        optimize_for_training(model, cuda_graphs=graphs, triton_glu=triton_glu, **fast_opts)
    if fast and fused_loss:
        loss_of = lambda t: model(t[:, :-1], targets=t[:, 1:])  # noqa: E731
    else:
        loss_fn = torch.compile(lm_loss, fullgraph=True, dynamic=False) if fast else lm_loss
        loss_of = lambda t: loss_fn(model(t[:, :-1]), t[:, 1:])  # noqa: E731
    model.assume_unpadded = True
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    return cfg, model, loss_of, opt


def make_step(model, loss_of, opt, tokens):
    def step():
        torch.compiler.cudagraph_mark_step_begin()
        with torch.autocast("cuda", torch.bfloat16):
            loss = loss_of(tokens)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def time_steps(step, warmup=3, iters=10):
    for _ in range(warmup):
        step()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        step()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return statistics.median(times), (max(times) - min(times)) / statistics.median(times)


def bench(name, identity_g, fast, batch, log, graphs=True, triton_glu=True, label=None, keep_qg=False, **fast_opts):
    """One timed configuration; fast_opts go to optimize_for_training; label names the path."""
    torch._dynamo.reset()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    cfg, model, loss_of, opt = build(name, identity_g, fast, batch, graphs, triton_glu, keep_qg=keep_qg, **fast_opts)
    tokens = torch.randint(4, cfg.vocab_size, (batch, SEQ + 1), device="cuda")
    t0 = time.time()
    try:
        sec, spread = time_steps(make_step(model, loss_of, opt, tokens))
    except Exception as e:  # out of memory, or a compile failure: report and go on
        log(f"{name} B={batch} identity_g={identity_g} fast={fast} graphs={graphs}: {type(e).__name__} {str(e)[:300]}")
        return None
    tok_s = batch * SEQ / sec
    flops = tok_s * flops_per_token(cfg, SEQ)
    path = label or (("graph" if graphs else "fast") + ("" if triton_glu or identity_g else "-noglu") if fast else "eager")
    row = dict(model=name, attn="G=I (SDPA)" if identity_g else "PLGA", path=path,
               batch=batch, tok_s=tok_s, tflops=flops / 1e12, mfu=flops / PEAK,
               of_matmul=flops / MATMUL_CEILING, mem=torch.cuda.max_memory_allocated() / 2**30,
               spread=spread, wall=time.time() - t0)
    log(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
    del model, opt
    return row


def numerics_check(log, identity_g=False):
    """Fast path vs eager on the same weights and batch, both bf16 autocast: rel. errors.
    identity_g: the G = I model, whose gradients the power law's amplification does not mix."""
    torch._dynamo.reset()
    torch.manual_seed(1)
    cfg = preset("pldr-110m", mode="v510G", fixed_g="identity") if identity_g else preset("pldr-110m")
    eager = PLDRModel(cfg).cuda()
    fast = copy.deepcopy(eager)
    optimize_for_training(fast)
    tokens = torch.randint(4, cfg.vocab_size, (4, SEQ + 1), device="cuda")
    ref64 = copy.deepcopy(eager).double()
    out = {}
    for tag, model in (("eager", eager), ("fast", fast), ("fp64", ref64)):
        with torch.autocast("cuda", torch.bfloat16, enabled=tag != "fp64"):
            x, y = tokens[:, :-1], tokens[:, 1:]
            loss = model(x, targets=y) if tag == "fast" else lm_loss(model(x), y)
        loss.backward()
        out[tag] = (loss.double(), torch.cat([p.grad.double().flatten() for p in model.parameters()]))
    power = torch.cat([torch.full((p.numel(),), ".power." in n, device="cuda")
                       for n, p in eager.named_parameters()])
    for tag in ("eager", "fast"):
        dl = (out[tag][0] - out["fp64"][0]).abs().item() / out["fp64"][0].abs().item()
        msg = f"numerics{' G = I' if identity_g else ''} {tag} bf16 vs fp64: loss rel err {dl:.2e}"
        for part, sel in (("power-law params", power), ("other params", ~power)):
            ref = out["fp64"][1][sel]
            msg += f", {part} grad rel err {((out[tag][1][sel] - ref).norm() / ref.norm()).item():.2e}"
        log(msg)
    dg = ((out["fast"][1] - out["eager"][1]).norm() / out["eager"][1].norm()).item()
    log(f"numerics{' G = I' if identity_g else ''} fast vs eager (bf16): grad rel diff {dg:.2e}")


def profile(name, batch, path, log, row_limit=30, identity_g=False, **fast_opts):
    torch._dynamo.reset()
    torch.cuda.empty_cache()
    cfg, model, loss_of, opt = build(name, identity_g, True, batch, **fast_opts)
    tokens = torch.randint(4, cfg.vocab_size, (batch, SEQ + 1), device="cuda")
    step = make_step(model, loss_of, opt, tokens)
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(3):
            step()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=row_limit, max_name_column_width=90)
    with open(path, "w") as f:
        f.write(f"torch.profiler, {name} {'G = I' if identity_g else 'PLGA'} fast path (compiled layers, CUDA graphs), "
                f"batch {batch}, seq {SEQ}, 3 steps\n{table}\n")
    log(f"profile written ({name}, B={batch}, {'G = I' if identity_g else 'PLGA'})")


@torch.no_grad()
def decode_latency(log, prompt=128, new=128, batch=1):
    torch._dynamo.reset()
    torch.manual_seed(0)
    cfg = preset("pldr-110m")
    model = PLDRModel(cfg).cuda().eval()
    for mode, flags in (("kv+g", (True, True)), ("kv", (True, False))):
        for dtype in (torch.float32, torch.bfloat16):
            times = []
            for _ in range(3):
                cache = InferenceCache(cfg.num_layers, *flags)
                tok = torch.randint(4, cfg.vocab_size, (batch, prompt), device="cuda")
                with torch.autocast("cuda", dtype, enabled=dtype == torch.bfloat16):
                    nxt = model(tok, cache=cache)[:, -1].argmax(-1, keepdim=True)
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    for _ in range(new):
                        nxt = model(nxt, cache=cache)[:, -1].argmax(-1, keepdim=True)
                    torch.cuda.synchronize()
                times.append((time.perf_counter() - t0) / new)
            log(f"decode pldr-110m cache={mode} {str(dtype)[6:]} batch={batch} prompt={prompt}: "
                f"{statistics.median(times) * 1e3:.2f} ms/token (eager)")


def open_log(out_dir, name):
    """A log function that prints each line and appends it to out_dir/name as it goes."""
    os.makedirs(out_dir, exist_ok=True)
    logf = open(os.path.join(out_dir, name), "w")

    def log(msg):
        print(msg, flush=True)
        logf.write(msg + "\n")
        logf.flush()
    return log


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--no-decode", action="store_true", help="skip the decode latency section")
    args = ap.parse_args()
    log = open_log(args.out, "train_step_log.txt")
    log(f"{torch.cuda.get_device_name()} torch {torch.__version__}")
    numerics_check(log)
    # (preset, batches with CUDA graphs, batch also timed without graphs)
    plan = [("pldr-110m", [32, 64, 128], 128), ("pldr-1b", [8, 16], 16)]
    rows = []
    for name, batches, plain in plan:
        for b in batches:
            rows.append(bench(name, False, True, b, log))
            rows.append(bench(name, True, True, b, log))
        rows.append(bench(name, False, True, plain, log, graphs=False))
        rows.append(bench(name, True, True, plain, log, graphs=False))
    profile("pldr-110m", 128, os.path.join(args.out, "train_step_profile.txt"), log)
    if not args.no_decode:
        decode_latency(log)
    rows = [r for r in rows if r]
    log("\nmodel      attention    path  batch  tok/s     TFLOP/s  MFU    /798  mem GiB  PLGA/SDPA")
    for r in rows:
        ref = [s for s in rows if s["model"] == r["model"] and s["batch"] == r["batch"]
               and s["attn"] != "PLGA" and s["path"] == r["path"].replace("-noglu", "")]
        ratio = f"{r['tok_s'] / ref[0]['tok_s']:.2f}" if r["attn"] == "PLGA" and ref else ""
        log(f"{r['model']:<10} {r['attn']:<12} {r['path']:<5} {r['batch']:>5}  {r['tok_s']:>8.0f}  "
            f"{r['tflops']:>7.1f}  {r['mfu']:.1%}  {r['of_matmul']:.1%}  {r['mem']:>6.1f}  {ratio}")


if __name__ == "__main__":
    main()
