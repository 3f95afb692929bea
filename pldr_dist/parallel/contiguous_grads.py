"""Contiguous gradients for DeepSpeed's bf16 optimizer: one buffer, not one tensor per parameter.

Why: DeepSpeed's `BF16_Optimizer` (what bf16 ZeRO-1 with fp32 gradient accumulation runs, in
any TP x PP layout) handles the gradients one parameter at a time. Every step it casts and
adds each bf16 gradient into its fp32 buffer, zeroes each one, and takes one norm per tensor.
A PLGA layer has ~135 parameter tensors (the metric learner alone has 16 GLUs), so pldr-110m
launches thousands of tiny kernels per step from Python while the GPU waits (pldr-110m on an
H100 at micro-batch 64: 343k -> 386k tokens/s from this module alone; it also makes CUDA
graphs for the compiled layers safe, see build.py; docs/performance.md).

`use_contiguous_grads(optimizer)` points every bf16 parameter's `.grad` at a slice of one
flat bf16 buffer laid out exactly like DeepSpeed's flat bf16 parameters (what torch DDP's
`gradient_as_bucket_view` does). Autograd accumulates into an existing `.grad` in place, so
the gradients land in that buffer, and each per-parameter loop becomes one operation on whole
buffers: the cast-and-add into fp32, the zeroing, and the norm (one slice per run of
parameters that count towards it). The updates are bit-identical to DeepSpeed's (the same
element-wise operations); the global norm is summed in a different order, so clipping by norm
and the logged norm agree to rounding.

The optimizer keeps its type (DeepSpeed's pipeline engine checks `type(...) ==
BF16_Optimizer`): the replaced methods are bound on the instance.
"""
from __future__ import annotations

import torch
from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
from deepspeed.runtime.constants import PIPE_REPLICATED
from deepspeed.runtime.utils import is_model_parallel_parameter
from deepspeed.utils.bwc import bwc_tensor_model_parallel_rank

_NEEDED = ("bf16_groups", "bf16_groups_flat", "fp32_groups_gradients", "fp32_groups_gradients_flat",
           "fp32_groups_has_gradients", "immediate_grad_update", "has_moe_layers", "mpu")


class ContiguousGrads:
    def __init__(self, optimizer: BF16_Optimizer):
        missing = [name for name in _NEEDED if not hasattr(optimizer, name)]
        if missing:
            raise RuntimeError(f"DeepSpeed's BF16_Optimizer lacks {', '.join(missing)}: this DeepSpeed version is "
                               f"not supported by pldr_dist.parallel.contiguous_grads (install deepspeed==0.19.8)")
        if optimizer.immediate_grad_update or optimizer.has_moe_layers:
            raise RuntimeError("contiguous gradients need bf16.immediate_grad_update=false and no MoE layers")
        self.opt = optimizer
        self.lp_flat = [torch.zeros_like(flat) for flat in optimizer.bf16_groups_flat]
        self.views = []
        for group, flat, hp_grads in zip(optimizer.bf16_groups, self.lp_flat, optimizer.fp32_groups_gradients):
            views, offset = [], 0
            for param, hp in zip(group, hp_grads):
                views.append(flat.narrow(0, offset, param.numel()).view_as(param))
                offset += param.numel()
                param._hp_grad = hp          # what DeepSpeed sets on each accumulation
            self.views.append(views)
        self.attach()
        self.overlap = None     # grad_reduce.OverlappedReduce, where the engine has one
        self.norm_slices = [self._counted_runs(i) for i in range(len(self.lp_flat))]

    def _counted_runs(self, i: int) -> list:
        """Slices of group i's fp32 gradients that count towards the global norm: DeepSpeed's
        rule (get_grads_for_norm), merged into runs of neighbouring parameters."""
        tp_rank = bwc_tensor_model_parallel_rank(mpu=self.opt.mpu)
        hp_flat, runs, offset = self.opt.fp32_groups_gradients_flat[i], [], 0
        for param in self.opt.bf16_groups[i]:
            counted = not getattr(param, PIPE_REPLICATED, False) and (tp_rank == 0 or is_model_parallel_parameter(param))
            if counted and runs and runs[-1][1] == offset:
                runs[-1][1] = offset + param.numel()
            elif counted:
                runs.append([offset, offset + param.numel()])
            offset += param.numel()
        return [hp_flat[start:end] for start, end in runs]

    def attach(self) -> None:
        """Make every parameter's .grad its view again (something may have replaced or dropped it)."""
        for group, views in zip(self.opt.bf16_groups, self.views):
            for param, view in zip(group, views):
                if param.grad is not view:
                    if param.grad is None:
                        view.zero_()
                    else:
                        view.copy_(param.grad)
                    param.grad = view

    # -- the BF16_Optimizer methods this replaces --------------------------------------
    @torch.no_grad()
    def update_hp_grads(self, clear_lp_grads: bool = False) -> None:
        self.attach()
        overlapped = self.overlap is not None and self.overlap.accumulate_rest()   # grad_reduce.py
        for i, (lp, hp) in enumerate(zip(self.lp_flat, self.opt.fp32_groups_gradients_flat)):
            if not overlapped:
                hp.add_(lp.to(hp.dtype))
            self.opt.fp32_groups_has_gradients[i] = [True] * len(self.opt.bf16_groups[i])
            if clear_lp_grads:
                lp.zero_()

    @torch.no_grad()
    def clear_lp_grads(self, set_to_none: bool = False) -> None:
        """Zero the buffer; `set_to_none` is ignored: the views are the memory the grads live in."""
        for lp in self.lp_flat:
            lp.zero_()
        self.attach()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.clear_lp_grads()
        self.opt.clear_hp_grads()

    @torch.no_grad()
    def get_grads_for_norm(self, for_clipping: bool = False):
        if for_clipping:
            return list(self.opt.fp32_groups_gradients_flat)
        return [s for slices in self.norm_slices for s in slices], {}


def use_contiguous_grads(optimizer) -> ContiguousGrads | None:
    """Install contiguous gradients on DeepSpeed's bf16 optimizer; other optimizers (fp32,
    ZeRO 2/3, which keep their own buckets) are left as they are and None is returned."""
    if type(optimizer) is not BF16_Optimizer:
        return None
    grads = ContiguousGrads(optimizer)
    for name in ("update_hp_grads", "clear_lp_grads", "zero_grad", "get_grads_for_norm"):
        setattr(optimizer, name, getattr(grads, name))
    optimizer.contiguous_grads = grads
    return grads
