"""A layer's whole metric learner as one Triton op, `pldr::metric_learner` (issue #24).

Why: with the per-GLU kernel (`glu_kernel`) each of the 16 GLUs of a pldr-110m learner is its
own launch, and between them every GLU output, residual sum and LayerNorm output (dk values
per row each) goes through GPU memory, forward and backward, and autograd keeps each GLU's
input. Here a block of rows stays on the chip from LayerNorm_dk(A0) to the last unit.

Forward (`_learner_fwd`, one program per block of BM rows x dk columns):
    a = LN_0(x);  for r < R:  z_r = GLU_{r,n-1}(... GLU_{r,0}(a)) + a;  a = LN_{r+1}(z_r)
with LN_0 the input LayerNorm and LN_{r+1} unit r's. Each GLU runs over its hidden width
a_dff in chunks of BH units: a_dff = 170 is padded to 192 *inside* the kernel (the tensor
memory accelerator, TMA, fills weight rows past a_dff with zeros and the bias loads are
masked, so padded units add exact zeros; the parameters keep their shape). Per chunk the
gate, up and hidden values of the row block live in registers; the weights (bf16, ~1 MB for a
pldr-110m learner) stream from L2 through TMA, tile by tile, and the rows go in and out
through TMA too, so no per-element addresses are held in registers. Saved for the backward:
x (the op's input), the pre-norm residual sums z_r, fp32 [R, N, dk] (the LayerNorms'
statistics are recomputed from them), and each GLU's input in the bf16 its products used, ys
[R*n, N, dk] (2 KB a row for pldr-110m, ~0.6 GB for its five layers at micro-batch 64). No
hidden (a_dff-wide) activation is stored.

Backward, three launches, no atomics:
 1. `_learner_bwd_rows`, one program per row block: walks the units in reverse; LayerNorm
    backward from z_r; back-propagates through the unit's GLUs in reverse, reading each
    GLU's input from ys and recomputing each chunk's hidden state as `glu_kernel` does.
    (Until ys was saved, GLU j's input was recomputed here from the unit's input: for n = 2
    one more GLU forward per unit, ~23% of this kernel's products.) Writes dx, per-block
    partial LayerNorm weight/bias gradients, and every GLU's output gradient dy (bf16,
    [R*n, N, dk]: with ys what the weight gradients need; freed after the backward).
 2. `_learner_bwd_weights`, programs (p, chunk, GLU): `glu_kernel`'s weight-gradient scheme
    for all R*n GLUs in one launch. Program p sums row blocks p, p+P, p+2P, ... of one GLU's
    hidden chunk in registers (fp32) and writes one partial; P is fixed per device. Its
    products are computed hidden-units-by-rows, so each has 64 on its M side and runs on
    Hopper's warpgroup MMA. The bias gradients are sums over rows done as products on the
    tensor cores (`_wgrad_block`), of the bf16 gate/up/output gradients the weight products
    use, as autocast's bias gradient is.
 3. `_learner_sum_partials` adds the P partials in a fixed order and writes each gradient in
    its parameter's stacked layout and dtype; the LayerNorm partials are summed by torch over
    the row-block axis (a fixed-shape reduction).
The backward kernels' configs are fixed per toolchain (the first that compiles, not the
fastest), so a step gives the same bits every time.

Numerics are bf16 autocast's, as in `glu_kernel`: matmul operands in bf16 (weights, the
inputs of each GLU, the hidden values, the gradients fed to the products); accumulation,
LayerNorms, gating and the residual stream in fp32. The output is fp32 (what autocast's
LayerNorm hands the power law), dx has x's dtype, weight gradients their parameter's dtype.
On CPUs the learner stays plain PyTorch (`plga.MetricLearner`); CPU tests run these kernels
in Triton's interpreter (TRITON_INTERPRET=1).

On Hopper GPUs (dk = 64, whole 128-row blocks) the forward and step 1 run as warp-specialized
Gluon kernels instead (`metric_kernel_ws`: a producer warp streams the
weight tiles to two consumer warpgroups that share them), with the same algorithm, saved
tensors and outputs; steps 2 and 3 are the same for both.
"""
from __future__ import annotations

