"""Hugging Face `pldrllm` layout: names/shapes/keys follow the documented table; lossless round trip."""
import json
import re
from pathlib import Path

import pytest
import torch

from pldr_dist.convert.hf import CONFIG_KEYS, FIXED_KEYS, G_STATUS, G_VALUES, export_hf, import_hf
from pldr_dist.convert.names import NAME_TABLE, shape_of_authors_name
from pldr_dist.model import PLDRModel, preset
from safetensors.torch import load_file

DOCS = Path(__file__).resolve().parents[1] / "docs" / "checkpoints.md"
EXTRA_KEYS = {"reference_rope", "custom_G_type", "attention_dropout", "use_cache", "torch_dtype"}


def expected_names(cfg):
    names = set()
    for ours, theirs, _ in NAME_TABLE:
        if not cfg.learned_g and (".metric." in ours or ".power." in ours):
            continue
        for i in range(cfg.num_layers):
            for r in range(cfg.num_residual_units):
                for j in range(cfg.glus_per_unit):
                    for p in ("weight", "bias"):
                        names.add(theirs.format(i=i, r=r, j=j, p=p))
    return names


@pytest.mark.parametrize("overrides", [{}, {"rope_style": "half"}, {"mode": "v510G", "fixed_g": "random"}])
def test_hf_export_matches_table_and_round_trips_exactly(tmp_path, overrides):
    torch.manual_seed(0)
    cfg = preset("tiny", **overrides)
    model = PLDRModel(cfg).to(torch.float64).eval()
    folder = export_hf(model, tmp_path / "hf", dtype="fp64")
    config = json.loads((folder / "config.json").read_text())
    assert set(config) == set(CONFIG_KEYS) | set(FIXED_KEYS) | EXTRA_KEYS
    assert config["model_type"] == "pldrllm"
    assert config["reference_rope"] is (cfg.rope_style == "interleaved")
    assert config["custom_G_type"] == (None if cfg.learned_g else "random")
    tensors = load_file(folder / "model.safetensors")
    names = set(tensors) - {G_VALUES, G_STATUS}
    assert names == expected_names(cfg)
    for name in names:
        assert tuple(tensors[name].shape) == shape_of_authors_name(name, cfg), name
    if not cfg.learned_g:
        assert tensors[G_VALUES].shape == (cfg.num_layers, 3, 1, cfg.num_heads, cfg.head_dim, cfg.head_dim)
        assert torch.equal(tensors[G_VALUES][1, 2, 0], model.layers[1].attn.G_fixed)

    back = import_hf(folder)
    assert back.cfg == cfg
    for (k, a), (k2, b) in zip(model.state_dict().items(), back.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    tokens = torch.randint(4, cfg.vocab_size, (2, 11))
    assert torch.equal(model(tokens), back(tokens))


def test_docs_table_lists_every_name_and_key():
    text = DOCS.read_text()
    for ours, theirs, shape in NAME_TABLE:
        assert f"`{theirs}`" in text and f"`{ours}`" in text, theirs
    for key, field in CONFIG_KEYS.items():
        assert re.search(rf"`{key}`\s*\|\s*`{field}`", text), key
