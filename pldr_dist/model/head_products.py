"""A0 = q~^T q~ and q~ G_LM as Triton ops, next to the learner op (issue #24).

Why: both are products per (batch, head) with dk = 64 on two sides and S = 1023 positions on
the third, so each is a pass over q~ bound by memory, not arithmetic. Compiled by inductor,
the unaligned S made them padded copies plus cuBLAS calls (or, unpadded, a transposed copy of
q~ and an align-1 GEMM), and autograd's backward of q~ G read q~ and dq~G in two products.
Here each product reads its operands once in the layout they come in (q~ as the rotary kernel
wrote it, [B, S, h, dk] in memory), with no padding:

- `pldr::density(q)`: A0 = q^T q, fp32 accumulation over S, q's dtype out (what a bf16 matmul
  gives). Backward: dq = q (dA0 + dA0^T), one product (`_rows_product`).
- `pldr::times_g(q, g)`: q G per (batch, head), G cast to q's dtype (autocast's matmul).
  Backward in one pass over q and d(qG) (`_gram_product`): dG = q^T d(qG) summed in fp32 (in
  G's dtype, not rounded to bf16 first as autocast's is) and dq = d(qG) G^T. A fixed G (the
  G = I model's [h, dk, dk] buffer) gets dq alone: both models' q G run through the same op.

Measured (H100, pldr-110m mb 128, `pldr-bench kernels --head-products`, kernels/h100/head_products):
A0 0.09 ms against 1.39 for torch.matmul on the same tensors, q G 0.18 against 0.50, its backward
0.27 against 1.87; `pldr-train` 1.022x (pldr-110m mb 128) and 1.013x (pldr-1b mb 32).

Each gram program sums one (batch, head)'s positions in a fixed order: deterministic. Used by
the fast path on bf16 work (`fast.FastPLGA`); elsewhere, and on CPUs outside Triton's
interpreter (the tests), PLGA computes the same products with torch.matmul. Where the fast path
rotates the queries with its rotary table, A0 and its backward come from `rotary_density`
instead (one pass with the rotation each way); `density` serves the other cases (no table,
context parallelism's positions).
"""
from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl

    from .glu_kernel import _mm   # bf16 operands (fp32 holding bf16 values in the interpreter)
except ImportError:  # CPU-only installs: torch.matmul is used instead
    triton = None

_INTERP = os.environ.get("TRITON_INTERPRET") == "1"
# Rows of S per tile, warps, pipeline stages. Memory-bound passes: enough programs and loads
# in flight matter, not the tile's products.
GRAM_CONFIG = (64, 4, 3)
ROWS_CONFIG = (128, 4, 2)
Tensor = torch.Tensor


def available(q: Tensor) -> bool:
    """Whether the ops run on q: a 4-d [B, h, S, dk] tensor with contiguous dk, on CUDA with
    Triton or in Triton's CPU interpreter, dk a power of two >= 16 (the tiles' products), and
    fewer than 2^31 elements (the kernels' offsets are 32-bit)."""
    dk = q.shape[-1]
    return (triton is not None and (q.is_cuda or (q.device.type == "cpu" and _INTERP)) and q.dim() == 4
            and q.stride(-1) == 1 and dk >= 16 and dk & (dk - 1) == 0 and q.numel() < 2 ** 31)


