"""`pldr-train`: one entry point for every layout (TP x PP x DP, ZeRO 0-3), CPU or GPU.

Order of work: parse and validate the config (no process group yet) -> init the process
group -> build the full model from the seed, apply tensor parallelism, split into pipeline
stages -> DeepSpeed engine -> resume from the newest complete checkpoint -> train, logging on
rank 0 -> checkpoint at the end (or when SLURM's signal arrives).
"""
from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import time

import torch
import torch.distributed as dist
from torch.profiler import record_function

from ..data.loader import BatchesAhead
from ..errors import PLDRError, cli_main
from ..model.flops import flops_per_token
from ..parallel.host_copy import HostCopy
from .checkpoint import CheckpointManager
from .config import RunConfig, load_config, validate
from .metrics import GStats, MetricsLog, peak_memory_mib
from .profiling import STEP_RANGE, StepProfiler
from .schedule import lr_at

EXIT_NONFINITE = 3


def due(step: int, every: int) -> bool:
    """Whether a periodic action (every N steps; 0 = off) falls on `step`."""
    return every > 0 and step % every == 0


class StopTraining(Exception):
    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


class SignalFlag:
    """SIGTERM/SIGUSR1 (SLURM's warning before preemption or the time limit) set a flag that
    every rank agrees on at the end of the step, so all ranks checkpoint together. The same
    all-reduce carries whether any rank still writes an asynchronous checkpoint (checkpoint.py).

    The ranks agree over a CPU (gloo) group: an NCCL all-reduce of a GPU flag, read back with
    .item(), made the host wait for the whole step's GPU work every step and left the GPU idle
    while the next step was launched (~1 ms a step on the H100, results/trainer_parts/)."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.raised = 0
        self.group = dist.new_group(backend="gloo")   # every rank, in the same order
        for sig in self.SIGNALS:
            signal.signal(sig, self._handler)
        default_signals_in_children()

    def _handler(self, signum, frame):
        self.raised = signum

    def agreed(self, writing: bool = False) -> tuple[bool, bool]:
        """(a signal was raised on some rank, some rank is still writing a checkpoint)."""
        flag = torch.tensor([1.0 if self.raised else 0.0, 1.0 if writing else 0.0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return bool(flag[0].item()), bool(flag[1].item())


_children_default = False


def default_signals_in_children() -> None:
    """A process forked from a rank (a DataLoader worker) starts with SIGTERM and SIGUSR1 at
    their default action, not the rank's flag-setting handler: SIGTERM must end such a process
    (multiprocessing ends its workers so), and only the rank checkpoints. torch's workers set
    their own SIGTERM handler, but only once they have started."""
    global _children_default
    if not _children_default:
        os.register_at_fork(after_in_child=lambda: [signal.signal(s, signal.SIG_DFL) for s in SignalFlag.SIGNALS])
        _children_default = True


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="pldr-train", description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="YAML or TOML run config (see configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.steps=100 (repeatable)")
    return p.parse_args(argv)


REPORT_GRACE_S = 10.0   # how long a rank > 0 leaves rank 0 to report an error first


def let_rank0_report(rank: int) -> None:
    """Before a rank reports a PLDRError (one line, exit 2: pldr_dist/errors.py).

    Most errors strike every rank alike (all parse one config, all read every shard), and the job
    should print one line, not one per rank: rank 0 reports at once, and its exit makes the
    launcher (torchrun) end the other ranks. A rank > 0 waits a little first, with SIGTERM's
    default action back (the trainer's handler only sets a flag), so it reports only an error
    that rank 0 does not have."""
    if rank > 0:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        time.sleep(REPORT_GRACE_S)


def _rank_before_init() -> int:
    from ..distributed import LaunchError, discover
    try:
        return discover().rank
    except LaunchError:
        return 0


@cli_main("pldr-train")
def main(argv=None) -> int:
    args = parse_args(argv)
    from ..distributed import PREEMPTED_EXIT_CODE, discover, init_distributed
    try:
        cfg = load_config(args.config, args.overrides)
        env = discover()
        validate(cfg, world_size=env.world_size)
        from .build import check_data
        check_data(cfg)
    except PLDRError:
        let_rank0_report(_rank_before_init())
        raise
    env = init_distributed()
    code, agreed = 0, True
    try:
        Trainer(cfg, env).run()
    except StopTraining as e:
        if dist.get_rank() == 0:
            print(f"pldr-train: {e}", file=sys.stderr if e.code != PREEMPTED_EXIT_CODE else sys.stdout, flush=True)
        code = e.code
    except PLDRError:
        agreed = False      # no barrier: another rank may never reach it
        let_rank0_report(env.rank)
        raise
    finally:
        if agreed:
            dist.barrier()
            dist.destroy_process_group()
    return code


class Trainer:
    def __init__(self, cfg: RunConfig, env):
        """env: the launch as `distributed.discover()` read it (named in the first log lines, so
        a job's log says which launcher started how many processes where)."""
        from .build import build_run
        self.cfg = cfg
        self.env = env
        self.rank = dist.get_rank()
        self.job = build_run(cfg)   # grid, model config, engine, loaders, step function
        self.ckpt = CheckpointManager(cfg.run_dir, cfg.checkpoint.keep, self.rank, dist.get_world_size(),
                                      log=self.log, async_save=cfg.checkpoint.async_save,
                                      write_delay_s=cfg.checkpoint.write_delay_s)
        self.metrics = MetricsLog(cfg.run_dir, self.rank == 0, cfg.log.tensorboard, cfg.train.steps)
        self.gstats = (GStats(self.job.module, self.job.mcfg.num_layers)
                       if self.job.mcfg.learned_g and cfg.log.g_stats_every else None)
        self.step = 0
        self.tokens = 0
        # lazy: the loader starts reading at the first batch, after resume() set its position
        self.batches = BatchesAhead(self.job.train_loader)
        self.nonfinite_total = 0
        self.nonfinite_in_row = 0
        self.unread_skips = []     # (step, skipped) of steps whose skip flag is not read yet
        self.pending_log = None    # a logged step's line, written once the next step is queued (flush_log)
        self.signals = SignalFlag()
        peak = cfg.log.peak_tflops * 1e12 or (989e12 if torch.cuda.is_available() else 0.0)
        self.peak_flops = peak
        self.flops_per_token = flops_per_token(self.job.mcfg, self.job.seq_len)
        self.profiler = StepProfiler(cfg.log.profile_steps if self.rank == 0 else [], cfg.run_dir, self.log)

    def log(self, text: str) -> None:
        if self.rank == 0:   # one write: the checkpoint writer thread logs too
            print(text + "\n", end="", flush=True)

    # -- state -----------------------------------------------------------------------
    def extra_state(self) -> dict:
        return {"step": self.step, "tokens": self.tokens, "nonfinite_total": self.nonfinite_total,
                "nonfinite_in_row": self.nonfinite_in_row, "loader": self.batches.state_dict()}

    def save(self) -> None:
        """Logs how long the step loop stalled for the checkpoint (`checkpoint_stall_s`): all of the
        save when synchronous; waiting for the previous write, the barrier and the copy to host
        memory when asynchronous."""
        self.flush_log()
        self.read_skips(self.step)   # the checkpoint holds the non-finite counts
        t0 = time.time()
        tag = self.ckpt.save(self.job.engine, self.step, self.extra_state(), self.cfg.to_dict(),
                             self.cfg.checkpoint.tokenizer)
        stall = time.time() - t0
        how = "copied to host memory, written in the background" if self.ckpt.writer else "written"
        self.metrics.write(self.step, {"checkpoint_stall_s": stall},
                           f"checkpoint {tag}: the step loop stalled {stall:.2f} s ({how})")

    def finish_checkpoints(self) -> None:
        waited = self.ckpt.finish()
        if self.ckpt.writer is not None:
            self.log(f"waited {waited:.1f} s for the checkpoint writes in flight")

    def resume(self) -> None:
        t0 = time.time()
        tag = self.ckpt.newest_valid()
        if tag is None:
            self.log(f"starting a new run in {self.cfg.run_dir}")
            return
        extra = self.ckpt.load(self.job.engine, tag, self.job.grid, self.cfg.parallel.partition_method)
        self.step, self.tokens = extra["step"], extra["tokens"]
        self.nonfinite_total, self.nonfinite_in_row = extra["nonfinite_total"], extra["nonfinite_in_row"]
        self.job.train_loader.load_state_dict(extra["loader"])
        self.log(f"resumed from checkpoint {tag} (step {self.step}, {self.tokens:,} tokens; verified and loaded "
                 f"in {time.time() - t0:.1f} s)")

    # -- loop ------------------------------------------------------------------------
    def run(self) -> None:
        """Trains; every way out but an error (the end, a signal, non-finite steps) first waits
        for the checkpoint write in flight and completes it (every rank gets here together)."""
        try:
            self.train()
        except StopTraining:
            self.finish_checkpoints()
            self.metrics.close()
            raise
        finally:
            self.batches.close()
        self.finish_checkpoints()
        self.metrics.close()
        self.log(f"done: {self.step} steps, {self.tokens:,} tokens, last loss {self.last_loss:.6f}")

    def train(self) -> None:
        from ..distributed import PREEMPTED_EXIT_CODE
        cfg, run = self.cfg, self.job
        self.resume()
        self.log(f"training {cfg.model.preset} ({run.num_params:,} parameters) with {run.grid.describe().split(' (')[0]}, "
                 f"zero={cfg.parallel.zero_stage}, {run.precision}, {run.tokens_per_step:,} tokens/step; {run.fast_path}")
        e = self.env
        self.log(f"launch: {e.world_size} processes, {e.local_world_size} a node, started by {e.launcher}; "
                 f"{dist.get_backend()}, intra-op threads {torch.get_num_threads()}")
        loss = torch.tensor(float("nan"))   # a device tensor: read (a host sync) only when logged
        last_saved = self.step if self.step else -1
        # Throughput is measured over the steps between log lines, each line written once the
        # next step is queued (`flush_log`): reading the loss waits for the GPU to finish its step,
        # so each interval's wall time is the GPU's (as Megatron's interval timer), and the GPU has
        # the next step to run meanwhile instead of idling while the host launches it. The loss
        # and norm are read from a pinned copy (`HostCopy`): a plain .item() would wait for the
        # step queued after them too.
        self.interval = (time.time(), self.step)
        while self.step < cfg.train.steps:
            t0 = time.time()
            lr = lr_at(self.step, cfg.optim.lr, cfg.optim.warmup_steps, cfg.train.steps, cfg.optim.min_lr_ratio)
            run.set_lr(lr)
            want_g = self.gstats is not None and due(self.step + 1, cfg.log.g_stats_every)
            if want_g:
                self.gstats.active = True
            inject = (self.step + 1) in cfg.train.inject_nonfinite_at
            self.profiler.before(self.step + 1)
            with record_function(STEP_RANGE):
                loss, skipped = run.train_step(self.batches, inject)
            profiled = self.profiler.after(self.step + 1)
            if self.gstats is not None:
                self.gstats.active = False
            self.step += 1
            self.tokens += run.tokens_per_step
            self.flush_log()                # the previous step's line, now that this step is queued
            if profiled is not None:     # rank 0 only: must not change what the ranks do together
                self.metrics.write(self.step, profiled)
            self.unread_skips.append((self.step, skipped))
            self.read_skips(self.step - 1)  # this step's flag is read with its log line or a step later
            values = self.gstats.collect() if want_g else {}
            if self.step % cfg.log.every == 0 or self.step == cfg.train.steps or values:
                self.pending_log = (self.step, self.tokens, HostCopy(loss, run.grad_norm()), lr, values,
                                    time.time() - t0)
            else:
                self.metrics.eta(self.step, time.time() - t0)
            evaluated = due(self.step, cfg.eval.every)
            if evaluated:
                self.validate()
            self.fault_injection()
            with record_function("pldr:agree_signals"):
                stop, writing = self.signals.agreed(self.ckpt.writing())
            if not writing:
                self.ckpt.written()
            if stop:
                self.save()
                raise StopTraining(f"received signal {self.signals.raised or 'on another rank'}: checkpointed at "
                                   f"step {self.step}, exiting with {PREEMPTED_EXIT_CODE} for requeue",
                                   PREEMPTED_EXIT_CODE)
            if due(self.step, cfg.checkpoint.every):
                self.save()
                last_saved = self.step
            if evaluated or last_saved == self.step:
                self.interval = (time.time(), self.step)   # not training time
        self.flush_log()
        self.read_skips(self.step)
        if cfg.eval.every and self.step % cfg.eval.every:
            self.validate()
        if last_saved != self.step and cfg.checkpoint.at_end:
            self.save()
        self.last_loss = float(loss)

    def flush_log(self) -> None:
        """Writes the log line held back since its step (the loss and gradient norm read now, which
        waits for that step's GPU work); called once the next step is queued, and before anything
        that must follow the line (an evaluation, a checkpoint, the end, a stop, an injected fault)."""
        if self.pending_log is None:
            return
        step, tokens, read, lr, values, step_time = self.pending_log
        self.pending_log = None
        self.read_skips(step)
        loss_value, norm = read.read()
        now = time.time()
        start, start_step = self.interval
        self.interval = (now, step)
        values = {**values, **self.step_metrics(loss_value, lr, (now - start) / max(step - start_step, 1), tokens,
                                                float("nan") if norm is None else norm)}
        cfg = self.cfg
        console = (f"step {step}/{cfg.train.steps} loss {loss_value:.4f} lr {lr:.2e} "
                   f"{values['tokens_per_s']:,.0f} tok/s {values['tflops_per_device']:.2f} TFLOP/s/dev"
                   + (f" MFU {100 * values['mfu']:.1f}%" if self.peak_flops else "")
                   + f" mem {values['memory_mib']:.0f} MiB ETA {self.metrics.eta(step, step_time)}")
        self.metrics.write(step, values, console)

    def read_skips(self, upto: int) -> None:
        """Counts and reports the skipped steps up to step `upto`, in order; stops the run after
        train.max_nonfinite_in_row in a row."""
        while self.unread_skips and self.unread_skips[0][0] <= upto:
            step, skipped = self.unread_skips.pop(0)
            if not skipped:
                self.nonfinite_in_row = 0
                continue
            self.nonfinite_total += 1
            self.nonfinite_in_row += 1
            self.log(f"step {step}: non-finite loss or gradient, update skipped "
                     f"({self.nonfinite_in_row} in a row, {self.nonfinite_total} in total)")
            limit = self.cfg.train.max_nonfinite_in_row
            if self.nonfinite_in_row >= limit:
                raise StopTraining(
                    f"stopping: {self.nonfinite_in_row} non-finite steps in a row (train.max_nonfinite_in_row="
                    f"{limit}); the last good checkpoint is intact in {self.ckpt.dir} (lower optim.lr or check the "
                    f"data)", EXIT_NONFINITE)

    def fault_injection(self) -> None:
        """Testing aid: PLDR_FAULT=kill:K makes every rank SIGKILL itself after step K (a crash);
        PLDR_FAULT=term:K sends SIGTERM to rank 0 only (a preemption notice the ranks must agree on)."""
        kind, _, at = os.environ.get("PLDR_FAULT", "").partition(":")
        if not at or int(at) != self.step:
            return
        self.flush_log()
        if kind == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif kind == "term" and self.rank == 0:
            os.kill(os.getpid(), signal.SIGTERM)

    def step_metrics(self, loss: float, lr: float, dt: float, tokens: int, grad_norm: float) -> dict:
        tokens_per_s = self.job.tokens_per_step / dt
        per_device = tokens_per_s * self.flops_per_token / dist.get_world_size()
        values = {"loss": loss, "lr": lr, "step_time_s": dt, "tokens_per_s": tokens_per_s,
                  "tflops_per_device": per_device / 1e12, "memory_mib": peak_memory_mib(),
                  "tokens": tokens, "nonfinite_skipped": self.nonfinite_total, "grad_norm": grad_norm}
        if self.peak_flops:
            values["mfu"] = per_device / self.peak_flops
        return values

    def validate(self) -> None:
        self.flush_log()
        loss = self.job.eval_loss(self.cfg.eval.batches)
        ppl = math.exp(min(loss, 50.0))
        self.metrics.write(self.step, {"val_loss": loss, "val_ppl": ppl},
                           f"step {self.step}: validation loss {loss:.4f} perplexity {ppl:.2f}")


if __name__ == "__main__":
    sys.exit(main())
