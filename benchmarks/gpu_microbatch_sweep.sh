#!/usr/bin/env bash
# One device call (prepared for the next session, not yet run): the stand-alone step at several
# micro-batches with every fast-path part on, PLGA and G = I, to pick the best micro-batch now
# that the fused loss keeps less memory (19.2 GiB at pldr-110m micro-batch 64, 38.7 GiB at
# pldr-1b 16).
#   bash benchmarks/gpu_microbatch_sweep.sh $OUT
set -uo pipefail
OUT=${1:-/tmp/out}
export PYTHONPATH=$PWD:$PWD/benchmarks PYTHONUNBUFFERED=1
python benchmarks/step_parts_ab.py --out $OUT --no-before \
  --models pldr-110m:64,pldr-110m:96,pldr-110m:128,pldr-1b:16,pldr-1b:24,pldr-1b:32 2>&1 | grep -v -i warn | grep -v "^  "
