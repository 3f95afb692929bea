"""Plot the H100 trainer results in benchmarks/results/trainer_grads/ (tokens/s per run).

Left: pldr-110m at micro-batch 64, each change of this series on top of the last (each bar
read from the file of the device call that measured it). Right: PLGA against the same model
with G = I (v510G) in one device call.
    python benchmarks/plot_trainer_gpu.py
"""
import os
import re

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "trainer_grads")


def read(name: str) -> dict:
    out = {}
    for line in open(os.path.join(HERE, name)):
        m = re.match(r"(\S+)\s+([\d,]+) tokens/s", line)
        if m:
            out[m.group(1)] = int(m.group(2).replace(",", ""))
    return out


def main():
    graphs, identity = read("trainer_graphs.txt"), read("trainer_identity.txt")
    steps = [("DeepSpeed ZeRO-1\n(bf16 grads)", graphs["previous_default_mb64"]),
             ("+ contiguous\nfp32 grads", graphs["nographs_mb64"]),
             ("+ CUDA graphs", graphs["graphs_mb64"]),
             ("+ compiled loss", identity["110m_mb64"])]
    pairs = [("110M mb64", "110m_mb64"), ("110M mb128", "110m_mb128"), ("1B mb16", "1b_mb16")]
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    a.bar([s for s, _ in steps], [v / 1e3 for _, v in steps], color="tab:blue")
    for i, (_, v) in enumerate(steps):
        a.text(i, v / 1e3, f"{v / 1e3:.0f}k", ha="center", va="bottom")
    a.set_ylabel("tokens/s (thousands)")
    a.set_title("pldr-train, pldr-110m, micro-batch 64, compiled layers")
    x = range(len(pairs))
    plga = [identity[k] for _, k in pairs]
    eye = [identity[k + "_identity"] for _, k in pairs]
    b.bar([i - 0.2 for i in x], [p / 1e3 for p in plga], 0.4, label="PLGA (learned G_LM)")
    b.bar([i + 0.2 for i in x], [e / 1e3 for e in eye], 0.4, label="G = I (v510G)")
    for i, (p, e) in enumerate(zip(plga, eye)):
        b.text(i, max(p, e) / 1e3, f"{p / e:.2f}x", ha="center", va="bottom")
    b.set_xticks(list(x), [n for n, _ in pairs])
    b.set_yscale("log")
    b.set_ylabel("tokens/s (thousands, log)")
    b.set_title("PLGA vs plain attention, same call")
    b.set_ylim(top=max(eye) / 1e3 * 2.5)
    b.legend(loc="upper right")
    fig.suptitle("H100 80GB, bf16, ZeRO-1, S = 1023 (benchmarks/results/trainer_grads/)")
    fig.tight_layout()
    out = os.path.join(HERE, "trainer_gpu.png")
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
