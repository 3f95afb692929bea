"""Model FLOPs from the spec's formula (spec §9; a multiply-add counts 2 FLOPs).

Used for TFLOP/s and MFU in training logs and benchmarks. Attention scores are counted
non-causal by default (PaLM's MFU convention); `causal=True` counts the causal half.
Element-wise work (softmax, LayerNorm, rotary, the power law itself) is not counted.
"""
from __future__ import annotations

from .config import PLDRConfig

H100_BF16_PEAK = 989e12   # H100 SXM dense bf16 FLOP/s


def forward_breakdown(cfg: PLDRConfig, seq_len: int, causal: bool = False) -> dict:
    """Forward FLOPs per token, by term (per-sequence terms divided by seq_len)."""
    d, dk, h, S, L = cfg.d_model, cfg.head_dim, cfg.num_heads, seq_len, cfg.num_layers
    terms = {
        "qkvo_projections": 8 * d * d,
        "attention": (2 if causal else 4) * S * d,
        "q_times_G": 2 * d * dk,
        "ffn": 6 * d * cfg.d_ff,
    }
    if cfg.learned_g:
        terms["A0"] = 2 * d * dk
        per_seq = 6 * cfg.num_residual_units * cfg.glus_per_unit * cfg.a_dff * dk * dk * h
        terms["metric_learner"] = per_seq / S
        terms["power_law_matmuls"] = 4 * dk ** 3 * h / S
    out = {k: L * v for k, v in terms.items()}
    out["output_head"] = 2 * d * cfg.vocab_size
    return out


def flops_per_token(cfg: PLDRConfig, seq_len: int, training: bool = True, causal: bool = False) -> float:
    """FLOPs per token: forward, or training (3x forward: forward + backward)."""
    fwd = sum(forward_breakdown(cfg, seq_len, causal).values())
    return 3 * fwd if training else fwd


def mfu(tokens_per_second: float, cfg: PLDRConfig, seq_len: int, peak: float = H100_BF16_PEAK) -> float:
    """Model FLOPs utilisation of one device."""
    return tokens_per_second * flops_per_token(cfg, seq_len) / peak
