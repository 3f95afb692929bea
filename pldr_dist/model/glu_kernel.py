"""The metric-learner GLU as Triton kernels whose hidden state never leaves the chip.

Why: the metric learner runs 16 GLUs (dk -> a -> dk, a = 170) over B*h*dk rows of width
dk = 64 per layer. Compiled, each GLU writes its gate, up and hidden activations (3a values
per row) to GPU memory and reads them back in the backward: memory-bound work that cost
the PLGA layer most of its gap to plain attention. Here
- the forward keeps each row block's hidden state in registers, chunk by chunk (BH columns
  of the hidden width at a time, the tail masked), and writes only the dk-wide output;
- the backward recomputes the hidden state instead of storing it: one kernel for the input
  gradient (row blocks in parallel), one for the weight gradients;
- weight gradients are reduced without atomics: one wave of programs (one per SM) each sum
  the contributions of their own row blocks in a pipelined loop, and a last kernel adds the
  per-program partials in a fixed order, so the same step gives the same bits every time.

Numerics are those of bf16 autocast: matmul inputs in bf16, accumulation and the gating in
fp32. Exposed as the custom op `pldr::glu` with its backward registered, so torch.compile
and CUDA graphs treat it as one opaque call. Used by `fast.FusedGLU` on CUDA when the
compute dtype is bf16; CPU tests run the same kernels in Triton's interpreter.
"""
from __future__ import annotations

import functools
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the compiled PyTorch GLU is used instead
    triton = None

BLOCK_HIDDEN = 64    # hidden units per chunk (chunks of 32 were no faster for the weight gradients)
# Weight-gradient kernel: (rows per block, warps, pipeline stages). One config only: the
# choice fixes the order in which rows are summed, so a second config picked by timing could
# change a run's bits from one process to the next.
WGRAD_CONFIGS = [(32, 4, 3)]
# sigmoid(g) = (1 + tanh(g / 2)) / 2 with the GPU's one-instruction tanh.approx (relative error
# ~2^-11, below bf16's 2^-8) instead of an exp and a reciprocal: the gating of 170 hidden units
# per row runs on the multiprocessors' special-function units, which have 1/16 of the FMA
# units' throughput. Read at each call; the interpreter always uses tl.sigmoid.
SIGMOID_TANH = True
_INTERP = os.environ.get("TRITON_INTERPRET") == "1"
# Partial-sum kernel: elements per program, partials per load. Triton's interpreter (tests) runs
# each program in Python: there 16x fewer, wider programs, each element summed in the same order.
SUM_BLOCK, SUM_ROWS = (1024 if _INTERP else 64), 64


def available(x: torch.Tensor) -> bool:
    """Whether Triton kernels can run on x: CUDA with Triton, or Triton's CPU interpreter
    (also used by `head_loss`)."""
    if triton is None:
        return False
    return x.is_cuda or (x.device.type == "cpu" and _INTERP)


