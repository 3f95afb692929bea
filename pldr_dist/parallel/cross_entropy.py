"""Vocab-parallel cross-entropy: the loss of vocabulary-sharded logits without ever gathering
them (Megatron's algorithm: global max, the target's logit and the softmax denominator are
each one all-reduce over the tensor-parallel group)."""
from __future__ import annotations

import torch
import torch.distributed as dist


class _VocabParallelCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, group):
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()
        vocab = logits.shape[-1]
        start = dist.get_rank(group) * vocab
        top = logits.max(dim=-1).values
        dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
        shifted = logits - top[:, None]
        inside = (target >= start) & (target < start + vocab)
        local = (target - start).masked_fill(~inside, 0)
        picked = shifted.gather(1, local[:, None]).squeeze(1).masked_fill(~inside, 0.0)
        dist.all_reduce(picked, group=group)
        exp = shifted.exp()
        denom = exp.sum(dim=-1)
        dist.all_reduce(denom, group=group)
        ctx.save_for_backward(exp.div_(denom[:, None]), local, inside)
        return denom.log() - picked

    @staticmethod
    def backward(ctx, grad):
        softmax, local, inside = ctx.saved_tensors
        g = softmax.clone()
        g.scatter_add_(1, local[:, None], -inside.to(g.dtype)[:, None])
        return g * grad[:, None], None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, group) -> torch.Tensor:
    """Per-token losses [N] for logits [N, V / tp] holding this rank's vocabulary block."""
    return _VocabParallelCE.apply(logits, target, group)


def vocab_parallel_lm_loss(logits: torch.Tensor, targets: torch.Tensor, group, pad_id: int = 0) -> torch.Tensor:
    """Mean over non-pad targets, like pldr_dist.model.lm_loss."""
    flat = targets.flatten()
    losses = vocab_parallel_cross_entropy(logits.flatten(0, -2), flat, group)
    keep = flat.ne(pad_id)
    return (losses * keep).sum() / keep.sum().clamp(min=1)
