"""Fixed-G models built from a trained learned-G model (spec §7: v510Gi and frozen-G checks).

A v510G copy keeps every weight of the source model except the deductive network (metric
learner and W, b, P, alpha, beta) and uses a fixed G_LM per layer instead.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .model import PLDRModel


def fixed_g_copy(model: PLDRModel, g_lm: Sequence[torch.Tensor]) -> PLDRModel:
    """A v510G model with `model`'s weights whose layer i uses the fixed G_LM g_lm[i].

    g_lm[i] is [h, dk, dk], or [B, h, dk, dk] to freeze a different G per batch row (e.g. the
    G-cache of a batch of prompts). The weights are copied, so the two models are independent.
    """
    if len(g_lm) != model.cfg.num_layers:
        raise ValueError(f"g_lm has {len(g_lm)} tensors; the model has num_layers={model.cfg.num_layers}")
    cfg = model.cfg.replace(mode="v510G", fixed_g="external")
    with torch.device("meta"):          # no random init: every tensor is loaded below
        fixed = PLDRModel(cfg)
    wanted = fixed.state_dict()
    state = {k: v.detach().clone() for k, v in model.state_dict().items() if k in wanted}
    missing, _ = fixed.load_state_dict(state, strict=False, assign=True)
    if any(not k.endswith("attn.G_fixed") for k in missing):
        raise ValueError(f"source model lacks weights {missing} needed by the fixed-G model")
    for layer, g in zip(fixed.layers, g_lm):
        layer.attn.G_fixed = g.detach().clone()
    return fixed.train(model.training)


@torch.no_grad()
def inference_only_from(model: PLDRModel, tokens: Optional[Sequence[int]] = None) -> PLDRModel:
    """v510Gi: G_LM computed once from `tokens` (default: the single end-of-sequence token,
    the reference's encoding of an empty prompt), then frozen into a v510G copy."""
    if not model.cfg.learned_g:
        raise ValueError("inference_only_from needs a learned-G model (mode v510 or v510_dag)")
    tokens = [model.cfg.eos_id] if tokens is None else list(tokens)
    device = next(model.parameters()).device
    outs = model.deductive_outputs(torch.tensor([tokens], device=device))
    return fixed_g_copy(model, [g_lm[0] for _, _, g_lm in outs])
