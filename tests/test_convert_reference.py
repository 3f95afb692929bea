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
