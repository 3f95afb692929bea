"""Consolidated folder: lossless save/load and one-line refusals of broken folders."""
import json

import pytest
import torch

from pldr_dist.convert.consolidated import CheckpointError, load_consolidated, load_metadata, save_consolidated
from pldr_dist.model import PLDRModel, preset


def tiny_model(**overrides):
    torch.manual_seed(0)
    return PLDRModel(preset("tiny", **overrides)).eval()


def test_save_load_is_bit_exact_with_metadata_and_tokenizer(tmp_path):
    model = tiny_model()
    tok = tmp_path / "sp.model"
    tok.write_bytes(b"spm")
    folder = save_consolidated(model, tmp_path / "ckpt", metadata={"step": 7, "tokens_seen": 1234}, tokenizer=tok)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "metadata.json", "model.safetensors", "tokenizer.model"]
    loaded = load_consolidated(folder)
    assert loaded.cfg == model.cfg
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    assert load_metadata(folder)["step"] == 7
    assert not list(tmp_path.glob(".ckpt.tmp-*"))  # no temporary folder left behind


def test_bf16_save_on_request(tmp_path):
    model = tiny_model()
    loaded = load_consolidated(save_consolidated(model, tmp_path / "b", dtype="bf16"))
    assert loaded.embed.tokens.weight.dtype == torch.bfloat16
    assert torch.equal(loaded.embed.tokens.weight, model.embed.tokens.weight.to(torch.bfloat16))


def test_refusals_name_the_file(tmp_path):
    model = tiny_model()
    folder = save_consolidated(model, tmp_path / "c")
    (folder / "config.json").rename(folder / "gone.json")
    with pytest.raises(CheckpointError, match="config.json: missing"):
        load_consolidated(folder)
    (folder / "gone.json").rename(folder / "config.json")

    wrong = dict(json.loads((folder / "config.json").read_text()), d_ff=100)
    (folder / "config.json").write_text(json.dumps(wrong))
    with pytest.raises(CheckpointError, match=r"model.safetensors does not match .*config.json: .*shape mismatches"):
        load_consolidated(folder)
    (folder / "config.json").write_text(json.dumps(dict(wrong, d_ff=170, mode="v510G")))
    with pytest.raises(CheckpointError, match="tensors missing .*unexpected tensors"):
        load_consolidated(folder)
    (folder / "config.json").write_text(model.cfg.to_json())

    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors: corrupt safetensors file"):
        load_consolidated(folder)
    (folder / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match="corrupt safetensors"):
        load_consolidated(folder)
