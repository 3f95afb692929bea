"""train.compile=true through the real entry point: fused metric-learner GLUs, compiled layers
and compiled loss inside the DeepSpeed engine train the same model as the eager trainer
(CPU, fp32, inductor)."""
import pytest

from train_helpers import losses, metric, prepare_data, train


@pytest.fixture(scope="module")
def compiled_run(tmp_path_factory):
    """One process, train.compile=true, three steps: the compiled trainer's run, and the
    pipeline layout's reference (steps 1-2 are in warm-up, whose learning rates do not depend
    on the run's length). Its run folder."""
    tmp = tmp_path_factory.mktemp("compiled")
    data = prepare_data(str(tmp / "data"))
    result = train(data, str(tmp / "run"), nproc=1, sets=["train.steps=3", "train.compile=true"])
    assert result.returncode == 0, result.stdout + result.stderr
    return str(tmp / "run")


def test_compiled_trainer_follows_the_eager_losses(tmp_path, compiled_run):
    (tmp_path / "data").mkdir()
    data = prepare_data(str(tmp_path / "data"))
    result = train(data, str(tmp_path / "eager"), nproc=1, sets=["train.steps=3"])
    assert result.returncode == 0, result.stdout + result.stderr
    eager, compiled = losses(str(tmp_path / "eager")), losses(compiled_run)
    assert sorted(compiled) == [1, 2, 3]
    # Step 1 is the same function of the same weights; later steps carry Adam's amplification
    # of fp32 rounding (other kernels, other summation order), ~5e-5 relative here.
    assert abs(compiled[1] - eager[1]) <= 1e-6 * eager[1]
    for step in (2, 3):
        assert abs(compiled[step] - eager[step]) <= 2e-4 * eager[step], (step, compiled[step], eager[step])


LAYOUTS = {"parallel.tp=2": "layers not compiled (tp/cp > 1)", "parallel.pp=2": "layers compiled",
           "parallel.zero_stage=3": "layers compiled (forwards only: ZeRO-3 gathers each layer's parameters around it)"}
# What each layout's fast path is compared with: by default the same layout run eagerly on 2
# processes; compiled layers with the same graphs elsewhere (the compiled kernels' fp32 rounding
# moves this tiny model's step-1 gradient norm by ~3e-4 from eager, and cancels out): the
# pipeline's stages and ZeRO-3 with the one-process compiled run (`compiled_run`). ZeRO-3 runs on
# one process: its fast path (each layer's forward compiled, the gather and release hooks eager
# around it) is the same on any number of ranks, and a 2-rank run needed a 2-rank compiled
# reference, the same graphs compiled four times (~130 s of a cold suite). ZeRO-3 on 2 ranks is
# resumed and consolidated eagerly in test_resume_layouts.py and test_consolidate.py.
REFERENCE = {"parallel.zero_stage=3": "compiled_run", "parallel.pp=2": "compiled_run"}
PROCESSES = {"parallel.zero_stage=3": 1}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_fast_path_under_each_parallel_layout_follows_its_reference(tmp_path, layout, request):
    """TP layers are not compiled, but train.compile=true still gives them the fast path's
    modules (fused GLUs, rotary table; the Triton kernels on CUDA); each pipeline stage compiles
    its layers; ZeRO-3 compiles each layer's forward, its parameters gathered around it: same
    losses. (Its GPU losses against ZeRO-1: docs/multi_gpu.md.)"""
    (tmp_path / "data").mkdir()
    data = prepare_data(str(tmp_path / "data"))
    reference = REFERENCE.get(layout, (2, [layout]))
    runs_to_start = [("fast", (PROCESSES.get(layout, 2), [layout, "train.compile=true"]))]
    if isinstance(reference, str):
        dirs = {"reference": request.getfixturevalue(reference)}
    else:
        dirs = {}
        runs_to_start.insert(0, ("reference", reference))
    for name, (nproc, sets) in runs_to_start:
        dirs[name] = str(tmp_path / name)
        result = train(data, dirs[name], nproc=nproc, sets=["train.steps=2"] + sets)
        assert result.returncode == 0, result.stdout + result.stderr
        if name == "fast":
            assert f"fast path: 8 metric-learner GLUs fused (one op per layer), {LAYOUTS[layout]}" in result.stdout, result.stdout
    runs = {name: losses(d) for name, d in dirs.items()}
    norms = {name: metric(d, "grad_norm") for name, d in dirs.items()}
    reference, fast = runs["reference"], runs["fast"]
    assert sorted(fast) == [1, 2]
    # Step 1: the same function of the same weights, and its gradient (a lost or zeroed gradient
    # anywhere moves the norm by percents; another summation order, e.g. TP's partial sums, by
    # up to ~8e-5 in this tiny model's deductive path). Step 2 carries Adam's amplification of
    # fp32 rounding; later steps of this tiny model are chaotic (Adam's normalisation at this
    # size, as in test_resume_layouts.py), so they are not compared.
    assert abs(fast[1] - reference[1]) <= 1e-6 * reference[1]
    assert abs(norms["fast"][1] - norms["reference"][1]) <= 2e-4 * norms["reference"][1], norms
    assert abs(fast[2] - reference[2]) <= 2e-4 * reference[2], (fast[2], reference[2])


def test_bf16_trainer_updates_every_parameter_on_the_first_step(tmp_path):
    """DeepSpeed's bf16 optimizer clears the gradient buffers when the backward reaches the
    engine's output; gradients that arrive before that are lost. The loss must therefore be
    the model's own output (model(x, targets=y)): with the head applied after the engine
    returned, the head never trained. After one compiled bf16 step every weight matrix and the
    head's bias have moved (LayerNorm gains at 1.0 move by less than bf16's spacing there), and
    most entries of the head's weight."""
    import os

    import torch

    from pldr_dist.model import PLDRModel
    from pldr_dist.train.config import load_config
    from train_helpers import ROOT, command, final_weights

    (tmp_path / "data").mkdir()
    data = prepare_data(str(tmp_path / "data"))
    run_dir = str(tmp_path / "run")
    sets = ["train.steps=1", "train.precision=bf16", "train.compile=true"]
    result = train(data, run_dir, nproc=1, sets=sets)
    assert result.returncode == 0, result.stdout + result.stderr
    overrides = [a for a in command(data, run_dir, 1, sets) if "=" in a and not a.startswith("--")]
    cfg = load_config(os.path.join(ROOT, "configs", "tiny.yaml"), overrides)
    torch.manual_seed(cfg.train.seed)
    start = {k: v.bfloat16() for k, v in PLDRModel(cfg.model_config()).state_dict().items()}
    after = final_weights(run_dir)
    for name, value in start.items():
        # (the metric learner's stacked LayerNorm gains are 2-D: at 1.0 they move by less than bf16's spacing)
        if (value.dim() >= 2 and not name.endswith("norm_weight")) or name == "head.bias":
            assert not torch.equal(after[name].bfloat16(), value), f"{name} did not train"
    moved = (after["head.weight"].bfloat16() != start["head.weight"]).float().mean().item()
    assert moved > 0.9, f"only {moved:.0%} of head.weight moved"
