"""Launching mechanics: rank discovery from each launcher's environment and its one-line errors,
and real jobs of tests/launch_probe.py (the trainer's contract on a float64 linear model, whose
losses are recomputed here in-process) through sbatch on a real local SLURM cluster, where
SLURM's own warning before a 1-minute time limit makes the job checkpoint, requeue itself and
finish with the reference losses. The real trainer under mpirun, torchrun, the deepspeed launcher
and sbatch is tested in tests/test_launch_trainer.py (each launcher's losses, and the launch the
trainer read from its environment).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch

from launch_probe import batch
from slurm_cluster import ENDED, ROOT, ensure_slurm_cluster, job_info, sbatch, wait_for_job

from pldr_dist import distributed as D

LAUNCH = os.path.join(ROOT, "launch")
ENTRY = "launch_probe"
STEPS, SEED = 6, 11
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                 "LOCAL_SIZE", "CROSS_SIZE", "CROSS_RANK", "GROUP_RANK", "OMP_NUM_THREADS")
LAUNCHER_PREFIXES = ("SLURM_", "OMPI_", "PMI_", "PMIX_", "TORCHELASTIC_")


# -- discovery from the environment (in-process) ---------------------------------------------
@pytest.fixture
def clean_env(monkeypatch):
    for name in list(os.environ):
        if name in LAUNCHER_VARS or name.startswith(LAUNCHER_PREFIXES):
            monkeypatch.delenv(name)
    return monkeypatch


def test_discover_reads_torchrun_environment(clean_env):
    clean_env.setenv("TORCHELASTIC_RUN_ID", "x")
    for k, v in dict(RANK="3", WORLD_SIZE="4", LOCAL_RANK="1", LOCAL_WORLD_SIZE="2", MASTER_ADDR="h0", MASTER_PORT="2950").items():
        clean_env.setenv(k, v)
    assert D.discover() == D.DistEnv(3, 1, 4, 2, "h0", 2950, "torchrun")


def test_discover_reads_srun_environment_master_from_nodelist_port_from_job_id(clean_env):
    for k, v in dict(SLURM_JOB_ID="123456", SLURM_STEP_ID="0", SLURM_PROCID="13", SLURM_LOCALID="5",
                     SLURM_NODEID="1", SLURM_STEP_NUM_TASKS="16", SLURM_STEP_TASKS_PER_NODE="8(x2)",
                     SLURM_STEP_NODELIST="gpu[07-08]", SLURM_NTASKS="16").items():
        clean_env.setenv(k, v)
    assert D.discover() == D.DistEnv(13, 5, 16, 8, "gpu07", 10000 + 123456 % 50000, "slurm")
    clean_env.setenv("MASTER_PORT", "23456")
    assert D.discover().master_port == 23456


@pytest.mark.slurm
def test_nodelist_parser_matches_scontrol_show_hostnames():
    ensure_slurm_cluster()   # scontrol needs a slurm.conf
    for nodelist in ["node[01-03,7],gpu5", "vm", "x[1-2]y[3-4]", "n[9-11]", "gpu[007-009,100],cpu1"]:
        expected = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                                  check=True).stdout.split()
        assert D.parse_nodelist(nodelist) == expected
    assert D.parse_tasks_per_node("2(x3),1") == [2, 2, 2, 1]


@pytest.mark.parametrize("env, says", [
    (dict(RANK="0"), "WORLD_SIZE"),
    (dict(WORLD_SIZE="2"), "RANK is not"),
    (dict(RANK="0", WORLD_SIZE="2", LOCAL_RANK="0", MASTER_PORT="29500"), "MASTER_ADDR"),
    (dict(RANK="2", WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="h", MASTER_PORT="1"), "rank 2 is outside world size 2"),
    (dict(RANK="one", WORLD_SIZE="2"), "RANK='one' is not an integer"),
    (dict(SLURM_JOB_ID="7", SLURM_NTASKS="2", SLURM_PROCID="0"), "not started by srun"),
])
def test_wrong_or_incomplete_environment_gets_one_line_error(clean_env, env, says):
    for k, v in env.items():
        clean_env.setenv(k, v)
    with pytest.raises(D.LaunchError, match=says) as err:
        D.discover()
    assert "\n" not in str(err.value)


def test_no_launcher_is_a_world_of_one(clean_env):
    env = D.discover()
    assert (env.rank, env.world_size, env.local_world_size, env.launcher) == (0, 1, 1, "single")


# -- real jobs -------------------------------------------------------------------------------
def reference_losses(world: int, steps: int = STEPS, seed: int = SEED) -> list[float]:
    """launch_probe's data-parallel SGD, all ranks simulated in this process."""
    w, losses = torch.zeros(8, dtype=torch.float64), []
    for step in range(steps):
        grads, loss_sum = [], 0.0
        for rank in range(world):
            x, y = batch(seed, step, rank)
            err = x @ w - y
            loss_sum = loss_sum + (err ** 2).mean()
            grads.append(2 * x.T @ err / len(y))
        w = w - 0.05 * sum(grads) / world
        losses.append(loss_sum.item() / world)
    return losses


