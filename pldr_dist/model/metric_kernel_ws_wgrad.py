"""The learner op's weight-gradient kernel, warp-specialized in Gluon for Hopper (sm_90), issue #24.

Why: the Triton kernel (`metric_kernel_jit._learner_bwd_weights`) waits for each warpgroup
MMA right after issuing it and loads its rows through pointers, so the tensor cores idle
during the silu work. Here, as in `metric_kernel_ws`, each program (one an SM, persistent)
has a producer warp and two consumer warpgroups:

- work units are (GLU g, 64-unit hidden chunk c, row share p < P): a unit sums row blocks
  p, p+P, p+2P, ... (128 rows each) of one chunk's weight gradients. Units are dealt to the
  programs round-robin; P is picked per GPU so that every program gets the same number.
- the producer loads a unit's weight tiles (U1, U2, U3^T rows of the chunk) once, then streams
  the unit's row blocks of ys and dys (the GLU inputs and output gradients saved by the
  forward and the row kernel) through a ring of TMA buffers;
- each consumer takes 64 rows of every block: gate, up and hidden-gradient products turned
  around ([hidden units, rows], so the M side is 64 hidden units, one wgmma M), the silu
  gradients, then dU1 += dg y, dU2 += du y, dU3^T += h dy and the gate/up bias sums as
  products with a ones column, all in fp32 registers.
- dc3 (U3's bias: the sum of dy over rows) costs no product of its own: hidden unit a_dff,
  past the last real one (a_dff must not be a multiple of 64), gets h = 1, so its dU3^T row is
  that sum; the last chunk's units write it to the dc3 slot.

Each unit writes one partial per consumer, [dU1 | dU2 | dU3^T | dc1 | dc2 | dc3] as
`_learner_bwd_weights` does, and `_learner_sum_partials` adds the 2P partials in a fixed
order: the result does not depend on timing (the same bits every step). Numerics are the
Triton kernel's (bf16 operands as the products use them, fp32 sums).
"""
from __future__ import annotations

import functools

import torch

from . import metric_kernel_ws as ws

try:
    import triton
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma,
                                                                  warpgroup_mma, warpgroup_mma_wait)
    from .metric_kernel_ws import _desc, _sigmoid, _tma_load, _tma_store
except ImportError:   # older Triton or CPU-only installs: the Triton kernel is used
    gluon = None

CHUNK = 64         # hidden units a unit (one wgmma M)
ROWS = 128         # rows a ring step: 64 per consumer
STAGES = 4         # ring depth: 32 KB a step (ys and dys of 128 rows)
CONSUMER_REGS = 240
UNITS_PER_PROGRAM = 4   # P is picked near this many units a program


def available(a_dff: int) -> bool:
    """Whether the kernel takes a learner of hidden width a_dff (with metric_kernel_ws.available
    for the rows): it needs a padded hidden unit for dc3."""
    return gluon is not None and ws.gluon is not None and a_dff % CHUNK != 0


