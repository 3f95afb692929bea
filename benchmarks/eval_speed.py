"""Evaluation throughput on CPU: tokens/s of `evaluate_loss` with learned G vs a fixed G (G-cache).

For scoring (a full forward) the G-cache removes A0, the metric learner and the W/P/alpha path
from every layer; what is left is an SDPA-like forward plus q @ G_LM. Random weights and tokens:
speed does not depend on training. Usage: python benchmarks/eval_speed.py [--threads 1]
"""
from __future__ import annotations

import argparse
import os
import platform
import time

import torch

from pldr_dist.eval.model_io import g_from_prompt, with_fixed_g
from pldr_dist.eval.perplexity import evaluate_loss
from pldr_dist.model import PLDRModel, preset

CASES = {"tiny": dict(batch=16, seq=63, batches=20), "pldr-110m": dict(batch=2, seq=1023, batches=3)}


def measure(model, batches) -> tuple[float, float]:
    """(tokens per wall second, tokens per CPU second of this process): the second is what a shared,
    busy machine can still measure honestly."""
    evaluate_loss(model, batches[:1])                     # warm-up
    wall, cpu = time.perf_counter(), time.process_time()
    _, tokens = evaluate_loss(model, batches)
    return tokens / (time.perf_counter() - wall), tokens / (time.process_time() - cpu)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "eval_speed.txt"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lines = [f"eval_speed: CPU ({platform.processor() or platform.machine()}), torch {torch.__version__}, "
             f"{args.threads} thread(s), fp32, evaluate_loss over random tokens",
             f"load average at start: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (wall rates suffer; "
             f"per-CPU-second rates less so)",
             f"{'model':<10} {'batch x seq':>12} {'learned G tok/s':>16} {'G-cache tok/s':>14} {'speed-up':>9}"
             f" {'learned G tok/cpu-s':>20} {'G-cache tok/cpu-s':>18} {'speed-up':>9}"]
    for name, case in CASES.items():
        torch.manual_seed(0)
        model = PLDRModel(preset(name)).eval()
        fixed = with_fixed_g(model, g_from_prompt(model, [model.cfg.eos_id]))
        gen = torch.Generator().manual_seed(0)
        batches = []
        for _ in range(case["batches"]):
            x = torch.randint(4, model.cfg.vocab_size, (case["batch"], case["seq"] + 1), generator=gen)
            batches.append({"input": x[:, :-1], "target": x[:, 1:]})
        learned, learned_cpu = measure(model, batches)
        cached, cached_cpu = measure(fixed, batches)
        lines.append(f"{name:<10} {case['batch']:>5} x {case['seq']:<5} {learned:>16.0f} {cached:>14.0f} "
                     f"{cached / learned:>8.2f}x {learned_cpu:>20.0f} {cached_cpu:>18.0f} "
                     f"{cached_cpu / learned_cpu:>8.2f}x")
        print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, args.out)
    print(text)


if __name__ == "__main__":
    main()
