"""The real entry point (`python -m pldr_dist.train`, the tiny PLDR-LLM on the bundled corpus) under
every launcher: torchrun, mpirun, the deepspeed launcher and a two-node torchrun rendezvous train
the same steps to the same losses, and on a real local SLURM cluster an sbatch job runs to
completion with a checkpoint while a job signalled mid-run checkpoints, requeues itself, resumes
from that checkpoint (each step logged once) and reaches the same losses as the uninterrupted one.
The torchrun run also validates and logs G_LM statistics, MFU and TensorBoard scalars, each
checked against a computation of its own here.
"""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import time

import pytest

from pldr_dist.distributed import free_port
from slurm_cluster import ROOT, ensure_slurm_cluster, job_info, sbatch, wait_for_job
from test_launch import LAUNCH, SBATCH_LOCAL, job_logs, launch_env

# One group for pytest-xdist (conftest.py): the sbatch test's jobs need the local SLURM node to
# themselves, and the tests share the module's data and torchrun run.
pytestmark = pytest.mark.slurm

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


def rows(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def losses(run_dir: str) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in rows(run_dir) if "loss" in r}


def logged_steps(run_dir: str) -> list[int]:
    """The step of every training row in order, repeats kept (losses() keeps one row per step)."""
    return [r["step"] for r in rows(run_dir) if "loss" in r]


def trainer_env(**extra) -> dict:
    env = launch_env(**extra)
    env.pop("PLDR_ENTRY")   # the scripts' default: pldr_dist.train
    return env


def run(cmd: list[str], env: dict, log: str) -> None:
    with open(log, "w") as out:
        done = subprocess.run(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=400, cwd=ROOT)
    assert done.returncode == 0, f"{' '.join(cmd[:3])} exited {done.returncode}:\n{open(log).read()[-4000:]}"


# The torchrun run also validates, logs G_LM statistics every step, reports MFU and checkpoints
# at step 3 too; what it logs is checked in test_torchrun_run_logs_..., and the other launchers'
# runs, which do none of this, must still train to its losses: none of it changes the training.
PEAK_TFLOPS, EVAL_EVERY = 1e-3, 3
TORCHRUN_EXTRA = ["--set", f"eval.every={EVAL_EVERY}", "--set", "log.g_stats_every=1", "--set",
                  f"log.peak_tflops={PEAK_TFLOPS}", "--set", f"checkpoint.every={EVAL_EVERY}"]


@pytest.fixture(scope="module")
def torchrun_run(data, tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("torchrun") / "run")
    run(["bash", f"{LAUNCH}/torchrun_train.sh", *train_args(data, run_dir), *TORCHRUN_EXTRA],
        trainer_env(NPROC_PER_NODE="2", RDZV_ENDPOINT=f"127.0.0.1:{free_port()}"), run_dir + ".log")
    return run_dir


@pytest.fixture(scope="module")
def torchrun_losses(torchrun_run):
    result = losses(torchrun_run)
    assert sorted(result) == list(range(1, STEPS + 1))
    assert logged_steps(torchrun_run) == list(range(1, STEPS + 1))
    return result


def launch_line(log: str) -> str:
    """The trainer's line naming its launch (rank 0's, once)."""
    found = [line[line.index("launch: "):].strip() for line in open(log) if "launch: " in line]
    assert len(found) == 1, open(log).read()[-3000:]
    return found[0]


def test_trainer_under_mpirun_deepspeed_and_two_torchrun_nodes_matches_torchrun(data, torchrun_run, torchrun_losses,
                                                                                tmp_path):
    """Each launcher's job trains to torchrun's losses, and the trainer read its launch from that
    launcher's environment: the launcher's name, the processes, the processes a node and gloo."""
    assert launch_line(torchrun_run + ".log").startswith("launch: 2 processes, 2 a node, started by torchrun; gloo, ")
    for name, cmd, extra, launcher in [
        ("mpirun", [f"{LAUNCH}/mpirun_train.sh"], dict(NP="2"), "mpi"),
        ("deepspeed", [f"{LAUNCH}/deepspeed_train.sh"], dict(NUM_GPUS="2", MASTER_PORT=str(free_port())), "deepspeed"),
    ]:
        run_dir = str(tmp_path / name)
        run(["bash", *cmd, *train_args(data, run_dir)], trainer_env(**extra), run_dir + ".log")
        assert losses(run_dir) == pytest.approx(torchrun_losses, rel=1e-6), name
        assert launch_line(run_dir + ".log").startswith(f"launch: 2 processes, 2 a node, started by {launcher}; gloo, ")

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
    rank0 = [n for n in range(2) if "launch: " in open(f"{run_dir}-node{n}.log").read()]
    assert len(rank0) == 1 and launch_line(f"{run_dir}-node{rank0[0]}.log").startswith(
        "launch: 2 processes, 1 a node, started by torchrun; gloo, ")


