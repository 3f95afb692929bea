"""Run the real entry point (`python -m pldr_dist.train` under torchrun) from tests."""
from __future__ import annotations

import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile

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


def command(data, run_dir: str, nproc: int, sets: list[str]) -> list[str]:
    base = [f"run_dir={run_dir}", f"data.shards={data.manifest}", f"checkpoint.tokenizer={data.tokenizer}",
            "train.micro_batch_size=4", "log.every=1", "eval.every=0", "log.g_stats_every=1000",
            "optim.warmup_steps=2", "model.overrides.context_length=32"]
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "pldr_dist.train", "--config", os.path.join(ROOT, "configs", "tiny.yaml")]
    for item in base + sets:
        args += ["--set", item]
    return args


def env():
    return {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}


def train(data, run_dir, nproc=2, sets=(), timeout=300):
    return subprocess.run(command(data, run_dir, nproc, list(sets)), env=env(), capture_output=True, text=True,
                          timeout=timeout)


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


def train_with_fault(data, run_dir, nproc, sets, fault: str, timeout=300):
    """A run whose ranks crash (fault "kill:K": SIGKILL after step K) or whose rank 0 receives
    SIGTERM (fault "term:K"), through the trainer's PLDR_FAULT testing hook."""
    return subprocess.run(command(data, run_dir, nproc, list(sets)), env={**env(), "PLDR_FAULT": fault},
                          capture_output=True, text=True, timeout=timeout)


def final_weights(run_dir: str) -> dict:
    import torch
    ckpt = os.path.join(run_dir, "checkpoints")
    tag = open(os.path.join(ckpt, "latest")).read().strip()
    return torch.load(os.path.join(ckpt, tag, "mp_rank_00_model_states.pt"), weights_only=False)["module"]
