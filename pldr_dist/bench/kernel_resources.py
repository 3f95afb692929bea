"""`pldr-bench kernels --resources`: what each whole-learner kernel config costs an SM, on a CPU.

Why: whether a config can run more than one program per SM (so that one program's waits on its
own products are hidden by another's work) is set by its registers, spills and shared memory,
and those come from the compiler, not from a GPU. Triton compiles for Hopper (sm_90) without
one, with the ptxas and cuobjdump its wheel ships, so this answers in a minute on any machine
what would otherwise take device time: today's configs and the sweep's candidates
(kernel_sweep.py), each with the programs an H100 / H200 SM can hold. The figures are this
machine's Triton's; another Triton version allocates differently.
"""
from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass

# sm_90 (H100, H200): per SM 65,536 registers in 4 quadrants, allocated per warp in units of 256;
# 228 KB of shared memory with 1 KB reserved per program; 64 warps; 32 programs.
REGS_PER_QUADRANT, SMEM_PER_SM, SMEM_RESERVED, WARPS_PER_SM, PROGRAMS_PER_SM = 16384, 233472, 1024, 64, 32


@dataclass
class ResourceRow:
    kernel: str            # _learner_fwd, _learner_bwd_rows, _learner_bwd_weights
    config: str            # (BM, BH, warps, stages[, register cap])
    role: str              # "today (first)", "today (fallback)", "autotuned", "sweep candidate"
    registers: int = 0     # per thread
    stack_bytes: int = 0   # per thread: the local frame ptxas spills into (0: no spills)
    smem_bytes: int = 0    # per program, dynamic
    per_sm: int = 0        # programs an SM holds at once
    limit: str = ""        # what caps per_sm: registers, shared memory, warps
    status: str = "ok"
    exit_code: int = 0


