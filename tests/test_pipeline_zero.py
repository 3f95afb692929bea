"""Pipeline (1F1B), ZeRO and TP layouts through DeepSpeed on real gloo processes, each against a
single-process reference computed in the test: five optimiser steps, same losses, same weights.

DeepSpeed start-up is slow per process, so one spawned job runs several layouts in turn
(each builds its own ProcessGrid and engine).
"""
import torch

from distributed import run_distributed
from pldr_dist.model import PLDRModel, lm_loss, preset

STEPS, MICRO_BATCH, SEQ, LR = 5, 2, 8, 1e-4
EPS = 1e-5


def make_model():
    torch.manual_seed(0)
    return PLDRModel(preset("tiny"))


def micro_batches(step, dp, accum):
    """[dp][accum] (inputs, targets) for one optimiser step; one target row is padded."""
    g = torch.Generator().manual_seed(100 + step)
    out = []
    for _ in range(dp):
        row = []
        for _ in range(accum):
            x = torch.randint(4, 512, (MICRO_BATCH, SEQ + 1), generator=g)
            x[0, -2:] = 0
            row.append((x[:, :-1], x[:, 1:]))
        out.append(row)
    return out


def reference(dp, accum, clip_norm, clip_value, steps=STEPS):
    """Losses, global gradient norms before clipping per step, final weights and optimiser state
    bytes of the same training on one process."""
    from pldr_dist.parallel.optim import make_optimizer, optimizer_state_bytes
    model = make_model()
    opt = make_optimizer(model, LR, clip_value, EPS)
    losses, norms = [], []
    for step in range(steps):
        batches = [mb for row in micro_batches(step, dp, accum) for mb in row]
        opt.zero_grad()
        total = 0.0
        for inputs, targets in batches:
            loss = lm_loss(model(inputs), targets) / len(batches)
            loss.backward()
            total += loss.item()
        norms.append(torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]).item())
        if clip_norm:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
        opt.step()
        losses.append(total)
    return losses, norms, {n: p.detach().clone() for n, p in model.named_parameters()}, optimizer_state_bytes(opt)


