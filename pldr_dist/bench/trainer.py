"""The `trainer` suite: `pldr-train` itself, variant against variant, in one process tree.

Why: a layout or ZeRO stage pays only if the whole job's tokens/s says so. Each variant is a
list of `--set` overrides of one run config; all run on the same shards (the bundled corpus,
tokenised with the paper's tokenizer), with the same steps and micro-batch, one after the other
(timings from different machine starts differ by ~2%). With `--baseline DIR` every variant
also runs from an older copy of the package (`git archive <commit> pldr_dist configs | tar -x
-C DIR`), alternating with this one, so before and after come from the same machine.

A variant named NAME@N runs on N processes (GPUs) instead of --nproc, so one call compares a
layout with one GPU: `--variant 1gpu@1:train.grad_accum_steps=2 --variant dp2@2:` keeps the
global batch and reports DP=2's scaling. `--both-orders` runs the list again backwards (NAME_b)
and reports each variant's mean of its two runs: a command's first run can be faster.

Reported per run: the median tokens/s, MFU, step time of the logged steps in the window,
peak memory, the last loss, tokens/s relative to the first variant of the same package (the
whole job's), the same per GPU (`per_gpu`: data-parallel scaling when the first variant is one
GPU), and the longest stall of the step loop for a checkpoint (`checkpoint_stall_s`; runs save
none unless a variant sets checkpoint.every). A variant that sets `log.profile_steps` also reports
the host reads of tensor values inside its steps and, on GPUs, the GPU's busy share of the
profiled steps (`GPU busy`: below ~95% the step is bound by its host, not its kernels), with its
idle time by host phase in the JSON and at the top of the run's profile.txt (in the logs archive).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import time
from dataclasses import asdict, dataclass, field
from typing import Optional

from ..errors import InputError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CORPUS = os.path.join(ROOT, "data", "tinyshakespeare.txt")
TOKENIZER = os.path.join(ROOT, "data", "reference", "refinedweb-tokenizer-pldrllm-paper.model")
CORPUS_TOKENS = 300_000      # about what the paper's tokenizer makes of the bundled corpus


@dataclass
class Result:
    variant: str
    package: str                      # "this" or the baseline folder's name
    exit_code: int
    tokens_per_s: float = 0.0
    mfu: float = 0.0
    step_ms: float = 0.0
    memory_mib: float = 0.0
    last_loss: float = float("nan")
    losses: list = field(default_factory=list)
    fast_path: str = ""
    relative: float = 0.0
    per_gpu: float = 0.0              # relative, per process: the first variant's tokens/s per GPU = 1
    nproc: int = 1
    seq_len: int = 0
    micro_batch: int = 0
    checkpoint_stall_s: float = 0.0   # the longest, over the run's checkpoints
    host_reads: Optional[dict] = None  # per step, by phase and op, where a variant sets log.profile_steps
    gpu_busy: Optional[float] = None   # the GPU's busy share of the profiled steps (train/profiling.gpu_idle)
    gpu_idle: Optional[dict] = None    # ... and its idle time by host phase, per step
    repeats: str = ""                  # --both-orders: the variant of the first order that this run repeats


def parse_variant(text: str) -> tuple[str, list, int | None]:
    """'z2:parallel.zero_stage=2 log.profile_steps=[20,21]' -> ('z2', [...], None); 'name:' has no
    overrides; 'dp2@2:...' runs on 2 processes (None: --nproc)."""
    name, _, sets = text.partition(":")
    name, at, count = name.partition("@")
    if not name or (at and not (count.isdigit() and int(count) > 0)):
        raise InputError(f"--variant {text!r}: give NAME[@PROCESSES]:key=value[ key=value...]")
    return name, sets.split(), int(count) if at else None


def run_order(variants: list, packages: list, both_orders: bool = False) -> list:
    """(name, sets, nproc, package, repeats) in the order the runs go: each variant with each
    package in turn; with both_orders, then the whole list again backwards, named NAME_b.

    Why: on an H100 the first run of a command, from an idle GPU, ran its large products 1-3%
    faster than the runs after it (docs/performance.md, footnote (26)), so a ratio of two variants
    run once each leans towards whichever ran first; the mean of both orders does not."""
    order = [(name, sets, nproc, pkg, "") for name, sets, nproc in variants for pkg in packages]
    if both_orders:
        order += [(f"{name}_b", sets, nproc, pkg, name) for name, sets, nproc, pkg, _ in reversed(order)]
    names = [(name, pkg) for name, _, _, pkg, _ in order]
    if len(set(names)) != len(names):
        raise InputError("--variant names must differ from each other (and, with --both-orders, from NAME_b)")
    return order


def both_orders_table(results: list) -> str:
    """Each variant's mean tokens/s over its two runs (--both-orders), against the first
    variant's mean of the same package; empty without a second order."""
    lines = []
    for first in results:
        again = next((r for r in results if r.repeats == first.variant and r.package == first.package), None)
        if again is None or first.repeats:
            continue
        base = next(r for r in results if r.package == first.package and not r.repeats)
        base_again = next((r for r in results if r.repeats == base.variant and r.package == base.package), None)
        if base_again is None:     # written after every run: the first variant's repeat runs last
            continue
        mean = (first.tokens_per_s + again.tokens_per_s) / 2
        base_mean = (base.tokens_per_s + base_again.tokens_per_s) / 2
        lines.append(f"{first.variant:<14} {first.package:<10} {mean:>10,.0f} "
                     f"{mean / base_mean if base_mean else 0.0:>8.3f}   "
                     f"{first.tokens_per_s:,.0f} then {again.tokens_per_s:,.0f}")
    if not lines:
        return ""
    return "\n".join(["# both orders: the mean tokens/s of each variant's two runs, against the first variant's",
                      f"{'variant':<14} {'package':<10} {'tokens/s':>10} {'vs first':>8}   runs"] + lines)