import functools
import os

import torch

try:
    import triton
    from triton.runtime.errors import OutOfResources, PTXASError
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # CPU-only installs: the PyTorch learner is used instead
    triton = None

# Configs: (BM rows per block, BH hidden units per chunk, warps, pipeline stages[, register
# cap per thread: ptxas spills above it, and more programs fit on an SM]). With
# dk = 64 a [64, 64] fp32 tile costs 32 registers per thread at 4 warps; the chunk's gate, up,
# hidden and their gradients are what fills the register file, so wide chunks need 8 warps
# (BH = 64 at 4 warps spilled in the backward). The first guesses (BH = 32, one stage: several
# small programs per SM hiding each other's TMA latency) were not the fastest on an H200:
# Forward: autotuned per shape (rows are independent: the choice changes speed, not values).
# `pldr-bench kernels --sweep` on an H200 (benchmarks/results/kernels/h200/kernels_sweep.txt)
# put (128, 64, 8, 2) at 0.64 ms for pldr-110m mb128 against 0.89 for (64, 64, 4, 1).
FWD_CONFIGS = [(128, 64, 8, 2), (64, 64, 4, 2), (64, 64, 4, 1), (128, 64, 8, 1), (64, 32, 4, 1)]
# Backward: NOT timed. The first config that compiles is used and kept for the process: BM
# and BH fix how the weight gradients are summed, so a config picked by timing could change
# a run's bits from one process to the next. Later entries are fallbacks.
# Rows: two stages let the compiler fetch the next GLU's weight tiles (TMA) during this one's
# products; with one stage the row kernel spent half its stall samples waiting for them (ncu,
# H100). Sweep on an H100 (kernels/h100/kernels_sweep): (128, 64, 8, 2) 0.91 ms against 1.55 for
# (128, 64, 8, 1) at pldr-110m mb128, 0.27 against 0.45 at pldr-1b mb16; three stages do not fit
# in shared memory. The stages change when data arrives, not the order of any sum: the errors
# against fp32 came out equal to every digit (the weight-gradient configs, which do reorder sums,
# moved them).
# Weight gradients (products turned around, `_wgrad_block`): 64-row blocks at 4 warps 0.54 ms
# against 0.63-0.66 for 32-row blocks and 1.15 at 8 warps (pldr-110m mb128, H100,
# kernels/h100/kernels_sweep); the last fallback's 32-wide chunks put 32 on the M side (mma.sync).
# Programs per SM: 2 / 8 took 0.600 / 0.531 ms against 0.544 at pldr-110m, 0.180 / 0.175 against
# 0.169 at pldr-1b mb16.
BWD_ROWS_CONFIGS = [(128, 64, 8, 2), (128, 64, 8, 1), (64, 32, 4, 1), (128, 32, 8, 1), (32, 32, 4, 1)]
WGRAD_CONFIGS = [(64, 64, 4, 3), (32, 64, 4, 3), (32, 32, 4, 1)]
INTERP_BM, INTERP_BH = 32, 16   # Triton's interpreter (tests): fewer, larger programs run faster
PROGRAMS_PER_SM = 4  # weight-gradient programs: ~4 per SM over all (chunk, GLU) pairs
# sigmoid through tanh.approx on the GPU (see glu_kernel.SIGMOID_TANH); read at each call.
SIGMOID_TANH = True
# The forward and (WS_ROW_KERNEL) the backward's row kernel on Hopper through the warp-specialized
# Gluon kernels (metric_kernel_ws.py) where they apply, else the Triton ones below. On an H100
# (kernels/h100/kernels_sweep, kernel time a call): forward 0.407 against 0.588 ms, row kernel
# 0.882 against 0.907 (pldr-110m mb 128); 0.238 / 0.328 and 0.509 / 0.520 (pldr-1b mb 32). Read at
# each call.
WS_KERNELS = True
WS_ROW_KERNEL = True
# Tests only: 1 drops the LayerNorm backward's projection term, 2 drops silu's g*s*(1-s)
# term; the checks must then fail. Read at each call; 0 in normal use.
BREAK_DERIVATIVE = 0
_INTERP = os.environ.get("TRITON_INTERPRET") == "1"
# Partial-sum kernel: elements per program, partials per load (the interpreter: wider programs,
# each element summed in the same order, as in glu_kernel).
SUM_BLOCK, SUM_ROWS = (1024 if _INTERP else 64), 8