def run_layout(tp, pp, zero, clip_norm, clip_value, accum, nan_step=None, checkpoint_dir=None):
    """Runs on every rank of the job: trains one layout, returns losses, full weights, state bytes."""
    import deepspeed
    from pldr_dist.parallel.cross_entropy import vocab_parallel_lm_loss
    from pldr_dist.parallel.engine import initialize, make_ds_config
    from pldr_dist.parallel.flat_layers import flatten_layers, wants_flat_layers
    from pldr_dist.parallel.grid import ProcessGrid
    from pldr_dist.parallel.optim import make_optimizer, optimizer_state_bytes
    from pldr_dist.parallel.pipeline import build_pipeline_module, stage_state_dict
    from pldr_dist.parallel.tensor_parallel import gather_full_state_dict, parallelize

    grid = ProcessGrid(tp=tp, pp=pp)
    model = parallelize(make_model(), grid)
    if tp > 1:
        loss_fn = lambda logits, targets: vocab_parallel_lm_loss(logits, targets, grid.tp_group)  # noqa: E731
    else:
        loss_fn = lm_loss
    if wants_flat_layers(zero, tp, pp):      # as pldr-train does (train/build.py)
        flatten_layers(model)
    module = build_pipeline_module(model, grid, loss_fn) if pp > 1 else model
    config = make_ds_config(micro_batch_size=MICRO_BATCH, grad_accum_steps=accum, dp=grid.dp, pp=pp,
                            zero_stage=zero, clip_norm=clip_norm)
    torch_linear = torch.nn.functional.linear
    engine = initialize(module, grid, config, make_optimizer(module, LR, clip_value, EPS))
    # ZeRO-3 must leave torch's linear alone (its replacement gives zero gradients in compiled
    # layers on GPUs: engine.zero3_whole_layers) and gather each decoder layer as one unit.
    linear_replaced = torch.nn.functional.linear is not torch_linear
    torch.nn.functional.linear = torch_linear      # (this worker runs other jobs next)
    whole_layers = [bool(getattr(layer, "_z3_leaf", False)) for layer in model.layers] if pp == 1 else []
    losses, norms = [], []
    for step in range(STEPS):
        mine = micro_batches(step, grid.dp, accum)[grid.dp_rank]
        poison = step == nan_step and grid.rank == grid.world_size - 1
        if pp > 1:
            losses.append(engine.train_batch(iter(mine)).item())
            norms.append(grad_norm(engine))
            # DeepSpeed's batch timer kept two events a step for good (pipeline.drop_batch_timings)
            assert not engine.timers("train_batch").event_timers
            continue
        total = torch.zeros(())
        for inputs, targets in mine:
            loss = loss_fn(engine(inputs), targets)
            if poison:
                loss = loss * float("inf")
            engine.backward(loss)
            if zero == 0 and engine.is_gradient_accumulation_boundary():  # reduced over DP, not yet clipped
                norm = torch.nn.utils.get_total_norm([p.grad for p in engine.module.parameters()]).item()
            engine.step()
            total += loss.detach() / accum
        torch.distributed.all_reduce(total, group=grid.dp_group)
        losses.append(total.item() / grid.dp)
        norms.append(norm if zero == 0 else grad_norm(engine))
    if checkpoint_dir:  # save, train one more step, load: weights and client state come back
        engine.save_checkpoint(checkpoint_dir, tag="last", client_state={"step": STEPS})
        saved = [p.detach().clone() for p in engine.module.parameters()]
        batch = micro_batches(STEPS, grid.dp, accum)[grid.dp_rank]
        if pp > 1:
            engine.train_batch(iter(batch))
        else:
            for inputs, targets in batch:
                engine.backward(loss_fn(engine(inputs), targets))
                engine.step()
        _, client = engine.load_checkpoint(checkpoint_dir, tag="last")
        assert client["step"] == STEPS
        if zero != 3:  # ZeRO-3 parameters are partitioned: compared through the gathered weights below
            for before, p in zip(saved, engine.module.parameters()):
                assert torch.equal(before, p.detach()), "load_checkpoint did not restore the weights"
    # (state_dict: the model's names, also where ZeRO-2/3 keep a layer as one tensor)
    if zero == 3:
        with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
            state = {n: t.clone() for n, t in engine.module.state_dict().items()}
    elif pp > 1:
        state = stage_state_dict(engine.module)
    else:
        state = {n: t.clone() for n, t in engine.module.state_dict().items()}
    state = {n: t for n, t in state.items() if not n.endswith("G_fixed")}
    full = gather_full_state_dict(state, grid.tp_group) if tp > 1 else state
    skipped = engine.optimizer.optimizer.skipped_steps if hasattr(engine.optimizer, "optimizer") else engine.optimizer.skipped_steps
    local = sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters())
    adam_bytes = 2 * 4 * local  # exp_avg + exp_avg_sq in fp32 for this rank's model part, unsharded
    return dict(losses=losses, norms=norms, params=full, state_bytes=optimizer_state_bytes(engine.optimizer), skipped=skipped,
                unsharded_state_bytes=adam_bytes, linear_replaced=linear_replaced, whole_layers=whole_layers,
                tensors=sum(1 for _ in engine.module.parameters()))


def grad_norm(engine):
    """The global gradient norm of the step just taken, before any clipping, as DeepSpeed's ZeRO
    optimizers compute it over every rank (ZeRO-0 has none: run_layout takes it from the gradients)."""
    return float(engine.get_global_grad_norm())


