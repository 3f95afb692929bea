"""Per-rank parameter/activation memory and communication volume of the pldr-110m preset under TP.

Runs TP=1, 2, 4 (with and without sequence parallelism) on gloo processes, one forward and
backward of a [batch, seq] fp32 batch per layout, and measures on each rank:
  - parameter bytes held by the rank;
  - activation bytes saved for backward (torch.autograd.graph.saved_tensors_hooks, each
    storage counted once; parameters excluded);
  - bytes moved by the TP collectives (counted in pldr_dist.parallel.mappings), against
    the analytic count below.
Usage: DS_ACCELERATOR=cpu python benchmarks/tp_memory.py [--seq 128] [--batch 1]
Writes benchmarks/results/tp_memory.txt.
"""
from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

import torch  # noqa: E402

from distributed import run_distributed  # noqa: E402

BYTES = 4  # fp32


def analytic_comm_bytes(cfg, tp, batch, seq, sequence_parallel):
    """Bytes of one forward+backward's TP collectives per rank, counted as full-tensor payloads.

    Without SP, per layer: 2 all-reduces of [B, S, d] in forward (attention and FFN exits)
    and 2 in backward (their entries), plus the metric learner's coalesced gradient
    all-reduce; plus the embedding exit (fwd) and the head entry (bwd). With SP every one
    of those activation collectives becomes an all-gather/reduce-scatter pair (twice the
    count, each of the full [B, S, d] payload), and the norms' and biases' gradients join
    the per-layer coalesced all-reduce.
    """
    if tp == 1:
        return 0
    act = batch * seq * cfg.d_model * BYTES
    metric = 0
    if cfg.learned_g:
        glu = 3 * cfg.head_dim * cfg.a_dff + 2 * cfg.a_dff + cfg.head_dim
        metric = (2 * cfg.head_dim + cfg.num_residual_units * (cfg.glus_per_unit * glu + 2 * cfg.head_dim)) * BYTES
    if not sequence_parallel:
        return cfg.num_layers * (4 * act + metric) + 2 * act
    replicated = (2 * 2 * cfg.d_model + 2 * cfg.d_model) * BYTES  # norm1, norm2, wo.bias, w3.bias
    return cfg.num_layers * (8 * act + metric + replicated) + 4 * act + 2 * cfg.d_model * BYTES


def analytic_param_bytes(cfg, tp):
    """Rank 0's share: split tensors by torch.tensor_split over tp, the rest whole."""
    from pldr_dist.model.model import PLDRModel
    from pldr_dist.parallel.tensor_parallel import tp_partition_dim
    total = 0
    for name, t in PLDRModel(cfg).state_dict().items():
        dim = tp_partition_dim(name)
        n = t.numel() if dim is None else torch.tensor_split(t, tp, dim)[0].numel()
        total += n * BYTES if name.rsplit(".", 1)[-1] != "G_fixed" else 0
    return total


def bench_config(tp):
    """pldr-110m; its 14 heads do not split over 4 ranks, so TP=4 uses 16 heads of 56 (same d)."""
    from pldr_dist.model.config import preset
    return preset("pldr-110m") if 14 % tp == 0 else preset("pldr-110m", num_heads=16, head_dim=56)


def measure(rank, world_size, batch, seq, sequence_parallel):
    from pldr_dist.model import PLDRModel
    from pldr_dist.parallel import mappings
    from pldr_dist.parallel.cross_entropy import vocab_parallel_lm_loss
    from pldr_dist.parallel.grid import ProcessGrid
    from pldr_dist.parallel.tensor_parallel import parallelize

    cfg = bench_config(world_size)
    grid = ProcessGrid(tp=world_size)
    torch.manual_seed(0)
    model = parallelize(PLDRModel(cfg), grid, sequence_parallel)
    param_ptrs = {p.data_ptr() for p in model.parameters()}
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    saved = {}

    def pack(t):
        if t.data_ptr() not in param_ptrs:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    tokens = torch.randint(4, cfg.vocab_size, (batch, seq + 1), generator=torch.Generator().manual_seed(1))
    mappings.COMM_BYTES.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = model(tokens[:, :-1])
        loss = vocab_parallel_lm_loss(logits, tokens[:, 1:], grid.tp_group)
    loss.backward()
    return {"param_bytes": param_bytes, "activation_bytes": sum(saved.values()),
            "comm_bytes": sum(mappings.COMM_BYTES.values()), "comm_by_op": dict(mappings.COMM_BYTES),
            "analytic_comm": analytic_comm_bytes(cfg, world_size, batch, seq, sequence_parallel),
            "analytic_params": analytic_param_bytes(cfg, world_size)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args()
    from pldr_dist.model.model import PLDRModel, count_parameters
    total_params = count_parameters(PLDRModel(bench_config(1)))
    mib = 2 ** 20
    lines = [f"pldr-110m ({total_params:,} parameters), fp32, batch={args.batch} seq={args.seq}, "
             f"one forward+backward, per rank (rank 0; gloo on CPU); TP=4 rows: 16 heads x 56 (14 heads do not split by 4)",
             f"{'TP':>3} {'SP':>3} | {'params MiB':>10} {'analytic':>9} | {'activ. MiB':>10} | "
             f"{'comm MiB/step':>13} {'analytic':>9}"]
    for tp, sp in ((1, False), (2, False), (2, True), (4, False), (4, True)):
        r = run_distributed(measure, tp, args.batch, args.seq, sp)[0]
        analytic_params = r["analytic_params"]
        lines.append(f"{tp:>3} {'on' if sp else 'off':>3} | {r['param_bytes'] / mib:>10.1f} "
                     f"{analytic_params / mib:>9.1f} | {r['activation_bytes'] / mib:>10.1f} | "
                     f"{r['comm_bytes'] / mib:>13.2f} {r['analytic_comm'] / mib:>9.2f}")
        print(lines[-1], r["comm_by_op"], flush=True)
    text = "\n".join(lines) + "\n"
    out = os.path.join(ROOT, "benchmarks", "results", "tp_memory.txt")
    with open(out + ".tmp", "w") as f:
        f.write(text)
    os.replace(out + ".tmp", out)
    print(text)


if __name__ == "__main__":
    main()
