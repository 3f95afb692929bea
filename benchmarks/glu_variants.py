"""Launch configurations of the Triton GLU kernels, each timed on its own (one GPU).

Why: the weight-gradient kernel was 43% of the GLU's time at ~80 TFLOP/s. This sweeps its
row block, warps, pipeline stages and programs per SM, the forward and input-gradient
kernels' blocks with fp32 (autocast masters) and bf16 (DeepSpeed bf16) weights, and the
partial-sum step, against the previous kernels (commit a4edc8f), which the comparisons load
from benchmarks/_previous_glu_kernel.py when it is there (it is not kept in the repository):

    git show a4edc8f:pldr_dist/model/glu_kernel.py | sed 's/"pldr::/"pldr_old::/' \
        > benchmarks/_previous_glu_kernel.py
    PYTHONPATH=.:benchmarks python benchmarks/glu_variants.py --out results_dir
"""
from __future__ import annotations

import argparse
import importlib.util
import os

import torch
import triton
import triton.testing

import train_step
from pldr_dist.model import glu_kernel as gk

DK, A, BH = 64, 170, gk.BLOCK_HIDDEN
NCHUNK = triton.cdiv(A, BH)
# weight-gradient configs (rows per block, warps, stages): the first call's best, its
# neighbours and the previous default (a first, wider sweep: glu_variants_log_sweep1.txt)
CONFIGS = [(32, 4, 3), (32, 4, 4), (64, 4, 3), (32, 2, 3), (16, 2, 3), (16, 4, 3), (128, 8, 3)]


def previous_kernels():
    """The kernels of commit a4edc8f (ops renamed pldr_old::), or None if not provided."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_previous_glu_kernel.py")
    if not os.path.isfile(path):
        return None
    spec = importlib.util.spec_from_file_location("_previous_glu_kernel", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def inputs(n):
    """SM count, and bf16 rows x and output gradients dy [n, DK]."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    return sms, torch.randn(n, DK, device="cuda").bfloat16(), torch.randn(n, DK, device="cuda").bfloat16()


def us(fn):
    return 1e3 * triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median")


def weights(dtype):
    torch.manual_seed(0)
    mk = lambda *s: (torch.randn(*s, device="cuda") * 0.1).to(dtype)  # noqa: E731
    return mk(A, DK), mk(A), mk(A, DK), mk(A), mk(DK, A), mk(DK)