def prepare_shards(work: str, seq_len: int, smoke: bool, log) -> tuple[str, str]:
    """(manifest, tokenizer): the bundled corpus as token shards, made once per work folder."""
    if smoke:       # a tiny tokenizer trained on a slice of the corpus: seconds on a CPU
        from ..data.prepare import prepare_corpus
        text = os.path.join(work, "corpus.txt")
        if not os.path.isfile(text):
            with open(CORPUS) as f, open(text, "w") as out:
                out.write(f.read()[:60_000])
        p = prepare_corpus(text, work, vocab_size=512, seq_len=seq_len, samples_per_shard=256, log=lambda *_: None)
        return p.manifest, p.tokenizer
    manifest = os.path.join(work, "shards", "manifest.json")
    if not os.path.isfile(manifest):
        corpus = CORPUS
        repeats = -(-8 * seq_len // CORPUS_TOKENS)   # at least ~8 samples of very long sequences
        if repeats > 1:
            corpus = os.path.join(work, "corpus.txt")
            with open(CORPUS) as f, open(corpus, "w") as out:
                out.write(f.read() * repeats)
        log(f"tokenising {corpus} into {work}/shards (seq_len {seq_len})")
        subprocess.run([sys.executable, "-m", "pldr_dist.data.shard_writer", corpus, "--tokenizer", TOKENIZER,
                        "--out", os.path.join(work, "shards"), "--seq-len", str(seq_len), "--samples-per-shard", "32"],
                       check=True, capture_output=True, text=True)
    return manifest, TOKENIZER


def int_list(text: str) -> list:
    try:
        values = [int(x) for x in text.split(",")]
    except ValueError:
        raise InputError(f"{text!r}: give one integer or a comma-separated list (1024,4096)") from None
    if not values or min(values) < 1:
        raise InputError(f"{text!r}: lengths must be positive")
    return values


TIMED_OUT = 124   # a run's exit code once --time-limit ended it (as coreutils' timeout)


def run_with_limit(cmd: list, cwd: str, env: dict, out, limit_s: float) -> int:
    """The run's exit code; past limit_s every process of the run (the launcher, its ranks, their
    data-loader workers) is ended and the run counts as failed, so one hung run cannot hold up
    the suite (or a CI job) for ever. SIGABRT first: with PYTHONFAULTHANDLER set, each process
    writes its threads' stacks to the run's log, which says where it hung."""
    proc = subprocess.Popen(cmd, cwd=cwd, env={**env, "PYTHONFAULTHANDLER": "1"}, stdout=out,
                            stderr=subprocess.STDOUT)
    try:
        return proc.wait(timeout=limit_s)
    except subprocess.TimeoutExpired:
        tree = [proc.pid] + descendants(proc.pid)    # torchrun starts its ranks in sessions of their own
        for sig, pause in ((signal.SIGABRT, 1.0), (signal.SIGKILL, 0.0)):
            for pid in tree:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
                time.sleep(pause)         # one process's stacks at a time, not interleaved
        proc.wait()
        with open(out.name, "a") as log_file:
            log_file.write(f"pldr-bench: ended after --time-limit {limit_s:.0f} s (stacks above)\n")
        return TIMED_OUT


def descendants(pid: int) -> list:
    """Every process below pid (Linux: from /proc)."""
    children: dict = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
        except (ValueError, OSError, IndexError):
            continue
        children.setdefault(parent, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def run_variant(a, name: str, sets: list, nproc: int, package: str, manifest: str, tokenizer: str, log,
                seq_len: int, micro_batch: int) -> Result:
    label = "this" if package == ROOT else os.path.basename(os.path.normpath(package))
    run_dir = os.path.join(a.work, f"{name}__{label}")
    shutil.rmtree(run_dir, ignore_errors=True)
    overrides = [f"run_dir={run_dir}", f"data.shards={manifest}", f"checkpoint.tokenizer={tokenizer}",
                 f"train.steps={a.steps}", f"train.micro_batch_size={micro_batch}", "log.every=1",
                 "eval.every=0", "checkpoint.every=0", "checkpoint.at_end=false", "optim.warmup_steps=5", f"data.num_workers={a.workers}",
                 f"train.compile={'false' if a.smoke else 'true'}", *a.set, *sets]
    if a.smoke or seq_len > 1024:       # the presets' context is 1024: longer sequences widen it
        overrides.insert(0, f"model.overrides.context_length={seq_len}")
    launcher = [sys.executable, "-m", "pldr_dist.train"] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m", "pldr_dist.train"]
    cmd = launcher + ["--config", os.path.join(package, "configs", f"{a.config}.yaml")]
    for item in overrides:
        cmd += ["--set", item]
    # Each package its own compile cache: torch's caches key a compiled graph by the traced
    # model code, not by our custom ops' implementations, so a baseline whose op returns fewer
    # tensors would load this package's compiled backward and fail (seen with --baseline).
    env = {**os.environ, "PYTHONPATH": package + os.pathsep + os.environ.get("PYTHONPATH", ""), "PYTHONUNBUFFERED": "1",
           "TORCHINDUCTOR_CACHE_DIR": os.path.join(a.work, "inductor_cache", label)}
    log(f"[{name} / {label}, {nproc} process(es)] {' '.join(sets) or '(defaults)'}")
    t0 = time.time()
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "stdout.log"), "w") as out:
        code = run_with_limit(cmd, package, env, out, a.time_limit)
    result = Result(name, label, code, seq_len=seq_len, micro_batch=micro_batch, nproc=nproc)
    rows = []
    metrics = os.path.join(run_dir, "metrics.jsonl")
    if os.path.isfile(metrics):
        rows = [json.loads(line) for line in open(metrics)]
    steady = [r for r in rows if "tokens_per_s" in r and a.window[0] <= r["step"] <= a.window[1]]
    if steady:
        med = lambda k: statistics.median(r.get(k, 0.0) or 0.0 for r in steady)  # noqa: E731
        result.tokens_per_s, result.mfu, result.step_ms = med("tokens_per_s"), med("mfu"), 1000 * med("step_time_s")
        result.memory_mib = max(r.get("memory_mib", 0) for r in steady)
    result.checkpoint_stall_s = max((r["checkpoint_stall_s"] for r in rows if "checkpoint_stall_s" in r), default=0.0)
    profiled = next((r for r in rows if "host_reads" in r), {})
    result.host_reads, result.gpu_busy = profiled.get("host_reads"), profiled.get("gpu_busy")
    result.gpu_idle = profiled.get("gpu_idle")
    losses = [r["loss"] for r in rows if "loss" in r]
    result.losses, result.last_loss = losses, losses[-1] if losses else float("nan")
    log_text = open(os.path.join(run_dir, "stdout.log")).read()
    result.fast_path = next((line.split("; ", 1)[-1] for line in log_text.splitlines() if line.startswith("training ")), "")
    log(f"  exit {code} in {time.time() - t0:.0f} s: {result.tokens_per_s:,.0f} tokens/s, {result.fast_path}")
    if code != 0:   # a hung run: its stacks too
        log("  " + "\n  ".join(log_text.splitlines()[-(200 if code == TIMED_OUT else 5):]))
    return result


