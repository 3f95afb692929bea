"""Plot the gap ladder (benchmarks/results/gap_ladder/, from gpu_gap_ladder.sh): the stand-alone
step's time at each rung, relative to G = I, for both presets, with the 0.95x goal.
    python benchmarks/plot_gap_ladder.py
"""
import os
import re

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "gap_ladder")
RUNGS = ["PLGA", "GLUs free", "metric learner free", "G = I, q@G kept", "G = I"]
FILES = [("pldr-110m, micro-batch 128", "gap_ladder_pldr-110m_mb128.txt"),
         ("pldr-1b, micro-batch 32", "gap_ladder_pldr-1b_mb32.txt")]


def main():
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), sharey=True)
    for ax, (title, name) in zip(axes, FILES):
        text = open(os.path.join(HERE, name)).read()
        tok = {}
        for path, value in re.findall(r"path=(.+?) batch=\d+ tok_s=(\S+)", text):
            tok.setdefault(path, float(value))   # the first PLGA row (the last one is the drift check)
        ratios = [tok[r] / tok["G = I"] for r in RUNGS]
        bars = ax.barh(range(len(RUNGS)), ratios, color=["tab:red"] + ["tab:gray"] * 3 + ["tab:blue"])
        for bar, r in zip(bars, ratios):
            ax.text(r + 0.003, bar.get_y() + bar.get_height() / 2, f"{r:.3f}", va="center", fontsize=8)
        ax.axvline(0.95, color="k", ls=":", lw=1, label="goal 0.95x")
        ax.set_xlim(0.8, 1.03)
        ax.set_yticks(range(len(RUNGS)), RUNGS)
        ax.invert_yaxis()
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("tokens/s relative to G = I (one H100, bf16)")
        ax.legend(loc="lower right", fontsize=8)
    fig.suptitle("PLGA's gap to G = I, the deductive path removed part by part (stand-alone step)", fontsize=10)
    fig.tight_layout()
    out = os.path.join(HERE, "gap_ladder.png")
    fig.savefig(out, dpi=120)
    print("wrote", out)


if __name__ == "__main__":
    main()
