"""Run a function on N real processes over gloo and collect what each returns.

Distributed tests call `run_distributed(fn, world_size, *args)`; `fn(rank, world_size, *args)`
runs inside an initialised torch.distributed process group (and DeepSpeed's comm layer when
`deepspeed=True`) and returns any picklable value (CPU tensors included). A failure on any
rank raises here with that rank's traceback.

Starting the processes costs seconds (each imports torch, and DeepSpeed), far more than most
jobs, so the processes of one (world size, deepspeed) pair are started once per test session
and run every job of that kind in turn: one worker group per world size. Between jobs each
process gets torch's start-up RNG state, default dtype and thread count back; a job that changes
other module state (a module attribute, a monkeypatched function) must restore it itself. A job
that fails or times out takes its group down (a rank may still wait in a collective); the next
job starts a new one. `fresh=True` runs a job in processes of its own.
"""
from __future__ import annotations

import atexit
import io
import os
import queue as queue_module
import time
import traceback

import torch.multiprocessing as mp

from pldr_dist.distributed import free_port


def _serve(rank, world_size, port, jobs, results, use_deepspeed):
    """One rank of a worker group: the process group once, then jobs until None arrives."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size),
                      DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    import torch
    import torch.distributed as dist
    torch.set_num_threads(1)
    start_seed, start_dtype = torch.initial_seed(), torch.get_default_dtype()
    try:
        if use_deepspeed:
            import deepspeed
            from pldr_dist.distributed import skip_shm_allreduce
            skip_shm_allreduce()       # as the trainer does
            deepspeed.init_distributed(dist_backend="gloo", verbose=False)
        else:
            dist.init_process_group("gloo", rank=rank, world_size=world_size)
    except BaseException:
        results.put((rank, "error", traceback.format_exc()))
        return
    try:
        while True:
            job = jobs.get()
            if job is None:
                break
            fn, args = job
            torch.manual_seed(start_seed)           # as a freshly started process has them
            torch.set_default_dtype(start_dtype)
            torch.set_num_threads(1)
            try:
                result = fn(rank, world_size, *args)
                buf = io.BytesIO()            # plain bytes: tensors outlive this process's shared memory
                torch.save(result, buf)
                results.put((rank, "ok", buf.getvalue()))
            except BaseException:  # report every failure, including assertion errors, to the parent
                results.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        # Skip the interpreter's teardown of torch (~2 s a rank here, at the session's end):
        # every result is flushed to the parent first.
        results.close()
        results.join_thread()
        os._exit(0)


class WorkerGroup:
    """world_size spawned processes in one gloo process group, running jobs one at a time."""

    def __init__(self, world_size: int, deepspeed: bool):
        ctx = mp.get_context("spawn")
        self.world_size = world_size
        self.results = ctx.Queue()
        self.jobs = [ctx.Queue() for _ in range(world_size)]
        port = free_port()
        self.procs = [ctx.Process(target=_serve, args=(r, world_size, port, self.jobs[r], self.results, deepspeed),
                                  daemon=True) for r in range(world_size)]
        for p in self.procs:
            p.start()

    def run(self, fn, args, timeout: float) -> list:
        """[result of rank 0, ...]; raises AssertionError naming the first rank that failed."""
        for q in self.jobs:
            q.put((fn, args))
        results, errors = {}, []
        try:
            for _ in range(self.world_size):
                try:
                    rank, status, value = self.results.get(timeout=timeout)
                except queue_module.Empty:
                    dead = [r for r, p in enumerate(self.procs) if not p.is_alive()]
                    errors.append(f"no result within {timeout:.0f} s (ranks {sorted(results)} answered; "
                                  f"dead ranks: {dead})")
                    break
                if status == "ok":
                    import torch
                    results[rank] = torch.load(io.BytesIO(value), weights_only=False)
                else:
                    errors.append(f"rank {rank} failed:\n{value}")
                    break
        except BaseException:
            self.close(kill=True)
            raise
        if errors:
            self.close(kill=True)    # the other ranks may be waiting in a collective
            raise AssertionError("\n".join(errors))
        return [results[r] for r in range(self.world_size)]

    def alive(self) -> bool:
        return all(p.is_alive() for p in self.procs)

    def close(self, kill: bool = False) -> None:
        if not kill:   # a few seconds to leave the process group; nothing else is left to do
            self.stop()
        self.join(time.time() + (0 if kill else 5))

    def stop(self) -> None:
        """Asks each rank to leave its process group and exit."""
        for q in self.jobs:
            q.put(None)

    def join(self, deadline: float) -> None:
        """Waits for the ranks until `deadline` (time.time()), then kills the ones still running."""
        for p in self.procs:
            p.join(timeout=max(0.0, deadline - time.time()))
        for p in self.procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)


_groups: dict[tuple[int, bool], WorkerGroup] = {}


def close_worker_groups() -> None:
    """Every group told to stop at once, then given the same few seconds in all (one at a
    time, each group's wait for its slowest rank made the session's end ~5 s a group longer)."""
    groups = list(_groups.values())
    _groups.clear()
    for group in groups:
        group.stop()
    deadline = time.time() + 5
    for group in groups:
        group.join(deadline)


atexit.register(close_worker_groups)


def run_distributed(fn, world_size: int, *args, timeout: float = 600, deepspeed: bool = False,
                    fresh: bool = False) -> list:
    """Returns [result of rank 0, result of rank 1, ...]."""
    if fresh:
        group = WorkerGroup(world_size, deepspeed)
        try:
            return group.run(fn, args, timeout)
        finally:
            group.close()
    key = (world_size, deepspeed)
    group = _groups.get(key)
    if group is None or not group.alive():
        if group is not None:
            group.close(kill=True)
        group = _groups[key] = WorkerGroup(world_size, deepspeed)
    try:
        return group.run(fn, args, timeout)
    except BaseException:
        if _groups.get(key) is group and not group.alive():
            del _groups[key]
        raise
