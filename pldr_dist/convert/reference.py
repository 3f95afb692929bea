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
from typing import Optional

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


def from_reference_state_dict(state: dict, cfg: PLDRConfig, source="state dict",
                              fixed_g: Optional[torch.Tensor] = None) -> PLDRModel:
    """The model of a reference state dict.

    A checkpoint of the authors' v510G ablation holds no metric learner and no G (their fixed
    G_LM is a plain attribute, read from a pickle at start-up): `fixed_g` [L, h, dk, dk] gives
    it, and the model becomes mode v510G with that G."""
    tensors = {}
    for name, t in state.items():
        try:
            tensors[from_authors(_strip(name))] = t
        except KeyError:
            raise CheckpointError(f"{source}: tensor {name!r} is not a PLDR-LLM v510 parameter; "
                                  f"is this a reference v510 checkpoint?") from None
    learned = any(".attn.metric." in k or ".attn.power." in k for k in tensors)
    if fixed_g is None and not learned:
        raise CheckpointError(f"{source}: no metric learner in this checkpoint (the authors' v510G ablation, "
                              f"whose G_LM lives in a separate pickle): pass that G with --gcache "
                              f"<the authors' G_LM pickle or a G-cache artifact>")
    if fixed_g is not None:
        if learned:
            raise CheckpointError(f"{source}: this checkpoint has a metric learner (v510, G learned): --gcache "
                                  f"is for the v510G ablation's checkpoints; drop --gcache (make an inference-only "
                                  f"G-cache of the converted model with pldr-export-gcache)")
        cfg = cfg.replace(mode="v510G", fixed_g="external")
        want = (cfg.num_layers, cfg.num_heads, cfg.head_dim, cfg.head_dim)
        if tuple(fixed_g.shape) != want:
            raise CheckpointError(f"{source}: the fixed G_LM has shape {list(fixed_g.shape)}, the model needs "
                                  f"{list(want)}")
        dtype = next(iter(tensors.values())).dtype if tensors else torch.float32
        for i in range(cfg.num_layers):
            tensors[f"layers.{i}.attn.G_fixed"] = fixed_g[i].to(dtype)
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


def load_reference_checkpoint(path, cfg: PLDRConfig, fixed_g: Optional[torch.Tensor] = None) -> PLDRModel:
    """A reference torch.save file or DCP folder -> PLDRModel (cfg gives the architecture;
    fixed_g: the G_LM of a v510G checkpoint, see from_reference_state_dict)."""
    path = Path(path)
    if path.is_dir():
        try:
            state = _read_dcp_folder(path)
        except Exception as e:  # noqa: BLE001  (torch.distributed.checkpoint raises many types)
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise CheckpointError(f"{path}: cannot read as a torch.distributed.checkpoint folder ({first}); "
                                  f"pass the reference's .pt file or a complete DCP folder") from None
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
    return from_reference_state_dict(state, cfg, str(path), fixed_g)
