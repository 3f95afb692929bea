"""Run the real entry point (`python -m pldr_dist.train`, one process per rank) from tests."""
from __future__ import annotations

import atexit
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from pldr_dist.distributed import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


_prepared = {}   # this process's prepared corpus, in a folder of its own that no test writes to


def prepare_data(out_dir: str):
    """The tokenizer and shards of the first 300 kB of the bundled corpus, in out_dir. Prepared
    once per process (training the tokenizer takes seconds), copied for each caller."""
    from pldr_dist.data.prepare import Prepared, prepare_corpus
    if "data" not in _prepared or not os.path.isfile(_prepared["data"].manifest):
        cache = tempfile.mkdtemp(prefix="pldr-test-data-")
        atexit.register(shutil.rmtree, cache, ignore_errors=True)
        with open(os.path.join(ROOT, "data", "tinyshakespeare.txt")) as f:
            text = f.read()[:300_000]
        with open(os.path.join(cache, "corpus.txt"), "w") as f:
            f.write(text)
        _prepared["data"] = prepare_corpus(os.path.join(cache, "corpus.txt"), cache, vocab_size=512, seq_len=32,
                                           samples_per_shard=256, log=lambda *_: None)
    cached = _prepared["data"]
    src = os.path.dirname(cached.tokenizer)
    os.makedirs(out_dir, exist_ok=True)
    for name in ("corpus.txt", "tokenizer.model"):
        shutil.copyfile(os.path.join(src, name), os.path.join(out_dir, name))
    shutil.copytree(os.path.dirname(cached.manifest), os.path.join(out_dir, "shards"), dirs_exist_ok=True)
    return Prepared(os.path.join(out_dir, "tokenizer.model"), os.path.join(out_dir, "shards", "manifest.json"),
                    cached.train_shards, cached.valid_shards)


def trainer_args(data, run_dir: str, sets: list[str]) -> list[str]:
    """pldr-train's arguments for a run of the tiny model on `data`."""
    base = [f"run_dir={run_dir}", f"data.shards={data.manifest}", f"checkpoint.tokenizer={data.tokenizer}",
            "train.micro_batch_size=4", "log.every=1", "eval.every=0", "log.g_stats_every=1000",
            "optim.warmup_steps=2", "model.overrides.context_length=32"]
    args = ["--config", os.path.join(ROOT, "configs", "tiny.yaml")]
    for item in base + sets:
        args += ["--set", item]
    return args


