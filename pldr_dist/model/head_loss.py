"""The output head and the cross-entropy as one autograd step, for the fast training path.

Why: at pldr-110m's micro-batch 64 the logits are [65,536 x 32,000] (4.2 GB in bf16), and the
compiled `lm_loss` passed over them ~5 times a step (two passes for the log-softmax, one for
its backward, one more for the head's bias gradient), ~7 ms of a ~110 ms step on the H100.
Here
- the forward runs the head (one GEMM) and one Triton pass that keeps only each row's
  log-sum-exp and loss;
- the backward writes softmax - onehot, scaled by the incoming gradient / token count, over
  the logits in place (one read, one write), and gets the bias gradient from the weight
  gradient's GEMM by appending a column of ones to the hidden states (no pass of its own).

`PLDRModel.forward(tokens, targets=...)` calls it, so the loss is the model's output: inside
DeepSpeed's engine forward, whose backward hooks on the output must fire before any parameter
gradient (applied outside, after the model returned hidden states, the head's gradients
arrived before DeepSpeed's bf16 optimizer had begun its backward, and training went wrong).

Numerics are those of `lm_loss(F.linear(h, W, b), targets)` in the compute dtype: the same
GEMMs, the log-softmax in fp32, one rounding of the gradient to the compute dtype, the bias
gradient summed in the GEMM's fp32 accumulator. Targets equal to pad_id are ignored. One
outside the vocabulary makes the loss and the gradients NaN (the trainer then skips the step
and stops after `train.max_nonfinite_in_row`), where F.cross_entropy would stop the GPU. The
backward can run once per forward (the logits are overwritten); a second one raises. Without
Triton on the device (CPU without the interpreter) the plain path runs.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

# Triton is imported where its kernels can run: a CUDA (or ROCm) build of torch, or Triton's CPU
# interpreter. Every model imports this module, and on CPU builds the import was ~0.4 s of each
# process's start-up for kernels that never run there.
if torch.version.cuda or torch.version.hip or os.environ.get("TRITON_INTERPRET") == "1":
    from .glu_kernel import available, triton
else:
    triton = None

    def available(x: torch.Tensor) -> bool:
        return False

if triton is not None:
    import triton.language as tl

BLOCK_V = 4096   # vocabulary entries per step of a row's loop (the gradient pass)
# The log-sum-exp pass: 2048 entries a step at 8 warps read pldr-110m mb 128's logits
# ([130,944 x 32,000] bf16) in 2.96 ms against 3.57 at (4096, 4 warps): 2.84 against 2.35 TB/s
# (H100; 8192 entries or 16 warps were slower). The gradient pass is ~2.9 TB/s at every setting.
LSE_BLOCK_V, LSE_WARPS = 2048, 8


if triton is not None:
    @triton.jit
    def _row_lse(logits_ptr, targets_ptr, lse_ptr, loss_ptr, stride, PAD, V: tl.constexpr, BLOCK: tl.constexpr):
        """Row r: lse = log sum exp(logits[r]) and loss = lse - logits[r, target] (0 for pad).
        Each lane keeps its own running max and sum; they are combined once at the end."""
        row = tl.program_id(0).to(tl.int64)
        base = logits_ptr + row * stride
        cols = tl.arange(0, BLOCK)
        m = tl.full((BLOCK,), -1e30, tl.float32)   # finite: lanes never written add exp(-inf) = 0
        s = tl.zeros((BLOCK,), tl.float32)
        for start in range(0, V, BLOCK):
            x = tl.load(base + start + cols, mask=start + cols < V, other=-float("inf")).to(tl.float32)
            m_new = tl.maximum(m, x)
            s = s * tl.exp(m - m_new) + tl.exp(x - m_new)
            m = m_new
        top = tl.max(m, axis=0)
        lse = top + tl.log(tl.sum(s * tl.exp(m - top), axis=0))
        t = tl.load(targets_ptr + row)
        valid = (t != PAD) & (t >= 0) & (t < V)
        x_t = tl.load(base + t, mask=valid, other=0.0).to(tl.float32)
        tl.store(lse_ptr + row, lse)
        # a pad target adds 0; one outside the vocabulary makes the loss NaN (F.cross_entropy
        # would stop with an error; here that would cost a host sync), so it cannot pass unseen
        tl.store(loss_ptr + row, tl.where(valid, lse - x_t, tl.where(t == PAD, 0.0, float("nan"))))

    @triton.jit
    def _row_grad(logits_ptr, targets_ptr, lse_ptr, scale_ptr, stride, PAD, V: tl.constexpr, BLOCK: tl.constexpr):
        """logits[r] <- (softmax(logits[r]) - onehot(target)) * scale, or 0 for a pad target."""
        row = tl.program_id(0).to(tl.int64)
        base = logits_ptr + row * stride
        cols = tl.arange(0, BLOCK)
        t = tl.load(targets_ptr + row)
        lse = tl.load(lse_ptr + row)
        valid = (t != PAD) & (t >= 0) & (t < V)
        scale = tl.where(valid, tl.load(scale_ptr), tl.where(t == PAD, 0.0, float("nan")))   # as the loss
        for start in range(0, V, BLOCK):
            mask = start + cols < V
            x = tl.load(base + start + cols, mask=mask, other=0.0).to(tl.float32)
            g = (tl.exp(x - lse) - tl.where(start + cols == t, 1.0, 0.0)) * scale
            tl.store(base + start + cols, g.to(logits_ptr.dtype.element_ty), mask=mask)


def row_lse(logits: torch.Tensor, targets: torch.Tensor, pad_id: int) -> tuple:
    """(log-sum-exp, loss) of each row of logits [rows, V] (fp32 [rows] each), in one pass."""
    rows, vocab = logits.shape
    lse = torch.empty(rows, device=logits.device, dtype=torch.float32)
    loss_rows = torch.empty_like(lse)
    _row_lse[(rows,)](logits, targets, lse, loss_rows, logits.stride(0), pad_id, V=vocab, BLOCK=LSE_BLOCK_V,
                      num_warps=LSE_WARPS)
    return lse, loss_rows


def compute_dtype(weight: torch.Tensor) -> torch.dtype:
    """The dtype x @ weight runs in: autocast's (bf16/fp16) where it is on, else the weights'."""
    device = weight.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return weight.dtype


class _HeadLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, bias, targets, pad_id):
        dtype = compute_dtype(weight)
        with torch.autocast(h.device.type, enabled=False):
            x = h.reshape(-1, h.shape[-1]).to(dtype)
            w = weight.to(dtype)
            logits = torch.addmm(bias.to(dtype), x, w.t())
        t = targets.reshape(-1).contiguous()
        lse, loss_rows = row_lse(logits, t, pad_id)
        count = (t != pad_id).sum()
        ctx.save_for_backward(x, w, logits, lse, t, count)
        ctx.pad_id, ctx.h_meta, ctx.dtypes, ctx.spent = pad_id, (h.shape, h.dtype), (weight.dtype, bias.dtype), False
        return loss_rows.sum() / count

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.spent:
            raise RuntimeError("head_loss: a second backward through the same forward (the logits were "
                               "overwritten by the first); run the forward again")
        ctx.spent = True
        x, w, logits, lse, t, count = ctx.saved_tensors
        rows, vocab = logits.shape
        scale = (grad_loss.float() / count).reshape(1)
        _row_grad[(rows,)](logits, t, lse, scale, logits.stride(0), ctx.pad_id, V=vocab, BLOCK=BLOCK_V)
        grad = logits                                   # now d loss / d logits
        dx = grad @ w
        # [x | 1 | 0 x 7]: the ones column's product is the bias gradient, the zeros keep rows aligned
        x1 = torch.cat((x, x.new_ones(rows, 1), x.new_zeros(rows, 7)), dim=1)
        dwb = grad.t() @ x1
        (h_shape, h_dtype), (w_dtype, b_dtype) = ctx.h_meta, ctx.dtypes
        d = x.shape[1]
        return (dx.view(h_shape).to(h_dtype), dwb[:, :d].to(w_dtype).contiguous(),
                dwb[:, d].to(b_dtype).contiguous(), None, None)


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, pad_id: int = 0) -> torch.Tensor:
    """Mean next-token cross-entropy over non-pad targets (targets equal to pad are excluded)."""
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return F.cross_entropy(logits.flatten(0, -2), targets.flatten(), ignore_index=pad_id)


def head_loss(h: torch.Tensor, head: nn.Linear, targets: torch.Tensor, pad_id: int = 0) -> torch.Tensor:
    """lm_loss(head(h), targets, pad_id) for final hidden states h [B, S, d]."""
    if available(h):
        return _HeadLoss.apply(h, head.weight, head.bias, targets, pad_id)
    return lm_loss(F.linear(h, head.weight, head.bias), targets, pad_id)
