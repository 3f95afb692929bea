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
from .interchange import GLU_ROLES, from_interchange, has_per_glu_names
from .layers import apply_rotary, density, glu, iswiglu

MASK_VALUE = -1e9  # the reference adds -1e9 (not -inf) at masked positions


class MetricLearner(nn.Module):
    """A = R residual units applied to LayerNorm_dk(A0), each A <- LayerNorm_dk(GLU_n(...GLU_1(A)...) + A);
    weights shared by every head.

    The units' weights are stored stacked, one tensor per role for the whole learner
    (u1_weight [R, n, a, dk], u1_bias [R, n, a], ..., norm_weight [R, dk]): a few large
    parameters instead of 6*R*n + 2*R small ones, which is what DeepSpeed's per-parameter work
    and a fused kernel want. Files keep one tensor per GLU (`interchange.py`); loading accepts
    either naming.
    """

    def __init__(self, cfg: PLDRConfig):
        super().__init__()
        R, n, a, dk = cfg.num_residual_units, cfg.glus_per_unit, cfg.a_dff, cfg.head_dim
        self.eps = cfg.ln_eps
        self._shape = (R, n)
        self.in_norm = nn.LayerNorm(dk, eps=cfg.ln_eps)
        for role, (out_f, in_f) in (("u1", (a, dk)), ("u2", (a, dk)), ("u3", (dk, a))):
            self.register_parameter(f"{role}_weight", nn.Parameter(torch.empty(R, n, out_f, in_f)))
            self.register_parameter(f"{role}_bias", nn.Parameter(torch.empty(R, n, out_f)))
        self.norm_weight = nn.Parameter(torch.ones(R, dk))
        self.norm_bias = nn.Parameter(torch.zeros(R, dk))
        self.reset_default()   # as the per-GLU nn.Linear constructors did (the same RNG draws)
        self._register_load_state_dict_pre_hook(_stack_per_glu_names)

    @property
    def shape(self) -> tuple:
        """(R, n): residual units, GLUs per unit (kept apart from the weights: ZeRO-3 empties them)."""
        return self._shape

    def glu_weights(self, r: int, j: int) -> tuple:
        """(U1, c1, U2, c2, U3, c3) of GLU j of unit r (views of the stacked tensors)."""
        return tuple(getattr(self, f"{role}_{p}")[r, j] for role in GLU_ROLES for p in ("weight", "bias"))

    def glu(self, y: torch.Tensor, r: int, j: int) -> torch.Tensor:
        return glu(y, *self.glu_weights(r, j))

    def forward(self, a0: torch.Tensor) -> torch.Tensor:
        a = self.in_norm(a0)
        R, n = self.shape
        for r in range(R):
            y = a
            for j in range(n):
                y = self.glu(y, r, j)
            a = F.layer_norm(y + a, a.shape[-1:], self.norm_weight[r], self.norm_bias[r], self.eps)
        return a

    @torch.no_grad()
    def reset_default(self) -> None:
        """PyTorch's nn.Linear default init, GLU by GLU in the per-GLU module order the model
        had: the global RNG is consumed exactly as before the stacking (so a seed gives the
        same model), although `reset_xavier` overwrites the values."""
        R, n = self.shape
        for r in range(R):
            for j in range(n):
                for role in GLU_ROLES:
                    w, b = getattr(self, f"{role}_weight")[r, j], getattr(self, f"{role}_bias")[r, j]
                    nn.init.kaiming_uniform_(w, a=math.sqrt(5))
                    bound = 1 / math.sqrt(w.shape[1])
                    nn.init.uniform_(b, -bound, bound)
        nn.init.ones_(self.norm_weight)
        nn.init.zeros_(self.norm_bias)

    @torch.no_grad()
    def reset_xavier(self) -> None:
        """The reference's weights_init on every GLU linear (xavier_uniform weight, zero bias)."""
        R, n = self.shape
        for r in range(R):
            for j in range(n):
                for role in GLU_ROLES:
                    nn.init.xavier_uniform_(getattr(self, f"{role}_weight")[r, j])
                    nn.init.zeros_(getattr(self, f"{role}_bias")[r, j])


