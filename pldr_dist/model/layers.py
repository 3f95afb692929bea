"""Building blocks shared by the decoder: rotary embedding, SwiGLU feed-forward, GLU."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


def rotary_tables(positions: torch.Tensor, head_dim: int, base: float, dtype: torch.dtype):
    """cos/sin of theta_i = p * base^(-2i/dk) for each position p, shape [S, dk/2].

    Computed in at least fp32 (fp64 when the activations are fp64) so that rotary phases at
    long positions do not lose precision in bf16.
    """
    work = torch.promote_types(dtype, torch.float32)
    inv_freq = base ** (-torch.arange(0, head_dim, 2, device=positions.device, dtype=work) / head_dim)
    angles = positions.to(work)[:, None] * inv_freq[None, :]
    return angles.cos(), angles.sin()


def _full_width(cos: torch.Tensor, sin: torch.Tensor, style: str):
    """[S, dk/2] cos/sin -> [S, dk] multipliers C, S' with rotate(x) = x * C + swap(x) * S'."""
    if style == "interleaved":
        return cos.repeat_interleave(2, dim=-1), torch.stack((-sin, sin), dim=-1).flatten(-2)
    return torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1)


def _swap(x: torch.Tensor, style: str) -> torch.Tensor:
    """The partner of each element: (x1, x0, x3, x2, ...) interleaved, (x_h, x_0) halves."""
    if style == "interleaved":
        return x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)
    return x.roll(x.shape[-1] // 2, dims=-1)


class _Density(torch.autograd.Function):
    """A0 = q~^T q~ per batch element and head, with its backward written as one product.

    Why: autograd's backward of matmul(q~^T, q~) is q~ dA0 plus (dA0 q~^T)^T, the second a
    transposed [dk, S] result that the compiled layer then read across its rows while adding
    it to the rest of dq~ (an elementwise kernel of ~1 ms per pldr-110m layer at micro-batch 64
    on an H100, against ~0.2 ms for the bytes it moves). q~ (dA0 + dA0^T) is the same gradient
    in one product (half the FLOPs), written in q~'s own layout."""

    @staticmethod
    def forward(ctx, q: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(q)
        return torch.matmul(q.transpose(-1, -2), q)

    @staticmethod
    def backward(ctx, da0: torch.Tensor) -> torch.Tensor:
        (q,) = ctx.saved_tensors
        return torch.matmul(q, (da0 + da0.transpose(-1, -2)).to(q.dtype))


def density(q: torch.Tensor) -> torch.Tensor:
    """A0 = q~^T q~ over every position of q~ [..., S, dk] (spec §3.3): [..., dk, dk]."""
    return _Density.apply(q)


def rotary_cache(length: int, head_dim: int, base: float, style: str, device) -> torch.Tensor:
    """fp32 [length, dk, 2]: the multipliers C and S' of positions 0..length-1, for
    `apply_rotary(cache=)`.

    Why: compiled, the table is otherwise recomputed inside the rotation kernels, a pow, cos
    and sin for every element of q and k (B*h times per position); that made rotary ~6% of a
    pldr-110m training step on the H100. Loaded from memory it is a few hundred KB in L2.
    """
    cos, sin = rotary_tables(torch.arange(length, device=device), head_dim, base, torch.float32)
    return torch.stack(_full_width(cos, sin, style), dim=-1)


def apply_rotary(x: torch.Tensor, offset, base: float, style: str,
                 cache: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Rotate x [B, h, S, dk] at positions offset..offset+S-1.

    `offset` is an int, or a 0-d tensor on x's device (the graph-captured decoder keeps the
    position on the GPU), or a 1-d tensor of S positions (context parallelism: a rank's tokens
    are two chunks of the sequence). "interleaved" rotates pairs (2i, 2i+1) together (GPT-J / torchtune
    style, PLDR v51, the spec); "half" rotates (i, i + dk/2) together (GPT-NeoX style, the
    authors' v52 models). Written as x * C + swap(x) * S' (C = cos, S' = -sin / +sin per
    element): one element-wise expression whose backward is one too, where slicing out the
    pairs made the compiled backward scatter into zeros. `cache` (from `rotary_cache`, same
    style) supplies C and S' for an int offset inside it when the work dtype is fp32;
    otherwise they are computed here.
    """
    S, dk = x.shape[-2], x.shape[-1]
    work = torch.promote_types(x.dtype, torch.float32)
    table = cache is not None and cache.dtype == work
    if isinstance(offset, torch.Tensor) and offset.dim() == 1:
        positions = offset                   # explicit positions (a context-parallel slice)
        c, s = cache[positions].unbind(-1) if table else _full_width(
            *rotary_tables(positions, dk, base, x.dtype), style)
    elif table and isinstance(offset, int) and offset + S <= cache.shape[0]:
        c, s = cache[offset:offset + S].unbind(-1)
    else:
        positions = torch.arange(S, device=x.device) + offset
        c, s = _full_width(*rotary_tables(positions, dk, base, x.dtype), style)
    xf = x.to(c.dtype)
    return (xf * c + _swap(xf, style) * s).to(x.dtype)


class SwiGLU(nn.Module):
    """FFN(x) = W3(silu(W1 x + b1) * (W2 x + b2)) + b3 (spec §3)."""

    def __init__(self, d_in: int, d_hidden: int):
        super().__init__()
        self.w1 = nn.Linear(d_in, d_hidden)
        self.w2 = nn.Linear(d_in, d_hidden)
        self.w3 = nn.Linear(d_hidden, d_in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w3(F.silu(self.w1(x)) * self.w2(x))


def glu(y: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor,
        w3: torch.Tensor, b3: torch.Tensor) -> torch.Tensor:
    """One metric-learner GLU, U3(silu(U1 y + c1) * (U2 y + c2)) + c3, applied to matrix rows."""
    return F.linear(F.silu(F.linear(y, w1, b1)) * F.linear(y, w2, b2), w3, b3)


def iswiglu(y: torch.Tensor) -> torch.Tensor:
    """y * silu(y) = y^2 sigma(y) >= 0: keeps A_LM non-negative so A_LM ** P is real."""
    return y * F.silu(y)
