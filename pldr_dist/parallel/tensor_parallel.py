"""Apply Megatron-style tensor parallelism to a plain PLDRModel, from outside (torchtitan's way).

Build the full model from the seed, then `parallelize(model, grid)`: every rank keeps its slice
of each split weight, so runs and checkpoints are comparable across TP sizes. The split
(spec §10): Wq, Wk, Wv column-parallel (heads), Wo row-parallel; per-head W, b, P, alpha, beta
(or a fixed G) split by heads; the metric learner, shared by all heads, kept whole with its
gradients summed over the group (each rank runs it on its own heads only); FFN w1, w2 column /
w3 row; LayerNorms replicated (their gradients summed too under sequence parallelism);
embedding and output head vocab-parallel. The PLGA code itself is unchanged: it reads its head
count from the weights' shapes, so its KV- and G-caches hold only the rank's heads.

Checkpoint naming: parameter names equal the single-process model's; `tp_partition_dim(name)`
says along which dimension a tensor is split (None = replicated).
"""
from __future__ import annotations

import contextlib
import re

import torch
import torch.distributed as dist
from torch import nn

from ..model import PLDRModel
from .grid import check_layout
from .layers import (ColumnParallelLinear, RowParallelLinear, SharedRegionEntry, VocabParallelEmbedding,
                     share_gradients, shard_parameter)

_RULES = [  # (suffix pattern, split dim)
    (r"embed\.tokens\.weight$", 0),
    (r"attn\.w[qkv]\.(weight|bias)$", 0),
    (r"attn\.wo\.weight$", 1),
    (r"attn\.power\.(W|b|P|alpha|beta)$", 0),
    (r"attn\.G_fixed$", 0),
    (r"ffn\.w[12]\.(weight|bias)$", 0),
    (r"ffn\.w3\.weight$", 1),
    (r"head\.(weight|bias)$", 0),
]


# On CUDA the FFN's hidden shards are computed zero-padded to a multiple of this width. d_ff is odd in the
# presets (2389, 5461), so its shards are too (pldr-1b at TP=2: 2731 and 2730): their bf16 rows
# are not 16-byte aligned and cuBLAS falls back to slow kernels for all nine FFN products (48% of
# a TP=2 step's GPU time on an H100, docs/multi_gpu.md). Padded units are silu(0) * 0 = 0 and meet
# zero columns of w3, so the result is the same; the parameters keep their shapes.
FFN_SHARD_ALIGN = 64


def tp_partition_dim(name: str):
    """The dimension along which the tensor `name` is split over TP ranks, or None if replicated."""
    for pattern, dim in _RULES:
        if re.search(pattern, name):
            return dim
    return None


def parallelize(model: PLDRModel, grid, sequence_parallel: bool = False) -> PLDRModel:
    cfg = model.cfg
    check_layout(grid.world_size, grid.tp, grid.pp, cfg.num_heads, cfg.vocab_size, cfg.num_layers)
    if grid.tp == 1:
        return model
    g, r, t, sp = grid.tp_group, grid.tp_rank, grid.tp, sequence_parallel
    model.embed.tokens = VocabParallelEmbedding(model.embed.tokens, g, r, t, sp)
    for layer in model.layers:
        attn = layer.attn
        qkv_input = SharedRegionEntry()
        for name in ("wq", "wk", "wv"):
            setattr(attn, name, ColumnParallelLinear(getattr(attn, name), g, r, t, sequence_parallel=sp,
                                                     shared_entry=qkv_input))
        attn.wo = RowParallelLinear(attn.wo, g, r, t, sequence_parallel=sp)
        if cfg.learned_g:
            for name in ("W", "b", "P", "alpha", "beta"):
                setattr(attn.power, name, shard_parameter(getattr(attn.power, name), 0, r, t))
            share_gradients(attn.metric, g)
        else:
            attn.G_fixed = torch.tensor_split(attn.G_fixed, t, dim=-3)[r].clone()
        ffn_input = SharedRegionEntry()
        layer.ffn.w1 = ColumnParallelLinear(layer.ffn.w1, g, r, t, sequence_parallel=sp, shared_entry=ffn_input,
                                            pad_to=FFN_SHARD_ALIGN)
        layer.ffn.w2 = ColumnParallelLinear(layer.ffn.w2, g, r, t, sequence_parallel=sp, shared_entry=ffn_input,
                                            pad_to=FFN_SHARD_ALIGN)
        layer.ffn.w3 = RowParallelLinear(layer.ffn.w3, g, r, t, sequence_parallel=sp, pad_to=FFN_SHARD_ALIGN)
        if sp:
            share_gradients(layer.norm1, g)
            share_gradients(layer.norm2, g)
    if sp:
        share_gradients(model.embed.norm, g)
    model.head = ColumnParallelLinear(model.head, g, r, t, gather_output=False, sequence_parallel=sp)
    model.tp_group = g
    return model


@contextlib.contextmanager
def full_logits(model: nn.Module):
    """Inside this block a TP model's head gathers the whole vocabulary (for generation)."""
    head = getattr(model, "head", None)
    before = getattr(head, "gather_output", None)
    if before is not None:
        head.gather_output = True
    try:
        yield model
    finally:
        if before is not None:
            head.gather_output = before


def gather_full_state_dict(state: dict, group) -> dict:
    """This rank's state dict -> the full tensors with the single-process names (every rank)."""
    size = dist.get_world_size(group)
    out = {}
    for name, tensor in state.items():
        dim = tp_partition_dim(name)
        if dim is None or size == 1:
            out[name] = tensor.detach().clone()
            continue
        if name.endswith("G_fixed"):
            dim = tensor.dim() - 3
        out[name] = _gather_uneven(tensor.detach(), dim, group, size)
    return out


def shard_full_state_dict(full: dict, tp_rank: int, tp_size: int) -> dict:
    """Full tensors -> the slice rank `tp_rank` of `tp_size` holds."""
    out = {}
    for name, tensor in full.items():
        dim = tp_partition_dim(name)
        if name.endswith("G_fixed") and dim is not None:
            dim = tensor.dim() - 3
        out[name] = tensor if dim is None or tp_size == 1 else torch.tensor_split(tensor, tp_size, dim=dim)[tp_rank].clone()
    return out


def _gather_uneven(tensor: torch.Tensor, dim: int, group, size: int) -> torch.Tensor:
    """all_gather along `dim` when ranks hold blocks whose lengths differ (tensor_split)."""
    lengths = [torch.zeros(1, dtype=torch.long, device=tensor.device) for _ in range(size)]
    dist.all_gather(lengths, torch.tensor([tensor.shape[dim]], device=tensor.device), group=group)
    lengths = [int(n) for n in lengths]
    longest = max(lengths)
    pad = list(tensor.shape)
    pad[dim] = longest - tensor.shape[dim]
    padded = torch.cat((tensor, tensor.new_zeros(pad)), dim=dim).contiguous()
    parts = [torch.empty_like(padded) for _ in range(size)]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([p.narrow(dim, 0, n) for p, n in zip(parts, lengths)], dim=dim)
