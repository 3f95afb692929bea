"""The whole-learner op under Nsight Compute: a target to profile and a summary of its SASS.

Why: `pldr-bench kernels` says how fast the op is; why it is not faster takes hardware counters
(occupancy, registers, spills, stall reasons per instruction). This module is what ncu runs and
what reads its per-instruction page back, so the profile behind docs/performance.md can be
repeated on any GPU with ncu:

    ncu --clock-control none --nvtx --nvtx-include "prof/" -k regex:"_learner_(fwd|bwd)" \\
        --section SpeedOfLight --section LaunchStats --section Occupancy --section WarpStateStats \\
        --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis --section SchedulerStats \\
        --section InstructionStats --section SourceCounters -o learner \\
        python -m pldr_dist.bench.kernel_profile run pldr-110m:128
    ncu -i learner.ncu-rep --page details --print-details all > ncu_learner.txt
    ncu -i learner.ncu-rep --page source --csv --print-source sass \\
        | python -m pldr_dist.bench.kernel_profile top-sass 40 > ncu_learner_top_sass.txt

`run` calls the op's forward and backward directly on one thread (autograd would run the
backward on a thread of its own, outside the NVTX range), three times: the first two compile and
autotune, the third runs inside NVTX range `prof`, the only one ncu profiles.
"""
from __future__ import annotations

import csv
import sys


def run(shape: str) -> None:
    import torch

    from ..model import metric_kernel as mk
    from ..model.config import preset
    from .kernels import make_learner, parse_shapes
    (name, mb), = parse_shapes(shape)
    cfg = preset(name)
    dev = torch.device("cuda")
    m = make_learner(cfg, "fused", dev)
    params = [p.detach() for p in mk.learner_params(m)]
    torch.manual_seed(1)
    x = torch.randn(mb * cfg.num_heads * cfg.head_dim, cfg.head_dim, device=dev)
    dout = torch.randn_like(x)
    for i in range(3):
        if i == 2:
            torch.cuda.synchronize()
            torch.cuda.nvtx.range_push("prof")
        out = mk.metric_learner_op(x, *params, m.eps)
        mk.metric_learner_backward(dout, x, *out[1:], *params, m.eps)
        if i == 2:
            torch.cuda.synchronize()
            torch.cuda.nvtx.range_pop()


def _number(text: str) -> float:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return 0.0


def top_sass(lines, n: int) -> str:
    """Per kernel (one table each in ncu's source page), the n SASS lines with the most
    warp-stall samples, as a share of the kernel's samples."""
    rows = list(csv.reader(lines))
    heads = [i for i, r in enumerate(rows) if any(c.startswith("Warp Stall Sampling (All") for c in r)]
    out = []
    for k, h in enumerate(heads):
        hdr = rows[h]
        col = next(i for i, c in enumerate(hdr) if c.startswith("Warp Stall Sampling (All"))
        src = hdr.index("Source") if "Source" in hdr else 1
        end = heads[k + 1] if k + 1 < len(heads) else len(rows)
        body = [r for r in rows[h + 1:end] if len(r) == len(hdr)]
        total = sum(_number(r[col]) for r in body) or 1.0
        out.append(f"== kernel {k}: {total:.0f} stall samples over {len(body)} SASS lines")
        out += [f"{100 * _number(r[col]) / total:5.1f}%  {r[src][:120]}"
                for r in sorted(body, key=lambda r: -_number(r[col]))[:n]]
    return "\n".join(out)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 2 and argv[0] == "run":
        run(argv[1])
    elif argv[:1] == ["top-sass"] and len(argv) <= 2:
        print(top_sass(sys.stdin, int(argv[1]) if len(argv) == 2 else 30))
    else:
        print("usage: python -m pldr_dist.bench.kernel_profile run PRESET:MICRO_BATCH | top-sass [N] < source.csv",
              file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
