#!/usr/bin/env bash
# One device call: the stand-alone step at several micro-batches with every fast-path part on,
# PLGA and G = I, to pick the best micro-batch now that the fused loss keeps less memory (19.2 GiB
# at pldr-110m micro-batch 64, 38.7 GiB at pldr-1b 16); then pldr-train for pldr-1b at 24.
#   bash benchmarks/gpu_microbatch_sweep.sh $OUT
set -uo pipefail
OUT=${1:-/tmp/out}
mkdir -p $OUT
(export PYTHONPATH=$PWD:$PWD/benchmarks:${PYTHONPATH:-} PYTHONUNBUFFERED=1
 python benchmarks/step_parts_ab.py --out $OUT --no-before \
  --models pldr-110m:64,pldr-110m:96,pldr-110m:128,pldr-1b:16,pldr-1b:24,pldr-1b:32 2>&1 | grep -v -i warn | grep -v "^  " | tee $OUT/microbatch_sweep.txt)
source benchmarks/gpu_trainer_lib.sh
W=/tmp/mbsweep && rm -rf $W && mkdir -p $W
make_shards $W
STEPS=30 train $W new_1b_mb24 pldr-1b 24 --set log.every=5
FROM=10 TO=30 summary $W new_1b_mb24 | tee $OUT/trainer_1b_mb24.txt
