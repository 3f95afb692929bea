"""pldr-reshard: a TP=2 x PP=2 run continued as TP=1 x DP=2 and back, on the real entry point
(and pldr-consolidate on that TP=2 x PP=2 checkpoint: test_consolidate.py has the other layouts)."""
import dataclasses
import glob
import json
import os
import re
import shutil
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from pldr_dist.convert.consolidate import consolidate, gather_weights
from pldr_dist.convert.consolidated import CheckpointError, load_consolidated
from pldr_dist.convert.reshard import main as reshard_main
from pldr_dist.convert.names import to_authors
from pldr_dist.convert.reshard import read_run_config, reshard
from pldr_dist.model import PLDRModel
from pldr_dist.model.interchange import from_interchange, to_interchange
from pldr_dist.parallel.flat_layers import flatten_layers
from pldr_dist.train.checkpoint import CheckpointManager
from distributed import run_distributed
from train_helpers import assert_stage_files_hold, command, losses, prepare_data, train

# 8 sequences per step in both layouts: 4 x 2 pipeline micro-batches, or 4 on each of 2 DP ranks
COMMON = ["train.steps=8", "checkpoint.every=3", "checkpoint.keep=10", "optim.lr=1e-3"]
PIPELINE = (4, COMMON + ["parallel.tp=2", "parallel.pp=2", "train.grad_accum_steps=2"])
# ZeRO-2 keeps each decoder layer as one tensor (parallel/flat_layers.py): the portable file loads
# into it, and its optimizer files reshard back into the per-weight pipeline layout
DATA_PARALLEL = (2, COMMON + ["train.grad_accum_steps=1", "parallel.zero_stage=2"])


def run(data, run_dir, layout):
    nproc, sets = layout
    result = train(data, str(run_dir), nproc, sets)
    assert result.returncode == 0, result.stdout + result.stderr
    return losses(str(run_dir))


def assert_same_losses(got, ref, steps):
    """Each layout sums its gradients in another order; this tiny model at lr 1e-3 amplifies that
    rounding step by step. Over two steps only: its power law's derivative P * A_LM^(P-1) reaches
    ~1e8 where A_LM sits at its 1e-9 floor, so layouts that differ by rounding drift apart (TP=1 and
    TP=2 runs of the same seed: 1e-3 by step 7). After the reshard to TP=1 x DP=2 the losses were
    equal at step 4 (the resharded weights), 2e-6 apart at step 5 (the first update, with the
    resharded Adam state) and 8e-5 at step 6 on one machine, under 5e-5 on others. Zeroed Adam
    moments in the resharded file moved step 4 by 1.9e-4; a loader 8 samples back, the back
    leg's step 8 by 1.5e-3. The continuation after the reshard back is compared with the run
    whose checkpoint was resharded. The resharded weights themselves are compared bit for bit
    above."""
    assert sorted(got) == list(steps)
    for step in steps:
        assert abs(got[step] - ref[step]) <= 5e-5 * abs(ref[step]), (step, got[step], ref[step])


def test_tp2_pp2_to_tp1_dp2_and_back_continues_with_the_losses_of_the_unchanged_run(tmp_path, capsys):
    (tmp_path / "data").mkdir()
    data = prepare_data(str(tmp_path / "data"))
    ref = run(data, tmp_path / "ref", PIPELINE)
    assert sorted(ref) == list(range(1, 9))

    source = tmp_path / "ref" / "checkpoints" / "step_00000003"
    reshard(str(source), str(tmp_path / "dp"), log=lambda *_: None)
    portable = load_file(str(tmp_path / "dp" / "checkpoints" / "step_00000003" / "portable.safetensors"))
    run_config = json.loads((source / "run_config.json").read_text())
    weights = gather_weights(str(source.parent), source.name, run_config)
    for name, tensor in to_interchange(weights).items():
        assert torch.equal(portable[f"param.{name}"], tensor), name       # the training weights, bit for bit
    for key in portable:                                # the file keeps the per-GLU (authors') names
        to_authors(key.split(".", 1)[1])
    check_per_glu_checkpoint(source, tmp_path, portable)
    consolidate(str(source), str(tmp_path / "consolidated"), log=lambda *_: None)     # pldr-consolidate, too
    assert_stage_files_hold(str(source), load_consolidated(str(tmp_path / "consolidated")).state_dict(), tp=2)
    assert all(portable[f"exp_avg_sq.{n}"].min() >= 0 for n in (k[len("param."):] for k in portable if k.startswith("param.")))

    # TP=1 x DP=2 from step 3 to the end (checkpoints at steps 6 and 8)
    dp = run(data, tmp_path / "dp", DATA_PARALLEL)
    assert sorted(dp) == [4, 5, 6, 7, 8]
    assert_same_losses({s: dp[s] for s in (4, 5)}, ref, range(4, 6))

    # and back to TP=2 x PP=2 from the DP run's step 6, to the end
    assert reshard_main([str(tmp_path / "dp" / "checkpoints" / "step_00000006"), str(tmp_path / "back")]) == 0
    out = capsys.readouterr().out
    assert "reading pipeline stage 1/1: 1 TP rank(s) x 2 DP optimizer file(s)" in out
    assert "resharded" in out and "(step 6, layout {'tp': 1, 'pp': 1, 'dp': 2, 'zero_stage': 2}" in out
    back = run(data, tmp_path / "back", PIPELINE)
    # the unchanged run of the state resharded back: the DP run itself, from its step 6 on
    assert_same_losses(back, dp, range(7, 9))


