"""Atomic, verified training checkpoints on top of DeepSpeed's checkpointing.

Layout of `<run_dir>/checkpoints/`:
    step_00000100/            one DeepSpeed tag: its model/optimizer files, plus
        rank_00003.pt         per-rank state (RNGs, data-loader position, counters)
        run_config.json       the run's config; tokenizer.model when configured
        COMPLETE.json         written last, by rank 0, after every rank finished: the
                              size and sha256 of every file in the tag
    latest                    the newest complete tag (DeepSpeed's pointer name), replaced
                              atomically (temp file + rename) only after COMPLETE.json

A tag without COMPLETE.json, or whose files do not match it (truncated, corrupt), is never
loaded: the newest tag that verifies is used and the bad one is named in a warning.

With `checkpoint.async_save` (train/async_save.py) `save` returns once this rank's state is
copied to host memory; a background thread writes the same files (temporary names, renamed when
all are written). COMPLETE.json and `latest` still wait for every rank, but a collective cannot
run from the writer thread (DeepSpeed's process groups belong to the step loop), and per-rank
done-marker files would have rank 0 poll a shared file system whose directory caches may show
them late. So the ranks agree in the step loop, on a collective it already runs: the trainer's
end-of-step signal check (trainer.SignalFlag) carries a "still writing" flag, and when no rank
is writing rank 0 finalises the tag (sha256 of every file, COMPLETE.json, `latest`, pruning) on
its writer thread, off the step loop. The next save, the end of the run and a signal first wait
for the write in flight (one at a time, which is also what lets the host buffers be reused),
then agree with a barrier.
"""
from __future__ import annotations

import functools
import json
import os
import random
import shutil
import time
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from ..convert.consolidated import CheckpointError
from ..data.manifest import sha256_file

MARKER = "COMPLETE.json"
PREFIX = "step_"


# The model's parameter tensors as DeepSpeed's files hold them; "stacked-metric": one tensor per
# role for each layer's metric learner (model/interchange.py); "flat-layers": one tensor per
# decoder layer (ZeRO-2/3: parallel/flat_layers.py). Older checkpoints lack the key.
PARAMETER_LAYOUT = "stacked-metric/1"
FLAT_LAYOUT = "flat-layers/1"


def parameter_layout(module) -> str:
    from ..parallel.flat_layers import has_flat_layers
    return FLAT_LAYOUT if has_flat_layers(module) else PARAMETER_LAYOUT


def _has_metric_learner(module) -> bool:
    from ..model.plga import MetricLearner
    return any(isinstance(m, MetricLearner) for m in module.modules())


def stage_layers(module) -> Optional[list]:
    """[first, last + 1] of the pipeline layers this rank's stage holds; None without pipeline."""
    start = getattr(module, "_local_start", None)      # DeepSpeed's PipelineModule bounds
    return None if start is None else [int(start), int(module._local_stop)]


def check_stages(tag_dir: str, saved: Optional[list], module, partition_method: str) -> None:
    """A pipeline checkpoint resumes only into the same stage split: each stage's optimizer
    state holds its own layers' parameters, flattened. Checkpoints written before the split
    was recorded carry the partition method of their run (run_config.json)."""
    current = stage_layers(module)
    if current is None or saved == current:
        return
    with open(os.path.join(tag_dir, "run_config.json")) as f:
        theirs = json.load(f).get("parallel", {}).get("partition_method", "parameters")
    if saved is None and theirs == partition_method:
        return
    held = f"layers {saved[0]}-{saved[1] - 1}" if saved else f"the layers parallel.partition_method={theirs} gave it"
    raise CheckpointError(f"{tag_dir}: this pipeline stage held {held}, here it holds layers {current[0]}-"
                          f"{current[1] - 1} (parallel.partition_method={partition_method}); resume with "
                          f"parallel.partition_method={theirs}, or convert it once with `pldr-reshard {tag_dir} "
                          f"NEW_RUN_DIR` and resume from NEW_RUN_DIR")


