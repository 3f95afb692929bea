"""Plot the micro-batch sweep (benchmarks/results/microbatch/, from gpu_microbatch_sweep.sh and
gpu_trainer_best_mb.sh; trainer runs also from results/trainer_syncs/): MFU of the stand-alone step, PLGA and G = I, and of pldr-train, against
the micro-batch, for both presets.
    python benchmarks/plot_microbatch.py
"""
import os
import re

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "microbatch")
RUNS = [  # pldr-train runs of this session's calls: (model, micro-batch, file, run name)
    ("110m", 16, "trainer_syncs/trainer_phases.txt", "mb16"),
    ("110m", 64, "trainer_syncs/trainer_onesync.txt", "new_a"),
    ("110m", 128, "microbatch/trainer_best_mb.txt", "new_110m_mb128"),
    ("1b", 24, "microbatch/trainer_1b_mb24.txt", "new_1b_mb24"),
    ("1b", 32, "microbatch/trainer_best_mb.txt", "new_1b_mb32"),
]


def trainer_mfu(path, name):
    text = open(os.path.join(os.path.dirname(HERE), path)).read()
    return float(re.search(rf"^{name}\s.*MFU\s+([\d.]+)%", text, re.M)[1]) / 100


def main():
    rows = re.findall(r"model=(\S+) attn=(PLGA|G=I \(SDPA\)) path=all-on batch=(\d+) tok_s=\S+ tflops=\S+ mfu=(\S+)",
                      open(os.path.join(HERE, "step_parts_log.txt")).read())
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, model, goal in zip(axes, ("pldr-110m", "pldr-1b"), (0.40, 0.50)):
        for attn, style in (("PLGA", "o-"), ("G=I (SDPA)", "s--")):
            pts = sorted((int(b), float(m)) for md, a, b, m in rows if md == model and a == attn)
            ax.plot([b for b, _ in pts], [100 * m for _, m in pts], style,
                    label=f"stand-alone step, {'G = I (upper bound)' if attn != 'PLGA' else 'PLGA'}")
        short = model.split("-")[1]
        tr = [(b, trainer_mfu(path, name)) for md, b, path, name in RUNS if md == short]
        ax.plot([b for b, _ in tr], [100 * m for _, m in tr], "^-", color="tab:green", label="pldr-train, PLGA")
        ax.axhline(100 * goal, color="k", lw=0.8, ls=":", label=f"goal {goal:.0%}")
        ax.set_title(f"{model}, one H100, seq 1024, bf16")
        ax.set_xlabel("micro-batch (sequences)")
        ax.set_ylabel("MFU (% of 989 TFLOP/s)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    out = os.path.join(HERE, "microbatch.png")
    fig.savefig(out, dpi=110)
    print("wrote", out)


if __name__ == "__main__":
    main()
