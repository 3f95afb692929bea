"""The G_LM cache artifact (spec §6) and the inference-only model built from it (spec §7 v510Gi).

An artifact is a safetensors file holding, per layer and head, G_LM and A_LM
([L, h, dk, dk] each) computed once from a source, plus metadata: mode ("v510Gi"), source
(prompt text / eos / identity / random), dtype, the sha256 fingerprint of the model it was
computed from (config and weights), and the creation time. A model loaded with an artifact
whose fingerprint differs is refused unless the caller says the G is foreign (the
transferred-G ablation uses another model's G on purpose).
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
from safetensors.torch import safe_open, save_file

from ..convert.consolidated import CheckpointError, build_model
from ..model import PLDRModel

SOURCES = ("prompt", "eos", "identity", "random")


class FingerprintError(CheckpointError):
    """The artifact was computed from a different model."""


@dataclass
class GCacheArtifact:
    g_lm: torch.Tensor            # [L, h, dk, dk]
    a_lm: torch.Tensor            # [L, h, dk, dk] (zeros for identity/random sources)
    meta: dict


def model_fingerprint(model: PLDRModel) -> str:
    """sha256 over the config and every tensor (file name, shape, fp32 bytes), in name order.

    Hashing fp32 values makes an fp32 and an fp64 copy of the same checkpoint agree.
    """
    h = hashlib.sha256(json.dumps(model.cfg.to_dict(), sort_keys=True).encode())
    for name, t in sorted(model.interchange_state_dict().items()):
        h.update(f"{name}:{list(t.shape)}".encode())
        h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


@torch.no_grad()
def compute_g_cache(model: PLDRModel, source: str = "eos", tokens: Optional[Sequence[int]] = None,
                    seed: int = 0) -> tuple:
    """(G_LM, A_LM), each [L, h, dk, dk], from one source (see SOURCES)."""
    cfg = model.cfg
    dtype = next(model.parameters()).dtype
    shape = (cfg.num_layers, cfg.num_heads, cfg.head_dim, cfg.head_dim)
    if source in ("identity", "random"):
        if source == "identity":
            g = torch.eye(cfg.head_dim, dtype=dtype).expand(shape).clone()
        else:
            g = torch.empty(shape, dtype=dtype)
            gen = torch.Generator().manual_seed(seed)
            for i in range(cfg.num_layers):  # xavier-normal scale, like the model's fixed_g=random
                g[i] = torch.randn(shape[1:], generator=gen, dtype=dtype) * (2.0 / (2 * cfg.head_dim)) ** 0.5
        return g, torch.zeros(shape, dtype=dtype)
    if source not in SOURCES:
        raise CheckpointError(f"G-cache source {source!r} is unknown (choose one of {', '.join(SOURCES)})")
    if not cfg.learned_g:
        raise CheckpointError("this model has a fixed G (mode v510G): its G_fixed is already the cache")
    if source == "eos":
        tokens = [cfg.eos_id]   # the reference tokenises the empty prompt as the single [END]
    if not tokens:
        raise CheckpointError("source 'prompt' needs at least one token (give a non-empty --text)")
    device = next(model.parameters()).device
    outs = model.deductive_outputs(torch.as_tensor([list(tokens)], device=device))
    g = torch.stack([o[2][0] for o in outs]).cpu()
    a_lm = torch.stack([o[0][0] for o in outs]).cpu()
    return g, a_lm


def save_artifact(path, g_lm: torch.Tensor, a_lm: torch.Tensor, model: Optional[PLDRModel], source: str,
                  source_detail: str = "", fingerprint: Optional[str] = None) -> Path:
    """Write an artifact under a temporary name, then rename it into place.

    fingerprint: the model's (default, computed from `model`), or "foreign:<name>" for a G
    that names no model of ours (the authors' pickle): loading it then needs --foreign-g."""
    path = Path(path)
    meta = {"mode": "v510Gi", "source": source, "source_detail": source_detail[:2000],
            "dtype": str(g_lm.dtype).replace("torch.", ""),
            "fingerprint": fingerprint if fingerprint is not None else model_fingerprint(model),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "shape": json.dumps(list(g_lm.shape))}
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file({"g_lm": g_lm.contiguous(), "a_lm": a_lm.contiguous()}, str(tmp), metadata=meta)
    os.replace(tmp, path)
    return path


def load_artifact(path, model: Optional[PLDRModel] = None, foreign: bool = False) -> GCacheArtifact:
    """Read an artifact; with `model`, refuse it unless it was computed from that model or foreign=True."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such G-cache artifact (make one with pldr-export-gcache)")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            g, a_lm = f.get_tensor("g_lm"), f.get_tensor("a_lm")
    except Exception as e:
        raise CheckpointError(f"{path}: corrupt or not a G-cache artifact ({str(e).splitlines()[0][:200]}); "
                              f"re-export it with pldr-export-gcache") from None
    art = GCacheArtifact(g, a_lm, meta)
    if model is not None:
        cfg = model.cfg
        want = (cfg.num_layers, cfg.num_heads, cfg.head_dim, cfg.head_dim)
        if tuple(g.shape) != want:
            raise CheckpointError(f"{path}: G_LM has shape {list(g.shape)}, the model needs {list(want)}")
        if not foreign and meta.get("fingerprint") != model_fingerprint(model):
            raise FingerprintError(f"{path}: fingerprint {meta.get('fingerprint', '?')[:12]}… was computed from "
                                   f"another model; re-export it from this model, or pass --foreign-g if "
                                   f"using another model's G is intended")
    return art


def is_safetensors(path) -> bool:
    """A safetensors file starts with its header's length (u64) and the JSON header's '{'."""
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{"


def load_fixed_g(path, cfg) -> torch.Tensor:
    """G_LM [L, h, dk, dk] for a model of `cfg`, from a G-cache artifact or the authors' G_LM pickle.

    The artifact's fingerprint is not checked: a fixed G is given on purpose (a v510G model)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such G-cache artifact or G_LM pickle")
    if is_safetensors(path):
        g = load_artifact(path).g_lm
    else:
        from ..convert.safe_pickle import load_g_lm_pickle
        g = torch.stack(load_g_lm_pickle(path, cfg.num_layers, cfg.num_heads, cfg.head_dim))
    want = (cfg.num_layers, cfg.num_heads, cfg.head_dim, cfg.head_dim)
    if tuple(g.shape) != want:
        raise CheckpointError(f"{path}: G_LM has shape {list(g.shape)}, the model needs {list(want)} "
                              f"(does the --preset / --config match the model the G was made for?)")
    return g


def parameter_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def to_inference_model(model: PLDRModel, artifact: GCacheArtifact, foreign: bool = False) -> PLDRModel:
    """The v510Gi model: mode v510G, no metric learner or W,b,P,alpha,beta, G_fixed = artifact G.

    Refuses an artifact from another model unless foreign=True. The returned model keeps the
    source model's dtype and device.
    """
    if not foreign and artifact.meta.get("fingerprint") != model_fingerprint(model):
        raise FingerprintError("G-cache artifact was computed from another model; pass foreign=True "
                               "(--foreign-g) to use it anyway")
    cfg = model.cfg.replace(mode="v510G", fixed_g="external", dag_coeffs=(0.0, 0.0, 0.0))
    ref = next(model.parameters())
    tensors = {k: v for k, v in model.state_dict().items() if ".attn.metric." not in k and ".attn.power." not in k}
    for i in range(cfg.num_layers):
        tensors[f"layers.{i}.attn.G_fixed"] = artifact.g_lm[i].to(ref.device, ref.dtype)
    return build_model(cfg, {k: v.detach().clone() for k, v in tensors.items()}, "model", "artifact")
