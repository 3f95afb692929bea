"""The consolidated checkpoint folder: one model, one process, no parallel layout.

    folder/model.safetensors   every parameter and buffer of PLDRModel, by its state_dict name
    folder/config.json         PLDRConfig.to_dict()
    folder/metadata.json       step, tokens seen, source layout, dtype, ... (free-form facts)
    folder/tokenizer.model     optional SentencePiece model

Writing goes to a temporary sibling folder that is renamed into place, so a reader never
sees half a checkpoint. Loading checks every file and that the config describes exactly the
tensors in the file, and says which file is wrong and how to fix it.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import PLDRError
from ..model import PLDRConfig, PLDRModel
from ..model.interchange import to_interchange

WEIGHTS, CONFIG, METADATA, TOKENIZER = "model.safetensors", "config.json", "metadata.json", "tokenizer.model"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp64": torch.float64}


class CheckpointError(PLDRError, ValueError):
    """A checkpoint folder or file that cannot be loaded as asked; the message says the fix."""


def write_folder_atomically(folder, fill) -> Path:
    """Call fill(tmp_folder) then rename tmp_folder to folder (replacing an old one)."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        fill(tmp)
        if folder.exists():
            old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
            os.rename(folder, old)
            os.rename(tmp, folder)
            shutil.rmtree(old)
        else:
            os.rename(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def model_tensors(model: PLDRModel, dtype: torch.dtype = torch.float32) -> dict:
    """The interchange state dict as contiguous CPU tensors (floating tensors cast to dtype)."""
    out = {}
    for name, t in model.interchange_state_dict().items():
        t = t.detach().cpu()
        if t.is_floating_point():
            t = t.to(dtype)
        out[name] = t.contiguous()
    return out


def save_consolidated(model: PLDRModel, folder, dtype: str = "fp32", metadata: Optional[dict] = None,
                      tokenizer: Optional[str] = None) -> Path:
    if dtype not in DTYPES:
        raise CheckpointError(f"dtype={dtype!r} is unknown (choose one of {', '.join(DTYPES)})")
    meta = {"format": "pldr_dist.consolidated/1", "dtype": dtype, **(metadata or {})}

    def fill(tmp: Path):
        save_file(model_tensors(model, DTYPES[dtype]), str(tmp / WEIGHTS), metadata={"format": "pt"})
        (tmp / CONFIG).write_text(model.cfg.to_json() + "\n")
        (tmp / METADATA).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        if tokenizer is not None:
            shutil.copyfile(tokenizer, tmp / TOKENIZER)

    return write_folder_atomically(folder, fill)


def read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{path}: missing {what}; is this a folder written by save_consolidated / pldr-consolidate?")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e}); restore the file from the original checkpoint") from None


def read_safetensors(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{path}: missing weights file; re-run the export that wrote this folder")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors file ({str(e).splitlines()[0]}); "
                              f"re-export it or copy it again from the source") from None


def load_config(folder) -> PLDRConfig:
    path = Path(folder) / CONFIG
    try:
        return PLDRConfig.from_dict(read_json(path, "model config"))
    except (TypeError, ValueError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{path}: {e}") from None


def check_tensors_match(model: PLDRModel, tensors: dict, weights_path, config_path) -> None:
    """Names and shapes in the file must be exactly the model's, or say which differ."""
    expected = {k: tuple(v.shape) for k, v in model.interchange_state_dict().items()}
    got = {k: tuple(v.shape) for k, v in to_interchange(tensors).items()}
    missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
    wrong = sorted(k for k in set(expected) & set(got) if expected[k] != got[k])
    if missing or extra or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} tensors missing (e.g. {missing[0]})")
        if extra:
            parts.append(f"{len(extra)} unexpected tensors (e.g. {extra[0]})")
        if wrong:
            k = wrong[0]
            parts.append(f"{len(wrong)} shape mismatches (e.g. {k}: file {list(got[k])}, config {list(expected[k])})")
        raise CheckpointError(f"{weights_path} does not match {config_path}: {'; '.join(parts)}; "
                              f"use the config.json written with these weights")


def build_model(cfg: PLDRConfig, tensors: dict, weights_path="weights", config_path="config") -> PLDRModel:
    """A model of cfg holding exactly `tensors` (dtype taken from the tensors)."""
    with torch.device("meta"):
        model = PLDRModel(cfg)
    check_tensors_match(model, tensors, weights_path, config_path)
    # Fresh (aligned) storage: tensors viewing into a safetensors blob can sit at unaligned
    # addresses, and CPU kernels then take other SIMD paths (last-bit different results).
    model.load_state_dict({k: v.clone(memory_format=torch.contiguous_format) for k, v in tensors.items()}, assign=True)
    return model.eval()


def load_consolidated(folder, dtype: Optional[str] = None) -> PLDRModel:
    """The model in `folder`, in the file's dtype or the one asked (fp32/bf16/fp64)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such checkpoint folder")
    cfg = load_config(folder)
    tensors = read_safetensors(folder / WEIGHTS)
    if dtype is not None:
        tensors = {k: v.to(DTYPES[dtype]) if v.is_floating_point() else v for k, v in tensors.items()}
    return build_model(cfg, tensors, folder / WEIGHTS, folder / CONFIG)


def load_metadata(folder) -> dict:
    path = Path(folder) / METADATA
    return read_json(path, "metadata") if path.is_file() else {}


def tokenizer_path(folder) -> Optional[Path]:
    path = Path(folder) / TOKENIZER
    return path if path.is_file() else None
