"""`pldr-bench kernels --sweep`: the whole-learner op under candidate kernel configs.

Why: the op's backward configs are fixed (the first that compiles, so a run's bits do not
depend on timing; metric_kernel.py), and its forward is autotuned over a short list. Which
entries belong in those lists is a measurement: this times the op at each shape with one
setting changed at a time from today's (forward config, backward row config, weight-gradient
config, weight-gradient programs per SM), checks each against fp32 like every row of the
suite, and notes the time per kernel, so a faster config can be put first in the code.
"""
from __future__ import annotations

import contextlib
import traceback

# (BM, BH, warps, stages[, register cap]). Answered on an H100 (kernels/h100/kernels_sweep, git
# history): 64-row blocks at 4 or 8 warps, 128-row blocks and 32-wide hidden chunks in any
# kernel were all slower than today's configs (the weight-gradient kernel's 64-row blocks pay
# only since its products were turned around); so was occupancy. The forward and the row kernel
# run one 8-warp program per SM (255 registers, ~190 KB of shared memory); one-stage 4-warp
# programs capped at 168 registers fit three to an SM (`pldr-bench kernels --resources`) but
# took 0.95-1.38 ms against 0.587 (forward) and 1.44-1.98 against 0.914 (row kernel), pldr-110m
# mb 128; weight gradients at 168 registers, 3 an SM, 1.19-1.51 against 1.01.
FWD = []
ROWS = []
WGRAD = []
PER_SM = []
# metric_kernel switches (module flags), each set against today's, and settings changed together
# (label, {"wgrad": config, "flags": {...}}). Answered on an H100 (kernels/h100/kernels_sweep,
# git history): the rows through TMA paid in the forward (kept), not in the weight-gradient
# kernel; software-pipelined chunk loops and a warp-specialized row-block loop were slower.
# Gate and up values of a chunk from one product against U1 and U2 interleaved row by row (then
# split in registers), in the forward and the row kernel: slower (0.670 / 1.112 ms against 0.584
# / 0.903, pldr-110m mb128, H100, kernels/h100/kernels_sweep of 2026-12-06, git history).
# Today's warp-specialized Gluon kernels (Hopper) beside the Triton ones: both (WS_KERNELS=False),
# and the row kernel alone (WS_ROW_KERNEL=False). A warp-specialized weight-gradient kernel in the
# same design (commit 885dbef, flag WS_WGRAD) was slower: 0.656 against 0.557 ms at pldr-110m mb
# 128, 0.382 against 0.322 at pldr-1b mb 32 (kernels/h100/kernels_sweep of stop 49, git history);
# so was one with split roles (commit 0668061: math warpgroups hand dg/du/h through shared memory
# to an MMA warpgroup holding the sums), 0.687 against 0.553 and 0.396 against 0.319
# (kernels/h100/ws_wgrad_split.txt).
FLAGS = [{"WS_KERNELS": False}, {"WS_ROW_KERNEL": False}]
# Weight-gradient settings changed together: the (32, 64, 4, 3) config and 2 or 8 programs per SM
# were slower (kernels/h100/kernels_sweep of 2026-12-06, git history).
COMBOS = []


@contextlib.contextmanager
def configs(fwd=None, rows=None, wgrad=None, per_sm=None, flags=None):
    """metric_kernel with one setting replaced for the duration (and today's afterwards)."""
    from ..model import metric_kernel as mk
    flags = flags or {}
    saved = (mk._learner_fwd_tuned, mk.BWD_ROWS_CONFIGS, mk.WGRAD_CONFIGS, mk.PROGRAMS_PER_SM)
    saved_flags = {k: getattr(mk, k) for k in flags}
    try:
        for k, v in flags.items():
            setattr(mk, k, v)
        if fwd or flags:   # a new autotuner: its cache is keyed by shape only
            mk._learner_fwd_tuned = mk.fwd_autotuned([fwd] if fwd else mk.FWD_CONFIGS)
        mk.BWD_ROWS_CONFIGS = [rows] if rows else mk.BWD_ROWS_CONFIGS
        mk.WGRAD_CONFIGS = [wgrad] if wgrad else mk.WGRAD_CONFIGS
        mk.PROGRAMS_PER_SM = per_sm or mk.PROGRAMS_PER_SM
        mk._chosen.clear()
        mk._programs.cache_clear()
        yield
    finally:
        mk._learner_fwd_tuned, mk.BWD_ROWS_CONFIGS, mk.WGRAD_CONFIGS, mk.PROGRAMS_PER_SM = saved
        for k, v in saved_flags.items():
            setattr(mk, k, v)
        mk._chosen.clear()
        mk._programs.cache_clear()


def candidates() -> list:
    """(label, settings): today's, then one setting changed at a time."""
    out = [("today", {})]
    out += [(f"fwd {c}", {"fwd": c}) for c in FWD]
    out += [(f"bwd rows {c}", {"rows": c}) for c in ROWS]
    out += [(f"wgrad {c}", {"wgrad": c}) for c in WGRAD]
    out += [(f"wgrad {p}/SM", {"per_sm": p}) for p in PER_SM]
    out += [(" ".join(f"{k}={v}" for k, v in f.items()), {"flags": f}) for f in FLAGS]
    return out + COMBOS


def sweep(shapes, device, iters: int, refs: dict, log, checkpoint) -> list:
    """Rows of path 'fused' whose note names the config; a config that does not compile or
    gives wrong numbers is a row with that status (not a failure of the suite)."""
    from ..model.config import preset
    from .kernels import bench_path
    rows = []
    for name, mb in shapes:
        cfg = preset(name)
        n_rows, shape = mb * cfg.num_heads * cfg.head_dim, f"{name} mb{mb}"
        for label, settings in candidates():
            try:
                with configs(**settings):
                    row = bench_path(cfg, shape, "fused", n_rows, device, iters, refs.get(shape), log, breakdown=True)
            except Exception:   # noqa: BLE001 - e.g. a config Triton refuses at build time
                traceback.print_exc()
                continue
            row.status = row.status if row.status == "ok" else f"config refused: {row.status}"
            row.exit_code, row.note = 0, f"sweep {label}; {row.note}"
            rows.append(row)
            log(f"{shape} {label}: fwd {row.fwd_ms:.3f} ms, f+b {row.fwd_bwd_ms:.3f} ms; {row.note}")
            checkpoint()
    return rows
