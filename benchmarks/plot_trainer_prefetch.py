"""Plot pldr-train's tokens/s per step with and without the next batch built during the
backward pass (benchmarks/gpu_trainer_prefetch_ab.sh; logs in
benchmarks/results/trainer_gaps/prefetch_ab/).
    python benchmarks/plot_trainer_prefetch.py
"""
import os
import re

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "trainer_gaps", "prefetch_ab")


def per_step(name):
    rows = re.findall(r"^step (\d+)/\d+ loss \S+ lr \S+ ([\d,]+) tok/s", open(os.path.join(HERE, name + ".log")).read(), re.M)
    return [(int(s), int(t.replace(",", "")) / 1e3) for s, t in rows if int(s) >= 3]


def main():
    fig, ax = plt.subplots(figsize=(8, 4))
    for name, label, style in (("ahead_1", "next batch built during the backward (shipped), run 1", "-o"),
                               ("ahead_2", "same, run 2 (steps 22-24 under the profiler)", "-s"),
                               ("plain_1", "batch built at the step's start, run 1", "--o"),
                               ("plain_2", "same, run 2", "--s")):
        steps = per_step(name)
        ax.plot([s for s, _ in steps], [t for _, t in steps], style, ms=3,
                color="tab:blue" if name.startswith("ahead") else "tab:gray", label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("thousand tokens/s")
    ax.set_title("pldr-train, pldr-110m, micro-batch 64, one H100 (one device call)")
    ax.legend(fontsize=8, loc="lower right")
    ax.set_ylim(300, 620)
    fig.tight_layout()
    out = os.path.join(HERE, "trainer_prefetch.png")
    fig.savefig(out, dpi=110)
    print("wrote", out)


if __name__ == "__main__":
    main()
