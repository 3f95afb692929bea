"""`python -m pldr_dist.train`: the trainer, then the exit handlers, then an immediate exit.

main() returns once every rank has finished its checkpoints, closed its metrics and TensorBoard
files, stopped and joined its DataLoader workers (Trainer.run closes its batches: a worker left
to the exit handlers once hung a run here) and left the process group. The exit handlers still
run as at a normal exit, and MPI is finalized where mpi4py started it (mpi4py does that in the
interpreter's teardown; without it mpirun reports the job as failed). What os._exit skips is the rest of that teardown, torch's
and DeepSpeed's: ~1 s of CPU a process, measured on a 2-core machine. An exception still exits
through Python (its traceback and error handling unchanged).
"""
import atexit
import os
import sys

from .trainer import main

code = main()
atexit._run_exitfuncs()     # noqa: SLF001 - what sys.exit would run, in the same order
mpi = sys.modules.get("mpi4py.MPI")
if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
    mpi.Finalize()
sys.stdout.flush()
sys.stderr.flush()
os._exit(code)
