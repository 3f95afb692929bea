"""pldr-consolidate on checkpoints written by the real trainer in several layouts."""
import os
import shutil

import pytest
import torch

from pldr_dist.convert.consolidate import consolidate
from pldr_dist.convert.consolidated import CheckpointError, load_consolidated
from pldr_dist.model import PLDRModel
from pldr_dist.parallel.tensor_parallel import shard_full_state_dict
from pldr_dist.train.config import load_config
from train_helpers import assert_stage_files_hold, prepare_data, train

# TP=2 x PP=2 (4 processes) is consolidated from the run of test_reshard.py, which has one.
LAYOUTS = {"dp2_zero1": (2, []), "tp2": (2, ["parallel.tp=2"]), "pp2": (2, ["parallel.pp=2"]),
           "dp2_zero3": (2, ["parallel.zero_stage=3"])}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    data = prepare_data(str(tmp_path_factory.mktemp("data")))
    out = {}
    for name, (nproc, layout) in LAYOUTS.items():
        run_dir = str(tmp_path_factory.mktemp(name))
        result = train(data, run_dir, nproc=nproc, sets=["train.steps=3", "optim.lr=1e-4"] + layout)
        assert result.returncode == 0, result.stdout + result.stderr
        folder = str(tmp_path_factory.mktemp(name + "_model") / "model")
        consolidate(os.path.join(run_dir, "checkpoints"), folder, log=lambda *_: None)
        out[name] = (run_dir, load_consolidated(folder).state_dict())
    return out


def tag_dir(run_dir):
    ckpt = os.path.join(run_dir, "checkpoints")
    return os.path.join(ckpt, open(os.path.join(ckpt, "latest")).read().strip())


def test_consolidated_tp2_equals_each_ranks_training_weights_exactly(runs):
    run_dir, full = runs["tp2"]
    for rank in range(2):
        own = torch.load(os.path.join(tag_dir(run_dir), f"mp_rank_{rank:02d}_model_states.pt"), weights_only=False)["module"]
        mine = shard_full_state_dict(full, rank, 2)
        assert set(own) == set(mine)
        assert all(torch.equal(own[k], mine[k]) for k in own)


def test_consolidated_pipeline_equals_each_stage_file_exactly(runs):
    run_dir, full = runs["pp2"]
    assert_stage_files_hold(tag_dir(run_dir), full, tp=1)


def initial_weights(run_dir):
    """The weights the run started from, built as the trainer builds them (train/build.py: the
    full model from train.seed), from the config the run saved with its checkpoint."""
    cfg = load_config(os.path.join(tag_dir(run_dir), "run_config.json"))
    torch.manual_seed(cfg.train.seed)
    return PLDRModel(cfg.model_config()).state_dict()


def test_layouts_that_see_the_same_batches_consolidate_to_the_same_model(runs):
    """Same global batch (data-parallel size), different split: equal within what 3 AdamW steps of
    lr 1e-4 can make of fp32 rounding (an update of at most lr per element per step).

    That bound alone is about as large as the whole distance the 3 steps move the weights (at most
    2.9e-4), so a layout that never trained would pass it. The difference as a whole (its 2-norm)
    must also stay within 10% of how far the reference moved from the initial weights. Measured:
    3.8% pp2 vs tp2 (3.6% of the elements differ by over 1e-5: Adam's near-zero gradients again),
    0.02% dp2_zero3 vs dp2_zero1; weights that never trained: 100%. (TP=2 x PP=2 against one
    process: tests/test_pipeline_zero.py.)"""
    for ref_name, others in (("tp2", ("pp2",)), ("dp2_zero1", ("dp2_zero3",))):
        ref = runs[ref_name][1]
        init = initial_weights(runs[ref_name][0])
        assert init.keys() == ref.keys()
        moved = torch.cat([(ref[k] - init[k]).flatten() for k in ref])
        # Adam moves each element by at most ~lr per step: init is where the run started
        assert 0 < moved.abs().max() <= 3 * 1e-4 * 1.5, (ref_name, moved.abs().max())
        for name in others:
            full = runs[name][1]
            assert full.keys() == ref.keys(), name
            for key in ref:
                # Adam turns rounding-level gradient differences near zero into up to lr per step
                assert (full[key] - ref[key]).abs().max() <= 3 * 1e-4 * 1.5, (name, key)
            diff = torch.cat([(full[k] - ref[k]).flatten() for k in ref])
            assert diff.norm() <= 0.1 * moved.norm(), (name, ref_name, (diff.norm() / moved.norm()).item())


