"""The metric learner's weight gradients as one warp-specialized Gluon kernel (Hopper).

Why split roles: the first warp-specialized weight-gradient kernel (commit 885dbef) kept both the
unit's sums (112 registers) and one block's gate/up/hidden-gradient products (96) in each
consumer's registers, so every consumer waited on its own products (tensor pipe 46% active
against the Triton kernel's 55%, 0.656 against 0.557 ms). Here two math warpgroups (64 rows each
of a 128-row block) compute g, u, dh and the silu gradients and hand dg, du, h (bf16, [hidden,
rows]) to one MMA warpgroup through shared memory; that warpgroup alone holds the sums (dU1, dU2,
dU3^T and the bias sums, the latter as products against a column of ones) with both operands in
shared memory. A producer warp streams each unit's weights once and the rows' ys / dys.

Work units are (GLU, 64-unit chunk, share of the row blocks), dealt to persistent programs; one
fp32 partial a unit in the Triton kernel's layout, so metric_kernel_jit._learner_sum_partials sums
them in the same fixed order (deterministic). dc3 needs no product of its own: hidden unit a_dff
(padding, as a_dff is not a multiple of 64) is set to h = 1, so its dU3 row is the sum of dy; it
is written into the dc3 slot of the unit's chunk-0 record, where the summing kernel reads it.
"""
from __future__ import annotations

import torch

from . import metric_kernel_ws as ws

try:
    import triton
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma,
                                                                  warpgroup_mma, warpgroup_mma_wait)
except ImportError:
    gluon = None

CHUNK = 64
STAGES = 3              # ring of ys/dys blocks, 32 KB each (216 KB of shared memory in all; 2: 0.729 against 0.687 ms)
MATH_REGS = 160         # per math-warpgroup thread (no spills under Triton 3.6 at 160)
LAUNCH_REGS = 128       # 4 warpgroups (MMA, 2 math, the producer's warp rounded up) x 128 fill an SM;
                        # the MMA warpgroup gets what the others give up (168)
UNITS_PER_PROGRAM = 4


def available(x: torch.Tensor, dk: int, a: int) -> bool:
    """Where the row and forward kernels run (metric_kernel_ws.available) and a_dff leaves a
    padded hidden unit for dc3 (not a multiple of 64)."""
    return ws.available(x, dk) and a % CHUNK != 0


