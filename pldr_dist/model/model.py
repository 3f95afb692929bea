"""The PLDR-LLM decoder (spec §3), in the order the data flows through it.

Plain single-process PyTorch: no process groups, no launcher logic. `pldr_dist.parallel`
turns it into a tensor/pipeline-parallel model by swapping layers, without changing the
code paths below.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from .config import PLDRConfig
from .head_loss import head_loss, lm_loss  # noqa: F401  (lm_loss: re-exported)
from .interchange import to_interchange
from .layers import SwiGLU, apply_rotary
from .plga import MASK_VALUE, PLGA, LayerCache, MetricLearner
from .recompute import run_layer


class Embedding(nn.Module):
    """e = LayerNorm(Emb(x) * sqrt(d)); no positional embedding (rotary lives in PLGA)."""

    def __init__(self, cfg: PLDRConfig):
        super().__init__()
        self.scale = math.sqrt(cfg.d_model)
        self.tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.norm = nn.LayerNorm(cfg.d_model, eps=cfg.ln_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.tokens(x) * self.scale)


class DecoderLayer(nn.Module):
    """Post-LN block: out1 = LN(PLGA(x) + x); out2 = LN(FFN(out1) + out1)."""

    def __init__(self, cfg: PLDRConfig):
        super().__init__()
        self.attn = PLGA(cfg)
        self.norm1 = nn.LayerNorm(cfg.d_model, eps=cfg.ln_eps)
        self.ffn = SwiGLU(cfg.d_model, cfg.d_ff)
        self.norm2 = nn.LayerNorm(cfg.d_model, eps=cfg.ln_eps)

    recompute = "none"     # activation recompute in training (recompute.py); set per run

    def forward(self, x, offset=0, bias=None, cache=None, use_kv=False, use_g=False):
        if cache is None and self.recompute != "none":
            return run_layer(self.recompute, self._forward, x, offset, bias)
        return self._forward(x, offset, bias, cache, use_kv, use_g)

    def _forward(self, x, offset=0, bias=None, cache=None, use_kv=False, use_g=False):
        a, penalty = self.attn(x, offset, bias, cache, use_kv, use_g)
        return self.after_attention(a, x), penalty

    def after_attention(self, a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The post-LN residual blocks around the attention output a and the FFN."""
        h = self.norm1(a + x)
        return self.norm2(self.ffn(h) + h)


def attention_bias(key_pad: Optional[torch.Tensor], offset: int, num_queries: int,
                   dtype: torch.dtype) -> Optional[torch.Tensor]:
    """Additive mask [B, 1, Sq, Sk]: -1e9 where key j is in the future of query i or is padding.

    Returns None when SDPA's own causal mask (prefill, no padding) or no mask at all (one new
    token, no padding) gives the same result, so the fused kernels stay available.
    """
    if key_pad is None or not bool(key_pad.any()):
        if offset == 0 or num_queries == 1:
            return None
    num_keys = offset + num_queries
    device = key_pad.device if key_pad is not None else None
    q_pos = torch.arange(offset, num_keys, device=device)[:, None]
    k_pos = torch.arange(num_keys, device=device)[None, :]
    masked = (k_pos > q_pos)[None, None]
    if key_pad is not None:
        masked = masked | key_pad[:, None, None, :num_keys]
    return masked.to(dtype) * MASK_VALUE


class InferenceCache:
    """Per-layer KV/G caches plus the key padding mask of everything seen so far."""

    def __init__(self, num_layers: int, use_kv: bool = True, use_g: bool = True):
        self.use_kv, self.use_g = use_kv, use_g
        self.layers = [LayerCache() for _ in range(num_layers)]
        self.key_pad: Optional[torch.Tensor] = None
        self.length = 0  # tokens whose keys/values are cached

    def g_lm(self) -> list:
        return [c.g_lm for c in self.layers]


