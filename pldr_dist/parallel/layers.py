"""Tensor-parallel layers, each built FROM the full single-process layer by slicing its
weights for this rank, so the full weights are the same whatever the TP size. Parameter
names (`weight`, `bias`) are kept, so a rank's state dict is a slice of the full one.
Sharded parameters carry `tensor_model_parallel = True` and `partition_dim`, which DeepSpeed
reads to count them once in gradient norms.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from .mappings import (allreduce_grads, copy_to_tp, gather_last_dim, gather_seq, reduce_from_tp,
                       reduce_scatter_seq)


# FFN shards are padded on CUDA only: there it aligns bf16 rows for cuBLAS's fast kernels
# (tensor_parallel.FFN_SHARD_ALIGN); on the CPU it buys nothing and would change fp32 rounding
# against the TP = 1 model. Tests set this to run the padded path on the CPU.
PAD_ON_CPU = False


def _pad_width(width: int, pad_to: int, weight: torch.Tensor) -> int:
    if not pad_to or not (weight.is_cuda or PAD_ON_CPU):
        return 0
    return -width % pad_to


def shard_parameter(full: torch.Tensor, dim: int, rank: int, size: int) -> nn.Parameter:
    """This rank's contiguous block along `dim` (torch.tensor_split: sizes may differ by one, which
    the FFN needs: the paper's d_ff = 2389 is prime)."""
    part = nn.Parameter(torch.tensor_split(full.detach(), size, dim=dim)[rank].clone(), requires_grad=full.requires_grad)
    part.tensor_model_parallel, part.partition_dim = True, dim
    return part


class SharedRegionEntry:
    """Column-parallel layers that read the same input (Wq, Wk, Wv; FFN w1, w2) enter the
    tensor-parallel region ONCE, as Megatron's fused QKV layer does: one all-gather (sequence
    parallel) or one backward all-reduce (copy_to_tp) instead of one per layer. The first layer
    applies the entry and keeps the result; siblings given the same tensor reuse it, and
    autograd sums their gradients before the single backward collective."""

    def __init__(self):
        self.source, self.entered = None, None

    def __call__(self, x, group, sequence_parallel: bool):
        if x is not self.source:
            self.source = x
            self.entered = gather_seq(x, group) if sequence_parallel else copy_to_tp(x, group)
        return self.entered


class ColumnParallelLinear(nn.Module):
    """Y = X A^T + b with A split by output rows: each rank computes its slice of the outputs."""

    def __init__(self, full: nn.Linear, group, rank: int, size: int, gather_output: bool = False,
                 sequence_parallel: bool = False, shared_entry: SharedRegionEntry | None = None,
                 pad_to: int = 0):
        super().__init__()
        self.group, self.gather_output, self.sequence_parallel = group, gather_output, sequence_parallel
        self.shared_entry = shared_entry or SharedRegionEntry()
        self.weight = shard_parameter(full.weight, 0, rank, size)
        self.bias = shard_parameter(full.bias, 0, rank, size) if full.bias is not None else None
        self.pad_to = pad_to

    def forward(self, x):
        x = self.shared_entry(x, self.group, self.sequence_parallel)
        weight, bias = self.weight, self.bias
        pad = _pad_width(weight.shape[0], self.pad_to, weight)
        if pad:   # zero output columns, so the output rows are aligned (see parallelize)
            weight = F.pad(weight, (0, 0, 0, pad))
            bias = F.pad(bias, (0, pad)) if bias is not None else None
        y = F.linear(x, weight, bias)
        return gather_last_dim(y, self.group) if self.gather_output else y


class RowParallelLinear(nn.Module):
    """Y = X A^T + b with A split by input columns: partial sums reduced over the group; the bias
    (replicated) is added once after the reduction."""

    def __init__(self, full: nn.Linear, group, rank: int, size: int, sequence_parallel: bool = False,
                 pad_to: int = 0):
        super().__init__()
        self.group, self.sequence_parallel = group, sequence_parallel
        self.weight = shard_parameter(full.weight, 1, rank, size)
        self.bias = nn.Parameter(full.bias.detach().clone()) if full.bias is not None else None
        self.pad_to = pad_to

    def forward(self, x):
        weight = self.weight
        pad = _pad_width(weight.shape[1], self.pad_to, weight)
        if pad:   # zero input columns, meeting the padded columns of a ColumnParallelLinear's output
            weight = F.pad(weight, (0, pad))
        y = F.linear(x, weight)
        if self.sequence_parallel:
            y = reduce_scatter_seq(y, self.group)
            bias = allreduce_grads(self.group, [self.bias])[0] if self.bias is not None else None
        else:
            y, bias = reduce_from_tp(y, self.group), self.bias
        return y + bias if bias is not None else y


class VocabParallelEmbedding(nn.Module):
    """Each rank holds a contiguous block of the vocabulary; tokens outside it look up zeros and
    the partial embeddings are summed over the group."""

    def __init__(self, full: nn.Embedding, group, rank: int, size: int, sequence_parallel: bool = False):
        super().__init__()
        self.group, self.sequence_parallel = group, sequence_parallel
        self.weight = shard_parameter(full.weight, 0, rank, size)
        self.start = rank * self.weight.shape[0]
        self.end = self.start + self.weight.shape[0]

    def forward(self, tokens):
        outside = (tokens < self.start) | (tokens >= self.end)
        local = (tokens - self.start).masked_fill(outside, 0)
        out = F.embedding(local, self.weight).masked_fill(outside[..., None], 0.0)
        return reduce_scatter_seq(out, self.group) if self.sequence_parallel else reduce_from_tp(out, self.group)


class _SharedGradients:
    """Mixin for a replicated module whose every rank sees only part of the work (its heads,
    or its slice of the sequence): gradients are summed over the TP group in ONE coalesced
    all-reduce per forward. The module keeps its class's forward and its parameter names."""

    def forward(self, *args, **kwargs):
        if self._tp_inside:
            return super().forward(*args, **kwargs)
        names, params = zip(*self.named_parameters())
        shared = allreduce_grads(self._tp_group, params)
        self._tp_inside = True
        try:
            return functional_call(self, dict(zip(names, shared)), args, kwargs)
        finally:
            self._tp_inside = False


def share_gradients(module: nn.Module, group) -> nn.Module:
    """Turn `module` (in place) into its gradient-sharing twin."""
    cls = module.__class__
    if not issubclass(cls, _SharedGradients):
        module.__class__ = type(f"TPShared{cls.__name__}", (_SharedGradients, cls), {})
    module._tp_group, module._tp_inside = group, False
    for p in module.parameters():
        p.tp_shared_gradient = True
    return module
