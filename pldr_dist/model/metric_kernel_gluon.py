"""The learner op's forward as a hand-scheduled Gluon kernel for Hopper (sm_90), issue #24.

Why: the Triton forward (`metric_kernel_jit._learner_fwd`) runs every product of a GLU chunk
synchronously: Triton waits for each warpgroup MMA (wgmma) right after issuing it (compiled
for sm_90: 9 commit groups and 9 `wgmma.wait_group 0` a GLU), so the tensor cores idle while
the chunk's gate values go through silu, and the CUDA cores idle during the products. Gluon
exposes the asynchronous wgmma and its wait, so here one warpgroup overlaps the two itself:

    chunk c:  issue gate/up products of chunk c+1  ->  wait for chunk c's (c+1's stay in flight)
              -> silu(g) * u of chunk c on the CUDA cores  ->  issue acc += h_c U3_c

(the intra-warpgroup pipelining of FlashAttention-3), and two programs of one warpgroup share
an SM, each hiding the other's waits at the GLU boundaries, where the next GLU needs the last
product. Weight tiles stream from L2 through a ring of TMA buffers, refilled as soon as the
products reading a slot have retired.

The algorithm, saved tensors and numerics are the Triton forward's (metric_kernel.py): bf16
operands, fp32 accumulation, LayerNorms and residual stream; outputs out, z and ys in the same
layouts, so the backward kernels are unchanged. GPU only: Gluon has no CPU interpreter, so the
CPU tests compile it for sm_90 (registers, no spills) and the GPU suites check it against fp32.

Shapes: BM = 64 rows a program (one warpgroup's wgmma M), hidden chunks of BH = 32 units
(a_dff = 170 -> 6 chunks; units past a_dff are masked to zero in h, so the weight tiles may
read the next GLU's rows). Rows come in blocks of 64, so N must be a multiple of 64, which
N = batch * heads * dk is whenever dk >= 64 is a power of two.
"""
from __future__ import annotations

import torch

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma,
                                                                  warpgroup_mma, warpgroup_mma_wait)
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    # TMA copies: async_load / async_store since Triton 3.7, async_copy_* before (the GPU
    # machine's torch 2.11 ships Triton 3.6)
    _tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
    _tma_store = getattr(tma, "async_store", None) or tma.async_copy_shared_to_global
    _cta_barrier = getattr(gl, "barrier", None) or gl.thread_barrier   # renamed in Triton 3.7
except ImportError:   # older Triton or CPU-only installs: the Triton forward is used
    gluon = None

BM, BH, STAGES, WARPS = 64, 32, 5, 4
BWD_BH, BWD_STAGES = 16, 4
Tensor = torch.Tensor


def available(x: Tensor, dk: int) -> bool:
    """Whether this forward runs on rows x: Gluon, a Hopper GPU, bf16 or fp32 rows in whole blocks."""
    return (gluon is not None and x.is_cuda and torch.cuda.get_device_capability(x.device)[0] == 9
            and x.dtype in (torch.bfloat16, torch.float32) and dk == 64 and x.shape[0] % BM == 0)


