"""The query rotation and A0 = q~^T q~ in one pass over q, and their backward in one pass (issue #24).

Why: in the compiled layer the rotary kernel wrote q~, the density op (`head_products.density`)
read it back for A0, and in the backward `head_products`' row product wrote q~ (dA0 + dA0^T)
for the rotary backward to read and add to the gradient from q~ G. Each of those is a pass over
a q~-sized tensor (235 MB a pldr-110m layer at micro-batch 128) that plain attention does not
make. Here:

- `pldr::rotary_density(q, table)` reads q once, writes q~ and sums A0 = q~^T q~ over the
  positions from the rounded q~ it wrote (fp32 accumulation, q's dtype out, as the density op).
- its backward reads dq~ and q~ once and writes dq = R^T (dq~ + q~ (dA0 + dA0^T)), where R is the
  rotation: q~_i = q_i C_i + q_p(i) S'_i with p(i) the partner element (i^1 interleaved,
  i + dk/2 mod dk for "half"; p is its own inverse), so dq_j = t_j C_j + t_p(j) S'_p(j) with
  t = dq~ + q~ (dA0 + dA0^T), and S'_p(j) = -S'_j in `rotary_cache`'s tables.

Partner elements come from products with the 0/1 swap matrix (x P)_j = x_p(j) on the tensor
cores, exact for bf16 x. The first version gathered them with a second load at permuted column
offsets and read the table's (C, S') pairs at stride 2: every such load was scalar, and the ops
ran at 133 and 307 GB/s (3.5 and 2.3 ms, pldr-110m mb 128, H100; 31 ms a training step). Now
0.227 and 0.379 ms (2.07 / 1.86 TB/s), and `pldr-train` 1.010x the code before (docs/performance.md
footnote (28)).

The rotation is `layers.apply_rotary`'s: fp32 arithmetic on q's values, one rounding to q's
dtype; table is `layers.rotary_cache`'s [S, dk, 2] rows (C, S') for the positions. Each A0
program sums one (batch, head)'s positions in a fixed order: deterministic. Used by the fast
path's PLGA on bf16 work where A0 is needed (`fast.FastPLGA.rotate_queries`); k's rotation and
G = I models keep the compiled rotary kernel.
"""
from __future__ import annotations

import os

import torch

from . import head_products

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: apply_rotary and the density product are used instead
    triton = None

_INTERP = os.environ.get("TRITON_INTERPRET") == "1"
# Rows a tile, warps, stages: memory-bound passes, as head_products' (the forward sums over S in
# one program per (batch, head); the backward's row tiles are independent). Swept on an H100
# (pldr-110m mb 128, ms a call): forward (64, 4, 3) 0.232 against 0.276-0.580 for 128-row tiles,
# 8 warps, 32-row tiles or two stages; backward (64, 4, 2) 0.403 (0.400 with one stage) against
# 0.51-0.63 for 128/256-row tiles, 8 warps or 32-row tiles. Tried and slower: dA0 + dA0^T summed
# inside the backward kernel (each program loading dA0 and its transpose) instead of by torch
# before it: 2.31 against 1.97 + 0.21 ms a training step.
FWD_CONFIG = (64, 4, 3)
BWD_CONFIG = (64, 4, 2)
Tensor = torch.Tensor


def available(q: Tensor, table: Tensor) -> bool:
    """Whether the op runs on q [B, h, S, dk] with table [S, dk, 2] fp32 contiguous: where
    `head_products`' ops run (CUDA or Triton's interpreter, unit stride along dk, dk a power of
    two >= 16, 32-bit offsets)."""
    return (head_products.available(q) and table.dtype == torch.float32
            and tuple(table.shape) == (q.shape[-2], q.shape[-1], 2) and table.is_contiguous())


