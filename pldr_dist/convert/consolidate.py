"""`pldr-consolidate`: a training checkpoint of any layout (TP x PP, ZeRO 0-3) -> one folder
(model.safetensors + config.json + tokenizer + metadata.json) with the single-process names.

Where the weights come from:
- fp32 runs with ZeRO 0/1/2: DeepSpeed's module files, which hold the exact fp32 training
  weights: `mp_rank_XX_model_states.pt` (one per TP rank, PP = 1) or
  `layer_LL-model_XX-model_states.pt` (one per pipeline layer and TP rank). TP slices are
  concatenated along `tp_partition_dim` -> bit-identical to the training weights.
- ZeRO-3 or bf16 (TP = PP = 1): the fp32 master weights, through DeepSpeed's
  `get_fp32_state_dict_from_zero_checkpoint`.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import sys

import torch

from ..errors import cli_main
from ..model import PLDRModel
from ..model.interchange import from_interchange
from ..parallel.flat_layers import unflatten_state
from ..parallel.tensor_parallel import tp_partition_dim
from .consolidated import CheckpointError, save_consolidated


def resolve_tag(path: str) -> tuple[str, str]:
    """(checkpoints dir, tag) from a run's checkpoints folder (its `latest`) or a tag folder."""
    path = os.path.abspath(path)
    if os.path.isfile(os.path.join(path, "COMPLETE.json")):
        return os.path.dirname(path), os.path.basename(path)
    latest = os.path.join(path, "latest")
    if not os.path.isfile(latest):
        raise CheckpointError(f"{path} is neither a checkpoint folder (step_*/COMPLETE.json) nor a run's checkpoints "
                              f"folder with a 'latest' file (pass run_dir/checkpoints)")
    tag = open(latest).read().strip()
    if not os.path.isfile(os.path.join(path, tag, "COMPLETE.json")):
        raise CheckpointError(f"{os.path.join(path, tag)} is incomplete (no COMPLETE.json); pass an older step_* folder")
    return path, tag


def _load(path: str) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # torch raises several types for truncated or foreign files
        raise CheckpointError(f"{path} could not be read ({type(e).__name__}); the checkpoint is corrupt") from None


def _merge_tp(parts: list[dict]) -> dict:
    out = {}
    for name in parts[0]:
        dim = tp_partition_dim(name)
        if dim is None or len(parts) == 1:
            out[name] = parts[0][name]
        else:
            if name.endswith("G_fixed"):
                dim = parts[0][name].dim() - 3
            out[name] = torch.cat([p[name] for p in parts], dim=dim)
    return out


def _pipeline_name(index: int, last: int, name: str) -> str:
    if index in (0, last):
        return name
    return f"layers.{index - 1}.{name.removeprefix('layer.')}"


def gather_weights(ckpt_dir: str, tag: str, run: dict) -> dict:
    tag_dir = os.path.join(ckpt_dir, tag)
    tp, pp = run["parallel"]["tp"], run["parallel"]["pp"]
    zero, precision = run["parallel"]["zero_stage"], run["train"]["precision"]
    if zero == 3 or (precision == "bf16"):
        if tp > 1 or pp > 1:
            raise CheckpointError(f"{tag_dir}: ZeRO-3/bf16 consolidation supports tp=pp=1 only (this run: tp={tp} pp={pp})")
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        return dict(get_fp32_state_dict_from_zero_checkpoint(ckpt_dir, tag=tag))
    if pp == 1:
        parts = []
        for r in range(tp):
            path = os.path.join(tag_dir, f"mp_rank_{r:02d}_model_states.pt")
            if not os.path.isfile(path):
                raise CheckpointError(f"{path} is missing (the checkpoint does not match its layout tp={tp})")
            parts.append(_load(path)["module"])
        return _merge_tp(parts)
    layers = sorted({int(m.group(1)) for f in glob.glob(os.path.join(tag_dir, "layer_*-model_*-model_states.pt"))
                     if (m := re.search(r"layer_(\d+)-model_", f))})
    if not layers:
        raise CheckpointError(f"{tag_dir} has no layer_*-model_*-model_states.pt files for its pipeline layout pp={pp}")
    out = {}
    for index in layers:
        parts = []
        for r in range(tp):
            path = os.path.join(tag_dir, f"layer_{index:02d}-model_{r:02d}-model_states.pt")
            if not os.path.isfile(path):
                raise CheckpointError(f"{path} is missing (the checkpoint does not match its layout tp={tp})")
            parts.append(_load(path))
        for name, tensor in _merge_tp(parts).items():
            out[_pipeline_name(index, layers[-1], name)] = tensor
    return out


def read_run_config(tag_dir: str):
    """(the run config dict a checkpoint was written with, its model's PLDRConfig)."""
    from ..train.config import RunConfig, _build
    path = os.path.join(tag_dir, "run_config.json")
    try:
        with open(path) as f:
            run = json.load(f)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read it ({e.strerror or e}); every complete checkpoint has one "
                              f"(pass another step_* folder)") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e}); the checkpoint is corrupt (pass another step_* "
                              f"folder)") from None
    return run, _build(RunConfig, run, "", path).model_config()


def consolidate(path: str, out: str, dtype: str = "fp32", log=print) -> str:
    ckpt_dir, tag = resolve_tag(path)
    tag_dir = os.path.join(ckpt_dir, tag)
    run, cfg = read_run_config(tag_dir)
    weights = {k: v.float() if v.is_floating_point() else v for k, v in gather_weights(ckpt_dir, tag, run).items()}
    weights = from_interchange(weights)     # a checkpoint written before the stacking has per-GLU names
    weights = unflatten_state(weights, cfg)  # ZeRO-2/3's one tensor per decoder layer (parallel/flat_layers.py)
    with torch.device("meta"):
        expected = PLDRModel(cfg).state_dict()
    missing, extra = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
    if missing or extra:
        raise CheckpointError(f"{tag_dir}: weights do not match the run's model config "
                              f"(missing {missing[:3]}, unexpected {extra[:3]})")
    model = PLDRModel(cfg)
    model.load_state_dict(weights, strict=True)
    extra_state = _load(os.path.join(tag_dir, "rank_00000.pt"))
    tokenizer = os.path.join(tag_dir, "tokenizer.model")
    meta = {"step": extra_state["step"], "tokens_seen": extra_state["tokens"], "source_checkpoint": tag_dir,
            "source_layout": {k: run["parallel"][k] for k in ("tp", "pp", "zero_stage")},
            "source_precision": run["train"]["precision"]}
    folder = save_consolidated(model, out, dtype=dtype, metadata=meta,
                               tokenizer=tokenizer if os.path.isfile(tokenizer) else None)
    log(f"consolidated {tag_dir} (step {meta['step']}, layout {meta['source_layout']}) -> {folder} ({dtype})")
    return str(folder)


@cli_main("pldr-consolidate")
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="pldr-consolidate", description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", help="run_dir/checkpoints (uses 'latest') or one run_dir/checkpoints/step_* folder")
    p.add_argument("out", help="output folder")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    a = p.parse_args(argv)
    consolidate(a.checkpoint, a.out, a.dtype)
    return 0


if __name__ == "__main__":
    sys.exit(main())
