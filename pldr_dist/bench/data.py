"""The `data` suite: the data pipeline's throughput: tokenizer training, shard writing, the loader.

- tokenizer: `train_tokenizer` on the bundled corpus (data/tinyshakespeare.txt), per vocab size;
- shard writing: `make_shards` on the corpus repeated 4 times, with the last vocab, seq 1023,
  per number of tokeniser processes, in MB of text per second;
- loader: `TokenLoader` on synthetic shards of the paper's shape (1023-token uint16 samples, 2048
  per shard, 64 shards = 134M tokens) on local disk, per number of workers, batch 16, steady
  state (the first batches, while workers start, excluded); then as rank 0 of several
  data-parallel ranks (the DP-invariant order: each rank reads every block and keeps its rows).
"""
from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass

import numpy as np

from . import report

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CORPUS = os.path.join(ROOT, "data", "tinyshakespeare.txt")


@dataclass
class Row:
    measure: str              # tokenizer, shards, loader, loader_dp
    setting: str
    value: float
    unit: str
    exit_code: int = 0


def synthetic_shards(out: str, shards: int, per_shard: int, seq_len: int) -> None:
    from ..data.manifest import FORMAT, Manifest
    from ..data.shard_writer import write_shard
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


def loader_rate(path: str, workers: int, batch: int, seq_len: int, batches: int, warmup: int, dp_size: int = 1) -> float:
    """Tokens/s that rank 0 of dp_size receives."""
    from ..data.loader import TokenLoader
    it = iter(TokenLoader(path, "train", batch, seq_len, dp_rank=0, dp_size=dp_size, seed=0, num_workers=workers))
    for _ in range(warmup):
        next(it)
    start, tokens = time.perf_counter(), 0
    for _ in range(batches):
        tokens += next(it)["input"].numel()
    return tokens / (time.perf_counter() - start)


def run(a, log=print) -> list:
    from ..data.shard_writer import make_shards
    from ..data.tokenizer import train_tokenizer

    # text: characters of the corpus used (None: all); repeats: copies of it for shard writing;
    # shards x per_shard samples of seq + 1 tokens for the loader, timed over `batches`
    size = dict(text=None, repeats=4, shard_samples=256, shards=64, per_shard=2048, seq=1023, batches=1500, warmup=50)
    if a.smoke:
        a.vocab, a.procs, a.workers, a.dp = [512], [1], [0], [2]
        size = dict(text=60_000, repeats=1, shard_samples=16, shards=4, per_shard=64, seq=127, batches=20, warmup=2)
    rows = []

    def add(measure, setting, value, unit):
        rows.append(Row(measure, setting, value, unit))
        log(f"  {measure:<10} {setting:<36} {value:>12,.2f} {unit}")

    with tempfile.TemporaryDirectory() as tmp:
        with open(CORPUS, encoding="utf-8") as f:
            text = f.read()[:size["text"]]
        corpus = os.path.join(tmp, "corpus.txt")
        with open(corpus, "w", encoding="utf-8") as f:
            f.write(text)
        for vocab in a.vocab:
            start = time.perf_counter()
            train_tokenizer(corpus, os.path.join(tmp, f"tok{vocab}.model"), vocab, num_threads=2)
            add("tokenizer", f"vocab {vocab}, {len(text.encode()) / 1e6:.2f} MB of text", time.perf_counter() - start, "s")
        big = os.path.join(tmp, "big.txt")
        with open(big, "w", encoding="utf-8") as f:
            f.write((text + "\n\n") * size["repeats"])
        for procs in a.procs:
            m = make_shards(big, os.path.join(tmp, f"tok{a.vocab[-1]}.model"), os.path.join(tmp, f"shards{procs}"),
                            size["seq"], size["shard_samples"], 0.005, num_procs=procs, show_progress=False)
            s = m.data["stats"]
            add("shards", f"{s['text_bytes'] / 1e6:.1f} MB, vocab {a.vocab[-1]}, seq {size['seq']}, {procs} proc",
                s["text_bytes"] / 1e6 / s["seconds"], "MB/s")
        synth = os.path.join(tmp, "synthetic")
        os.makedirs(synth)
        synthetic_shards(synth, size["shards"], size["per_shard"], size["seq"])
        shape = f"batch {a.batch} x {size['seq']}"
        for w in a.workers:
            rate = loader_rate(synth, w, a.batch, size["seq"], size["batches"], size["warmup"])
            add("loader", f"{shape}, {w} workers" if w else f"{shape}, main process", rate / 1e6, "M tokens/s")
        for dp in a.dp:
            rate = loader_rate(synth, 1, a.batch, size["seq"], max(1, size["batches"] // dp), max(1, size["warmup"] // 10),
                               dp_size=dp)
            add("loader_dp", f"{shape}, rank 0 of {dp}, 1 worker", rate / 1e6, "M tokens/s")
    name = report.device_name("cpu")
    lines = [f"# {name}: data pipeline (the loader: local synthetic shards, {size['shards']} x {size['per_shard']} "
             f"samples; loader_dp: tokens delivered to the rank, which reads dp times that)",
             f"{'measure':<10} {'setting':<44} {'value':>10} unit"]
    lines += [f"{r.measure:<10} {r.setting:<44} {r.value:>10.2f} {r.unit}" for r in rows]
    report.write(a, rows, "\n".join(lines), name)
    log("\n".join(lines))
    return rows


def add_parser(sub) -> None:
    p = sub.add_parser("data", help="tokenizer training, shard writing and loader throughput",
                       description=__doc__.splitlines()[0])
    p.add_argument("--vocab", type=report.int_list, default=[512, 4096], help="tokenizer vocab sizes")
    p.add_argument("--procs", type=report.int_list, default=[1, 2], help="tokeniser processes for shard writing")
    p.add_argument("--workers", type=report.int_list, default=[0, 1, 2], help="loader workers")
    p.add_argument("--dp", type=report.int_list, default=[4, 16], help="data-parallel sizes read as rank 0")
    p.add_argument("--batch", type=int, default=16)
    report.add_common(p, "data")
    p.set_defaults(func=run)