def sweep(n, log):
    sms, x, dy = inputs(n)
    for wdt in (torch.float32, torch.bfloat16):
        w1, b1, w2, b2, w3, b3 = weights(wdt)
        tag = f"N={n} weights {str(wdt)[6:]}"
        y = torch.empty_like(x)
        for bm, nw in ((64, 4), (128, 8), (32, 4), (64, 2)):
            t = us(lambda: gk._glu_fwd.fn[(triton.cdiv(n, bm),)](
                x, w1, b1, w2, b2, w3, b3, y, n, A, DK=DK, BH=BH, NCHUNK=NCHUNK, INTERP=False, BM=bm, num_warps=nw))
            log(f"{tag} fwd BM={bm} warps={nw}: {t:.1f} us")
        for bm, nw in ((64, 4), (128, 8), (32, 4), (64, 2)):
            t = us(lambda: gk._glu_bwd_input.fn[(triton.cdiv(n, bm),)](
                x, dy, w1, b1, w2, b2, w3, y, n, A, DK=DK, BH=BH, NCHUNK=NCHUNK, INTERP=False, BM=bm, num_warps=nw))
            log(f"{tag} input-grad BM={bm} warps={nw}: {t:.1f} us")
        R = 3 * BH * DK + 2 * BH + DK
        grads = [w.new_empty(w.shape) for w in (w1, b1, w2, b2, w3)] + [b1.new_empty(DK)]
        for P in (sms // 2, sms, 2 * sms):
            part = torch.empty(P, NCHUNK, R, device="cuda")
            old = previous_kernels()
            if old is not None:
                t = us(lambda: old._glu_bwd_weights.fn[(P, NCHUNK)](
                    x, dy, w1, b1, w2, b2, w3, part, n, A, P, DK=DK, BH=BH, NCHUNK=NCHUNK, INTERP=False, BM=32,
                    num_warps=4))
                log(f"{tag} weights OLD P={P} BM=32 warps=4: {t:.1f} us")
            for bm, nw, st in CONFIGS:
                t = us(lambda: gk._glu_bwd_weights.fn[(P, NCHUNK)](
                    x, dy, w1, b1, w2, b2, w3, part, n, A, P, DK=DK, BH=BH, NCHUNK=NCHUNK, INTERP=False,
                    BM=bm, num_warps=nw, num_stages=st))
                log(f"{tag} weights P={P} BM={bm} warps={nw} stages={st}: {t:.1f} us")
            t = us(lambda: gk._glu_sum_partials[(triton.cdiv(R, gk.SUM_BLOCK), NCHUNK)](
                part, *grads, A, P, DK=DK, BH=BH, NCHUNK=NCHUNK, BLOCK=gk.SUM_BLOCK, PB=gk.SUM_ROWS))
            t_old = us(lambda: part.sum(0))
            log(f"{tag} partial sums P={P}: kernel {t:.1f} us (all six gradients written), torch part.sum(0) alone {t_old:.1f} us")


def wgrad_sweep(n, log):
    """The weight-gradient kernel by hidden chunk width (register pressure), row block, warps
    and programs per chunk, each with its partial-sum kernel."""
    sms, x, dy = inputs(n)
    w1, b1, w2, b2, w3, b3 = weights(torch.float32)
    grads = [w.new_empty(w.shape) for w in (w1, b1, w2, b2, w3)] + [b1.new_empty(DK)]
    results = []
    for bh in (32, 64):
        nchunk = triton.cdiv(A, bh)
        R = 3 * bh * DK + 2 * bh + DK
        for P in (sms // 4, sms // 3, sms // 2):
            part = torch.empty(P, nchunk, R, device="cuda")
            t_sum = us(lambda: gk._glu_sum_partials[(triton.cdiv(R, gk.SUM_BLOCK), nchunk)](
                part, *grads, A, P, DK=DK, BH=bh, NCHUNK=nchunk, BLOCK=gk.SUM_BLOCK, PB=gk.SUM_ROWS))
            for bm, nw, st in ((32, 4, 3), (64, 4, 3), (64, 8, 3), (128, 8, 3), (128, 4, 3)):
                t = us(lambda: gk._glu_bwd_weights.fn[(P, nchunk)](
                    x, dy, w1, b1, w2, b2, w3, part, n, A, P, DK=DK, BH=bh, NCHUNK=nchunk, INTERP=False,
                    BM=bm, num_warps=nw, num_stages=st))
                results.append((t + t_sum, bh, P, bm, nw, st))
                log(f"N={n} weights BH={bh} P={P} BM={bm} warps={nw} stages={st}: {t:.1f} us + partial sums "
                    f"{t_sum:.1f} us = {t + t_sum:.1f} us")
    for r in sorted(results)[:5]:
        log(f"N={n} weight gradients, best: {r[0]:.1f} us at BH={r[1]} P={r[2]} BM={r[3]} warps={r[4]} stages={r[5]}")


def persistent(n, log):
    """Prototype persistent forward / input-gradient kernels (weights loaded once per program,
    glu_persistent_proto.py) against the shipped ones; output compared too."""
    import glu_persistent_proto as proto
    sms, x, dy = inputs(n)
    for wdt in (torch.float32, torch.bfloat16):
        w1, b1, w2, b2, w3, b3 = weights(wdt)
        tag = f"N={n} weights {str(wdt)[6:]}"
        ref, ref_dx, y, dx = (torch.empty_like(x) for _ in range(4))
        gk._glu_fwd.fn[(triton.cdiv(n, 64),)](x, w1, b1, w2, b2, w3, b3, ref, n, A, DK=DK, BH=BH, NCHUNK=NCHUNK,
                                               INTERP=False, BM=64, num_warps=4)
        gk._glu_bwd_input.fn[(triton.cdiv(n, 64),)](x, dy, w1, b1, w2, b2, w3, ref_dx, n, A, DK=DK, BH=BH,
                                                     NCHUNK=NCHUNK, INTERP=False, BM=64, num_warps=4)
        log(f"{tag} shipped fwd {us(lambda: gk._glu_fwd.fn[(triton.cdiv(n, 64),)](x, w1, b1, w2, b2, w3, b3, ref, n, A, DK=DK, BH=BH, NCHUNK=NCHUNK, INTERP=False, BM=64, num_warps=4)):.1f} us, "
            f"input-grad {us(lambda: gk._glu_bwd_input.fn[(triton.cdiv(n, 64),)](x, dy, w1, b1, w2, b2, w3, ref_dx, n, A, DK=DK, BH=BH, NCHUNK=NCHUNK, INTERP=False, BM=64, num_warps=4)):.1f} us")
        for bm, nw, st in ((64, 4, 2), (64, 8, 2), (128, 8, 2), (64, 4, 3), (128, 8, 3), (128, 4, 2)):
            for mult in (1, 2):
                P = sms * mult
                try:
                    tf = us(lambda: proto.glu_fwd_persistent[(P,)](x, w1, b1, w2, b2, w3, b3, y, n, A, P, DK=DK, BH=BH,
                                                                  BM=bm, num_warps=nw, num_stages=st))
                    ti = us(lambda: proto.glu_bwd_input_persistent[(P,)](x, dy, w1, b1, w2, b2, w3, dx, n, A, P, DK=DK,
                                                                        BH=BH, BM=bm, num_warps=nw, num_stages=st))
                except Exception as e:  # out of shared memory or registers
                    log(f"{tag} persistent BM={bm} warps={nw} stages={st} P={P}: {type(e).__name__} {str(e)[:120]}")
                    continue
                err = ((y.float() - ref.float()).norm() / ref.float().norm()).item()
                errx = ((dx.float() - ref_dx.float()).norm() / ref_dx.float().norm()).item()
                log(f"{tag} persistent BM={bm} warps={nw} stages={st} P={P}: fwd {tf:.1f} us, input-grad {ti:.1f} us "
                    f"(vs shipped: y {err:.1e}, dx {errx:.1e})")


def whole_op(n, log):
    """One GLU forward + backward through each op, GPU time from the profiler."""
    _, x0, dy = inputs(n)
    old = previous_kernels()
    ops = ([("previous", old.glu)] if old is not None else []) + [("new", gk.glu)]
    for wdt in (torch.float32, torch.bfloat16):
        ws = [w.requires_grad_(True) for w in weights(wdt)]
        for tag, op in ops:
            x = x0.clone().requires_grad_(True)

            def step():
                op(x, *ws).backward(dy)
            for _ in range(5):
                step()
            torch.cuda.synchronize()
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                for _ in range(20):
                    step()
                torch.cuda.synchronize()
            ks = {e.key: e.self_device_time_total / 20 for e in prof.key_averages()
                  if e.device_type == torch.autograd.DeviceType.CUDA and e.self_device_time_total > 0}
            top = ", ".join(f"{k[:36]} {v:.1f}" for k, v in sorted(ks.items(), key=lambda kv: -kv[1])[:7])
            log(f"op {tag} N={n} weights {str(wdt)[6:]}: {sum(ks.values()):.1f} us GPU; {top}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--wgrad", action="store_true", help="only the weight-gradient sweep")
    ap.add_argument("--persistent", action="store_true", help="only the persistent-kernel prototype")
    ap.add_argument("--op-only", action="store_true", help="only the whole op, previous vs new")
    args = ap.parse_args()
    log = train_step.open_log(args.out, "glu_variants_op_log.txt" if args.op_only else "glu_variants_persistent_log.txt" if args.persistent else "glu_variants_wgrad_log.txt" if args.wgrad else "glu_variants_log.txt")
    log(f"{torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__}")
    if args.persistent:
        persistent(64 * 14 * 64, log)
        return
    if args.wgrad:
        for n in (64 * 14 * 64, 16 * 32 * 64):
            wgrad_sweep(n, log)
        return
    for n in (64 * 14 * 64, 16 * 32 * 64):
        whole_op(n, log)
    if not args.op_only:
        sweep(64 * 14 * 64, log)


if __name__ == "__main__":
    main()