def check(results, layout, name, steps=STEPS):
    """Losses and gathered weights of every rank against the single-process reference.

    Tolerances: this model amplifies fp32 rounding (a one-process fp32 run and an fp64 run of
    the same steps differ by ~4e-5 in the fifth loss), so a different reduction order alone
    moves later steps by up to ~4e-5. The first two losses (before and after one update) must
    agree to 1e-5; all five to 1e-4. Adam turns rounding noise in near-zero gradients into
    whole lr-sized steps, so weights must agree to 3 * lr everywhere and 0.25 * lr on average.
    (DeepSpeed's ZeRO reductions refuse fp64 gradients, so these runs cannot be made fp64.)

    Adam divides the gradient's scale out of its update, and a norm-clipped gradient keeps only
    its direction, so losses and weights cannot see a gradient of the wrong size (summed over
    data-parallel ranks or micro-batches instead of averaged: a loss difference of 0). The global
    gradient norm before clipping can: compared for the first two steps, like the losses. Step 1
    (the same weights everywhere) agrees to <= 2.2e-7 without TP: 1e-5 allowed. With TP it is
    ill-conditioned: its second micro-batch has a gradient norm of 295 (the first: 5.4) whose
    fp32 rounding scales every gradient as a whole (fp64 makes it 1.5% smaller), and TP's split
    products and vocabulary-parallel loss round differently: 1e-2 allowed. Step 2 agrees to
    <= 2.1e-4 without TP (2e-3 allowed) and <= 8.3e-3 with TP (5e-2 allowed); a doubled or
    halved gradient is off by 100% or 50%. Later norms are not compared: they follow the
    weights' rounding apart (one process summing its micro-batches in reverse order moves the
    fifth step's norm by 160% in the clip-by-value layouts).

    The numbers above are the worst of four CPU code paths (an AVX-512 machine; an AVX2 one,
    where TP's step-1 norm is 1.6e-3 off and clip-by-value ZeRO-2's weights 0.12 * lr on
    average; the same with ATEN_CPU_CAPABILITY=default; with one thread): each rounds fp32
    products in its own order, and the tolerances must hold on whichever machine CI runs.
    """
    ref_losses, ref_norms, ref_params, _ = reference(layout["dp"], layout["accum"], layout["clip_norm"],
                                                     layout["clip_value"], steps)
    merged = {}
    for r in results:
        losses = torch.tensor(r["losses"][:steps])
        torch.testing.assert_close(losses[:2], torch.tensor(ref_losses[:2]), rtol=1e-5, atol=0, msg=f"{name}: losses")
        torch.testing.assert_close(losses, torch.tensor(ref_losses), rtol=1e-4, atol=0, msg=f"{name}: losses")
        norms, ref = torch.tensor(r["norms"][:2], dtype=torch.float64), torch.tensor(ref_norms[:2], dtype=torch.float64)
        rtol = torch.tensor([1e-2, 5e-2] if layout["tp"] > 1 else [1e-5, 2e-3], dtype=torch.float64)
        assert ((norms / ref - 1).abs() <= rtol).all(), \
            f"{name}: gradient norms before clipping {norms.tolist()}, reference {ref.tolist()} (rtol {rtol.tolist()})"
        merged.update(r["params"])
    assert merged.keys() == ref_params.keys(), f"{name}: parameter names differ"
    diffs = torch.cat([(merged[n] - p).abs().flatten() for n, p in ref_params.items()])
    assert diffs.max() <= 3 * LR and diffs.mean() <= 0.25 * LR, f"{name}: weights differ {diffs.max()} {diffs.mean()}"


def check_zero_state(results, dp, name):
    """ZeRO: each rank holds about 1/dp of the Adam moments of its TP/PP part of the model."""
    for r in results:
        expected = r["unsharded_state_bytes"] / dp
        assert abs(r["state_bytes"] - expected) <= 0.1 * expected, (name, r["state_bytes"], expected)