@functools.lru_cache(maxsize=None)
def row_shares(items: int, sms: int) -> int:
    """P for `items` (GLU, chunk) pairs on `sms` SMs: the P (up to 4x UNITS_PER_PROGRAM units a
    program) whose units fill the programs most evenly; the smallest such P (fewest partials)."""
    fills = {p: items * p / (-(-items * p // sms) * sms) for p in range(1, 4 * UNITS_PER_PROGRAM * sms // items + 2)}
    return max(fills, key=lambda p: (round(fills[p], 6), -p))


if gluon is not None:
    BM = gl.constexpr(ROWS // 2)
    BH = gl.constexpr(CHUNK)

    @gluon.jit
    def _unit(unit, P, NCH: gl.constexpr):
        return unit // (P * NCH), (unit // P) % NCH, unit % P

    @gluon.jit
    def _wgrad_producer(ring, own, G: gl.constexpr, A: gl.constexpr, DK: gl.constexpr, NCH: gl.constexpr,
                        S: gl.constexpr, HALF: gl.constexpr):
        """Per unit: its weight tiles (two slots, freed by both consumers at the unit's end),
        then its row blocks of ys and dys, 64 rows a consumer, into ring slot t % S."""
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
    def _wgrad_consumer(ring, own, G: gl.constexpr, A: gl.constexpr, DK: gl.constexpr, NCH: gl.constexpr,
                        S: gl.constexpr, HALF: gl.constexpr):
        """Rows HALF*64 ... of every block of each unit: the unit's sums in registers, written
        through a staging tile (TMA) at the unit's end. The products wait at depth 0: with the
        next block's products in flight the sums and operands would not fit the registers;
        the other consumer fills the tensor cores meanwhile."""
        (ys_desc, dys_desc, w1_desc, w2_desc, w3_desc, N, P, y_s, dy_s, w1_s, w2_s, w3_s, ready, empty,
         wready, wempty) = ring
        (b1_ptr, b2_ptr, part_ptr, part_desc, ones_s, scratch_s) = own
        scratch = scratch_s.index(HALF)
        acc_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                        instr_shape=[16, DK, 16])
        sum_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                        instr_shape=[16, 16, 16])   # [64, 16] bias sums
        op_l: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_l, k_width=2)
        fill_l: gl.constexpr = gl.BlockedLayout([1, 1], [2, 16], [4, 1], [1, 0])
        hid = gl.arange(0, BH, layout=gl.SliceLayout(1, acc_l))
        cols = gl.arange(0, DK, layout=gl.SliceLayout(0, acc_l))
        hid16 = gl.arange(0, BH, layout=gl.SliceLayout(1, sum_l))
        ones = ones_s.index(HALF)
        e = gl.expand_dims(gl.arange(0, 16, layout=gl.SliceLayout(0, fill_l)), 0) + gl.zeros([BM, 16], gl.int32,
                                                                                              fill_l)
        ones.store(gl.where(e == 0, 1.0, 0.0).to(gl.bfloat16))   # ones in column 0: dot(x, ones) = row sums
        fence_async_shared()
        zero = gl.zeros([BH, DK], gl.float32, acc_l)
        zs = gl.zeros([BH, 16], gl.float32, sum_l)
        BD: gl.constexpr = BH * DK
        RW: gl.constexpr = 3 * BD + 2 * BH + DK
        nblk = gl.cdiv(N, 2 * BM)
        t = 0
        k = 0
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
            w1v = w1_s.index(w)
            w2v = w2_s.index(w)
            w3v = w3_s.index(w)
            dw1 = zero
            dw2 = zero
            dw3 = zero
            db1 = zs
            db2 = zs
            for blk in range(p, nblk, P):
                s = t % S
                mbarrier.wait(ready.index(s), (t // S) & 1)
                yv = y_s.index(2 * s + HALF)
                dyv = dy_s.index(2 * s + HALF)
                g = warpgroup_mma(w1v, yv.permute((1, 0)), zero, use_acc=False, is_async=True)
                u = warpgroup_mma(w2v, yv.permute((1, 0)), zero, use_acc=False, is_async=True)
                dh = warpgroup_mma(w3v, dyv.permute((1, 0)), zero, use_acc=False, is_async=True)
                g, u, dh = warpgroup_mma_wait(0, deps=(g, u, dh))
                g = g + b1
                u = u + b2
                sg = _sigmoid(g)
                silu = g * sg
                dg = gl.where(keep, dh * u * (sg * (1.0 + g * (1.0 - sg))), 0.0)
                dg = gl.convert_layout(dg.to(gl.bfloat16), op_l)   # issued as soon as it exists
                dw1 = warpgroup_mma(dg, yv, dw1, is_async=True)
                db1 = warpgroup_mma(dg, ones, db1, is_async=True)
                du = gl.convert_layout(gl.where(keep, dh * silu, 0.0).to(gl.bfloat16), op_l)
                dw2 = warpgroup_mma(du, yv, dw2, is_async=True)
                db2 = warpgroup_mma(du, ones, db2, is_async=True)
                h = gl.convert_layout(gl.where(keep, silu * u, unit_one).to(gl.bfloat16), op_l)
                dw3 = warpgroup_mma(h, dyv, dw3, is_async=True)
                dw1, dw2, dw3, db1, db2 = warpgroup_mma_wait(0, deps=(dw1, dw2, dw3, db1, db2))
                fence_async_shared()
                mbarrier.arrive(empty.index(s), count=1)
                t += 1
            mbarrier.arrive(wempty.index(w), count=1)
            k += 1
            base = ((gi * 2 * P + 2 * p + HALF) * NCH + c) * (RW // DK)    # the unit's record, in rows of DK
            tma.store_wait(0)                    # the last unit's dU3^T has left the staging tile
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
            if c == NCH - 1:                     # dc3: the dU3 row of hidden unit a_dff
                gl.store(out + 2 * BH + cols, gl.sum(gl.where(gl.expand_dims(jj == A, 1), dw3, 0.0), axis=0))
        tma.store_wait(0)

    @gluon.jit
    def _learner_bwd_weights_ws(ys_desc, dys_desc, w1_desc, w2_desc, w3_desc, b1_ptr, b2_ptr, part_ptr, part_desc, N, P,
                                G: gl.constexpr, A: gl.constexpr, DK: gl.constexpr, NCH: gl.constexpr, S: gl.constexpr,
                                CREGS: gl.constexpr):
        """Grid (programs,), persistent over the G*NCH*P units. ys, dys [G*N, DK] bf16 and the
        weights [G*A, DK] bf16 (U3 transposed) in [64, DK] boxes; part [G, 2P, NCH, 3*64*DK +
        2*64 + DK] fp32, also as part_desc [rows of DK] for the tiles' TMA stores."""
        ready = gl.allocate_shared_memory(gl.int64, [S, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [S, 1], mbarrier.MBarrierLayout())
        wready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        wempty = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(S):
            mbarrier.init(ready.index(i), count=1)
            mbarrier.init(empty.index(i), count=2)
        for i in gl.static_range(2):
            mbarrier.init(wready.index(i), count=1)
            mbarrier.init(wempty.index(i), count=2)
        ring = (ys_desc, dys_desc, w1_desc, w2_desc, w3_desc, N, P,
                gl.allocate_shared_memory(gl.bfloat16, [2 * S, BM, DK], ys_desc.layout),
                gl.allocate_shared_memory(gl.bfloat16, [2 * S, BM, DK], dys_desc.layout),
                gl.allocate_shared_memory(gl.bfloat16, [2, BH, DK], w1_desc.layout),
                gl.allocate_shared_memory(gl.bfloat16, [2, BH, DK], w2_desc.layout),
                gl.allocate_shared_memory(gl.bfloat16, [2, BH, DK], w3_desc.layout),
                ready, empty, wready, wempty)
        ones_l: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BM, 16], gl.bfloat16)
        own = (b1_ptr, b2_ptr, part_ptr, part_desc, gl.allocate_shared_memory(gl.bfloat16, [2, BM, 16], ones_l),
               gl.allocate_shared_memory(gl.float32, [2, BH, DK], part_desc.layout))
        gl.warp_specialize([
            (_wgrad_consumer, (ring, own, G, A, DK, NCH, S, 0)),
            (_wgrad_consumer, (ring, own, G, A, DK, NCH, S, 1)),
            (_wgrad_producer, (ring, own, G, A, DK, NCH, S, 1)),
        ], [4, 1], [CREGS, 24])


def backward_weights(ys: torch.Tensor, dys: torch.Tensor, w1: torch.Tensor, u1_b: torch.Tensor, w2: torch.Tensor,
                     u2_b: torch.Tensor, w3: torch.Tensor) -> tuple:
    """(partials [G, 2P, NCH, 3*64*dk + 2*64 + dk] fp32, 2P) of every GLU's weight gradients from
    ys, dys [G, N, dk] bf16 and the bf16 weights [G, a, dk] (U3 transposed)."""
    G, a, dk = w1.shape
    N = ys.shape[1]
    nch = triton.cdiv(a, CHUNK)
    sms = torch.cuda.get_device_properties(ys.device).multi_processor_count
    P = row_shares(G * nch, sms)
    part = torch.empty(G, 2 * P, nch, 3 * CHUNK * dk + 2 * CHUNK + dk, device=ys.device, dtype=torch.float32)
    blk = [ROWS // 2, dk]
    _learner_bwd_weights_ws[(min(G * nch * P, sms),)](
        _desc(ys.view(G * N, dk), blk), _desc(dys.view(G * N, dk), blk),
        *[_desc(w.view(G * a, dk), [CHUNK, dk]) for w in (w1, w2, w3)], u1_b, u2_b, part,
        _desc(part.view(-1, dk), [CHUNK, dk]), N, P, G=G, A=a, DK=dk, NCH=nch, S=STAGES, CREGS=CONSUMER_REGS,
        num_warps=4, maxnreg=ws.MAX_REGS)
    return part, 2 * P
