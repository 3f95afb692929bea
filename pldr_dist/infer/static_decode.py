"""KV+G decoding with fixed shapes, so one decode step can be replayed as a CUDA graph.

A 110M PLDR-LLM decoding one token at batch 1 does ~0.2 GFLOP: on a GPU the step is bound by
kernel launches and Python, not by the arithmetic. With the G-cache the deductive network is
gone and every step runs the same kernels on the same shapes, if the KV-cache does not grow:
here it is preallocated to `max_len` positions and the new key/value are written in place at
the current position (a tensor on the device), attention sees all `max_len` keys through a
boolean mask of the valid ones. `torch.cuda.CUDAGraph` then captures the step once and
replays it per token.

Same maths as the dynamic path (`PLDRModel.forward` with an `InferenceCache`): masked keys get
exactly zero weight in both, so logits agree to rounding (tested in fp64 on the CPU, where
the step runs eagerly). Prefill stays on the dynamic path.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..model import InferenceCache, PLDRModel


class StaticDecoder:
    """Decode steps after a KV+G prefill: `step(tokens [B, 1]) -> logits [B, V]`."""

    def __init__(self, model: PLDRModel, cache: InferenceCache, max_len: int, cuda_graph: Optional[bool] = None):
        if not (cache.use_kv and cache.use_g) and model.cfg.learned_g:
            raise ValueError("StaticDecoder needs a prefilled KV+G cache (cache_mode 'kv+g')")
        if max_len < cache.length:
            raise ValueError(f"max_len={max_len} is shorter than the prompt ({cache.length} tokens)")
        self.model, cfg = model, model.cfg
        first = cache.layers[0]
        B, h, P, dk = first.k.shape
        device, dtype = first.k.device, first.k.dtype
        self.keys, self.values, self.g = [], [], []
        for layer, c in zip(model.layers, cache.layers):
            k = torch.zeros(B, h, max_len, dk, device=device, dtype=dtype)
            v = torch.zeros_like(k)
            k[:, :, :P], v[:, :, :P] = c.k, c.v
            self.keys.append(k)
            self.values.append(v)
            attn = layer.attn
            if cfg.learned_g:
                self.g.append(c.g_lm.expand(B, h, dk, dk).contiguous())
            else:
                self.g.append(None if attn.skip_identity_g else attn.G_fixed)
        self.valid = torch.zeros(B, max_len, dtype=torch.bool, device=device)   # keys a query may attend
        self.valid[:, :P] = ~cache.key_pad if cache.key_pad is not None else True
        self.position = torch.tensor(P, device=device)
        self.next_position, self.max_len = P, max_len                          # host copy: no sync
        self.pad_id = cfg.pad_id
        self.tokens = torch.zeros(B, 1, dtype=torch.long, device=device)      # the step's input
        self.logits: Optional[torch.Tensor] = None
        self.graph = None
        if cuda_graph if cuda_graph is not None else device.type == "cuda":
            self._capture()

    @torch.no_grad()
    def _forward(self) -> torch.Tensor:
        """One token for every row at `self.position`; advances the position."""
        pos = self.position
        self.valid.index_copy_(1, pos.view(1), self.tokens.ne(self.pad_id))   # a fed pad stays masked
        mask = self.valid[:, None, None, :]
        x = self.model.embed(self.tokens)
        for layer, k_all, v_all, g in zip(self.model.layers, self.keys, self.values, self.g):
            q, k, v, _ = layer.attn.project(x, pos)
            k_all.index_copy_(2, pos.view(1), k)        # in place: the cache keeps its shape
            v_all.index_copy_(2, pos.view(1), v)
            q_g = q if g is None else torch.matmul(q, g)
            out = F.scaled_dot_product_attention(q_g, k_all, v_all, attn_mask=mask)
            x = layer.after_attention(layer.attn.merge_heads(out), x)
        self.position.add_(1)
        return self.model.head(x)[:, -1]

    def _capture(self) -> None:
        """Warm up on a side stream (as torch.cuda.graphs requires), then capture one step.
        The warm-up steps wrote nothing that matters: the position and mask are restored."""
        position, valid = self.position.clone(), self.valid.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._forward()
                self.position.copy_(position)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._forward()
        self.position.copy_(position)
        self.valid.copy_(valid)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed tokens [B, 1] at the next position; returns logits [B, V] (a buffer reused by the
        next step under a CUDA graph: clone to keep it)."""
        if self.next_position >= self.max_len:
            raise ValueError(f"the static cache holds {self.max_len} positions; raise max_len")
        self.next_position += 1
        self.tokens.copy_(tokens)
        if self.graph is None:
            return self._forward()
        self.graph.replay()
        return self.logits
