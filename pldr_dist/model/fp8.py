"""FP8 training of the big matrix products (`train.precision: fp8`), through torchao's float8.

What runs in FP8: the attention projections Wq, Wk, Wv, Wo (torchao's Float8Linear, swapped in
by `convert_to_float8_training`) and the three feed-forward products. Everything else stays
bf16: the metric learner, the power law, A0, q@G_LM, attention itself, the norms, and the output
head (`head_loss` runs the head inside its own fused loss step, and the head's error reaches
every token's loss directly). Weights, optimizer state and checkpoints are unchanged (bf16
parameters under DeepSpeed's bf16 optimizer): FP8 copies are made each step from them, with a
per-tensor ("tensorwise") or per-row ("rowwise") scale.

The feed-forward products go through torchao's float8 matmul directly, not Float8Linear: FP8
GEMMs need both dimensions of each operand to be multiples of 16, and the presets' d_ff (2389,
5461) is odd, so the weights are zero-padded to a multiple of 64 inside the forward first, as
`fast.PaddedSwiGLU` does for bf16 (same parameters, padded units contribute exact zeros).

torchao's `emulate` mode runs the same casts with high-precision products on any device; the CPU
tests use it.
"""
from __future__ import annotations

import dataclasses
import re

import torch
import torch.nn.functional as F
from torch import nn

from .layers import SwiGLU

RECIPES = ("tensorwise", "rowwise")
FFN_ALIGN = 64          # as fast.FFN_ALIGN: a multiple of 16, and aligned for the bf16 kernels around
_PROJECTION = re.compile(r"(^|\.)attn\.w[qkvo]$")


def unavailable_reason() -> str | None:
    """Why FP8 training cannot run here, or None."""
    if not torch.cuda.is_available():
        return "train.precision=fp8 needs an NVIDIA GPU with FP8 tensor cores (H100/H200); this machine has no GPU"
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) < (8, 9):
        return (f"train.precision=fp8 needs FP8 tensor cores (compute capability >= 8.9: H100, H200, L40S); "
                f"{torch.cuda.get_device_name()} has {major}.{minor} (use train.precision=bf16)")
    try:
        import torchao.float8  # noqa: F401
    except ImportError:
        return "train.precision=fp8 needs torchao (pip install torchao)"
    return None


def _config(recipe: str, emulate: bool):
    from torchao.float8 import Float8LinearConfig
    if recipe not in RECIPES:
        raise ValueError(f"fp8 recipe {recipe!r} is unknown (choose one of {', '.join(RECIPES)})")
    config = Float8LinearConfig.from_recipe_name(recipe)
    return dataclasses.replace(config, emulate=True) if emulate else config


class Float8SwiGLU(SwiGLU):
    """The feed-forward block with its three products in FP8 on zero-padded weights."""

    fp8_config = None           # set by enable_fp8: (LinearMMConfig, Float8LinearConfig)

    def _linear(self, x, weight, bias):
        from torchao.float8.float8_linear import matmul_with_hp_or_float8_args
        mm_config, config = self.fp8_config
        out = matmul_with_hp_or_float8_args.apply(x, weight.t(), mm_config, config)
        return out + bias.to(out.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad = -self.w1.out_features % FFN_ALIGN
        gate = self._linear(x, F.pad(self.w1.weight, (0, 0, 0, pad)), F.pad(self.w1.bias, (0, pad)))
        up = self._linear(x, F.pad(self.w2.weight, (0, 0, 0, pad)), F.pad(self.w2.bias, (0, pad)))
        return self._linear(F.silu(gate) * up, F.pad(self.w3.weight, (0, pad)), self.w3.bias)


def enable_fp8(model: nn.Module, recipe: str = "tensorwise", emulate: bool = False) -> int:
    """Switch the model's attention projections and feed-forward products to FP8 in place (the
    parameters stay the same objects, so do their names). Returns the number of products."""
    from torchao.float8 import convert_to_float8_training
    from torchao.float8.float8_linear import Float8Linear
    config = _config(recipe, emulate)
    for fqn, m in model.named_modules():
        if isinstance(m, nn.Linear) and _PROJECTION.search(fqn) and (m.in_features % 16 or m.out_features % 16):
            raise ValueError(f"FP8 products need multiples of 16; {fqn} is {m.in_features} x {m.out_features}")
    convert_to_float8_training(model, module_filter_fn=lambda m, fqn: bool(_PROJECTION.search(fqn)), config=config)
    # torchao's own matmul settings for an FP8 product, taken from a Float8Linear it builds
    mm_config = Float8Linear.from_float(nn.Linear(16, 16, device="meta"), config=config).linear_mm_config
    count = sum(isinstance(m, Float8Linear) for m in model.modules())
    for module in model.modules():
        if isinstance(module, SwiGLU):
            module.__class__ = Float8SwiGLU
            module.fp8_config = (mm_config, config)
            count += 3
    return count

