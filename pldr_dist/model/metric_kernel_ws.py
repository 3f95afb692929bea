"""The learner op's forward and row kernel, warp-specialized in Gluon for Hopper (sm_90), issue #24.
This module: the design, the producer and ring both kernels share, the forward and the host-side
descriptors; the row kernel's consumer and launch are metric_kernel_ws_rows.

Why: compiled by Triton, the forward and the backward's row kernel wait for each warpgroup MMA
right after issuing it (`pldr-bench kernels --resources`: every Triton kernel waits at depth 0
only) and hold one 8-warp program an SM, so the tensor cores idle during the silu work and the
CUDA cores during the products. Here each program (one an SM, persistent over 128-row blocks)
has three partitions:

- a producer warp streams the weight tiles of each 64-unit hidden chunk (U1, U2, U3^T rows and
  the chunk's biases, ~25 KB) from L2 through a ring of TMA buffers;
- two consumer warpgroups, 64 rows each, read every tile from that ring (weights shared by 128
  rows) and run their own products and elementwise work. They meet only at the ring's barriers,
  so while one waits for its products the other's silu runs; in the forward each also keeps the
  next chunk's gate/up products in flight during its own silu.

A hand-scheduled single-warpgroup kernel without the producer and the shared ring (commit
3f193be) was slower than Triton's. The GLU loops, and the row kernel's chunk loop, run at run
time, not unrolled: unrolled, each consumer had its own copy of every GLU and chunk (171 KB of
machine code for the row kernel) and ncu put its largest stall at instruction fetch
(kernels/h100/ncu_ws_learner_pldr-110m.txt, tensor pipe 26% active). The row kernel's chunk 0 is
peeled off, so that each chunk's input-gradient products go in with the next chunk's
gate/up/hidden-gradient products, from one copy of the chunk's code. On an H100 (pldr-110m mb
128, kernel time a call, one process): the row kernel 0.680 ms against 0.880 unrolled, the
forward 0.370 against 0.392 (the Triton kernels: ~0.91 and ~0.58); tensor pipe 33% and 37%
(kernels/h100/ncu_ws_fwd_rows_pldr-110m.txt). The outputs are not bit-identical to the unrolled
kernels' (other instruction selection), with the same errors against fp32. Tried and slower:
32-unit chunks with the next chunk's products in flight (1.095 against 0.881 ms unrolled: twice
the ring steps a GLU), and two weight-gradient kernels in this design (commits 885dbef, 0668061).

The algorithm, saved tensors and numerics are metric_kernel's (bf16 operands, fp32 accumulation,
LayerNorms and residual stream in fp32; silu through tanh.approx): the same out, z, ys and the
same dx, dys and LayerNorm partials (per 64 rows), so the weight-gradient kernel is unchanged.
GPU only: Gluon has no CPU interpreter, so the CPU tests compile these kernels for sm_90 and the
GPU suites check them against fp32 and against the Triton kernels.
"""
from __future__ import annotations

import torch

try:
    import triton
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma,
                                                                  warpgroup_mma, warpgroup_mma_wait)
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    # TMA copies: async_load / async_store since Triton 3.7, async_copy_* before (the GPU
    # machine's torch 2.11 ships Triton 3.6)
    _tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
    _tma_store = getattr(tma, "async_store", None) or tma.async_copy_shared_to_global
except ImportError:   # older Triton or CPU-only installs: the Triton kernels are used
    gluon = None

ROWS = 128          # rows a block: 64 per consumer warpgroup (one wgmma M)
CHUNK = 64          # hidden units a ring step (= dk: gate/up accumulators share the output's layout)
FWD_STAGES = 5      # ring depth (~25 KB a step): 4 -> 0.397, 3 -> 0.411 ms against 0.388 (pldr-110m mb 128, H100)
CONSUMER_REGS = 240  # per consumer thread; the producer's warpgroup gives its registers up (24)
MAX_REGS = 168       # at launch: 12 warps (the producer's warp rounds up to a warpgroup) x 168 fill an SM


def available(x: torch.Tensor, dk: int) -> bool:
    """Whether these kernels run on rows x [N, dk]: Gluon, a Hopper GPU, dk = 64 and whole
    128-row blocks (N = batch * heads * 64: an even batch * heads)."""
    return (gluon is not None and x.is_cuda and torch.cuda.get_device_capability(x.device)[0] == 9
            and x.dtype in (torch.bfloat16, torch.float32) and dk == CHUNK and x.shape[0] % ROWS == 0)


