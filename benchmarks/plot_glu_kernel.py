"""Plot the H100 results of the Triton metric-learner GLU (benchmarks/results/glu_kernel/).

Left: GPU time of one GLU forward + backward: the compiled PyTorch GLU, the first kernels
(commit a4edc8f, glu_kernel_log.txt) and the current ones (glu_kernel_log_v3.txt).
Middle and right: training-step tokens/s (benchmarks/train_step.py) of PLGA with the compiled
PyTorch GLU, PLGA with the kernels, and G = I, for pldr-110m (micro-batch 64) and pldr-1b
(16), each model's three runs from one device call (glu_kernel_log_v3.txt).
    python benchmarks/plot_glu_kernel.py
"""
import os
import re

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "glu_kernel")


def parse(log):
    text = open(os.path.join(HERE, log)).read()
    found = re.findall(r"glu (\S+ \S+) N=(\d+) (kernel|compiled torch): ([\d.]+) us", text)
    glu = {(m[0], m[2]): float(m[3]) for m in found}
    rows = {m[0]: int(m[1]) for m in found}
    steps = {(m[0], m[1], m[2]): float(m[3]) for m in
             re.findall(r"model=(\S+) attn=(PLGA|G=I) \(?\S*\)? ?path=(\S+) batch=\d+ tok_s=([\d.e+]+)", text)}
    return glu, rows, steps


def main():
    first, _, _ = parse("glu_kernel_log.txt")
    now, rows, steps = parse("glu_kernel_log_v3.txt")
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), gridspec_kw={"width_ratios": [1.3, 1, 1]})
    left = axes[0]
    labels = sorted({k[0] for k in now})
    series = [("compiled PyTorch", now, "compiled torch", "tab:gray"),
              ("first kernels (a4edc8f)", first, "kernel", "tab:cyan"),
              ("current kernels", now, "kernel", "tab:blue")]
    for i, (name, src, impl, color) in enumerate(series):
        vals = [src[(lab, impl)] for lab in labels]
        bars = left.bar([x + 0.27 * i for x in range(len(labels))], vals, 0.27, label=name, color=color)
        left.bar_label(bars, fmt="%.0f")
    left.set_xticks([x + 0.27 for x in range(len(labels))], [f"{lab}\n{rows[lab]:,} rows of 64" for lab in labels])
    left.set_ylabel("us per GLU, forward + backward (GPU time)")
    left.set_title("One metric-learner GLU, H100, bf16")
    left.legend(fontsize=8)
    for ax, model, batch in ((axes[1], "pldr-110m", 64), (axes[2], "pldr-1b", 16)):
        bars_def = [("PLGA, compiled\nPyTorch GLU", (model, "PLGA", "graph-noglu"), "tab:gray"),
                    ("PLGA, Triton\nGLU (shipped)", (model, "PLGA", "graph"), "tab:blue"),
                    ("G = I\n(upper bound)", (model, "G=I", "graph"), "tab:green")]
        vals = [steps[k] / 1e3 for _, k, _ in bars_def]
        bars = ax.bar([b[0] for b in bars_def], vals, color=[b[2] for b in bars_def])
        ax.bar_label(bars, labels=[f"{v:.1f}k" + (f"\n{v / vals[2]:.3f}x" if i < 2 else "")
                                   for i, v in enumerate(vals)])
        ax.set_ylabel("tokens/s")
        ax.set_ylim(0, max(vals) * 1.25)
        ax.set_title(f"{model} training step, micro-batch {batch} (one call)")
    fig.tight_layout()
    out = os.path.join(HERE, "glu_kernel.png")
    fig.savefig(out, dpi=110)
    print("wrote", out)


if __name__ == "__main__":
    main()
