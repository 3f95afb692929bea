"""The spec's optimiser: AdamW (betas 0.9/0.95, eps 1e-5, weight decay 0.1 on every parameter)
with element-wise gradient clipping and a skip of non-finite steps.

A plain torch optimizer (not DeepSpeed's compiled Adam), so DeepSpeed wraps it: under ZeRO
its `param_groups` hold this rank's flat fp32 partition and `step()` is called with that
partition's gradient set (ZeRO 1/2/3, the bf16 optimizer and the pipeline engine all call the
base optimizer's step on every rank in lock-step). Both additions work on whatever slice the
rank holds:
- clipping by value (the reference's `clip_grad_value_(1.0)`) is element-wise, so it commutes
  with partitioning and gives the same update as on the full gradient;
- a non-finite gradient on any rank skips the update on every rank (one all-reduce over the
  whole world), so replicas and shards never diverge. The skip is decided on the device (fused
  AdamW's `found_inf`), so the host does not wait for the backward; `flag` tells the trainer
  a step later, `skipped_steps` counts them. Under DeepSpeed's BF16_Optimizer (bf16 with
  ZeRO-1) the check is off (`check_finite`, set by engine.initialize): that optimizer's step
  decides from the global gradient norm, the same on every rank (device_skip.py).
Global-norm clipping is DeepSpeed's `gradient_clipping` (engine.make_ds_config), applied
before step() is called.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator

from .device_skip import SkipFlag

BETAS = (0.9, 0.95)
EPS = 1e-5
WEIGHT_DECAY = 0.1


class ClippedAdamW(torch.optim.AdamW):
    def __init__(self, params, lr: float, clip_value: float = 0.0, betas=BETAS, eps: float = EPS,
                 weight_decay: float = WEIGHT_DECAY):
        """clip_value > 0 clamps every gradient element to [-clip_value, clip_value]. Always
        torch's fused AdamW: one kernel (the multi-tensor path makes ~10 passes over the state),
        and the only one that takes `found_inf`, which the device-side skip needs."""
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=True)
        self.clip_value = clip_value
        self.check_finite = True
        self.flag = None        # device_skip.SkipFlag of the last step (check_finite): the trainer reads it
        self._skipped = None    # how many steps were skipped, on the device

    @property
    def skipped_steps(self) -> int:
        """Steps skipped as non-finite (reading it waits for the GPU)."""
        return 0 if self._skipped is None else int(self._skipped)

    def _grads(self):
        return [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]

    @torch.no_grad()
    def step(self, closure=None):
        grads = self._grads()
        if self.check_finite:
            # The skip is decided on the device: fused AdamW's found_inf leaves weights, moments and
            # step counts as they were, and the host never waits here for the backward to finish.
            bad = self._nonfinite(grads)
            self.found_inf = bad
            self._skipped = bad if self._skipped is None else self._skipped + bad
            self.flag = SkipFlag(bad > 0)
        if self.clip_value > 0:
            for g in grads:
                g.clamp_(-self.clip_value, self.clip_value)
        return super().step(closure)

    @staticmethod
    def _nonfinite(grads) -> torch.Tensor:
        """1.0 where any gradient on any rank is not finite, else 0.0 (a 0-dim device tensor)."""
        bad = torch.zeros((), device=get_accelerator().current_device_name())
        for g in grads:
            bad = torch.maximum(bad, (~torch.isfinite(g).all()).float().to(bad.device))
        if dist.is_initialized():
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        return bad


def make_optimizer(model: torch.nn.Module, lr: float, clip_value: float = 0.0, eps: float = EPS) -> ClippedAdamW:
    """The spec's AdamW over every trainable parameter of `model` (weight decay on all).

    DeepSpeed's ZeRO and bf16 optimizers flatten the parameters, in this order, into one buffer
    and turn each parameter into a view of it. Sizes that are multiples of 8 elements go first,
    so all of those start 16-byte aligned (what compiled GPU kernels load vectors from); the
    odd sizes (biases of width d_ff = 2389, a_dff = 170) follow. AdamW is element-wise: the
    order changes no number. It runs fused (on the GPU one kernel over the flat partition), which
    can also skip a non-finite step on the device (`found_inf`: parallel/device_skip.py).
    """
    params = sorted((p for p in model.parameters() if p.requires_grad), key=lambda p: p.numel() % 8 != 0)
    return ClippedAdamW(params, lr=lr, clip_value=clip_value, eps=eps)


def optimizer_state_bytes(optimizer) -> int:
    """Bytes of optimiser state (Adam moments, step counters) this rank holds."""
    base = getattr(optimizer, "optimizer", optimizer)  # unwrap DeepSpeed's ZeRO/bf16 wrappers
    total = 0
    for state in base.state.values():
        for value in state.values():
            if torch.is_tensor(value):
                total += value.numel() * value.element_size()
    return total
