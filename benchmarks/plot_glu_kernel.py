"""Plot the H100 results of the Triton metric-learner GLU (benchmarks/results/glu_kernel/).

Left: GPU time of one GLU forward + backward, kernel vs the compiled PyTorch GLU it replaces.
Right: training-step tokens/s (benchmarks/train_step.py) of PLGA with the compiled PyTorch
GLU, PLGA with the kernel, and G = I, pldr-110m micro-batch 64, from one device call.
    python benchmarks/plot_glu_kernel.py
"""
import os
import re

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "glu_kernel")


def main(log="glu_kernel_log.txt"):
    text = open(os.path.join(HERE, log)).read()
    found = re.findall(r"glu (\S+ \S+) N=(\d+) (kernel|compiled torch): ([\d.]+) us", text)
    glu = {(m[0], m[2]): float(m[3]) for m in found}
    rows = {m[0]: int(m[1]) for m in found}
    steps = {(m[0], m[1], m[2]): float(m[3]) for m in
             re.findall(r"model=(\S+) attn=(PLGA|G=I) \(?\S*\)? ?path=(\S+) batch=\d+ tok_s=([\d.e+]+)", text)}
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    labels = sorted({k[0] for k in glu})
    for i, (impl, color) in enumerate((("compiled torch", "tab:gray"), ("kernel", "tab:blue"))):
        vals = [glu[(lab, impl)] for lab in labels]
        bars = left.bar([x + 0.38 * i for x in range(len(labels))], vals, 0.38, label=impl, color=color)
        left.bar_label(bars, fmt="%.0f")
    left.set_xticks([x + 0.19 for x in range(len(labels))], [f"{lab}\n{rows[lab]:,} rows of 64" for lab in labels])
    left.set_ylabel("us per GLU, forward + backward (GPU time)")
    left.set_title("One metric-learner GLU, H100, bf16")
    left.legend()
    bars_def = [("PLGA, compiled\nPyTorch GLU", ("pldr-110m", "PLGA", "graph-noglu"), "tab:gray"),
                ("PLGA, Triton\nGLU (shipped)", ("pldr-110m", "PLGA", "graph"), "tab:blue"),
                ("G = I\n(upper bound)", ("pldr-110m", "G=I", "graph"), "tab:green")]
    vals = [steps[k] / 1e3 for _, k, _ in bars_def]
    bars = right.bar([b[0] for b in bars_def], vals, color=[b[2] for b in bars_def])
    right.bar_label(bars, labels=[f"{v:.0f}k" + (f"\n{v / vals[2]:.3f}x" if i < 2 else "")
                                  for i, v in enumerate(vals)])
    right.set_ylabel("tokens/s")
    right.set_ylim(0, max(vals) * 1.2)
    right.set_title("pldr-110m training step, micro-batch 64 (one call)")
    fig.tight_layout()
    out = os.path.join(HERE, "glu_kernel.png")
    fig.savefig(out, dpi=110)
    print("wrote", out)


if __name__ == "__main__":
    main()
