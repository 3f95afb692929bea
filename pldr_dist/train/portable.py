"""Resume any layout from a portable checkpoint (written by `pldr-reshard`, format in
convert/reshard.py): every rank reads the whole tensors, keeps its TP slice of the parameters
its pipeline stage owns, and hands weights and Adam moments to DeepSpeed's optimizer.

Under ZeRO 1/2 the optimizer holds one flat fp32 partition per parameter group; DeepSpeed's
`safe_set_full_fp32_param` / `safe_set_full_optimizer_state` write a parameter's value into
whatever fragment of it this DP rank's partition holds. Adam's state is created lazily at the
first step, so it is created here first (zeros of the partition's shape, then filled).
"""
from __future__ import annotations

import json
import os

import torch
from deepspeed.pipe import PipelineModule
from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state
from safetensors.torch import load_file

from ..convert.consolidated import CheckpointError
from ..model.interchange import from_interchange
from ..parallel.flat_layers import flatten_state, unflattened_names
from ..parallel.pipeline import model_parameter_name
from ..parallel.tensor_parallel import shard_full_state_dict

MOMENTS = ("exp_avg", "exp_avg_sq")


def _local_names(module) -> tuple[dict, dict]:
    """{our name: parameter} and {our name: buffer} of this rank's (stage's) module."""
    rename = (lambda n: model_parameter_name(module, n)) if isinstance(module, PipelineModule) else (lambda n: n)
    params = {rename(n): p for n, p in module.named_parameters()}
    buffers = {rename(n): b for n, b in module.named_buffers() if n.endswith("G_fixed")}
    return params, buffers


def _model_names(tensors: dict) -> dict:
    """`kind.name` file entries (per-GLU names) -> the same under the model's stacked names."""
    by_kind = {}
    for key, t in tensors.items():
        kind, name = key.split(".", 1)
        by_kind.setdefault(kind, {})[name] = t
    return {f"{kind}.{n}": t for kind, part in by_kind.items() for n, t in from_interchange(part).items()}


def load_portable(engine, grid, tag_dir: str) -> dict:
    """Load weights and optimizer state into `engine` (any layout); returns the run's extra state."""
    with open(os.path.join(tag_dir, "portable.json")) as f:
        meta = json.load(f)
    tensors = _model_names(load_file(os.path.join(tag_dir, "portable.safetensors")))
    params, buffers = _local_names(engine.module)
    tp_rank, tp = (grid.tp_rank, grid.tp) if grid is not None else (0, 1)

    def local(prefix: str, names) -> dict:
        full = {}
        for n in names:
            if f"{prefix}.{n}" not in tensors:
                raise CheckpointError(f"{tag_dir}/portable.safetensors has no {prefix}.{n}: it was written for another "
                                      f"model (compare its run_config.json with this run's model settings)")
            full[n] = tensors[f"{prefix}.{n}"]
        return shard_full_state_dict(full, tp_rank, tp)

    # flat decoder layers (ZeRO-2/3: parallel/flat_layers.py) take their tensors end to end
    names = unflattened_names(engine.module, params)
    weights = flatten_state(local("param", names), engine.module)
    moments = {k: flatten_state(local(k, names), engine.module) for k in MOMENTS}
    with torch.no_grad():
        for n, b in buffers.items():
            b.copy_(local("buffer", [n])[n])
        for n, p in params.items():
            if tuple(p.shape) != tuple(weights[n].shape):
                raise CheckpointError(f"{tag_dir}: {n} has shape {tuple(weights[n].shape)} for this layout's slice, the "
                                      f"model holds {tuple(p.shape)} (the run's model config differs from the checkpoint's)")
            p.copy_(weights[n])
    _load_optimizer(engine, params, weights, moments, float(meta["optimizer_step"]))
    return {k: meta[k] for k in ("step", "tokens", "nonfinite_total", "nonfinite_in_row", "loader")}


def _load_optimizer(engine, params: dict, weights: dict, moments: dict, step: float) -> None:
    zero = engine.zero_optimization_stage()
    optimizer = engine.optimizer
    if zero == 0 and engine.bfloat16_enabled():
        raise CheckpointError("a portable checkpoint loads under ZeRO-0 in fp32, or ZeRO 1/2 in fp32 or bf16; this run is "
                              "bf16 with parallel.zero_stage=0 (use zero_stage=1: same memory for parameters)")
    if zero == 0:
        base = getattr(optimizer, "optimizer", optimizer)
        for n, p in params.items():      # the optimizer holds the module's own parameters
            base.state[p] = {"step": torch.tensor(step), **{k: moments[k][n].to(p.device).clone() for k in MOMENTS}}
        return
    if zero not in (1, 2):
        raise CheckpointError(f"a portable checkpoint loads under ZeRO 0, 1 or 2; this run uses ZeRO-{zero} "
                              f"(resume it with parallel.zero_stage=1 or 2)")
    base = optimizer.optimizer
    # ZeRO 1/2's optimizer and DeepSpeed's BF16_Optimizer (bf16 ZeRO-1) name their partitions differently
    partitions = getattr(optimizer, "single_partition_of_fp32_groups", None) or optimizer.fp32_groups_flat_partition
    for flat in partitions:
        base.state[flat] = {"step": torch.tensor(step), **{k: torch.zeros_like(flat) for k in MOMENTS}}
    optimizer._hp_optimizer_states_linked = False
    optimizer._lazy_init_hp_params_optimizer_state()     # point each parameter's fragment at the new state
    for n, p in params.items():
        safe_set_full_fp32_param(p, weights[n].to(p.device, torch.float32))
        for k in MOMENTS:
            safe_set_full_optimizer_state(p, moments[k][n].to(p.device, torch.float32), k)
