#!/usr/bin/env bash
# One device call: pldr-train pldr-110m micro-batch 64, 25 steps, new / previous (8b0dfc6) /
# new again, for the run-to-run spread of the loss curve (GPU training is not bit-reproducible).
#   bash benchmarks/gpu_trainer_repeat.sh $OUT   (benchmarks/_prev as in gpu_trainer_parts.sh)
set -uo pipefail
OUT=${1:-/tmp/out}
mkdir -p $OUT
source benchmarks/gpu_trainer_lib.sh
W=/tmp/trepeat && rm -rf $W && mkdir -p $W
make_shards $W
STEPS=25 train $W new_a pldr-110m 64
STEPS=25 train_copy benchmarks/_prev $W prev_a pldr-110m 64
STEPS=25 train $W new_b pldr-110m 64
summary $W new_a prev_a new_b | tee $OUT/trainer_repeat.txt
losses $W new_a prev_a new_b | tee -a $OUT/trainer_repeat.txt
