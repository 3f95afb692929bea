"""Table and plots of the 2-GPU runs (gpu_multi_gpu.sh): loss curves of every layout over the
one-GPU run's, throughput per layout against its one-GPU reference.

    python benchmarks/plot_multi_gpu.py [benchmarks/results/multi_gpu]

Reference of each layout: the compiled one-GPU run ("single") for the compiled layouts (DP with
ZeRO-1/2), the eager one ("single_eager") for those that run eagerly (TP, PP, ZeRO-3). Throughput
is the median over the steady steps (110m: 20-150; 1b: 10-50 without the TP run's profiled steps
30-31). Writes multi_gpu_table.md and multi_gpu.png into the folder.
"""
from __future__ import annotations

import json
import os
import statistics
import sys

LAYOUTS = {  # name: (label, reference, launcher)
    "single": ("1 GPU, compiled", None, "python -m"),
    "single_eager": ("1 GPU, eager", None, "python -m"),
    "dp_z1": ("DP=2 ZeRO-1, compiled", "single", "torchrun"),
    "dp_z2": ("DP=2 ZeRO-2, compiled", "single", "deepspeed"),
    "dp_z3": ("DP=2 ZeRO-3, eager", "single_eager", "torchrun"),
    "tp": ("TP=2, eager", "single_eager", "torchrun"),
    "tp_sp": ("TP=2 + SP, eager", "single_eager", "deepspeed"),
    "pp": ("PP=2 (1F1B, 2 micro-batches), eager", "single_eager", "torchrun"),
    "tp_fast": ("TP=2, fast-path kernels", "single", "torchrun"),
    "tp_sp_fast": ("TP=2 + SP, fast-path kernels", "single", "deepspeed"),
    "pp_fast": ("PP=2 (4 micro-batches), fast-path kernels", "single", "torchrun"),
}


def load(folder: str) -> dict:
    runs = {}
    for name in LAYOUTS:
        path = os.path.join(folder, f"{name}.jsonl")
        if os.path.isfile(path):
            runs[name] = [json.loads(line) for line in open(path) if '"loss"' in line]
    return runs


PROFILED = {"1b": (30, 31)}   # steps gpu_multi_gpu.sh profiles (the 1b TP run): not steady


def steady(rows: list, first: int, sub: str) -> list:
    return [r for r in rows if r["step"] >= first and r["step"] not in PROFILED.get(sub, ())]


def table(preset: str, runs: dict, first: int, sub: str) -> list[str]:
    med = {n: statistics.median(r["tokens_per_s"] for r in steady(rows, first, sub)) for n, rows in runs.items()}
    out = [f"### {preset}", "",
           "| layout | launcher | tokens/s | MFU | step (ms) | peak memory / GPU (GiB) | vs its 1-GPU reference | last loss (step) | loss - 1 GPU's: mean abs, last 20 steps | max abs (at step) |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    base = {r["step"]: r["loss"] for r in runs["single"]}
    for name, rows in runs.items():
        label, ref, launcher = LAYOUTS[name]
        s = steady(rows, first, sub)
        mfu = statistics.median(r["mfu"] for r in s)
        step_ms = 1000 * statistics.median(r["step_time_s"] for r in s)
        mem = max(r["memory_mib"] for r in rows) / 1024
        if ref is None:
            vs = "reference"
        elif name.startswith("dp"):
            vs = f"{med[name] / (2 * med[ref]):.1%} scaling efficiency (vs {LAYOUTS[ref][0]})"
        else:
            vs = f"{med[name] / med[ref]:.2f}x (vs {LAYOUTS[ref][0]})"
        diffs = [(abs(r["loss"] - base[r["step"]]), r["step"]) for r in rows if r["step"] in base]
        tail = statistics.mean(d for d, _ in diffs[-20:])
        worst = max(diffs)
        last = rows[-1]
        out.append(f"| {label} | {launcher} | {med[name]:,.0f} | {mfu:.1%} | {step_ms:.0f} | {mem:.1f} | {vs} | "
                   f"{last['loss']:.4f} ({last['step']}) | {tail:.4f} | {worst[0]:.4f} ({worst[1]}) |")
    return out


def main() -> None:
    folder = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "results", "multi_gpu")
    presets = [("pldr-110m, 150 steps, global batch 32 x 1024, lr 3e-4", "110m", 20),
               ("pldr-1b, 50 steps (ZeRO-2, ZeRO-3, the fast-path TP/PP runs: 40, so their cosine schedule "
                "parts from the references' after the 10-step warm-up), global batch 32 x 1024, lr 3e-4", "1b", 10),
               ("pldr-110m at the recipe's lr 1e-3 (warm-up 20), 200 steps: loss spikes", "lr1e-3", 20)]
    lines = []
    data = {}
    for title, sub, first in presets:
        runs = load(os.path.join(folder, sub))
        if "single" in runs:
            data[sub] = runs
            lines += table(title, runs, first, sub) + [""]
    with open(os.path.join(folder, "multi_gpu_table.md"), "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    for ax_loss, ax_diff, sub in ((axes[0][0], axes[1][0], "110m"), (axes[0][1], None, "lr1e-3")):
        runs = data.get(sub, {})
        base = {r["step"]: r["loss"] for r in runs.get("single", [])}
        for name, rows in runs.items():
            steps = [r["step"] for r in rows]
            color = f"C{list(LAYOUTS).index(name)}"
            ax_loss.plot(steps, [r["loss"] for r in rows], label=LAYOUTS[name][0], lw=1.2, color=color)
            if ax_diff is not None and name != "single":
                ax_diff.plot(steps, [r["loss"] - base[r["step"]] for r in rows], label=LAYOUTS[name][0], lw=1,
                             color=color)
        ax_loss.set_title(f"pldr-110m on 2 H100s, loss per step ({'lr 3e-4' if sub == '110m' else 'lr 1e-3, warm-up 20'})")
        ax_loss.set_xlabel("step")
        ax_loss.set_ylabel("training loss")
        ax_loss.legend(fontsize=8)
    ax = axes[1][0]
    ax.set_ylim(-0.01, 0.01)
    ax.axhline(0, color="k", lw=0.5)
    ax.set_title("loss minus the 1-GPU compiled run's (lr 3e-4)\nTP + SP: the run after the NCCL fix")
    ax.set_xlabel("step")
    ax.legend(fontsize=7)
    ax = axes[1][1]
    names, values, colors = [], [], []
    for sub in ("110m", "1b"):
        runs = data.get(sub, {})
        first = 20 if sub == "110m" else 10
        for name, rows in runs.items():
            names.append(f"{sub} {LAYOUTS[name][0]}")
            values.append(statistics.median(r["tokens_per_s"] for r in steady(rows, first, sub)) / 1e3)
            colors.append("tab:blue" if sub == "110m" else "tab:orange")
    ax.barh(range(len(names)), values, color=colors)
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.invert_yaxis()
    for i, v in enumerate(values):
        ax.text(v, i, f" {v:,.0f}k", va="center", fontsize=7)
    ax.set_xlabel("tokens/s (thousands), whole job")
    ax.set_title("throughput, same global batch\n(blue: pldr-110m, orange: pldr-1b)")
    fig.tight_layout()
    fig.savefig(os.path.join(folder, "multi_gpu.png"), dpi=110)


if __name__ == "__main__":
    main()
