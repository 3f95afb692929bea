"""Batched generation with KV-cache and G-cache (spec §6).

Prompts of different lengths are left-padded with the pad id; padded keys stay masked at
every step. Cache modes: "kv+g" (the paper's fast path), "kv", "g" (re-runs the sequence
but keeps G_LM from the prompt) and "none" (recomputes everything, so G_LM follows the
growing sequence and outputs may differ, as the spec explains).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

from ..model import InferenceCache, PLDRModel

CACHE_MODES = {"kv+g": (True, True), "kv": (True, False), "g": (False, True), "none": None}


@dataclass
class SamplingConfig:
    max_new_tokens: int = 32
    temperature: float = 0.0      # 0 = greedy
    top_k: int = 0                # 0 = off
    top_p: float = 1.0            # 1 = off
    stop_at_eos: bool = True
    seed: Optional[int] = None
    vocab_limit: int = 0          # > 0: only ids below it (a tokenizer with fewer pieces than the model's vocab)


@dataclass
class Generation:
    tokens: list                  # per prompt: the generated ids (without the prompt)
    step_logits: list = field(default_factory=list)  # per step [B, V] (when asked)
    cache: Optional[InferenceCache] = None


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device=None) -> torch.Tensor:
    width = max(len(p) for p in prompts)
    if width == 0:
        raise ValueError("every prompt is empty: give at least one token (e.g. the end-of-sequence id)")
    out = torch.full((len(prompts), width), pad_id, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        if len(p):
            out[i, width - len(p):] = torch.as_tensor(list(p), dtype=torch.long, device=device)
    return out


def sample_next(logits: torch.Tensor, cfg: SamplingConfig, generator=None) -> torch.Tensor:
    """Greedy, or temperature / top-k / top-p sampling from logits [B, V]. With cfg.vocab_limit
    the ids a tokenizer cannot decode are never chosen: a model's vocabulary may be larger than
    its tokenizer's (the trainer accepts that), and those rows of the head are untrained, not
    absent."""
    if 0 < cfg.vocab_limit < logits.shape[-1]:
        logits = logits[..., :cfg.vocab_limit]
    if cfg.temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / cfg.temperature
    if cfg.top_k > 0:
        kth = torch.topk(logits, min(cfg.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = torch.softmax(sorted_logits, -1)
        drop = probs.cumsum(-1) - probs > cfg.top_p   # keep the smallest set reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = torch.softmax(logits, -1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model: PLDRModel, prompts: Sequence[Sequence[int]], sampling: SamplingConfig = None,
             cache_mode: str = "kv+g", keep_logits: bool = False,
             on_step: Optional[Callable[[int, torch.Tensor], None]] = None,
             g_init: Optional[Sequence[torch.Tensor]] = None, static: Optional[bool] = None) -> Generation:
    """Generate continuations for a batch of token-id prompts.

    static: decode the steps after the prompt with fixed-shape caches (infer/static_decode.py),
    replayed as a CUDA graph on a GPU. Default: on for "kv+g" on CUDA. Same outputs.
    on_step(step, new_tokens [B]) is called after every step, for streaming output.
    g_init: per layer G_LM [h, dk, dk] to pre-fill the G-cache with (a G computed once from
    another source, e.g. a G-cache artifact), instead of the G_LM of each prompt.
    """
    sampling = sampling or SamplingConfig()
    if cache_mode not in CACHE_MODES:
        raise ValueError(f"cache_mode={cache_mode!r} is unknown (choose one of {', '.join(CACHE_MODES)})")
    cfg = model.cfg
    device = next(model.parameters()).device
    head = getattr(model, "head", None)
    if getattr(head, "gather_output", None) is False:   # a tensor-parallel head: sample from all logits
        from ..parallel.tensor_parallel import full_logits
        with full_logits(model):
            return generate(model, prompts, sampling, cache_mode, keep_logits, on_step, g_init, static=False)
    generator = None
    if sampling.seed is not None:
        generator = torch.Generator(device=device).manual_seed(sampling.seed)
    seq = left_pad(prompts, cfg.pad_id, device)
    flags = CACHE_MODES[cache_mode]
    cache = InferenceCache(cfg.num_layers, *flags) if flags else None
    if g_init is not None:
        if cache is None or not cache.use_g:
            raise ValueError(f"g_init needs a G-cache (cache_mode 'kv+g' or 'g'), not {cache_mode!r}")
        for layer_cache, g in zip(cache.layers, g_init):
            layer_cache.g_lm = g.to(device, next(model.parameters()).dtype).expand(len(prompts), *g.shape)
    if static is None:
        static = cache_mode == "kv+g" and device.type == "cuda"
    if static and cache_mode != "kv+g":
        raise ValueError(f"static decoding needs cache_mode 'kv+g', not {cache_mode!r}")
    decoder = None
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    out, step_logits = [], []
    feed = seq
    for step in range(sampling.max_new_tokens):
        if decoder is not None:
            logits = decoder.step(feed)
        else:
            logits = model(feed, cache=cache)[:, -1]
            if static and sampling.max_new_tokens > 1:
                from .static_decode import StaticDecoder
                decoder = StaticDecoder(model, cache, seq.shape[1] + sampling.max_new_tokens)
        if keep_logits:
            step_logits.append(logits.clone())
        nxt = sample_next(logits, sampling, generator)
        nxt = torch.where(done, torch.full_like(nxt, cfg.pad_id), nxt)
        out.append(nxt)
        if on_step is not None:
            on_step(step, nxt)
        if sampling.stop_at_eos:
            done |= nxt.eq(cfg.eos_id)
            if bool(done.all()):
                break
        seq = torch.cat((seq, nxt[:, None]), dim=1)
        feed = nxt[:, None] if cache is not None and cache.use_kv else seq
    gen = torch.stack(out, 1).tolist() if out else [[] for _ in prompts]
    tokens = []
    for row in gen:
        kept = []
        for t in row:
            if t == cfg.pad_id:
                break
            kept.append(t)
            if sampling.stop_at_eos and t == cfg.eos_id:
                break
        tokens.append(kept)
    return Generation(tokens=tokens, step_logits=step_logits, cache=cache)
