"""Contiguous bf16 gradients (parallel/contiguous_grads.py), reduced over the data-parallel
group in buckets while the backward runs (parallel/grad_reduce.py), and the optimizer step that
decides clipping and skipping on the device (parallel/device_skip.py) change no update: on real
gloo processes each bf16 layout trains once with DeepSpeed's per-parameter gradient handling,
reduction and step, and once with ours; losses and weights must be bit-identical, and the global
gradient norm equal to rounding: it is summed in another order, and fp32 sums of ~3e5 squares
on the CPU differ by ~1e-5 relative between orders. Counting a parameter twice or not at all
(the TP-replicated ones on TP rank 1) would move it by far more.
"""
import pytest
import torch

from distributed import run_distributed
from pldr_dist.model import PLDRModel, lm_loss, preset
from pldr_dist.parallel.engine import make_ds_config

STEPS, MICRO_BATCH, SEQ, LR = 4, 2, 8, 1e-3


def batches(step, dp, accum):
    g = torch.Generator().manual_seed(7 + step)
    x = torch.randint(4, 512, (dp, accum, MICRO_BATCH, SEQ + 1), generator=g)
    return [[(x[r, a, :, :-1], x[r, a, :, 1:]) for a in range(accum)] for r in range(dp)]


def train(tp, pp, accum, clip_norm, contiguous, drop_grads):
    import pldr_dist.parallel.engine as engine_module
    import pldr_dist.parallel.grad_reduce as grad_reduce
    from pldr_dist.parallel.cross_entropy import vocab_parallel_lm_loss
    from pldr_dist.parallel.grid import ProcessGrid
    from pldr_dist.parallel.optim import make_optimizer
    from pldr_dist.parallel.pipeline import build_pipeline_module, stage_state_dict
    from pldr_dist.parallel.tensor_parallel import parallelize

    grid = ProcessGrid(tp=tp, pp=pp)
    torch.manual_seed(0)
    model = parallelize(PLDRModel(preset("tiny")), grid)
    loss_fn = (lambda lg, t: vocab_parallel_lm_loss(lg, t, grid.tp_group)) if tp > 1 else lm_loss  # noqa: E731
    module = build_pipeline_module(model, grid, loss_fn) if pp > 1 else model
    config = engine_module.make_ds_config(micro_batch_size=MICRO_BATCH, grad_accum_steps=accum, dp=grid.dp, pp=pp,
                                          zero_stage=1, precision="bf16", clip_norm=clip_norm)
    install = engine_module.use_contiguous_grads, engine_module.skip_on_device
    if not contiguous:   # DeepSpeed's own gradient handling, reduction and optimizer step
        engine_module.use_contiguous_grads = engine_module.skip_on_device = lambda optimizer: None
    bucket, grad_reduce.BUCKET_ELEMENTS = grad_reduce.BUCKET_ELEMENTS, 5000   # tiny: dozens of buckets, cut inside layers
    try:
        # eps = 1 keeps Adam's first steps linear in the gradient, so the norm clip shows in them
        engine = engine_module.initialize(module, grid, config, make_optimizer(module, LR, eps=1.0 if clip_norm else 1e-5))
    finally:
        engine_module.use_contiguous_grads, engine_module.skip_on_device = install
        grad_reduce.BUCKET_ELEMENTS = bucket   # the worker processes run other tests next
    assert hasattr(engine.optimizer, "contiguous_grads") == hasattr(engine.optimizer, "device_skip") == contiguous
    reductions = []     # DeepSpeed's bucketed all-reduce (pipelines run it at the end of the schedule)
    fallback = engine.buffered_allreduce_fallback
    engine.buffered_allreduce_fallback = lambda *a, **k: (reductions.append(1), fallback(*a, **k))[1]
    losses, norms = [], []
    for step in range(STEPS):
        mine = batches(step, grid.dp, accum)[grid.dp_rank]
        if pp > 1:
            losses.append(engine.train_batch(iter(mine)).item())
        else:
            for inputs, targets in mine:
                if drop_grads:   # something else sets .grad to None: the buffer must take it back
                    engine.module.zero_grad(set_to_none=True)
                engine.backward(loss_fn(engine(inputs), targets))
                engine.step()
            if contiguous:   # dp > 1: every bucket went out from the hooks, before the backward ended
                reducer = engine.optimizer.contiguous_grads.overlap
                assert reducer.sent_in_backward == len(reducer.buckets) > 10, reducer.sent_in_backward
            losses.append(loss_fn(engine(inputs), targets).item())
        norms.append(float(engine.get_global_grad_norm()))
    state = stage_state_dict(engine.module) if pp > 1 else dict(engine.module.named_parameters())
    return dict(losses=losses, norms=norms, params={n: t.detach().float().clone() for n, t in state.items()},
                reductions=len(reductions))


LAYOUTS = {   # 4 ranks each
    "tp2_dp2": dict(tp=2, pp=1, accum=2, clip_norm=0.0, drop_grads=True),
    "pp2_dp2": dict(tp=1, pp=2, accum=2, clip_norm=0.0, drop_grads=False),
    "dp4_clip_norm": dict(tp=1, pp=1, accum=1, clip_norm=0.05, drop_grads=False),
}