if gluon is not None:
    from .metric_kernel_ws import _desc, _sigmoid, _tma_load, _tma_store

    BM = gl.constexpr(64)
    BH = gl.constexpr(CHUNK)

    @gluon.jit
    def _unit(unit, P, NCH: gl.constexpr):
        return unit // (P * NCH), (unit // P) % NCH, unit % P


    @gluon.jit
    def _producer(ring, own, G: gl.constexpr, A: gl.constexpr, DK: gl.constexpr, NCH: gl.constexpr,
                  S: gl.constexpr, HALF: gl.constexpr):
        (ys_desc, dys_desc, w1_desc, w2_desc, w3_desc, N, P, y_s, dy_s, w1_s, w2_s, w3_s, ready, empty,
         wready, wempty) = ring
        rbytes: gl.constexpr = 4 * ys_desc.block_type.nbytes
        wbytes: gl.constexpr = 3 * w1_desc.block_type.nbytes
        nblk = gl.cdiv(N, 2 * BM)
        t = 0
        k = 0
        for unit in range(gl.program_id(0), G * NCH * P, gl.num_programs(0)):
            gi, c, p = _unit(unit, P, NCH)
            w = k % 2
            mbarrier.wait(wempty.index(w), ((k // 2) & 1) ^ 1)
            mbarrier.expect(wready.index(w), wbytes)
            row = gi * A + c * BH
            _tma_load(w1_desc, [row, 0], wready.index(w), w1_s.index(w))
            _tma_load(w2_desc, [row, 0], wready.index(w), w2_s.index(w))
            _tma_load(w3_desc, [row, 0], wready.index(w), w3_s.index(w))
            k += 1
            for blk in range(p, nblk, P):
                s = t % S
                mbarrier.wait(empty.index(s), ((t // S) & 1) ^ 1)
                bar = ready.index(s)
                mbarrier.expect(bar, rbytes)
                r0 = gi * N + blk * (2 * BM)
                _tma_load(ys_desc, [r0, 0], bar, y_s.index(2 * s))
                _tma_load(ys_desc, [r0 + BM, 0], bar, y_s.index(2 * s + 1))
                _tma_load(dys_desc, [r0, 0], bar, dy_s.index(2 * s))
                _tma_load(dys_desc, [r0 + BM, 0], bar, dy_s.index(2 * s + 1))
                t += 1


    @gluon.jit
    def _math(ring, own, G: gl.constexpr, A: gl.constexpr, DK: gl.constexpr, NCH: gl.constexpr,
              S: gl.constexpr, HALF: gl.constexpr):
        """Rows HALF*64 ... of every block: g, u, dh ([hidden, rows]), then dg, du, h into shared memory."""
        (ys_desc, dys_desc, w1_desc, w2_desc, w3_desc, N, P, y_s, dy_s, w1_s, w2_s, w3_s, ready, empty,
         wready, wempty) = ring
        (b1_ptr, b2_ptr, part_ptr, part_desc, ops_s, opsready, opsempty, ones_s, scratch) = own
        acc_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, DK, 16])
        hid = gl.arange(0, BH, layout=gl.SliceLayout(1, acc_l))
        zero = gl.zeros([BH, DK], gl.float32, acc_l)
        nblk = gl.cdiv(N, 2 * BM)
        t = 0
        k = 0
        q = 0
        for unit in range(gl.program_id(0), G * NCH * P, gl.num_programs(0)):
            gi, c, p = _unit(unit, P, NCH)
            w = k % 2
            jj = c * BH + hid
            live = jj < A
            b1 = gl.expand_dims(gl.load(b1_ptr + gi * A + jj, mask=live, other=0.0).to(gl.float32), 1)
            b2 = gl.expand_dims(gl.load(b2_ptr + gi * A + jj, mask=live, other=0.0).to(gl.float32), 1)
            keep = gl.expand_dims(live, 1)
            unit_one = gl.expand_dims(gl.where(jj == A, 1.0, 0.0), 1)   # h of unit a_dff: its dU3 row sums dy
            mbarrier.wait(wready.index(w), (k // 2) & 1)
            for blk in range(p, nblk, P):
                s = t % S
                mbarrier.wait(ready.index(s), (t // S) & 1)
                yv = y_s.index(2 * s + HALF)
                dyv = dy_s.index(2 * s + HALF)
                g = warpgroup_mma(w1_s.index(w), yv.permute((1, 0)), zero, use_acc=False, is_async=True)
                u = warpgroup_mma(w2_s.index(w), yv.permute((1, 0)), zero, use_acc=False, is_async=True)
                dh = warpgroup_mma(w3_s.index(w), dyv.permute((1, 0)), zero, use_acc=False, is_async=True)
                g, u, dh = warpgroup_mma_wait(0, deps=(g, u, dh))
                g = g + b1
                u = u + b2
                sg = _sigmoid(g)
                silu = g * sg
                dg = gl.where(keep, dh * u * (sg * (1.0 + g * (1.0 - sg))), 0.0).to(gl.bfloat16)
                du = gl.where(keep, dh * silu, 0.0).to(gl.bfloat16)
                h = gl.where(keep, silu * u, unit_one).to(gl.bfloat16)
                mbarrier.wait(opsempty.index(HALF), (q & 1) ^ 1)     # the MMA warpgroup is done with the last ones
                ops_s.index(3 * HALF).store(dg)
                ops_s.index(3 * HALF + 1).store(du)
                ops_s.index(3 * HALF + 2).store(h)
                fence_async_shared()
                mbarrier.arrive(opsready.index(HALF), count=1)
                q += 1
                t += 1
            mbarrier.arrive(wempty.index(w), count=1)
            k += 1


    @gluon.jit
    def _mma(ring, own, G: gl.constexpr, A: gl.constexpr, DK: gl.constexpr, NCH: gl.constexpr,
             S: gl.constexpr, HALF: gl.constexpr):
        """The unit's sums over both halves of every block; one partial a unit."""
        (ys_desc, dys_desc, w1_desc, w2_desc, w3_desc, N, P, y_s, dy_s, w1_s, w2_s, w3_s, ready, empty,
         wready, wempty) = ring
        (b1_ptr, b2_ptr, part_ptr, part_desc, ops_s, opsready, opsempty, ones_s, scratch) = own
        acc_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, DK, 16])
        sum_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, 16, 16])
        fill_l: gl.constexpr = gl.BlockedLayout([1, 1], [2, 16], [4, 1], [1, 0])
        hid = gl.arange(0, BH, layout=gl.SliceLayout(1, acc_l))
        cols = gl.arange(0, DK, layout=gl.SliceLayout(0, acc_l))
        hid16 = gl.arange(0, BH, layout=gl.SliceLayout(1, sum_l))
        e = gl.expand_dims(gl.arange(0, 16, layout=gl.SliceLayout(0, fill_l)), 0) + gl.zeros([BM, 16], gl.int32, fill_l)
        ones_s.store(gl.where(e == 0, 1.0, 0.0).to(gl.bfloat16))   # ones in column 0: dot(x, ones) = row sums
        fence_async_shared()
        zero = gl.zeros([BH, DK], gl.float32, acc_l)
        zs = gl.zeros([BH, 16], gl.float32, sum_l)
        BD: gl.constexpr = BH * DK
        RW: gl.constexpr = 3 * BD + 2 * BH + DK
        nblk = gl.cdiv(N, 2 * BM)
        t = 0
        q = 0
        for unit in range(gl.program_id(0), G * NCH * P, gl.num_programs(0)):
            gi, c, p = _unit(unit, P, NCH)
            dw1 = zero
            dw2 = zero
            dw3 = zero
            db1 = zs
            db2 = zs
            for blk in range(p, nblk, P):
                s = t % S
                for hh in gl.static_range(2):
                    mbarrier.wait(opsready.index(hh), q & 1)
                    yv = y_s.index(2 * s + hh)
                    dyv = dy_s.index(2 * s + hh)
                    dw1 = warpgroup_mma(ops_s.index(3 * hh), yv, dw1, is_async=True)
                    db1 = warpgroup_mma(ops_s.index(3 * hh), ones_s, db1, is_async=True)
                    dw2 = warpgroup_mma(ops_s.index(3 * hh + 1), yv, dw2, is_async=True)
                    db2 = warpgroup_mma(ops_s.index(3 * hh + 1), ones_s, db2, is_async=True)
                    dw3 = warpgroup_mma(ops_s.index(3 * hh + 2), dyv, dw3, is_async=True)
                    dw1, dw2, dw3, db1, db2 = warpgroup_mma_wait(0, deps=(dw1, dw2, dw3, db1, db2))
                    mbarrier.arrive(opsempty.index(hh), count=1)
                mbarrier.arrive(empty.index(s), count=1)    # both math warpgroups' products read it before handing over
                q += 1
                t += 1
            base = ((gi * P + p) * NCH + c) * (RW // DK)    # the unit's record, in rows of DK
            tma.store_wait(0)
            scratch.store(dw1)
            fence_async_shared()
            _tma_store(part_desc, [base, 0], scratch)
            tma.store_wait(0)
            scratch.store(dw2)
            fence_async_shared()
            _tma_store(part_desc, [base + BH, 0], scratch)
            tma.store_wait(0)
            scratch.store(dw3)
            fence_async_shared()
            _tma_store(part_desc, [base + 2 * BH, 0], scratch)
            out = part_ptr + base * DK + 3 * BD
            gl.store(out + hid16, gl.sum(db1, axis=1))
            gl.store(out + BH + hid16, gl.sum(db2, axis=1))
            if c == NCH - 1:        # dc3 (the dU3^T row of unit a_dff) into the chunk-0 record's dc3 slot
                rec0 = part_ptr + ((gi * P + p) * NCH) * RW + 3 * BD + 2 * BH
                gl.store(rec0 + cols, gl.sum(gl.where(gl.expand_dims(c * BH + hid == A, 1), dw3, 0.0), axis=0))
        tma.store_wait(0)


    @gluon.jit
    def _learner_bwd_weights_ws(ys_desc, dys_desc, w1_desc, w2_desc, w3_desc, b1_ptr, b2_ptr, part_ptr, part_desc,
                                   N, P, G: gl.constexpr, A: gl.constexpr, DK: gl.constexpr, NCH: gl.constexpr,
                                   S: gl.constexpr, MREGS: gl.constexpr):
        ready = gl.allocate_shared_memory(gl.int64, [S, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [S, 1], mbarrier.MBarrierLayout())
        wready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        wempty = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        opsready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        opsempty = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(S):
            mbarrier.init(ready.index(i), count=1)
            mbarrier.init(empty.index(i), count=1)
        for i in gl.static_range(2):
            mbarrier.init(wready.index(i), count=1)
            mbarrier.init(wempty.index(i), count=2)
            mbarrier.init(opsready.index(i), count=1)
            mbarrier.init(opsempty.index(i), count=1)
        ring = (ys_desc, dys_desc, w1_desc, w2_desc, w3_desc, N, P,
                gl.allocate_shared_memory(gl.bfloat16, [2 * S, BM, DK], ys_desc.layout),
                gl.allocate_shared_memory(gl.bfloat16, [2 * S, BM, DK], dys_desc.layout),
                gl.allocate_shared_memory(gl.bfloat16, [2, BH, DK], w1_desc.layout),
                gl.allocate_shared_memory(gl.bfloat16, [2, BH, DK], w2_desc.layout),
                gl.allocate_shared_memory(gl.bfloat16, [2, BH, DK], w3_desc.layout),
                ready, empty, wready, wempty)
        ops_l: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BH, BM], gl.bfloat16)
        ones_l: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BM, 16], gl.bfloat16)
        own = (b1_ptr, b2_ptr, part_ptr, part_desc,
               gl.allocate_shared_memory(gl.bfloat16, [6, BH, BM], ops_l), opsready, opsempty,
               gl.allocate_shared_memory(gl.bfloat16, [BM, 16], ones_l),
               gl.allocate_shared_memory(gl.float32, [BH, DK], part_desc.layout))
        gl.warp_specialize([
            (_mma, (ring, own, G, A, DK, NCH, S, 0)),
            (_math, (ring, own, G, A, DK, NCH, S, 0)),
            (_math, (ring, own, G, A, DK, NCH, S, 1)),
            (_producer, (ring, own, G, A, DK, NCH, S, 0)),
        ], [4, 4, 1], [MREGS, MREGS, 24])


def row_shares(items: int, sms: int) -> int:
    """Shares P of the row blocks a (GLU, chunk) is split into: the one that fills the SMs' last
    wave best (fewest shares on ties), as each share costs a partial and a weight load."""
    fills = {p: items * p / (-(-items * p // sms) * sms) for p in range(1, 4 * UNITS_PER_PROGRAM * sms // items + 2)}
    return max(fills, key=lambda p: (round(fills[p], 6), -p))


def backward_weights(ys, dys, w1, u1_b, w2, u2_b, w3) -> tuple:
    """(partials [G, P, NCH, 3*64*dk + 2*64 + dk] fp32, P) in the Triton kernel's layout, for
    metric_kernel_jit._learner_sum_partials (chunk 64)."""
    G, a, dk = w1.shape
    N = ys.shape[1]
    nch = triton.cdiv(a, CHUNK)
    sms = torch.cuda.get_device_properties(ys.device).multi_processor_count
    P = row_shares(G * nch, sms)
    part = torch.empty(G, P, nch, 3 * CHUNK * dk + 2 * CHUNK + dk, device=ys.device, dtype=torch.float32)
    blk = [CHUNK, dk]
    _learner_bwd_weights_ws[(min(G * nch * P, sms),)](
        _desc(ys.view(G * N, dk), blk), _desc(dys.view(G * N, dk), blk),
        *[_desc(w.view(G * a, dk), blk) for w in (w1, w2, w3)], u1_b, u2_b, part,
        _desc(part.view(-1, dk), blk), N, P, G=G, A=a, DK=dk, NCH=nch, S=STAGES, MREGS=MATH_REGS,
        num_warps=4, maxnreg=LAUNCH_REGS)
    return part, P
