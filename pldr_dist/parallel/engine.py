"""DeepSpeed engines for every supported TP x PP x DP layout: config generation, the
supported-combination check, and `deepspeed.initialize` with our process grid.

Supported (and tested on real processes): ZeRO 0/1/2/3 with PP = 1; ZeRO 0/1 with PP > 1;
any TP. Pipeline + bf16 + ZeRO-0 is refused because its checkpoints do not load back
(DeepSpeed 0.19.8: KeyError in load_checkpoint); ZeRO-1 costs nothing extra there.
"""
from __future__ import annotations

import json

import deepspeed
from deepspeed.pipe import PipelineModule
from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
from torch import nn

from ..errors import PLDRError
from .contiguous_grads import use_contiguous_grads
from .device_skip import defer_norm_check, skip_on_device, sync_free_norm_mask
from .grad_reduce import BUCKET_ELEMENTS, overlap_grad_reduction
from .pipeline import drop_batch_timings, model_parameter_name
from .tensor_parallel import tp_partition_dim

PRECISIONS = ("fp32", "bf16")


class UnsupportedLayout(PLDRError, ValueError):
    """A parallel/ZeRO/precision combination this project does not run."""


def check_supported(pp: int, zero_stage: int, precision: str) -> None:
    """Raise UnsupportedLayout with a one-line reason and fix, before DeepSpeed starts."""
    if zero_stage not in (0, 1, 2, 3):
        raise UnsupportedLayout(f"parallel.zero_stage={zero_stage!r} is unknown (choose 0, 1, 2 or 3)")
    if precision not in PRECISIONS:
        raise UnsupportedLayout(f"train.precision={precision!r} is unknown (choose one of {', '.join(PRECISIONS)})")
    if pp > 1 and zero_stage > 1:
        raise UnsupportedLayout(f"parallel.zero_stage={zero_stage} with parallel.pp={pp}: DeepSpeed's pipeline "
                                f"engine supports ZeRO stage 0 or 1 only (use zero_stage=1, or pp=1)")
    if pp > 1 and zero_stage == 0 and precision == "bf16":
        raise UnsupportedLayout(f"parallel.zero_stage=0 with parallel.pp={pp} and bf16: DeepSpeed cannot load "
                                f"these checkpoints back (use zero_stage=1: same memory for parameters)")


# DeepSpeed's throughput timer (on by default) synchronizes the whole device at the start of
# every forward and the end of every engine.step() to time the step, so the host could never
# queue the next step while the GPU ran this one: at each step's start the GPU idled while the
# host launched the forward (~3 ms a pldr-110m step on an H100). The trainer times steps itself.
NO_THROUGHPUT_TIMER = {"throughput": {"enabled": False}}


def make_ds_config(*, micro_batch_size: int, grad_accum_steps: int, dp: int, pp: int = 1,
                   zero_stage: int = 1, precision: str = "fp32", clip_norm: float = 0.0,
                   activation_partitioning: bool = False) -> dict:
    """Our training settings -> a DeepSpeed config dict.

    micro_batch_size is per data-parallel replica; grad_accum_steps is the number of
    micro-batches per optimiser step (the pipeline's micro-batch count when pp > 1).
    clip_norm = 0 disables global-norm clipping (DeepSpeed's default would be 1.0).
    """
    check_supported(pp, zero_stage, precision)
    for key, value in (("micro_batch_size", micro_batch_size), ("grad_accum_steps", grad_accum_steps), ("dp", dp)):
        if not isinstance(value, int) or value < 1:
            raise UnsupportedLayout(f"{key}={value!r} must be a positive integer")
    config = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum_steps,
        "train_batch_size": micro_batch_size * grad_accum_steps * dp,
        "gradient_clipping": float(clip_norm),
        "zero_allow_untested_optimizer": True,  # our torch AdamW subclass (optim.py)
        "zero_optimization": {"stage": zero_stage},
        # DeepSpeed's ZeRO-2/3 bf16 overflow check runs amax/amin over every gradient tensor each
        # step (hundreds of small kernels and host work); ClippedAdamW checks the flat partition
        # once and skips non-finite steps on every rank, as it does in fp32. (bf16 ZeRO-1 runs
        # BF16_Optimizer, which checks the global norm instead; see optim.py.)
        "bf16": {"enabled": precision == "bf16", "check_grad_overflow": False},
        "fp16": {"enabled": False},
        "steps_per_print": 10**9,  # the training loop logs; DeepSpeed stays quiet
        "wall_clock_breakdown": False,
        "timers": NO_THROUGHPUT_TIMER,
    }
    if precision == "bf16" and zero_stage == 1:
        # Accumulate and reduce gradients in fp32 (as Megatron does for bf16), which also selects
        # DeepSpeed's BF16_Optimizer, whose gradients contiguous_grads.py keeps in one buffer.
        # The reduction's dtype must be named: DeepSpeed's default for bf16 is bf16, which
        # rounded the fp32 sums to bf16 before every optimizer step, at any dp (one rank too).
        config["data_types"] = {"grad_accum_dtype": "fp32"}
        config["communication_data_type"] = "fp32"
    if zero_stage in (2, 3):
        # Reduce-scatter the gradients in buckets on a side stream while the backward runs
        # (`overlap_comm`, off by default for stage 2). DeepSpeed's default bucket of 5e8 elements
        # would hold all of pldr-110m, and so could only go out after the whole backward. Same
        # buckets as ZeRO-1's (grad_reduce.py). Not for ZeRO-2 with one replica: there is nothing
        # to overlap, and its overlapped epilogue synchronizes the whole device after every
        # backward (stage_1_and_2.independent_gradient_partition_epilogue).
        config["zero_optimization"].update(overlap_comm=dp > 1 or zero_stage == 3, reduce_bucket_size=BUCKET_ELEMENTS)
    if zero_stage == 3:
        # Gather parameters on save so checkpoints also hold a consolidated fp32/bf16 copy.
        config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = True
        # One optimizer step over the whole partition: DeepSpeed steps each sub-group of
        # sub_group_size (default 1e9) elements separately, and ClippedAdamW's non-finite check
        # would then skip only the sub-group holding the bad gradient (a pldr-1b partition at
        # dp = 1 has two). Sub-groups matter for offloading, which pldr_dist does not use.
        config["zero_optimization"]["sub_group_size"] = 10**12
    if pp > 1:
        # Send whole activations between stages (TP ranks hold identical copies); DeepSpeed's
        # partitioned sends allow only one grad-carrying tensor, and we may send two.
        config["pipeline"] = {"pipe_partitioned": activation_partitioning, "grad_partitioned": activation_partitioning}
    return config