if gluon is not None:
    _BM = gl.constexpr(ROWS // 2)
    _BH = gl.constexpr(CHUNK)

    @gluon.jit
    def _sigmoid(g):
        t = gl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=f,f", [0.5 * g], dtype=gl.float32,
                                      is_pure=True, pack=1)
        return 0.5 + 0.5 * t

    @gluon.jit
    def _layer_norm(s, w_ptr, b_ptr, cols, eps, DK: gl.constexpr):
        """LayerNorm of each row of s [64, DK] fp32; weight/bias fp32."""
        mean = gl.sum(s, axis=1) / DK
        d = s - gl.expand_dims(mean, 1)
        rstd = 1.0 / gl.sqrt(gl.sum(d * d, axis=1) / DK + eps)
        return (d * gl.expand_dims(rstd, 1) * gl.expand_dims(gl.load(w_ptr + cols), 0)
                + gl.expand_dims(gl.load(b_ptr + cols), 0))

    @gluon.jit
    def _producer(ring, own, A: gl.constexpr, R: gl.constexpr, NG: gl.constexpr, DK: gl.constexpr,
                  NCH: gl.constexpr, S: gl.constexpr, HALF: gl.constexpr, BACKWARD: gl.constexpr):
        """Streams step t = (block, GLU, chunk) into slot t % S once both consumers freed it: the
        GLUs in order (forward) or in reverse (backward), the same sequence the consumers walk.
        Rows past a GLU's a_dff read the next GLU's (its biases are zero there and the consumers
        zero those units)."""
        (w1_desc, w2_desc, w3_desc, bias_desc, N, w1_s, w2_s, w3_s, bias_s, ready, empty) = ring
        nbytes: gl.constexpr = 3 * w1_desc.block_type.nbytes + bias_desc.block_type.nbytes
        t = 0
        for blk in range(gl.program_id(0), gl.cdiv(N, 2 * _BM), gl.num_programs(0)):
            for k in range(R * NG):
                gi = R * NG - 1 - k if BACKWARD else k
                for c in gl.static_range(NCH):
                    s = t % S
                    mbarrier.wait(empty.index(s), ((t // S) & 1) ^ 1)
                    bar = ready.index(s)
                    mbarrier.expect(bar, nbytes)
                    row = gi * A + c * _BH
                    _tma_load(w1_desc, [row, 0], bar, w1_s.index(s))
                    _tma_load(w2_desc, [row, 0], bar, w2_s.index(s))
                    _tma_load(w3_desc, [row, 0], bar, w3_s.index(s))
                    _tma_load(bias_desc, [(gi * NCH + c) * 4, 0], bar, bias_s.index(s))
                    t += 1

    @gluon.jit
    def _release(empty, t, S: gl.constexpr):
        """This consumer is done with step t's slot (its products have retired)."""
        fence_async_shared()
        mbarrier.arrive(empty.index(t % S), count=1)

    @gluon.jit
    def _fwd_consumer(ring, own, A: gl.constexpr, R: gl.constexpr, NG: gl.constexpr, DK: gl.constexpr,
                      NCH: gl.constexpr, S: gl.constexpr, HALF: gl.constexpr, BACKWARD: gl.constexpr):
        """Rows HALF*64 ... of each block through LN_0 and all R units (metric_kernel's forward)."""
        (w1_desc, w2_desc, w3_desc, bias_desc, N, w1_s, w2_s, w3_s, bias_s, ready, empty) = ring
        (x_desc, out_desc, z_desc, ys_desc, lnw_ptr, lnb_ptr, eps, io_s, a_s, y_s, bars) = own
        acc_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                        instr_shape=[16, DK, 16])
        op_l: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_l, k_width=2)
        cols = gl.arange(0, DK, layout=gl.SliceLayout(0, acc_l))
        io, a_sm, ysb, bar = io_s.index(HALF), a_s.index(HALF), y_s.index(HALF), bars.index(HALF)
        zero = gl.zeros([_BM, DK], gl.float32, acc_l)
        t = 0
        phase = 0
        for blk in range(gl.program_id(0), gl.cdiv(N, 2 * _BM), gl.num_programs(0)):
            row0 = blk * (2 * _BM) + HALF * _BM
            tma.store_wait(0)                        # the last block's out has left io
            mbarrier.expect(bar, x_desc.block_type.nbytes)
            if x_desc.dtype == gl.float32:           # A0 rows land in the staging buffer of their dtype
                _tma_load(x_desc, [row0, 0], bar, io)
                mbarrier.wait(bar, phase)
                x = io.load(acc_l)
            else:
                _tma_load(x_desc, [row0, 0], bar, ysb)
                mbarrier.wait(bar, phase)
                x = ysb.load(acc_l).to(gl.float32)
            phase ^= 1
            a = _layer_norm(x, lnw_ptr, lnb_ptr, cols, eps, DK)
            for r in range(R):
                a_sm.store(a)                        # the unit's input, for its residual: not in registers
                y = a
                for jg in range(NG):
                    gi = r * NG + jg
                    y16 = y.to(gl.bfloat16)
                    tma.store_wait(0)
                    ysb.store(y16)
                    fence_async_shared()
                    _tma_store(ys_desc, [gi * N + row0, 0], ysb)
                    yb = gl.convert_layout(y16, op_l)    # operand A from registers for every chunk
                    s = t % S
                    mbarrier.wait(ready.index(s), (t // S) & 1)
                    g = warpgroup_mma(yb, w1_s.index(s).permute((1, 0)), zero, use_acc=False, is_async=True)
                    u = warpgroup_mma(yb, w2_s.index(s).permute((1, 0)), zero, use_acc=False, is_async=True)
                    acc = zero + bias_s.index(s).slice(2, 1).load(acc_l)     # c3 starts the sum
                    hb = gl.zeros([_BM, _BH], gl.bfloat16, op_l)
                    for c in gl.static_range(NCH):
                        s = t % S
                        b1 = bias_s.index(s).slice(0, 1).load(acc_l)
                        b2 = bias_s.index(s).slice(1, 1).load(acc_l)
                        if c + 1 < NCH:                  # the next chunk's gate/up go in flight first
                            s1 = (t + 1) % S
                            mbarrier.wait(ready.index(s1), ((t + 1) // S) & 1)
                            gn = warpgroup_mma(yb, w1_s.index(s1).permute((1, 0)), zero, use_acc=False,
                                               is_async=True)
                            un = warpgroup_mma(yb, w2_s.index(s1).permute((1, 0)), zero, use_acc=False,
                                               is_async=True)
                            if c == 0:                   # in flight: g, u, gn, un
                                g, u, hb = warpgroup_mma_wait(2, deps=(g, u, hb))
                            else:                        # g, u, acc (chunk c-1), gn, un
                                g, u, hb = warpgroup_mma_wait(3, deps=(g, u, hb))
                        else:
                            if c == 0:
                                g, u, hb = warpgroup_mma_wait(0, deps=(g, u, hb))
                            else:
                                g, u, hb = warpgroup_mma_wait(1, deps=(g, u, hb))
                        if c >= 2:                       # chunk c-2's output product has retired
                            _release(empty, t - 2, S)
                        gb = g + b1
                        h = gb * _sigmoid(gb) * (u + b2)
                        if (c + 1) * _BH > A:            # units past a_dff: zero, whatever the tiles held
                            h = gl.where(gl.expand_dims(c * _BH + cols < A, 0), h, 0.0)
                        hb = gl.convert_layout(h.to(gl.bfloat16), op_l)
                        acc = warpgroup_mma(hb, w3_s.index(s), acc, is_async=True)
                        t += 1
                        if c + 1 < NCH:
                            g = gn
                            u = un
                    y, hb, yb = warpgroup_mma_wait(0, deps=(acc, hb, yb))
                    for k in gl.static_range(2 if NCH >= 2 else 1):
                        _release(empty, t - 1 - k, S)
                z = y + a_sm.load(acc_l)
                tma.store_wait(0)
                io.store(z)
                fence_async_shared()
                _tma_store(z_desc, [r * N + row0, 0], io)
                a = _layer_norm(z, lnw_ptr + (r + 1) * DK, lnb_ptr + (r + 1) * DK, cols, eps, DK)
            tma.store_wait(0)
            io.store(a)
            fence_async_shared()
            _tma_store(out_desc, [row0, 0], io)
        tma.store_wait(0)

    @gluon.jit
    def _ring(w1_desc, w2_desc, w3_desc, bias_desc, N, S: gl.constexpr, DK: gl.constexpr):
        """The weight ring's buffers and barriers (`empty` counts both consumers)."""
        ready = gl.allocate_shared_memory(gl.int64, [S, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [S, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(S):
            mbarrier.init(ready.index(i), count=1)
            mbarrier.init(empty.index(i), count=2)
        return (w1_desc, w2_desc, w3_desc, bias_desc, N,
                gl.allocate_shared_memory(gl.bfloat16, [S, _BH, DK], w1_desc.layout),
                gl.allocate_shared_memory(gl.bfloat16, [S, _BH, DK], w2_desc.layout),
                gl.allocate_shared_memory(gl.bfloat16, [S, _BH, DK], w3_desc.layout),
                gl.allocate_shared_memory(gl.float32, [S, 4, DK], bias_desc.layout), ready, empty)

    @gluon.jit
    def _barriers(n: gl.constexpr):
        bars = gl.allocate_shared_memory(gl.int64, [n, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(n):
            mbarrier.init(bars.index(i), count=1)
        return bars

    @gluon.jit
    def _learner_fwd_ws(x_desc, w1_desc, w2_desc, w3_desc, bias_desc, out_desc, z_desc, ys_desc, lnw_ptr, lnb_ptr,
                        N, eps, A: gl.constexpr, R: gl.constexpr, NG: gl.constexpr, DK: gl.constexpr,
                        NCH: gl.constexpr, S: gl.constexpr, CREGS: gl.constexpr):
        """Row descriptors are 2-d: x, out [N, DK]; z [R*N, DK]; ys [R*NG*N, DK]; weights
        [R*NG*A, DK] (U3 transposed) and biases [R*NG*NCH*4, 64] (c1, c2, c3, 0 of each chunk)."""
        ring = _ring(w1_desc, w2_desc, w3_desc, bias_desc, N, S, DK)
        own = (x_desc, out_desc, z_desc, ys_desc, lnw_ptr, lnb_ptr, eps,
               gl.allocate_shared_memory(gl.float32, [2, _BM, DK], z_desc.layout),    # x / z / out staging
               gl.allocate_shared_memory(gl.float32, [2, _BM, DK], z_desc.layout),    # the unit's input
               gl.allocate_shared_memory(gl.bfloat16, [2, _BM, DK], ys_desc.layout),  # ys staging
               _barriers(2))
        gl.warp_specialize([
            (_fwd_consumer, (ring, own, A, R, NG, DK, NCH, S, 0, False)),
            (_fwd_consumer, (ring, own, A, R, NG, DK, NCH, S, 1, False)),
            (_producer, (ring, own, A, R, NG, DK, NCH, S, 1, False)),
        ], [4, 1], [CREGS, 24])

def _desc(t: torch.Tensor, block: list):
    dtype = {torch.float32: gl.float32, torch.bfloat16: gl.bfloat16}[t.dtype]
    return TensorDescriptor.from_tensor(t, block, gl.NVMMASharedLayout.get_default_for(block, dtype))


def bias_rows(u1_b: torch.Tensor, u2_b: torch.Tensor, u3_b, a: int) -> torch.Tensor:
    """The biases as the ring streams them: fp32 [G*NCH*4, 64], for GLU g and chunk c the rows
    c1, c2 (zero past a_dff), c3 (None: zeros) and a zero row (TMA boxes are powers of two).
    Built in three kernels: under CUDA graphs each small op here is a kernel every step."""
    G = u1_b.numel() // a
    nch = triton.cdiv(a, CHUNK)
    gate_up = torch.nn.functional.pad(torch.stack((u1_b.reshape(G, a), u2_b.reshape(G, a)), 1).float(),
                                      (0, nch * CHUNK - a)).view(G, 2, nch, CHUNK).transpose(1, 2)
    zero = gate_up.new_zeros(()).expand(G, nch, 1, CHUNK)
    out = zero if u3_b is None else u3_b.float().reshape(G, 1, 1, CHUNK).expand(G, nch, 1, CHUNK)
    return torch.cat((gate_up, out, zero), 2).view(G * nch * 4, CHUNK)


def _ring_args(w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor, u1_b, u2_b, u3_b) -> list:
    """Descriptors of the bf16 weights [G, A, dk] (U3 transposed) as [G*A, dk] in chunk tiles,
    and of `bias_rows`."""
    G, a, dk = w1.shape
    return ([_desc(w.view(G * a, dk), [CHUNK, dk]) for w in (w1, w2, w3)]
            + [_desc(bias_rows(u1_b, u2_b, u3_b, a), [4, CHUNK])])


def _grid(n_rows: int, device) -> tuple:
    return (min(n_rows // ROWS, torch.cuda.get_device_properties(device).multi_processor_count),)


def forward(x, lnw, lnb, w1, u1_b, w2, u2_b, w3, u3_b, out, z, ys, eps: float) -> None:
    """metric_kernel's forward into out [N, dk], z [R, N, dk], ys [R*n, N, dk]; lnw/lnb [R+1, dk]
    fp32, w1/w2/w3 bf16 [R*n, a, dk] (U3 transposed)."""
    G, a, dk = w1.shape
    R, n = z.shape[0], G // z.shape[0]
    N = x.shape[0]
    _learner_fwd_ws[_grid(N, x.device)](
        _desc(x, [ROWS // 2, dk]), *_ring_args(w1, w2, w3, u1_b, u2_b, u3_b), _desc(out, [ROWS // 2, dk]),
        _desc(z.view(R * N, dk), [ROWS // 2, dk]), _desc(ys.view(G * N, dk), [ROWS // 2, dk]), lnw, lnb, N, eps,
        A=a, R=R, NG=n, DK=dk, NCH=triton.cdiv(a, CHUNK), S=FWD_STAGES, CREGS=CONSUMER_REGS, num_warps=4,
        maxnreg=MAX_REGS)
