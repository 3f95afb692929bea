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
    mma_waits: str = ""    # its wgmma.wait_group depths (PTX): "0" alone = each product waited for at once
    code_kb: float = 0.0   # SASS size: past the instruction cache, warps stall on instruction fetch
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


# Argument types by parameter name, as the op launches the kernels under bf16 autocast (A0's
# rows bf16, the output, residual sums and gradients into the op fp32): descriptors as
# (dtype, block: weight tile, row block or one unit's row block); everything else a pointer's
# element type or a scalar. The kernels' own parameter lists pick from it.
_DESCRIPTORS = {"w1_desc": ("bf16", "weight"), "w2_desc": ("bf16", "weight"), "w3_desc": ("bf16", "weight"),
                "x_desc": ("bf16", "rows"), "dx_desc": ("bf16", "rows"), "out_desc": ("fp32", "rows"),
                "dout_desc": ("fp32", "rows"), "z_desc": ("fp32", "unit"), "ys_desc": ("bf16", "unit"),
                "dys_desc": ("bf16", "unit")}
_SCALARS = {"ys_ptr": "*bf16", "dys_ptr": "*bf16", "N": "i32", "P": "i32", "eps": "fp32"}   # other *_ptr: *fp32


def _signature(fn, cfg, bm: int, bh: int) -> tuple:
    """(argument types, constexpr values) of a kernel's parameters for one config."""
    dk = cfg.head_dim
    blocks = {"weight": [1, bh, dk], "rows": [bm, dk], "unit": [1, bm, dk]}
    values = dict(A=cfg.a_dff, DK=dk, R=cfg.num_residual_units, NG=cfg.glus_per_unit, INTERP=False, TANH=True,
                  DROP=0, BM=bm, BH=bh)
    sig, consts = {}, {}
    for p in fn.params:
        if p.is_constexpr:
            sig[p.name], consts[p.name] = "constexpr", values[p.name]
        elif p.name in _DESCRIPTORS:
            dtype, block = _DESCRIPTORS[p.name]
            sig[p.name] = f"tensordesc<{dtype}[{', '.join(map(str, blocks[block]))}]>"
        else:
            sig[p.name] = _SCALARS.get(p.name, "*fp32")
    return sig, consts


def _cuobjdump(cubin: bytes, flag: str) -> str:
    """What the cuobjdump in Triton's wheel prints for a cubin with one flag."""
    import triton
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([tool, flag, f.name], capture_output=True, text=True, check=True).stdout


def _usage(cubin: bytes) -> tuple:
    """(registers, stack bytes) of a cubin."""
    out = _cuobjdump(cubin, "--dump-resource-usage")
    m = re.search(r"REG:(\d+) STACK:(\d+)", out)
    if not m:
        raise RuntimeError(f"no resource usage in cuobjdump's output: {out[:200]}")
    return int(m.group(1)), int(m.group(2))


def _code_kb(cubin: bytes) -> float:
    """The kernel's machine code in KB (sm_90 instructions are 16 bytes). An ncu profile of the
    warp-specialized row kernel (171 KB, every GLU and chunk unrolled once per consumer) put
    instruction fetch among its largest stalls; with those loops at run time it was 1.29x faster."""
    return 16 * len(re.findall(r"^\s+/\*[0-9a-f]{4,}\*/", _cuobjdump(cubin, "-sass"), re.M)) / 1024


def _mma_waits(ptx: str) -> str:
    """The wgmma.wait_group depths of a kernel's PTX, e.g. "0,1,2"."""
    depths = {int(d) for d in re.findall(r"wgmma\.wait_group\.sync\.aligned\s+(\d+)", ptx)}
    return ",".join(map(str, sorted(depths)))