class PLDRModel(nn.Module):
    def __init__(self, cfg: PLDRConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = Embedding(cfg)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size)  # untied, with bias
        # True for training on packed sequences that hold no pad tokens: skips the padding
        # check (a host sync) so the step never waits on the GPU. Not saved; off by default.
        self.assume_unpadded = False
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The reference's initialisation (spec §4), in module order, from the global RNG."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                module.reset_parameters()  # PyTorch default; kept for Wv unless fixed_wv_init
            if isinstance(module, MetricLearner):
                module.reset_default()
            if isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.embed.tokens.weight, 0.0, 1.0)
        xavier = [self.head]
        for layer in self.layers:
            attn = layer.attn
            xavier += [attn.wq, attn.wk, attn.wo, layer.ffn.w1, layer.ffn.w2, layer.ffn.w3]
            if self.cfg.fixed_wv_init:
                xavier.append(attn.wv)
            if self.cfg.learned_g:
                xavier.append(attn.metric)     # its GLUs, in their order (as the reference's modules)
                for name in ("W", "P", "alpha"):
                    nn.init.xavier_normal_(getattr(attn.power, name))
                nn.init.zeros_(attn.power.b)
                nn.init.zeros_(attn.power.beta)
            elif self.cfg.fixed_g == "random":
                nn.init.xavier_normal_(attn.G_fixed)
        for linear in xavier:
            if isinstance(linear, MetricLearner):
                linear.reset_xavier()
                continue
            nn.init.xavier_uniform_(linear.weight)
            nn.init.zeros_(linear.bias)

    def interchange_state_dict(self) -> dict:
        """state_dict() under the names and shapes every file format uses (one tensor per
        metric-learner GLU: `interchange.py`); `load_state_dict` accepts it as it is."""
        return to_interchange(self.state_dict())

    def forward(self, tokens: torch.Tensor, cache: Optional[InferenceCache] = None,
                key_pad: Optional[torch.Tensor] = None, return_penalty: bool = False,
                targets: Optional[torch.Tensor] = None):
        """tokens [B, S] -> logits [B, S, V] (and the DAG penalty when asked); with targets
        [B, S], the mean cross-entropy `lm_loss(logits, targets)` instead, computed with the
        head as one step (`head_loss`: fused on the GPU, the logits never kept in fp32).

        Without a cache, padding is read from the tokens (pad id). With a cache, `tokens` are
        the new tokens only and `key_pad` their padding; positions continue from the cache.
        """
        offset = cache.length if cache is not None and cache.use_kv else 0
        if key_pad is None and not (self.assume_unpadded and cache is None):
            key_pad = tokens.eq(self.cfg.pad_id)
        if cache is not None and cache.use_kv:
            if cache.key_pad is not None:
                key_pad = torch.cat((cache.key_pad, key_pad), dim=1)
            cache.key_pad = key_pad
            cache.length += tokens.shape[1]
        h = self.embed(tokens)
        bias = attention_bias(key_pad, offset, tokens.shape[1], h.dtype)
        penalty = None
        use_kv = cache is not None and cache.use_kv
        use_g = cache is not None and cache.use_g
        for i, layer in enumerate(self.layers):
            layer_cache = cache.layers[i] if cache is not None else None
            h, p = layer(h, offset, bias, layer_cache, use_kv, use_g)
            if p is not None:
                penalty = p if penalty is None else penalty + p
        out = self.head(h) if targets is None else head_loss(h, self.head, targets, self.cfg.pad_id)
        if return_penalty:
            if penalty is not None:
                penalty = penalty / len(self.layers)
            return out, penalty
        return out

    @torch.no_grad()
    def deductive_outputs(self, tokens: torch.Tensor) -> list:
        """Per layer (A_LM, A_P, G_LM) [B, h, dk, dk] for a batch, from a full forward."""
        if not self.cfg.learned_g:
            return [(None, None, layer.attn.G_fixed) for layer in self.layers]
        outs = []
        h = self.embed(tokens)
        bias = attention_bias(tokens.eq(self.cfg.pad_id), 0, tokens.shape[1], h.dtype)
        for layer in self.layers:
            _, q_rot = _rotated_queries(layer.attn, h)
            _, a_lm, a_p, g_lm = layer.attn.deductive(q_rot)
            outs.append((a_lm, a_p, g_lm))
            h, _ = layer(h, 0, bias)
        return outs


def _rotated_queries(attn: PLGA, x: torch.Tensor):
    B, S, _ = x.shape
    q = attn.wq(x).view(B, S, -1, attn.cfg.head_dim).transpose(1, 2)
    return q, apply_rotary(q, 0, attn.cfg.rope_base, attn.cfg.rope_style)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
