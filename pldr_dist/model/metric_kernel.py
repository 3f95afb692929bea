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
pldr-110m learner) stream from L2 through TMA, tile by tile, without per-element addresses
in registers. Saved for the backward: x (the op's input) and the pre-norm residual sums z_r,
fp32 [R, N, dk]. From them unit r's input a_r = LN_r(z_{r-1}) (LN_0(x) for r = 0) and the
LayerNorm statistics are recomputed; no GLU activation is stored.

Backward, three launches, no atomics:
 1. `_learner_bwd_rows`, one program per row block: walks the units in reverse; LayerNorm
    backward from z_r; back-propagates through the unit's GLUs in reverse, recomputing each
    GLU's input from the unit's input and each chunk's hidden state as `glu_kernel` does
    (for n = 2 that is one extra GLU forward per unit). Writes dx, per-block partial
    LayerNorm weight/bias gradients, and for every GLU its input y and output gradient dy
    (bf16, [R*n, N, dk] each: what the weight gradients need; 4 KB per row for pldr-110m,
    freed after the backward).
 2. `_learner_bwd_weights`, programs (p, chunk, GLU): `glu_kernel`'s weight-gradient scheme
    for all R*n GLUs in one launch. Program p sums row blocks p, p+P, p+2P, ... of one GLU's
    hidden chunk in registers (fp32) and writes one partial; P is fixed per device.
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
"""
from __future__ import annotations

import functools
import os

import torch

try:
    import triton
    import triton.language as tl
    from triton.runtime.errors import OutOfResources, PTXASError
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # CPU-only installs: the PyTorch learner is used instead
    triton = None

# Configs: (BM rows per block, BH hidden units per chunk, warps, pipeline stages). With
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
# The same sweep: rows (128, 64, 8, 1) 1.95 ms against 2.41 for (64, 32, 4, 1) (pldr-110m mb128;
# 0.56 against 0.66 at pldr-1b mb16); more programs per SM for the weight gradients 1.31 / 1.43.
BWD_ROWS_CONFIGS = [(128, 64, 8, 1), (64, 32, 4, 1), (128, 32, 8, 1), (32, 32, 4, 1)]
WGRAD_CONFIGS = [(32, 64, 4, 3), (32, 32, 4, 1)]
INTERP_BM, INTERP_BH = 32, 16   # Triton's interpreter (tests): fewer, larger programs run faster
PROGRAMS_PER_SM = 4  # weight-gradient programs: ~4 per SM over all (chunk, GLU) pairs
SUM_BLOCK, SUM_ROWS = 64, 8   # partial-sum kernel: elements per program, partials per load
# sigmoid through tanh.approx on the GPU (see glu_kernel.SIGMOID_TANH); read at each call.
SIGMOID_TANH = True
# Tests only: 1 drops the LayerNorm backward's projection term, 2 drops silu's g*s*(1-s)
# term; the checks must then fail. Read at each call; 0 in normal use.
BREAK_DERIVATIVE = 0
_INTERP = os.environ.get("TRITON_INTERPRET") == "1"


def available(x: torch.Tensor) -> bool:
    """Whether the kernels can run on x: CUDA with Triton, or Triton's CPU interpreter."""
    if triton is None:
        return False
    return x.is_cuda or (x.device.type == "cpu" and _INTERP)


if triton is not None:
    @triton.jit
    def _mm(t, INTERP: tl.constexpr):
        """A matmul operand: bf16 for the tensor cores. Triton's CPU interpreter cannot multiply
        bf16, so there it stays fp32 holding the bf16-rounded value (same products)."""
        if INTERP:
            return t.to(tl.bfloat16).to(tl.float32)
        return t.to(tl.bfloat16)

    @triton.jit
    def _sigmoid(g, TANH: tl.constexpr):
        if TANH:
            t = tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=f,f", [0.5 * g],
                                          dtype=tl.float32, is_pure=True, pack=1)
            return 0.5 + 0.5 * t
        return tl.sigmoid(g)

    @triton.jit
    def _gate_grads(g, u, dh, TANH: tl.constexpr, DROP: tl.constexpr):
        """d/dg and d/du of h = silu(g) * u given dh, and h itself."""
        sg = _sigmoid(g, TANH)
        silu = g * sg
        if DROP == 2:
            dsilu = sg                               # deliberately wrong (tests)
        else:
            dsilu = sg * (1.0 + g * (1.0 - sg))
        return dh * u * dsilu, dh * silu, silu * u

    @triton.jit
    def _layer_norm(s, w_ptr, b_ptr, cols, eps, DK: tl.constexpr):
        """LayerNorm of each row of s [BM, DK] (fp32) with weight/bias at w_ptr/b_ptr (fp32)."""
        mean = tl.sum(s, axis=1) / DK
        d = s - mean[:, None]
        rstd = 1.0 / tl.sqrt(tl.sum(d * d, axis=1) / DK + eps)
        return d * rstd[:, None] * tl.load(w_ptr + cols)[None, :] + tl.load(b_ptr + cols)[None, :]

    @triton.jit
    def _layer_norm_bwd(s, dout, w_ptr, cols, eps, DK: tl.constexpr, DROP: tl.constexpr):
        """(ds, this block's dweight, dbias) of out = LayerNorm(s); statistics recomputed from s.
        Rows past N have s = 0 and dout = 0: they contribute nothing."""
        mean = tl.sum(s, axis=1) / DK
        d = s - mean[:, None]
        rstd = 1.0 / tl.sqrt(tl.sum(d * d, axis=1) / DK + eps)
        xhat = d * rstd[:, None]
        dxhat = dout * tl.load(w_ptr + cols)[None, :]
        c1 = tl.sum(dxhat, axis=1) / DK
        c2 = tl.sum(dxhat * xhat, axis=1) / DK
        if DROP == 1:
            ds = (dxhat - c1[:, None]) * rstd[:, None]   # deliberately wrong (tests)
        else:
            ds = (dxhat - c1[:, None] - xhat * c2[:, None]) * rstd[:, None]
        return ds, tl.sum(dout * xhat, axis=0), tl.sum(dout, axis=0)

    @triton.jit
    def _tile(desc, gi, c, BH: tl.constexpr, DK: tl.constexpr, INTERP: tl.constexpr):
        """Rows c*BH ... c*BH+BH-1 of GLU gi's [A, DK] bf16 weight, one TMA copy into shared
        memory; rows >= A (the padding of a_dff up to whole chunks) arrive as zeros."""
        return _mm(desc.load([gi, c * BH, 0]).reshape(BH, DK), INTERP)

    @triton.jit
    def _gate_up_weights(w1_desc, b1_ptr, w2_desc, b2_ptr, gi, c, A: tl.constexpr, BH: tl.constexpr,
                         DK: tl.constexpr, INTERP: tl.constexpr):
        """Hidden units j of chunk c of GLU gi: U1, U2 rows [BH, DK] (matmul operands) and c1,
        c2 (fp32, zero past A)."""
        j = c * BH + tl.arange(0, BH)
        b1 = tl.load(b1_ptr + gi * A + j, mask=j < A, other=0.0).to(tl.float32)
        b2 = tl.load(b2_ptr + gi * A + j, mask=j < A, other=0.0).to(tl.float32)
        return _tile(w1_desc, gi, c, BH, DK, INTERP), b1, _tile(w2_desc, gi, c, BH, DK, INTERP), b2

    @triton.jit
    def _glu_rows(y, gi, w1_desc, b1_ptr, w2_desc, b2_ptr, w3_desc, b3_ptr, cols, A: tl.constexpr,
                  BM: tl.constexpr, DK: tl.constexpr, BH: tl.constexpr, INTERP: tl.constexpr, TANH: tl.constexpr):
        """GLU gi, U3(silu(U1 y + c1) * (U2 y + c2)) + c3, of a row block y [BM, DK] (fp32):
        fp32 [BM, DK]. w3_desc reads U3^T ([A, DK] per GLU)."""
        yb = _mm(y, INTERP)
        acc = tl.zeros((BM, DK), tl.float32)
        for c in tl.static_range((A + BH - 1) // BH):
            w1, b1, w2, b2 = _gate_up_weights(w1_desc, b1_ptr, w2_desc, b2_ptr, gi, c, A, BH, DK, INTERP)
            g = tl.dot(yb, tl.trans(w1)) + b1[None, :]
            u = tl.dot(yb, tl.trans(w2)) + b2[None, :]
            h = g * _sigmoid(g, TANH) * u
            acc += tl.dot(_mm(h, INTERP), _tile(w3_desc, gi, c, BH, DK, INTERP))
        return acc + tl.load(b3_ptr + gi * DK + cols).to(tl.float32)[None, :]

    @triton.jit
    def _glu_rows_bwd(yb, dyb, gi, w1_desc, b1_ptr, w2_desc, b2_ptr, w3_desc, A: tl.constexpr,
                      BM: tl.constexpr, DK: tl.constexpr, BH: tl.constexpr, INTERP: tl.constexpr,
                      TANH: tl.constexpr, DROP: tl.constexpr):
        """The input gradient of GLU gi for a row block: input yb, output gradient dyb
        (matmul operands [BM, DK]); the hidden state is recomputed chunk by chunk."""
        dx = tl.zeros((BM, DK), tl.float32)
        for c in tl.static_range((A + BH - 1) // BH):
            w1, b1, w2, b2 = _gate_up_weights(w1_desc, b1_ptr, w2_desc, b2_ptr, gi, c, A, BH, DK, INTERP)
            g = tl.dot(yb, tl.trans(w1)) + b1[None, :]
            u = tl.dot(yb, tl.trans(w2)) + b2[None, :]
            w3t = _tile(w3_desc, gi, c, BH, DK, INTERP)
            dg, du, _ = _gate_grads(g, u, tl.dot(dyb, tl.trans(w3t)), TANH, DROP)
            dx += tl.dot(_mm(dg, INTERP), w1)
            dx += tl.dot(_mm(du, INTERP), w2)
        return dx

    @triton.jit
    def _learner_fwd(x_ptr, lnw_ptr, lnb_ptr, w1_desc, b1_ptr, w2_desc, b2_ptr, w3_desc, b3_ptr, out_ptr, z_ptr,
                     N, eps, A: tl.constexpr, R: tl.constexpr, NG: tl.constexpr, DK: tl.constexpr,
                     INTERP: tl.constexpr, TANH: tl.constexpr, BM: tl.constexpr, BH: tl.constexpr):
        """One row block through LN_0 and all R units; stores z_r (fp32) and the output (fp32).
        lnw/lnb [R+1, DK] stack the input LayerNorm and the units' (fp32); the weights are
        descriptors of [R*NG, A, DK] bf16 tensors (GLU g = r * NG + j; U3 transposed)."""
        rows = tl.program_id(0) * BM + tl.arange(0, BM)
        cols = tl.arange(0, DK)
        rmask = (rows < N)[:, None]
        offs = rows[:, None] * DK + cols[None, :]
        a = _layer_norm(tl.load(x_ptr + offs, mask=rmask, other=0.0).to(tl.float32), lnw_ptr, lnb_ptr, cols, eps, DK)
        for r in range(R):
            y = a
            for j in range(NG):
                y = _glu_rows(y, r * NG + j, w1_desc, b1_ptr, w2_desc, b2_ptr, w3_desc, b3_ptr, cols,
                              A, BM, DK, BH, INTERP, TANH)
            z = y + a
            tl.store(z_ptr + r * N * DK + offs, z, mask=rmask)
            a = _layer_norm(z, lnw_ptr + (r + 1) * DK, lnb_ptr + (r + 1) * DK, cols, eps, DK)
        tl.store(out_ptr + offs, a, mask=rmask)

    @triton.jit
    def _unit_input(x_desc, z_desc, r, row0, BM: tl.constexpr, DK: tl.constexpr):
        """What unit r's LayerNorm-ed input comes from: x for r = 0, else z_{r-1} (fp32 [BM, DK])."""
        if r == 0:
            s = x_desc.load([row0, 0]).to(tl.float32)
        else:
            s = z_desc.load([r - 1, row0, 0]).reshape(BM, DK)
        return s

    @triton.jit
    def _learner_bwd_rows(x_desc, z_desc, dout_desc, lnw_ptr, lnb_ptr, w1_desc, b1_ptr, w2_desc, b2_ptr, w3_desc,
                          b3_ptr, dx_desc, ys_desc, dys_desc, lnpart_ptr, eps,
                          A: tl.constexpr, R: tl.constexpr, NG: tl.constexpr, DK: tl.constexpr, BH: tl.constexpr,
                          INTERP: tl.constexpr, TANH: tl.constexpr, DROP: tl.constexpr, BM: tl.constexpr):
        """One row block back through all units: dx, the GLUs' inputs and output gradients
        (bf16, for the weight gradients) and this block's LayerNorm-parameter partials
        lnpart[block, k] = (dweight, dbias) of LN_k [2, DK].

        Rows go in and out through TMA descriptors (rows past N load as zeros and are not
        stored): no per-element addresses or masks stay in registers across the loops, which
        the backward's live set (the gradient, a chunk's gate/up/hidden values and their
        gradients) needs. GLU j's input is recomputed from the unit's input through GLUs
        0..j-1 (for n = 2: GLU 0 once per unit, the minimum) rather than stored and re-read;
        the last GLU's output is never needed (z_r is saved)."""
        pid = tl.program_id(0)
        row0 = pid * BM
        cols = tl.arange(0, DK)
        part = lnpart_ptr + pid * (R + 1) * 2 * DK
        da = dout_desc.load([row0, 0]).to(tl.float32)     # d loss / d (output of unit r)
        for rr in range(R):
            r = R - 1 - rr
            dz, dgam, dbet = _layer_norm_bwd(z_desc.load([r, row0, 0]).reshape(BM, DK), da,
                                             lnw_ptr + (r + 1) * DK, cols, eps, DK, DROP)
            tl.store(part + (r + 1) * 2 * DK + cols, dgam)
            tl.store(part + (r + 1) * 2 * DK + DK + cols, dbet)
            dy = dz                      # z_r = GLUs(a_r) + a_r: the last GLU's output gradient
            for jj in range(NG):
                j = NG - 1 - jj
                gi = r * NG + j
                y = _layer_norm(_unit_input(x_desc, z_desc, r, row0, BM, DK), lnw_ptr + r * DK, lnb_ptr + r * DK,
                                cols, eps, DK)
                for i in range(j):       # GLU j's input
                    y = _glu_rows(y, r * NG + i, w1_desc, b1_ptr, w2_desc, b2_ptr, w3_desc, b3_ptr, cols,
                                  A, BM, DK, BH, INTERP, TANH)
                ys_desc.store([gi, row0, 0], y.to(tl.bfloat16).reshape(1, BM, DK))
                dys_desc.store([gi, row0, 0], dy.to(tl.bfloat16).reshape(1, BM, DK))
                dy = _glu_rows_bwd(_mm(y, INTERP), _mm(dy, INTERP), gi, w1_desc, b1_ptr, w2_desc, b2_ptr, w3_desc,
                                   A, BM, DK, BH, INTERP, TANH, DROP)
            da = dz + dy                 # residual branch + GLU chain
        dx, dgam, dbet = _layer_norm_bwd(x_desc.load([row0, 0]).to(tl.float32), da, lnw_ptr, cols, eps, DK, DROP)
        tl.store(part + cols, dgam)
        tl.store(part + DK + cols, dbet)
        dx_desc.store([row0, 0], dx.to(dx_desc.dtype))

    @triton.jit
    def _wgrad_block(blk, ys_ptr, dys_ptr, w1t, b1, w2t, b2, w3, dw1t, dw2t, dw3, db1, db2, db3, N, cols,
                     DK: tl.constexpr, INTERP: tl.constexpr, TANH: tl.constexpr, DROP: tl.constexpr,
                     BM: tl.constexpr):
        """One row block's share of one GLU chunk's weight gradients, added to the sums (the
        dU1, dU2 sums transposed, [DK, BH], as in glu_kernel)."""
        rows = blk * BM + tl.arange(0, BM)
        rmask = (rows < N)[:, None]
        offs = rows[:, None] * DK + cols[None, :]
        y = _mm(tl.load(ys_ptr + offs, mask=rmask, other=0.0), INTERP)
        dy = _mm(tl.load(dys_ptr + offs, mask=rmask, other=0.0), INTERP)
        g = tl.dot(y, w1t) + b1[None, :]
        u = tl.dot(y, w2t) + b2[None, :]
        dg, du, h = _gate_grads(g, u, tl.dot(dy, w3), TANH, DROP)   # rows past N: dy = 0, no share
        dw1t += tl.dot(tl.trans(y), _mm(dg, INTERP))
        dw2t += tl.dot(tl.trans(y), _mm(du, INTERP))
        dw3 += tl.dot(tl.trans(dy), _mm(h, INTERP))
        db1 += tl.sum(dg, axis=0)
        db2 += tl.sum(du, axis=0)
        db3 += tl.sum(dy.to(tl.float32), axis=0)
        return dw1t, dw2t, dw3, db1, db2, db3

    @triton.jit
    def _learner_bwd_weights(ys_ptr, dys_ptr, w1_desc, b1_ptr, w2_desc, b2_ptr, w3_desc, part_ptr, N, P,
                             A: tl.constexpr, DK: tl.constexpr, INTERP: tl.constexpr, TANH: tl.constexpr,
                             DROP: tl.constexpr, BM: tl.constexpr, BH: tl.constexpr):
        """Program (p, c, g): GLU g's hidden chunk c over row blocks p, p + P, p + 2P, ...;
        writes part[g, p, c] = [dU1^T | dU2^T | dU3 (each [DK, BH]) | dc1 | dc2 | dc3]."""
        p, c, gi = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        NCHUNK: tl.constexpr = (A + BH - 1) // BH
        cols = tl.arange(0, DK)
        ys_ptr += gi * N * DK
        dys_ptr += gi * N * DK
        w1, b1, w2, b2 = _gate_up_weights(w1_desc, b1_ptr, w2_desc, b2_ptr, gi, c, A, BH, DK, INTERP)
        w1t, w2t, w3 = tl.trans(w1), tl.trans(w2), tl.trans(_tile(w3_desc, gi, c, BH, DK, INTERP))
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
                    blk, ys_ptr, dys_ptr, w1t, b1, w2t, b2, w3, dw1t, dw2t, dw3, db1, db2, db3, N, cols,
                    DK, INTERP, TANH, DROP, BM)
                blk += P
        else:
            for blk in tl.range(p, nblocks, P):
                dw1t, dw2t, dw3, db1, db2, db3 = _wgrad_block(
                    blk, ys_ptr, dys_ptr, w1t, b1, w2t, b2, w3, dw1t, dw2t, dw3, db1, db2, db3, N, cols,
                    DK, INTERP, TANH, DROP, BM)
        hid = tl.arange(0, BH)
        BD: tl.constexpr = BH * DK
        tile = cols[:, None] * BH + hid[None, :]
        out = part_ptr + ((gi * P + p) * NCHUNK + c) * (3 * BD + 2 * BH + DK)
        tl.store(out + tile, dw1t)
        tl.store(out + BD + tile, dw2t)
        tl.store(out + 2 * BD + tile, dw3)
        tl.store(out + 3 * BD + hid, db1)
        tl.store(out + 3 * BD + BH + hid, db2)
        tl.store(out + 3 * BD + 2 * BH + cols, db3)

    @triton.jit
    def _learner_sum_partials(part_ptr, dw1_ptr, db1_ptr, dw2_ptr, db2_ptr, dw3_ptr, db3_ptr, P,
                              A: tl.constexpr, DK: tl.constexpr, BH: tl.constexpr, BLOCK: tl.constexpr,
                              PB: tl.constexpr):
        """Program (e, c, g): sums the P partials of GLU g, chunk c, elements e*BLOCK... in a
        fixed order and writes them into the stacked gradients (parameter layout and dtype)."""
        c, gi = tl.program_id(1), tl.program_id(2)
        NCHUNK: tl.constexpr = (A + BH - 1) // BH
        BD: tl.constexpr = BH * DK
        RW: tl.constexpr = 3 * BD + 2 * BH + DK
        e = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        emask = e < RW
        ps = tl.arange(0, PB)
        acc = tl.zeros((PB, BLOCK), tl.float32)
        p0 = 0
        while p0 < P:
            pmask = (p0 + ps) < P
            acc += tl.load(part_ptr + ((gi * P + p0 + ps[:, None]) * NCHUNK + c) * RW + e[None, :],
                           mask=pmask[:, None] & emask[None, :], other=0.0)
            p0 += PB
        acc = tl.sum(acc, axis=0)
        seg = e // BD                    # 0, 1, 2: dU1^T, dU2^T, dU3 tiles [DK, BH]; 3: biases
        k = e % BD
        d, jj = k // BH, c * BH + k % BH
        tmask = emask & (jj < A)
        wofs = gi * A * DK
        tl.store(dw1_ptr + wofs + jj * DK + d, acc.to(dw1_ptr.dtype.element_ty), mask=tmask & (seg == 0))
        tl.store(dw2_ptr + wofs + jj * DK + d, acc.to(dw2_ptr.dtype.element_ty), mask=tmask & (seg == 1))
        tl.store(dw3_ptr + wofs + d * A + jj, acc.to(dw3_ptr.dtype.element_ty), mask=tmask & (seg == 2))
        b = e - 3 * BD                   # [dc1 (BH) | dc2 (BH) | dc3 (DK)] of this chunk
        jb = c * BH + b % BH
        bmask = emask & (b >= 0)
        tl.store(db1_ptr + gi * A + jb, acc.to(db1_ptr.dtype.element_ty), mask=bmask & (b < BH) & (jb < A))
        tl.store(db2_ptr + gi * A + jb, acc.to(db2_ptr.dtype.element_ty),
                 mask=bmask & (b >= BH) & (b < 2 * BH) & (jb < A))
        if c == 0:   # dc3 is the same sum in every chunk
            tl.store(db3_ptr + gi * DK + (b - 2 * BH), acc.to(db3_ptr.dtype.element_ty), mask=bmask & (b >= 2 * BH))

    def _weight_blocks(nargs):
        """Autotuner pre-hook: the weight descriptors' tiles follow the config's BH."""
        for name in ("w1_desc", "w2_desc", "w3_desc"):
            nargs[name].block_shape = [1, nargs["BH"], nargs["DK"]]

    _learner_fwd_tuned = triton.autotune(
        [triton.Config({"BM": bm, "BH": bh}, num_warps=w, num_stages=s, pre_hook=_weight_blocks)
         for bm, bh, w, s in ([(INTERP_BM, INTERP_BH, 1, 1)] if _INTERP else FWD_CONFIGS)],
        key=["N", "A", "R", "NG", "DK"])(_learner_fwd)


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


def _weight_descs(u1_w, u2_w, u3_w, bh: int) -> list:
    """TMA descriptors of the GLU weights as bf16 [R*n, A, DK] tensors read in [1, BH, DK]
    tiles (zero past A). One cast per call (the kernels then stream half the bytes from L2);
    U3 [dk, a] is transposed in the same copy, since a TMA row must be a multiple of 16 bytes
    (a = 170 bf16 is not, dk = 64 is). The parameters themselves are not touched or padded."""
    R, n, a, dk = u1_w.shape
    ws = (u1_w.to(torch.bfloat16).reshape(R * n, a, dk).contiguous(),
          u2_w.to(torch.bfloat16).reshape(R * n, a, dk).contiguous(),
          u1_w.new_empty((R * n, a, dk), dtype=torch.bfloat16).copy_(u3_w.transpose(-1, -2).reshape(R * n, a, dk)))
    return [TensorDescriptor.from_tensor(w, [1, bh, dk]) for w in ws]


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
                      eps: float) -> tuple[Tensor, Tensor]:
    """(A [N, dk] fp32, the saved residual sums z [R, N, dk] fp32) for rows x [N, dk] of A0;
    weights in `MetricLearner`'s stacked layout. Use `metric_learner` (returns A only)."""
    x = x.contiguous()
    n_rows, dk, R, n, a = _dims(x, u1_w)
    lnw, lnb = _ln_params(in_w, in_b, norm_w, norm_b)
    w1, w2, w3 = _weight_descs(u1_w, u2_w, u3_w, 16)   # tiles set per config (_weight_blocks)
    out = torch.empty(n_rows, dk, device=x.device, dtype=torch.float32)
    z = torch.empty(R, n_rows, dk, device=x.device, dtype=torch.float32)
    if n_rows:
        grid = lambda meta: (triton.cdiv(n_rows, meta["BM"]),)  # noqa: E731
        _learner_fwd_tuned[grid](x, lnw, lnb, w1, u1_b.contiguous(), w2, u2_b.contiguous(), w3, u3_b.contiguous(),
                                 out, z, n_rows, eps, A=a, R=R, NG=n, DK=dk, INTERP=_INTERP, TANH=_tanh())
    return out, z


