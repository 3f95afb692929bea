"""Probe: does inductor's max-autotune (Triton GEMM templates with fused epilogues, chosen by
timing) speed up the PLGA layer over the shipped reduce-overhead compile? pldr-110m, B=64,
stand-alone step of benchmarks/train_step.py; PLGA and G = I, both modes, one process.
    PYTHONPATH=. python benchmarks/gpu_autotune_probe.py
"""
import sys
import time

import torch

sys.path.insert(0, "benchmarks")
from train_step import PEAK, SEQ, build, make_step, time_steps  # noqa: E402

from pldr_dist.model.flops import flops_per_token  # noqa: E402


def run(identity_g: bool, mode: str, batch: int = 64):
    torch._dynamo.reset()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    cfg, model, loss_fn, opt = build("pldr-110m", identity_g, True, batch)
    if mode != "reduce-overhead":
        for layer in model.layers:
            layer.compile(fullgraph=True, dynamic=False, mode=mode)
    tokens = torch.randint(4, cfg.vocab_size, (batch, SEQ + 1), device="cuda")
    t0 = time.time()
    sec, spread = time_steps(make_step(model, loss_fn, opt, tokens))
    tok_s = batch * SEQ / sec
    mfu = tok_s * flops_per_token(cfg, SEQ) / PEAK
    print(f"{'G=I ' if identity_g else 'PLGA'} {mode:<16} B={batch}: {tok_s:>9,.0f} tokens/s  MFU {100 * mfu:4.1f}%  "
          f"spread {spread:.3f}  mem {torch.cuda.max_memory_allocated() / 2**30:5.1f} GiB  wall {time.time() - t0:5.0f} s",
          flush=True)
    return tok_s


if __name__ == "__main__":
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    base = run(False, "reduce-overhead")
    eye = run(True, "reduce-overhead")
    tuned = run(False, "max-autotune")
    print(f"PLGA / G=I: reduce-overhead {base / eye:.3f}, PLGA max-autotune / G=I reduce-overhead {tuned / eye:.3f}")
    if "--identity" in sys.argv:
        eye_tuned = run(True, "max-autotune")
        print(f"max-autotune both: {tuned / eye_tuned:.3f}")