def programs_per_sm(registers: int, warps: int, smem: int) -> tuple:
    """(programs an sm_90 SM holds at once, the resource that caps it)."""
    per_warp = -(-registers * 32 // 256) * 256
    limits = {"registers": 4 * (REGS_PER_QUADRANT // per_warp) // warps,
              "shared memory": SMEM_PER_SM // (smem + SMEM_RESERVED),
              "warps": min(WARPS_PER_SM // warps, PROGRAMS_PER_SM)}
    limit = min(limits, key=limits.get)
    return limits[limit], limit


def _desc(dtype: str, shape: list) -> str:
    return f"tensordesc<{dtype}[{', '.join(map(str, shape))}]>"


def _signature(kernel: str, bm: int, bh: int, dk: int) -> dict:
    """Argument types as the op launches each kernel under bf16 autocast (A0 rows bf16, the
    output and the residual sums fp32)."""
    w = _desc("bf16", [1, bh, dk])
    weights = dict(w1_desc=w, b1_ptr="*fp32", w2_desc=w, b2_ptr="*fp32", w3_desc=w)
    rows, unit = [bm, dk], [1, bm, dk]
    if kernel == "_learner_fwd":
        return dict(x_desc=_desc("bf16", rows), lnw_ptr="*fp32", lnb_ptr="*fp32", **weights, b3_ptr="*fp32",
                    out_desc=_desc("fp32", rows), z_desc=_desc("fp32", unit), ys_desc=_desc("bf16", unit),
                    N="i32", eps="fp32")
    if kernel == "_learner_bwd_rows":
        return dict(x_desc=_desc("bf16", rows), z_desc=_desc("fp32", unit), ys_desc=_desc("bf16", unit),
                    dout_desc=_desc("fp32", rows), lnw_ptr="*fp32", **weights, dx_desc=_desc("bf16", rows),
                    dys_desc=_desc("bf16", unit), lnpart_ptr="*fp32", eps="fp32")
    return dict(ys_ptr="*bf16", dys_ptr="*bf16", **weights, part_ptr="*fp32", N="i32", P="i32")


def _constants(kernel: str, cfg, bm: int, bh: int) -> dict:
    a, dk = cfg.a_dff, cfg.head_dim
    common = dict(A=a, DK=dk, INTERP=False, TANH=True, BM=bm, BH=bh)
    if kernel == "_learner_fwd":
        return dict(common, R=cfg.num_residual_units, NG=cfg.glus_per_unit)
    if kernel == "_learner_bwd_rows":
        return dict(common, R=cfg.num_residual_units, NG=cfg.glus_per_unit, DROP=0)
    return dict(common, DROP=0)


def _usage(cubin: bytes) -> tuple:
    """(registers, stack bytes) of a cubin, read by the cuobjdump in Triton's wheel."""
    import triton
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True, check=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+)", out)
    if not m:
        raise RuntimeError(f"no resource usage in cuobjdump's output: {out[:200]}")
    return int(m.group(1)), int(m.group(2))


def measure(kernel: str, cfg, config: tuple, role: str) -> ResourceRow:
    """Compile one kernel config for sm_90 and read back what it takes."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from ..model import metric_kernel_jit as jit
    bm, bh, warps, stages = config[:4]
    row = ResourceRow(kernel, str(config), role)
    sig = _signature(kernel, bm, bh, cfg.head_dim)
    consts = _constants(kernel, cfg, bm, bh)
    sig.update({k: "constexpr" for k in consts})
    options = dict(num_warps=warps, num_stages=stages)
    if len(config) > 4:
        options["maxnreg"] = config[4]
    try:
        compiled = triton.compile(ASTSource(getattr(jit, kernel), sig, constexprs=consts),
                                  target=GPUTarget("cuda", 90, 32), options=options)
        row.registers, row.stack_bytes = _usage(compiled.asm["cubin"])
    except Exception as e:   # noqa: BLE001 - a config the compiler refuses is a row, not a failure
        row.status = f"refused: {str(e).splitlines()[0][:80]}"
        return row
    row.smem_bytes = compiled.metadata.shared
    row.per_sm, row.limit = programs_per_sm(row.registers, warps, row.smem_bytes)
    return row


def configs(smoke: bool) -> list:
    """(kernel, config, role): today's lists, then the sweep's candidates."""
    from ..model import metric_kernel as mk
    from . import kernel_sweep as ks
    if smoke:   # one small config a kernel, and the weight-gradient one (~160 registers) capped
        return [("_learner_fwd", (32, 16, 4, 1), "smoke"), ("_learner_bwd_rows", (32, 16, 4, 1), "smoke"),
                ("_learner_bwd_weights", (32, 16, 4, 1), "smoke"), ("_learner_bwd_weights", (32, 16, 4, 1, 128), "smoke")]
    out = [("_learner_fwd", c, "autotuned") for c in mk.FWD_CONFIGS]
    for kernel, today in (("_learner_bwd_rows", mk.BWD_ROWS_CONFIGS), ("_learner_bwd_weights", mk.WGRAD_CONFIGS)):
        out += [(kernel, c, "today (first)" if i == 0 else "today (fallback)") for i, c in enumerate(today)]
    wgrad = list(ks.WGRAD) + [s["wgrad"] for _, s in ks.COMBOS if "wgrad" in s]
    for kernel, cands in (("_learner_fwd", ks.FWD), ("_learner_bwd_rows", ks.ROWS), ("_learner_bwd_weights", wgrad)):
        out += [(kernel, c, "sweep candidate") for c in dict.fromkeys(cands)]
    return out


def table(rows: list, title: str) -> str:
    lines = [title, f"{'kernel':<22} {'config':<24} {'role':<17} {'regs':>5} {'stack B':>8} {'smem KB':>8} "
             f"{'per SM':>6}  capped by / status"]
    for r in rows:
        tail = r.limit if r.status == "ok" else r.status
        lines.append(f"{r.kernel:<22} {r.config:<24} {r.role:<17} {r.registers:>5} {r.stack_bytes:>8} "
                     f"{r.smem_bytes / 1024:>8.1f} {r.per_sm:>6}  {tail}")
    return "\n".join(lines)


def run(a, cfg, log=print) -> list:
    """The table for cfg's learner shape (a_dff, dk, R, n); written like every suite's."""
    from ..errors import InputError
    from . import report
    try:
        import triton
    except ImportError:
        raise InputError("--resources compiles the kernels with Triton, which is not installed: "
                         "pip install triton (or pip install -e '.[test]')") from None
    rows = [measure(kernel, cfg, config, role) for kernel, config, role in configs(a.smoke)]
    title = (f"# whole-learner kernels compiled for sm_90 (H100 / H200) on {report.device_name('cpu')}, Triton "
             f"{triton.__version__}; a_dff {cfg.a_dff}, dk {cfg.head_dim}, R {cfg.num_residual_units}, "
             f"n {cfg.glus_per_unit}. per SM: programs resident at once")
    text = table(rows, title)
    report.write(a, rows, text, report.device_name("cpu"))
    log(text)
    return rows