def _maxnreg(config: tuple):
    """A config's register cap, None (ptxas decides) unless it has a fifth entry."""
    return config[4] if len(config) > 4 else None


def available(x: torch.Tensor) -> bool:
    """Whether the kernels can run on x: CUDA with Triton, or Triton's CPU interpreter."""
    if triton is None:
        return False
    return x.is_cuda or (x.device.type == "cpu" and _INTERP)


if triton is not None:
    from . import metric_kernel_ws, metric_kernel_ws_rows
    from .metric_kernel_jit import (_learner_bwd_rows, _learner_bwd_weights, _learner_fwd,  # noqa: F401
                                    _learner_sum_partials)

    def _descriptor_blocks(nargs):
        """Autotuner pre-hook: the weight descriptors' tiles follow the config's BH, the row
        descriptors' its BM."""
        bm, dk = nargs["BM"], nargs["DK"]
        for name in ("w1_desc", "w2_desc", "w3_desc"):
            nargs[name].block_shape = [1, nargs["BH"], dk]
        for name, block in (("x_desc", [bm, dk]), ("out_desc", [bm, dk]), ("z_desc", [1, bm, dk]),
                            ("ys_desc", [1, bm, dk])):
            nargs[name].block_shape = block

    def fwd_autotuned(configs: list):
        """The forward kernel autotuned over (BM, BH, warps, stages) configs, per shape."""
        return triton.autotune(
            [triton.Config({"BM": c[0], "BH": c[1]}, num_warps=c[2], num_stages=c[3], maxnreg=_maxnreg(c),
                           pre_hook=_descriptor_blocks) for c in configs],
            key=["N", "A", "R", "NG", "DK"])(_learner_fwd)

    _learner_fwd_tuned = fwd_autotuned([(INTERP_BM, INTERP_BH, 1, 1)] if _INTERP else FWD_CONFIGS)


def _tanh() -> bool:
    return SIGMOID_TANH and not _INTERP


def _dims(x: torch.Tensor, u1_w: torch.Tensor) -> tuple:
    """(N rows, dk, R, n, a) of a call; refuses what the kernels cannot do."""
    n_rows, dk = x.shape
    R, n, a, dk_w = u1_w.shape
    if dk != dk_w:
        raise ValueError(f"rows of width {dk} for a learner of head_dim {dk_w}")
    if dk & (dk - 1) or dk < 16:
        raise ValueError(f"the Triton metric learner needs a power-of-two head_dim >= 16, got {dk}")
    if R * n * max(n_rows, 1) * dk >= 2 ** 31:   # offsets are 32-bit inside the kernels
        raise ValueError(f"{n_rows} rows are too many for one call of the Triton metric learner; split them")
    return n_rows, dk, R, n, a


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """t contiguous and 16-byte aligned, as a TMA descriptor's base must be."""
    t = t.contiguous()
    return t if t.data_ptr() % 16 == 0 else t.clone()


def _ln_params(in_w, in_b, norm_w, norm_b):
    """[R+1, dk] fp32 LayerNorm weights and biases: the input norm, then each unit's."""
    return (torch.cat((in_w[None], norm_w)).float().contiguous(), torch.cat((in_b[None], norm_b)).float().contiguous())


def _bf16_weights(u1_w, u2_w, u3_w) -> tuple:
    """The GLU weights as bf16 [R*n, A, DK] tensors, U3 transposed. One cast per call (the
    kernels then stream half the bytes from L2); U3 [dk, a] is transposed in the same copy,
    since a TMA row must be a multiple of 16 bytes (a = 170 bf16 is not, dk = 64 is). The
    parameters themselves are not touched or padded."""
    R, n, a, dk = u1_w.shape
    return (u1_w.to(torch.bfloat16).reshape(R * n, a, dk).contiguous(),
            u2_w.to(torch.bfloat16).reshape(R * n, a, dk).contiguous(),
            u1_w.new_empty((R * n, a, dk), dtype=torch.bfloat16).copy_(u3_w.transpose(-1, -2).reshape(R * n, a, dk)))


