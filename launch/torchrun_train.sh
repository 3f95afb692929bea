#!/usr/bin/env bash
# torchrun on each node, c10d rendezvous (no fixed node ranks: nodes join in any order).
# Run the same command on every node:
#   NNODES=2 NPROC_PER_NODE=8 RDZV_ENDPOINT=node01:29400 bash launch/torchrun_train.sh --config CONFIG [--set k=v ...]
# One machine, N processes: NPROC_PER_NODE=N bash launch/torchrun_train.sh --config CONFIG
set -euo pipefail
NNODES=${NNODES:-1}
NPROC_PER_NODE=${NPROC_PER_NODE:-1}
RDZV_ENDPOINT=${RDZV_ENDPOINT:-127.0.0.1:29400}
RDZV_ID=${RDZV_ID:-pldr-${SLURM_JOB_ID:-run}}   # must be the same on every node of one job
exec "${PYTHON:-python3}" -m torch.distributed.run \
  --nnodes="$NNODES" --nproc-per-node="$NPROC_PER_NODE" \
  --rdzv-backend=c10d --rdzv-endpoint="$RDZV_ENDPOINT" --rdzv-id="$RDZV_ID" \
  -m "${PLDR_ENTRY:-pldr_dist.train}" "$@"
