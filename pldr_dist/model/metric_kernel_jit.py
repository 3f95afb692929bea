"""The Triton kernels of the whole-learner op (`metric_kernel.py`, which holds the algorithm,
the configs and the launches; this file only the device code). Imported only where Triton is.

Every function here runs on the GPU (or in Triton's CPU interpreter: INTERP keeps matmul
operands fp32 holding bf16-rounded values there). TANH and DROP are constexpr switches read
from metric_kernel.SIGMOID_TANH and metric_kernel.BREAK_DERIVATIVE at each launch.
"""
import triton
import triton.language as tl

from .glu_kernel import _mm, _sigmoid   # the per-GLU kernels' operand cast and sigmoid, shared


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
    b1, b2 = _biases(b1_ptr, b2_ptr, gi, c, A, BH)
    return _tile(w1_desc, gi, c, BH, DK, INTERP), b1, _tile(w2_desc, gi, c, BH, DK, INTERP), b2


@triton.jit
def _biases(b1_ptr, b2_ptr, gi, c, A: tl.constexpr, BH: tl.constexpr):
    """c1, c2 of hidden chunk c of GLU gi (fp32, zero past A)."""
    j = c * BH + tl.arange(0, BH)
    return (tl.load(b1_ptr + gi * A + j, mask=j < A, other=0.0).to(tl.float32),
            tl.load(b2_ptr + gi * A + j, mask=j < A, other=0.0).to(tl.float32))


@triton.jit
def _glu_chunk(acc, yb, gi, c, b1, b2, w1_desc, w2_desc, w3_desc, BH: tl.constexpr, DK: tl.constexpr,
               INTERP: tl.constexpr, TANH: tl.constexpr):
    """acc plus hidden chunk c's share of GLU gi's output (c3 not included), given the chunk's
    biases c1, c2."""
    g = tl.dot(yb, tl.trans(_tile(w1_desc, gi, c, BH, DK, INTERP))) + b1[None, :]
    u = tl.dot(yb, tl.trans(_tile(w2_desc, gi, c, BH, DK, INTERP))) + b2[None, :]
    h = g * _sigmoid(g, TANH) * u
    return acc + tl.dot(_mm(h, INTERP), _tile(w3_desc, gi, c, BH, DK, INTERP))


@triton.jit
def _glu_rows(y, gi, w1_desc, b1_ptr, w2_desc, b2_ptr, w3_desc, b3_ptr, cols, A: tl.constexpr,
              BM: tl.constexpr, DK: tl.constexpr, BH: tl.constexpr, INTERP: tl.constexpr, TANH: tl.constexpr):
    """GLU gi, U3(silu(U1 y + c1) * (U2 y + c2)) + c3, of a row block y [BM, DK] (fp32):
    fp32 [BM, DK]. w3_desc reads U3^T ([A, DK] per GLU).

    The chunk loop is unrolled, the biases loaded one chunk ahead (c3 at the start): loaded
    where they are used, their global-load latency was the forward's largest stall (ncu, H100:
    ~25% of the stall samples). A loop the compiler software-pipelines instead was slower once
    the rows came through TMA (kernels/h100/kernels_sweep: 0.598 against 0.568 ms)."""
    yb = _mm(y, INTERP)
    b3 = tl.load(b3_ptr + gi * DK + cols).to(tl.float32)
    NCHUNK: tl.constexpr = (A + BH - 1) // BH
    acc = tl.zeros((BM, DK), tl.float32)
    b1, b2 = _biases(b1_ptr, b2_ptr, gi, 0, A, BH)
    for c in tl.static_range(NCHUNK):
        if c + 1 < NCHUNK:
            nb1, nb2 = _biases(b1_ptr, b2_ptr, gi, c + 1, A, BH)
        acc = _glu_chunk(acc, yb, gi, c, b1, b2, w1_desc, w2_desc, w3_desc, BH, DK, INTERP, TANH)
        if c + 1 < NCHUNK:
            b1, b2 = nb1, nb2
    return acc + b3[None, :]


