"""`pldr-reshard`: a training checkpoint of one layout -> a *portable* checkpoint that a run of
any other layout (TP, PP, DP sizes, ZeRO 0-2) resumes from, optimiser state included.

DeepSpeed's files are per (pipeline stage, TP rank, DP rank); the portable checkpoint holds
every tensor whole, under the single-process model's names, so no layout is baked in:

    <run_dir>/checkpoints/step_00000300/
        portable.safetensors  param.<name>       fp32 master weight (the training weights)
                              exp_avg.<name>     Adam first moment  (fp32)
                              exp_avg_sq.<name>  Adam second moment (fp32)
                              buffer.<name>      persistent buffers (the fixed G of v510G)
        portable.json         format, optimizer_step (Adam's step count), step, tokens, the
                              data-loader position (global: see data/loader.py), fault
                              counters, source layout
        run_config.json, tokenizer.model, COMPLETE.json   as in every checkpoint
    <run_dir>/checkpoints/latest

`pldr-train` with that run_dir and any layout loads it (train/portable.py) and continues on
exactly the batches and with exactly the optimiser state of the source run.

Reading DeepSpeed's ZeRO-1/2 files needs no process group: each optimizer file of DP rank d
and model-parallel rank m holds its flat fp32 partition, Adam's moments over the same
partition, and `param_slice_mappings` (name -> start, numel within the partition), which is
what DeepSpeed's own universal-checkpoint conversion reads. Model-parallel rank m is
(pipeline stage m // tp, TP rank m % tp): DeepSpeed's PipeModelDataParallelTopology orders
ranks pipe, data, model.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import sys
import tempfile
from collections import defaultdict

import torch
from safetensors.torch import save_file

from ..errors import cli_main
from ..model import PLDRModel
from ..model.interchange import from_interchange, to_interchange
from ..parallel.flat_layers import unflatten_state
from ..parallel.tensor_parallel import tp_partition_dim
from .consolidate import _load, _merge_tp, gather_weights, read_run_config, resolve_tag
from .consolidated import CheckpointError

PORTABLE_WEIGHTS, PORTABLE_META = "portable.safetensors", "portable.json"
FORMAT = "pldr_dist.portable/1"
MOMENTS = ("exp_avg", "exp_avg_sq")


def model_name(name: str, pp: int, num_layers: int) -> str:
    """DeepSpeed's parameter name (PipelineModule names start with the layer index) -> ours."""
    if pp == 1:
        return name
    index, rest = name.split(".", 1)
    index = int(index)
    if index in (0, num_layers + 1):
        return rest                       # embed.* on the first stage, head.* on the last
    return f"layers.{index - 1}.{rest.removeprefix('layer.')}"


def _optimizer_files(tag_dir: str) -> dict[int, list[str]]:
    """{model-parallel rank: [optimizer file of DP rank 0, 1, ...]}."""
    by_mp = defaultdict(dict)
    for path in glob.glob(os.path.join(tag_dir, "*zero_pp_rank_*_mp_rank_*_optim_states.pt")):
        m = re.search(r"zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$", path)
        by_mp[int(m.group(2))][int(m.group(1))] = path
    out = {}
    for mp, files in by_mp.items():
        missing = sorted(set(range(max(files) + 1)) - set(files))
        if missing:
            raise CheckpointError(f"{tag_dir}: optimizer file of DP rank {missing[0]} for mp_rank {mp:02d} is missing")
        out[mp] = [files[d] for d in range(len(files))]
    return out