@metric_learner_op.register_fake
def _(x, in_w, in_b, u1_w, u1_b, u2_w, u2_b, u3_w, u3_b, norm_w, norm_b, eps):
    R = u1_w.shape[0]
    return (x.new_empty(x.shape, dtype=torch.float32), x.new_empty((R, *x.shape), dtype=torch.float32))


@torch.library.custom_op("pldr::metric_learner_backward", mutates_args=())
def metric_learner_backward(dout: Tensor, x: Tensor, z: Tensor, in_w: Tensor, in_b: Tensor, u1_w: Tensor,
                            u1_b: Tensor, u2_w: Tensor, u2_b: Tensor, u3_w: Tensor, u3_b: Tensor, norm_w: Tensor,
                            norm_b: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
                                                                 Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients (dx, d in_w, d in_b, d u1_w, d u1_b, d u2_w, d u2_b, d u3_w, d u3_b, d norm_w,
    d norm_b) from the output gradient, in the dtypes of x and of each parameter."""
    x, z, dout = _aligned(x), _aligned(z), _aligned(dout)
    n_rows, dk, R, n, a = _dims(x, u1_w)
    dev = x.device
    lnw, lnb = _ln_params(in_w, in_b, norm_w, norm_b)
    b1, b2, b3 = u1_b.contiguous(), u2_b.contiguous(), u3_b.contiguous()
    drop, tanh = int(BREAK_DERIVATIVE), _tanh()
    dx = torch.empty_like(x)
    grads = [w.new_empty(w.shape) for w in (u1_w, u1_b, u2_w, u2_b, u3_w, u3_b)]
    if n_rows == 0:
        zeros = lambda t: torch.zeros_like(t)  # noqa: E731
        return (dx, zeros(in_w), zeros(in_b), *[g.zero_() for g in grads], zeros(norm_w), zeros(norm_b))
    G = R * n
    ys = torch.empty(G, n_rows, dk, device=dev, dtype=torch.bfloat16)
    dys = torch.empty_like(ys)
    lnpart = []

    def rows(bm, bh, warps, stages):
        part = torch.empty(triton.cdiv(n_rows, bm), R + 1, 2, dk, device=dev, dtype=torch.float32)
        xd, doutd, dxd = (TensorDescriptor.from_tensor(t, [bm, dk]) for t in (x, dout, dx))
        zd, ysd, dysd = (TensorDescriptor.from_tensor(t, [1, bm, dk]) for t in (z, ys, dys))
        w1, w2, w3 = _weight_descs(u1_w, u2_w, u3_w, bh)
        _learner_bwd_rows[(part.shape[0],)](xd, zd, doutd, lnw, lnb, w1, b1, w2, b2, w3, b3, dxd, ysd, dysd, part,
                                            eps, A=a, R=R, NG=n, DK=dk, BH=bh, INTERP=_INTERP, TANH=tanh,
                                            DROP=drop, BM=bm, num_warps=warps, num_stages=stages)
        lnpart[:] = [part]
    _launch_first("_learner_bwd_rows", dev, BWD_ROWS_CONFIGS, rows)

    def weights(bm, bh, warps, stages):
        nchunk = triton.cdiv(a, bh)
        P = _programs(dev, nchunk * G)
        part = torch.empty(G, P, nchunk, 3 * bh * dk + 2 * bh + dk, device=dev, dtype=torch.float32)
        w1, w2, w3 = _weight_descs(u1_w, u2_w, u3_w, bh)
        _learner_bwd_weights[(P, nchunk, G)](ys, dys, w1, b1, w2, b2, w3, part, n_rows, P, A=a, DK=dk,
                                             INTERP=_INTERP, TANH=tanh, DROP=drop, BM=bm, BH=bh,
                                             num_warps=warps, num_stages=stages)
        _learner_sum_partials[(triton.cdiv(part.shape[-1], SUM_BLOCK), nchunk, G)](
            part, *grads, P, A=a, DK=dk, BH=bh, BLOCK=SUM_BLOCK, PB=SUM_ROWS)
    _launch_first("_learner_bwd_weights", dev, WGRAD_CONFIGS, weights)
    ln = lnpart[0].sum(0)            # [R+1, 2, dk]: a fixed-shape reduction over the row blocks
    own = lambda t, like: t.to(like.dtype, copy=True)  # noqa: E731  (outputs may not alias)
    return (dx, own(ln[0, 0], in_w), own(ln[0, 1], in_b), *grads, own(ln[1:, 0], norm_w), own(ln[1:, 1], norm_b))


@metric_learner_backward.register_fake
def _(dout, x, z, in_w, in_b, u1_w, u1_b, u2_w, u2_b, u3_w, u3_b, norm_w, norm_b, eps):
    return tuple(torch.empty_like(t) for t in (x, in_w, in_b, u1_w, u1_b, u2_w, u2_b, u3_w, u3_b, norm_w, norm_b))


def _setup(ctx, inputs, output):
    x, *params, eps = inputs
    ctx.save_for_backward(x, output[1], *params)
    ctx.eps = eps
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, dout, _dz):
    x, z, *params = ctx.saved_tensors
    return (*metric_learner_backward(dout, x, z, *params, ctx.eps), None)


metric_learner_op.register_autograd(_backward, setup_context=_setup)


def learner_params(module) -> tuple:
    """A `MetricLearner`'s parameters in the op's order."""
    return (module.in_norm.weight, module.in_norm.bias, module.u1_weight, module.u1_bias, module.u2_weight,
            module.u2_bias, module.u3_weight, module.u3_bias, module.norm_weight, module.norm_bias)


def metric_learner(a0: torch.Tensor, *params: torch.Tensor, eps: float) -> torch.Tensor:
    """The metric learner's output (fp32, a0's shape) for A0 [..., dk]; params as
    `learner_params(module)`."""
    out, _ = metric_learner_op(a0.reshape(-1, a0.shape[-1]), *params, eps)
    return out.view(a0.shape)