if triton is not None:
    @triton.jit
    def _swap_matrix(cols, DK: tl.constexpr, HALF: tl.constexpr, INTERP: tl.constexpr):
        """P [DK, DK] with (x P)_j = x_p(j): 0/1 entries, so x P is exact for bf16 x (one term
        a column, fp32 accumulation) and runs on the tensor cores instead of shuffling registers."""
        part = (cols + DK // 2) % DK if HALF else cols ^ 1
        p = (cols[:, None] == part[None, :]).to(tl.float32)
        return p if INTERP else p.to(tl.bfloat16)

    @triton.jit
    def _table_rows(t_ptr, r, m, DK: tl.constexpr, BS: tl.constexpr):
        """(C, S') [BS, DK] fp32 of positions r: one contiguous load of their (C, S') pairs."""
        pairs = tl.load(t_ptr + r[:, None] * (2 * DK) + tl.arange(0, 2 * DK)[None, :], mask=m, other=0.0)
        return tl.split(tl.reshape(pairs, (BS, DK, 2)))

    @triton.jit
    def _rotary_density_fwd(q_ptr, t_ptr, out_ptr, a_ptr, S, H, sqb, sqh, sqs, sob, soh, sos,
                            DK: tl.constexpr, BS: tl.constexpr, HALF: tl.constexpr, INTERP: tl.constexpr):
        """Program (b, h): q~ = q C + (q P) S' for every row, and A0 = q~^T q~ summed over them."""
        pid = tl.program_id(0)
        b, h = pid // H, pid % H
        rows, cols = tl.arange(0, BS), tl.arange(0, DK)
        swap = _swap_matrix(cols, DK, HALF, INTERP)
        q_base = q_ptr + b * sqb + h * sqh
        o_base = out_ptr + b * sob + h * soh
        acc = tl.zeros((DK, DK), dtype=tl.float32)
        for s0 in range(0, S, BS):
            r = s0 + rows
            m = r[:, None] < S
            x = tl.load(q_base + r[:, None] * sqs + cols[None, :], mask=m, other=0.0)
            if INTERP:      # the interpreter cannot multiply bf16: fp32 holding the same values
                x = x.to(tl.float32)
            c, s = _table_rows(t_ptr, r, m, DK, BS)
            y = (x.to(tl.float32) * c + tl.dot(x, swap) * s).to(out_ptr.dtype.element_ty)
            tl.store(o_base + r[:, None] * sos + cols[None, :], y, mask=m)
            if INTERP:
                y = y.to(tl.float32)
            acc = tl.dot(tl.trans(y), y, acc)
        tl.store(a_ptr + pid * DK * DK + cols[:, None] * DK + cols[None, :], acc.to(a_ptr.dtype.element_ty))

    @triton.jit
    def _rotary_density_bwd(dy_ptr, y_ptr, w_ptr, t_ptr, dq_ptr, S, H, sdb, sdh, sds, syb, syh, sys, sqb, sqh, sqs,
                            DK: tl.constexpr, BS: tl.constexpr, HALF: tl.constexpr, INTERP: tl.constexpr):
        """Program (row block, b*h): dq = t C - (t P) S' for BS rows, t = dy + y w, w = dA0 + dA0^T.
        (S'_p(j) = -S'_j for `rotary_cache`'s tables, C_p(j) = C_j; t P = dy P + y (w P).)"""
        pid_s, pid = tl.program_id(0), tl.program_id(1)
        b, h = pid // H, pid % H
        r, cols = pid_s * BS + tl.arange(0, BS), tl.arange(0, DK)
        m = r[:, None] < S
        swap = _swap_matrix(cols, DK, HALF, INTERP)
        w = tl.load(w_ptr + pid * DK * DK + cols[:, None] * DK + cols[None, :])
        y = tl.load(y_ptr + b * syb + h * syh + r[:, None] * sys + cols[None, :], mask=m, other=0.0)
        dy = tl.load(dy_ptr + b * sdb + h * sdh + r[:, None] * sds + cols[None, :], mask=m, other=0.0)
        if INTERP:
            y, w, dy = y.to(tl.float32), w.to(tl.float32), dy.to(tl.float32)
        wp = tl.dot(w, swap).to(w.dtype)          # w's columns in partner order (exact)
        t = dy.to(tl.float32) + tl.dot(y, w)
        tp = tl.dot(dy, swap) + tl.dot(y, wp)
        c, s = _table_rows(t_ptr, r, m, DK, BS)
        dq = t * c - tp * s
        tl.store(dq_ptr + b * sqb + h * sqh + r[:, None] * sqs + cols[None, :], dq.to(dq_ptr.dtype.element_ty),
                 mask=m)


@torch.library.custom_op("pldr::rotary_density", mutates_args=())
def rotary_density(q: Tensor, table: Tensor, half: bool) -> tuple[Tensor, Tensor]:
    """(q~ laid out like q, A0 = q~^T q~ [B, h, dk, dk] in q's dtype) for q [B, h, S, dk] and
    table [S, dk, 2] (`layers.rotary_cache` rows); half: the "half" rotary style, else interleaved."""
    B, H, S, dk = q.shape
    out = torch.empty_like(q)
    a0 = q.new_empty(B, H, dk, dk)
    if B * H:
        bs, warps, stages = (32, 1, 1) if _INTERP else FWD_CONFIG
        _rotary_density_fwd[(B * H,)](q, table, out, a0, S, H, q.stride(0), q.stride(1), q.stride(2),
                                      out.stride(0), out.stride(1), out.stride(2), DK=dk, BS=bs, HALF=half,
                                      INTERP=_INTERP, num_warps=warps, num_stages=stages)
    return out, a0


@rotary_density.register_fake
def _(q, table, half):
    return torch.empty_like(q), q.new_empty(*q.shape[:2], q.shape[-1], q.shape[-1])


@torch.library.custom_op("pldr::rotary_density_backward", mutates_args=())
def rotary_density_backward(dqr: Tensor, da0: Tensor, qr: Tensor, table: Tensor, half: bool) -> Tensor:
    """dq (laid out like q~) from the gradients of q~ and of A0, q~ and the table."""
    B, H, S, dk = qr.shape
    dq = torch.empty_like(qr)
    if B * H * S:
        w = (da0 + da0.transpose(-1, -2)).to(qr.dtype).contiguous()   # as the density op's backward
        bs, warps, stages = (32, 1, 1) if _INTERP else BWD_CONFIG
        _rotary_density_bwd[(triton.cdiv(S, bs), B * H)](
            dqr, qr, w, table, dq, S, H, dqr.stride(0), dqr.stride(1), dqr.stride(2), qr.stride(0), qr.stride(1),
            qr.stride(2), dq.stride(0), dq.stride(1), dq.stride(2), DK=dk, BS=bs, HALF=half, INTERP=_INTERP,
            num_warps=warps, num_stages=stages)
    return dq


@rotary_density_backward.register_fake
def _(dqr, da0, qr, table, half):
    return torch.empty_like(qr)


def _setup(ctx, inputs, output):
    q, table, half = inputs
    ctx.save_for_backward(output[0], table)
    ctx.half = half


def _backward(ctx, dqr, da0):
    qr, table = ctx.saved_tensors
    dqr = dqr if dqr.stride(-1) == 1 else dqr.contiguous()
    return rotary_density_backward(dqr, da0, qr, table, ctx.half), None, None


rotary_density.register_autograd(_backward, setup_context=_setup)
