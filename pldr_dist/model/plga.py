"""Power Law Graph Attention (spec §3, PLGA layer).

The inductive path is ordinary rotary attention whose query is multiplied by the per-head
energy-curvature tensor G_LM; the deductive path computes G_LM from the density matrix
A0 = q~^T q~ through a metric learner and a per-head power law. Head counts are read from
the weights' shapes, so the same code runs on a tensor-parallel rank that owns a slice of
the heads.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .config import PLDRConfig
from .layers import GLU, apply_rotary, iswiglu

MASK_VALUE = -1e9  # the reference adds -1e9 (not -inf) at masked positions


class ResidualUnit(nn.Module):
    """A <- LayerNorm_dk(GLU_n(...GLU_1(A)...) + A)."""

    def __init__(self, cfg: PLDRConfig):
        super().__init__()
        self.glus = nn.ModuleList(GLU(cfg.head_dim, cfg.a_dff) for _ in range(cfg.glus_per_unit))
        self.norm = nn.LayerNorm(cfg.head_dim, eps=cfg.ln_eps)

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        y = a
        for glu in self.glus:
            y = glu(y)
        return self.norm(y + a)


class MetricLearner(nn.Module):
    """A = residual units applied to LayerNorm_dk(A0); weights shared by every head."""

    def __init__(self, cfg: PLDRConfig):
        super().__init__()
        self.in_norm = nn.LayerNorm(cfg.head_dim, eps=cfg.ln_eps)
        self.units = nn.ModuleList(ResidualUnit(cfg) for _ in range(cfg.num_residual_units))

    def forward(self, a0: torch.Tensor) -> torch.Tensor:
        a = self.in_norm(a0)
        for unit in self.units:
            a = unit(a)
        return a


class PowerLaw(nn.Module):
    """Per-head tensors W, b, P, alpha, beta [h, dk, dk] mapping A to A_LM, A_P and G_LM."""

    def __init__(self, cfg: PLDRConfig):
        super().__init__()
        shape = (cfg.num_heads, cfg.head_dim, cfg.head_dim)
        self.W = nn.Parameter(torch.empty(shape))
        self.b = nn.Parameter(torch.empty(shape))
        self.P = nn.Parameter(torch.empty(shape))
        self.alpha = nn.Parameter(torch.empty(shape))
        self.beta = nn.Parameter(torch.empty(shape))

    def forward(self, a: torch.Tensor):
        a_lm = iswiglu(torch.matmul(self.W, a) + self.b) + 1e-9   # > 0, so the power is real
        a_p = torch.pow(a_lm, self.P)                               # element-wise power law
        g_lm = torch.matmul(self.alpha, a_p) + self.beta            # per-head matrix product
        return a_lm, a_p, g_lm


@dataclass
class LayerCache:
    """One layer's inference state: KV-cache [k~, v, A] and G-cache [A_LM, G_LM] (spec §6)."""
    k: Optional[torch.Tensor] = None
    v: Optional[torch.Tensor] = None
    a: Optional[torch.Tensor] = None
    a_lm: Optional[torch.Tensor] = None
    g_lm: Optional[torch.Tensor] = None


def dag_penalty(x: torch.Tensor) -> torch.Tensor:
    """D(X) = |log(tr(expm(X * X)) / dk)|, mean over batch and heads (spec §5)."""
    tr = torch.linalg.matrix_exp(x * x).diagonal(dim1=-2, dim2=-1).sum(-1)
    return torch.log(tr / x.shape[-1]).abs().mean()


