"""The autograd communication functions of Megatron-style tensor parallelism.

Each is a pair (forward op, backward op) over the tensor-parallel group:
  copy_to_tp          identity      / all-reduce     (enter a column-parallel region)
  reduce_from_tp      all-reduce    / identity       (leave a row-parallel region)
  gather_last_dim     all-gather    / split          (full logits for generation)
  gather_seq          all-gather    / reduce-scatter (sequence parallel: enter a column region)
  reduce_scatter_seq  reduce-scatter / all-gather    (sequence parallel: leave a row region)
  allreduce_grads     identity      / all-reduce of the gradients of replicated parameters that
                                      each rank uses on its own heads or sequence slice (one
                                      coalesced all-reduce for a whole module)
and two for context parallelism (the group is then the context-parallel group):
  sum_everywhere      all-reduce    / all-reduce     (a sum over the ranks' sequence slices that
                                                      every rank then uses: PLGA's A0)
  gather_along        all-gather    / reduce-scatter (any dimension: keys and values [B, h, S, dk])
The sequence dimension of the tensor-parallel functions is 1 (activations are [B, S, d]).
"""
from __future__ import annotations

from collections import Counter

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

SEQ_DIM = 1
COMM_BYTES: Counter = Counter()   # collective -> bytes of its full (unsplit) payload, for benchmarks


def _count(op: str, x: torch.Tensor, factor: int = 1) -> None:
    # Not while torch.compile traces a layer: a global counter is a side effect dynamo refuses
    # in an autograd.Function (docs/tensor_parallel.md, compiled TP layers).
    if not torch.compiler.is_compiling():
        COMM_BYTES[op] += x.numel() * x.element_size() * factor


def _size(group) -> int:
    return dist.get_world_size(group)


def _all_gather(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    _count("all_gather", x, _size(group))
    x = x.contiguous()   # collectives write buffers in memory order: give them contiguous ones
    parts = [torch.empty_like(x) for _ in range(_size(group))]
    dist.all_gather(parts, x, group=group)
    return torch.cat(parts, dim=dim)


def _split(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    return x.chunk(_size(group), dim=dim)[dist.get_rank(group)].contiguous()


def _reduce_scatter(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    if dim == SEQ_DIM or dist.get_backend(group) != "nccl":
        _count("reduce_scatter", x)
    if dist.get_backend(group) == "nccl" and dim == 0:
        # A contiguous output: NCCL writes it in memory order. (empty_like of a chunk of a
        # transposed view is dense but permuted, and the result came back scrambled.)
        x = x.contiguous()
        out = x.new_empty((x.shape[0] // _size(group), *x.shape[1:]))
        dist.reduce_scatter_tensor(out, x, group=group)
        return out
    if dist.get_backend(group) == "nccl":
        return _reduce_scatter(x.movedim(dim, 0), 0, group).movedim(0, dim).contiguous()
    x = x.contiguous().clone()       # gloo has no reduce-scatter: all-reduce, keep our slice
    dist.all_reduce(x, group=group)
    return _split(x, dim, group)


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        _count("all_reduce", grad)
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        x = x.contiguous()
        _count("all_reduce", x)
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _GatherLastDim(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_gather(x, -1, group)

    @staticmethod
    def backward(ctx, grad):
        return _split(grad, -1, ctx.group), None


class _GatherSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_gather(x, SEQ_DIM, group)

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter(grad, SEQ_DIM, ctx.group), None


class _ReduceScatterSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _reduce_scatter(x, SEQ_DIM, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather(grad, SEQ_DIM, ctx.group), None


class _ScatterSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split(x, SEQ_DIM, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather(grad, SEQ_DIM, ctx.group), None


class _AllReduceGrads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, group, *params):
        ctx.group = group
        return tuple(p.view_as(p) for p in params)

    @staticmethod
    def backward(ctx, *grads):
        grads = [g if g is not None else torch.zeros(()) for g in grads]
        present = [g for g in grads if g.dim() > 0]
        flat = _flatten_dense_tensors([g.contiguous() for g in present])
        _count("grad_all_reduce", flat)
        dist.all_reduce(flat, group=ctx.group)
        reduced = iter(_unflatten_dense_tensors(flat, present))
        return (None, *[next(reduced) if g.dim() > 0 else None for g in grads])


class _SumEverywhere(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        x = x.contiguous().clone()
        _count("all_reduce", x)
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        # Every rank used the sum, so each slice's gradient is the sum of every rank's.
        grad = grad.contiguous().clone()
        _count("all_reduce", grad)
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _GatherAlong(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        return _all_gather(x, dim, group)

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter(grad, ctx.dim, ctx.group), None, None


def sum_everywhere(x, group):
    return _SumEverywhere.apply(x, group)


def gather_along(x, dim: int, group):
    return _GatherAlong.apply(x, dim, group)


def copy_to_tp(x, group):
    return _CopyToTP.apply(x, group)


def reduce_from_tp(x, group):
    return _ReduceFromTP.apply(x, group)


def gather_last_dim(x, group):
    return _GatherLastDim.apply(x, group)


def gather_seq(x, group):
    return _GatherSeq.apply(x, group)


def reduce_scatter_seq(x, group):
    return _ReduceScatterSeq.apply(x, group)


def scatter_seq(x, group):
    return _ScatterSeq.apply(x, group)


def allreduce_grads(group, params):
    return _AllReduceGrads.apply(group, *params)