def measure(kernel: str, cfg, config: tuple, role: str) -> ResourceRow:
    """Compile one kernel config for sm_90 and read back what it takes."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from ..model import metric_kernel_jit as jit
    bm, bh, warps, stages = config[:4]
    row = ResourceRow(kernel, str(config), role)
    fn = getattr(jit, kernel)
    sig, consts = _signature(fn, cfg, bm, bh)
    options = dict(num_warps=warps, num_stages=stages)
    if len(config) > 4:
        options["maxnreg"] = config[4]
    try:
        compiled = triton.compile(ASTSource(fn, sig, constexprs=consts),
                                  target=GPUTarget("cuda", 90, 32), options=options)
        row.registers, row.stack_bytes = _usage(compiled.asm["cubin"])
        row.mma_waits = _mma_waits(compiled.asm["ptx"])
        row.code_kb = _code_kb(compiled.asm["cubin"])
    except Exception as e:   # noqa: BLE001 - a config the compiler refuses is a row, not a failure
        row.status = f"refused: {str(e).splitlines()[0][:80]}"
        return row
    row.smem_bytes = compiled.metadata.shared
    row.per_sm, row.limit = programs_per_sm(row.registers, warps, row.smem_bytes)
    return row


WS_KERNELS = ("_learner_fwd_ws", "_learner_bwd_rows_ws")


def measure_ws(kernel: str, cfg) -> ResourceRow:
    """The warp-specialized Gluon kernel (metric_kernel_ws, metric_kernel_ws_rows) compiled for
    sm_90 as the op launches it: one program an SM of two consumer warpgroups and a producer
    warp. `registers` is the launch cap; each consumer then raises its own to CONSUMER_REGS
    (setmaxnreg)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon._runtime import GluonASTSource

    from ..model import metric_kernel as mk
    from ..model import metric_kernel_ws as ws
    from ..model import metric_kernel_ws_rows as ws_rows
    forward = kernel == "_learner_fwd_ws"
    module, stages = (ws, ws.FWD_STAGES) if forward else (ws_rows, ws_rows.ROWS_STAGES)
    role = "today (Hopper)" if (mk.WS_KERNELS if forward else mk.WS_ROW_KERNEL) else "off (flag)"
    row = ResourceRow(kernel, f"({ws.ROWS}, {ws.CHUNK}, 4+4+1 warps, {stages} stages)", role)
    dk = cfg.head_dim

    def desc(dtype, block):
        layout = gl.NVMMASharedLayout.get_default_for(block, gl.bfloat16 if dtype == "bf16" else gl.float32)
        return f"tensordesc<{dtype}[{', '.join(map(str, block))}],{layout!r}>"
    values = dict(A=cfg.a_dff, R=cfg.num_residual_units, NG=cfg.glus_per_unit, DK=dk,
                  NCH=triton.cdiv(cfg.a_dff, ws.CHUNK), S=stages, CREGS=ws.CONSUMER_REGS)
    fn = getattr(module, kernel)
    sig = {}
    for p in fn.params:
        if p.name in values:
            sig[p.name] = "constexpr"
        elif p.name == "bias_desc":
            sig[p.name] = desc("fp32", [4, ws.CHUNK])
        elif p.name in _DESCRIPTORS:
            sig[p.name] = desc(_DESCRIPTORS[p.name][0], [ws.ROWS // 2 if _DESCRIPTORS[p.name][1] != "weight"
                                                         else ws.CHUNK, dk])
        else:
            sig[p.name] = _SCALARS.get(p.name, "*fp32")
    try:
        compiled = triton.compile(GluonASTSource(fn, sig, constexprs=values), target=GPUTarget("cuda", 90, 32),
                                  options=dict(num_warps=4, maxnreg=ws.MAX_REGS))
        row.registers, row.stack_bytes = _usage(compiled.asm["cubin"])
        ptx = compiled.asm["ptx"]
        row.mma_waits = _mma_waits(ptx)
        row.code_kb = _code_kb(compiled.asm["cubin"])
        if "setmaxnreg" not in ptx:
            row.status = "not warp-specialized (no setmaxnreg)"
    except Exception as e:   # noqa: BLE001 - a kernel the compiler refuses is a row, not a failure
        row.status = f"refused: {str(e).splitlines()[0][:80]}"
        return row
    row.smem_bytes = compiled.metadata.shared
    row.per_sm, row.limit = programs_per_sm(ws.MAX_REGS, 12, row.smem_bytes)
    return row


def configs(smoke: bool) -> list:
    """(kernel, config, role): today's lists, then the sweep's candidates."""
    from ..model import metric_kernel as mk
    from . import kernel_sweep as ks
    if smoke:   # one small config a kernel, and the weight-gradient one (~160 registers) capped
        small = (32, 16, 4, 1)
        return [("_learner_fwd", small, "smoke"), ("_learner_bwd_rows", small, "smoke"),
                ("_learner_bwd_weights", small, "smoke"), ("_learner_bwd_weights", small + (128,), "smoke")]
    out = [("_learner_fwd", c, "autotuned") for c in mk.FWD_CONFIGS]
    for kernel, today in (("_learner_bwd_rows", mk.BWD_ROWS_CONFIGS), ("_learner_bwd_weights", mk.WGRAD_CONFIGS)):
        out += [(kernel, c, "today (first)" if i == 0 else "today (fallback)") for i, c in enumerate(today)]
    wgrad = list(ks.WGRAD) + [s["wgrad"] for _, s in ks.COMBOS if "wgrad" in s]
    for kernel, cands in (("_learner_fwd", ks.FWD), ("_learner_bwd_rows", ks.ROWS), ("_learner_bwd_weights", wgrad)):
        out += [(kernel, c, "sweep candidate") for c in dict.fromkeys(cands)]
    return out


def table(rows: list, title: str) -> str:
    lines = [title, f"{'kernel':<22} {'config':<24} {'role':<17} {'regs':>5} {'stack B':>8} {'smem KB':>8} "
             f"{'per SM':>6} {'waits':>7} {'code KB':>8}  capped by / status"]
    for r in rows:
        tail = r.limit if r.status == "ok" else r.status
        lines.append(f"{r.kernel:<22} {r.config:<24} {r.role:<17} {r.registers:>5} {r.stack_bytes:>8} "
                     f"{r.smem_bytes / 1024:>8.1f} {r.per_sm:>6} {r.mma_waits:>7} {r.code_kb:>8.1f}  {tail}")
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
    rows = [] if a.smoke else [measure_ws(kernel, cfg) for kernel in WS_KERNELS]
    rows += [measure(kernel, cfg, config, role) for kernel, config, role in configs(a.smoke)]
    title = (f"# whole-learner kernels compiled for sm_90 (H100 / H200) on {report.device_name('cpu')}, Triton "
             f"{triton.__version__}; a_dff {cfg.a_dff}, dk {cfg.head_dim}, R {cfg.num_residual_units}, "
             f"n {cfg.glus_per_unit}. per SM: programs resident at once")
    text = table(rows, title)
    report.write(a, rows, text, report.device_name("cpu"))
    log(text)
    return rows