def table(results: list, device: str, a) -> str:
    lines = [f"# {device}: pldr-train {a.config}, median of steps {a.window[0]}-{a.window[1]}",
             f"{'variant':<14} {'package':<10} {'procs':>5} {'seq':>6} {'mb':>4} {'tokens/s':>10} {'vs first':>8} "
             f"{'per GPU':>7} {'MFU':>6} {'step ms':>8} {'mem MiB':>8} {'last loss':>9} {'ckpt s':>6} {'reads':>5} "
             f"{'GPU busy':>8}  fast path"]
    for r in results:
        mfu = f"{100 * r.mfu:5.1f}%" if r.mfu else "    -"
        reads = "-" if r.host_reads is None else f"{sum(r.host_reads.values()):g}"   # host reads a step (profiled)
        busy = "-" if r.gpu_busy is None else f"{100 * r.gpu_busy:.1f}%"                # of the profiled steps
        lines.append(f"{r.variant:<14} {r.package:<10} {r.nproc:>5} {r.seq_len:>6} {r.micro_batch:>4} "
                     f"{r.tokens_per_s:>10,.0f} {r.relative:>8.3f} {r.per_gpu:>7.3f} {mfu:>6} "
                     f"{r.step_ms:>8.1f} {r.memory_mib:>8.0f} {r.last_loss:>9.4f} {r.checkpoint_stall_s:>6.2f} "
                     f"{reads:>5} {busy:>8}  "
                     + (r.fast_path if r.exit_code == 0 else f"FAILED (exit {r.exit_code})"))
    return "\n".join(lines)