if triton is not None:
    def _tuned(configs):
        """Autotune on the GPU (each config timed once per row count N); the interpreter takes
        the first. configs: (rows per block BM, warps), the winners of a wider H100 search
        (benchmarks/glu_kernel_bench.py) kept few so that tuning adds seconds, not minutes."""
        configs = configs[:1] if _INTERP else configs
        return triton.autotune([triton.Config({"BM": c[0]}, num_warps=c[1], num_stages=c[2] if len(c) > 2 else 3)
                                for c in configs], key=["N"])

    @triton.jit
    def _mm(t, INTERP: tl.constexpr):
        """A matmul operand: bf16 for the tensor cores. Triton's CPU interpreter cannot multiply
        bf16, so there it stays fp32 holding the bf16-rounded value (same products)."""
        if INTERP:
            return t.to(tl.bfloat16).to(tl.float32)
        return t.to(tl.bfloat16)

    @triton.jit
    def _load_gate_up(w1_ptr, b1_ptr, w2_ptr, b2_ptr, j, jmask, cols, DK: tl.constexpr, INTERP: tl.constexpr):
        """U1^T and U2^T [DK, BH] (bf16) and their biases (fp32) for hidden units j."""
        w1t = tl.load(w1_ptr + j[None, :] * DK + cols[:, None], mask=jmask[None, :], other=0.0)
        w2t = tl.load(w2_ptr + j[None, :] * DK + cols[:, None], mask=jmask[None, :], other=0.0)
        b1 = tl.load(b1_ptr + j, mask=jmask, other=0.0).to(tl.float32)
        b2 = tl.load(b2_ptr + j, mask=jmask, other=0.0).to(tl.float32)
        return _mm(w1t, INTERP), b1, _mm(w2t, INTERP), b2

    @triton.jit
    def _gate_up(x, w1_ptr, b1_ptr, w2_ptr, b2_ptr, j, jmask, cols, DK: tl.constexpr, INTERP: tl.constexpr):
        """Gate and up projections of a row block for hidden units j: [BM, BH] fp32 each."""
        w1t, b1, w2t, b2 = _load_gate_up(w1_ptr, b1_ptr, w2_ptr, b2_ptr, j, jmask, cols, DK, INTERP)
        return tl.dot(x, w1t) + b1[None, :], tl.dot(x, w2t) + b2[None, :], w1t, w2t

    @triton.jit
    def _sigmoid(g, TANH: tl.constexpr):
        if TANH:
            t = tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=f,f", [0.5 * g],
                                          dtype=tl.float32, is_pure=True, pack=1)
            return 0.5 + 0.5 * t
        return tl.sigmoid(g)

    @triton.jit
    def _gate_grads(g, u, dh, TANH: tl.constexpr):
        """d/dg and d/du of silu(g) * u, and the hidden value itself."""
        sg = _sigmoid(g, TANH)
        silu = g * sg
        dg = dh * u * (sg * (1.0 + g * (1.0 - sg)))
        du = dh * silu
        return dg, du, silu * u

    @_tuned([(64, 4), (128, 8)])
    @triton.jit
    def _glu_fwd(x_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, w3_ptr, b3_ptr, y_ptr, N, A,
                 DK: tl.constexpr, BH: tl.constexpr, NCHUNK: tl.constexpr, INTERP: tl.constexpr,
                 TANH: tl.constexpr, BM: tl.constexpr):
        rows = tl.program_id(0) * BM + tl.arange(0, BM)
        cols = tl.arange(0, DK)
        rmask = rows < N
        x = _mm(tl.load(x_ptr + rows[:, None] * DK + cols[None, :], mask=rmask[:, None], other=0.0), INTERP)
        acc = tl.zeros((BM, DK), tl.float32)
        for c in tl.static_range(NCHUNK):
            j = c * BH + tl.arange(0, BH)
            jmask = j < A
            g, u, _, _ = _gate_up(x, w1_ptr, b1_ptr, w2_ptr, b2_ptr, j, jmask, cols, DK, INTERP)
            h = g * _sigmoid(g, TANH) * u
            w3t = tl.load(w3_ptr + cols[None, :] * A + j[:, None], mask=jmask[:, None], other=0.0)
            acc += tl.dot(_mm(h, INTERP), _mm(w3t, INTERP))
        y = acc + tl.load(b3_ptr + cols).to(tl.float32)[None, :]
        tl.store(y_ptr + rows[:, None] * DK + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=rmask[:, None])

    @_tuned([(128, 8), (64, 4)])
    @triton.jit
    def _glu_bwd_input(x_ptr, dy_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, w3_ptr, dx_ptr, N, A,
                       DK: tl.constexpr, BH: tl.constexpr, NCHUNK: tl.constexpr, INTERP: tl.constexpr,
                       TANH: tl.constexpr, BM: tl.constexpr):
        rows = tl.program_id(0) * BM + tl.arange(0, BM)
        cols = tl.arange(0, DK)
        rmask = rows < N
        offs = rows[:, None] * DK + cols[None, :]
        x = _mm(tl.load(x_ptr + offs, mask=rmask[:, None], other=0.0), INTERP)
        dy = _mm(tl.load(dy_ptr + offs, mask=rmask[:, None], other=0.0), INTERP)
        dx = tl.zeros((BM, DK), tl.float32)
        for c in tl.static_range(NCHUNK):
            j = c * BH + tl.arange(0, BH)
            jmask = j < A
            g, u, w1t, w2t = _gate_up(x, w1_ptr, b1_ptr, w2_ptr, b2_ptr, j, jmask, cols, DK, INTERP)
            w3 = tl.load(w3_ptr + cols[:, None] * A + j[None, :], mask=jmask[None, :], other=0.0)
            dg, du, _ = _gate_grads(g, u, tl.dot(dy, _mm(w3, INTERP)), TANH)
            dx += tl.dot(_mm(dg, INTERP), tl.trans(w1t))
            dx += tl.dot(_mm(du, INTERP), tl.trans(w2t))
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=rmask[:, None])

    @triton.jit
    def _wgrad_block(blk, x_ptr, dy_ptr, w1t, b1, w2t, b2, w3, dw1t, dw2t, dw3, db1, db2, db3, N, cols,
                     DK: tl.constexpr, INTERP: tl.constexpr, TANH: tl.constexpr, BM: tl.constexpr):
        """One row block's share of a hidden chunk's weight gradients, added to the sums.
        dU1 and dU2 are summed transposed ([DK, BH], x^T @ dg): the loaded x tile is then the
        left operand, which the tensor cores read transposed for free, and only dg / du, computed
        in registers, pass through shared memory."""
        rows = blk * BM + tl.arange(0, BM)
        rmask = rows < N
        offs = rows[:, None] * DK + cols[None, :]
        x = _mm(tl.load(x_ptr + offs, mask=rmask[:, None], other=0.0), INTERP)
        dy = _mm(tl.load(dy_ptr + offs, mask=rmask[:, None], other=0.0), INTERP)
        g = tl.dot(x, w1t) + b1[None, :]
        u = tl.dot(x, w2t) + b2[None, :]
        dg, du, h = _gate_grads(g, u, tl.dot(dy, w3), TANH)   # rows past N: dy = 0, no share
        dw1t += tl.dot(tl.trans(x), _mm(dg, INTERP))
        dw2t += tl.dot(tl.trans(x), _mm(du, INTERP))
        dw3 += tl.dot(tl.trans(dy), _mm(h, INTERP))
        db1 += tl.sum(dg, axis=0)
        db2 += tl.sum(du, axis=0)
        db3 += tl.sum(dy.to(tl.float32), axis=0)
        return dw1t, dw2t, dw3, db1, db2, db3

    @_tuned(WGRAD_CONFIGS)
    @triton.jit
    def _glu_bwd_weights(x_ptr, dy_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, w3_ptr, part_ptr, N, A, P,
                         DK: tl.constexpr, BH: tl.constexpr, NCHUNK: tl.constexpr, INTERP: tl.constexpr,
                         TANH: tl.constexpr, BM: tl.constexpr):
        """Program (p, c) of (P, NCHUNK): hidden chunk c, row blocks p, p + P, p + 2P, ...

        Writes its partial sums to part[p, c] = [dU1^T | dU2^T | dU3 (each [DK, BH], hidden
        units j) | db1 | db2 | db3]. On the GPU the row-block loop is software-pipelined (the
        next blocks' loads in flight while this one computes)."""
        p, c = tl.program_id(0), tl.program_id(1)
        cols = tl.arange(0, DK)
        j = c * BH + tl.arange(0, BH)
        jmask = j < A
        w1t, b1, w2t, b2 = _load_gate_up(w1_ptr, b1_ptr, w2_ptr, b2_ptr, j, jmask, cols, DK, INTERP)
        w3 = _mm(tl.load(w3_ptr + cols[:, None] * A + j[None, :], mask=jmask[None, :], other=0.0), INTERP)
        dw1t = tl.zeros((DK, BH), tl.float32)
        dw2t = tl.zeros((DK, BH), tl.float32)
        dw3 = tl.zeros((DK, BH), tl.float32)
        db1 = tl.zeros((BH,), tl.float32)
        db2 = tl.zeros((BH,), tl.float32)
        db3 = tl.zeros((DK,), tl.float32)
        nblocks = tl.cdiv(N, BM)
        if INTERP:   # the interpreter fails on range() with runtime bounds (numpy 2)
            blk = p
            while blk < nblocks:
                dw1t, dw2t, dw3, db1, db2, db3 = _wgrad_block(
                    blk, x_ptr, dy_ptr, w1t, b1, w2t, b2, w3, dw1t, dw2t, dw3, db1, db2, db3, N, cols, DK, INTERP, TANH, BM)
                blk += P
        else:
            for blk in tl.range(p, nblocks, P):
                dw1t, dw2t, dw3, db1, db2, db3 = _wgrad_block(
                    blk, x_ptr, dy_ptr, w1t, b1, w2t, b2, w3, dw1t, dw2t, dw3, db1, db2, db3, N, cols, DK, INTERP, TANH, BM)
        hid = tl.arange(0, BH)
        BD: tl.constexpr = BH * DK
        tile = cols[:, None] * BH + hid[None, :]
        out = part_ptr + (p * NCHUNK + c) * (3 * BD + 2 * BH + DK)
        tl.store(out + tile, dw1t)
        tl.store(out + BD + tile, dw2t)
        tl.store(out + 2 * BD + tile, dw3)
        tl.store(out + 3 * BD + hid, db1)
        tl.store(out + 3 * BD + BH + hid, db2)
        tl.store(out + 3 * BD + 2 * BH + cols, db3)

    @triton.jit
    def _glu_sum_partials(part_ptr, dw1_ptr, db1_ptr, dw2_ptr, db2_ptr, dw3_ptr, db3_ptr, A, P,
                          DK: tl.constexpr, BH: tl.constexpr, NCHUNK: tl.constexpr, BLOCK: tl.constexpr,
                          PB: tl.constexpr):
        """Sums the weight-gradient programs' partials in a fixed order and
        writes each gradient in place, in its parameter's layout and dtype: one launch instead
        of a sum and six copies."""
        c = tl.program_id(1)
        BD: tl.constexpr = BH * DK
        R: tl.constexpr = 3 * BD + 2 * BH + DK
        e = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        emask = e < R
        ps = tl.arange(0, PB)
        acc = tl.zeros((PB, BLOCK), tl.float32)
        p0 = 0
        while p0 < P:   # PB partials per load, so that the loop is short (it waits on memory)
            pmask = (p0 + ps) < P
            acc += tl.load(part_ptr + ((p0 + ps[:, None]) * NCHUNK + c) * R + e[None, :],
                           mask=pmask[:, None] & emask[None, :], other=0.0)
            p0 += PB
        acc = tl.sum(acc, axis=0)
        seg = e // BD                    # 0, 1, 2: dU1^T, dU2^T, dU3 tiles [DK, BH]; 3: biases
        k = e % BD
        d, jj = k // BH, c * BH + k % BH
        tmask = emask & (jj < A)
        tl.store(dw1_ptr + jj * DK + d, acc.to(dw1_ptr.dtype.element_ty), mask=tmask & (seg == 0))
        tl.store(dw2_ptr + jj * DK + d, acc.to(dw2_ptr.dtype.element_ty), mask=tmask & (seg == 1))
        tl.store(dw3_ptr + d * A + jj, acc.to(dw3_ptr.dtype.element_ty), mask=tmask & (seg == 2))
        b = e - 3 * BD                   # [db1 (BH) | db2 (BH) | db3 (DK)] of this chunk
        jb = c * BH + b % BH
        bmask = emask & (b >= 0)
        tl.store(db1_ptr + jb, acc.to(db1_ptr.dtype.element_ty), mask=bmask & (b < BH) & (jb < A))
        tl.store(db2_ptr + jb, acc.to(db2_ptr.dtype.element_ty), mask=bmask & (b >= BH) & (b < 2 * BH) & (jb < A))
        if c == 0:   # db3 is the same sum in every chunk
            tl.store(db3_ptr + (b - 2 * BH), acc.to(db3_ptr.dtype.element_ty), mask=bmask & (b >= 2 * BH))