def load_ds_config(path: str) -> dict:
    with open(path) as f:
        config = json.load(f)
    return config


def mark_tensor_parallel_parameters(module: nn.Module) -> None:
    """Tag TP-split parameters as DeepSpeed expects, so global gradient norms count each
    replicated parameter once per TP group and each split one on every TP rank."""
    for name, param in module.named_parameters():
        if isinstance(module, PipelineModule):
            name = model_parameter_name(module, name)
        param.tensor_model_parallel = tp_partition_dim(name) is not None


def zero3_whole_layers(model: nn.Module, ds_config: dict) -> None:
    """ZeRO-3 gathers each decoder layer's parameters in one hook (a "leaf module") rather than
    one per submodule, so a layer's forward can be compiled as one graph with the gathering
    outside it (model/fast.py), and the host runs 1 hook per layer instead of ~10.

    DeepSpeed's `memory_efficient_linear` (on by default) replaces torch.nn.functional.linear,
    process-wide, with an autograd.Function; traced by torch.compile on a GPU it passes zero
    gradients through every linear layer (measured on an H200: zero weight gradients, the loss
    fell half as fast; exact on the CPU). Without it the compiled layers' gradients equal those
    of the model without DeepSpeed (docs/multi_gpu.md); the backward saves the parameters
    themselves, released after the forward and gathered again before the backward."""
    from deepspeed.utils import set_z3_leaf_modules

    from ..model.model import DecoderLayer
    zero = ds_config.setdefault("zero_optimization", {})
    if zero.setdefault("memory_efficient_linear", False):
        raise UnsupportedLayout("zero_optimization.memory_efficient_linear=true: DeepSpeed's replacement of torch's "
                                "linear gives wrong gradients in compiled layers (remove it from the DeepSpeed config)")
    set_z3_leaf_modules(model, [DecoderLayer])


def initialize(model_or_pipe: nn.Module, grid, ds_config: dict, optimizer):
    """deepspeed.initialize for a PLDRModel (PP = 1) or PipelineModule (PP > 1) on `grid`.

    With PP = 1 the grid is DeepSpeed's `mpu`, so ZeRO shards over the data-parallel group
    only; a PipelineModule carries the same topology (grid.topology) and DeepSpeed builds the
    groups from it. With bf16 and ZeRO-1 (fp32 gradient accumulation, make_ds_config) the
    gradients live in one contiguous buffer (contiguous_grads.py), reduced over the data-parallel
    group while the backward runs (grad_reduce.py). In every layout the optimizer step skips
    non-finite steps without a host sync (device_skip.py). Returns the engine (a PipelineEngine
    when PP > 1).
    """
    zero_stage = ds_config.get("zero_optimization", {}).get("stage", 0)
    precision = "bf16" if ds_config.get("bf16", {}).get("enabled") else "fp32"
    check_supported(grid.pp, zero_stage, precision)
    is_pipe = isinstance(model_or_pipe, PipelineModule)
    if grid.pp > 1 and not is_pipe:
        raise UnsupportedLayout(f"parallel.pp={grid.pp} needs a PipelineModule (pipeline.build_pipeline_module)")
    if "gradient_clipping" not in ds_config:
        raise UnsupportedLayout("DeepSpeed config has no gradient_clipping: set it (0 = off); DeepSpeed's default clips at 1.0")
    if grid.tp > 1:
        mark_tensor_parallel_parameters(model_or_pipe)
    if zero_stage == 3:
        zero3_whole_layers(model_or_pipe, ds_config)
    if precision == "bf16" and ds_config.get("data_types", {}).get("grad_accum_dtype") == "fp32":
        ds_config.setdefault("communication_data_type", "fp32")   # a DeepSpeed JSON of one's own too: make_ds_config
    ds_config.setdefault("timers", NO_THROUGHPUT_TIMER)        # likewise: no device sync around every step
    sync_free_norm_mask()
    engine, _, _, _ = deepspeed.initialize(model=model_or_pipe, optimizer=optimizer, config=ds_config,
                                           mpu=None if is_pipe else grid)
    if is_pipe:
        drop_batch_timings(engine)
    use_contiguous_grads(engine.optimizer)
    overlap_grad_reduction(engine)
    skip_on_device(engine.optimizer)
    defer_norm_check(engine.optimizer)
    if isinstance(engine.optimizer, BF16_Optimizer):
        engine.optimizer.optimizer.check_finite = False   # it checks the global norm itself (optim.py)
    return engine
