"""Context parallelism for PLGA: each rank of a context-parallel (CP) group holds a slice of
every sequence (docs/context_parallel.md).

Why PLGA splits so cheaply: its deductive path sees the sequence only through
A0 = sum_t q~_t q~_t^T (spec §3.3), a [B, h, dk, dk] sum over positions. Each rank sums its own
slice and one all-reduce gives every rank the whole sequence's A0 (its backward is the same
all-reduce: every rank used the sum). The metric learner and the power law then run on
identical inputs everywhere. The inductive path is causal attention with the query q~ G_LM: the
keys and values are all-gathered (backward: reduce-scatter) and each local query attends the
prefix up to its own global position. Gathering K/V costs O(S) memory per rank, like Llama 3's
all-gather context parallelism; the activations of everything else fall by 1/CP.

Load balance: with causal attention the end of a sequence costs more than its start, so the
sequence is cut into 2*CP chunks and rank r holds chunks r and 2*CP-1-r (Megatron-LM's
layout). Rotary positions follow the global token index.

Gradients: each rank's loss is the mean over its own tokens (all ranks hold the same number),
so the gradient of the whole sequence's mean loss is the mean of the ranks' gradients. That is
exactly data-parallel averaging, so the CP group joins the data-parallel group of DeepSpeed
(grid.py: gradients and ZeRO shards span dp x cp, as Megatron's dp_cp group does).

The model stays plain PyTorch: `enable_context_parallel` switches each PLGA module's class to
`ContextParallelPLGA` from outside, as tensor parallelism swaps layers.
"""
from __future__ import annotations

import torch
from torch import nn

from ..model.plga import MASK_VALUE, PLGA
from .mappings import gather_along, sum_everywhere


def chunk_order(cp: int) -> list:
    """The global chunk indices held by each rank, rank by rank: [[0, 2cp-1], [1, 2cp-2], ...]."""
    return [[r, 2 * cp - 1 - r] for r in range(cp)]


def local_slice(tokens: torch.Tensor, cp_rank: int, cp: int, dim: int = 1) -> torch.Tensor:
    """This rank's tokens of full sequences (dimension `dim` is the sequence): chunks r and
    2cp-1-r, concatenated. The sequence length must be a multiple of 2*cp."""
    if cp == 1:
        return tokens
    chunks = tokens.chunk(2 * cp, dim=dim)
    return torch.cat([chunks[g] for g in chunk_order(cp)[cp_rank]], dim=dim)


def local_positions(local_len: int, cp_rank: int, cp: int, device=None) -> torch.Tensor:
    """Global positions of this rank's `local_len` tokens (two chunks)."""
    c = local_len // 2
    return torch.cat([torch.arange(g * c, (g + 1) * c, device=device) for g in chunk_order(cp)[cp_rank]])


def restore_order(x: torch.Tensor, cp: int, dim: int) -> torch.Tensor:
    """All ranks' slices, gathered rank after rank along `dim` -> the sequence in global order."""
    pieces = x.chunk(2 * cp, dim=dim)            # rank r's two chunks sit at 2r and 2r+1
    slot = {g: 2 * r + i for r, gs in enumerate(chunk_order(cp)) for i, g in enumerate(gs)}
    return torch.cat([pieces[slot[g]] for g in range(2 * cp)], dim=dim)


class ContextParallelPLGA(PLGA):
    """PLGA over a sequence slice; set cp_group, cp_rank, cp_size (enable_context_parallel)."""

    cp_group = None
    cp_rank = 0
    cp_size = 1

    def forward(self, x, offset=0, bias=None, cache=None, use_kv=False, use_g=False):
        if cache is not None or not isinstance(offset, int) or offset:
            raise ValueError("context parallelism is for training: no inference caches, no offset")
        if bias is not None:
            raise ValueError("context parallelism trains on packed sequences without padding (the attention "
                             "mask is built from global positions); set model.assume_unpadded=True")
        return super().forward(x, offset, bias, cache, use_kv, use_g)

    def project(self, x: torch.Tensor, offset, with_a0: bool = False) -> tuple:
        positions = self._positions(x.shape[1], x.device)
        return super().project(x, positions, with_a0)

    def _positions(self, local_len: int, device) -> torch.Tensor:
        cached = getattr(self, "_cp_positions", None)
        if cached is None or cached.shape[0] != local_len or cached.device != device:
            cached = local_positions(local_len, self.cp_rank, self.cp_size, device)
            self._cp_positions = cached
        return cached

    def metric_output(self, a0: torch.Tensor) -> torch.Tensor:
        """a0 is this slice's share of the sum over positions."""
        return self.metric(sum_everywhere(a0, self.cp_group))

    def attend(self, q_g, k, v, bias):
        """Each local chunk attends the keys of the whole sequence up to its global position."""
        cp = self.cp_size
        k_all = restore_order(gather_along(k, 2, self.cp_group), cp, dim=2)
        v_all = restore_order(gather_along(v, 2, self.cp_group), cp, dim=2)
        c = q_g.shape[2] // 2
        outs = []
        for i, g in enumerate(chunk_order(cp)[self.cp_rank]):
            end = (g + 1) * c
            q_pos = torch.arange(g * c, end, device=q_g.device)
            future = torch.arange(end, device=q_g.device)[None, :] > q_pos[:, None]
            mask = (future.to(q_g.dtype) * MASK_VALUE)[None, None]
            outs.append(super().attend(q_g[:, :, i * c:(i + 1) * c], k_all[:, :, :end], v_all[:, :, :end], mask))
        return torch.cat(outs, dim=2)


def enable_context_parallel(model: nn.Module, group, cp_rank: int, cp_size: int) -> nn.Module:
    """Every PLGA module of `model` (whole, tensor-parallel or a pipeline stage's) attends over
    its rank's sequence slice. Inputs are then `local_slice` of full sequences."""
    if cp_size == 1:
        return model
    for module in model.modules():
        if isinstance(module, PLGA):
            module.__class__ = ContextParallelPLGA
            module.cp_group, module.cp_rank, module.cp_size = group, cp_rank, cp_size
    if hasattr(model, "assume_unpadded"):
        model.assume_unpadded = True
    return model


class SlicedBatches:
    """A token loader whose batches {"input", "target"} [B, S] come as this rank's slices
    [B, S / cp]; everything else (position, state_dict) is the loader's, so checkpoints do not
    depend on cp."""

    def __init__(self, loader, cp_rank: int, cp_size: int):
        self.loader, self.cp_rank, self.cp_size = loader, cp_rank, cp_size

    def __iter__(self):
        for batch in self.loader:
            yield {k: local_slice(v, self.cp_rank, self.cp_size) for k, v in batch.items()}

    def __getattr__(self, name):
        return getattr(self.loader, name)
