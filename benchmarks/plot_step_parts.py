"""Plot what the fast path's new parts give (benchmarks/results/step_parts/, from
gpu_step_parts.sh) and the trainer with them against the package before them
(benchmarks/results/trainer_parts/repeat/, from gpu_trainer_repeat.sh).
    python benchmarks/plot_step_parts.py
"""
import os
import re

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def step_rows(path):
    """(model, attention, path) -> tokens/s from a step_parts log."""
    rows = {}
    for m in re.finditer(r"model=(\S+) attn=(PLGA|G=I \(SDPA\)) path=(\S+) batch=\d+ tok_s=(\S+)", open(path).read()):
        rows[(m[1], "PLGA" if m[2] == "PLGA" else "G = I", m[3])] = float(m[4]) / 1e3
    return rows


def trainer_steps(path):
    rows = re.findall(r"^step (\d+)/\d+ loss (\S+) lr \S+ ([\d,]+) tok/s", open(path).read(), re.M)
    return [(int(s), float(loss), int(t.replace(",", "")) / 1e3) for s, loss, t in rows]


def main():
    ablation = step_rows(os.path.join(RESULTS, "step_parts", "step_parts_log_ablation.txt"))
    both = step_rows(os.path.join(RESULTS, "step_parts", "step_parts_log.txt"))
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.2))
    labels = ["before", "no-tanh", "no-fused_loss", "no-rope_cache", "no-pad_ffn", "all-on"]
    vals = [ablation[("pldr-110m", "PLGA", k)] for k in labels]
    ax.barh(range(len(labels)), vals, color=["tab:gray"] + ["tab:orange"] * 4 + ["tab:blue"])
    ax.axvline(ablation[("pldr-110m", "G = I", "all-on")], color="k", ls="--", lw=1, label="G = I, all on")
    ax.set_yticks(range(len(labels)), ["all four off (before)", "GLU sigmoid exact", "loss not fused",
                                       "rotary recomputed", "feed-forward not padded", "all on"])
    for i, v in enumerate(vals):
        ax.text(v + 5, i, f"{v:.0f}k", va="center", fontsize=8)
    ax.set_xlabel("thousand tokens/s (stand-alone step)")
    ax.set_title("pldr-110m PLGA, micro-batch 64: each part off alone")
    ax.set_xlim(400, 850)
    ax.legend(fontsize=8, loc="lower right")
    groups = [("pldr-110m", "PLGA"), ("pldr-110m", "G = I"), ("pldr-1b", "PLGA"), ("pldr-1b", "G = I")]
    for j, (path, color) in enumerate((("before", "tab:gray"), ("all-on", "tab:blue"))):
        rel = [both[(m, a, path)] / both[(m, a, "before")] for m, a in groups]
        bx.bar([i + 0.38 * j for i in range(4)], rel, 0.36, color=color, label="all four off" if j == 0 else "all on")
        for i, (m, a) in enumerate(groups):
            bx.text(i + 0.38 * j, rel[i] + 0.005, f"{both[(m, a, path)]:.0f}k", ha="center", fontsize=7)
    bx.set_xticks([i + 0.19 for i in range(4)], [f"{m}\n{a}" for m, a in groups], fontsize=8)
    bx.set_ylim(0.9, 1.2)
    bx.set_ylabel("tokens/s relative to all four off")
    bx.set_title("one device call: 110m at micro-batch 64, 1b at 16")
    bx.legend(fontsize=8)
    fig.suptitle("Fast path, one H100: rotary table, padded feed-forward, fused head + loss, tanh sigmoid")
    fig.tight_layout()
    out = os.path.join(RESULTS, "step_parts", "step_parts.png")
    fig.savefig(out, dpi=110)
    print("wrote", out)

    rep = os.path.join(RESULTS, "trainer_parts", "repeat")
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4))
    for name, label, style, color in (("new_a", "with the new parts, run 1", "-o", "tab:blue"),
                                      ("new_b", "with the new parts, run 2", "-s", "tab:cyan"),
                                      ("prev_a", "before them (8b0dfc6)", "--o", "tab:gray")):
        steps = trainer_steps(os.path.join(rep, name + ".log"))
        ax.plot([s for s, _, _ in steps], [loss for _, loss, _ in steps], style, ms=3, color=color, label=label)
        bx.plot([s for s, _, _ in steps if s >= 3], [t for s, _, t in steps if s >= 3], style, ms=3, color=color, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title("losses equal within the run-to-run spread (GPU runs are not bit-reproducible)", fontsize=9)
    ax.legend(fontsize=8)
    bx.set_xlabel("step")
    bx.set_ylabel("thousand tokens/s")
    bx.set_title("throughput per step")
    bx.legend(fontsize=8, loc="lower right")
    fig.suptitle("pldr-train, pldr-110m, micro-batch 64, one H100, one device call")
    fig.tight_layout()
    out = os.path.join(RESULTS, "trainer_parts", "trainer_parts.png")
    fig.savefig(out, dpi=110)
    print("wrote", out)


if __name__ == "__main__":
    main()
