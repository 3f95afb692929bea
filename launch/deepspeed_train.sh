#!/usr/bin/env bash
# The deepspeed launcher. Several nodes: a hostfile ("node01 slots=8" per line) and passwordless
# ssh + pdsh from the first node, which runs:
#   HOSTFILE=launch/hostfile MASTER_ADDR=node01 bash launch/deepspeed_train.sh --config CONFIG [--set k=v ...]
# One machine: NUM_GPUS=8 bash launch/deepspeed_train.sh --config CONFIG
# CPU only: DS_ACCELERATOR=cpu NUM_GPUS=2 ... (the launcher needs --num_gpus to start N processes).
set -euo pipefail
args=()
if [ -n "${HOSTFILE:-}" ]; then
  args+=(--hostfile="$HOSTFILE" --master_addr="${MASTER_ADDR:?set MASTER_ADDR to the first host of $HOSTFILE}")
else
  args+=(--num_gpus="${NUM_GPUS:-1}")
fi
args+=(--master_port="${MASTER_PORT:-29500}")
exec "${PYTHON:-python3}" -m deepspeed.launcher.runner "${args[@]}" \
  --no_local_rank --module "${PLDR_ENTRY:-pldr_dist.train}" "$@"
