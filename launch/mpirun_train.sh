#!/usr/bin/env bash
# Open MPI's mpirun: ranks come from mpi4py, rank 0 picks the rendezvous address and port.
#   NP=16 PER_NODE=8 HOSTFILE=launch/hostfile bash launch/mpirun_train.sh --config CONFIG [--set k=v ...]
# One machine: NP=2 bash launch/mpirun_train.sh --config CONFIG
# Extra mpirun flags go in MPIRUN_ARGS (e.g. "--mca btl_tcp_if_include ib0").
set -euo pipefail
NP=${NP:?set NP to the total number of processes}
args=(-np "$NP" --bind-to none)
if [ -n "${HOSTFILE:-}" ]; then
  args+=(--hostfile "$HOSTFILE" --map-by "ppr:${PER_NODE:?set PER_NODE (processes per node)}:node")
else   # one host: loopback only, and more ranks than cores are allowed
  args+=(--oversubscribe --mca btl self,vader --mca oob_tcp_if_include lo)
fi
[ "$(id -u)" = 0 ] && args+=(--allow-run-as-root)
# mpirun starts remote ranks without this shell's environment: pass on what they need.
for var in PATH PYTHONPATH LD_LIBRARY_PATH DS_ACCELERATOR OMP_NUM_THREADS MASTER_ADDR MASTER_PORT; do
  [ -n "${!var:-}" ] && args+=(-x "$var")
done
# shellcheck disable=SC2086
exec mpirun "${args[@]}" ${MPIRUN_ARGS:-} "${PYTHON:-python3}" -u -m "${PLDR_ENTRY:-pldr_dist.train}" "$@"