def job(rank, world, layout):
    return [train(**layout, contiguous=c) for c in (False, True)]


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_contiguous_grads_give_deepspeeds_updates(name):
    layout = LAYOUTS[name]
    for own, contiguous in run_distributed(job, 4, layout, deepspeed=True):
        if layout["clip_norm"]:
            # The clip factor comes from the norm, so the updates differ by rounding; bf16 weights
            # then flip last bits and this tiny model amplifies that over later steps.
            torch.testing.assert_close(contiguous["norms"][:2], own["norms"][:2], rtol=5e-5, atol=0)
            torch.testing.assert_close(contiguous["losses"][:2], own["losses"][:2], rtol=1e-5, atol=0)
            continue
        torch.testing.assert_close(torch.tensor(contiguous["norms"]), torch.tensor(own["norms"]), rtol=5e-5, atol=0)
        assert contiguous["losses"] == own["losses"], name
        for n, p in own["params"].items():
            assert torch.equal(contiguous["params"][n], p), f"{name}: {n} differs"


def test_a_pipeline_with_one_replica_skips_the_reduction_and_keeps_deepspeeds_updates():
    """PP = 2, dp = 1: DeepSpeed's pipeline copied every fp32 gradient into buckets and back for
    an all-reduce over one rank at the end of each step; skipped (grad_reduce._one_replica), the
    losses and weights stay those of DeepSpeed's own path, bit for bit."""
    layout = dict(tp=1, pp=2, accum=4, clip_norm=0.0, drop_grads=False)
    for own, contiguous in run_distributed(job, 2, layout, deepspeed=True):
        assert own["reductions"] == STEPS and contiguous["reductions"] == 0
        assert contiguous["losses"] == own["losses"]
        for n, p in own["params"].items():
            assert torch.equal(contiguous["params"][n], p), n


def reduced_gradients(rank, world, own_config=False):
    """After the backward that ends a step, each fp32 gradient must be the data-parallel mean of
    the ranks' fp32 sums over their micro-batches, to the bit: reduced in fp32, not rounded to
    bf16 on the way (DeepSpeed's default communication dtype for bf16 did that, at any dp)."""
    from pldr_dist.parallel.engine import initialize
    from pldr_dist.parallel.grid import ProcessGrid
    from pldr_dist.parallel.optim import make_optimizer

    grid = ProcessGrid(tp=1, pp=1)
    torch.manual_seed(0)
    model = PLDRModel(preset("tiny"))
    config = make_ds_config(micro_batch_size=MICRO_BATCH, grad_accum_steps=2, dp=world, zero_stage=1, precision="bf16")
    if own_config:   # a DeepSpeed JSON that names no communication dtype: initialize makes it fp32
        del config["communication_data_type"]
    engine = initialize(model, grid, config, make_optimizer(model, LR))
    grads = engine.optimizer.contiguous_grads
    sums = [torch.zeros_like(hp) for hp in engine.optimizer.fp32_groups_gradients_flat]
    for i, (inputs, targets) in enumerate(batches(0, world, 2)[rank]):
        engine.backward(lm_loss(engine(inputs), targets))
        for total, lp in zip(sums, grads.lp_flat):
            total.add_(lp.float())     # this micro-batch's bf16 gradients, as the optimizer adds them
        if i == 0:
            engine.step()              # counts the micro-batch (the optimizer steps after the second)
    for total, hp in zip(sums, engine.optimizer.fp32_groups_gradients_flat):
        torch.distributed.all_reduce(total)
        assert torch.equal(hp, total.mul_(1.0 / world)), (hp - total).abs().max()
    return grads.overlap.sent_in_backward if grads.overlap else None


def test_bf16_gradients_are_reduced_in_fp32():
    assert run_distributed(reduced_gradients, 2, deepspeed=True) == [1, 1]   # one bucket: the tiny model
    assert run_distributed(reduced_gradients, 1, True, deepspeed=True) == [None]   # one replica: nothing to reduce


def device_syncs(rank, world):
    """DeepSpeed's synchronize calls over 3 optimizer steps of a bf16 ZeRO-1 engine, with the
    generated config and with a shipped JSON (which names no timers)."""
    import json

    from deepspeed.accelerator import get_accelerator

    from pldr_dist.parallel.engine import initialize
    from pldr_dist.parallel.grid import ProcessGrid
    from pldr_dist.parallel.optim import make_optimizer

    accelerator = get_accelerator()
    calls, sync = [], accelerator.synchronize
    accelerator.synchronize = lambda *a, **k: (calls.append(1), sync(*a, **k))[1]
    counts = []
    try:
        with open("ds_configs/zero1_bf16.json") as f:
            shipped = json.load(f)
        del shipped["timers"]      # as a user's own JSON would be
        shipped.update(train_micro_batch_size_per_gpu=MICRO_BATCH, gradient_accumulation_steps=1)
        generated = make_ds_config(micro_batch_size=MICRO_BATCH, grad_accum_steps=1, dp=world, zero_stage=1,
                                   precision="bf16")
        for config in (generated, shipped):
            torch.manual_seed(0)
            model = PLDRModel(preset("tiny"))
            engine = initialize(model, ProcessGrid(tp=1, pp=1), config, make_optimizer(model, LR))
            calls.clear()
            for step in range(3):
                (inputs, targets), = batches(step, world, 1)[rank]
                engine.backward(lm_loss(engine(inputs), targets))
                engine.step()
            counts.append(len(calls))
    finally:
        accelerator.synchronize = sync
    return counts


def test_no_device_sync_around_steps():
    """DeepSpeed's throughput timer synchronized the device at every forward and step (from the
    third step), so the host could not queue a step ahead of the GPU; it is off, also for a
    DeepSpeed JSON that does not mention it."""
    for counts in run_distributed(device_syncs, 1, deepspeed=True):
        assert counts == [0, 0]
