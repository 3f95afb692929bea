"""The power law, A -> (A_LM, A_P, G_LM), as one Triton op per direction (issue #24).

Why: per (batch, head) the power law is two 64 x 64 products around element-wise work
(`plga.PowerLaw`). Compiled, it was ~12 kernels a layer: the per-head weights copied out over
the batch for a batched matmul (`clone_expand`), three cuBLAS calls of 64 x 64 tiles, element-
wise passes, and reductions over the batch for the weights' gradients, ~1.3 ms a pldr-110m
step (mb 128) and ~3 ms a pldr-1b step (mb 32) on an H100 for ~25 / 50 MB of A. Here one
program holds one (batch, head)'s 64 x 64 tiles on the chip:

- `pldr::power_law(a, W, b, P, alpha, beta, g_only)`: pre = W a + b, A_LM = pre^2
  sigmoid(pre) + 1e-9, A_P = A_LM^P, G_LM = alpha A_P + beta; all three returned (the G-cache
  keeps A_LM, the DAG penalty reads all three), or G_LM alone (training: the other two would be
  ~2 x 25 MB of writes a pldr-110m layer at mb 128).
- its backward (`pldr::power_law_backward`) recomputes pre, A_LM and A_P from A (one product),
  then gives dA and the five per-head weight gradients. Those are sums over the batch: program
  (p, h, c) sums batches p, p + NP, ... of head h, columns c*BN ..., in registers and writes
  one partial; `_power_law_sum` adds the partials in a fixed order and writes the gradients.
  NP is fixed per device and shape, so the bits are too.

Measured (H100, `pldr-train`, benchmarks/results/trainer/h100/power_law_pldr-1b_mb32 and
plga_vs_g_power_law_pldr-110m_mb128): the three kernels take 0.62 ms of a pldr-110m step (mb 128)
and 1.26 ms of a pldr-1b step (mb 32); 1.005x tokens/s at pldr-1b, within the calls' noise.

Numerics as autocast's: bf16 operands with fp32 accumulation for the four products, element-wise
work and the gradient sums in fp32 (the products' outputs are not rounded to bf16 first, as
autocast's are). On CPUs the power law stays `PowerLaw.forward`; tests run these kernels in
Triton's interpreter against fp64.
"""
from __future__ import annotations

import functools
import os
from typing import Optional

import torch

try:
    import triton
    import triton.language as tl

    from .glu_kernel import _mm   # bf16 operands (fp32 holding bf16 values in the interpreter)
except ImportError:  # CPU-only installs: PowerLaw.forward is used instead
    triton = None

_INTERP = os.environ.get("TRITON_INTERPRET") == "1"
# Warps, and the backward's columns per program (`_power_law_bwd`). Four warps: a 64-row tile
# is one warpgroup's MMA; at eight the tiles were duplicated across the two warpgroups. Compiled
# for sm_90, the backward takes 242 registers at BN = 16, no spills (two programs an SM);
# at BN = 32 it spilled 280 bytes a thread, at BN = 64 1.3 KB.
FWD_WARPS, BWD_WARPS, BN = 4, 4, 16
PROGRAMS_PER_SM = 4            # backward programs (p, h, c): about this many per SM in all
# Tests only: 1 drops the power's derivative in A_LM, 2 the 2 pre sigmoid(pre) term of iswiglu's;
# the fp64 checks must then fail. Read at each call; 0 in normal use.
BREAK_DERIVATIVE = 0
Tensor = torch.Tensor


def available(a: Tensor) -> bool:
    """Whether the op runs on a: [B, h, dk, dk] with dk a power of two >= 16, on CUDA with
    Triton or in Triton's CPU interpreter, fewer than 2^31 elements (32-bit offsets)."""
    dk = a.shape[-1]
    return (triton is not None and (a.is_cuda or (a.device.type == "cpu" and _INTERP)) and a.dim() == 4
            and a.shape[-2] == dk and dk >= 16 and dk & (dk - 1) == 0 and a.numel() < 2 ** 31)


