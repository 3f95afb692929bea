"""What each part of the fast path gives, in one process on one GPU (stand-alone step).

The parts added together (each can be turned off: `optimize_for_training`'s options, the
benchmark's own loss for fused_loss, `glu_kernel.SIGMOID_TANH` for the tanh sigmoid):
- rope_cache: the rotary cos/sin table loaded, not recomputed per element;
- pad_ffn: the feed-forward hidden width zero-padded to a multiple of 64;
- fused_loss: head + cross-entropy as one autograd step, `model(x, targets=y)`
  (`model/head_loss.py`; off: the compiled lm_loss on the logits);
- tanh: the GLU kernels' sigmoid through tanh.approx.

For each model: PLGA and G = I with everything on and with all four off (the previous fast
path), and with --ablate PLGA with each part off alone. Then the numerics of the full fast
path against eager bf16 and fp64 (train_step.numerics_check) and of one GLU with each sigmoid.

    PYTHONPATH=.:benchmarks python benchmarks/step_parts_ab.py --models pldr-110m:64 --ablate --out DIR
"""
from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F

from pldr_dist.model import glu_kernel
from pldr_dist.model.head_loss import head_loss
from pldr_dist.model.model import lm_loss

import glu_kernel_bench  # noqa: E402  (benchmarks/ is on sys.path)
import train_step  # noqa: E402

PARTS = ("rope_cache", "pad_ffn", "fused_loss", "tanh")


def run(name, batch, identity_g, off, log):
    opts = {p: p not in off for p in PARTS if p != "tanh"}
    glu_kernel.SIGMOID_TANH = "tanh" not in off
    label = "all-on" if not off else ("before" if set(off) == set(PARTS) else "no-" + "+".join(sorted(off)))
    try:
        return train_step.bench(name, identity_g, True, batch, log, label=label, **opts)
    finally:
        glu_kernel.SIGMOID_TANH = True


def head_loss_numerics(log, rows=8192, d=896, vocab=32000):
    """The fused head + loss against the plain head and loss, both bf16 (autocast and bf16
    weights), and fp64: relative errors of the loss and of the h, W and b gradients."""
    torch.manual_seed(0)
    head = torch.nn.Linear(d, vocab).cuda()
    h = torch.randn(1, rows, d, device="cuda")
    targets = torch.randint(1, vocab, (1, rows), device="cuda")
    targets[0, :100] = 0   # pad positions, ignored

    def grads(fn, dtype, autocast):
        hd = torch.nn.Linear(d, vocab).cuda().to(dtype)
        hd.load_state_dict(head.state_dict())
        x = h.to(dtype).detach().requires_grad_(True)
        with torch.autocast("cuda", torch.bfloat16, enabled=autocast):
            loss = fn(x, hd, targets)
        loss.backward()
        return [loss.double(), x.grad.double(), hd.weight.grad.double(), hd.bias.grad.double()]
    plain = lambda x, hd, t: lm_loss(F.linear(x, hd.weight, hd.bias), t)  # noqa: E731
    fused = lambda x, hd, t: head_loss(x, hd, t)  # noqa: E731
    ref = grads(plain, torch.float64, False)
    for name, fn in (("plain", plain), ("fused", fused)):
        for tag, dtype, autocast in (("bf16 autocast", torch.float32, True), ("bf16 weights", torch.bfloat16, False)):
            errs = " ".join(f"{k}={((a - b).norm() / b.norm()).item():.2e}"
                            for k, a, b in zip(("loss", "h", "W", "b"), grads(fn, dtype, autocast), ref))
            log(f"head+loss {name} {tag} vs fp64: {errs}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--models", default="pldr-110m:64", help="preset:micro-batch,...")
    ap.add_argument("--ablate", action="store_true", help="PLGA with each part off alone")
    ap.add_argument("--numerics", action="store_true")
    ap.add_argument("--no-before", action="store_true", help="skip the runs with all four parts off")
    ap.add_argument("--profile", action="store_true", help="profile the first model, PLGA and G = I, all on")
    args = ap.parse_args()
    log = train_step.open_log(args.out, "step_parts_log.txt")
    log(f"{torch.cuda.get_device_name()} torch {torch.__version__}")
    if args.numerics:
        for tanh in (True, False):
            glu_kernel.SIGMOID_TANH = tanh
            log(f"GLU sigmoid {'tanh.approx' if tanh else 'exact (tl.sigmoid)'}:")
            glu_kernel_bench.numerics(4099, log)
        glu_kernel.SIGMOID_TANH = True
        head_loss_numerics(log)
        train_step.numerics_check(log, identity_g=True)
        train_step.numerics_check(log)
    rows = []
    models = [(m.split(":")[0], int(m.split(":")[1])) for m in args.models.split(",")]
    for name, batch in models:
        rows += [run(name, batch, False, (), log), run(name, batch, True, (), log)]
        if not args.no_before:
            rows += [run(name, batch, False, PARTS, log), run(name, batch, True, PARTS, log)]
        if args.ablate:
            rows += [run(name, batch, False, (part,), log) for part in PARTS]
    if args.profile:
        name, batch = models[0]
        for identity_g in (False, True):
            tag = "identity" if identity_g else "plga"
            train_step.profile(name, batch, os.path.join(args.out, f"profile_{tag}_{name}_mb{batch}.txt"), log,
                               row_limit=50, identity_g=identity_g)
    log("\nmodel      batch  attention    path                 tok/s    MFU    mem GiB  PLGA/G=I (same path)")
    for r in filter(None, rows):
        ref = [s for s in filter(None, rows) if s["model"] == r["model"] and s["batch"] == r["batch"] and s["attn"] != "PLGA"
               and s["path"] == (r["path"] if r["path"] in ("all-on", "before") else "all-on")]
        ratio = f"{r['tok_s'] / ref[0]['tok_s']:.3f}" if r["attn"] == "PLGA" and ref else ""
        log(f"{r['model']:<10} {r['batch']:>5}  {r['attn']:<12} {r['path']:<18} {r['tok_s']:>8.0f}  "
            f"{r['mfu']:.1%}  {r['mem']:>6.1f}  {ratio}")


if __name__ == "__main__":
    main()
