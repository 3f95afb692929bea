"""The learner op's backward row kernel, warp-specialized in Gluon for Hopper (sm_90), issue #24:
dx, every GLU's output gradient dys and each LayerNorm's partial weight gradients, recomputed from
the saved unit inputs z and GLU inputs ys. metric_kernel_ws has the design (a producer warp streams
the weights through a TMA ring to two consumer warpgroups, 64 rows each), the producer and ring
this kernel shares with the forward, and the host-side descriptors; this module is the row
kernel's consumer, its launch and what it alone needs.

Each GLU (in reverse) takes a chunk's gate, up and hidden-gradient products at once, then its silu
gradients; the chunk loop runs at run time with chunk 0 peeled off, so each chunk's input-gradient
products go in with the next chunk's products from one copy of the code (unrolled, the kernel was
171 KB of machine code and stalled on instruction fetch: metric_kernel_ws's docstring).
"""
from __future__ import annotations

import torch

from .metric_kernel_ws import CHUNK, CONSUMER_REGS, MAX_REGS, ROWS, _desc, _grid, _ring_args, gluon

ROWS_STAGES = 4     # ring depth (~25 KB a step): 3 -> 0.683, 2 -> 0.767 ms against 0.660 (pldr-110m mb 128, H200)

if gluon is not None:
    import triton
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma,
                                                                  warpgroup_mma, warpgroup_mma_wait)

    from .metric_kernel_ws import (_BH, _BM, _barriers, _producer, _release, _ring, _sigmoid, _tma_load,
                                   _tma_store)

    @gluon.jit
    def _layer_norm_bwd(s, dout, w_ptr, cols, eps, DK: gl.constexpr):
        """(ds, dweight, dbias) of out = LayerNorm(s), statistics recomputed from s."""
        mean = gl.sum(s, axis=1) / DK
        d = s - gl.expand_dims(mean, 1)
        rstd = gl.expand_dims(1.0 / gl.sqrt(gl.sum(d * d, axis=1) / DK + eps), 1)
        xhat = d * rstd
        dxhat = dout * gl.expand_dims(gl.load(w_ptr + cols), 0)
        c1 = gl.expand_dims(gl.sum(dxhat, axis=1) / DK, 1)
        c2 = gl.expand_dims(gl.sum(dxhat * xhat, axis=1) / DK, 1)
        return (dxhat - c1 - xhat * c2) * rstd, gl.sum(dout * xhat, axis=0), gl.sum(dout, axis=0)

    @gluon.jit
    def _chunk_products(yb, dyb, w1_s, w2_s, w3_s, bias_s, s, zero, acc_l: gl.constexpr):
        """One chunk's gate, up and hidden-gradient products issued (not waited for) from ring
        slot s, and its gate/up bias rows."""
        g = warpgroup_mma(yb, w1_s.index(s).permute((1, 0)), zero, use_acc=False, is_async=True)
        u = warpgroup_mma(yb, w2_s.index(s).permute((1, 0)), zero, use_acc=False, is_async=True)
        dh = warpgroup_mma(dyb, w3_s.index(s).permute((1, 0)), zero, use_acc=False, is_async=True)
        return g, u, dh, bias_s.index(s).slice(0, 1).load(acc_l), bias_s.index(s).slice(1, 1).load(acc_l)

    @gluon.jit
    def _chunk_grads(g, u, dh, b1, b2, cols, c, A: gl.constexpr, op_l: gl.constexpr):
        """dg, du of one chunk (zero past a_dff) as bf16 operands of the dx products."""
        gb = g + b1
        sg = _sigmoid(gb)
        keep = gl.expand_dims(c * _BH + cols < A, 0)
        dg = gl.where(keep, dh * (u + b2) * (sg * (1.0 + gb * (1.0 - sg))), 0.0)
        du = gl.where(keep, dh * gb * sg, 0.0)
        return gl.convert_layout(dg.to(gl.bfloat16), op_l), gl.convert_layout(du.to(gl.bfloat16), op_l)

    @gluon.jit
    def _rows_consumer(ring, own, A: gl.constexpr, R: gl.constexpr, NG: gl.constexpr, DK: gl.constexpr,
                       NCH: gl.constexpr, S: gl.constexpr, HALF: gl.constexpr, BACKWARD: gl.constexpr):
        """Rows HALF*64 ... of each block back through all units (metric_kernel's row kernel):
        dx, every GLU's output gradient dys and the block's LayerNorm partials. Each GLU's input
        comes from ys one GLU ahead (double buffer), each unit's z one unit ahead."""
        (w1_desc, w2_desc, w3_desc, bias_desc, N, w1_s, w2_s, w3_s, bias_s, ready, empty) = ring
        (x_desc, z_desc, ys_desc, dout_desc, dx_desc, dys_desc, lnw_ptr, part_ptr, eps, x_s, z_s, y_s, dy_s,
         bars) = own
        acc_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                        instr_shape=[16, DK, 16])
        op_l: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_l, k_width=2)
        cols = gl.arange(0, DK, layout=gl.SliceLayout(0, acc_l))
        G: gl.constexpr = R * NG
        xs, zs, dys = x_s.index(HALF), z_s.index(HALF), dy_s.index(HALF)
        xbar, zbar = bars.index(4 * HALF), bars.index(4 * HALF + 1)
        zero = gl.zeros([_BM, DK], gl.float32, acc_l)
        t = 0
        xph = 0
        zph = 0
        yk = 0          # GLUs begun: ys arrives in buffer yk % 2 with phase (yk // 2) & 1
        for blk in range(gl.program_id(0), gl.cdiv(N, 2 * _BM), gl.num_programs(0)):
            row0 = blk * (2 * _BM) + HALF * _BM
            part = part_ptr + (blk * 2 + HALF) * (R + 1) * 2 * DK
            tma.store_wait(0)                        # the last block's dx has left x_s
            mbarrier.expect(xbar, x_desc.block_type.nbytes)
            _tma_load(x_desc, [row0, 0], xbar, xs)
            mbarrier.expect(zbar, dout_desc.block_type.nbytes)
            _tma_load(dout_desc, [row0, 0], zbar, zs)
            ybar = bars.index(4 * HALF + 2 + yk % 2)
            mbarrier.expect(ybar, ys_desc.block_type.nbytes)
            _tma_load(ys_desc, [(G - 1) * N + row0, 0], ybar, y_s.index(2 * HALF + yk % 2))
            mbarrier.wait(zbar, zph)
            zph ^= 1
            da = zs.load(acc_l)                      # d loss / d (output of the unit below)
            fence_async_shared()
            mbarrier.expect(zbar, z_desc.block_type.nbytes)
            _tma_load(z_desc, [(R - 1) * N + row0, 0], zbar, zs)
            for rr in range(R):
                r = R - 1 - rr
                mbarrier.wait(zbar, zph)
                zph ^= 1
                dz, dgam, dbet = _layer_norm_bwd(zs.load(acc_l), da, lnw_ptr + (r + 1) * DK, cols, eps, DK)
                fence_async_shared()
                if r > 0:
                    mbarrier.expect(zbar, z_desc.block_type.nbytes)
                    _tma_load(z_desc, [(r - 1) * N + row0, 0], zbar, zs)
                gl.store(part + (r + 1) * 2 * DK + cols, dgam)
                gl.store(part + (r + 1) * 2 * DK + DK + cols, dbet)
                dy = dz                              # z_r = GLUs(a_r) + a_r
                for jj in range(NG):
                    gi = r * NG + NG - 1 - jj
                    dy16 = dy.to(gl.bfloat16)
                    tma.store_wait(0)
                    dys.store(dy16)
                    fence_async_shared()
                    _tma_store(dys_desc, [gi * N + row0, 0], dys)
                    dyb = gl.convert_layout(dy16, op_l)
                    mbarrier.wait(bars.index(4 * HALF + 2 + yk % 2), (yk // 2) & 1)
                    yb = y_s.index(2 * HALF + yk % 2).load(op_l)
                    fence_async_shared()
                    yk += 1
                    if gi > 0:                       # the next GLU's input into the other buffer
                        nbar = bars.index(4 * HALF + 2 + yk % 2)
                        mbarrier.expect(nbar, ys_desc.block_type.nbytes)
                        _tma_load(ys_desc, [(gi - 1) * N + row0, 0], nbar, y_s.index(2 * HALF + yk % 2))
                    dx = zero
                    s = t % S                        # chunk 0: its gradients, no product into dx yet
                    mbarrier.wait(ready.index(s), (t // S) & 1)
                    g, u, dh, b1, b2 = _chunk_products(yb, dyb, w1_s, w2_s, w3_s, bias_s, s, zero, acc_l)
                    g, u, dh = warpgroup_mma_wait(0, deps=(g, u, dh))
                    dgb, dub = _chunk_grads(g, u, dh, b1, b2, cols, 0, A, op_l)
                    t += 1
                    for c in range(1, NCH):          # at run time: one copy of the chunk's code
                        sp = (t - 1) % S
                        s = t % S
                        mbarrier.wait(ready.index(s), (t // S) & 1)
                        dx = warpgroup_mma(dgb, w1_s.index(sp), dx, is_async=True)   # chunk c-1's into dx
                        dx = warpgroup_mma(dub, w2_s.index(sp), dx, is_async=True)
                        g, u, dh, b1, b2 = _chunk_products(yb, dyb, w1_s, w2_s, w3_s, bias_s, s, zero, acc_l)
                        g, u, dh, dx, dgb, dub = warpgroup_mma_wait(0, deps=(g, u, dh, dx, dgb, dub))
                        _release(empty, t - 1, S)
                        dgb, dub = _chunk_grads(g, u, dh, b1, b2, cols, c, A, op_l)
                        t += 1
                    sp = (t - 1) % S
                    dx = warpgroup_mma(dgb, w1_s.index(sp), dx, is_async=True)
                    dx = warpgroup_mma(dub, w2_s.index(sp), dx, is_async=True)
                    dx, dgb, dub, yb, dyb = warpgroup_mma_wait(0, deps=(dx, dgb, dub, yb, dyb))
                    _release(empty, t - 1, S)
                    dy = dx
                da = dz + dy                         # residual branch + GLU chain
            mbarrier.wait(xbar, xph)
            xph ^= 1
            dxr, dgam, dbet = _layer_norm_bwd(xs.load(acc_l).to(gl.float32), da, lnw_ptr, cols, eps, DK)
            gl.store(part + cols, dgam)
            gl.store(part + DK + cols, dbet)
            xs.store(dxr.to(xs.dtype))
            fence_async_shared()
            _tma_store(dx_desc, [row0, 0], xs)
        tma.store_wait(0)

    @gluon.jit
    def _learner_bwd_rows_ws(x_desc, z_desc, ys_desc, dout_desc, w1_desc, w2_desc, w3_desc, bias_desc, dx_desc,
                             dys_desc, lnw_ptr, part_ptr, N, eps, A: gl.constexpr, R: gl.constexpr,
                             NG: gl.constexpr, DK: gl.constexpr, NCH: gl.constexpr, S: gl.constexpr,
                             CREGS: gl.constexpr):
        """Descriptors as `_learner_fwd_ws`'s (dout, dx [N, DK]; dys [R*NG*N, DK]); part
        [N / 64, R+1, 2, DK] fp32: (dweight, dbias) of each LayerNorm per 64 rows."""
        ring = _ring(w1_desc, w2_desc, w3_desc, bias_desc, N, S, DK)
        own = (x_desc, z_desc, ys_desc, dout_desc, dx_desc, dys_desc, lnw_ptr, part_ptr, eps,
               gl.allocate_shared_memory(x_desc.dtype, [2, _BM, DK], x_desc.layout),   # x, then dx
               gl.allocate_shared_memory(gl.float32, [2, _BM, DK], z_desc.layout),     # dout, then each z
               gl.allocate_shared_memory(gl.bfloat16, [4, _BM, DK], ys_desc.layout),   # ys, double-buffered
               gl.allocate_shared_memory(gl.bfloat16, [2, _BM, DK], dys_desc.layout),  # dys staging
               _barriers(8))
        gl.warp_specialize([
            (_rows_consumer, (ring, own, A, R, NG, DK, NCH, S, 0, True)),
            (_rows_consumer, (ring, own, A, R, NG, DK, NCH, S, 1, True)),
            (_producer, (ring, own, A, R, NG, DK, NCH, S, 1, True)),
        ], [4, 1], [CREGS, 24])


def backward_rows(x, z, ys, dout, lnw, w1, u1_b, w2, u2_b, w3, dx, dys, eps: float) -> torch.Tensor:
    """metric_kernel's row kernel into dx and dys; returns the LayerNorm partials [N/64, R+1, 2, dk]."""
    G, a, dk = w1.shape
    R, n = z.shape[0], G // z.shape[0]
    N = x.shape[0]
    part = torch.empty(N // (ROWS // 2), R + 1, 2, dk, device=x.device, dtype=torch.float32)
    ring = _ring_args(w1, w2, w3, u1_b, u2_b, None)
    blk = [ROWS // 2, dk]
    _learner_bwd_rows_ws[_grid(N, x.device)](
        _desc(x, blk), _desc(z.view(R * N, dk), blk), _desc(ys.view(G * N, dk), blk), _desc(dout.float(), blk),
        *ring, _desc(dx, blk), _desc(dys.view(G * N, dk), blk), lnw, part, N, eps, A=a, R=R, NG=n, DK=dk,
        NCH=triton.cdiv(a, CHUNK), S=ROWS_STAGES, CREGS=CONSUMER_REGS, num_warps=4, maxnreg=MAX_REGS)
    return part