def test_torchrun_run_logs_validation_g_stats_grad_norm_mfu_and_tensorboard(torchrun_run, tmp_path, monkeypatch):
    """What the torchrun run logged, against the same quantities computed here: the validation
    loss at steps 3 and 6 from the checkpointed weights and the held-out batches each rank
    reads; G_LM statistics and the gradient norm of step 1 from the initial weights and both
    ranks' first batches; throughput, TFLOP/s and MFU from their definitions; TensorBoard's
    scalars equal to metrics.jsonl; and pldr-plot-metrics draws the logged curves."""
    import torch
    import torch.nn.functional as F
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from test_train_gstats import expected_stats

    from pldr_dist.data.loader import TokenLoader
    from pldr_dist.model import PLDRModel, lm_loss
    from pldr_dist.model.flops import flops_per_token
    from pldr_dist.train.config import load_config

    ckpt = os.path.join(torchrun_run, "checkpoints")
    cfg = load_config(os.path.join(ckpt, f"step_{STEPS:08d}", "run_config.json"))
    mcfg, world, seq_len, micro = cfg.model_config(), 2, 64, cfg.train.micro_batch_size
    all_rows = rows(torchrun_run)
    train = {r["step"]: r for r in all_rows if "loss" in r}

    # validation: logged at steps 3 and 6, the mean loss of eval.batches held-out batches per rank
    validated = [r for r in all_rows if "val_loss" in r]
    assert [r["step"] for r in validated] == [EVAL_EVERY, 2 * EVAL_EVERY] and cfg.eval.batches == 4
    for row in validated:
        model = PLDRModel(mcfg).eval()
        weights = torch.load(os.path.join(ckpt, f"step_{row['step']:08d}", "mp_rank_00_model_states.pt"),
                             weights_only=False)["module"]
        model.load_state_dict(weights)
        per_rank = []
        with torch.no_grad():
            for rank in range(world):
                batches = iter(TokenLoader(cfg.data.shards, "valid", micro, seq_len, rank, world, shuffle=False))
                per_batch = []
                for _ in range(cfg.eval.batches):
                    batch = next(batches)
                    logits = model(batch["input"]).double()
                    per_batch.append(F.cross_entropy(logits.flatten(0, 1), batch["target"].flatten(),
                                                     ignore_index=mcfg.pad_id).item())
                per_rank.append(sum(per_batch) / len(per_batch))
        want = sum(per_rank) / world
        assert row["val_loss"] == pytest.approx(want, rel=1e-5), (row, want)
        assert row["val_ppl"] == pytest.approx(math.exp(row["val_loss"]), rel=1e-9)

    # step 1: G_LM statistics (log.g_stats_every=1) and the gradient norm before clipping
    torch.manual_seed(cfg.train.seed)                       # the trainer's initial weights (build_run)
    initial = PLDRModel(mcfg)
    first = [next(iter(TokenLoader(cfg.data.shards, "train", micro, seq_len, rank, world, cfg.data.seed)))
             for rank in range(world)]
    want = expected_stats(initial, [b["input"] for b in first])   # over both ranks' sequences and all heads
    got = {k: v for k, v in train[1].items() if k.startswith(("g_dist/", "g_mean/"))}
    assert got.keys() == want.keys() and len(got) == 2 * mcfg.num_layers
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-5), (key, got[key], value)
    loss = sum(lm_loss(initial(b["input"]), b["target"], mcfg.pad_id) for b in first) / world
    loss.backward()
    norm = torch.nn.utils.get_total_norm([p.grad for p in initial.parameters()]).item()
    assert train[1]["loss"] == pytest.approx(loss.item(), rel=1e-5)
    assert train[1]["grad_norm"] == pytest.approx(norm, rel=1e-4), (train[1]["grad_norm"], norm)

    # every step: statistics, a finite gradient norm, and throughput, TFLOP/s and MFU as defined
    tokens_per_step, flops = micro * world * seq_len, flops_per_token(mcfg, seq_len)
    assert sorted(train) == list(range(1, STEPS + 1))
    for step, row in train.items():
        assert sorted(k for k in row if k.startswith(("g_dist/", "g_mean/"))) == sorted(want), step
        assert all(math.isfinite(row[k]) for k in want) and all(row[f"g_dist/layer_{i}"] > 0 for i in range(2))
        assert math.isfinite(row["grad_norm"]) and row["grad_norm"] > 0, row
        assert row["tokens"] == step * tokens_per_step
        assert row["tokens_per_s"] == pytest.approx(tokens_per_step / row["step_time_s"], rel=1e-6)
        assert row["tflops_per_device"] == pytest.approx(row["tokens_per_s"] * flops / world / 1e12, rel=1e-6)
        assert row["mfu"] > 0 and row["mfu"] == pytest.approx(row["tflops_per_device"] / PEAK_TFLOPS, rel=1e-6)

    # TensorBoard: one scalar series per numeric key of metrics.jsonl, with the same steps and values
    series = {}
    for row in all_rows:
        for key, value in row.items():
            if key not in ("step", "time") and isinstance(value, (int, float)) and math.isfinite(value):
                series.setdefault(key, []).append((row["step"], value))
    events = EventAccumulator(os.path.join(torchrun_run, "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    assert sorted(events.Tags()["scalars"]) == sorted(series)
    assert {"loss", "lr", "grad_norm", "mfu", "val_loss", "val_ppl", "g_dist/layer_1"} <= set(series)
    for key, points in series.items():
        logged = [(e.step, e.value) for e in events.Scalars(key)]
        assert [s for s, _ in logged] == [s for s, _ in points], key
        assert [v for _, v in logged] == pytest.approx([v for _, v in points], rel=1e-6, abs=1e-30), key

    # pldr-plot-metrics: the training and validation losses, and the throughput, as logged
    import matplotlib.figure
    from pldr_dist.train.plot import main as plot_metrics
    figures, savefig = [], matplotlib.figure.Figure.savefig
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, *a, **k: figures.append(fig) or savefig(fig, *a, **k))
    png = tmp_path / "metrics.png"
    assert plot_metrics([os.path.join(torchrun_run, "metrics.jsonl"), "--out", str(png), "--labels", "tr"]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (figure,) = figures
    curves = [{line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.lines}
              for ax in figure.axes]
    steps = list(range(1, STEPS + 1))
    assert curves == [{"tr train": (steps, [train[s]["loss"] for s in steps]),
                       "tr validation": ([r["step"] for r in validated], [r["val_loss"] for r in validated])},
                      {"tr": (steps, [train[s]["tokens_per_s"] for s in steps])}]


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
    # the requeued run resumed from the checkpoint of the step the first one stopped at, and logged
    # only the steps after it: each step once, in order (a restart from step 0 logs 1, 2, ... again)
    rank0_log = open(f"{work}/logs/{job}/rank-0.log").read()
    stopped = re.findall(r"checkpointed at step (\d+), exiting with 75 for requeue", rank0_log)
    assert len(stopped) == 1, job_logs(work, job)
    assert f"resumed from checkpoint step_{int(stopped[0]):08d} (step {stopped[0]}," in rank0_log, job_logs(work, job)
    assert rank0_log.count("starting a new run") == 1, job_logs(work, job)
    assert logged_steps(run_dir) == list(range(1, SBATCH_STEPS + 1))
    assert logged_steps(plain_run) == list(range(1, SBATCH_STEPS + 1))
    preempted = losses(run_dir)
    assert sorted(preempted) == list(range(1, SBATCH_STEPS + 1))
    assert preempted[SBATCH_STEPS] == pytest.approx(plain[SBATCH_STEPS], rel=1e-6)
    assert preempted == pytest.approx(plain, rel=1e-6)