KERNEL_ROWS = 30


def _merged_kernels(kernels: dict) -> dict:
    """Kernel times with inductor's generated kernels merged by their name less its counter
    (triton_poi_fused_mul_silu_view_12 -> ..._view_N): each compiled graph numbers its kernels
    itself, so the same fusion had a different name in each run and the table listed it twice,
    once per run, as if one variant had added it and the other removed it."""
    out: dict = {}
    for name, t in kernels.items():
        key = re.sub(r"_\d+$", "_N", name) if name.startswith("triton_") else name
        out[key] = out.get(key, 0.0) + t
    return out


def kernel_table(results: list, top: int = KERNEL_ROWS) -> str:
    """The profiled GPU runs' time a step by kernel (train/profiling.gpu_idle), side by side: the
    `top` kernels whose time differs most between the runs first, i.e. what one variant adds or
    removes (PLGA against G = I: the deductive path's kernels; a change against --baseline: what
    it made faster). Empty with fewer than two such runs."""
    runs = [r for r in results if r.gpu_idle and r.gpu_idle.get("kernels")]
    if len(runs) < 2:
        return ""
    merged = [_merged_kernels(r.gpu_idle["kernels"]) for r in runs]
    times = lambda name: [kernels.get(name, 0.0) for kernels in merged]  # noqa: E731
    names = {name for kernels in merged for name in kernels}
    spread = {name: max(times(name)) - min(times(name)) for name in names}
    heads = [f"{r.variant}/{r.package}" for r in runs]
    width = max(10, *(len(h) for h in heads))
    row = lambda values, label: " ".join(f"{v:>{width}.3f}" for v in values) + f"  {label}"  # noqa: E731
    lines = [f"# GPU time a step (ms) by kernel over the profiled steps; the {top} kernels whose time differs most "
             f"between the runs", " ".join(f"{h:>{width}}" for h in heads) + "  kernel",
             row([r.gpu_idle["busy_ms"] for r in runs], "(GPU busy, any kernel)")]
    lines += [row(times(name), name) for name in sorted(names, key=lambda n: (-spread[n], n))[:top]]
    return "\n".join(lines)