def _tanh() -> bool:
    return SIGMOID_TANH and not _INTERP


def _shape(x: torch.Tensor, w1: torch.Tensor):
    n, dk = x.shape
    a = w1.shape[0]
    if dk & (dk - 1) or dk < 16:
        raise ValueError(f"Triton GLU needs a power-of-two head_dim >= 16, got {dk}")
    return n, dk, a, triton.cdiv(a, BLOCK_HIDDEN)


@functools.lru_cache(maxsize=None)
def _programs(device: torch.device, nchunk: int) -> int:
    """Weight-gradient programs per hidden chunk: one wave, a program per SM (the H100 sweep,
    glu_variants_wgrad_log.txt: fewer partials to sum, and no SM left with a second program).
    Fixed per device, so the order in which rows are summed is."""
    if device.type == "cuda":
        return max(1, torch.cuda.get_device_properties(device).multi_processor_count // nchunk)
    return 3


@torch.library.custom_op("pldr::glu", mutates_args=())
def glu(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor,
        w3: torch.Tensor, b3: torch.Tensor) -> torch.Tensor:
    """U3(silu(U1 x + b1) * (U2 x + b2)) + b3 for rows x [N, dk]; bf16 output (autocast's)."""
    x = x.contiguous()
    n, dk, a, nchunk = _shape(x, w1)
    y = torch.empty(n, dk, device=x.device, dtype=torch.bfloat16)
    grid = lambda meta: (triton.cdiv(n, meta["BM"]),)  # noqa: E731
    _glu_fwd[grid](x, w1, b1, w2, b2, w3, b3, y, n, a, DK=dk, BH=BLOCK_HIDDEN, NCHUNK=nchunk, INTERP=_INTERP, TANH=_tanh())
    return y


@glu.register_fake
def _(x, w1, b1, w2, b2, w3, b3):
    return x.new_empty(x.shape, dtype=torch.bfloat16)


@torch.library.custom_op("pldr::glu_backward", mutates_args=())
def glu_backward(dy: torch.Tensor, x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor,
                 w2: torch.Tensor, b2: torch.Tensor, w3: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                            torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dw1, db1, dw2, db2, dw3, db3); gradients in the dtypes of x and the weights."""
    x, dy = x.contiguous(), dy.contiguous()
    n, dk, a, nchunk = _shape(x, w1)
    dx = torch.empty_like(x)
    grid = lambda meta: (triton.cdiv(n, meta["BM"]),)  # noqa: E731
    _glu_bwd_input[grid](x, dy, w1, b1, w2, b2, w3, dx, n, a, DK=dk, BH=BLOCK_HIDDEN, NCHUNK=nchunk, INTERP=_INTERP, TANH=_tanh())
    P, bh = _programs(x.device, nchunk), BLOCK_HIDDEN
    part = torch.empty(P, nchunk, 3 * bh * dk + 2 * bh + dk, device=x.device, dtype=torch.float32)
    _glu_bwd_weights[(P, nchunk)](x, dy, w1, b1, w2, b2, w3, part, n, a, P,
                                  DK=dk, BH=bh, NCHUNK=nchunk, INTERP=_INTERP, TANH=_tanh())
    grads = [w.new_empty(w.shape) for w in (w1, b1, w2, b2, w3)] + [b1.new_empty(dk)]
    _glu_sum_partials[(triton.cdiv(part.shape[-1], SUM_BLOCK), nchunk)](
        part, *grads, a, P, DK=dk, BH=bh, NCHUNK=nchunk, BLOCK=SUM_BLOCK, PB=SUM_ROWS)
    return (dx, *grads)


@glu_backward.register_fake
def _(dy, x, w1, b1, w2, b2, w3):
    return (torch.empty_like(x), torch.empty_like(w1), torch.empty_like(b1), torch.empty_like(w2),
            torch.empty_like(b2), torch.empty_like(w3), b1.new_empty(w3.shape[0]))


def _setup(ctx, inputs, output):
    x, w1, b1, w2, b2, w3, _ = inputs
    ctx.save_for_backward(x, w1, b1, w2, b2, w3)


def _backward(ctx, dy):
    return glu_backward(dy, *ctx.saved_tensors)


glu.register_autograd(_backward, setup_context=_setup)
