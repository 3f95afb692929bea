"""Loading a model for evaluation, and turning it into the fixed-G (G-cache) model.

Every file is read by the one loader of its kind: the consolidated folder by
`pldr_dist.convert.consolidated.load_consolidated`, the G-cache artifact by
`pldr_dist.infer.gcache_artifact.load_artifact`; their errors (CheckpointError,
FingerprintError, TokenizerError) name the file and the fix.

"With the G-cache" for scoring (a full forward, no decoding) means: the model runs with a
fixed G_LM per layer (the artifact's, or one computed here from a prompt, by default the
single end-of-sequence token as the reference's inference-only v510Gi model does, spec §7)
instead of computing G_LM from every input.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..convert.consolidated import load_consolidated, tokenizer_path
from ..errors import InputError
from ..infer.gcache_artifact import load_artifact, to_inference_model
from ..model import InferenceCache, PLDRModel
from ..model.ablation import fixed_g_copy

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
          "float16": torch.float16}


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise InputError(f"dtype={name!r} is unknown (choose one of {', '.join(DTYPES)})")
    return DTYPES[name]


@torch.no_grad()
def g_from_prompt(model: PLDRModel, prompt: Sequence[int]) -> list:
    """G_LM [h, dk, dk] of every layer, computed once from one prompt (the G-cache's content)."""
    if not model.cfg.learned_g:
        return [layer.attn.G_fixed.clone() for layer in model.layers]
    device = next(model.parameters()).device
    cache = InferenceCache(model.cfg.num_layers, use_kv=False, use_g=True)
    model(torch.as_tensor([list(prompt)], dtype=torch.long, device=device), cache=cache)
    return [g[0].clone() for g in cache.g_lm()]


def with_fixed_g(model: PLDRModel, g_layers: Sequence[torch.Tensor]) -> PLDRModel:
    """A v510G copy of `model` whose G_LM is `g_layers`; the deductive network is dropped."""
    if len(g_layers) != model.cfg.num_layers:
        raise InputError(f"G-cache has {len(g_layers)} layers but the model has {model.cfg.num_layers}")
    param = next(model.parameters())
    return fixed_g_copy(model, [g.to(device=param.device, dtype=param.dtype) for g in g_layers]).eval()


def load_for_eval(folder: str, gcache: Optional[str] = None, fixed_g_prompt: Optional[str] = None,
                  device: str = "cpu", dtype: str = "float32", foreign_g: bool = False):
    """(model, tokenizer or None) ready to evaluate: optional G-cache artifact, or fixed G from a prompt.

    fixed_g_prompt: "eos" (the reference's empty prompt, one end-of-sequence token) or any text.
    An artifact computed from another model is refused unless foreign_g (as pldr-generate does).
    """
    if gcache and fixed_g_prompt:
        raise InputError("give either a G-cache artifact (--gcache) or a prompt for a fixed G (--fixed-g), not both")
    torch_dtype = parse_dtype(dtype)
    model = load_consolidated(folder)   # in the file's dtype: the artifact's fingerprint is of that model
    path = tokenizer_path(folder)
    tokenizer = None
    if path is not None:
        from ..data.tokenizer import Tokenizer
        tokenizer = Tokenizer.from_file(str(path))
    if gcache:
        model = to_inference_model(model, load_artifact(gcache, model, foreign_g), foreign_g)
    model = model.to(device=device, dtype=torch_dtype).eval()
    if fixed_g_prompt:
        if fixed_g_prompt == "eos":
            prompt = [model.cfg.eos_id]
        elif tokenizer is None:
            raise InputError(f"{folder}: no tokenizer.model to encode fixed_g={fixed_g_prompt!r} (use fixed_g=eos)")
        else:
            prompt = tokenizer.encode(fixed_g_prompt)
        model = with_fixed_g(model, g_from_prompt(model, prompt))
    return model, tokenizer