TWO_RANK = [  # (name, layout with its data-parallel size on 2 ranks)
    ("pp2", dict(tp=1, pp=2, zero=1, clip_norm=0.5, clip_value=0.0, accum=2, dp=1, checkpoint=True)),
    ("dp2_zero1", dict(tp=1, pp=1, zero=1, clip_norm=0.5, clip_value=0.0, accum=1, dp=2)),
    ("dp2_zero2_clip_value", dict(tp=1, pp=1, zero=2, clip_norm=0.0, clip_value=1e-2, accum=2, dp=2,
                                  checkpoint=True)),
    ("dp2_zero3", dict(tp=1, pp=1, zero=3, clip_norm=0.5, clip_value=0.0, accum=1, dp=2, checkpoint=True)),
    # ZeRO 1-3 skip non-finite steps themselves (DeepSpeed's overflow check); ZeRO-0 relies on ours.
    ("dp2_zero0_nonfinite_last_step", dict(tp=1, pp=1, zero=0, clip_norm=0.0, clip_value=0.0, accum=1, dp=2,
                                           nan_step=STEPS - 1)),
]

FOUR_RANK = [
    ("tp2_pp2", dict(tp=2, pp=2, zero=1, clip_norm=0.5, clip_value=0.0, accum=2, dp=1)),
    ("tp2_dp2_zero1", dict(tp=2, pp=1, zero=1, clip_norm=0.5, clip_value=0.0, accum=1, dp=2)),
    ("pp2_dp2_zero1", dict(tp=1, pp=2, zero=1, clip_norm=0.0, clip_value=1e-2, accum=2, dp=2)),
]


def layouts_job(rank, world, layouts, checkpoint_root=None):
    runs = []
    for i, layout in enumerate(layouts):
        ckpt = f"{checkpoint_root}/{i}" if checkpoint_root and layout.get("checkpoint") else None
        args = {k: v for k, v in layout.items() if k not in ("dp", "checkpoint")}
        runs.append(run_layout(**args, checkpoint_dir=ckpt))
    return runs


def test_pp2_and_dp2_zero123_match_single_process(tmp_path):
    """PP=2; DP=2 with ZeRO-1, ZeRO-2 (clip by value), ZeRO-3; a non-finite step skipped
    everywhere; PP=2 and ZeRO-2/3 checkpoints restore the weights after a further step."""
    results = run_distributed(layouts_job, 2, [layout for _, layout in TWO_RANK], str(tmp_path), deepspeed=True)
    for i, (name, layout) in enumerate(TWO_RANK):
        mine = [r[i] for r in results]
        if "nan_step" in layout:  # the poisoned last step is skipped on both ranks
            assert [r["skipped"] for r in mine] == [1, 1]
            check(mine, layout, name, steps=STEPS - 1)
            continue
        check(mine, layout, name)
        assert all(r["skipped"] == 0 for r in mine)
        assert not any(r["linear_replaced"] for r in mine), f"{name}: DeepSpeed replaced torch.nn.functional.linear"
        if layout["pp"] == 1:
            assert all(r["whole_layers"] == [layout["zero"] == 3] * len(r["whole_layers"]) for r in mine), name
        if layout["zero"] in (2, 3):   # one tensor per decoder layer (parallel/flat_layers.py)
            model = make_model()
            outside = sum(1 for n, _ in model.named_parameters() if not n.startswith("layers."))
            assert [r["tensors"] for r in mine] == [outside + len(model.layers)] * 2, name
        if layout["zero"]:
            check_zero_state(mine, layout["dp"], name)


def test_tp2_pp2_tp2_dp2_pp2_dp2_match_single_process():
    """TP=2 x PP=2; TP=2 x DP=2 (ZeRO-1); PP=2 x DP=2 (ZeRO-1, clip by value), on 4 ranks."""
    results = run_distributed(layouts_job, 4, [layout for _, layout in FOUR_RANK], deepspeed=True)
    for i, (name, layout) in enumerate(FOUR_RANK):
        mine = [r[i] for r in results]
        check(mine, layout, name)
        if layout["zero"]:
            check_zero_state(mine, layout["dp"], name)
