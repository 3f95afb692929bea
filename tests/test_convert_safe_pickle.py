"""The authors' G_LM pickle: read safely on CPU, statistics as documented, unsafe pickles refused."""
import os
import pickle
from pathlib import Path

import pytest
import torch

from pldr_dist.convert.safe_pickle import UnsafePickleError, load_g_lm_pickle, load_tensor_pickle
from pldr_dist.model import PLDRModel, preset

PKL = Path(__file__).resolve().parents[1] / "data" / "reference" / "predefined_G_LM_PLDRv51_110M_paper.pkl"


def test_paper_g_lm_pickle_matches_readme_statistics():
    raw = load_tensor_pickle(PKL)
    assert len(raw) == 5
    assert all(t.shape == (1, 14, 64, 64) and t.dtype == torch.float32 and t.device.type == "cpu" for t in raw)
    for layer, (mean, std) in ((0, (-0.0437, 1.952)), (1, (0.0357, 2.055))):
        assert abs(raw[layer].mean().item() - mean) < 5e-5
        assert abs(raw[layer].std().item() - std) < 5e-4


class _Boom:
    def __reduce__(self):
        return (os.system, ("touch SHOULD_NOT_EXIST",))


class _Eval:
    def __reduce__(self):
        return (eval, ("1+1",))


@pytest.mark.parametrize("payload", [_Boom(), [torch.zeros(1).numpy(), _Eval()]])
def test_pickle_calling_anything_else_is_refused_without_running(tmp_path, monkeypatch, payload):
    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "bad.pkl"
    bad.write_bytes(pickle.dumps(payload))
    with pytest.raises(UnsafePickleError, match="not a tensor-rebuilding callable"):
        load_tensor_pickle(bad)
    assert not (tmp_path / "SHOULD_NOT_EXIST").exists()


def test_transferred_g_forward_with_110m_preset():
    g = load_g_lm_pickle(PKL, num_layers=5, num_heads=14, head_dim=64)
    torch.manual_seed(0)
    model = PLDRModel(preset("pldr-110m", mode="v510G", fixed_g="external")).eval()
    with torch.no_grad():
        for layer, g_layer in zip(model.layers, g):
            layer.attn.G_fixed.copy_(g_layer)
        logits = model(torch.randint(4, 32000, (1, 16)))
    pickled = torch_own_read(PKL)
    assert len(pickled) == len(model.layers) == 5
    for layer, want in zip(model.layers, pickled):      # [1, h, dk, dk] per layer, in order
        assert torch.equal(layer.attn.G_fixed, want[0])
    assert logits.shape == (1, 16, 32000) and torch.isfinite(logits).all()


def torch_own_read(path):
    """The committed pickle read by torch's own functions (torch.load on each storage's bytes), not
    by our safe loader: trusted here because the file is the repository's own."""
    import collections
    import io
    import torch._utils

    class TorchOwn(pickle.Unpickler):
        def find_class(self, module, name):
            allowed = {("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
                       ("collections", "OrderedDict"): collections.OrderedDict,
                       ("torch.storage", "_load_from_bytes"):
                           lambda b: torch.load(io.BytesIO(b), map_location="cpu", weights_only=True)}
            return allowed[(module, name)]

    with open(path, "rb") as f:
        return TorchOwn(f).load()
