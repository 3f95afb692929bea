"""Every parallel layout resumes from a checkpoint it wrote itself, bit for bit (the real entry
point under torchrun on CPU processes; test_train_resume.py covers kills, signals and faults).

Each test is independent (no shared reference run), so the suite's workers can share them out."""
import json
import os
import shutil

import pytest

from train_helpers import losses, metric, prepare_data, train


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return prepare_data(str(tmp_path_factory.mktemp("data")))


def checkpoint_files(run_dir: str, tag: str) -> dict:
    """sha256 of every model and optimizer file of a tag, whatever the layout names them
    (mp_rank_*, layer_* under PP, zero_* / *optim_states under ZeRO); rank_*.pt hold RNG states
    the trainer does not seed, run_config.json names the run's folder."""
    files = json.load(open(os.path.join(run_dir, "checkpoints", tag, "COMPLETE.json")))["files"]
    return {k: v["sha256"] for k, v in files.items() if k.endswith(".pt") and not os.path.basename(k).startswith("rank_")}


# Each layout resumes from a checkpoint it wrote itself: a 4-step run checkpoints at 2 and 4; a
# copy with step 4 removed resumes at 2 and must reproduce steps 3-4 and step 4's files exactly.
@pytest.mark.parametrize("name,nproc,layout", [
    ("pp2", 2, ["parallel.pp=2"]),
    ("zero2", 2, ["parallel.zero_stage=2"]),
    ("zero3", 2, ["parallel.zero_stage=3"]),
    ("tp2pp2", 4, ["parallel.tp=2", "parallel.pp=2"])])
def test_each_layout_resumes_from_its_own_checkpoint_bit_identically(data, tmp_path, name, nproc, layout):
    """Also: no layout reads a tensor value on the host inside a step (log.profile_steps, step 3
    on rank 0; on a GPU each read is a sync). The one read there is CPU-only: the CPU kernel of
    fused AdamW reads each tensor's step count on the host, where CUDA's reads it on the device."""
    sets = ["train.steps=4", "checkpoint.every=2", "checkpoint.keep=2"] + layout
    whole, resumed = str(tmp_path / "whole"), str(tmp_path / "resumed")
    result = train(data, whole, nproc, sets + ["log.profile_steps=[3,3]"])
    assert result.returncode == 0, result.stdout + result.stderr
    reads = metric(whole, "host_reads")[3]
    assert reads and all(key.endswith(" aten::_fused_adamw_") for key in reads), reads
    shutil.copytree(whole, resumed)
    ckpt = os.path.join(resumed, "checkpoints")
    shutil.rmtree(os.path.join(ckpt, "step_00000004"))
    with open(os.path.join(ckpt, "latest"), "w") as f:
        f.write("step_00000002")
    os.remove(os.path.join(resumed, "metrics.jsonl"))
    result = train(data, resumed, nproc, sets)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "resumed from checkpoint step_00000002" in result.stdout
    ref = losses(whole)
    assert sorted(ref) == list(range(1, 5)) and ref[4] < ref[1]          # it trained
    assert losses(resumed) == {s: ref[s] for s in (3, 4)}                # bit-identical floats
    files = checkpoint_files(whole, "step_00000004")
    assert len(files) >= nproc and checkpoint_files(resumed, "step_00000004") == files


def test_sequence_parallel_trains_as_plain_tp_through_the_trainer(data, tmp_path):
    """TP=2 with sequence parallelism (the norms work on sequence slices: all-gather before and
    reduce-scatter after the parallel linears, the norms' gradients summed over the TP ranks)
    through pldr-train against plain TP=2: step 1's loss and gradient norm, and step 2's loss
    (the result of step 1's update), within fp32 rounding. Later steps are not compared: this
    tiny model at its learning rate turns rounding differences into different gradient spikes
    from step 3 (Adam's normalisation, chaotic at this size)."""
    sets = ["train.steps=2", "checkpoint.every=100", "parallel.tp=2"]
    plain, sp = str(tmp_path / "plain"), str(tmp_path / "sp")
    result = train(data, plain, 2, sets)
    assert result.returncode == 0, result.stdout + result.stderr
    result = train(data, sp, 2, sets + ["parallel.sequence_parallel=true"])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "sequence parallel (" in result.stdout, result.stdout[-2000:]
    want, got = losses(plain), losses(sp)
    assert sorted(got) == sorted(want) == [1, 2] and want[2] < want[1]
    assert all(abs(got[s] - want[s]) <= 1e-6 * want[s] for s in (1, 2)), (got, want)
    gn_want, gn_got = metric(plain, "grad_norm"), metric(sp, "grad_norm")
    assert abs(gn_got[1] - gn_want[1]) <= 1e-6 * gn_want[1], (gn_got, gn_want)
