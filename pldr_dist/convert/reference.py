"""Move models to and from the authors' PyTorch reference (PLDR-LLM-with-KVG-cache, v510).

The reference saves either `torch.save({'model_state_dict': ..., 'loss': ..., ...})`
(pldr_run_model_v510.py save_model / fsdp_save_model) or a torch.distributed.checkpoint
folder of `{"app": {"model": state_dict, "optim": ...}}` (save_dcp_model). Its parameter
names are those of names.NAME_TABLE; DDP/compile prefixes (`module.`, `_orig_mod.`) are
stripped. Its rotary tables are non-persistent buffers, so they are not in the file.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from ..model import PLDRConfig, PLDRModel
from .consolidated import CheckpointError, build_model
from .names import from_authors, to_authors

PREFIXES = ("module.", "_orig_mod.")


def to_reference_state_dict(model: PLDRModel) -> dict:
    if not model.cfg.learned_g:
        raise CheckpointError("the reference's v510 model has a learned G; a v510G model has no metric "
                              "learner to export (export the v510 model, or use pldr-export-gcache for its G)")
    return {to_authors(k): v.detach().cpu().clone() for k, v in model.interchange_state_dict().items()}


def save_reference_checkpoint(model: PLDRModel, path) -> Path:
    """A file the reference's load_model() reads: {'model_state_dict': ...}."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save({"model_state_dict": to_reference_state_dict(model)}, tmp)
    os.replace(tmp, path)
    return path


def _strip(name: str) -> str:
    changed = True
    while changed:
        changed = False
        for p in PREFIXES:
            if name.startswith(p):
                name, changed = name[len(p):], True
    return name


def from_reference_state_dict(state: dict, cfg: PLDRConfig, source="state dict") -> PLDRModel:
    tensors = {}
    for name, t in state.items():
        try:
            tensors[from_authors(_strip(name))] = t
        except KeyError:
            raise CheckpointError(f"{source}: tensor {name!r} is not a PLDR-LLM v510 parameter; "
                                  f"is this a reference v510 checkpoint?") from None
    return build_model(cfg, tensors, source, "the given config")


def _read_dcp_folder(folder: Path) -> dict:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "full.pt"
        dcp_to_torch_save(str(folder), str(out))
        full = torch.load(out, map_location="cpu", weights_only=True)
    if "app" in full and isinstance(full["app"], dict):
        full = full["app"]
    if "model" in full and isinstance(full["model"], dict):
        return full["model"]
    return {k[len("app.model."):] if k.startswith("app.model.") else k: v for k, v in full.items()}


def load_reference_checkpoint(path, cfg: PLDRConfig) -> PLDRModel:
    """A reference torch.save file or DCP folder -> PLDRModel (cfg gives the architecture)."""
    path = Path(path)
    if path.is_dir():
        state = _read_dcp_folder(path)
    elif path.is_file():
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(f"{path}: cannot read as a torch.save file ({str(e).splitlines()[0][:200]})") from None
        state = obj.get("model_state_dict", obj) if isinstance(obj, dict) else None
        if not isinstance(state, dict):
            raise CheckpointError(f"{path}: expected a dict with 'model_state_dict' (the reference's save_model format)")
    else:
        raise CheckpointError(f"{path}: no such reference checkpoint file or folder")
    return from_reference_state_dict(state, cfg, str(path))