if gluon is not None:
    @gluon.jit
    def _sigmoid(g):
        t = gl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=f,f", [0.5 * g], dtype=gl.float32,
                                      is_pure=True, pack=1)
        return 0.5 + 0.5 * t

    @gluon.jit
    def _layer_norm(s, w_ptr, b_ptr, cols, eps, DK: gl.constexpr):
        """LayerNorm of each row of s [BM, DK] fp32 (accumulator layout); weight/bias fp32."""
        mean = gl.sum(s, axis=1) / DK
        d = s - gl.expand_dims(mean, 1)
        rstd = 1.0 / gl.sqrt(gl.sum(d * d, axis=1) / DK + eps)
        w = gl.expand_dims(gl.load(w_ptr + cols), 0)
        b = gl.expand_dims(gl.load(b_ptr + cols), 0)
        return d * gl.expand_dims(rstd, 1) * w + b

    @gluon.jit
    def _refill(nxt, limit, T, w1_desc, w2_desc, w3_desc, w1_s, w2_s, w3_s, ready, A: gl.constexpr,
                NCH: gl.constexpr, BHc: gl.constexpr, S: gl.constexpr, G: gl.constexpr, REVERSE: gl.constexpr):
        """Issue the TMA loads of steps nxt ... min(limit, T) - 1 and return the next step not yet
        issued. Step t is hidden chunk t % NCH of GLU t // NCH (of GLU G - 1 - t // NCH in the
        backward, which walks the GLUs in reverse) and lands in slot t % S."""
        end = gl.minimum(limit, T)
        while nxt < end:
            s = nxt % S
            gi = G - 1 - nxt // NCH if REVERSE else nxt // NCH
            row = gi * A + (nxt % NCH) * BHc
            bar = ready.index(s)
            mbarrier.expect(bar, 3 * w1_desc.block_type.nbytes)
            _tma_load(w1_desc, [row, 0], bar, w1_s.index(s))
            _tma_load(w2_desc, [row, 0], bar, w2_s.index(s))
            _tma_load(w3_desc, [row, 0], bar, w3_s.index(s))
            nxt += 1
        return nxt

    @gluon.jit
    def _biases(b1_ptr, b2_ptr, gi, c, jcols, A: gl.constexpr, BHc: gl.constexpr):
        j = c * BHc + jcols
        m = j < A
        return (gl.expand_dims(gl.load(b1_ptr + gi * A + j, mask=m, other=0.0).to(gl.float32), 0),
                gl.expand_dims(gl.load(b2_ptr + gi * A + j, mask=m, other=0.0).to(gl.float32), 0))

    @gluon.jit
    def _learner_fwd_gluon(x_desc, lnw_ptr, lnb_ptr, w1_desc, b1_ptr, w2_desc, b2_ptr, w3_desc, b3_ptr,
                           out_desc, z_desc, ys_desc, N, eps,
                           A: gl.constexpr, R: gl.constexpr, NG: gl.constexpr, DK: gl.constexpr,
                           BMc: gl.constexpr, BHc: gl.constexpr, S: gl.constexpr, NW: gl.constexpr):
        """One row block [BMc, DK] through LN_0 and all R units, as `_learner_fwd`. Row
        descriptors are 2-d: x, out [N, DK]; z [R*N, DK]; ys [R*NG*N, DK]; weights [R*NG*A, DK]
        (U3 transposed) read in [BHc, DK] tiles."""
        gl.static_assert(S >= 4, "the ring refills a slot two steps after its use and waits one step ahead")
        NCH: gl.constexpr = (A + BHc - 1) // BHc
        T: gl.constexpr = R * NG * NCH
        row0 = gl.program_id(0) * BMc
        acc_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NW, 1], instr_shape=[16, DK, 16])
        hid_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NW, 1], instr_shape=[16, BHc, 16])
        h_op: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_l, k_width=2)
        y_op: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=hid_l, k_width=2)
        cols = gl.arange(0, DK, layout=gl.SliceLayout(0, acc_l))
        jcols = gl.arange(0, BHc, layout=gl.SliceLayout(0, hid_l))

        w1_s = gl.allocate_shared_memory(gl.bfloat16, [S, BHc, DK], w1_desc.layout)
        w2_s = gl.allocate_shared_memory(gl.bfloat16, [S, BHc, DK], w2_desc.layout)
        w3_s = gl.allocate_shared_memory(gl.bfloat16, [S, BHc, DK], w3_desc.layout)
        ys_s = gl.allocate_shared_memory(gl.bfloat16, [BMc, DK], ys_desc.layout)
        z_s = gl.allocate_shared_memory(gl.float32, [BMc, DK], z_desc.layout)
        a_s = gl.allocate_shared_memory(gl.float32, [BMc, DK], z_desc.layout)
        ready = gl.allocate_shared_memory(gl.int64, [S, 1], mbarrier.MBarrierLayout())
        xbar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        for i in gl.static_range(S):
            mbarrier.init(ready.index(i), count=1)
        mbarrier.init(xbar, count=1)

        nxt = _refill(gl.to_tensor(0), S, T, w1_desc, w2_desc, w3_desc, w1_s, w2_s, w3_s, ready, A, NCH, BHc, S, R * NG, False)
        mbarrier.expect(xbar, x_desc.block_type.nbytes)
        if x_desc.dtype == gl.float32:    # A0 rows land in the staging buffer of their dtype
            _tma_load(x_desc, [row0, 0], xbar, z_s)
            mbarrier.wait(xbar, 0)
            x = z_s.load(acc_l)
        else:
            _tma_load(x_desc, [row0, 0], xbar, ys_s)
            mbarrier.wait(xbar, 0)
            x = ys_s.load(acc_l).to(gl.float32)
        a = _layer_norm(x, lnw_ptr, lnb_ptr, cols, eps, DK)
        zero_h = gl.zeros([BMc, BHc], gl.float32, hid_l)
        t = gl.to_tensor(0)
        for r in range(R):
            y = a
            a_s.store(a)      # the unit's input, for its residual: in shared memory, not registers
            for jg in gl.static_range(NG):
                gi = r * NG + jg
                tma.store_wait(0)                 # ys_s / z_s free again (their last stores read them)
                yb = y.to(gl.bfloat16)
                ys_s.store(yb)
                fence_async_shared()
                _tma_store(ys_desc, [gi * N + row0, 0], ys_s)
                # the products' A operand from registers: from shared memory every 32-unit chunk's
                # gate and up products re-read the whole row block (2 x 8 KB for 2 x 4 KB of weights)
                yb = gl.convert_layout(yb, y_op)
                # every product of the previous GLU has retired: its slots take the next steps
                nxt = _refill(nxt, t + S, T, w1_desc, w2_desc, w3_desc, w1_s, w2_s, w3_s, ready, A, NCH, BHc, S, R * NG, False)
                mbarrier.wait(ready.index(t % S), (t // S) & 1)
                g = warpgroup_mma(yb, w1_s.index(t % S).permute((1, 0)), zero_h, use_acc=False, is_async=True)
                u = warpgroup_mma(yb, w2_s.index(t % S).permute((1, 0)), zero_h, use_acc=False, is_async=True)
                b1, b2 = _biases(b1_ptr, b2_ptr, gi, 0, jcols, A, BHc)
                # c3 starts the accumulator: no bias registers held across the chunks
                acc = gl.zeros([BMc, DK], gl.float32, acc_l) + gl.expand_dims(
                    gl.load(b3_ptr + gi * DK + cols).to(gl.float32), 0)
                hb = gl.zeros([BMc, BHc], gl.bfloat16, h_op)
                for c in gl.static_range(NCH):
                    if c + 1 < NCH:
                        t1 = t + 1
                        mbarrier.wait(ready.index(t1 % S), (t1 // S) & 1)
                        gn = warpgroup_mma(yb, w1_s.index(t1 % S).permute((1, 0)), zero_h, use_acc=False,
                                           is_async=True)
                        un = warpgroup_mma(yb, w2_s.index(t1 % S).permute((1, 0)), zero_h, use_acc=False,
                                           is_async=True)
                        nb1, nb2 = _biases(b1_ptr, b2_ptr, gi, c + 1, jcols, A, BHc)
                        if c == 0:    # in flight: g, u, gn, un
                            g, u, hb = warpgroup_mma_wait(2, deps=(g, u, hb))
                        else:         # in flight: g, u, acc (chunk c-1), gn, un
                            g, u, hb = warpgroup_mma_wait(3, deps=(g, u, hb))
                            # acc of chunk c-2 has retired: its slot takes step t - 2 + S
                            nxt = _refill(nxt, t - 1 + S, T, w1_desc, w2_desc, w3_desc, w1_s, w2_s, w3_s, ready,
                                          A, NCH, BHc, S, R * NG, False)
                    else:
                        if c == 0:
                            g, u, hb = warpgroup_mma_wait(0, deps=(g, u, hb))
                        else:         # in flight: g, u, acc (chunk c-1)
                            g, u, hb = warpgroup_mma_wait(1, deps=(g, u, hb))
                            nxt = _refill(nxt, t - 1 + S, T, w1_desc, w2_desc, w3_desc, w1_s, w2_s, w3_s, ready,
                                          A, NCH, BHc, S, R * NG, False)
                    g = g + b1
                    h = g * _sigmoid(g) * (u + b2)
                    if (c + 1) * BHc > A:     # units past a_dff: zero, whatever the tiles read there
                        h = gl.where(gl.expand_dims(c * BHc + jcols < A, 0), h, 0.0)
                    hb = gl.convert_layout(h.to(gl.bfloat16), h_op, assert_trivial=True)
                    acc = warpgroup_mma(hb, w3_s.index(t % S), acc, is_async=True)
                    t += 1
                    if c + 1 < NCH:
                        g, u, b1, b2 = gn, un, nb1, nb2
                y, hb, yb = warpgroup_mma_wait(0, deps=(acc, hb, yb))
            z = y + a_s.load(acc_l)
            tma.store_wait(0)
            z_s.store(z)
            fence_async_shared()
            _tma_store(z_desc, [r * N + row0, 0], z_s)
            a = _layer_norm(z, lnw_ptr + (r + 1) * DK, lnb_ptr + (r + 1) * DK, cols, eps, DK)
        tma.store_wait(0)
        z_s.store(a)
        fence_async_shared()
        _tma_store(out_desc, [row0, 0], z_s)
        tma.store_wait(0)
        for i in gl.static_range(S):
            mbarrier.invalidate(ready.index(i))
        mbarrier.invalidate(xbar)


    @gluon.jit
    def _layer_norm_bwd(s, dout, w_ptr, cols, eps, DK: gl.constexpr):
        """(ds, this block's dweight, dbias) of out = LayerNorm(s), statistics recomputed from s."""
        mean = gl.sum(s, axis=1) / DK
        d = s - gl.expand_dims(mean, 1)
        rstd = gl.expand_dims(1.0 / gl.sqrt(gl.sum(d * d, axis=1) / DK + eps), 1)
        xhat = d * rstd
        dxhat = dout * gl.expand_dims(gl.load(w_ptr + cols), 0)
        c1 = gl.expand_dims(gl.sum(dxhat, axis=1) / DK, 1)
        c2 = gl.expand_dims(gl.sum(dxhat * xhat, axis=1) / DK, 1)
        return (dxhat - c1 - xhat * c2) * rstd, gl.sum(dout * xhat, axis=0), gl.sum(dout, axis=0)

    @gluon.jit
    def _front(t, yb, dyb, w1_s, w2_s, w3_s, ready, zero_h, S: gl.constexpr):
        """Issue step t's three products whose M side is the rows: gate and up values of the
        chunk (recomputed from the GLU's input) and the hidden gradient dy U3_c^T."""
        mbarrier.wait(ready.index(t % S), (t // S) & 1)
        g = warpgroup_mma(yb, w1_s.index(t % S).permute((1, 0)), zero_h, use_acc=False, is_async=True)
        u = warpgroup_mma(yb, w2_s.index(t % S).permute((1, 0)), zero_h, use_acc=False, is_async=True)
        dh = warpgroup_mma(dyb, w3_s.index(t % S).permute((1, 0)), zero_h, use_acc=False, is_async=True)
        return g, u, dh

    @gluon.jit
    def _learner_bwd_rows_gluon(x_desc, z_desc, ys_desc, dout_desc, lnw_ptr, w1_desc, b1_ptr, w2_desc, b2_ptr,
                                w3_desc, dx_desc, dys_desc, lnpart_ptr, N, eps,
                                A: gl.constexpr, R: gl.constexpr, NG: gl.constexpr, DK: gl.constexpr,
                                BMc: gl.constexpr, BHc: gl.constexpr, S: gl.constexpr, NW: gl.constexpr):
        """One row block back through all units, as `_learner_bwd_rows` (same outputs: dx, dys,
        lnpart[block, k] = (dweight, dbias) of LN_k). Per hidden chunk the three row-side
        products of chunk c+1 are in flight while chunk c's gate gradients are computed; chunk
        c's two input-gradient products (dx += dg U1_c + du U2_c) stay in flight across chunk
        c+1's wait. Chunks of 16 units (BWD_BH): at 32 the live products spilled (compiled
        for sm_90: 255 registers and 224-368 bytes of stack a thread). Each GLU's input comes from ys by TMA one GLU ahead (two buffers), each unit's
        residual sum z_r one unit ahead. Row descriptors 2-d as in `_learner_fwd_gluon`."""
        gl.static_assert(S >= 4, "the ring refills a slot two steps after its use and waits one step ahead")
        NCH: gl.constexpr = (A + BHc - 1) // BHc
        G: gl.constexpr = R * NG
        T: gl.constexpr = G * NCH
        pid = gl.program_id(0)
        row0 = pid * BMc
        acc_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NW, 1], instr_shape=[16, DK, 16])
        hid_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NW, 1], instr_shape=[16, BHc, 16])
        h_op: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_l, k_width=2)
        y_op: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=hid_l, k_width=2)
        cols = gl.arange(0, DK, layout=gl.SliceLayout(0, acc_l))
        jcols = gl.arange(0, BHc, layout=gl.SliceLayout(0, hid_l))
        part = lnpart_ptr + pid * (R + 1) * 2 * DK

        w1_s = gl.allocate_shared_memory(gl.bfloat16, [S, BHc, DK], w1_desc.layout)
        w2_s = gl.allocate_shared_memory(gl.bfloat16, [S, BHc, DK], w2_desc.layout)
        w3_s = gl.allocate_shared_memory(gl.bfloat16, [S, BHc, DK], w3_desc.layout)
        ys_s = gl.allocate_shared_memory(gl.bfloat16, [2, BMc, DK], ys_desc.layout)    # GLU inputs, one ahead
        dy_s = gl.allocate_shared_memory(gl.bfloat16, [BMc, DK], dys_desc.layout)     # GLU output gradient
        z_s = gl.allocate_shared_memory(gl.float32, [BMc, DK], z_desc.layout)         # z_r, one unit ahead
        dz_s = gl.allocate_shared_memory(gl.float32, [BMc, DK], z_desc.layout)        # the unit's dz
        ready = gl.allocate_shared_memory(gl.int64, [S, 1], mbarrier.MBarrierLayout())
        ybar = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        zbar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        for i in gl.static_range(S):
            mbarrier.init(ready.index(i), count=1)
        for i in gl.static_range(2):
            mbarrier.init(ybar.index(i), count=1)
        mbarrier.init(zbar, count=1)

        nxt = _refill(gl.to_tensor(0), S, T, w1_desc, w2_desc, w3_desc, w1_s, w2_s, w3_s, ready, A, NCH, BHc, S,
                      G, True)
        mbarrier.expect(ybar.index(0), ys_desc.block_type.nbytes)
        _tma_load(ys_desc, [(G - 1) * N + row0, 0], ybar.index(0), ys_s.index(0))
        mbarrier.expect(zbar, z_desc.block_type.nbytes)
        _tma_load(z_desc, [(R - 1) * N + row0, 0], zbar, z_s)
        zero_h = gl.zeros([BMc, BHc], gl.float32, hid_l)
        da = _load_rows(dout_desc, row0, dz_s, dy_s, acc_l)
        t = gl.to_tensor(0)
        zph = gl.to_tensor(0)
        for rr in range(R):
            r = R - 1 - rr
            mbarrier.wait(zbar, zph)
            zph ^= 1
            dz, dgam, dbet = _layer_norm_bwd(z_s.load(acc_l), da, lnw_ptr + (r + 1) * DK, cols, eps, DK)
            gl.store(part + (r + 1) * 2 * DK + cols, dgam)
            gl.store(part + (r + 1) * 2 * DK + DK + cols, dbet)
            dz_s.store(dz)
            if r > 0:      # z_s is read: the next unit's residual sum comes in behind this unit's work
                _cta_barrier()
                mbarrier.expect(zbar, z_desc.block_type.nbytes)
                _tma_load(z_desc, [(r - 1) * N + row0, 0], zbar, z_s)
            dy = dz
            for jj in gl.static_range(NG):
                gi = r * NG + NG - 1 - jj
                k = G - 1 - gi                    # GLUs done so far: its input is in buffer k % 2
                tma.store_wait(0)                 # dy_s free (its last store has read it)
                dyb = dy.to(gl.bfloat16)
                dy_s.store(dyb)
                dyb = gl.convert_layout(dyb, y_op)    # A operands from registers (see the forward)
                fence_async_shared()
                _tma_store(dys_desc, [gi * N + row0, 0], dy_s)
                if gi > 0:                        # the next GLU's input, into the other buffer
                    mbarrier.expect(ybar.index((k + 1) % 2), ys_desc.block_type.nbytes)
                    _tma_load(ys_desc, [(gi - 1) * N + row0, 0], ybar.index((k + 1) % 2), ys_s.index((k + 1) % 2))
                mbarrier.wait(ybar.index(k % 2), (k // 2) & 1)
                yb = ys_s.index(k % 2).load(y_op)
                nxt = _refill(nxt, t + S, T, w1_desc, w2_desc, w3_desc, w1_s, w2_s, w3_s, ready, A, NCH, BHc, S,
                              G, True)
                g, u, dh = _front(t, yb, dyb, w1_s, w2_s, w3_s, ready, zero_h, S)
                dx = gl.zeros([BMc, DK], gl.float32, acc_l)
                dgb = gl.zeros([BMc, BHc], gl.bfloat16, h_op)
                dub = gl.zeros([BMc, BHc], gl.bfloat16, h_op)
                for c in gl.static_range(NCH):
                    if c + 1 < NCH:
                        gn, un, dhn = _front(t + 1, yb, dyb, w1_s, w2_s, w3_s, ready, zero_h, S)
                        # in flight: this chunk's three (and the previous chunk's two input-gradient
                        # products, queued before the next chunk's), the next chunk's three
                        if c == 0:
                            g, u, dh, dgb, dub = warpgroup_mma_wait(3, deps=(g, u, dh, dgb, dub))
                        else:
                            g, u, dh, dgb, dub = warpgroup_mma_wait(5, deps=(g, u, dh, dgb, dub))
                    else:
                        if c == 0:
                            g, u, dh, dgb, dub = warpgroup_mma_wait(0, deps=(g, u, dh, dgb, dub))
                        else:
                            g, u, dh, dgb, dub = warpgroup_mma_wait(2, deps=(g, u, dh, dgb, dub))
                    if c > 0:         # chunk c-2's products have retired: its slot takes step t - 2 + S
                        nxt = _refill(nxt, t - 1 + S, T, w1_desc, w2_desc, w3_desc, w1_s, w2_s, w3_s, ready,
                                      A, NCH, BHc, S, G, True)
                    b1, b2 = _biases(b1_ptr, b2_ptr, gi, c, jcols, A, BHc)
                    g = g + b1
                    u = u + b2
                    sg = _sigmoid(g)
                    silu = g * sg
                    dg = dh * u * (sg * (1.0 + g * (1.0 - sg)))
                    du = dh * silu
                    if (c + 1) * BHc > A:     # units past a_dff: no gradient, whatever the tiles read there
                        keep = gl.expand_dims(c * BHc + jcols < A, 0)
                        dg = gl.where(keep, dg, 0.0)
                        du = gl.where(keep, du, 0.0)
                    dgb = gl.convert_layout(dg.to(gl.bfloat16), h_op)
                    dub = gl.convert_layout(du.to(gl.bfloat16), h_op)
                    dx = warpgroup_mma(dgb, w1_s.index(t % S), dx, is_async=True)
                    dx = warpgroup_mma(dub, w2_s.index(t % S), dx, is_async=True)
                    t += 1
                    if c + 1 < NCH:
                        g, u, dh = gn, un, dhn
                dy, dgb, dub, yb, dyb = warpgroup_mma_wait(0, deps=(dx, dgb, dub, yb, dyb))
            da = dz_s.load(acc_l) + dy       # residual branch + GLU chain
        tma.store_wait(0)
        x = _load_rows(x_desc, row0, z_s, dy_s, acc_l)
        dx, dgam, dbet = _layer_norm_bwd(x, da, lnw_ptr, cols, eps, DK)
        gl.store(part + cols, dgam)
        gl.store(part + DK + cols, dbet)
        _store_rows(dx_desc, row0, dx, z_s, dy_s)
        for i in gl.static_range(S):
            mbarrier.invalidate(ready.index(i))
        for i in gl.static_range(2):
            mbarrier.invalidate(ybar.index(i))
        mbarrier.invalidate(zbar)

    @gluon.jit
    def _load_rows(desc, row0, f_s, b_s, layout: gl.constexpr):
        """Rows [row0, row0 + block) of a [N, DK] descriptor as fp32 in `layout`, through the
        staging buffer of the descriptor's dtype (f_s fp32, b_s bf16); waits for them."""
        bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        mbarrier.init(bar, count=1)
        mbarrier.expect(bar, desc.block_type.nbytes)
        if desc.dtype == gl.float32:
            _tma_load(desc, [row0, 0], bar, f_s)
            mbarrier.wait(bar, 0)
            out = f_s.load(layout)
        else:
            _tma_load(desc, [row0, 0], bar, b_s)
            mbarrier.wait(bar, 0)
            out = b_s.load(layout).to(gl.float32)
        mbarrier.invalidate(bar)
        return out

    @gluon.jit
    def _store_rows(desc, row0, v, f_s, b_s):
        """v (fp32) into rows [row0, ...) of a [N, DK] descriptor in its dtype, through the
        staging buffer of that dtype; waits for the store."""
        if desc.dtype == gl.float32:
            f_s.store(v)
            fence_async_shared()
            _tma_store(desc, [row0, 0], f_s)
        else:
            b_s.store(v.to(desc.dtype))
            fence_async_shared()
            _tma_store(desc, [row0, 0], b_s)
        tma.store_wait(0)


def _layout(block: list, dtype: torch.dtype):
    return gl.NVMMASharedLayout.get_default_for(block, gl.bfloat16 if dtype == torch.bfloat16 else gl.float32)


def _desc(t: Tensor, block: list) -> "TensorDescriptor":
    return TensorDescriptor(t, list(t.shape), list(t.stride()), block, _layout(block, t.dtype))


def signature(kernel: str, dk: int, a: int, R: int, n: int, x_dtype: torch.dtype = torch.bfloat16) -> tuple:
    """(argument types, constexpr values) of a kernel here ("fwd" or "bwd_rows") as the op
    launches it, for compiling without a GPU (`pldr-bench kernels --resources`, the tests)."""
    def desc(dtype, block):
        name = "bf16" if dtype == torch.bfloat16 else "fp32"
        return f"tensordesc<{name}[{', '.join(map(str, block))}],{_layout(block, dtype)!r}>"
    rows = {"x_desc": x_dtype, "dx_desc": x_dtype, "ys_desc": torch.bfloat16, "dys_desc": torch.bfloat16,
            "out_desc": torch.float32, "z_desc": torch.float32, "dout_desc": torch.float32}
    descs = {k: desc(v, [BM, dk]) for k, v in rows.items()}
    bh = BH if kernel == "fwd" else BWD_BH
    descs.update({w: desc(torch.bfloat16, [bh, dk]) for w in ("w1_desc", "w2_desc", "w3_desc")})
    consts = dict(A=a, R=R, NG=n, DK=dk, BMc=BM, BHc=bh, S=STAGES if kernel == "fwd" else BWD_STAGES, NW=WARPS)
    fn = _learner_fwd_gluon if kernel == "fwd" else _learner_bwd_rows_gluon
    sig = {}
    for p in fn.params:
        sig[p.name] = ("constexpr" if p.name in consts else descs.get(p.name)
                       or {"N": "i32", "eps": "fp32"}.get(p.name, "*fp32"))
    return fn, sig, consts


def forward(x: Tensor, lnw: Tensor, lnb: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, w3t: Tensor,
            b3: Tensor, out: Tensor, z: Tensor, ys: Tensor, eps: float) -> None:
    """Fill out [N, dk], z [R, N, dk] and ys [R*n, N, dk] for rows x [N, dk] (bf16); w1, w2, w3t
    bf16 [R*n, a, dk] (w3t = U3 transposed), biases as the parameters, lnw/lnb [R+1, dk] fp32."""
    G, a, dk = w1.shape
    R = z.shape[0]
    n_rows = x.shape[0]
    flat = lambda t: t.view(-1, dk)  # noqa: E731
    _learner_fwd_gluon[(n_rows // BM,)](
        _desc(x, [BM, dk]), lnw, lnb, _desc(flat(w1), [BH, dk]), b1, _desc(flat(w2), [BH, dk]), b2,
        _desc(flat(w3t), [BH, dk]), b3, _desc(out, [BM, dk]), _desc(flat(z), [BM, dk]), _desc(flat(ys), [BM, dk]),
        n_rows, eps, A=a, R=R, NG=G // R, DK=dk, BMc=BM, BHc=BH, S=STAGES, NW=WARPS, num_warps=WARPS)


def bwd_rows(x: Tensor, z: Tensor, ys: Tensor, dout: Tensor, lnw: Tensor, w1: Tensor, b1: Tensor, w2: Tensor,
             b2: Tensor, w3t: Tensor, dx: Tensor, dys: Tensor, eps: float) -> Tensor:
    """Fill dx [N, dk] (x's dtype) and dys [R*n, N, dk] from the saved x, z, ys and the output
    gradient; return the LayerNorm partials [N / BM, R+1, 2, dk] (fp32), as the Triton row
    kernel's."""
    G, a, dk = w1.shape
    R, n_rows = z.shape[0], x.shape[0]
    part = torch.empty(n_rows // BM, R + 1, 2, dk, device=x.device, dtype=torch.float32)
    flat = lambda t: t.view(-1, dk)  # noqa: E731
    _learner_bwd_rows_gluon[(n_rows // BM,)](
        _desc(x, [BM, dk]), _desc(flat(z), [BM, dk]), _desc(flat(ys), [BM, dk]), _desc(dout, [BM, dk]), lnw,
        _desc(flat(w1), [BWD_BH, dk]), b1, _desc(flat(w2), [BWD_BH, dk]), b2, _desc(flat(w3t), [BWD_BH, dk]),
        _desc(dx, [BM, dk]), _desc(flat(dys), [BM, dk]), part, n_rows, eps,
        A=a, R=R, NG=G // R, DK=dk, BMc=BM, BHc=BWD_BH, S=BWD_STAGES, NW=WARPS, num_warps=WARPS)
    return part