def launch_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS and not k.startswith(LAUNCHER_PREFIXES)}
    env.update(PYTHONPATH=ROOT + os.pathsep + os.path.join(ROOT, "tests"), PYTHON=sys.executable, PLDR_ENTRY=ENTRY,
               DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1", **extra)
    return env


def write_config(run_dir: str, steps: int = STEPS, step_seconds: float = 0.0) -> str:
    path = run_dir + ".yaml"
    with open(path, "w") as f:
        json.dump({"run_dir": run_dir, "train": {"steps": steps, "seed": SEED}, "probe": {"step_seconds": step_seconds}}, f)
    return path


def read_run(run_dir: str) -> tuple[list[dict], list[dict]]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        metrics = [json.loads(line) for line in f]
    envs = []
    for r in range(metrics[0]["world_size"]):
        with open(os.path.join(run_dir, f"env-rank{r}.json")) as f:
            envs.append(json.load(f))
    return metrics, envs


# -- sbatch on a real local SLURM cluster -----------------------------------------------------
# The script's defaults ask for 2 nodes x 8 GPUs; here: one node, two CPU tasks.
SBATCH_LOCAL = ["--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1", "--time=30"]


def job_logs(work: str, job: int) -> str:
    paths = [f"{work}/logs/{job}.out"] + [f"{work}/logs/{job}/rank-{r}.log" for r in range(2)]
    return "\n".join(f"--- {p}\n" + (open(p).read()[-3000:] if os.path.exists(p) else "(missing)") for p in paths)


@pytest.mark.slurm
def test_sbatch_signal_before_time_limit_checkpoints_requeues_and_matches_reference(tmp_path):
    """SLURM itself sends the warning: a 1-minute job with `--signal=B:USR1@20` is signalled
    (SLURM checks every ~30 s, so 10-45 s after start), checkpoints, requeues itself, and the
    requeued run (given a longer limit, and no more pause per step) finishes the same losses."""
    ensure_slurm_cluster()
    work = tmp_path / "time-limit"
    (work / "logs").mkdir(parents=True)
    run_dir, steps = str(work / "run"), 240
    config = write_config(run_dir, steps, step_seconds=0.3)   # 72 s of steps: more than the limit
    options = [o for o in SBATCH_LOCAL if not o.startswith("--time")] + ["--time=1", "--signal=B:USR1@20"]
    job = sbatch(f"{LAUNCH}/slurm_train.sbatch", options, ["--config", config], cwd=str(work), env=launch_env())
    deadline = time.time() + 600   # the node may still run another test run's jobs: the limit counts from the start
    while job_info(job).get("JobState") == "PENDING":
        assert time.time() < deadline, job_logs(work, job)
        time.sleep(0.5)
    deadline = time.time() + 120
    while job_info(job).get("Restarts") != "1":   # (passing through COMPLETING / REQUEUED on the way)
        assert time.time() < deadline and job_info(job).get("JobState") not in ENDED, job_logs(work, job)
        time.sleep(0.5)
    write_config(run_dir, steps, step_seconds=0.0)
    subprocess.run(["scontrol", "update", f"JobId={job}", "TimeLimit=10"], check=True, timeout=30)
    info = wait_for_job(job)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", job_logs(work, job)
    batch_log = open(f"{work}/logs/{job}.out").read()
    assert "USR1: asking the tasks to checkpoint" in batch_log and "training exited with 75" in batch_log, batch_log
    metrics, _ = read_run(run_dir)
    assert [m["step"] for m in metrics] == list(range(1, steps + 1))
    assert [m["loss"] for m in metrics] == pytest.approx(reference_losses(2, steps), rel=1e-12, abs=0)
