"""The bf16 optimizer's step without a host sync: non-finite steps are skipped on the device.

Why: every step, DeepSpeed's `BF16_Optimizer` (bf16 ZeRO-1, any TP x PP layout) reads the global
gradient norm on the host twice: once to decide whether to skip the step (`is_invalid_grad_norm`)
and once to decide whether to clip (`clip_tensors_by_global_norm`). Each read waits for the whole
backward, and then the GPU idles while the host launches the optimizer and the next forward.
On an H100 that was ~4.6 ms of each pldr-110m step (docs/performance.md): a fixed cost per
optimizer step, which also keeps small per-GPU batches from scaling over data parallelism.

Here the same decisions are made on the device:
- the clip factor is min(1, clip / (norm + 1e-6)). Where DeepSpeed does not clip, the factor is
  exactly 1, so the numbers are the same;
- the skip is torch's fused AdamW `found_inf`: the kernel leaves parameters, moments and step
  counts untouched, as a skipped step must;
- the fp32 master weights are copied to the bf16 parameters either way. After a skipped step
  these are the same values.

The host learns whether a step was skipped from a pinned copy of the flag (`SkipFlag`). The
trainer reads it one step later, so it does not wait for the step in flight (train/trainer.py).

DeepSpeed's ZeRO-2/3 optimizers (and ZeRO-1 in fp32) read the norm on the host for the same
reason, to skip a non-finite step (`is_invalid_grad_norm`; ZeRO-3 in bf16 too, ZeRO-1/2 when
not bf16). There the base optimizer is ClippedAdamW (parallel/optim.py), which already skips a
non-finite step on the device, on every rank alike: `defer_norm_check` leaves the decision to it.
Every ZeRO optimizer also marks a non-finite norm with a fill that reads a device value
(`sync_free_norm_mask`). The trainer's `log.profile_steps` counts what still reads inside a step
(train/profiling.host_reads).
"""
from __future__ import annotations

import contextvars

import deepspeed.runtime.utils as ds_utils
import deepspeed.runtime.zero.stage3 as ds_stage3
import deepspeed.runtime.zero.stage_1_and_2 as ds_stage12
import torch
from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
from deepspeed.runtime.utils import get_global_norm_of_tensors

from .host_copy import HostCopy


class SkipFlag:
    """Whether one optimizer step was skipped. Reading it waits for that step only."""

    def __init__(self, bad: torch.Tensor):
        self.copy = HostCopy(bad)

    def __bool__(self) -> bool:
        return bool(self.copy.read()[0])


class DeviceSkip:
    def __init__(self, optimizer: BF16_Optimizer):
        self.opt = optimizer
        self.flag = SkipFlag(torch.zeros((), dtype=torch.bool))   # no step taken yet

    @torch.no_grad()
    def step(self, closure=None) -> None:
        """BF16_Optimizer.step, its two host reads of the norm made on the device."""
        opt = self.opt
        if closure is not None:   # DeepSpeed's engines never pass one; BF16_Optimizer refuses it too
            raise TypeError(f"{type(opt).__name__}.step takes no closure")
        opt.overflow = False           # DeepSpeed's engine would count a skip from this (a host read)
        grads, _ = opt.get_grads_for_norm()
        norm = get_global_norm_of_tensors(input_tensors=grads, mpu=opt.mpu, norm_type=opt.norm_type)
        bad = norm < 0                 # DeepSpeed marks a non-finite norm -1 (is_invalid_grad_norm)
        opt._global_grad_norm = torch.where(bad, torch.full_like(norm, float("inf")), norm)
        if opt.clip_grad > 0.0:
            factor = torch.clamp(opt.clip_grad / (norm + 1e-6), max=1.0)
            torch._foreach_mul_(opt.get_grads_for_norm(for_clipping=True), factor)
        for param, grad in zip(opt.fp32_groups_flat_partition, opt.fp32_groups_gradient_flat_partition):
            param.grad = grad          # fp32 gradient accumulation (make_ds_config): no cast
        opt.optimizer.found_inf = bad.float()
        opt.optimizer.step()
        opt._lazy_init_hp_params_optimizer_state()
        opt.update_lp_params()
        opt.clear_hp_grads()
        self.flag = SkipFlag(bad)


