"""The authors' reference (v510) state dict: torch.save file and DCP folder, both ways."""
import torch
import torch.distributed.checkpoint as dcp

from pldr_dist.convert.reference import load_reference_checkpoint, save_reference_checkpoint, to_reference_state_dict
from pldr_dist.model import PLDRModel, preset


def test_reference_file_and_dcp_folder_round_trip_exactly(tmp_path):
    torch.manual_seed(0)
    cfg = preset("tiny")
    model = PLDRModel(cfg).to(torch.float64).eval()
    state = to_reference_state_dict(model)
    assert "decoder.dec_layers.1.mha1.plgatt_layer.pwlst" in state
    assert "decoder.dec_layers.0.mha1.reslayerAs.1.denseAs.0.gluw3.weight" in state
    assert "final_layer.bias" in state and len(state) == len(model.interchange_state_dict())

    save_reference_checkpoint(model, tmp_path / "ref.pt")
    from_file = load_reference_checkpoint(tmp_path / "ref.pt", cfg)
    # the reference saves DDP-wrapped models too: "module." prefixes are accepted
    torch.save({"model_state_dict": {f"module.{k}": v for k, v in state.items()}, "loss": 1.0}, tmp_path / "ddp.pt")
    from_ddp = load_reference_checkpoint(tmp_path / "ddp.pt", cfg)
    dcp.save({"app": {"model": state, "optim": None}}, checkpoint_id=str(tmp_path / "dcp"))
    from_dcp = load_reference_checkpoint(tmp_path / "dcp", cfg)

    tokens = torch.randint(4, cfg.vocab_size, (2, 9))
    want = model(tokens)
    for other in (from_file, from_ddp, from_dcp):
        for (k, a), (_, b) in zip(model.state_dict().items(), other.state_dict().items()):
            assert torch.equal(a, b), k
        assert torch.equal(other(tokens), want)


def test_v510G_ablation_checkpoint_imports_with_its_fixed_g(tmp_path):
    """The authors' v510G checkpoint holds no metric learner and no G (their plga_layer keeps the
    predefined G_LM as a plain attribute, read from a pickle): `from-reference --gcache` takes
    that G from their pickle or from a G-cache artifact, and the model computes as theirs."""
    import pickle

    from pldr_dist.convert.cli import main as convert
    from pldr_dist.convert.consolidated import load_consolidated, load_metadata
    from pldr_dist.convert.names import to_authors
    from pldr_dist.infer.gcache_artifact import load_artifact

    torch.manual_seed(0)
    model = PLDRModel(preset("tiny", mode="v510G", fixed_g="random")).eval()
    g = torch.stack([layer.attn.G_fixed for layer in model.layers])
    state = {to_authors(k): v for k, v in model.interchange_state_dict().items() if not k.endswith("G_fixed")}
    assert not any("plgatt_layer" in k or "reslayerAs" in k or ".mha1.layernorm" in k for k in state)
    torch.save({"model_state_dict": state, "loss": 1.0}, tmp_path / "v510G.pt")
    (tmp_path / "G_LM.pkl").write_bytes(pickle.dumps([gi[None].clone() for gi in g]))   # theirs: [1, h, dk, dk]

    tokens = torch.randint(4, 512, (2, 9))
    convert(["from-reference", str(tmp_path / "v510G.pt"), str(tmp_path / "from_pkl"), "--preset", "tiny",
             "--gcache", str(tmp_path / "G_LM.pkl")])
    convert(["g-pickle", str(tmp_path / "G_LM.pkl"), str(tmp_path / "art.safetensors"), "--preset", "tiny"])
    convert(["from-reference", str(tmp_path / "v510G.pt"), str(tmp_path / "from_art"), "--preset", "tiny",
             "--gcache", str(tmp_path / "art.safetensors")])
    for name in ("from_pkl", "from_art"):
        back = load_consolidated(tmp_path / name)
        assert back.cfg.mode == "v510G" and not back.cfg.learned_g
        assert torch.equal(torch.stack([layer.attn.G_fixed for layer in back.layers]), g)
        assert torch.equal(back(tokens), model(tokens))
        assert load_metadata(tmp_path / name)["source"] == "reference:v510G.pt"

    # the artifact names the pickle by its file name only: no machine's paths
    meta = load_artifact(tmp_path / "art.safetensors").meta
    assert meta["source_detail"] == "G_LM.pkl" and meta["fingerprint"] == "foreign:G_LM.pkl"
    assert not any(str(tmp_path) in str(v) for v in meta.values()), meta
