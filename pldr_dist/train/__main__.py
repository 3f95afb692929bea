"""`python -m pldr_dist.train`: the trainer, then an immediate exit.

main() returns once every rank has finished its checkpoints, closed its metrics and TensorBoard
files and left the process group; what is left is the interpreter's teardown of torch and
DeepSpeed, ~1 s of CPU a process (measured on a 2-core machine), which os._exit skips. An
exception still exits through Python (its traceback and error handling unchanged).
"""
import os
import sys

from .trainer import main

code = main()
sys.stdout.flush()
sys.stderr.flush()
os._exit(code if isinstance(code, int) else 1)
