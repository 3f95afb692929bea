"""The Triton metric-learner GLU (`pldr_dist.model.glu_kernel`) on one GPU.

1. Numerics: the kernel's output and gradients against fp64, beside the compiled PyTorch GLU
   under bf16 autocast (the path it replaces), and two backward passes compared bit for bit.
2. Speed of one GLU, forward + backward, at the row counts of pldr-110m (micro-batch 64) and
   pldr-1b (micro-batch 16): kernel vs compiled PyTorch (inductor).
3. Training steps of the fast path with and without the kernel, and G = I (train_step.bench).
4. A profile of the pldr-110m step with the kernel.

    PYTHONPATH=. python benchmarks/glu_kernel_bench.py --out results_dir
"""
from __future__ import annotations

import argparse
import os

import torch
import triton

from torch import nn

from pldr_dist.model import glu_kernel
from pldr_dist.model.layers import glu as torch_glu

import train_step  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

ROWS = {"pldr-110m mb64": 64 * 14 * 64, "pldr-1b mb16": 16 * 32 * 64}


class OneGLU(nn.Module):
    """One metric-learner GLU with its own weights: the Triton kernel (bf16) or PyTorch."""

    def __init__(self, dk: int, a: int, kernel: bool):
        super().__init__()
        self.u1, self.u2, self.u3, self.kernel = nn.Linear(dk, a), nn.Linear(dk, a), nn.Linear(a, dk), kernel

    def forward(self, y):
        ws = (self.u1.weight, self.u1.bias, self.u2.weight, self.u2.bias, self.u3.weight, self.u3.bias)
        if self.kernel:
            return glu_kernel.glu(y.reshape(-1, y.shape[-1]).to(torch.bfloat16), *ws).view(y.shape)
        return torch_glu(y, *ws)


def make_glu(dk=64, a=170, kernel=True):
    torch.manual_seed(0)
    return OneGLU(dk, a, kernel).cuda()


def rel(x, ref):
    return ((x.double() - ref).norm() / ref.norm()).item()


def numerics(n, log):
    x0 = torch.randn(n, 64, device="cuda")
    dy = torch.randn(n, 64, device="cuda").bfloat16()
    ref = make_glu(kernel=False).double()
    xr = x0.double().requires_grad_(True)
    ref(xr).backward(dy.double())
    want = [xr.grad] + [p.grad for p in ref.parameters()]
    for tag, glu in (("kernel", make_glu()), ("compiled torch", torch.compile(make_glu(kernel=False)))):
        grads = []
        for _ in range(2):
            x = x0.clone().requires_grad_(True)
            glu.zero_grad(set_to_none=True)
            with torch.autocast("cuda", torch.bfloat16):
                y = glu(x)
            y.backward(dy)
            grads.append([x.grad] + [p.grad for p in glu.parameters()])
        with torch.no_grad():
            yref = ref(x0.double())
        errs = " ".join(f"{name}={rel(g, w):.2e}" for name, g, w in
                        zip(("x", "w1", "b1", "w2", "b2", "w3", "b3"), grads[0], want))
        same = all(torch.equal(a, b) for a, b in zip(*grads))
        log(f"numerics {tag} N={n}: y={rel(y, yref):.2e} grads {errs}; repeat bit-identical: {same}")


def time_glu(n, kernel, log, label, iters=20):
    """GPU time of one GLU forward + backward: the sum of its kernels' device time (profiler),
    since launched one op at a time the host, not the GPU, sets the pace here."""
    glu = make_glu(kernel=kernel)
    if not kernel:
        glu = torch.compile(glu)
    x = torch.randn(n, 64, device="cuda", requires_grad=True)
    dy = torch.randn(n, 64, device="cuda").bfloat16()

    def step():
        with torch.autocast("cuda", torch.bfloat16):
            y = glu(x)
        y.backward(dy)
    for _ in range(5):
        step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            step()
        torch.cuda.synchronize()
    kernels = {}
    for e in prof.key_averages():
        t = getattr(e, "self_device_time_total", 0) or getattr(e, "self_cuda_time_total", 0)
        if t > 0 and e.device_type == torch.autograd.DeviceType.CUDA:
            kernels[e.key] = t / iters
    t = sum(kernels.values())
    flops = 3 * 2 * n * 3 * 64 * 170   # forward + backward, model FLOPs (no recompute)
    top = ", ".join(f"{k[:40]} {v:.1f}" for k, v in sorted(kernels.items(), key=lambda kv: -kv[1])[:6])
    log(f"glu {label} N={n} {'kernel' if kernel else 'compiled torch'}: {t:.1f} us GPU fwd+bwd, "
        f"{flops / t / 1e6:.1f} TFLOP/s (model FLOPs); us: {top}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--skip-steps", action="store_true")
    ap.add_argument("--steps-only", action="store_true", help="only the training-step comparison")
    ap.add_argument("--models", default="pldr-110m:64,pldr-1b:16", help="preset:micro-batch,...")
    ap.add_argument("--profile", action="store_true", help="with --steps-only: profile PLGA and G = I too")
    args = ap.parse_args()
    log = train_step.open_log(args.out, "glu_kernel_log.txt")
    log(f"{torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__}")
    if not args.steps_only:
        numerics(4099, log)
        for label, n in ROWS.items():
            for kernel in (True, False):
                time_glu(n, kernel, log, label)
        for kern in (glu_kernel._glu_fwd, glu_kernel._glu_bwd_input, glu_kernel._glu_bwd_weights):
            log(f"autotuned {kern.fn.__name__}: {kern.best_config}")
    if args.skip_steps:
        return
    rows = []
    for name, batch in (m.split(":") for m in args.models.split(",")):
        batch = int(batch)
        rows.append(train_step.bench(name, False, True, batch, log))
        rows.append(train_step.bench(name, False, True, batch, log, triton_glu=False))
        rows.append(train_step.bench(name, True, True, batch, log))
    if not args.steps_only or args.profile:
        train_step.profile("pldr-110m", 64, os.path.join(args.out, "glu_kernel_profile_110m_mb64.txt"), log,
                           row_limit=45)
    if args.profile:
        train_step.profile("pldr-110m", 64, os.path.join(args.out, "identity_profile_110m_mb64.txt"), log,
                           row_limit=45, identity_g=True)
    for r in rows:
        if r and r["attn"] == "PLGA":
            ref = [s for s in rows if s and s["model"] == r["model"] and s["attn"] != "PLGA"]
            if ref:
                log(f"{r['model']} B={r['batch']} {r['path']}: {r['tok_s']:.0f} tok/s, MFU {r['mfu']:.1%}, "
                    f"PLGA / G=I = {r['tok_s'] / ref[0]['tok_s']:.3f}")


if __name__ == "__main__":
    main()