def command(data, run_dir: str, nproc: int, sets: list[str]) -> list[str]:
    """The run as a user starts it: under torchrun."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "pldr_dist.train", *trainer_args(data, run_dir, sets)]


def env(sets):
    """The ranks' environment for a run with these settings. A run without train.compile=true also
    gets TORCHDYNAMO_DISABLE=1: it compiles nothing of its own, but DeepSpeed's ZeRO set-up imports
    its Muon optimizer, whose module-level torch.compile imports all of inductor, 1.2 s of CPU per
    rank (some three minutes of CPU over the suite). With dynamo off that decorator does nothing;
    pldr_dist never runs Muon."""
    eager = {} if "train.compile=true" in sets else {"TORCHDYNAMO_DISABLE": "1"}
    return {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT, **eager}


def train(data, run_dir, nproc=2, sets=(), timeout=300):
    """A run that should succeed: its ranks started by start_ranks."""
    return start_ranks(trainer_args(data, run_dir, list(sets)), nproc, env(sets), timeout)


def start_ranks(args: list[str], nproc: int, environment: dict, timeout: float) -> subprocess.CompletedProcess:
    """`python -m pldr_dist.train ARGS` on nproc local ranks, each with the variables torchrun gives
    its workers (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT: the
    trainer's env:// launch, pldr_dist/distributed.py), as torchrun --standalone starts them.

    Why not torchrun itself: its agent imports torch, 2.4 s of CPU per run on a CI core, some two
    minutes of CPU over the suite. The launchers themselves (torchrun, srun, mpirun, deepspeed)
    are run by test_launch.py and test_launch_trainer.py, and a run whose failure report matters
    (train_with_fault) still goes through torchrun. As torchrun does, the first rank to exit
    non-zero ends the others (SIGTERM, then SIGKILL); its code is the run's. stdout and stderr are
    each rank's in rank order. An eager run's ranks are forked by this worker's zygote
    (tests/zygote.py), with torch and DeepSpeed imported already: ~5 s of CPU less a rank."""
    port = free_port()
    procs, files, logs = [], [], tempfile.mkdtemp(prefix="pldr-ranks-")
    forker = zygote_for(environment)
    for rank in range(nproc):
        out, err = os.path.join(logs, f"{rank}.out"), os.path.join(logs, f"{rank}.err")
        files.append((out, err))
        ranks = {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nproc), "LOCAL_WORLD_SIZE": str(nproc),
                 "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        if forker is not None:
            procs.append(forker.spawn("pldr_dist.train", args, {**environment, **ranks}, os.getcwd(), out, err))
            continue
        with open(out, "w") as out_file, open(err, "w") as err_file:
            procs.append(subprocess.Popen([sys.executable, "-m", "pldr_dist.train", *args],
                                          env={**environment, **ranks}, stdout=out_file, stderr=err_file))
    deadline, first_failure, timed_out = time.monotonic() + timeout, 0, False
    try:
        while any(p.poll() is None for p in procs):
            first_failure = next((p.returncode for p in procs if p.returncode), 0)
            timed_out = time.monotonic() > deadline
            if first_failure or timed_out:
                break
            time.sleep(0.05)
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    texts = []
    for out, err in files:
        texts.append((open(out).read(), open(err).read()))
    shutil.rmtree(logs, ignore_errors=True)
    stdout, stderr = "".join(t[0] for t in texts), "".join(t[1] for t in texts)
    if timed_out:
        raise subprocess.TimeoutExpired(args, timeout, stdout, stderr)
    code = first_failure or next((p.returncode for p in procs if p.returncode), 0)   # one failed at the end
    return subprocess.CompletedProcess(args, code, stdout, stderr)


_zygote = None


def zygote_for(environment: dict):
    """This worker's zygote (tests/zygote.py: ranks forked with torch and DeepSpeed imported)
    for an eager run, None for a compiled one (TorchDynamo on: processes of their own). Started
    at the first eager run, and again whenever a run's environment differs from the one it was
    started with in more than the rank variables (imports in this process add variables:
    lm_eval's, torch's PYTORCH_NVML_BASED_CUDA_CHECK): what its imports saw must be what the
    rank's own start would have seen."""
    global _zygote
    import zygote
    if "TORCHDYNAMO_DISABLE" not in environment or os.environ.get("PLDR_TEST_ZYGOTE") == "0":
        return None     # train.compile=true (TorchDynamo on), or turned off (PLDR_TEST_ZYGOTE=0)
    wanted = zygote.key(environment)
    if _zygote is not None and (not _zygote.alive() or _zygote.key != wanted):
        _zygote.close()
        _zygote = None
    if _zygote is None:
        _zygote = zygote.Zygote(wanted, ROOT)
        atexit.register(_zygote.close)
    return _zygote


def metric(run_dir: str, key: str) -> dict:
    """{step: value} of one training metric (loss, grad_norm, ...) from a run's metrics.jsonl."""
    out = {}
    path = os.path.join(run_dir, "metrics.jsonl")
    if os.path.isfile(path):
        for line in open(path):
            row = json.loads(line)
            if key in row and "step" in row:
                out[row["step"]] = row[key]
    return out


def losses(run_dir: str) -> dict:
    return metric(run_dir, "loss")


def train_under_torchrun(data, run_dir, nproc, sets, extra_env=None, timeout=300):
    """A run whose failure report matters: torchrun's exit code and its list of each rank's code."""
    return subprocess.run(command(data, run_dir, nproc, list(sets)), env={**env(sets), **(extra_env or {})},
                          capture_output=True, text=True, timeout=timeout)


def train_with_fault(data, run_dir, nproc, sets, fault: str, timeout=300):
    """A run whose ranks crash (fault "kill:K": SIGKILL after step K) or whose rank 0 receives
    SIGTERM (fault "term:K"), through the trainer's PLDR_FAULT testing hook, under torchrun."""
    return train_under_torchrun(data, run_dir, nproc, sets, {"PLDR_FAULT": fault}, timeout)


def final_weights(run_dir: str) -> dict:
    import torch
    ckpt = os.path.join(run_dir, "checkpoints")
    tag = open(os.path.join(ckpt, "latest")).read().strip()
    return torch.load(os.path.join(ckpt, tag, "mp_rank_00_model_states.pt"), weights_only=False)["module"]


def assert_stage_files_hold(tag: str, full: dict, tp: int) -> None:
    """Every tensor of a pipeline checkpoint's stage files (layer_XX-model_RR: pipeline layer XX,
    the embedding first and the head last, TP rank RR) equals the consolidated model's, bit for bit."""
    import torch
    from pldr_dist.parallel.tensor_parallel import shard_full_state_dict
    files = glob.glob(os.path.join(tag, "layer_*-model_*-model_states.pt"))
    last = max(int(re.search(r"layer_(\d+)", f).group(1)) for f in files)
    for path in files:
        index = int(re.search(r"layer_(\d+)", path).group(1))
        rank = int(re.search(r"-model_(\d+)-", path).group(1))
        prefix = "" if index in (0, last) else f"layers.{index - 1}."
        mine = shard_full_state_dict(full, rank, tp)
        for key, tensor in torch.load(path, weights_only=False).items():
            assert torch.equal(tensor, mine[prefix + key.removeprefix("layer.")]), (path, key)