def _stack_per_glu_names(state_dict, prefix, *args) -> None:
    """load_state_dict pre-hook: a state dict with the per-GLU file names loads as well."""
    mine = {k: v for k, v in state_dict.items() if k.startswith(prefix)}
    if not has_per_glu_names(mine):
        return
    for k in mine:
        del state_dict[k]
    state_dict.update(from_interchange(mine))


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

    def forward(self, a: torch.Tensor, g_only: bool = False):
        """(A_LM, A_P, G_LM). g_only: the caller uses G_LM alone (training without the DAG
        penalty), so a fast implementation (`fast.FastPowerLaw`) may return None for the other
        two instead of writing them; this one computes all three either way."""
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
    """D(X) = |log(tr(expm(X * X)) / dk)|, mean over batch and heads (spec §5).

    Computed in at least fp32: torch's CPU matrix_exp is wrong in bf16 (expm(0) came back with
    -1.3e30 on its diagonal), which made a bf16 v510_dag run's loss NaN."""
    work = x.to(torch.promote_types(x.dtype, torch.float32))
    tr = torch.linalg.matrix_exp(work * work).diagonal(dim1=-2, dim2=-1).sum(-1)
    return torch.log(tr / x.shape[-1]).abs().mean().to(x.dtype)


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
    def metric_output(self, a0: torch.Tensor) -> torch.Tensor:
        """A from A0 = q~^T q~, which sums over every position (no mask, spec §3.3)."""
        return self.metric(a0)

    def gram(self, q_rot: torch.Tensor) -> torch.Tensor:
        """A0 = q~^T q~ [B, h, dk, dk] (the fast path computes it with a Triton op)."""
        return density(q_rot)

    def times_g(self, q: torch.Tensor, g_lm: torch.Tensor) -> torch.Tensor:
        """q~ G_LM per batch element and head (the fast path computes it with a Triton op)."""
        return torch.matmul(q, g_lm)

    def deductive(self, q_rot: torch.Tensor):
        """(A, A_LM, A_P, G_LM) for rotated queries [B, h, S, dk]."""
        a = self.metric_output(self.gram(q_rot))
        return (a, *self.power(a))

    # -- forward ----------------------------------------------------------------------
    def forward(self, x: torch.Tensor, offset: int = 0, bias: Optional[torch.Tensor] = None,
                cache: Optional[LayerCache] = None, use_kv: bool = False, use_g: bool = False):
        """x [B, S, d] -> (output [B, S, d], DAG penalty or None).

        bias: additive mask [B, 1, S, S_total] or None for plain causal (offset 0, no padding)
        or no mask (a single new query that may attend everything cached).
        """
        g_cached = cache is not None and use_g and cache.g_lm is not None
        a_cached = cache is not None and use_kv and cache.a is not None
        q, k, v, a0 = self.project(x, offset, with_a0=self.cfg.learned_g and not g_cached and not a_cached)
        if cache is not None and use_kv:
            if cache.k is not None:
                k = torch.cat((cache.k, k), dim=2)
                v = torch.cat((cache.v, v), dim=2)
            cache.k, cache.v = k, v

        penalty = None
        if not self.cfg.learned_g:
            g_lm = self.G_fixed.to(q.dtype)         # DeepSpeed's bf16 casts parameters, not buffers
        elif g_cached:
            g_lm = cache.g_lm                       # G-cache: the deductive network is skipped
        else:
            if a_cached:
                a = cache.a                         # KV-cache keeps A from the prompt
            else:
                a = self.metric_output(a0)
            dag = self.cfg.mode == "v510_dag" and self.training
            a_lm, a_p, g_lm = self.power(a, g_only=cache is None and not dag)
            if cache is not None:
                if use_kv and cache.a is None:
                    cache.a = a
                if use_g:
                    cache.a_lm, cache.g_lm = a_lm, g_lm
            if dag:
                c_a, c_p, c_g = self.cfg.dag_coeffs
                terms = [c * dag_penalty(t) for c, t in ((c_a, a_lm), (c_p, a_p), (c_g, g_lm)) if c > 0]
                penalty = sum(terms) if terms else None

        q_g = q if self.skip_identity_g and not self.cfg.learned_g else self.times_g(q, g_lm)
        return self.merge_heads(self.attend(q_g, k, v, bias)), penalty

    def project(self, x: torch.Tensor, offset, with_a0: bool = False) -> tuple:
        """x [B, S, d] -> rotated q~, k~ and v, each [B, h, S, dk], and A0 = q~^T q~ if with_a0
        (else None); offset: int or 0-dim tensor."""
        dk = self.cfg.head_dim
        q, k, v = self.wq(x), self.wk(x), self.wv(x)
        B, S = q.shape[:2]   # the projections' shape: under sequence parallelism x holds a slice of S
        q, k, v = (t.view(B, S, -1, dk).transpose(1, 2) for t in (q, k, v))
        q, a0 = self.rotate_queries(q, offset, with_a0)
        k = apply_rotary(k, offset, self.cfg.rope_base, self.cfg.rope_style, self.rope_cache)
        return q, k, v, a0

    def rotate_queries(self, q: torch.Tensor, offset, with_a0: bool) -> tuple:
        """(q~, A0 = q~^T q~ if with_a0 else None); the fast path does both in one pass over q."""
        q = apply_rotary(q, offset, self.cfg.rope_base, self.cfg.rope_style, self.rope_cache)
        return q, (self.gram(q) if with_a0 else None)

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
