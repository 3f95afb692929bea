"""ZeRO-2/3's one tensor per decoder layer (parallel/flat_layers.py): the same model, the same
names outside the engine. The trainer runs of these layouts (test_pipeline_zero.py,
test_resume_layouts.py, test_reshard.py, test_consolidate.py) use it end to end."""
import copy

import pytest
import torch

from pldr_dist.errors import InputError
from pldr_dist.model import PLDRModel
from pldr_dist.model.config import preset
from pldr_dist.parallel.flat_layers import ALIGN, flatten_layers, flatten_state, unflatten_state


def models(recompute="none"):
    cfg = preset("tiny", num_layers=2)
    torch.manual_seed(0)
    ref = PLDRModel(cfg).double()
    flat = copy.deepcopy(ref)
    for model in (ref, flat):
        for layer in model.layers:
            layer.recompute = recompute
    return cfg, ref, flat


@pytest.mark.parametrize("recompute", ["none", "full"])
def test_flat_layers_compute_the_same_loss_and_gradients(recompute):
    cfg, ref, flat = models(recompute)
    outside = sum(1 for n, _ in ref.named_parameters() if not n.startswith("layers."))
    assert flatten_layers(flat) == outside + cfg.num_layers
    x, y = torch.randint(0, cfg.vocab_size, (2, 2, 16))
    for model in (ref, flat):
        model(x, targets=y).backward()
    assert flat(x, targets=y).item() == ref(x, targets=y).item()
    grads = unflatten_state({n: p.grad for n, p in flat.named_parameters()}, cfg)
    assert grads.keys() == dict(ref.named_parameters()).keys()
    for n, p in ref.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, rtol=1e-12, atol=1e-15, msg=n)
    # between forwards no view of the flat tensor stays on the modules (a ZeRO-3 layer's gathered storage)
    assert flat.layers[0].attn.wq.weight is None
    # every tensor starts 16-byte aligned (zero gaps after the tiny preset's odd FFN biases)
    layer = flat.layers[0]
    assert sum(layer.flat.numel() for layer in flat.layers) > sum(p.numel() for p in ref.layers.parameters())
    assert all(t.storage_offset() % ALIGN == 0 for t in layer.unflatten(layer.flat).values())


def test_compiled_flat_layer_is_one_graph_with_the_eager_gradients():
    cfg, ref, flat = models()
    flatten_layers(flat)
    from torch._dynamo.testing import CompileCounterWithBackend
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    for layer in flat.layers:
        layer.compile(fullgraph=True, dynamic=False, backend=counter)
    x, y = torch.randint(0, cfg.vocab_size, (2, 2, 16))
    for model in (ref, flat):
        model(x, targets=y).backward()
    grads = unflatten_state({n: p.grad for n, p in flat.named_parameters()}, cfg)
    for n, p in ref.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, rtol=1e-12, atol=1e-15, msg=n)
    assert counter.frame_count == 1      # every layer replays one graph


def test_state_dict_keeps_the_model_names_and_loads_either_naming():
    cfg, ref, flat = models()
    flatten_layers(flat)
    state = flat.state_dict()
    assert list(state) == list(ref.state_dict())
    assert all(torch.equal(state[n], t) for n, t in ref.state_dict().items())
    torch.manual_seed(1)
    other = PLDRModel(cfg).double()
    flatten_layers(other)
    for source in (ref.state_dict(), ref.interchange_state_dict()):    # model names, per-GLU file names
        other.load_state_dict(copy.deepcopy(source))
        assert all(torch.equal(other.state_dict()[n], t) for n, t in ref.state_dict().items())
    params = {n: p.detach() for n, p in ref.named_parameters()}
    assert flatten_state(params, flat).keys() == dict(flat.named_parameters()).keys()
    assert all(torch.equal(t, params[n]) for n, t in unflatten_state(flatten_state(params, flat), cfg).items())
    with pytest.raises(InputError, match=r"layers.0.flat holds 3 values, a decoder layer of the run's model config"):
        unflatten_state({"layers.0.flat": torch.zeros(3)}, cfg)