def _read_partitions(files: list[str], pp: int, num_layers: int) -> tuple[dict, dict, float]:
    """One model-parallel rank's DP-partitioned ZeRO-1/2 state -> ({name: fp32 flat}, {moment: {name: flat}}, step)."""
    pieces = defaultdict(list)               # name -> [(fp32, exp_avg, exp_avg_sq) slices in DP order]
    steps = set()
    for path in files:
        osd = _load(path)["optimizer_state_dict"]
        if "param_slice_mappings" not in osd:
            raise CheckpointError(f"{path}: no param_slice_mappings (not a ZeRO-1/2 optimizer file of DeepSpeed >= 0.10)")
        base = osd["base_optimizer_state"]
        states = base["state"] if isinstance(base, dict) else dict(enumerate(base))
        for group, mapping in enumerate(osd["param_slice_mappings"]):
            fp32 = osd["single_partition_of_fp32_groups"][group]
            state = states.get(group, {})
            if not all(k in state for k in MOMENTS):
                raise CheckpointError(f"{path}: optimizer group {group} has no Adam moments (was the run stepped at all?)")
            steps.add(float(state["step"]))
            for name, address in mapping.items():
                cut = lambda t: t.narrow(0, address.start, address.numel)   # noqa: E731
                pieces[model_name(name, pp, num_layers)].append(
                    (cut(fp32), cut(state["exp_avg"]), cut(state["exp_avg_sq"])))
    if len(steps) != 1:
        raise CheckpointError(f"{os.path.dirname(files[0])}: optimizer step counts differ across partitions {sorted(steps)}")
    weights = {n: torch.cat([p[0] for p in ps]) for n, ps in pieces.items()}
    moments = {k: {n: torch.cat([p[i + 1] for p in ps]) for n, ps in pieces.items()} for i, k in enumerate(MOMENTS)}
    return weights, moments, steps.pop()


def read_training_state(ckpt_dir: str, tag: str, log=lambda *_: None) -> dict:
    """Everything a run needs to continue, whole: weights, Adam moments, counters, loader position."""
    tag_dir = os.path.join(ckpt_dir, tag)
    if os.path.isfile(os.path.join(tag_dir, PORTABLE_META)):
        raise CheckpointError(f"{tag_dir} is already portable: any layout resumes from it (no resharding needed)")
    run, cfg = read_run_config(tag_dir)
    tp, pp, zero = run["parallel"]["tp"], run["parallel"]["pp"], run["parallel"]["zero_stage"]
    cp = run["parallel"].get("cp", 1)    # ZeRO partitions span dp x cp (parallel/grid.py)
    if zero not in (1, 2):
        raise CheckpointError(f"{tag_dir}: pldr-reshard reads ZeRO-1/2 checkpoints; this run used parallel.zero_stage="
                              f"{zero} (consolidate it with pldr-consolidate for the weights, or train with zero_stage 1)")
    per_mp = _optimizer_files(tag_dir)
    if sorted(per_mp) != list(range(tp * pp)):
        raise CheckpointError(f"{tag_dir}: optimizer files for mp_rank {sorted(per_mp)}, but the layout tp={tp} pp={pp} "
                              f"needs 0..{tp * pp - 1} (the checkpoint is incomplete)")
    # (stage, tp rank) -> flat tensors; merge the TP slices of each stage, then the stages
    with torch.device("meta"):
        model_state = PLDRModel(cfg).state_dict()
    shapes = {n: tuple(t.shape) for n, t in model_state.items()}
    # the per-GLU names of a checkpoint written before the metric learner was stacked
    shapes_any = {**{n: tuple(t.shape) for n, t in to_interchange(model_state).items()}, **shapes}
    weights, moments, steps = {}, {k: {} for k in MOMENTS}, set()
    for stage in range(pp):
        log(f"reading pipeline stage {stage + 1}/{pp}: {tp} TP rank(s) x {len(per_mp[0])} DP{'xCP' if cp > 1 else ''} "
            f"optimizer file(s)")
        parts = [_read_partitions(per_mp[stage * tp + r], pp, cfg.num_layers) for r in range(tp)]
        # ZeRO-2/3 keep one tensor per decoder layer (parallel/flat_layers.py)
        parts = [(unflatten_state(w, cfg), {k: unflatten_state(m, cfg) for k, m in ms.items()}, s) for w, ms, s in parts]
        steps.update(p[2] for p in parts)
        local_shapes = [{n: _local_shape(shapes_any[n], n, r, tp) for n in parts[r][0]} for r in range(tp)]
        weights.update(_merge_tp([{n: t.view(local_shapes[r][n]) for n, t in parts[r][0].items()}
                                  for r in range(tp)]))
        for k in MOMENTS:
            moments[k].update(_merge_tp([{n: t.view(local_shapes[r][n]) for n, t in parts[r][1][k].items()}
                                         for r in range(tp)]))
    if len(steps) != 1:
        raise CheckpointError(f"{tag_dir}: optimizer step counts differ across model-parallel ranks {sorted(steps)}")
    # a checkpoint written before the metric learner was stacked holds per-GLU names
    weights = from_interchange(weights)
    moments = {k: from_interchange(m) for k, m in moments.items()}
    params = {n for n in shapes if not n.endswith("G_fixed")}
    if set(weights) != params:
        raise CheckpointError(f"{tag_dir}: optimizer files hold {len(weights)} parameters, the model has {len(params)} "
                              f"(missing {sorted(params - set(weights))[:3]})")
    buffers = {}
    if len(shapes) > len(params):      # a fixed G (v510G) is a buffer: it lives in the module files only
        buffers = {n: t for n, t in gather_weights(ckpt_dir, tag, run).items() if n not in params}
    extra = _load(os.path.join(tag_dir, "rank_00000.pt"))
    extra.pop("rng", None)
    extra.pop("stage_layers", None)     # the source layout's pipeline split (train/checkpoint.py)
    return {"run_config": run, "weights": weights, "moments": moments, "buffers": buffers,
            "optimizer_step": steps.pop(), "extra": extra,
            "source_layout": {"tp": tp, "pp": pp, "dp": len(per_mp[0]) // cp, **({"cp": cp} if cp > 1 else {}),
                              "zero_stage": zero}}


