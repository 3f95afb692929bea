#!/usr/bin/env bash
# One device call: pldr-train on pldr-1b, micro-batch 16, as shipped (compiled layers, CUDA
# graphs, Triton GLUs, contiguous fp32 gradients, next batch built during the backward).
#   bash benchmarks/gpu_trainer_1b.sh $OUT     (needs deepspeed etc. on PYTHONPATH)
set -uo pipefail
OUT=${1:-/tmp/out}
mkdir -p $OUT
source benchmarks/gpu_trainer_lib.sh
W=/tmp/t1b && rm -rf $W && mkdir -p $W
make_shards $W
STEPS=25 train $W pldr_1b_mb16 pldr-1b 16
summary $W pldr_1b_mb16 | tee $OUT/trainer_1b.txt