@triton.jit
def _glu_chunk_bwd(dx, yb, dyb, gi, c, w1_desc, b1_ptr, w2_desc, b2_ptr, w3_desc, A: tl.constexpr,
                   DK: tl.constexpr, BH: tl.constexpr, INTERP: tl.constexpr, TANH: tl.constexpr,
                   DROP: tl.constexpr):
    """dx plus hidden chunk c's share of the input gradient of GLU gi (hidden state recomputed)."""
    w1, b1, w2, b2 = _gate_up_weights(w1_desc, b1_ptr, w2_desc, b2_ptr, gi, c, A, BH, DK, INTERP)
    g = tl.dot(yb, tl.trans(w1)) + b1[None, :]
    u = tl.dot(yb, tl.trans(w2)) + b2[None, :]
    w3t = _tile(w3_desc, gi, c, BH, DK, INTERP)
    dg, du, _ = _gate_grads(g, u, tl.dot(dyb, tl.trans(w3t)), TANH, DROP)
    dx = tl.dot(_mm(dg, INTERP), w1, dx)
    return tl.dot(_mm(du, INTERP), w2, dx)


@triton.jit
def _glu_rows_bwd(yb, dyb, gi, w1_desc, b1_ptr, w2_desc, b2_ptr, w3_desc, A: tl.constexpr,
                  BM: tl.constexpr, DK: tl.constexpr, BH: tl.constexpr, INTERP: tl.constexpr,
                  TANH: tl.constexpr, DROP: tl.constexpr):
    """The input gradient of GLU gi for a row block: input yb, output gradient dyb
    (matmul operands [BM, DK]); the hidden state is recomputed chunk by chunk, in an unrolled
    loop (software-pipelined by the compiler it was slower: 1.165 against 0.893 ms,
    kernels/h100/kernels_sweep)."""
    dx = tl.zeros((BM, DK), tl.float32)
    for c in tl.static_range((A + BH - 1) // BH):
        dx = _glu_chunk_bwd(dx, yb, dyb, gi, c, w1_desc, b1_ptr, w2_desc, b2_ptr, w3_desc, A, DK, BH,
                            INTERP, TANH, DROP)
    return dx


@triton.jit
def _learner_fwd(x_desc, lnw_ptr, lnb_ptr, w1_desc, b1_ptr, w2_desc, b2_ptr, w3_desc, b3_ptr, out_desc, z_desc,
                 ys_desc, N, eps, A: tl.constexpr, R: tl.constexpr, NG: tl.constexpr, DK: tl.constexpr,
                 INTERP: tl.constexpr, TANH: tl.constexpr, BM: tl.constexpr, BH: tl.constexpr):
    """One row block through LN_0 and all R units; stores z_r (fp32), every GLU's input as
    its products see it (bf16, ys [R*NG, N, DK]) and the output (fp32).
    lnw/lnb [R+1, DK] stack the input LayerNorm and the units' (fp32); the weights are
    descriptors of [R*NG, A, DK] bf16 tensors (GLU g = r * NG + j; U3 transposed).
    x, out ([N, DK], blocks [BM, DK]), z and ys ([R or R*NG, N, DK], blocks [1, BM, DK]) are
    TMA descriptors, as in the row kernel (rows past N load as zeros and are not stored): no
    per-element addresses and row masks ([BM, DK] each, 32 registers a thread at 8 warps) held
    across the units. Through pointers this kernel took 0.690 ms against 0.568 (pldr-110m mb
    128, H100, kernels/h100/kernels_sweep). N, the row count, is the autotuner's key."""
    row0 = tl.program_id(0) * BM
    cols = tl.arange(0, DK)
    a = _layer_norm(x_desc.load([row0, 0]).to(tl.float32), lnw_ptr, lnb_ptr, cols, eps, DK)
    for r in range(R):
        y = a
        for j in range(NG):
            ys_desc.store([r * NG + j, row0, 0], y.to(tl.bfloat16).reshape(1, BM, DK))
            y = _glu_rows(y, r * NG + j, w1_desc, b1_ptr, w2_desc, b2_ptr, w3_desc, b3_ptr, cols,
                          A, BM, DK, BH, INTERP, TANH)
        z = y + a
        z_desc.store([r, row0, 0], z.reshape(1, BM, DK))
        a = _layer_norm(z, lnw_ptr + (r + 1) * DK, lnb_ptr + (r + 1) * DK, cols, eps, DK)
    out_desc.store([row0, 0], a)


@triton.jit
def _learner_bwd_rows(x_desc, z_desc, ys_desc, dout_desc, lnw_ptr, w1_desc, b1_ptr, w2_desc, b2_ptr, w3_desc,
                      dx_desc, dys_desc, lnpart_ptr, eps,
                      A: tl.constexpr, R: tl.constexpr, NG: tl.constexpr, DK: tl.constexpr, BH: tl.constexpr,
                      INTERP: tl.constexpr, TANH: tl.constexpr, DROP: tl.constexpr, BM: tl.constexpr):
    """One row block back through all units: dx, every GLU's output gradient (bf16, for the
    weight gradients) and this block's LayerNorm-parameter partials
    lnpart[block, k] = (dweight, dbias) of LN_k [2, DK].

    Rows go in and out through TMA descriptors (rows past N load as zeros and are not
    stored): no per-element addresses or masks stay in registers across the loops, which
    the backward's live set (the gradient, a chunk's gate/up/hidden values and their
    gradients) needs. Each GLU's input is read from ys, saved by the forward in the bf16
    its products used, so no GLU's forward is redone here; the LayerNorms' statistics are
    recomputed from z_r and x."""
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
            gi = r * NG + NG - 1 - jj
            dys_desc.store([gi, row0, 0], dy.to(tl.bfloat16).reshape(1, BM, DK))
            y = _mm(ys_desc.load([gi, row0, 0]).reshape(BM, DK), INTERP)
            dy = _glu_rows_bwd(y, _mm(dy, INTERP), gi, w1_desc, b1_ptr, w2_desc, b2_ptr, w3_desc,
                               A, BM, DK, BH, INTERP, TANH, DROP)
        da = dz + dy                 # residual branch + GLU chain
    dx, dgam, dbet = _layer_norm_bwd(x_desc.load([row0, 0]).to(tl.float32), da, lnw_ptr, cols, eps, DK, DROP)
    tl.store(part + cols, dgam)
    tl.store(part + DK + cols, dbet)
    dx_desc.store([row0, 0], dx.to(dx_desc.dtype))


@triton.jit
def _wgrad_block(blk, gi, ys_ptr, dys_ptr, w1, b1, w2, b2, w3t, dw1, dw2, dw3t, db1, db2, db3, N, cols, first_chunk,
                 DK: tl.constexpr, INTERP: tl.constexpr, TANH: tl.constexpr, DROP: tl.constexpr, BM: tl.constexpr):
    """One row block's share of one GLU chunk's weight gradients, added to the sums dU1, dU2,
    dU3^T ([BH, DK] each). dc3 is summed by the chunk-0 programs only (every chunk sees the same
    dy).

    Every product is turned around so that its M side is the chunk's BH hidden units or dk,
    never the rows: gate, up and hidden-gradient values as [BH, BM] (U1 y^T, ...). Hopper's
    warpgroup MMA (wgmma) takes 64 rows a warpgroup; computed as y U1^T, [BM, BH], the products
    of a 32-row block compiled to mma.sync instead, and the kernel took 1.01 ms against 0.63
    turned around (0.54 with 64-row blocks; pldr-110m mb 128, H100, kernels/h100/kernels_sweep).

    The bias sums come from the tensor cores, dot(dg^T, e) with e [BM, 16] one in column 0 and
    zero elsewhere: the row sums land in column 0 of a [BH, 16] sum (columns 1-15 stay exact
    zeros), over the bf16 dg the weight products use, as autocast's bias gradient does. Summed
    with tl.sum, each block's reduction across lanes (shuffles) was the kernel's largest stall
    (ncu, H100): 1.28 ms against 1.00. The rows come through pointers: through TMA descriptors,
    or with the row-block loop warp-specialized, the kernel was slower (1.060 / 1.006 against
    0.984 ms, H100, kernels/h100/kernels_sweep, before the products were turned around)."""
    rows = blk * BM + tl.arange(0, BM)
    rmask = (rows < N)[:, None]
    offs = rows[:, None] * DK + cols[None, :]
    y = _mm(tl.load(ys_ptr + gi * N * DK + offs, mask=rmask, other=0.0), INTERP)
    dy = _mm(tl.load(dys_ptr + gi * N * DK + offs, mask=rmask, other=0.0), INTERP)
    g = tl.dot(w1, tl.trans(y)) + b1[:, None]
    u = tl.dot(w2, tl.trans(y)) + b2[:, None]
    dg, du, h = _gate_grads(g, u, tl.dot(w3t, tl.trans(dy)), TANH, DROP)   # rows past N: dy = 0, no share
    dgb, dub = _mm(dg, INTERP), _mm(du, INTERP)
    dw1 += tl.dot(dgb, y)
    dw2 += tl.dot(dub, y)
    dw3t += tl.dot(_mm(h, INTERP), dy)
    e = _mm(((tl.arange(0, BM)[:, None] >= 0) & (tl.arange(0, 16)[None, :] == 0)).to(tl.float32), INTERP)
    db1 += tl.dot(dgb, e)
    db2 += tl.dot(dub, e)
    if first_chunk:
        db3 += tl.dot(tl.trans(dy), e)
    return dw1, dw2, dw3t, db1, db2, db3


@triton.jit
def _learner_bwd_weights(ys_ptr, dys_ptr, w1_desc, b1_ptr, w2_desc, b2_ptr, w3_desc, part_ptr, N, P,
                         A: tl.constexpr, DK: tl.constexpr, INTERP: tl.constexpr, TANH: tl.constexpr,
                         DROP: tl.constexpr, BM: tl.constexpr, BH: tl.constexpr):
    """Program (p, c, g): GLU g's hidden chunk c over row blocks p, p + P, p + 2P, ...;
    writes part[g, p, c] = [dU1 | dU2 | dU3^T (each [BH, DK], as `_wgrad_block` sums them) | dc1 |
    dc2 | dc3]."""
    p, c, gi = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    NCHUNK: tl.constexpr = (A + BH - 1) // BH
    cols = tl.arange(0, DK)
    w1, b1, w2, b2 = _gate_up_weights(w1_desc, b1_ptr, w2_desc, b2_ptr, gi, c, A, BH, DK, INTERP)
    w3t = _tile(w3_desc, gi, c, BH, DK, INTERP)
    dw1 = tl.zeros((BH, DK), tl.float32)
    dw2 = tl.zeros((BH, DK), tl.float32)
    dw3t = tl.zeros((BH, DK), tl.float32)
    db1 = tl.zeros((BH, 16), tl.float32)   # the bias sums in column 0 (_wgrad_block)
    db2 = tl.zeros((BH, 16), tl.float32)
    db3 = tl.zeros((DK, 16), tl.float32)
    nblocks = tl.cdiv(N, BM)
    if INTERP:   # the interpreter fails on range() with runtime bounds (numpy 2)
        blk = p
        while blk < nblocks:
            dw1, dw2, dw3t, db1, db2, db3 = _wgrad_block(
                blk, gi, ys_ptr, dys_ptr, w1, b1, w2, b2, w3t, dw1, dw2, dw3t, db1, db2, db3, N, cols, c == 0,
                DK, INTERP, TANH, DROP, BM)
            blk += P
    else:
        for blk in tl.range(p, nblocks, P):
            dw1, dw2, dw3t, db1, db2, db3 = _wgrad_block(
                blk, gi, ys_ptr, dys_ptr, w1, b1, w2, b2, w3t, dw1, dw2, dw3t, db1, db2, db3, N, cols, c == 0,
                DK, INTERP, TANH, DROP, BM)
    db1, db2, db3 = tl.sum(db1, axis=1), tl.sum(db2, axis=1), tl.sum(db3, axis=1)
    hid = tl.arange(0, BH)
    BD: tl.constexpr = BH * DK
    tile = hid[:, None] * DK + cols[None, :]
    out = part_ptr + ((gi * P + p) * NCHUNK + c) * (3 * BD + 2 * BH + DK)
    tl.store(out + tile, dw1)
    tl.store(out + BD + tile, dw2)
    tl.store(out + 2 * BD + tile, dw3t)
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
    seg = e // BD                    # 0, 1, 2: dU1, dU2, dU3^T tiles [BH, DK]; 3: biases
    k = e % BD
    jj, d = c * BH + k // DK, k % DK
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
