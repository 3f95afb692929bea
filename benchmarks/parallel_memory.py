"""Per-rank memory of the pldr-110m preset for each supported layout, measured next to the
analytic figure, and the 1F1B pipeline bubble for the micro-batch counts we use.

Runs on CPU (gloo, fp32): each layout builds its engine and takes one optimiser step on a
small batch, then every rank reports the bytes of its parameters and optimiser state.
Analytic (fp32, N = parameters of this rank's TP/PP part): parameters 4N (4N/dp under ZeRO-3),
gradients 4N (4N/dp under ZeRO >= 2), Adam moments 8N (8N/dp under ZeRO >= 1).

    DS_ACCELERATOR=cpu python benchmarks/parallel_memory.py   # writes benchmarks/results/parallel_memory.txt
"""
from __future__ import annotations

import os
import sys

sys.path[:0] = [os.path.join(os.path.dirname(__file__), ".."), os.path.join(os.path.dirname(__file__), "..", "tests")]

import torch  # noqa: E402

from distributed import run_distributed  # noqa: E402

LAYOUTS = {  # name: (world, tp, pp, zero, micro-batches per step)
    2: [("pp2 zero1", 1, 2, 1, 4), ("dp2 zero1", 1, 1, 1, 1), ("dp2 zero2", 1, 1, 2, 1), ("dp2 zero3", 1, 1, 3, 1)],
    4: [("tp2 x pp2 zero1", 2, 2, 1, 4), ("tp2 x dp2 zero1", 2, 1, 1, 1), ("pp2 x dp2 zero1", 1, 2, 1, 4)],
}
MiB = 2**20


def measure(rank, world, layouts):
    from pldr_dist.model import PLDRModel, lm_loss, preset
    from pldr_dist.parallel.cross_entropy import vocab_parallel_lm_loss
    from pldr_dist.parallel.engine import initialize, make_ds_config
    from pldr_dist.parallel.grid import ProcessGrid
    from pldr_dist.parallel.optim import make_optimizer, optimizer_state_bytes
    from pldr_dist.parallel.pipeline import build_pipeline_module
    from pldr_dist.parallel.tensor_parallel import parallelize

    rows = []
    for name, tp, pp, zero, micro in layouts:
        grid = ProcessGrid(tp=tp, pp=pp)
        torch.manual_seed(0)
        model = parallelize(PLDRModel(preset("pldr-110m", context_length=64)), grid)
        loss_fn = (lambda lg, t: vocab_parallel_lm_loss(lg, t, grid.tp_group)) if tp > 1 else lm_loss
        module = build_pipeline_module(model, grid, loss_fn) if pp > 1 else model
        local = sum(p.numel() for p in module.parameters())
        engine = initialize(module, grid, make_ds_config(micro_batch_size=1, grad_accum_steps=micro, dp=grid.dp,
                                                         pp=pp, zero_stage=zero), make_optimizer(module, 1e-4))
        x = torch.randint(4, 32000, (1, 33))
        batch = [(x[:, :-1], x[:, 1:])] * micro
        if pp > 1:
            engine.train_batch(iter(batch))
        else:
            for inputs, targets in batch:
                engine.backward(loss_fn(engine(inputs), targets))
                engine.step()
        params = sum(getattr(p, "ds_tensor", p).numel() * p.element_size() for p in engine.module.parameters())
        dp = grid.dp
        analytic = dict(params=4 * local / (dp if zero == 3 else 1), grads=4 * local / (dp if zero >= 2 else 1),
                        optim=8 * local / (dp if zero >= 1 else 1))
        rows.append(dict(layout=name, rank=rank, stage=grid.pp_rank, params=params,
                         optim=optimizer_state_bytes(engine.optimizer), analytic=analytic, micro=micro, pp=pp))
        del engine, module, model
    return rows


def main():
    lines = [f"{'layout':<18}{'rank':>5}{'params MiB':>12}{'(analytic)':>12}{'grads MiB':>11}{'Adam MiB':>10}{'(analytic)':>12}"]
    bubbles = {}
    for world, layouts in LAYOUTS.items():
        results = run_distributed(measure, world, layouts, deepspeed=True, timeout=1800)
        for i in range(len(layouts)):
            for rank_rows in results:
                r = rank_rows[i]
                a = r["analytic"]
                lines.append(f"{r['layout']:<18}{r['rank']:>5}{r['params'] / MiB:>12.1f}{a['params'] / MiB:>12.1f}"
                             f"{a['grads'] / MiB:>11.1f}{r['optim'] / MiB:>10.1f}{a['optim'] / MiB:>12.1f}")
                if r["pp"] > 1:
                    bubbles[(r["pp"], r["micro"])] = (r["pp"] - 1) / (r["micro"] + r["pp"] - 1)
    lines.append("grads column is analytic (DeepSpeed frees/partitions them inside step()).")
    lines.append("")
    lines.append("1F1B pipeline bubble (p-1)/(m+p-1):")
    for p in (2, 4):
        for m in (4, 8, 16, 32):
            bubbles.setdefault((p, m), (p - 1) / (m + p - 1))
    for (p, m), b in sorted(bubbles.items()):
        lines.append(f"  p={p} m={m:<3} bubble={b:.3f}")
    out = os.path.join(os.path.dirname(__file__), "results", "parallel_memory.txt")
    with open(out + ".tmp", "w") as f:  # the workers' DeepSpeed logs share stdout: keep the table apart
        f.write("\n".join(lines) + "\n")
    os.replace(out + ".tmp", out)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
