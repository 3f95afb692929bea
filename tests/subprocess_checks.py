"""Checks that must run in a process of their own (Triton's CPU interpreter is chosen by
TRITON_INTERPRET=1 before Triton is imported), all of a file's checks in one process.

A checks file ends with `if __name__ == "__main__": main(globals())` and runs as
    python tests/glu_kernel_checks.py NAME [NAME ...]                 # the named checks, in turn
    python tests/glu_kernel_checks.py --json OUT.json NAME [NAME ...]  # and their outcomes to OUT.json
Each check is a function of the file (`prefix` + NAME). Every check runs even when an earlier one
failed, and torch.compile's caches are reset between checks; a check that changes module state
(a monkeypatched function, a block size) must restore it itself. Exit status 1 when any check failed.

The test module starts the process once (`run_checks`, from a module-scoped fixture) and each of
its tests asserts its own check's outcome.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import time
import traceback


def main(namespace: dict, prefix: str = "") -> None:
    args = sys.argv[1:]
    out = None
    if args[:1] == ["--json"]:
        out, args = args[1], args[2:]
    outcomes = {}
    for name in args:
        buf, t0 = io.StringIO(), time.time()
        try:
            with contextlib.redirect_stdout(buf):
                namespace[prefix + name]()
            ok = True
        except BaseException:   # noqa: BLE001 - every failure, assertion or not, is that check's outcome
            ok = False
            buf.write(traceback.format_exc())
        finally:
            import torch
            torch._dynamo.reset()
        outcomes[name] = {"ok": ok, "output": buf.getvalue()}
        print(f"--- {name}: {'ok' if ok else 'FAILED'} in {time.time() - t0:.1f} s\n{buf.getvalue()}", flush=True)
    if out:
        with open(out, "w") as f:
            json.dump(outcomes, f)
    sys.exit(0 if all(o["ok"] for o in outcomes.values()) else 1)


def run_checks(script: str, names: list[str], tmp_dir: str, timeout: float = 1800) -> dict:
    """Runs the named checks of `script` in one process (TRITON_INTERPRET=1): {name: (ok, output)}.
    A check the process never reported on (it crashed or hung) is failed with the process's output."""
    out = os.path.join(tmp_dir, os.path.basename(script) + ".json")
    env = dict(os.environ, TRITON_INTERPRET="1")
    try:
        done = subprocess.run([sys.executable, script, "--json", out, *names], capture_output=True, text=True,
                              timeout=timeout, env=env)
        log = done.stdout[-4000:] + done.stderr[-4000:]
    except subprocess.TimeoutExpired as e:
        log = f"timed out after {timeout:.0f} s\n{(e.stdout or b'')[-4000:]!r}"
    outcomes = {}
    if os.path.exists(out):
        with open(out) as f:
            outcomes = {k: (v["ok"], v["output"]) for k, v in json.load(f).items()}
    return {name: outcomes.get(name, (False, f"no outcome for {name}:\n{log}")) for name in names}
