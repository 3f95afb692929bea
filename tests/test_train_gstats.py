"""G_LM statistics (train/metrics.py GStats): the logged distance of G_LM from the identity and
its mean, per layer, averaged over the forwards made while active, in eager and compiled layers;
and the profiler's count of host reads inside steps (metrics.host_reads)."""
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


def test_host_reads_count_the_reads_inside_steps_by_phase_and_op():
    """train/metrics.host_reads over profiler events (real ones on one thread; the autograd
    thread of a GPU backward, which the CPU does not have, as events built here): reads inside a
    step count by phase and outermost op, reads of another thread during a step as "other
    thread", reads between steps not at all."""
    from types import SimpleNamespace
    from torch.profiler import profile, record_function
    from pldr_dist.train.metrics import STEP_RANGE, host_reads

    x = torch.ones(3)
    with profile() as prof:
        with record_function(STEP_RANGE):
            with record_function("pldr:optimizer_step"):
                x.sum().item()                                    # aten::item
                x.masked_fill_(x > 5, torch.tensor(0.0))          # reads its 0-dim fill value
            bool(x[x > 0].numel())                                # boolean indexing: aten::nonzero
        x.sum().item()                                            # between steps
    assert host_reads(prof.events()) == {"pldr:optimizer_step aten::item": 1,
                                         "pldr:optimizer_step aten::masked_fill_": 1,
                                         "pldr:train_step aten::index": 1}

    def event(name, start, parent=None):
        return SimpleNamespace(name=name, cpu_parent=parent, time_range=SimpleNamespace(start=start, end=start + 1))
    step = SimpleNamespace(name=STEP_RANGE, cpu_parent=None, time_range=SimpleNamespace(start=10, end=20))
    hook = event("aten::add_", 12)
    inside = event("aten::_local_scalar_dense", 13, event("aten::item", 13, hook))
    after = event("aten::_local_scalar_dense", 25, event("aten::item", 25))
    assert host_reads([step, hook, inside, after]) == {"other thread aten::add_": 1}
