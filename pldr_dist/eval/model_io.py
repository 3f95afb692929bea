"""Loading a model for evaluation, and turning it into the fixed-G (G-cache) model.

A consolidated folder holds model.safetensors + config.json + tokenizer.model (+ metadata).
Loading prefers `pldr_dist.convert.load_consolidated` and `pldr_dist.infer.gcache_artifact`
when they exist; until then the few lines below read the same files.

"With the G-cache" for scoring (a full forward, no decoding) means: the model runs with a
fixed G_LM per layer (the artifact's, or one computed here from a prompt, by default the
single end-of-sequence token as the reference's inference-only v510Gi model does, spec §7)
instead of computing G_LM from every input.
"""
from __future__ import annotations

import json
import os
from typing import Optional, Sequence

import torch

from ..model import InferenceCache, PLDRConfig, PLDRModel

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
          "float16": torch.float16}


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"dtype={name!r} is unknown (choose one of {', '.join(DTYPES)})")
    return DTYPES[name]


def load_consolidated(folder: str):
    """(model, tokenizer or None) from a consolidated folder, on CPU in the stored dtype."""
    try:
        from ..convert import load_consolidated as real_loader   # the converter's, once merged
    except ImportError:
        real_loader = None
    if real_loader is not None:
        loaded = real_loader(folder)
        if isinstance(loaded, tuple):
            return loaded[0], loaded[1] if len(loaded) > 1 else None
        return loaded, _tokenizer_in(folder)
    from safetensors.torch import load_file

    for name in ("config.json", "model.safetensors"):
        if not os.path.isfile(os.path.join(folder, name)):
            raise FileNotFoundError(f"{folder}: no {name} (pass a consolidated folder written by pldr-convert)")
    with open(os.path.join(folder, "config.json")) as f:
        raw = json.load(f)
    cfg = PLDRConfig.from_dict(raw.get("model", raw))
    model = PLDRModel(cfg)
    model.load_state_dict(load_file(os.path.join(folder, "model.safetensors")))
    return model, _tokenizer_in(folder)


def _tokenizer_in(folder: str):
    from ..data.tokenizer import Tokenizer

    for name in ("tokenizer.model", "tokenizer/tokenizer.model"):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return Tokenizer(path)
    return None


def save_consolidated(model: PLDRModel, folder: str, tokenizer_path: Optional[str] = None) -> None:
    """Minimal writer of the same layout (tests and benchmarks); files are renamed into place."""
    from safetensors.torch import save_file
    import shutil

    os.makedirs(folder, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, os.path.join(folder, "model.safetensors.tmp"))
    os.replace(os.path.join(folder, "model.safetensors.tmp"), os.path.join(folder, "model.safetensors"))
    with open(os.path.join(folder, "config.json.tmp"), "w") as f:
        f.write(model.cfg.to_json())
    os.replace(os.path.join(folder, "config.json.tmp"), os.path.join(folder, "config.json"))
    if tokenizer_path:
        shutil.copyfile(tokenizer_path, os.path.join(folder, "tokenizer.model"))


@torch.no_grad()
def g_from_prompt(model: PLDRModel, prompt: Sequence[int]) -> list:
    """G_LM [h, dk, dk] of every layer, computed once from one prompt (the G-cache's content)."""
    if not model.cfg.learned_g:
        return [layer.attn.G_fixed.clone() for layer in model.layers]
    device = next(model.parameters()).device
    cache = InferenceCache(model.cfg.num_layers, use_kv=False, use_g=True)
    model(torch.as_tensor([list(prompt)], dtype=torch.long, device=device), cache=cache)
    return [g[0].clone() for g in cache.g_lm()]


def load_gcache(path: str) -> list:
    """Per-layer G_LM [h, dk, dk] from a G-cache artifact (folder or .safetensors file)."""
    try:
        from ..infer import gcache_artifact
    except ImportError:
        gcache_artifact = None
    if gcache_artifact is not None and hasattr(gcache_artifact, "load_gcache"):
        return list(gcache_artifact.load_gcache(path))
    from safetensors.torch import load_file

    file = os.path.join(path, "gcache.safetensors") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise FileNotFoundError(f"G-cache artifact {path!r} not found (export one with pldr-gcache)")
    tensors = load_file(file)
    keys = sorted((k for k in tensors if k.endswith("g_lm")), key=lambda k: int(k.split(".")[1]))
    if not keys:
        raise ValueError(f"{file}: no 'layers.<i>.g_lm' tensors (not a G-cache artifact)")
    return [tensors[k].reshape(tensors[k].shape[-3:]) for k in keys]


def with_fixed_g(model: PLDRModel, g_layers: Sequence[torch.Tensor]) -> PLDRModel:
    """A v510G copy of `model` whose G_LM is `g_layers`; the deductive network is dropped."""
    cfg = model.cfg
    if len(g_layers) != cfg.num_layers:
        raise ValueError(f"G-cache has {len(g_layers)} layers but the model has {cfg.num_layers}")
    fixed = PLDRModel(cfg.replace(mode="v510G", fixed_g="external"))
    param = next(model.parameters())
    fixed.to(device=param.device, dtype=param.dtype)
    state = {k: v for k, v in model.state_dict().items() if ".metric." not in k and ".power." not in k}
    for i, g in enumerate(g_layers):
        state[f"layers.{i}.attn.G_fixed"] = g.to(device=param.device, dtype=param.dtype)
    fixed.load_state_dict(state)
    return fixed.eval()


def load_for_eval(folder: str, gcache: Optional[str] = None, fixed_g_prompt: Optional[str] = None,
                  device: str = "cpu", dtype: str = "float32"):
    """(model, tokenizer) ready to evaluate: optional G-cache artifact, or fixed G from a prompt.

    fixed_g_prompt: "eos" (the reference's empty prompt, one end-of-sequence token) or any text.
    """
    model, tokenizer = load_consolidated(folder)
    model = model.to(device=device, dtype=parse_dtype(dtype)).eval()
    if gcache and fixed_g_prompt:
        raise ValueError("give either gcache=<artifact> or fixed_g=<prompt>, not both")
    if gcache:
        model = with_fixed_g(model, load_gcache(gcache))
    elif fixed_g_prompt:
        if fixed_g_prompt == "eos":
            prompt = [model.cfg.eos_id]
        elif tokenizer is None:
            raise ValueError(f"{folder}: no tokenizer.model to encode fixed_g={fixed_g_prompt!r} (use fixed_g=eos)")
        else:
            prompt = tokenizer.encode(fixed_g_prompt)
        model = with_fixed_g(model, g_from_prompt(model, prompt))
    return model, tokenizer