def _weight_descs(weights: tuple, bh: int) -> list:
    """TMA descriptors of `_bf16_weights`' tensors, read in [1, BH, DK] tiles (zero past A)."""
    return [TensorDescriptor.from_tensor(w, [1, bh, w.shape[-1]]) for w in weights]


def _ws(x: torch.Tensor, dk: int) -> bool:
    """Whether the warp-specialized kernels take this call (they compute silu through
    tanh.approx only and have no deliberately broken derivative)."""
    return WS_KERNELS and SIGMOID_TANH and not BREAK_DERIVATIVE and metric_kernel_ws.available(x, dk)


_chosen: dict = {}   # (kernel name, device) -> index of the config in use


def _launch_first(name: str, device: torch.device, configs: list, launch) -> tuple:
    """launch(BM, BH, warps, stages) with the first config that compiles on this device, then
    always that one (a fixed choice per toolchain: the summation order stays fixed)."""
    if _INTERP:
        launch(INTERP_BM, INTERP_BH, 1, 1)
        return (INTERP_BM, INTERP_BH, 1, 1)
    key = (name, str(device))
    err = None
    for i in range(_chosen.get(key, 0), len(configs)):
        try:
            launch(*configs[i])
        except (OutOfResources, PTXASError) as e:   # loud only if no config fits
            err = e
            continue
        _chosen[key] = i
        return configs[i]
    raise RuntimeError(f"{name}: no config of {configs} compiles on {device}: {err}") from err


def chosen_configs() -> dict:
    """Configs in use, for reports: the forward's autotuned picks and the backward kernels'."""
    out = {}
    if triton is not None:
        for key, cfg in getattr(_learner_fwd_tuned, "cache", {}).items():
            out[f"_learner_fwd {key}"] = str(cfg)
    for (name, dev), i in _chosen.items():
        out[f"{name}@{dev}"] = {"_learner_bwd_rows": BWD_ROWS_CONFIGS, "_learner_bwd_weights": WGRAD_CONFIGS}[name][i]
    if WS_KERNELS and triton is not None and metric_kernel_ws.gluon is not None:
        out["on Hopper (dk 64, whole 128-row blocks)"] = (
            f"forward{' and row kernel' if WS_ROW_KERNEL else ''} warp-specialized (metric_kernel_ws, "
            f"{metric_kernel_ws.FWD_STAGES} ring stages)")
    return out