if triton is not None:
    @triton.jit
    def _power_law_fwd(a_ptr, w_ptr, b_ptr, p_ptr, al_ptr, be_ptr, alm_ptr, ap_ptr, g_ptr, H,
                       DK: tl.constexpr, STORE_ALL: tl.constexpr, INTERP: tl.constexpr):
        """Program b*H + h: one (batch, head)'s G_LM, and A_LM, A_P if STORE_ALL."""
        pid = tl.program_id(0)
        idx = tl.arange(0, DK)
        tile = idx[:, None] * DK + idx[None, :]
        mine, head = pid * DK * DK + tile, (pid % H) * DK * DK + tile
        w = _mm(tl.load(w_ptr + head), INTERP)
        pre = tl.dot(w, _mm(tl.load(a_ptr + mine), INTERP)) + tl.load(b_ptr + head).to(tl.float32)
        a_lm = pre * pre * tl.sigmoid(pre) + 1e-9
        a_p = tl.exp(tl.load(p_ptr + head).to(tl.float32) * tl.log(a_lm))
        g = tl.dot(_mm(tl.load(al_ptr + head), INTERP), _mm(a_p, INTERP)) + tl.load(be_ptr + head).to(tl.float32)
        if STORE_ALL:
            tl.store(alm_ptr + mine, a_lm.to(alm_ptr.dtype.element_ty))
            tl.store(ap_ptr + mine, a_p.to(ap_ptr.dtype.element_ty))
        tl.store(g_ptr + mine, g.to(g_ptr.dtype.element_ty))

    @triton.jit
    def _power_law_bwd(a_ptr, w_ptr, b_ptr, p_ptr, al_ptr, dg_ptr, dlm_ptr, dap_ptr, da_ptr, mm_ptr, ew_ptr, B, H, NP,
                       HAS_DLM: tl.constexpr, HAS_DAP: tl.constexpr, DK: tl.constexpr, BN: tl.constexpr,
                       INTERP: tl.constexpr, DROP: tl.constexpr):
        """Program (p, h, c): columns c*BN ... of dA for batches p, p + NP, ... of head h, and
        their share of the weight gradients: mm[p, h, c] = [dW | dalpha] ([DK, DK] each, sums over
        these columns too), ew[p, h] = [db | dP | dbeta] at these columns. Every step is
        column-local (pre = W a, G = alpha A_P: a column of the output needs that column of
        the input), so a program holds [DK, BN] tiles besides the two [DK, DK] sums (see BN)."""
        p, h, c = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        NC: tl.constexpr = DK // BN
        idx, cols = tl.arange(0, DK), c * BN + tl.arange(0, BN)
        square = idx[:, None] * DK + idx[None, :]
        tile = idx[:, None] * DK + cols[None, :]
        head = h * DK * DK
        w = _mm(tl.load(w_ptr + head + square), INTERP)
        al = _mm(tl.load(al_ptr + head + square), INTERP)
        dw = tl.zeros((DK, DK), tl.float32)
        dal = tl.zeros((DK, DK), tl.float32)
        db = tl.zeros((DK, BN), tl.float32)
        dp = tl.zeros((DK, BN), tl.float32)
        dbe = tl.zeros((DK, BN), tl.float32)
        for bb in tl.range(p, B, NP, num_stages=2):       # the next batch's loads during this one
            mine = (bb * H + h) * DK * DK + tile
            a = _mm(tl.load(a_ptr + mine), INTERP)
            pre = tl.dot(w, a) + tl.load(b_ptr + head + tile).to(tl.float32)
            s = tl.sigmoid(pre)
            a_lm = pre * pre * s + 1e-9
            log_lm = tl.log(a_lm)
            power = tl.load(p_ptr + head + tile).to(tl.float32)
            a_p = tl.exp(power * log_lm)
            dg = tl.load(dg_ptr + mine).to(tl.float32)
            dgb = _mm(dg, INTERP)
            d_ap = tl.dot(tl.trans(al), dgb)                     # alpha^T dG
            if HAS_DAP:
                d_ap += tl.load(dap_ptr + mine).to(tl.float32)
            dal = tl.dot(dgb, tl.trans(_mm(a_p, INTERP)), dal)    # dG A_P^T
            dbe += dg
            dp += d_ap * a_p * log_lm
            if DROP == 1:
                d_lm = d_ap * a_p                                 # deliberately wrong (tests)
            else:
                d_lm = d_ap * power * a_p / a_lm
            if HAS_DLM:
                d_lm += tl.load(dlm_ptr + mine).to(tl.float32)
            if DROP == 2:
                d_pre = d_lm * pre * pre * s * (1.0 - s)          # deliberately wrong (tests)
            else:
                d_pre = d_lm * pre * s * (2.0 + pre * (1.0 - s))  # d(pre^2 sigmoid(pre))
            db += d_pre
            dpb = _mm(d_pre, INTERP)
            dw = tl.dot(dpb, tl.trans(a), dw)                     # dpre A^T
            tl.store(da_ptr + mine, tl.dot(tl.trans(w), dpb).to(da_ptr.dtype.element_ty))
        mm = mm_ptr + ((p * H + h) * NC + c) * 2 * DK * DK + square
        tl.store(mm, dw)
        tl.store(mm + DK * DK, dal)
        ew = ew_ptr + (p * H + h) * 3 * DK * DK + tile
        tl.store(ew, db)
        tl.store(ew + DK * DK, dp)
        tl.store(ew + 2 * DK * DK, dbe)


    @triton.jit
    def _power_law_sum(mm_ptr, ew_ptr, dw_ptr, db_ptr, dp_ptr, dal_ptr, dbe_ptr, NP, H,
                       DK: tl.constexpr, NC: tl.constexpr, BLOCK: tl.constexpr):
        """Program (e, h): the five weight gradients of head h at elements e*BLOCK ..., each the
        sum of its partials in a fixed order, written in the parameters' dtype."""
        e, h = tl.program_id(0), tl.program_id(1)
        k = e * BLOCK + tl.arange(0, BLOCK)
        dw = tl.zeros((BLOCK,), tl.float32)
        dal = tl.zeros((BLOCK,), tl.float32)
        db = tl.zeros((BLOCK,), tl.float32)
        dp = tl.zeros((BLOCK,), tl.float32)
        dbe = tl.zeros((BLOCK,), tl.float32)
        for p in range(NP):
            for c in tl.static_range(NC):
                mm = mm_ptr + ((p * H + h) * NC + c) * 2 * DK * DK + k
                dw += tl.load(mm)
                dal += tl.load(mm + DK * DK)
            ew = ew_ptr + (p * H + h) * 3 * DK * DK + k
            db += tl.load(ew)
            dp += tl.load(ew + DK * DK)
            dbe += tl.load(ew + 2 * DK * DK)
        out = h * DK * DK + k
        tl.store(dw_ptr + out, dw.to(dw_ptr.dtype.element_ty))
        tl.store(db_ptr + out, db.to(db_ptr.dtype.element_ty))
        tl.store(dp_ptr + out, dp.to(dp_ptr.dtype.element_ty))
        tl.store(dal_ptr + out, dal.to(dal_ptr.dtype.element_ty))
        tl.store(dbe_ptr + out, dbe.to(dbe_ptr.dtype.element_ty))