def run(a, log=print) -> list:
    variants = [parse_variant(v) for v in (a.variant or ["default:"])]   # bad input refused before any work
    a.work = os.path.abspath(a.work)   # a --baseline package runs in its own folder: paths must not be relative
    os.makedirs(a.work, exist_ok=True)
    packages = [ROOT] + ([os.path.abspath(a.baseline)] if a.baseline else [])
    order = run_order(variants, packages, a.both_orders)
    device = "CPU"
    try:
        import torch
        if torch.cuda.is_available():
            device = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name()}"
    except ImportError:
        pass
    results = []
    sweep = len(a.seq_len) > 1
    for seq_len in a.seq_len:           # a sweep: every variant at each length, shards once per length
        work = os.path.join(a.work, f"seq{seq_len}") if sweep else a.work
        os.makedirs(work, exist_ok=True)
        manifest, tokenizer = prepare_shards(work, seq_len, a.smoke, log)
        micro_batch = max(1, a.micro_tokens // seq_len) if a.micro_tokens else a.micro_batch
        at = f"@{seq_len}" if sweep else ""
        for name, sets, nproc, pkg, repeats in order:
            result = run_variant(a, name + at, sets, nproc or a.nproc, pkg, manifest, tokenizer, log, seq_len,
                                 micro_batch)
            result.repeats = repeats + at if repeats else ""
            results.append(result)
            write(a, results, device)    # after every run: a time limit still leaves the finished ones
    log(table(results, device, a))
    both = both_orders_table(results)
    if both:
        log(both)
    kernels = kernel_table(results)
    if kernels:
        log(kernels)
    return results


def write(a, results: list, device: str) -> None:
    for label in {r.package for r in results}:
        mine = [r for r in results if r.package == label]
        for r in mine:
            r.relative = r.tokens_per_s / mine[0].tokens_per_s if mine[0].tokens_per_s else 0.0
            r.per_gpu = r.relative * mine[0].nproc / r.nproc
    if not a.out:
        return
    os.makedirs(a.out, exist_ok=True)
    stem = os.path.join(a.out, a.name or f"trainer_{a.config}")
    kernels = kernel_table(results)
    with open(stem + ".txt", "w") as f:
        both = both_orders_table(results)
        f.write(table(results, device, a) + "\n" + "".join(f"\n{part}\n" for part in (both, kernels) if part))
    with open(stem + ".json", "w") as f:
        json.dump({"device": device, "args": {k: v for k, v in vars(a).items() if k != "func"},
                   "results": [asdict(r) for r in results]}, f, indent=1)
    with tarfile.open(stem + "_logs.tar.gz", "w:gz") as tar:   # each run's log, metrics, profile table
        for r in results:
            run_dir = os.path.join(a.work, f"{r.variant}__{r.package}")
            for file in ("stdout.log", "metrics.jsonl", "profile.txt"):
                if os.path.isfile(os.path.join(run_dir, file)):
                    tar.add(os.path.join(run_dir, file), f"{r.variant}__{r.package}/{file}")


def add_parser(sub) -> None:
    p = sub.add_parser("trainer", help="pldr-train throughput per layout / ZeRO stage / package version",
                       description=__doc__.splitlines()[0])
    p.add_argument("--config", default="pldr-110m", help="configs/<name>.yaml (pldr-110m, pldr-1b, tiny)")
    p.add_argument("--variant", action="append",
                   help="'NAME[@PROCESSES]:key=value key=value' (repeat; default: one run of the config)")
    p.add_argument("--set", action="append", default=[], help="key=value for every variant")
    p.add_argument("--micro-batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--window", type=lambda s: tuple(int(x) for x in s.split(":")), default=(8, 30),
                   help="FIRST:LAST logged steps whose median is reported")
    p.add_argument("--seq-len", type=int_list, default=[1023],
                   help="sequence length, or a comma-separated sweep (every variant at each length)")
    p.add_argument("--micro-tokens", type=int, default=0,
                   help="micro-batch = max(1, N // seq-len) at each length, instead of --micro-batch")
    p.add_argument("--nproc", type=int, default=1, help="processes (GPUs) per run (a variant NAME@N: N)")
    p.add_argument("--workers", type=int, default=2, help="data-loader workers per process")
    p.add_argument("--time-limit", type=float, default=3600.0,
                   help="seconds a run may take before it is killed and reported as failed")
    p.add_argument("--baseline", help="a folder holding an older pldr_dist and configs/ to run each variant with too")
    p.add_argument("--both-orders", action="store_true",
                   help="run the variants again in reverse order (NAME_b) and report each one's mean of both runs: "
                        "the first run of a command can run faster (a cool GPU)")
    p.add_argument("--work", default="bench_work", help="scratch folder (shards, run dirs)")
    p.add_argument("--out", help="folder for <name>.txt and <name>.json")
    p.add_argument("--name", help="result file stem (default trainer_<config>)")
    p.add_argument("--smoke", action="store_true", help="CPU-sized: tiny tokenizer and shards, eager")
    p.set_defaults(func=run)
