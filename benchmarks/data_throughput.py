"""Data pipeline throughput: tokenizer training, shard writing (MB/s of text), loader tokens/s.

Run from the repository root:  python benchmarks/data_throughput.py [--out benchmarks/results/data_throughput.txt]
The loader is measured on synthetic shards of the paper's shape (1024-token uint16 samples,
2048 per shard, 64 shards = 134M tokens) read from local disk, with 0, 1 and 2 workers;
throughput is steady-state (the first batches, while workers start, are excluded).
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from pldr_dist.data.loader import TokenLoader  # noqa: E402
from pldr_dist.data.manifest import FORMAT, Manifest  # noqa: E402
from pldr_dist.data.shard_writer import make_shards, write_shard  # noqa: E402
from pldr_dist.data.tokenizer import train_tokenizer  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPUS = os.path.join(ROOT, "data", "tinyshakespeare.txt")


def synthetic_shards(out: str, shards: int, per_shard: int, seq_len: int) -> None:
    rng = np.random.default_rng(0)
    entries = []
    for i in range(shards):
        samples = rng.integers(0, 32000, size=(per_shard, seq_len + 1), dtype=np.uint16)
        name = f"train-{i:06d}.tar"
        digest = write_shard(os.path.join(out, name), samples, i * per_shard)
        entries.append({"name": name, "samples": per_shard, "tokens": int(samples.size), "sha256": digest})
    Manifest(os.path.join(out, "manifest.json"), {
        "format": FORMAT, "seq_len": seq_len, "sample_len": seq_len + 1, "dtype": "uint16",
        "tokenizer": {"fingerprint": "synthetic", "vocab_size": 32000, "pad_id": 0, "eos_id": 3},
        "splits": {"train": entries, "valid": entries[:1]}, "documents": {}, "dropped_tail_tokens": {}, "args": {}}).save()


def loader_tokens_per_s(out: str, workers: int, batch: int, seq_len: int, batches: int, warmup: int,
                        dp_size: int = 1) -> float:
    """Tokens/s this rank receives (rank 0 of dp_size: it reads every block and keeps 1/dp_size)."""
    loader = TokenLoader(out, "train", batch, seq_len, dp_rank=0, dp_size=dp_size, seed=0, num_workers=workers)
    it = iter(loader)
    for _ in range(warmup):
        next(it)
    start = time.perf_counter()
    tokens = 0
    for _ in range(batches):
        tokens += next(it)["input"].numel()
    return tokens / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None, help="also write the report to this file")
    args = p.parse_args()
    lines = [f"# data_throughput on {platform.node()}: {os.cpu_count()} CPU cores (shared), "
             f"python {platform.python_version()}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"]

    def report(line: str) -> None:
        print(line, flush=True)
        lines.append(line)

    with tempfile.TemporaryDirectory() as tmp:
        corpus_mb = os.path.getsize(CORPUS) / 1e6
        for vocab in (512, 4096):
            start = time.perf_counter()
            train_tokenizer(CORPUS, os.path.join(tmp, f"tok{vocab}.model"), vocab, num_threads=2)
            report(f"tokenizer training, bundled corpus ({corpus_mb:.2f} MB), vocab {vocab}: "
                   f"{time.perf_counter() - start:.1f} s wall")
        big = os.path.join(tmp, "corpus.txt")
        with open(CORPUS, encoding="utf-8") as f:
            text = f.read()
        with open(big, "w", encoding="utf-8") as f:
            f.write((text + "\n\n") * 4)
        for procs in (1, 2):
            m = make_shards(big, os.path.join(tmp, "tok4096.model"), os.path.join(tmp, f"shards{procs}"), 1023,
                            256, 0.005, num_procs=procs, show_progress=False)
            s = m.data["stats"]
            report(f"shard writing, {s['text_bytes'] / 1e6:.1f} MB of text, vocab 4096, seq_len 1023, "
                   f"{procs} tokeniser process(es): {s['text_bytes'] / 1e6 / s['seconds']:.2f} MB/s "
                   f"({s['seconds']:.1f} s)")
        synth = os.path.join(tmp, "synthetic")
        os.makedirs(synth)
        synthetic_shards(synth, shards=64, per_shard=2048, seq_len=1023)
        rates = {}
        for workers in (0, 1, 2):
            rate = rates[workers] = loader_tokens_per_s(synth, workers, batch=16, seq_len=1023, batches=1500, warmup=50)
            label = "in the main process" if workers == 0 else f"{workers} worker(s)"
            per = f", {rate / workers / 1e6:.1f} M tokens/s per worker" if workers else ""
            report(f"loader, local uint16 shards, batch 16 x 1023, {label}: {rate / 1e6:.1f} M tokens/s{per}")
        for dp in (4, 16):   # the DP-invariant order: each rank reads every block and keeps its rows
            rate = loader_tokens_per_s(synth, 1, batch=16, seq_len=1023, batches=1500 // dp, warmup=5, dp_size=dp)
            report(f"loader as rank 0 of {dp} data-parallel ranks, 1 worker, batch 16 x 1023: {rate / 1e6:.2f} M tokens/s "
                   f"delivered to the rank (it reads {dp}x that)")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
        plot(rates, os.path.splitext(args.out)[0] + ".png")


def plot(rates: dict[int, float], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 3.2))
    labels = ["main process" if w == 0 else f"{w} worker{'s' * (w > 1)}" for w in rates]
    ax.bar(labels, [r / 1e6 for r in rates.values()], color="tab:blue")
    ax.axhline(10, color="tab:red", linestyle="--", label="target: 10 M tokens/s per worker")
    ax.set_ylabel("M tokens/s")
    ax.set_title("TokenLoader, local uint16 shards, batch 16x1023 (2 shared cores)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
