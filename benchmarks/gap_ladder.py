"""Where PLGA's gap to G = I goes, measured in one process on one GPU (stand-alone step).

The ladder removes the deductive path's parts one at a time, from the shipped PLGA step down
to the G = I upper bound, so the differences between neighbouring rungs are what each part
costs inside the whole compiled step (not in isolation):
  PLGA                  the shipped fast path;
  GLUs free             every metric-learner GLU returns its input (the kernels never run);
  metric learner free   A = LayerNorm(A0): no residual units, no unit LayerNorms either;
  G = I, q@G kept       no A0, no power law; q is still multiplied by a per-head I;
  G = I                 plain SDPA on q (train_step.py's upper bound).
The middle rungs are timing bounds, not models anyone would train; their MFU column uses the
full PLGA FLOP count, so only their tokens/s and step times mean anything.

Two probes of the parts PLGA shares with G = I, each on both models:
  coord-descent   inductor's coordinate-descent tuning of the compiled pointwise and
                  reduction kernels (LayerNorms, gating, rotary);
  bf16 residual   the decoder's residual stream and LayerNorm outputs in bf16 (Megatron's
                  default; ours keeps them fp32 as autocast does): a numerics change,
                  measured to size it, not shipped.

    PYTHONPATH=.:benchmarks python benchmarks/gap_ladder.py --models pldr-110m:128,pldr-1b:32 --out DIR
"""
from __future__ import annotations

import argparse
import contextlib

import torch

from pldr_dist.model import fast, model as model_mod, plga

import train_step  # noqa: E402  (benchmarks/ is on sys.path)


@contextlib.contextmanager
def patched(*patches):
    """Temporarily replace attributes: (object, name, value) triples."""
    old = [(obj, name, getattr(obj, name)) for obj, name, _ in patches]
    for obj, name, value in patches:
        setattr(obj, name, value)
    try:
        yield
    finally:
        for obj, name, value in old:
            setattr(obj, name, value)


def _bf16_after_attention(self, a, x):
    h = self.norm1(a + x).to(torch.bfloat16)
    return self.norm2(self.ffn(h) + h).to(torch.bfloat16)


def _bf16_embedding(self, x):
    return self.norm(self.tokens(x) * self.scale).to(torch.bfloat16)


GLUS_FREE = [(fast.FusedMetricLearner, "glu", lambda self, y, r, j: y)]
LEARNER_FREE = [(plga.MetricLearner, "forward", lambda self, a0: self.in_norm(a0))]
BF16_RESIDUAL = [(model_mod.DecoderLayer, "after_attention", _bf16_after_attention),
                 (model_mod.Embedding, "forward", _bf16_embedding)]

# (label, G = I, keep q@G, attribute patches, inductor config overrides)
LADDER = [
    ("PLGA", False, False, [], {}),
    ("GLUs free", False, False, GLUS_FREE, {}),
    ("metric learner free", False, False, LEARNER_FREE, {}),
    ("G = I, q@G kept", True, True, [], {}),
    ("G = I", True, False, [], {}),
]
PROBES = [
    ("PLGA coord-descent", False, False, [], {"coordinate_descent_tuning": True}),
    ("G = I coord-descent", True, False, [], {"coordinate_descent_tuning": True}),
    ("PLGA bf16 residual", False, False, BF16_RESIDUAL, {}),
    ("G = I bf16 residual", True, False, BF16_RESIDUAL, {}),
]


def run(name, batch, variant, log):
    label, identity_g, keep_qg, patches, inductor = variant
    with patched(*patches), torch._inductor.config.patch(inductor):
        row = train_step.bench(name, identity_g, True, batch, log, label=label, keep_qg=keep_qg)
    if row:
        row["step_ms"] = batch * train_step.SEQ / row["tok_s"] * 1e3
    return row


def report(rows, log):
    log("\nmodel      batch  rung / probe            tok/s    step ms   MFU    of G=I  share of the gap")
    for name, batch in dict.fromkeys((r["model"], r["batch"]) for r in rows):
        mine = {r["path"]: r for r in rows if (r["model"], r["batch"]) == (name, batch)}
        if "PLGA" not in mine or "G = I" not in mine:
            continue
        base, top = mine["G = I"]["step_ms"], mine["PLGA"]["step_ms"]
        rungs = {v[0] for v in LADDER}
        prev = None
        for label, *_ in LADDER + PROBES:
            r = mine.get(label)
            if r is None:
                continue
            share = ""
            if label in rungs:
                if prev is not None:
                    share = f"{(prev - r['step_ms']) / (top - base):6.1%} (the rung above minus this)"
                prev = r["step_ms"]
            log(f"{name:<10} {batch:>5}  {label:<22} {r['tok_s']:>8.0f}  {r['step_ms']:>7.1f}  "
                f"{r['mfu']:.1%}  {base / r['step_ms']:.3f}   {share}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--models", default="pldr-110m:128,pldr-1b:32", help="preset:micro-batch,...")
    ap.add_argument("--no-probes", action="store_true")
    args = ap.parse_args()
    log = train_step.open_log(args.out, f"gap_ladder_{args.models.replace(':', '_mb').replace(',', '_')}.txt")
    log(f"{torch.cuda.get_device_name()} torch {torch.__version__}")
    rows = []
    for spec in args.models.split(","):
        name, batch = spec.split(":")[0], int(spec.split(":")[1])
        for variant in LADDER + ([] if args.no_probes else PROBES):
            rows.append(run(name, batch, variant, log))
        rows.append(run(name, batch, LADDER[0], log))   # PLGA again: the call's drift
    rows = [r for r in rows if r]
    # the repeated PLGA row: keep the first for the table, log the drift
    for name, batch in dict.fromkeys((r["model"], r["batch"]) for r in rows):
        plga_rows = [r for r in rows if (r["model"], r["batch"], r["path"]) == (name, batch, "PLGA")]
        if len(plga_rows) > 1:
            log(f"{name} B={batch}: PLGA {plga_rows[0]['tok_s']:.0f} first, {plga_rows[-1]['tok_s']:.0f} last")
            rows.remove(plga_rows[-1])
    report(rows, log)


if __name__ == "__main__":
    main()
