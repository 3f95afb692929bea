"""Activation recompute (`train.activation_checkpointing`): activation memory for compute.

- none: the backward uses every activation the forward kept.
- full: a decoder layer keeps only its input; the backward runs the layer again first
  (one more forward per layer, ~1/3 more compute; the least memory).
- selective: a decoder layer keeps what is costly to redo (the outputs of its matrix products,
  of attention and of the metric learner's Triton ops) and recomputes what is cheap to redo and
  costly to keep: the element-wise work between them (LayerNorms, rotary, the GLU and FFN gating,
  residual adds, A0's normalisation and the power law), which holds most of a post-LN layer's
  activation bytes. It is torch's selective activation checkpointing
  (`create_selective_checkpoint_contexts`), which torch.compile folds into the compiled backward.

Both go through torch.utils.checkpoint (non-reentrant), inside the layer, so parameter names
and every layout's wrapping stay as they are.
"""
from __future__ import annotations

import functools

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

MODES = ("none", "selective", "full")


def _costly_ops() -> set:
    aten = torch.ops.aten
    ops = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default,
           aten._scaled_dot_product_flash_attention.default, aten._scaled_dot_product_efficient_attention.default,
           aten._scaled_dot_product_cudnn_attention.default}
    from . import glu_kernel, metric_kernel   # noqa: F401  (register pldr::glu and pldr::metric_learner)
    for name in ("glu", "metric_learner"):
        if hasattr(torch.ops, "pldr") and hasattr(torch.ops.pldr, name):
            ops.add(getattr(torch.ops.pldr, name).default)
    return ops


def _policy(costly, ctx, op, *args, **kwargs):
    return CheckpointPolicy.MUST_SAVE if op in costly else CheckpointPolicy.PREFER_RECOMPUTE


def selective_policy():
    """The selective mode's policy for torch's selective checkpointing."""
    return functools.partial(_policy, _costly_ops())


def run_layer(mode: str, fn, *args):
    """fn(*args), with its activations recomputed in the backward as `mode` says."""
    if mode == "none" or not torch.is_grad_enabled():
        return fn(*args)
    if mode == "full":
        return checkpoint(fn, *args, use_reentrant=False)
    return checkpoint(fn, *args, use_reentrant=False, context_fn=_SELECTIVE[0])


_SELECTIVE = [None]    # the context factory, made outside any compiled region (set_activation_checkpointing)


def set_activation_checkpointing(model, mode: str) -> int:
    """Every decoder layer of `model` (or of a pipeline's stages) recomputes as `mode` says;
    returns the number of layers."""
    if mode not in MODES:
        raise ValueError(f"activation_checkpointing={mode!r} must be one of {', '.join(MODES)}")
    from .model import DecoderLayer
    if mode == "selective" and _SELECTIVE[0] is None:
        _SELECTIVE[0] = functools.partial(create_selective_checkpoint_contexts, selective_policy())
    layers = [m for m in model.modules() if isinstance(m, DecoderLayer)]
    for layer in layers:
        layer.recompute = mode
    return len(layers)
