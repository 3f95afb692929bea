"""A real SLURM cluster for the launcher tests, and small helpers to submit and follow jobs.

`ensure_slurm_cluster()` runs launch/local_slurm_cluster.sh, which starts munge, slurmctld and
slurmd on this machine when no cluster answers `sinfo` (and leaves a running one alone).
"""
from __future__ import annotations

import os
import re
import subprocess
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLUSTER_SCRIPT = os.path.join(ROOT, "launch", "local_slurm_cluster.sh")
ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL")


def ensure_slurm_cluster() -> None:
    """One caller at a time (pytest-xdist workers, or several test runs on one machine): two
    scripts racing could each start a slurmctld."""
    import fcntl
    with open(os.path.join(tempfile.gettempdir(), "pldr-local-slurm-cluster.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        done = subprocess.run(["bash", CLUSTER_SCRIPT], capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise RuntimeError(f"{CLUSTER_SCRIPT} failed:\n{done.stdout}{done.stderr}")


def sbatch(script: str, sbatch_options: list[str], script_args: list[str], cwd: str, env: dict) -> int:
    done = subprocess.run(["sbatch", "--parsable", *sbatch_options, script, *script_args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise RuntimeError(f"sbatch failed: {done.stderr.strip()}")
    return int(done.stdout.strip().split(";")[0])


def job_info(job_id: int) -> dict:
    """`scontrol show job` as a dict (JobState, Reason, Restarts, ExitCode, ...); {} once forgotten."""
    done = subprocess.run(["scontrol", "show", "job", "-o", str(job_id)], capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        return {}
    return dict(re.findall(r"(\w+)=(\S*)", done.stdout))


def wait_for_job(job_id: int, timeout: float = 300) -> dict:
    """Waits until the job has ended for good. SLURM holds a requeued job for ~2 minutes
    (Reason=BeginTime) before it may start again; here it is released after 3 s. (Not at once:
    slurmd refuses to start a job in the second its previous run's credential was revoked. And by
    `StartTime=now` rather than a later time, because that update also runs the scheduler.)"""
    deadline = time.time() + timeout
    held_since = {}
    while time.time() < deadline:
        info = job_info(job_id)
        state = info.get("JobState", "")
        if state in ENDED:
            return info
        if state == "PENDING" and info.get("Reason") == "BeginTime":
            since = held_since.setdefault(info.get("Restarts"), time.time())
            if time.time() - since > 3:
                subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], capture_output=True, timeout=30)
        time.sleep(0.5)
    subprocess.run(["scancel", str(job_id)], capture_output=True, timeout=30)
    raise TimeoutError(f"SLURM job {job_id} did not finish in {timeout:.0f} s (last state {job_info(job_id)})")
