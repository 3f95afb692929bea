"""G_LM statistics (train/metrics.py GStats): the logged distance of G_LM from the identity and
its mean, per layer, averaged over the forwards made while active, in eager and compiled layers."""
import copy
import math

import pytest
import torch

from pldr_dist.model import PLDRModel, preset
from pldr_dist.model.fast import optimize_for_training
from pldr_dist.model.plga import PowerLaw
from pldr_dist.train.metrics import GStats


def expected_stats(model, batches):
    """The same statistics from G_LM captured by plain hooks, written out independently."""
    seen = {}
    powers = [m for m in model.modules() if isinstance(m, PowerLaw)]
    handles = [p.register_forward_hook(lambda m, i, o, k=k: seen.setdefault(k, []).append(o[2].detach().double()))
               for k, p in enumerate(powers)]
    with torch.no_grad():
        for x in batches:
            model(x)
    for h in handles:
        h.remove()
    out = {}
    for k, gs in seen.items():
        g = torch.cat(gs)
        dists = [torch.linalg.matrix_norm(gi - torch.eye(g.shape[-1], dtype=g.dtype)) / math.sqrt(g.shape[-1])
                 for gi in g.flatten(0, 1)]
        out[f"g_dist/layer_{k}"] = float(torch.stack(dists).mean())
        out[f"g_mean/layer_{k}"] = float(g.mean())
    return out


@pytest.mark.parametrize("compiled", [False, True])
def test_gstats_average_the_active_forwards(compiled):
    torch.manual_seed(0)
    model = PLDRModel(preset("tiny"))
    reference = copy.deepcopy(model)
    if compiled:   # the hooks run inside each compiled layer's graph (fullgraph: no breaks allowed)
        optimize_for_training(model, compile=True, backend="aot_eager")
    stats = GStats(model, model.cfg.num_layers)
    batches = [torch.randint(4, 512, (2, 16)) for _ in range(3)]
    for active, x in zip((True, False, True), batches):
        stats.active = active
        model(x).sum().backward()        # a training forward and backward
    got = stats.collect()
    want = expected_stats(reference, [batches[0], batches[2]])
    assert got.keys() == want.keys() and len(got) == 2 * model.cfg.num_layers
    for key, value in want.items():
        assert math.isclose(got[key], value, rel_tol=1e-5), (key, got[key], value)
    assert stats.collect() == {}       # collected sums are cleared