class PLGA(nn.Module):
    def __init__(self, cfg: PLDRConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.wq = nn.Linear(d, d)
        self.wk = nn.Linear(d, d)
        self.wv = nn.Linear(d, d)
        self.wo = nn.Linear(d, d)
        if cfg.learned_g:
            self.metric = MetricLearner(cfg)
            self.power = PowerLaw(cfg)
        else:
            eye = torch.eye(cfg.head_dim).expand(cfg.num_heads, -1, -1).clone()
            self.register_buffer("G_fixed", eye)
        # Set True only when G_fixed is known to be the identity (benchmarks' plain-SDPA
        # upper bound): the q@G product is then skipped. Never saved; off by default.
        self.skip_identity_g = False
        # cos/sin table (`layers.rotary_cache`), set by the fast training path; not saved.
        self.register_buffer("rope_cache", None, persistent=False)

    # -- deductive path ---------------------------------------------------------------
    def metric_output(self, q_rot: torch.Tensor) -> torch.Tensor:
        """A from the rotated queries: A0 sums over every position (no mask, spec §3.3)."""
        a0 = torch.matmul(q_rot.transpose(-1, -2), q_rot)
        return self.metric(a0)

    def deductive(self, q_rot: torch.Tensor):
        """(A, A_LM, A_P, G_LM) for rotated queries [B, h, S, dk]."""
        a = self.metric_output(q_rot)
        return (a, *self.power(a))

    # -- forward ----------------------------------------------------------------------
    def forward(self, x: torch.Tensor, offset: int = 0, bias: Optional[torch.Tensor] = None,
                cache: Optional[LayerCache] = None, use_kv: bool = False, use_g: bool = False):
        """x [B, S, d] -> (output [B, S, d], DAG penalty or None).

        bias: additive mask [B, 1, S, S_total] or None for plain causal (offset 0, no padding)
        or no mask (a single new query that may attend everything cached).
        """
        q, k, v = self.project(x, offset)
        if cache is not None and use_kv:
            if cache.k is not None:
                k = torch.cat((cache.k, k), dim=2)
                v = torch.cat((cache.v, v), dim=2)
            cache.k, cache.v = k, v

        penalty = None
        if not self.cfg.learned_g:
            g_lm = self.G_fixed.to(q.dtype)         # DeepSpeed's bf16 casts parameters, not buffers
        elif cache is not None and use_g and cache.g_lm is not None:
            g_lm = cache.g_lm                       # G-cache: the deductive network is skipped
        else:
            if cache is not None and use_kv and cache.a is not None:
                a = cache.a                         # KV-cache keeps A from the prompt
            else:
                a = self.metric_output(q)
            a_lm, a_p, g_lm = self.power(a)
            if cache is not None:
                if use_kv and cache.a is None:
                    cache.a = a
                if use_g:
                    cache.a_lm, cache.g_lm = a_lm, g_lm
            if self.cfg.mode == "v510_dag" and self.training:
                c_a, c_p, c_g = self.cfg.dag_coeffs
                terms = [c * dag_penalty(t) for c, t in ((c_a, a_lm), (c_p, a_p), (c_g, g_lm)) if c > 0]
                penalty = sum(terms) if terms else None

        q_g = q if self.skip_identity_g and not self.cfg.learned_g else torch.matmul(q, g_lm)
        return self.merge_heads(self.attend(q_g, k, v, bias)), penalty

    def project(self, x: torch.Tensor, offset) -> tuple:
        """x [B, S, d] -> rotated q~, k~ and v, each [B, h, S, dk]; offset: int or 0-dim tensor."""
        dk = self.cfg.head_dim
        q, k, v = self.wq(x), self.wk(x), self.wv(x)
        B, S = q.shape[:2]   # the projections' shape: under sequence parallelism x holds a slice of S
        q, k, v = (t.view(B, S, -1, dk).transpose(1, 2) for t in (q, k, v))
        q = apply_rotary(q, offset, self.cfg.rope_base, self.cfg.rope_style, self.rope_cache)
        k = apply_rotary(k, offset, self.cfg.rope_base, self.cfg.rope_style, self.rope_cache)
        return q, k, v

    def merge_heads(self, h: torch.Tensor) -> torch.Tensor:
        """Attention output [B, h, S, dk] -> W_O applied to the concatenated heads [B, S, d]."""
        B, _, S, _ = h.shape
        return self.wo(h.transpose(1, 2).reshape(B, S, -1))

    def attend(self, q_g: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               bias: Optional[torch.Tensor]) -> torch.Tensor:
        """softmax((q~ G) k~^T / sqrt(dk) + bias) v, fused through SDPA or written out."""
        causal = bias is None and q_g.shape[-2] > 1
        if self.cfg.attention == "sdpa":
            return F.scaled_dot_product_attention(q_g, k, v, attn_mask=bias, is_causal=causal)
        scores = torch.matmul(q_g, k.transpose(-1, -2)) / math.sqrt(q_g.shape[-1])
        if causal:
            S = scores.shape[-1]
            look_ahead = torch.ones(S, S, dtype=torch.bool, device=scores.device).triu(1)
            scores = scores + MASK_VALUE * look_ahead.to(scores.dtype)
        elif bias is not None:
            scores = scores + bias
        return torch.matmul(torch.softmax(scores, dim=-1), v)