@functools.lru_cache(maxsize=None)
def _programs(device: torch.device, B: int, heads: int) -> int:
    """NP, the backward's programs per head and column block (`heads` = H * DK / BN of them):
    ~PROGRAMS_PER_SM an SM in all, at most one per batch element. Fixed per device and shape,
    so the order of the batch sums is."""
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        return max(1, min(B, PROGRAMS_PER_SM * sms // heads))
    return max(1, min(B, 2))


def _contiguous(*params: Tensor) -> list:
    return [t.contiguous() for t in params]


@torch.library.custom_op("pldr::power_law", mutates_args=())
def power_law(a: Tensor, W: Tensor, b: Tensor, P: Tensor, alpha: Tensor, beta: Tensor,
              g_only: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(A_LM, A_P, G_LM) for A [B, h, dk, dk] and per-head weights [h, dk, dk], in the dtype
    autocast's power law gives (A's and the weights' promoted: fp32 under autocast).
    g_only: A_LM and A_P come back empty (not written: 2 x 25 MB a pldr-110m layer at mb 128)."""
    a = a.contiguous()
    B, H, dk, _ = a.shape
    dtype = torch.promote_types(a.dtype, b.dtype)
    g = torch.empty(a.shape, device=a.device, dtype=dtype)
    a_lm, a_p = (torch.empty((0,) if g_only else a.shape, device=a.device, dtype=dtype) for _ in range(2))
    if B * H:
        _power_law_fwd[(B * H,)](a, *_contiguous(W, b, P, alpha, beta), a_lm, a_p, g, H, DK=dk, STORE_ALL=not g_only,
                                 INTERP=_INTERP, num_warps=1 if _INTERP else FWD_WARPS)
    return a_lm, a_p, g


@power_law.register_fake
def _(a, W, b, P, alpha, beta, g_only):
    dtype = torch.promote_types(a.dtype, b.dtype)
    a_lm, a_p = (a.new_empty((0,) if g_only else a.shape, dtype=dtype) for _ in range(2))
    return a_lm, a_p, a.new_empty(a.shape, dtype=dtype)


@torch.library.custom_op("pldr::power_law_backward", mutates_args=())
def power_law_backward(dg: Tensor, d_lm: Optional[Tensor], d_p: Optional[Tensor], a: Tensor, W: Tensor, b: Tensor,
                       P: Tensor, alpha: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dA, dW, db, dP, dalpha, dbeta) from the gradients of G_LM and (if used) A_LM, A_P."""
    a, dg = a.contiguous(), dg.contiguous()
    d_lm = d_lm.contiguous() if d_lm is not None else None
    d_p = d_p.contiguous() if d_p is not None else None
    B, H, dk, _ = a.shape
    da = torch.empty_like(a)
    bn = min(dk, BN)
    NP = _programs(a.device, B, H * dk // bn)
    mm = torch.empty(NP, H, dk // bn, 2, dk, dk, device=a.device, dtype=torch.float32)
    ew = torch.empty(NP, H, 3, dk, dk, device=a.device, dtype=torch.float32)
    grads = [torch.empty_like(t) for t in (W, b, P, alpha, alpha)]
    if B * H == 0:
        return (da, *(g.zero_() for g in grads))
    _power_law_bwd[(NP, H, dk // bn)](a, *_contiguous(W, b, P, alpha), dg, d_lm if d_lm is not None else dg,
                                      d_p if d_p is not None else dg, da, mm, ew, B, H, NP,
                                      HAS_DLM=d_lm is not None, HAS_DAP=d_p is not None, DK=dk, BN=bn,
                                      INTERP=_INTERP, DROP=int(BREAK_DERIVATIVE), num_warps=1 if _INTERP else BWD_WARPS)
    block = min(dk * dk, 256)      # (1024: 56 programs for pldr-110m, 22 us a call on an H200)
    dw, db, dp, dal, dbe = grads
    _power_law_sum[(dk * dk // block, H)](mm, ew, dw, db, dp, dal, dbe, NP, H, DK=dk, NC=dk // bn, BLOCK=block)
    return (da, *grads)


@power_law_backward.register_fake
def _(dg, d_lm, d_p, a, W, b, P, alpha):
    return (torch.empty_like(a), *(torch.empty_like(t) for t in (W, b, P, alpha, alpha)))


def _setup(ctx, inputs, output):
    a, W, b, P, alpha, beta, _ = inputs
    ctx.save_for_backward(a, W, b, P, alpha)
    ctx.beta_dtype = beta.dtype
    ctx.set_materialize_grads(False)   # training uses G_LM alone: no zero-filled dA_LM, dA_P


def _backward(ctx, d_lm, d_p, dg):
    a, W, b, P, alpha = ctx.saved_tensors
    if dg is None:
        dg = torch.zeros_like(a, dtype=torch.promote_types(a.dtype, b.dtype))
    da, dw, db, dp, dal, dbe = power_law_backward(dg, d_lm, d_p, a, W, b, P, alpha)
    return da, dw, db, dp, dal, dbe.to(ctx.beta_dtype), None


power_law.register_autograd(_backward, setup_context=_setup)
