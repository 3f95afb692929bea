"""The real entry point on 2 CPU processes: exact resume, signals, corrupt checkpoints, faults."""
import json
import os
import re
import shutil

import pytest
import torch

from pldr_dist.train.checkpoint import verify_tag
from train_helpers import final_weights, losses, metric, prepare_data, train, train_under_torchrun, train_with_fault

STEPS = ["train.steps=24", "checkpoint.every=5", "checkpoint.keep=2"]
PREEMPTED, NONFINITE = 75, 3   # pldr_dist.distributed.PREEMPTED_EXIT_CODE, pldr_dist.train.trainer.EXIT_NONFINITE


def assert_trainer_exited_with(result, code, nproc=2):
    """The trainer's exit code on every rank. torchrun itself exits 1 when a worker exits non-zero
    (a Slurm job runs the trainer under srun and sees the code): its failure report lists each
    rank's code, the first rank to exit as the root cause; a rank still shutting down when
    torchrun stopped the others may show its SIGTERM (-15)."""
    assert result.returncode == 1, (result.returncode, result.stdout + result.stderr)
    report = result.stderr[result.stderr.rfind("Failures:"):]
    codes = [int(c) for c in re.findall(r"exitcode\s*:\s*(-?\d+)", report)]
    root = re.search(r"Root Cause.*?exitcode\s*:\s*(-?\d+)", report, re.S)
    assert root and int(root.group(1)) == code and len(codes) == nproc, (code, codes, report)
    assert all(c in (code, -15) for c in codes), (code, codes, report)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return prepare_data(str(tmp_path_factory.mktemp("data")))


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """Uninterrupted 24-step runs for the DP=2 and TP=2 layouts (the DP one profiles steps 3-4:
    profiling changes no number)."""
    runs = {}
    for name, layout in (("dp2", ["log.profile_steps=[3,4]"]), ("tp2", ["parallel.tp=2"])):
        run_dir = str(tmp_path_factory.mktemp(f"ref_{name}"))
        result = train(data, run_dir, sets=STEPS + layout)
        assert result.returncode == 0, result.stdout + result.stderr
        runs[name] = run_dir
    profile = open(os.path.join(runs["dp2"], "profile.txt")).read()
    assert profile.startswith("# steps 3-4: host reads of tensor values inside the step: ") and "aten::mm" in profile
    assert "# steps 3-4, sorted by self_cpu_time_total" in profile
    assert os.path.getsize(os.path.join(runs["dp2"], "profile_trace.json")) > 0
    return runs


def deepspeed_files(run_dir: str, tag: str) -> dict:
    """sha256 of the model and optimizer files of a tag (rank_*.pt hold Python's and numpy's
    RNG states, which the trainer does not seed: they differ between any two runs)."""
    files = json.load(open(os.path.join(run_dir, "checkpoints", tag, "COMPLETE.json")))["files"]
    return {k: v["sha256"] for k, v in files.items() if k.startswith(("mp_rank", "zero_"))}


# dp2 saves synchronously; tp2 asynchronously (the default) and is killed while its writer still
# holds the files of step 10 (the testing aid sleeps 3 s before renaming them).
@pytest.mark.parametrize("name,layout,killed_at,resumed_from", [
    ("dp2", ["checkpoint.async_save=false"], 13, 10),
    ("tp2", ["parallel.tp=2"], 13, 5)])
def test_sigkilled_run_resumes_bit_identically(data, reference, tmp_path, name, layout, killed_at, resumed_from):
    run_dir = str(tmp_path / "run")
    delay = ["checkpoint.write_delay_s=3"] if resumed_from == 5 else []
    crashed = train_with_fault(data, run_dir, 2, STEPS + layout + delay, f"kill:{killed_at}")
    assert crashed.returncode != 0
    killed = losses(run_dir)
    assert max(killed) == killed_at
    ckpt = os.path.join(run_dir, "checkpoints")
    assert open(os.path.join(ckpt, "latest")).read().strip() == f"step_{resumed_from:08d}"
    if resumed_from == 5:      # the write in flight left its files under temporary names, no COMPLETE.json
        assert not os.path.exists(os.path.join(ckpt, "step_00000010", "COMPLETE.json"))
        assert any(f.endswith("-tmp") for f in os.listdir(os.path.join(ckpt, "step_00000010")))
    os.remove(os.path.join(run_dir, "metrics.jsonl"))
    result = train(data, run_dir, sets=STEPS + layout)
    assert result.returncode == 0, result.stdout + result.stderr
    if resumed_from == 5:
        assert "WARNING: skipping checkpoint step_00000010: " in result.stdout
    assert f"resumed from checkpoint step_{resumed_from:08d}" in result.stdout
    resumed, ref = losses(run_dir), losses(reference[name])
    assert min(resumed) == resumed_from + 1 and max(resumed) == 24
    assert all(resumed[s] == ref[s] for s in resumed)           # bit-identical losses from the resume on
    got, want = final_weights(run_dir), final_weights(reference[name])
    assert all(torch.equal(got[k], want[k]) for k in want)      # and bit-identical parameters
    if name == "dp2":          # synchronous files, byte for byte those the reference wrote asynchronously
        assert deepspeed_files(run_dir, "step_00000024") == deepspeed_files(reference[name], "step_00000024")


