"""Trainer ranks forked from a process that has already imported torch, DeepSpeed and pldr_dist.

Why: a test's trainer rank spent ~5 s of CPU importing torch, DeepSpeed and TorchDynamo (which
torch.optim and DeepSpeed's ZeRO import even with TORCHDYNAMO_DISABLE=1) before its first step,
some 140 ranks a suite on 2 cores: a third of the suite's CPU. Here one process per test worker
(the zygote: `python tests/zygote.py`, started at the first run) imports them once, then forks a
rank per request; the rank runs `pldr_dist.train` as `python -m` would (runpy, run_name
"__main__", the same arguments, environment, working directory), its stdout and stderr in files.

What a fork shares with the zygote is what the imports did, under the zygote's environment: so a
rank is forked only when its environment equals the zygote's but for the rank variables
(`RUNTIME_ONLY`); any other run (train.compile=true, another variable set) starts as a process of
its own (train_helpers.start_ranks). The zygote has one thread when it forks. Resume and layout
tests compare forked runs with runs started by torchrun bit for bit, which would show any state
a fork carried over.
"""
from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time

RUNTIME_ONLY = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                "PYTEST_CURRENT_TEST", "PLDR_FAULT"}


def key(env: dict) -> dict:
    return {k: v for k, v in env.items() if k not in RUNTIME_ONLY}


# -- the test side ---------------------------------------------------------------------------
class Zygote:
    def __init__(self, env: dict, cwd: str):
        self.key = key(env)
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__)], env=env, cwd=cwd,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.codes: dict[int, int] = {}
        self.replies: list[dict] = []
        self._buf = b""
        if not self._pump(until=lambda: any("ready" in r for r in self.replies), timeout=300):
            self.close()
            raise RuntimeError("the zygote did not start")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def _pump(self, until=lambda: False, timeout: float = 0.0) -> bool:
        """Reads the zygote's messages until `until()` holds or `timeout` s have passed."""
        deadline = time.monotonic() + timeout
        while not until():
            left = deadline - time.monotonic()
            ready, _, _ = select.select([self.proc.stdout], [], [], max(0.0, left))
            if not ready:
                return until()
            chunk = os.read(self.proc.stdout.fileno(), 65536)
            if not chunk:
                return until()          # the zygote has gone
            self._buf += chunk
            *lines, self._buf = self._buf.split(b"\n")
            for line in lines:
                message = json.loads(line)
                if "exit" in message:
                    self.codes[message["exit"]] = message["code"]
                else:
                    self.replies.append(message)
        return True

    def spawn(self, module: str, args: list, env: dict, cwd: str, stdout: str, stderr: str) -> "ForkedRank":
        self.replies.clear()
        request = {"module": module, "args": args, "env": env, "cwd": cwd, "stdout": stdout, "stderr": stderr}
        self.proc.stdin.write((json.dumps(request) + "\n").encode())
        self.proc.stdin.flush()
        if not self._pump(until=lambda: bool(self.replies), timeout=60):
            raise RuntimeError("the zygote did not fork the rank")
        return ForkedRank(self, self.replies[0]["pid"])

    def close(self) -> None:
        try:
            self.proc.stdin.close()       # the zygote exits at the end of its input
            self.proc.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()


class ForkedRank:
    """The part of subprocess.Popen that start_ranks uses, for a rank the zygote forked."""

    def __init__(self, zygote: Zygote, pid: int):
        self.zygote, self.pid, self.returncode = zygote, pid, None

    def poll(self):
        if self.returncode is None:
            self.zygote._pump()
            self.returncode = self.zygote.codes.pop(self.pid, None)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if not self.zygote.alive():
                raise RuntimeError(f"the zygote ended before rank {self.pid}")
            left = 0.5 if deadline is None else min(0.5, deadline - time.monotonic())
            if left <= 0:
                raise subprocess.TimeoutExpired(f"forked rank {self.pid}", timeout)
            self.zygote._pump(until=lambda: self.pid in self.zygote.codes, timeout=left)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        import signal
        self.send_signal(signal.SIGKILL)


# -- the zygote ------------------------------------------------------------------------------
def _run_child(request: dict) -> None:
    """In the forked child: becomes `python -m MODULE ARGS`; never returns."""
    import runpy
    import traceback
    code = 1
    try:
        for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
            os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644), fd)
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        os.chdir(request["cwd"])
        sys.path[0] = request["cwd"]            # as `python -m` has it
        os.environ.clear()
        os.environ.update(request["env"])
        sys.argv = [request["module"], *request["args"]]
        try:
            runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            if not isinstance(e.code, (int, type(None))):
                print(e.code, file=sys.stderr)
    except BaseException:   # noqa: BLE001 - reported as python would, then exit 1
        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(code)


def _serve() -> None:
    import threading

    import deepspeed.runtime.zero.stage_1_and_2  # noqa: F401 - what a rank imports (ZeRO: torch._dynamo)
    import torch._dynamo  # noqa: F401
    import pldr_dist.train.build  # noqa: F401
    import pldr_dist.train.trainer  # noqa: F401
    assert threading.active_count() == 1 and len(os.listdir("/proc/self/task")) == 1, "fork needs one thread"

    def send(message: dict) -> None:
        sys.stdout.write(json.dumps(message) + "\n")
        sys.stdout.flush()

    send({"ready": True})
    pending = b""
    while True:
        readable, _, _ = select.select([0], [], [], 0.02)
        if readable:
            chunk = os.read(0, 65536)
            if not chunk:
                return                  # the test worker has gone (or closed us)
            *lines, pending = (pending + chunk).split(b"\n")
            for line in lines:
                pid = os.fork()
                if pid == 0:
                    _run_child(json.loads(line))
                send({"pid": pid})
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            send({"exit": pid, "code": os.waitstatus_to_exitcode(status)})


if __name__ == "__main__":
    sys.path[0] = os.getcwd()       # not tests/ (its distributed.py would shadow no module, but as `python -m`)
    _serve()