def _local_shape(full: tuple, name: str, tp_rank: int, tp: int) -> tuple:
    dim = tp_partition_dim(name)
    if dim is None or tp == 1:
        return full
    shape = list(full)
    base, rem = divmod(full[dim], tp)        # torch.tensor_split's sizes: the first `rem` get one more
    shape[dim] = base + (1 if tp_rank < rem else 0)
    return tuple(shape)


def write_portable(state: dict, run_dir: str, tokenizer: str | None = None) -> str:
    """A portable checkpoint tag in <run_dir>/checkpoints (atomic: a temp folder renamed, then `latest`)."""
    from ..train.checkpoint import atomic_write, tag_for, write_marker
    step = state["extra"]["step"]
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    final = os.path.join(ckpt_dir, tag_for(step))
    if os.path.exists(final):
        raise CheckpointError(f"{final} exists: reshard into a new run_dir (or remove that checkpoint)")
    os.makedirs(ckpt_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{tag_for(step)}.tmp-", dir=ckpt_dir)
    try:
        # files keep the per-GLU names (model/interchange.py)
        tensors = {f"param.{n}": t.float().contiguous() for n, t in to_interchange(state["weights"]).items()}
        for k in MOMENTS:
            tensors.update({f"{k}.{n}": t.float().contiguous() for n, t in to_interchange(state["moments"][k]).items()})
        tensors.update({f"buffer.{n}": t.contiguous() for n, t in state["buffers"].items()})
        save_file(tensors, os.path.join(tmp, PORTABLE_WEIGHTS), metadata={"format": FORMAT})
        meta = {"format": FORMAT, "optimizer_step": state["optimizer_step"], **state["extra"],
                "source_layout": state["source_layout"]}
        atomic_write(os.path.join(tmp, PORTABLE_META), json.dumps(meta, indent=2))
        atomic_write(os.path.join(tmp, "run_config.json"), json.dumps(state["run_config"], indent=2))
        if tokenizer and os.path.isfile(tokenizer):
            shutil.copyfile(tokenizer, os.path.join(tmp, "tokenizer.model"))
        write_marker(tmp, step, world_size=0)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write(os.path.join(ckpt_dir, "latest"), tag_for(step))
    return final


def reshard(source: str, run_dir: str, log=print) -> str:
    ckpt_dir, tag = resolve_tag(source)
    state = read_training_state(ckpt_dir, tag, log)
    tokenizer = os.path.join(ckpt_dir, tag, "tokenizer.model")
    out = write_portable(state, run_dir, tokenizer)
    n = sum(t.numel() for t in state["weights"].values())
    log(f"resharded {os.path.join(ckpt_dir, tag)} (step {state['extra']['step']}, layout {state['source_layout']}, "
        f"{n:,} parameters, Adam step {state['optimizer_step']:.0f}) -> {out}: any layout resumes from it")
    return out


@cli_main("pldr-reshard")
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="pldr-reshard", description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", help="run_dir/checkpoints (uses 'latest') or one run_dir/checkpoints/step_* folder")
    p.add_argument("run_dir", help="the run directory to continue in (its checkpoints/ receives the portable tag); "
                                   "then launch pldr-train with run_dir set to it, in any layout")
    a = p.parse_args(argv)
    reshard(a.checkpoint, a.run_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