def skip_on_device(optimizer) -> DeviceSkip | None:
    """Install the sync-free step on DeepSpeed's bf16 optimizer with fp32 gradients over a fused
    torch optimizer (parallel/optim.make_optimizer); others keep their step, and None is returned."""
    base = getattr(optimizer, "optimizer", None)
    if (type(optimizer) is not BF16_Optimizer or optimizer.grad_acc_dtype is not torch.float32 or
            not getattr(base, "defaults", {}).get("fused") or optimizer.has_moe_layers):
        return None
    skip = DeviceSkip(optimizer)
    optimizer.step = skip.step
    optimizer.device_skip = skip
    return skip


def _mask_nonfinite(input: torch.Tensor, device=None, val: float = -1.0) -> None:
    """DeepSpeed's `mask_nan_or_inf_with_val_inplace`, which every ZeRO optimizer applies to the
    gradient norm, with a Python number as the fill value. DeepSpeed's passes a 0-dim device
    tensor, and CUDA's masked_fill_ reads a tensor fill value with `.item()`: a host sync in
    every optimizer step, even where nothing else reads the norm."""
    input.masked_fill_(~torch.isfinite(input), val)


def sync_free_norm_mask() -> None:
    """Installs `_mask_nonfinite` where DeepSpeed's modules look the function up (same values)."""
    for module in (ds_utils, ds_stage12, ds_stage3):
        module.mask_nan_or_inf_with_val_inplace = _mask_nonfinite


_DEFERRED = contextvars.ContextVar("pldr_norm_check_deferred", default=False)


def _is_invalid_grad_norm(norm) -> bool:
    """DeepSpeed's check, but False for a device norm inside a deferred step (`defer_norm_check`).
    A non-finite norm then reaches the clip factor, which leaves the non-finite gradients
    non-finite (inf * 0 and NaN * anything are NaN), and the base optimizer skips the step. (Only
    a norm that overflows fp32 while every gradient is finite, ~1e19 per element, would differ:
    the clip would zero the gradients instead of skipping the step.)"""
    if _DEFERRED.get() and torch.is_tensor(norm):
        return False
    return ds_utils.is_invalid_grad_norm(norm)


def defer_norm_check(optimizer) -> bool:
    """ZeRO-1/2 and ZeRO-3 optimizers whose base optimizer checks for non-finite gradients
    itself (ClippedAdamW.check_finite) step without reading the gradient norm on the host.
    fp16 loss scaling needs DeepSpeed's own overflow handling, so fp16 keeps it. Returns
    whether the step was wrapped."""
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer
    base = getattr(optimizer, "optimizer", None)
    if (not isinstance(optimizer, (DeepSpeedZeroOptimizer, DeepSpeedZeroOptimizer_Stage3))
            or not getattr(base, "check_finite", False) or getattr(optimizer, "dtype", None) is torch.float16):
        return False
    ds_stage3.is_invalid_grad_norm = ds_stage12.is_invalid_grad_norm = _is_invalid_grad_norm   # scoped by _DEFERRED
    step = optimizer.step

    def deferred_step(*args, **kwargs):
        token = _DEFERRED.set(True)
        try:
            step(*args, **kwargs)
        finally:
            _DEFERRED.reset(token)
        norm = optimizer._global_grad_norm     # DeepSpeed reports a skipped step's norm as inf
        if torch.is_tensor(norm):
            optimizer._global_grad_norm = torch.where(torch.isfinite(norm) & (norm >= 0), norm,
                                                      torch.full_like(norm, float("inf")))

    optimizer.step = deferred_step
    return True
