"""A stand-in for `python -m pldr_dist.train` with the same contract, small enough that the launcher
tests measure the launchers and not the model: `--config FILE [--set key=value ...]`, rank
discovery and process-group start through pldr_dist.distributed, `<run_dir>/metrics.jsonl`,
checkpoints under `<run_dir>/checkpoints/`, resume from the newest one, and on SIGUSR1/SIGTERM
finish the step, checkpoint and exit with PREEMPTED_EXIT_CODE.

The "model" is a linear regression trained by data-parallel SGD in float64: each rank draws its
batch from (seed, step, rank), gradients are averaged with all_reduce, and the logged loss is the
all-reduced mean. So the losses depend only on the world size, never on the launcher.
Each rank also writes `<run_dir>/env-rank<R>.json` (what discover() found) for the tests.
"""
from __future__ import annotations

import signal

# The handlers go in before anything slow is imported: SLURM's warning signal may come while the
# interpreter is still importing torch, and SIGUSR1's default action would end the task.
RAISED: list = []
for _sig in (signal.SIGUSR1, signal.SIGTERM):
    signal.signal(_sig, lambda signum, frame: RAISED.append(signum))

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import yaml  # noqa: E402

from pldr_dist.distributed import PREEMPTED_EXIT_CODE, barrier_and_destroy, init_distributed  # noqa: E402

DIM = 8


def load_config(path: str, overrides: list[str]) -> dict:
    with open(path) as f:
        cfg = yaml.safe_load(f)
    for item in overrides:
        key, _, value = item.partition("=")
        node = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = yaml.safe_load(value)
    return cfg


def batch(seed: int, step: int, rank: int):
    g = torch.Generator().manual_seed(seed * 1_000_003 + step * 101 + rank)
    x = torch.randn(16, DIM, generator=g, dtype=torch.float64)
    true_w = torch.arange(1, DIM + 1, dtype=torch.float64) / DIM
    return x, x @ true_w + 0.1 * torch.randn(16, generator=g, dtype=torch.float64)


def newest_checkpoint(ckpt_dir: str):
    steps = [int(n[5:-3]) for n in os.listdir(ckpt_dir) if n.startswith("step-") and n.endswith(".pt")] \
        if os.path.isdir(ckpt_dir) else []
    return max(steps) if steps else None


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True)
    p.add_argument("--set", dest="overrides", action="append", default=[])
    args = p.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    run_dir, steps = cfg["run_dir"], int(cfg["train"]["steps"])
    seed, pause = int(cfg["train"].get("seed", 0)), float(cfg.get("probe", {}).get("step_seconds", 0.0))
    raised = RAISED

    env = init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    assert (rank, world) == (env.rank, env.world_size), "process group disagrees with discover()"
    os.makedirs(os.path.join(run_dir, "checkpoints"), exist_ok=True)
    with open(os.path.join(run_dir, f"env-rank{rank}.json"), "w") as f:
        json.dump({**env.__dict__, "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
                   "backend": dist.get_backend()}, f)

    ckpt_dir = os.path.join(run_dir, "checkpoints")
    w, step = torch.zeros(DIM, dtype=torch.float64), 0
    dist.barrier()   # every rank looks for checkpoints before rank 0 may write one
    start = newest_checkpoint(ckpt_dir)
    if start is not None:
        state = torch.load(os.path.join(ckpt_dir, f"step-{start}.pt"))
        w, step = state["w"], state["step"]
        if rank == 0:
            print(f"resumed from step {step}", flush=True)
    code = 0
    while step < steps:
        x, y = batch(seed, step, rank)
        err = x @ w - y
        loss = (err ** 2).mean()
        grad = 2 * x.T @ err / len(y)
        dist.all_reduce(grad)
        dist.all_reduce(loss)
        w = w - 0.05 * grad / world
        step += 1
        time.sleep(pause)
        if rank == 0:
            with open(os.path.join(run_dir, "metrics.jsonl"), "a") as f:
                f.write(json.dumps({"step": step, "loss": loss.item() / world, "world_size": world}) + "\n")
        flag = torch.tensor([1.0 if raised else 0.0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if rank == 0:   # checkpoint every step, written under a temporary name then renamed
            tmp = os.path.join(ckpt_dir, f".step-{step}.pt.tmp")
            torch.save({"w": w, "step": step}, tmp)
            os.replace(tmp, os.path.join(ckpt_dir, f"step-{step}.pt"))
        if flag.item() and step < steps:
            if rank == 0:
                print(f"signal received: checkpointed at step {step}, exiting {PREEMPTED_EXIT_CODE}", flush=True)
            code = PREEMPTED_EXIT_CODE
            break
    if rank == 0 and code == 0:
        print(f"done: {step} steps, final loss {loss.item() / world:.12f}", flush=True)
    barrier_and_destroy()
    return code


if __name__ == "__main__":
    sys.exit(main())