def test_refusals_name_the_checkpoint(tmp_path, capsys):
    with pytest.raises(SystemExit):
        reshard_main(["--help"])
    assert "portable" in capsys.readouterr().out
    with pytest.raises(CheckpointError, match="neither a checkpoint folder"):
        reshard(str(tmp_path), str(tmp_path / "out"))
    tag = tmp_path / "ckpt" / "step_00000002"
    tag.mkdir(parents=True)
    (tag / "COMPLETE.json").write_text("{}")
    (tag / "run_config.json").write_text(json_config(zero_stage=3))
    with pytest.raises(SystemExit) as exit_info:
        reshard_main([str(tag), str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert "reads ZeRO-1/2 checkpoints; this run used parallel.zero_stage=3" in capsys.readouterr().err
    (tag / "run_config.json").write_text(json_config(zero_stage=1))
    with pytest.raises(CheckpointError, match=r"optimizer files for mp_rank \[\]"):
        reshard(str(tag), str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out" / "checkpoints" / "step_00000002")


def json_config(zero_stage):
    from pldr_dist.train.config import RunConfig
    cfg = RunConfig()
    cfg.parallel.zero_stage = zero_stage
    return json.dumps(cfg.to_dict())


def test_bf16_zero1_checkpoint_reshards_and_continues(tmp_path):
    """bf16 ZeRO-1 runs use DeepSpeed's BF16_Optimizer (fp32 gradient accumulation) with its own
    partition names: its checkpoint becomes portable and continues in the same layout with the
    losses of the unchanged run, and in TP=2 within bf16 rounding."""
    (tmp_path / "data").mkdir()
    data = prepare_data(str(tmp_path / "data"))
    bf16 = ["train.steps=6", "checkpoint.every=3", "checkpoint.keep=10", "optim.lr=1e-3", "train.precision=bf16"]
    ref = run(data, tmp_path / "ref", (2, bf16))
    source = str(tmp_path / "ref" / "checkpoints" / "step_00000003")
    for name, layout in (("dp", (2, bf16)), ("tp", (2, bf16 + ["parallel.tp=2"]))):
        reshard(source, str(tmp_path / name), log=lambda *_: None)
        if name == "tp":   # the losses below allow bf16 rounding, which would hide lost moments
            check_loaded_moments(data, tmp_path / name, layout)
        got = run(data, tmp_path / name, layout)
        assert sorted(got) == [4, 5, 6], name
        for step in got:
            tolerance = 1e-6 if name == "dp" else 2e-2
            assert abs(got[step] - ref[step]) <= tolerance * ref[step], (name, step, got[step], ref[step])


def check_loaded_moments(data, run_dir, layout):
    """The Adam moments a run of `layout` holds after loading the portable checkpoint in run_dir are the
    file's, bit for bit: one gloo worker group builds the trainer's engine (build_run, same config)
    and loads it as the trainer's resume does; moments gathered over TP by name."""
    nproc, sets = layout
    argv = command(data, str(run_dir), nproc, sets)
    overrides = [argv[i + 1] for i, arg in enumerate(argv) if arg == "--set"]
    tag = run_dir / "checkpoints" / "step_00000003"
    got = run_distributed(loaded_moments, nproc, argv[argv.index("--config") + 1], overrides, str(tag),
                          deepspeed=True)[0]
    portable = load_file(str(tag / "portable.safetensors"))
    want = {}
    for moment in ("exp_avg", "exp_avg_sq"):   # the file's per-GLU names, stacked as the model holds them
        part = {key.split(".", 1)[1]: t for key, t in portable.items() if key.split(".", 1)[0] == moment}
        want.update({f"{moment}.{n}": t for n, t in from_interchange(part).items()})
    assert got.keys() == want.keys()
    assert [key for key in want if not torch.equal(got[key], want[key])] == []


def loaded_moments(rank, world_size, config, overrides, tag_dir):
    """On each rank of the worker group: {exp_avg.NAME / exp_avg_sq.NAME: full fp32 tensor} as loaded."""
    from deepspeed.utils import safe_get_full_optimizer_state
    from pldr_dist.parallel.tensor_parallel import gather_full_state_dict
    from pldr_dist.train.build import build_run
    from pldr_dist.train.config import load_config
    from pldr_dist.train.portable import load_portable
    job = build_run(load_config(config, overrides))
    load_portable(job.engine, job.grid, tag_dir)
    params = dict(job.engine.module.named_parameters())
    out = {}
    for moment in ("exp_avg", "exp_avg_sq"):
        # each parameter (this rank's TP slice) whole, gathered from the ZeRO partitions of its DP group
        local = {n: safe_get_full_optimizer_state(p, moment) for n, p in params.items()}
        full = gather_full_state_dict(local, job.grid.tp_group) if job.grid.tp > 1 else local
        out.update({f"{moment}.{n}": t for n, t in full.items()})
    return out if rank == 0 else None


def as_per_glu_checkpoint(tag_dir):
    """Rewrite a checkpoint (DP = 1) as pldr_dist wrote it before the metric learner was stacked:
    per-GLU names in the module files and optimizer slice mappings (each stacked tensor's slice
    cut into its GLUs' consecutive pieces), no parameter-layout key in the rank files."""
    _, cfg = read_run_config(str(tag_dir))
    R, n, a, dk = cfg.num_residual_units, cfg.glus_per_unit, cfg.a_dff, cfg.head_dim
    piece = {"u1_weight": a * dk, "u2_weight": a * dk, "u3_weight": dk * a, "u1_bias": a, "u2_bias": a, "u3_bias": dk}
    for path in glob.glob(str(tag_dir / "*optim_states.pt")):
        state = torch.load(path, weights_only=False)
        osd = state["optimizer_state_dict"]
        for g, mapping in enumerate(osd["param_slice_mappings"]):
            old = {}
            for name, address in mapping.items():
                m = re.match(r"(.*metric\.)(u[123]|norm)_(weight|bias)$", name)
                if m is None:
                    old[name] = address
                    continue
                pre, role, part = m.groups()
                keys = ([f"{pre}units.{r}.norm.{part}" for r in range(R)] if role == "norm" else
                        [f"{pre}units.{r}.glus.{j}.{role}.{part}" for r in range(R) for j in range(n)])
                size = dk if role == "norm" else piece[f"{role}_{part}"]
                assert address.numel == size * len(keys), "a DP = 1 checkpoint holds whole tensors"
                for i, key in enumerate(keys):
                    old[key] = dataclasses.replace(address, start=address.start + i * size, numel=size)
            osd["param_slice_mappings"][g] = old
        torch.save(state, path)
    for path in glob.glob(str(tag_dir / "layer_*-model_states.pt")):
        torch.save(to_interchange(torch.load(path, weights_only=False)), path)
    for path in glob.glob(str(tag_dir / "rank_*.pt")):
        extra = torch.load(path, weights_only=False)
        del extra["parameters"]
        torch.save(extra, path)


def check_per_glu_checkpoint(source, tmp_path, portable):
    """A checkpoint written before the stacking: the trainer refuses it in one line that names
    the conversion; pldr-reshard converts it into the same portable file as today's checkpoint."""
    old = tmp_path / "old" / "checkpoints" / source.name
    shutil.copytree(source, old)
    as_per_glu_checkpoint(old)
    _, cfg = read_run_config(str(old))
    manager = CheckpointManager(str(tmp_path / "old"), keep=1, rank=0, world_size=4)
    with pytest.raises(CheckpointError, match=r"before the metric learner's weights were stacked; convert it once "
                                              r"with `pldr-reshard .*step_00000003 NEW_RUN_DIR`"):
        manager.load(SimpleNamespace(module=PLDRModel(cfg)), source.name)
    flat = PLDRModel(cfg)       # and today's checkpoint into a ZeRO-2/3 engine, whose layers are one tensor each
    flatten_layers(flat)
    with pytest.raises(CheckpointError, match=r"holds its parameters as stacked-metric/1, this run as flat-layers/1 .*"
                                              r"convert it once with `pldr-reshard .*step_00000003 NEW_RUN_DIR`"):
        CheckpointManager(str(source.parent.parent), keep=1, rank=0, world_size=4).load(
            SimpleNamespace(module=flat), source.name)
    reshard(str(old), str(tmp_path / "from_old"), log=lambda *_: None)
    converted = load_file(str(tmp_path / "from_old" / "checkpoints" / source.name / "portable.safetensors"))
    assert converted.keys() == portable.keys()
    assert all(torch.equal(converted[k], portable[k]) for k in portable)
