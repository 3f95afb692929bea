"""Prototype: the GLU forward and input-gradient kernels as persistent programs that load the
weights once (all three hidden chunks, before the row-block loop) instead of once per row
block. A question for the GPU, not product code: timed by glu_variants.py --persistent.
Three hidden chunks (a <= 192) only.
"""
from __future__ import annotations

import triton
import triton.language as tl

from pldr_dist.model.glu_kernel import _gate_grads, _load_gate_up, _mm


@triton.jit
def _load_chunk(w1_ptr, b1_ptr, w2_ptr, b2_ptr, w3_ptr, c, A, cols, DK: tl.constexpr, BH: tl.constexpr):
    j = c * BH + tl.arange(0, BH)
    jmask = j < A
    w1t, b1, w2t, b2 = _load_gate_up(w1_ptr, b1_ptr, w2_ptr, b2_ptr, j, jmask, cols, DK, False)
    w3 = _mm(tl.load(w3_ptr + cols[:, None] * A + j[None, :], mask=jmask[None, :], other=0.0), False)
    return w1t, b1, w2t, b2, w3


@triton.jit
def _fwd_chunk(x, w1t, b1, w2t, b2, w3, acc):
    g = tl.dot(x, w1t) + b1[None, :]
    u = tl.dot(x, w2t) + b2[None, :]
    h = (g * tl.sigmoid(g) * u).to(tl.bfloat16)
    return tl.dot(h, tl.trans(w3), acc)


@triton.jit
def glu_fwd_persistent(x_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, w3_ptr, b3_ptr, y_ptr, N, A, NPROG,
                       DK: tl.constexpr, BH: tl.constexpr, BM: tl.constexpr):
    cols = tl.arange(0, DK)
    w1a, b1a, w2a, b2a, w3a = _load_chunk(w1_ptr, b1_ptr, w2_ptr, b2_ptr, w3_ptr, 0, A, cols, DK, BH)
    w1b, b1b, w2b, b2b, w3b = _load_chunk(w1_ptr, b1_ptr, w2_ptr, b2_ptr, w3_ptr, 1, A, cols, DK, BH)
    w1c, b1c, w2c, b2c, w3c = _load_chunk(w1_ptr, b1_ptr, w2_ptr, b2_ptr, w3_ptr, 2, A, cols, DK, BH)
    b3 = tl.load(b3_ptr + cols).to(tl.float32)
    for blk in tl.range(tl.program_id(0), tl.cdiv(N, BM), NPROG):
        rows = blk * BM + tl.arange(0, BM)
        rmask = rows < N
        x = tl.load(x_ptr + rows[:, None] * DK + cols[None, :], mask=rmask[:, None], other=0.0).to(tl.bfloat16)
        acc = tl.zeros((BM, DK), tl.float32) + b3[None, :]
        acc = _fwd_chunk(x, w1a, b1a, w2a, b2a, w3a, acc)
        acc = _fwd_chunk(x, w1b, b1b, w2b, b2b, w3b, acc)
        acc = _fwd_chunk(x, w1c, b1c, w2c, b2c, w3c, acc)
        tl.store(y_ptr + rows[:, None] * DK + cols[None, :], acc.to(y_ptr.dtype.element_ty), mask=rmask[:, None])


@triton.jit
def _dx_chunk(x, dy, w1t, b1, w2t, b2, w3, dx):
    g = tl.dot(x, w1t) + b1[None, :]
    u = tl.dot(x, w2t) + b2[None, :]
    dg, du, _ = _gate_grads(g, u, tl.dot(dy, w3))
    dx = tl.dot(dg.to(tl.bfloat16), tl.trans(w1t), dx)
    return tl.dot(du.to(tl.bfloat16), tl.trans(w2t), dx)


@triton.jit
def glu_bwd_input_persistent(x_ptr, dy_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, w3_ptr, dx_ptr, N, A, NPROG,
                             DK: tl.constexpr, BH: tl.constexpr, BM: tl.constexpr):
    cols = tl.arange(0, DK)
    w1a, b1a, w2a, b2a, w3a = _load_chunk(w1_ptr, b1_ptr, w2_ptr, b2_ptr, w3_ptr, 0, A, cols, DK, BH)
    w1b, b1b, w2b, b2b, w3b = _load_chunk(w1_ptr, b1_ptr, w2_ptr, b2_ptr, w3_ptr, 1, A, cols, DK, BH)
    w1c, b1c, w2c, b2c, w3c = _load_chunk(w1_ptr, b1_ptr, w2_ptr, b2_ptr, w3_ptr, 2, A, cols, DK, BH)
    for blk in tl.range(tl.program_id(0), tl.cdiv(N, BM), NPROG):
        rows = blk * BM + tl.arange(0, BM)
        rmask = rows < N
        offs = rows[:, None] * DK + cols[None, :]
        x = tl.load(x_ptr + offs, mask=rmask[:, None], other=0.0).to(tl.bfloat16)
        dy = tl.load(dy_ptr + offs, mask=rmask[:, None], other=0.0).to(tl.bfloat16)
        dx = tl.zeros((BM, DK), tl.float32)
        dx = _dx_chunk(x, dy, w1a, b1a, w2a, b2a, w3a, dx)
        dx = _dx_chunk(x, dy, w1b, b1b, w2b, b2b, w3b, dx)
        dx = _dx_chunk(x, dy, w1c, b1c, w2c, b2c, w3c, dx)
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=rmask[:, None])
