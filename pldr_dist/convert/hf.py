"""Export to / import from the authors' Hugging Face layout (Transformers model_type `pldrllm`).

Upstream: huggingface/transformers src/transformers/models/pldrllm/configuration_pldrllm.py
(PldrllmConfig) and modeling_pldrllm.py (PldrllmForCausalLM: `decoder.*` + `final_layer.*`),
as stored at commit a28acc8ba959627a847f61feb770b465fd5c6f1a. Tensor names follow
names.NAME_TABLE; CONFIG_KEYS below is the config table (docs/checkpoints.md shows both).

Rotary style: upstream `reference_rope=True` is the reference's torchtune RoPE (interleaved
pairs, v51); `reference_rope=False` is the Llama rotate-half RoPE (their v52 models).
Fixed G (mode v510G): upstream `custom_G_type` in identity|random|external drops the metric
learner and W,b,P,alpha,beta and keeps G in the persistent buffer
`decoder.past_G_values` [L, 3, 1, h, dk, dk] ([:, 2] = G_LM; [:, 0] = A and [:, 1] = A_LM are
zeros) with `decoder.past_G_values_status` [L] (all True).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..model import PLDRConfig, PLDRModel
from .consolidated import CONFIG, DTYPES, WEIGHTS, CheckpointError, build_model, read_json, \
    read_safetensors, write_folder_atomically
from .names import from_authors, to_authors

# upstream config key -> PLDRConfig field (None: derived or fixed, see FIXED_KEYS / below)
CONFIG_KEYS = {
    "vocab_size": "vocab_size",
    "hidden_size": "d_model",
    "intermediate_size": "d_ff",
    "num_hidden_layers": "num_layers",
    "num_attention_heads": "num_heads",
    "head_dim": "head_dim",
    "A_dff": "a_dff",
    "num_reslayerA": "num_residual_units",
    "num_denseA": "glus_per_unit",
    "max_position_embeddings": "context_length",
    "layer_norm_eps": "ln_eps",
    "rope_theta": "rope_base",
    "pad_token_id": "pad_id",
    "bos_token_id": "bos_id",
    "eos_token_id": "eos_id",
}
# Keys whose value PLDRModel's architecture fixes; import refuses other values.
FIXED_KEYS = {
    "model_type": "pldrllm",
    "architectures": ["PldrllmForCausalLM"],
    "hidden_act": "silu",
    "attention_bias": True,
    "glu_bias": True,
    "final_bias": True,
    "tie_word_embeddings": False,
    "rope_scaling": None,
}
G_VALUES, G_STATUS = "decoder.past_G_values", "decoder.past_G_values_status"
TORCH_DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp64": "float64"}


def hf_config(cfg: PLDRConfig, dtype: str = "fp32") -> dict:
    out = {key: getattr(cfg, field) for key, field in CONFIG_KEYS.items()}
    out.update(FIXED_KEYS)
    out["reference_rope"] = cfg.rope_style == "interleaved"
    out["custom_G_type"] = None if cfg.learned_g else cfg.fixed_g
    out["attention_dropout"] = 0.0
    out["use_cache"] = True
    out["torch_dtype"] = TORCH_DTYPE_NAMES[dtype]
    return out


def hf_tensors(model: PLDRModel, dtype: str = "fp32") -> dict:
    cfg, cast = model.cfg, DTYPES[dtype]
    out = {}
    for name, t in model.interchange_state_dict().items():
        if name.endswith("attn.G_fixed"):
            continue
        out[to_authors(name)] = t.detach().cpu().to(cast).contiguous()
    if not cfg.learned_g:
        g = torch.stack([layer.attn.G_fixed.detach().cpu().to(cast) for layer in model.layers])
        values = torch.zeros(cfg.num_layers, 3, 1, cfg.num_heads, cfg.head_dim, cfg.head_dim, dtype=cast)
        values[:, 2, 0] = g
        out[G_VALUES] = values
        out[G_STATUS] = torch.ones(cfg.num_layers, dtype=torch.bool)
    return out


def export_hf(model: PLDRModel, folder, dtype: str = "fp32", tokenizer=None) -> Path:
    import shutil

    def fill(tmp: Path):
        save_file(hf_tensors(model, dtype), str(tmp / WEIGHTS), metadata={"format": "pt"})
        (tmp / CONFIG).write_text(json.dumps(hf_config(model.cfg, dtype), indent=2) + "\n")
        if tokenizer is not None:
            shutil.copyfile(tokenizer, tmp / "tokenizer.model")

    return write_folder_atomically(folder, fill)


def config_from_hf(d: dict, path="config.json") -> PLDRConfig:
    for key, want in FIXED_KEYS.items():
        if key in d and d[key] != want and key != "architectures":
            raise CheckpointError(f"{path}: {key}={d[key]!r} is not supported by pldr_dist (needs {want!r})")
    missing = [k for k in CONFIG_KEYS if k not in d]
    if missing:
        raise CheckpointError(f"{path}: missing keys {missing}; is this a pldrllm config.json?")
    fields = {field: d[key] for key, field in CONFIG_KEYS.items()}
    fields["rope_style"] = "interleaved" if d.get("reference_rope", True) else "half"
    g_type = d.get("custom_G_type")
    if g_type is not None:
        if g_type not in ("identity", "random", "external"):
            raise CheckpointError(f"{path}: custom_G_type={g_type!r} is unknown (identity, random, external or null)")
        fields.update(mode="v510G", fixed_g=g_type)
    try:
        return PLDRConfig(**fields)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None


def import_hf(folder, dtype: str | None = None) -> PLDRModel:
    folder = Path(folder)
    cfg = config_from_hf(read_json(folder / CONFIG, "Hugging Face config"), folder / CONFIG)
    raw = read_safetensors(folder / WEIGHTS)
    tensors = {}
    g_values = raw.pop(G_VALUES, None)
    raw.pop(G_STATUS, None)
    for name, t in raw.items():
        try:
            tensors[from_authors(name)] = t
        except KeyError:
            raise CheckpointError(f"{folder / WEIGHTS}: tensor {name!r} is not a pldrllm parameter pldr_dist knows") from None
    if not cfg.learned_g:
        want = (cfg.num_layers, 3, 1, cfg.num_heads, cfg.head_dim, cfg.head_dim)
        if g_values is None or tuple(g_values.shape) != want:
            raise CheckpointError(f"{folder / WEIGHTS}: custom_G_type is set but {G_VALUES} is missing or not "
                                  f"of shape {list(want)}; re-export the model with its G values")
        for i in range(cfg.num_layers):
            tensors[f"layers.{i}.attn.G_fixed"] = g_values[i, 2, 0]
    if dtype is not None:
        tensors = {k: v.to(DTYPES[dtype]) for k, v in tensors.items()}
    return build_model(cfg, tensors, folder / WEIGHTS, folder / CONFIG)