@functools.lru_cache(maxsize=None)
def _programs(device: torch.device, work: int) -> int:
    """Weight-gradient programs per (chunk, GLU) pair: ~PROGRAMS_PER_SM programs per SM in
    all. Fixed per device, so the order in which rows are summed is."""
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        return max(1, PROGRAMS_PER_SM * sms // work)
    return 2


Tensor = torch.Tensor


@torch.library.custom_op("pldr::metric_learner", mutates_args=())
def metric_learner_op(x: Tensor, in_w: Tensor, in_b: Tensor, u1_w: Tensor, u1_b: Tensor, u2_w: Tensor,
                      u2_b: Tensor, u3_w: Tensor, u3_b: Tensor, norm_w: Tensor, norm_b: Tensor,
                      eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """(A [N, dk] fp32, and for the backward the residual sums z [R, N, dk] fp32 and the GLUs'
    inputs ys [R*n, N, dk] bf16) for rows x [N, dk] of A0; weights in `MetricLearner`'s stacked
    layout. Use `metric_learner` (returns A only)."""
    x = _aligned(x)
    n_rows, dk, R, n, a = _dims(x, u1_w)
    lnw, lnb = _ln_params(in_w, in_b, norm_w, norm_b)
    out = torch.empty(n_rows, dk, device=x.device, dtype=torch.float32)
    z = torch.empty(R, n_rows, dk, device=x.device, dtype=torch.float32)
    ys = torch.empty(R * n, n_rows, dk, device=x.device, dtype=torch.bfloat16)
    if n_rows and _ws(x, dk):
        w1, w2, w3 = _bf16_weights(u1_w, u2_w, u3_w)
        metric_kernel_ws.forward(x, lnw, lnb, w1, u1_b, w2, u2_b, w3, u3_b, out, z, ys, eps)
    elif n_rows:
        # tiles set per config (_descriptor_blocks)
        w1, w2, w3 = _weight_descs(_bf16_weights(u1_w, u2_w, u3_w), 16)
        grid = lambda meta: (triton.cdiv(n_rows, meta["BM"]),)  # noqa: E731
        # row descriptors: blocks set per config (_descriptor_blocks)
        xd, outd, zd, ysd = (TensorDescriptor.from_tensor(t, [16] * (t.dim() - 1) + [dk]) for t in (x, out, z, ys))
        _learner_fwd_tuned[grid](xd, lnw, lnb, w1, u1_b.contiguous(), w2, u2_b.contiguous(), w3, u3_b.contiguous(),
                                 outd, zd, ysd, n_rows, eps, A=a, R=R, NG=n, DK=dk, INTERP=_INTERP, TANH=_tanh())
    return out, z, ys


@metric_learner_op.register_fake
def _(x, in_w, in_b, u1_w, u1_b, u2_w, u2_b, u3_w, u3_b, norm_w, norm_b, eps):
    R, n = u1_w.shape[:2]
    return (x.new_empty(x.shape, dtype=torch.float32), x.new_empty((R, *x.shape), dtype=torch.float32),
            x.new_empty((R * n, *x.shape), dtype=torch.bfloat16))


@torch.library.custom_op("pldr::metric_learner_backward", mutates_args=())
def metric_learner_backward(dout: Tensor, x: Tensor, z: Tensor, ys: Tensor, in_w: Tensor, in_b: Tensor, u1_w: Tensor,
                            u1_b: Tensor, u2_w: Tensor, u2_b: Tensor, u3_w: Tensor, u3_b: Tensor, norm_w: Tensor,
                            norm_b: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
                                                                 Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients (dx, d in_w, d in_b, d u1_w, d u1_b, d u2_w, d u2_b, d u3_w, d u3_b, d norm_w,
    d norm_b) from the output gradient, in the dtypes of x and of each parameter."""
    x, z, ys, dout = _aligned(x), _aligned(z), _aligned(ys), _aligned(dout)
    n_rows, dk, R, n, a = _dims(x, u1_w)
    dev = x.device
    lnw, _ = _ln_params(in_w, in_b, norm_w, norm_b)
    b1, b2 = u1_b.contiguous(), u2_b.contiguous()
    drop, tanh = int(BREAK_DERIVATIVE), _tanh()
    dx = torch.empty_like(x)
    grads = [w.new_empty(w.shape) for w in (u1_w, u1_b, u2_w, u2_b, u3_w, u3_b)]
    if n_rows == 0:
        zeros = lambda t: torch.zeros_like(t)  # noqa: E731
        return (dx, zeros(in_w), zeros(in_b), *[g.zero_() for g in grads], zeros(norm_w), zeros(norm_b))
    G = R * n
    dys = torch.empty_like(ys)
    lnpart = []
    wb = _bf16_weights(u1_w, u2_w, u3_w)    # one cast for both kernels

    def rows(bm, bh, warps, stages, maxnreg=None):
        part = torch.empty(triton.cdiv(n_rows, bm), R + 1, 2, dk, device=dev, dtype=torch.float32)
        xd, doutd, dxd = (TensorDescriptor.from_tensor(t, [bm, dk]) for t in (x, dout, dx))
        zd, ysd, dysd = (TensorDescriptor.from_tensor(t, [1, bm, dk]) for t in (z, ys, dys))
        w1, w2, w3 = _weight_descs(wb, bh)
        _learner_bwd_rows[(part.shape[0],)](xd, zd, ysd, doutd, lnw, w1, b1, w2, b2, w3, dxd, dysd, part, eps,
                                            A=a, R=R, NG=n, DK=dk, BH=bh, INTERP=_INTERP, TANH=tanh,
                                            DROP=drop, BM=bm, num_warps=warps, num_stages=stages, maxnreg=maxnreg)
        lnpart[:] = [part]
    if WS_ROW_KERNEL and _ws(x, dk):
        lnpart[:] = [metric_kernel_ws_rows.backward_rows(x, z, ys, dout, lnw, wb[0], b1, wb[1], b2, wb[2],
                                                         dx, dys, eps)]
    else:
        _launch_first("_learner_bwd_rows", dev, BWD_ROWS_CONFIGS, rows)

    def weights(bm, bh, warps, stages, maxnreg=None):
        nchunk = triton.cdiv(a, bh)
        P = _programs(dev, nchunk * G)
        part = torch.empty(G, P, nchunk, 3 * bh * dk + 2 * bh + dk, device=dev, dtype=torch.float32)
        w1, w2, w3 = _weight_descs(wb, bh)
        _learner_bwd_weights[(P, nchunk, G)](ys, dys, w1, b1, w2, b2, w3, part, n_rows, P, A=a, DK=dk,
                                             INTERP=_INTERP, TANH=tanh, DROP=drop, BM=bm, BH=bh,
                                             num_warps=warps, num_stages=stages, maxnreg=maxnreg)
        _learner_sum_partials[(triton.cdiv(part.shape[-1], SUM_BLOCK), nchunk, G)](
            part, *grads, P, A=a, DK=dk, BH=bh, BLOCK=SUM_BLOCK, PB=SUM_ROWS)
    _launch_first("_learner_bwd_weights", dev, WGRAD_CONFIGS, weights)
    ln = lnpart[0].sum(0)            # [R+1, 2, dk]: a fixed-shape reduction over the row blocks
    own = lambda t, like: t.to(like.dtype, copy=True)  # noqa: E731  (outputs may not alias)
    return (dx, own(ln[0, 0], in_w), own(ln[0, 1], in_b), *grads, own(ln[1:, 0], norm_w), own(ln[1:, 1], norm_b))


@metric_learner_backward.register_fake
def _(dout, x, z, ys, in_w, in_b, u1_w, u1_b, u2_w, u2_b, u3_w, u3_b, norm_w, norm_b, eps):
    return tuple(torch.empty_like(t) for t in (x, in_w, in_b, u1_w, u1_b, u2_w, u2_b, u3_w, u3_b, norm_w, norm_b))


def _setup(ctx, inputs, output):
    x, *params, eps = inputs
    ctx.save_for_backward(x, output[1], output[2], *params)
    ctx.eps = eps
    ctx.mark_non_differentiable(output[1], output[2])
    # z and ys get no gradient: without this autograd passes zero tensors of their size
    # ([R, N, dk] fp32 and [R*n, N, dk] bf16), ~0.19 ms of fills a call at pldr-110m mb128 (H100)
    ctx.set_materialize_grads(False)


def _backward(ctx, dout, _dz, _dys):
    x, z, ys, *params = ctx.saved_tensors
    return (*metric_learner_backward(dout, x, z, ys, *params, ctx.eps), None)


metric_learner_op.register_autograd(_backward, setup_context=_setup)


def learner_params(module) -> tuple:
    """A `MetricLearner`'s parameters in the op's order."""
    return (module.in_norm.weight, module.in_norm.bias, module.u1_weight, module.u1_bias, module.u2_weight,
            module.u2_bias, module.u3_weight, module.u3_bias, module.norm_weight, module.norm_bias)


def metric_learner(a0: torch.Tensor, *params: torch.Tensor, eps: float) -> torch.Tensor:
    """The metric learner's output (fp32, a0's shape) for A0 [..., dk]; params as
    `learner_params(module)`."""
    out, _, _ = metric_learner_op(a0.reshape(-1, a0.shape[-1]), *params, eps)
    return out.view(a0.shape)