def test_sigterm_checkpoints_exits_75_and_resumes_exactly(data, reference, tmp_path):
    """SIGTERM arrives while the asynchronous write of step 5 is in flight (held 2 s by the testing
    aid): the trainer waits for it, checkpoints step 7, waits for that write too and exits with 75."""
    run_dir = str(tmp_path / "run")
    stopped = train_with_fault(data, run_dir, 2, STEPS + ["checkpoint.write_delay_s=2"], "term:7")
    assert "checkpoint step_00000007: waiting for the write of step_00000005 in flight" in stopped.stdout
    assert "received signal 15: checkpointed at step 7, exiting with 75 for requeue" in stopped.stdout
    assert_trainer_exited_with(stopped, PREEMPTED)
    stopped = max(losses(run_dir))
    assert stopped == 7
    latest = open(os.path.join(run_dir, "checkpoints", "latest")).read().strip()
    assert latest == f"step_{stopped:08d}"                      # checkpointed at the step it finished
    assert [verify_tag(os.path.join(run_dir, "checkpoints", t)) for t in ("step_00000005", latest)] == [None, None]
    result = train(data, run_dir, sets=STEPS)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"resumed from checkpoint {latest}" in result.stdout
    assert losses(run_dir) == losses(reference["dp2"])


def test_truncated_checkpoint_is_detected_and_previous_one_used(data, reference, tmp_path):
    run_dir = str(tmp_path / "run")
    shutil.copytree(reference["dp2"], run_dir)
    ckpt = os.path.join(run_dir, "checkpoints")
    assert sorted(t for t in os.listdir(ckpt) if t.startswith("step_")) == ["step_00000020", "step_00000024"]
    victim = os.path.join(ckpt, "step_00000024", "mp_rank_00_model_states.pt")
    with open(victim, "r+b") as f:
        f.truncate(os.path.getsize(victim) // 2)
    os.remove(os.path.join(run_dir, "metrics.jsonl"))
    result = train(data, run_dir, sets=STEPS)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"WARNING: skipping checkpoint step_00000024: {victim} is truncated" in result.stdout
    assert "resumed from checkpoint step_00000020" in result.stdout
    ref = losses(reference["dp2"])
    assert losses(run_dir) == {s: ref[s] for s in range(21, 25)}


def test_sparse_logging_reads_the_losses_of_a_run_that_logs_every_step(data, reference, tmp_path):
    """The step's loss stays on the device until a log line reads it (no host sync per step):
    the losses logged every 8 steps are exactly those of the run that logs every step."""
    run_dir = str(tmp_path / "sparse")
    result = train(data, run_dir, sets=STEPS + ["log.every=8"])
    assert result.returncode == 0, result.stdout + result.stderr
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    logged = {r["step"]: r["loss"] for r in rows if "loss" in r}
    ref = losses(reference["dp2"])
    assert logged == {s: ref[s] for s in (8, 16, 24)}


def test_nonfinite_loss_is_skipped_and_a_persistent_one_stops_the_run(data, tmp_path):
    once = str(tmp_path / "once")
    result = train(data, once, sets=["train.steps=5", "train.inject_nonfinite_at=[3]"])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "step 3: non-finite loss or gradient, update skipped (1 in a row, 1 in total)" in result.stdout
    persistent = str(tmp_path / "persistent")
    # log.every=4: a step that is not logged has its skip read a step later (train/trainer.py),
    # so step 5's is read at step 6, before that step's checkpoint
    result = train_under_torchrun(data, persistent, 2, ["train.steps=8", "checkpoint.every=2",
                                                         "train.max_nonfinite_in_row=3",
                                                         "train.inject_nonfinite_at=[3,4,5,6,7,8]", "log.every=4"])
    assert_trainer_exited_with(result, NONFINITE)
    assert "stopping: 3 non-finite steps in a row (train.max_nonfinite_in_row=3)" in result.stderr + result.stdout
    # the skipped steps 3 and 4 left the weights exactly as step 2 made them, and that is what step 4 saved
    ckpt = os.path.join(persistent, "checkpoints")
    assert open(os.path.join(ckpt, "latest")).read().strip() == "step_00000004"
    load = lambda tag: torch.load(os.path.join(ckpt, tag, "mp_rank_00_model_states.pt"), weights_only=False)["module"]
    at2, at4 = load("step_00000002"), load("step_00000004")
    assert all(torch.equal(at2[k], at4[k]) for k in at2)


@pytest.mark.parametrize("zero", [1, 2, 3])
def test_bf16_nonfinite_steps_are_skipped_on_every_rank_without_a_host_read(data, tmp_path, zero):
    """bf16 runs turn off DeepSpeed's per-tensor overflow check (engine.make_ds_config). ZeRO-1
    runs BF16_Optimizer, whose global-norm check alone must skip the step, made on the device
    (parallel/device_skip.py: fused AdamW's found_inf); ZeRO-2/3 leave the decision to the
    optimizer's one check of the flat partition (device_skip.defer_norm_check). Either way every
    rank skips, leaving the fp32 master partitions and Adam's moments and step counts (and under
    ZeRO-1/2 the bf16 weights) bit-identical, and the host reads no tensor value in the step
    (log.profile_steps of the poisoned step 3: DeepSpeed's norm checks read it there)."""
    run_dir = str(tmp_path / "bf16")
    result = train(data, run_dir, sets=["train.steps=4", "checkpoint.every=2", "train.precision=bf16",
                                        f"parallel.zero_stage={zero}", "train.inject_nonfinite_at=[3,4]", "log.every=5",
                                        "log.profile_steps=[3,3]", "optim.clip=norm", "optim.clip_value=1.0"])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "step 3: non-finite loss or gradient, update skipped (1 in a row, 1 in total)" in result.stdout
    assert "step 4: non-finite loss or gradient, update skipped (2 in a row, 2 in total)" in result.stdout
    assert metric(run_dir, "host_reads") == {3: {}}, metric(run_dir, "host_reads")
    ckpt = os.path.join(run_dir, "checkpoints")
    load = lambda tag, name: torch.load(os.path.join(ckpt, tag, name), weights_only=False)  # noqa: E731
    if zero < 3:    # ZeRO-3 saves the weights as its partitions, compared as the fp32 masters below
        at2, at4 = (load(t, "mp_rank_00_model_states.pt")["module"] for t in ("step_00000002", "step_00000004"))
        assert next(iter(at2.values())).dtype == torch.bfloat16
        assert all(torch.equal(at2[k], at4[k]) for k in at2)
    master = "fp32_flat_groups" if zero == 3 else "single_partition_of_fp32_groups"
    for rank in range(2):
        name = f"bf16_zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"
        s2, s4 = (load(t, name)["optimizer_state_dict"] for t in ("step_00000002", "step_00000004"))
        assert all(torch.equal(a, b) for a, b in zip(s2[master], s4[master]))
        base = "optimizer_state_dict" if zero == 3 else "base_optimizer_state"
        moments2, moments4 = (s[base]["state"] for s in (s2, s4))
        assert moments2.keys() == moments4.keys() and moments2
        for key in moments2:
            assert all(torch.equal(moments2[key][k], moments4[key][k]) for k in ("exp_avg", "exp_avg_sq", "step"))


def test_a_pipeline_checkpoint_resumes_only_into_its_own_stage_split(data, tmp_path):
    """Each pipeline stage's optimizer state holds its own layers' parameters, so a checkpoint
    resumes only into the split that wrote it: another parallel.partition_method is refused in
    one line naming the method to use (or pldr-reshard). A vocabulary of 4096 makes the head cost
    4 of these decoder layers: "flops" (the default) puts all 4 on stage 0 (pipeline layers 0-4,
    the embedding first), "parameters" 2 and 2. A checkpoint written before the split was
    recorded is judged by the partition method in its run_config.json."""
    from pldr_dist.train.checkpoint import write_marker
    run_dir = str(tmp_path / "pp2")
    sets = ["checkpoint.every=2", "parallel.pp=2", "model.overrides.vocab_size=4096", "model.overrides.num_layers=4"]
    result = train(data, run_dir, sets=sets + ["train.steps=2"])
    assert result.returncode == 0, result.stdout + result.stderr
    resumed = train_under_torchrun(data, run_dir, 2, sets + ["train.steps=3", "parallel.partition_method=parameters"])
    assert_trainer_exited_with(resumed, 2)
    assert ("this pipeline stage held layers 0-4, here it holds layers 0-2 (parallel.partition_method=parameters); "
            "resume with parallel.partition_method=flops") in resumed.stderr, resumed.stderr
    tag = os.path.join(run_dir, "checkpoints", "step_00000002")
    for rank in range(2):      # as written before the split was recorded, by a run of the old default
        path = os.path.join(tag, f"rank_{rank:05d}.pt")
        state = torch.load(path, weights_only=False)
        del state["stage_layers"]
        torch.save(state, path)
    config = json.load(open(os.path.join(tag, "run_config.json")))
    config["parallel"]["partition_method"] = "parameters"
    json.dump(config, open(os.path.join(tag, "run_config.json"), "w"))
    write_marker(tag, 2, 2)
    resumed = train_under_torchrun(data, run_dir, 2, sets + ["train.steps=3"])
    assert_trainer_exited_with(resumed, 2)
    assert ("held the layers parallel.partition_method=parameters gave it, here it holds layers 0-4 "
            "(parallel.partition_method=flops); resume with parallel.partition_method=parameters") in resumed.stderr


def test_bf16_checkpoint_of_deepspeeds_zero1_optimizer_resumes_with_fp32_accumulation(data, tmp_path):
    """Runs before fp32 gradient accumulation used DeepSpeed's ZeRO-1 optimizer for bf16; their
    checkpoints resume under BF16_Optimizer (today's bf16 ZeRO-1) with the losses of a run
    that never stopped (the first step after resuming accumulates one micro-batch: same sums).
    Both reduce over the two ranks in bf16, as those runs did (today's configs reduce in fp32;
    this also runs the overlapped reduction's bf16 path, parallel/grad_reduce.py)."""
    from pldr_dist.parallel.engine import make_ds_config
    new = make_ds_config(micro_batch_size=4, grad_accum_steps=1, dp=2, zero_stage=1, precision="bf16")
    new["communication_data_type"] = "bf16"
    old = {k: v for k, v in new.items() if k not in ("data_types", "communication_data_type")}
    for name, config in (("old", old), ("new", new)):
        (tmp_path / f"{name}.json").write_text(json.dumps(config))
    bf16 = ["checkpoint.every=2", "train.precision=bf16"]
    first = train(data, str(tmp_path / "run"), sets=bf16 + ["train.steps=2", f"deepspeed_config={tmp_path / 'old.json'}"])
    assert first.returncode == 0, first.stdout + first.stderr
    bf16.append(f"deepspeed_config={tmp_path / 'new.json'}")
    resumed = train(data, str(tmp_path / "run"), sets=bf16 + ["train.steps=4"])
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resumed from checkpoint step_00000002" in resumed.stdout
    assert "data-parallel gradients reduced in bfloat16 during the backward (1 bucket)" in resumed.stdout
    reference = train(data, str(tmp_path / "ref"), sets=bf16 + ["train.steps=4"])
    assert reference.returncode == 0, reference.stdout + reference.stderr
    assert losses(str(tmp_path / "run")) == losses(str(tmp_path / "ref"))


def test_host_snapshot_saves_the_same_bytes_and_reuses_its_buffers():
    """The asynchronous save's host copy: torch.save writes it byte for byte as the live state
    (views sharing a storage, requires_grad, a state_dict's metadata), later changes to the live
    state do not reach it, and the next snapshot reuses the same host buffers."""
    import io
    from pldr_dist.train.async_save import HostSnapshot

    def saved(obj):
        out = io.BytesIO()
        torch.save(obj, out)
        return out.getvalue()
    flat = torch.zeros(40)
    module = torch.nn.Linear(4, 3).state_dict()
    module.update(view=flat[4:16].view(3, 4), other=flat[16:28])
    state = {"module": module, "groups": [{"lr": 0.1, "params": [0]}], "fp32": [torch.randn(5, requires_grad=True)],
             "empty": torch.empty(0, 3), "misc": (1, "a", None)}
    host = HostSnapshot()
    first = host.copy(state, "file")
    assert saved(first) == saved(state)
    buffers = {k: b.data_ptr() for k, b in host.buffers.items()}
    state["groups"][0]["lr"] = 0.5
    flat.add_(1)
    assert first["groups"][0]["lr"] == 0.1 and float(first["module"]["view"].sum()) == 0
    second = host.copy(state, "file")
    assert saved(second) == saved(state)
    assert {k: b.data_ptr() for k, b in host.buffers.items()} == buffers


def test_a_failed_background_write_is_one_line_and_nothing_after_it_runs(tmp_path):
    from pldr_dist.errors import error_line
    from pldr_dist.convert.consolidated import CheckpointError
    from pldr_dist.train.async_save import Writer
    from pldr_dist.train.checkpoint import CheckpointManager
    manager = CheckpointManager(str(tmp_path), keep=1, rank=0, world_size=1, async_save=True)
    manager.writer, ran = Writer(), []

    def fail():
        raise OSError(28, "No space left on device")
    manager.writer.submit("writing checkpoint step_00000010", fail)
    manager.writer.submit("finalising checkpoint step_00000010", lambda: ran.append(1))
    manager.writer.wait()
    with pytest.raises(CheckpointError) as err:
        manager.writing()
    assert not ran
    line = error_line("pldr-train", err.value)
    assert "\n" not in line and line.startswith(
        "pldr-train: error: writing checkpoint step_00000010 failed in the background (OSError: [Errno 28] No space "
        "left on device); the newest checkpoint with a COMPLETE.json")