def tag_for(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def atomic_write(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_marker(tag_dir: str, step: int, world_size: int) -> None:
    """COMPLETE.json: the size and sha256 of every file in the tag, written last."""
    files = {}
    for root, _, names in os.walk(tag_dir):
        for name in names:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, tag_dir)
            if rel != MARKER:
                files[rel] = {"size": os.path.getsize(path), "sha256": sha256_file(path)}
    atomic_write(os.path.join(tag_dir, MARKER), json.dumps({"step": step, "world_size": world_size, "files": files}, indent=1))


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def rank_state(extra: dict, engine) -> dict:
    """What rank_<r>.pt holds beside DeepSpeed's files: the trainer's extra state, the RNGs,
    the parameter layout and (pipelines) the layers of this rank's stage. One builder for the
    synchronous and the asynchronous save, so the two write the same file."""
    return {**extra, "rng": rng_state(), "parameters": parameter_layout(engine.module),
            "stage_layers": stage_layers(engine.module)}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def verify_tag(tag_dir: str) -> Optional[str]:
    """None if the tag is complete and intact, else the reason (naming the file)."""
    marker = os.path.join(tag_dir, MARKER)
    if not os.path.isfile(marker):
        return f"{tag_dir} has no {MARKER} (the save did not finish)"
    try:
        with open(marker) as f:
            files = json.load(f)["files"]
    except (OSError, ValueError, KeyError) as e:
        return f"{marker} is unreadable ({e})"
    for rel, meta in files.items():
        path = os.path.join(tag_dir, rel)
        if not os.path.isfile(path):
            return f"{path} is missing"
        if os.path.getsize(path) != meta["size"]:
            return f"{path} is truncated or altered ({os.path.getsize(path)} bytes, expected {meta['size']})"
        if sha256_file(path) != meta["sha256"]:
            return f"{path} is corrupt (sha256 mismatch)"
    return None


class CheckpointManager:
    def __init__(self, run_dir: str, keep: int, rank: int, world_size: int, log=print,
                 async_save: bool = False, write_delay_s: float = 0.0):
        self.dir = os.path.join(run_dir, "checkpoints")
        self.keep, self.rank, self.world_size, self.log = keep, rank, world_size, log
        self.async_save, self.write_delay_s = async_save, write_delay_s
        self.writer = self.host = self.last_tag = None
        self.unfinalized: Optional[tuple] = None     # (tag, step, t0) written in the background, not yet complete

    def tags(self) -> list[str]:
        if not os.path.isdir(self.dir):
            return []
        return sorted(t for t in os.listdir(self.dir) if t.startswith(PREFIX))

    # -- saving ------------------------------------------------------------------------
    def save(self, engine, step: int, extra: dict, run_config: dict, tokenizer: str = "") -> str:
        """Every rank calls this. Returns the tag once it is complete and `latest` points at it
        (asynchronously: once the state is in host memory and its write is queued)."""
        from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine
        if self.async_save and isinstance(engine.checkpoint_engine, TorchCheckpointEngine):
            return self._save_async(engine, step, extra, run_config, tokenizer)
        t0 = time.time()
        tag = tag_for(step)
        tag_dir = os.path.join(self.dir, tag)
        if self.rank == 0:
            os.makedirs(self.dir, exist_ok=True)
            if os.path.isdir(tag_dir):      # a leftover of an interrupted save of this step
                shutil.rmtree(tag_dir)
        dist.barrier()
        engine.save_checkpoint(self.dir, tag=tag, save_latest=False)
        torch.save(rank_state(extra, engine), os.path.join(tag_dir, f"rank_{self.rank:05d}.pt"))
        if self.rank == 0:
            atomic_write(os.path.join(tag_dir, "run_config.json"), json.dumps(run_config, indent=2))
            if tokenizer:
                shutil.copyfile(tokenizer, os.path.join(tag_dir, "tokenizer.model"))
        dist.barrier()                      # every rank's files are on disk
        if self.rank == 0:
            write_marker(tag_dir, step, self.world_size)
            atomic_write(os.path.join(self.dir, "latest"), tag)
            self._prune(tag)
        dist.barrier()
        if self.rank == 0:
            size = sum(os.path.getsize(os.path.join(r, n)) for r, _, ns in os.walk(tag_dir) for n in ns)
            self.log(f"checkpoint {tag} saved ({size / 2**20:.1f} MiB, {time.time() - t0:.1f} s)")
        return tag

    def _save_async(self, engine, step: int, extra: dict, run_config: dict, tokenizer: str) -> str:
        from .async_save import HostSnapshot, SnapshotEngine, Writer
        if self.writer is None:
            self.writer, self.host = Writer(), HostSnapshot()
        tag = tag_for(step)
        tag_dir = os.path.join(self.dir, tag)
        if not self.writer.idle():
            self.log(f"checkpoint {tag}: waiting for the write of {self.last_tag} in flight")
        self.writer.wait()
        self.check()
        if self.rank == 0:
            os.makedirs(self.dir, exist_ok=True)
            if os.path.isdir(tag_dir):      # a leftover of an interrupted save of this step
                shutil.rmtree(tag_dir)
        dist.barrier()                      # every rank's previous write is on disk
        if self.unfinalized is not None:
            self.written()
        t0 = time.time()
        inner = engine.checkpoint_engine
        engine.checkpoint_engine = snap = SnapshotEngine(inner, self.host)
        try:
            engine.save_checkpoint(self.dir, tag=tag, save_latest=False)
        finally:
            engine.checkpoint_engine = inner
        files = snap.staged + [(self.host.copy(rank_state(extra, engine), "rank"),
                                os.path.join(tag_dir, f"rank_{self.rank:05d}.pt"))]
        config_text = json.dumps(run_config, indent=2)

        def write() -> None:
            # "x.pt-tmp", not "x.pt.tmp": torch.save names the archive inside after the file's stem
            for i, (state, path) in enumerate(files):
                inner.save(self.host.materialize(state), f"{path}-tmp")
                files[i] = (None, path)
            self.host.release()
            time.sleep(self.write_delay_s)    # testing aid: a write stays in flight this long
            for _, path in files:
                os.replace(f"{path}-tmp", path)
            if self.rank == 0:
                atomic_write(os.path.join(tag_dir, "run_config.json"), config_text)
                if tokenizer:
                    shutil.copyfile(tokenizer, os.path.join(tag_dir, "tokenizer.model"))
        self.writer.submit(f"writing checkpoint {tag_dir}", write)
        self.unfinalized, self.last_tag = (tag, step, t0), tag
        return tag

    def writing(self) -> bool:
        """Whether this rank still writes a tag that is not complete yet (asked at every step's
        end; raises a background write's failure)."""
        self.check()
        return self.unfinalized is not None and not self.writer.idle()

    def written(self) -> None:
        """Every rank agreed that its files of the pending tag are on disk: rank 0 finalises it
        in the background (hashing ~14 GB takes seconds)."""
        if self.unfinalized is not None and self.rank == 0:
            self.writer.submit(f"finalising checkpoint {self.unfinalized[0]}",
                               functools.partial(self._finalize, *self.unfinalized))
        self.unfinalized = None

    def _finalize(self, tag: str, step: int, t0: float) -> None:
        tag_dir = os.path.join(self.dir, tag)
        write_marker(tag_dir, step, self.world_size)
        atomic_write(os.path.join(self.dir, "latest"), tag)
        self._prune(tag)
        size = sum(os.path.getsize(os.path.join(r, n)) for r, _, ns in os.walk(tag_dir) for n in ns)
        self.log(f"checkpoint {tag} saved ({size / 2**20:.1f} MiB, {time.time() - t0:.1f} s) in the background")

    def finish(self) -> float:
        """Every rank calls this before leaving (end of run, signal, stop): waits for the write in
        flight and completes its tag. Returns the seconds waited."""
        if self.writer is None:
            return 0.0
        t0 = time.time()
        self.writer.wait()
        self.check()
        if self.unfinalized is not None:
            dist.barrier()
            self.written()
            self.writer.wait()
            self.check()
        return time.time() - t0

    def check(self) -> None:
        if self.writer is not None and self.writer.error:
            raise CheckpointError(f"{self.writer.error}; the newest checkpoint with a {MARKER} in {self.dir} "
                                  f"is intact (fix the cause, e.g. free disk space, and restart to resume from it)")

    def _prune(self, newest: str) -> None:
        complete = [t for t in self.tags() if os.path.isfile(os.path.join(self.dir, t, MARKER))]
        for tag in complete[:-self.keep]:
            if tag != newest:
                shutil.rmtree(os.path.join(self.dir, tag), ignore_errors=True)
        for tag in self.tags():   # partial saves older than the newest complete one
            if tag < newest and not os.path.isfile(os.path.join(self.dir, tag, MARKER)):
                shutil.rmtree(os.path.join(self.dir, tag), ignore_errors=True)

    # -- loading -----------------------------------------------------------------------
    def newest_valid(self) -> Optional[str]:
        """Rank 0 verifies (newest first) and broadcasts the chosen tag to every rank."""
        choice = [None]
        if self.rank == 0:
            for tag in reversed(self.tags()):
                reason = verify_tag(os.path.join(self.dir, tag))
                if reason is None:
                    choice[0] = tag
                    break
                self.log(f"WARNING: skipping checkpoint {tag}: {reason}; trying the previous one")
        dist.broadcast_object_list(choice, src=0)
        return choice[0]

    def load(self, engine, tag: str, grid=None, partition_method: str = "flops") -> dict:
        """Loads the engine state and returns this rank's extra state (RNGs restored).
        A portable tag (pldr-reshard) loads into any layout, its RNGs left as they are;
        partition_method is this run's (a pipeline checkpoint needs the same stage split)."""
        if os.path.isfile(os.path.join(self.dir, tag, "portable.json")):
            from .portable import load_portable
            return load_portable(engine, grid, os.path.join(self.dir, tag))
        path = os.path.join(self.dir, tag, f"rank_{self.rank:05d}.pt")
        if not os.path.isfile(path):
            raise CheckpointError(f"{path} is missing: checkpoint {tag} was written by a different number of "
                                  f"processes; convert it with `pldr-reshard {os.path.join(self.dir, tag)} NEW_RUN_DIR` "
                                  f"or launch the same layout")
        extra = torch.load(path, weights_only=False)
        saved, layout = extra.pop("parameters", None), parameter_layout(engine.module)
        if saved != layout and _has_metric_learner(engine.module):
            # its optimizer partitions hold the parameters in an order this engine does not have
            tag_dir = os.path.join(self.dir, tag)
            why = ("was written before the metric learner's weights were stacked" if saved is None else
                   f"holds its parameters as {saved}, this run as {layout} (ZeRO-2/3 with tp = pp = 1 keep one tensor "
                   f"per decoder layer, other layouts one per weight)")
            raise CheckpointError(f"{tag_dir} {why}; convert it once with `pldr-reshard {tag_dir} NEW_RUN_DIR` and "
                                  f"resume from NEW_RUN_DIR (same weights, moments and data position; a ZeRO-3 "
                                  f"checkpoint: resume it with its own layout)")
        check_stages(os.path.join(self.dir, tag), extra.pop("stage_layers", None), engine.module, partition_method)
        load_path, _ = engine.load_checkpoint(self.dir, tag=tag)
        if load_path is None:
            raise CheckpointError(f"DeepSpeed could not load checkpoint {os.path.join(self.dir, tag)}; resume from an "
                                  f"older step_* tag (remove this one) or start a new run_dir")
        set_rng_state(extra.pop("rng"))
        return extra