def test_incomplete_or_missing_checkpoint_is_refused(runs, tmp_path):
    with pytest.raises(CheckpointError, match="neither a checkpoint folder"):
        consolidate(str(tmp_path), str(tmp_path / "out"))
    run_dir, _ = runs["tp2"]
    broken = tmp_path / "step_x"
    os.makedirs(broken)
    for f in os.listdir(tag_dir(run_dir)):
        if not f.startswith("mp_rank_01"):
            os.link(os.path.join(tag_dir(run_dir), f), broken / f)
    with pytest.raises(CheckpointError, match="mp_rank_01_model_states.pt is missing"):
        consolidate(str(broken), str(tmp_path / "out"))


def test_resume_skips_unfinished_or_corrupt_checkpoints_and_refuses_another_world_size(runs, tmp_path, monkeypatch):
    """The checks behind the trainer's resume (train/checkpoint.py), on a real DP=2 checkpoint: a
    tag without COMPLETE.json (its save did not finish) or with a file altered in place (same
    size: only the sha256 tells) is skipped, with a warning naming the reason, for the previous
    complete one; and a rank of a larger world refuses the checkpoint in one line naming pldr-reshard."""
    from pldr_dist.train import checkpoint
    from pldr_dist.train.checkpoint import CheckpointManager, verify_tag

    source = os.path.join(runs["dp2_zero1"][0], "checkpoints")
    newest = open(os.path.join(source, "latest")).read().strip()
    older = "step_00000001"
    ckpt = tmp_path / "checkpoints"

    def fresh_copy():
        shutil.rmtree(ckpt, ignore_errors=True)
        shutil.copytree(source, ckpt)
        shutil.copytree(ckpt / newest, ckpt / older)   # an older complete tag to fall back to
        assert verify_tag(str(ckpt / newest)) is None and verify_tag(str(ckpt / older)) is None

    # one process and no process group: rank 0's choice is the answer
    monkeypatch.setattr(checkpoint.dist, "broadcast_object_list", lambda objects, src=0: None)

    def choose():
        warnings = []
        tag = CheckpointManager(str(tmp_path), keep=2, rank=0, world_size=2, log=warnings.append).newest_valid()
        return tag, warnings

    fresh_copy()
    assert choose() == (newest, [])

    (ckpt / newest / "COMPLETE.json").unlink()
    reason = f"{ckpt / newest} has no COMPLETE.json (the save did not finish)"
    assert verify_tag(str(ckpt / newest)) == reason
    assert choose() == (older, [f"WARNING: skipping checkpoint {newest}: {reason}; trying the previous one"])

    fresh_copy()
    victim = ckpt / newest / "mp_rank_00_model_states.pt"
    raw = bytearray(victim.read_bytes())
    raw[len(raw) // 2] ^= 0xFF                          # one byte, in place
    victim.write_bytes(bytes(raw))
    assert victim.stat().st_size == len(raw)
    reason = f"{victim} is corrupt (sha256 mismatch)"
    assert verify_tag(str(ckpt / newest)) == reason
    assert choose() == (older, [f"WARNING: skipping checkpoint {newest}: {reason}; trying the previous one"])

    fresh_copy()
    missing = ckpt / newest / "rank_00002.pt"
    with pytest.raises(CheckpointError) as refused:
        CheckpointManager(str(tmp_path), keep=2, rank=2, world_size=4).load(None, newest)
    assert str(refused.value) == (f"{missing} is missing: checkpoint {newest} was written by a different number of "
                                  f"processes; convert it with `pldr-reshard {ckpt / newest} NEW_RUN_DIR` or launch "
                                  f"the same layout")
