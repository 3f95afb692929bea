"""Forward+backward tokens/s on the CPU for `tiny` and `pldr-110m` (seq 256), learned G vs
G fixed to the identity in the same run: the time share of the deductive PLGA path.

    python benchmarks/model_cpu.py [--out benchmarks/results/model_cpu.txt]
"""
import argparse
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from pldr_dist.model import PLDRModel, lm_loss, preset  # noqa: E402


def tokens_per_s(cfg, batch, seq, iters):
    torch.manual_seed(0)
    model = PLDRModel(cfg)
    x = torch.randint(4, cfg.vocab_size, (batch, seq + 1))
    times = []
    for i in range(iters + 1):
        t0 = time.perf_counter()
        lm_loss(model(x[:, :-1]), x[:, 1:]).backward()
        model.zero_grad(set_to_none=True)
        if i:
            times.append(time.perf_counter() - t0)
    return batch * seq / statistics.median(times)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "model_cpu.txt"))
    a = p.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    lines = [f"# model_cpu: forward+backward, fp32, seq 256, {torch.get_num_threads()} threads, torch {torch.__version__}, "
             f"median of timed iterations after one warm-up, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
             f"{'preset':<10} {'batch':>5} {'learned G tok/s':>16} {'identity G tok/s':>17} {'deductive share':>16}"]
    for name, batch, iters in (("tiny", 16, 10), ("pldr-110m", 2, 3)):
        learned = tokens_per_s(preset(name), batch, 256, iters)
        identity = tokens_per_s(preset(name, mode="v510G", fixed_g="identity"), batch, 256, iters)
        share = 1 - learned / identity
        lines.append(f"{name:<10} {batch:>5} {learned:>16,.0f} {identity:>17,.0f} {100 * share:>15.1f}%")
        print(lines[-1], flush=True)
    with open(a.out, "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
