"""The real entry point (`python -m pldr_dist.train`, the tiny PLDR-LLM on the bundled corpus) under
every launcher: torchrun, mpirun, the deepspeed launcher and a two-node torchrun rendezvous train
the same steps to the same losses, and on a real local SLURM cluster an sbatch job runs to
completion with a checkpoint while a job signalled mid-run checkpoints, requeues itself and
reaches the same final loss as the uninterrupted one.
"""
from __future__ import annotations

import json
import os
import subprocess
import time

import pytest

from distributed import free_port
from slurm_cluster import ROOT, ensure_slurm_cluster, job_info, sbatch, wait_for_job
from test_launch import LAUNCH, SBATCH_LOCAL, job_logs, launch_env

STEPS = 6


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from pldr_dist.data.prepare import prepare_corpus
    return prepare_corpus(os.path.join(ROOT, "data", "tinyshakespeare.txt"), str(tmp_path_factory.mktemp("data")),
                          vocab_size=512, seq_len=64, log=lambda *a: None)


def train_args(data, run_dir: str, steps: int = STEPS) -> list[str]:
    return ["--config", os.path.join(ROOT, "configs", "tiny.yaml"), "--set", f"run_dir={run_dir}",
            "--set", f"data.shards={data.manifest}", "--set", f"checkpoint.tokenizer={data.tokenizer}",
            "--set", f"train.steps={steps}", "--set", "log.every=1", "--set", "eval.every=0",
            "--set", f"checkpoint.every={steps}", "--set", "train.micro_batch_size=4"]


def losses(run_dir: str) -> dict[int, float]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def trainer_env(**extra) -> dict:
    env = launch_env(**extra)
    env.pop("PLDR_ENTRY")   # the scripts' default: pldr_dist.train
    return env


def run(cmd: list[str], env: dict, log: str) -> None:
    with open(log, "w") as out:
        done = subprocess.run(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=400, cwd=ROOT)
    assert done.returncode == 0, f"{' '.join(cmd[:3])} exited {done.returncode}:\n{open(log).read()[-4000:]}"


@pytest.fixture(scope="module")
def torchrun_losses(data, tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("torchrun") / "run")
    run(["bash", f"{LAUNCH}/torchrun_train.sh", *train_args(data, run_dir)],
        trainer_env(NPROC_PER_NODE="2", RDZV_ENDPOINT=f"127.0.0.1:{free_port()}"), run_dir + ".log")
    result = losses(run_dir)
    assert sorted(result) == list(range(1, STEPS + 1))
    return result


def test_trainer_under_mpirun_deepspeed_and_two_torchrun_nodes_matches_torchrun(data, torchrun_losses, tmp_path):
    for name, cmd, extra in [
        ("mpirun", [f"{LAUNCH}/mpirun_train.sh"], dict(NP="2")),
        ("deepspeed", [f"{LAUNCH}/deepspeed_train.sh"], dict(NUM_GPUS="2", MASTER_PORT=str(free_port()))),
    ]:
        run_dir = str(tmp_path / name)
        run(["bash", *cmd, *train_args(data, run_dir)], trainer_env(**extra), run_dir + ".log")
        assert losses(run_dir) == pytest.approx(torchrun_losses, rel=1e-6), name

    run_dir = str(tmp_path / "two-nodes")
    env = trainer_env(NNODES="2", NPROC_PER_NODE="1", RDZV_ENDPOINT=f"127.0.0.1:{free_port()}", RDZV_ID="trainer")
    logs = [open(f"{run_dir}-node{n}.log", "w") for n in range(2)]
    nodes = [subprocess.Popen(["bash", f"{LAUNCH}/torchrun_train.sh", *train_args(data, run_dir)], env=env,
                              stdout=log, stderr=subprocess.STDOUT, cwd=ROOT) for log in logs]
    try:
        codes = [node.wait(timeout=400) for node in nodes]
    finally:
        for node in nodes:
            node.kill() if node.poll() is None else None
    assert codes == [0, 0], "\n".join(open(f"{run_dir}-node{n}.log").read()[-3000:] for n in range(2))
    assert losses(run_dir) == pytest.approx(torchrun_losses, rel=1e-6)


SBATCH_STEPS = 40


def submit(data, tmp_path, name: str) -> tuple[int, str, str]:
    ensure_slurm_cluster()
    work = tmp_path / name
    (work / "logs").mkdir(parents=True)
    run_dir = str(work / "run")
    job = sbatch(f"{LAUNCH}/slurm_train.sbatch", SBATCH_LOCAL, train_args(data, run_dir, SBATCH_STEPS),
                 cwd=str(work), env=trainer_env())
    return job, str(work), run_dir


def test_sbatch_trainer_job_completes_and_a_preempted_job_requeues_to_the_same_final_loss(data, tmp_path):
    plain_job, plain_work, plain_run = submit(data, tmp_path, "plain")
    info = wait_for_job(plain_job, timeout=400)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", job_logs(plain_work, plain_job)
    plain = losses(plain_run)
    assert sorted(plain) == list(range(1, SBATCH_STEPS + 1))
    assert os.path.exists(os.path.join(plain_run, "checkpoints", "latest"))

    job, work, run_dir = submit(data, tmp_path, "preempted")
    metrics = os.path.join(run_dir, "metrics.jsonl")
    deadline = time.time() + 300
    while not (os.path.exists(metrics) and len(losses(run_dir)) >= 3):
        assert time.time() < deadline and job_info(job).get("JobState") in ("PENDING", "RUNNING"), job_logs(work, job)
        time.sleep(0.2)
    subprocess.run(["scancel", "--signal=USR1", "--batch", str(job)], check=True, timeout=30)
    info = wait_for_job(job, timeout=400)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", job_logs(work, job)
    batch_log = open(f"{work}/logs/{job}.out").read()
    assert "training exited with 75" in batch_log and "requeueing" in batch_log, batch_log
    preempted = losses(run_dir)
    assert sorted(preempted) == list(range(1, SBATCH_STEPS + 1))
    assert preempted[SBATCH_STEPS] == pytest.approx(plain[SBATCH_STEPS], rel=1e-6)
    assert preempted == pytest.approx(plain, rel=1e-6)