if triton is not None:
    @triton.jit
    def _gram_product(x_ptr, y_ptr, w_ptr, g_ptr, p_ptr, S, H,
                      sxb, sxh, sxs, syb, syh, sys, swb, swh, swr, swc, spb, sph, sps,
                      PRODUCT: tl.constexpr, DK: tl.constexpr, BS: tl.constexpr, INTERP: tl.constexpr):
        """Program (b, h): g = x^T y over all S rows (fp32) and, if PRODUCT, p = y w row by row."""
        pid = tl.program_id(0)
        b, h = pid // H, pid % H
        rows, cols = tl.arange(0, BS), tl.arange(0, DK)
        x_base = x_ptr + b * sxb + h * sxh + cols[None, :]
        y_base = y_ptr + b * syb + h * syh + cols[None, :]
        if PRODUCT:
            w = _mm(tl.load(w_ptr + b * swb + h * swh + cols[:, None] * swr + cols[None, :] * swc), INTERP)
            p_base = p_ptr + b * spb + h * sph + cols[None, :]
        acc = tl.zeros((DK, DK), dtype=tl.float32)
        for s0 in range(0, S, BS):
            r = s0 + rows
            m = r[:, None] < S
            x = _mm(tl.load(x_base + r[:, None] * sxs, mask=m, other=0.0), INTERP)
            y = _mm(tl.load(y_base + r[:, None] * sys, mask=m, other=0.0), INTERP)
            acc = tl.dot(tl.trans(x), y, acc)
            if PRODUCT:
                p = tl.dot(y, w)
                tl.store(p_base + r[:, None] * sps, p.to(p_ptr.dtype.element_ty), mask=m)
        tl.store(g_ptr + pid * DK * DK + cols[:, None] * DK + cols[None, :], acc.to(g_ptr.dtype.element_ty))

    @triton.jit
    def _rows_product(x_ptr, w_ptr, out_ptr, S, H, sxb, sxh, sxs, swb, swh, swr, swc, sob, soh, sos,
                      DK: tl.constexpr, BS: tl.constexpr, INTERP: tl.constexpr):
        """Program (row block, b*h): out = x w for BS rows of one (batch, head)."""
        pid_s, pid = tl.program_id(0), tl.program_id(1)
        b, h = pid // H, pid % H
        r, cols = pid_s * BS + tl.arange(0, BS), tl.arange(0, DK)
        m = r[:, None] < S
        w = _mm(tl.load(w_ptr + b * swb + h * swh + cols[:, None] * swr + cols[None, :] * swc), INTERP)
        x = _mm(tl.load(x_ptr + b * sxb + h * sxh + r[:, None] * sxs + cols[None, :], mask=m, other=0.0), INTERP)
        out = tl.dot(x, w)
        tl.store(out_ptr + b * sob + h * soh + r[:, None] * sos + cols[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=m)


def _batch_strides(t: Tensor, H: int) -> tuple:
    """(batch, head) strides of a [B, h, ., .] or broadcast [h, ., .] tensor."""
    return (t.stride(0), t.stride(1)) if t.dim() == 4 else (0, t.stride(0))


def _unit_last(t: Tensor) -> Tensor:
    """t with stride 1 along dk (the kernels' rows are contiguous); a copy only if it is not."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _gram(x: Tensor, y: Tensor, w: Tensor | None = None, g_dtype=torch.float32) -> tuple:
    """(x^T y per (batch, head) [B, h, dk, dk] in g_dtype, y w laid out like y or None)."""
    x, y = _unit_last(x), _unit_last(y)
    B, H, S, dk = x.shape
    g = torch.empty(B, H, dk, dk, device=x.device, dtype=g_dtype)
    p = torch.empty_like(y) if w is not None else None
    if B * H:
        bs, warps, stages = (32, 1, 1) if _INTERP else GRAM_CONFIG
        wt, pt = (w, p) if w is not None else (y, y)   # unused when PRODUCT is off
        _gram_product[(B * H,)](x, y, wt, g, pt, S, H, x.stride(0), x.stride(1), x.stride(2),
                                y.stride(0), y.stride(1), y.stride(2), *_batch_strides(wt, H),
                                wt.stride(-2), wt.stride(-1), pt.stride(0), pt.stride(1), pt.stride(2),
                                PRODUCT=w is not None, DK=dk, BS=bs, INTERP=_INTERP, num_warps=warps, num_stages=stages)
    return g, p


def _product(x: Tensor, w: Tensor) -> Tensor:
    """x w per (batch, head), laid out like x, in x's dtype."""
    x = _unit_last(x)
    B, H, S, dk = x.shape
    out = torch.empty_like(x)
    if B * H * S:
        bs, warps, stages = (32, 1, 1) if _INTERP else ROWS_CONFIG
        _rows_product[(triton.cdiv(S, bs), B * H)](x, w, out, S, H, x.stride(0), x.stride(1), x.stride(2),
                                                  *_batch_strides(w, H), w.stride(-2), w.stride(-1),
                                                  out.stride(0), out.stride(1), out.stride(2),
                                                  DK=dk, BS=bs, INTERP=_INTERP, num_warps=warps, num_stages=stages)
    return out


@torch.library.custom_op("pldr::density", mutates_args=())
def density(q: Tensor) -> Tensor:
    """A0 = q^T q [B, h, dk, dk] in q's dtype for q [B, h, S, dk]."""
    return _gram(q, q, g_dtype=q.dtype)[0]


@density.register_fake
def _(q):
    return q.new_empty((*q.shape[:2], q.shape[-1], q.shape[-1]))


@torch.library.custom_op("pldr::head_product", mutates_args=())
def head_product(x: Tensor, w: Tensor) -> Tensor:
    """x w per (batch, head), laid out like x: x [B, h, S, dk], w [B, h, dk, dk] or [h, dk, dk]."""
    return _product(x, w)


@head_product.register_fake
def _(x, w):
    return torch.empty_like(x)


def _density_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _density_backward(ctx, da0):
    (q,) = ctx.saved_tensors
    return head_product(q, (da0 + da0.transpose(-1, -2)).to(q.dtype))


density.register_autograd(_density_backward, setup_context=_density_setup)


@torch.library.custom_op("pldr::times_g", mutates_args=())
def times_g(q: Tensor, g: Tensor) -> Tensor:
    """q G per (batch, head) in q's dtype, laid out like q: q [B, h, S, dk], g [B, h, dk, dk],
    or [h, dk, dk] shared by the batch if G gets no gradient (dG would be a sum over it)."""
    return _product(q, g)


@times_g.register_fake
def _(q, g):
    return torch.empty_like(q)


@torch.library.custom_op("pldr::times_g_backward", mutates_args=())
def times_g_backward(dqg: Tensor, q: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    """(dq = dqg G^T laid out like dqg, dG = q^T dqg in G's dtype), one pass over q and dqg."""
    dg, dq = _gram(q, dqg, g.transpose(-1, -2), g_dtype=g.dtype)
    return dq, dg


@times_g_backward.register_fake
def _(dqg, q, g):
    return torch.empty_like(dqg), g.new_empty(g.shape)


def _times_g_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _times_g_backward(ctx, dqg):
    q, g = ctx.saved_tensors
    if not ctx.needs_input_grad[1]:      # a fixed G (the G = I model's buffer): dq alone
        return head_product(dqg, g.transpose(-1, -2)), None
    return times_g_backward(dqg, q, g)


times_g.register_autograd(_times_g_backward, setup_context=_times_g_setup)
