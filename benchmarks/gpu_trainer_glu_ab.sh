#!/usr/bin/env bash
# One device call: pldr-train (pldr-110m, micro-batch 64, compiled, DeepSpeed bf16, contiguous
# gradients, CUDA graphs) with the Triton GLU kernels on and off (train.triton_glu), twice
# each, alternating, in this one call.
#   bash benchmarks/gpu_trainer_glu_ab.sh $OUT     (needs deepspeed etc. on PYTHONPATH)
set -uo pipefail
OUT=${1:-/tmp/out}
mkdir -p $OUT
source benchmarks/gpu_trainer_lib.sh
W=/tmp/glu_ab && rm -rf $W && mkdir -p $W
make_shards $W
export STEPS=25
for round in 1 2; do
  train $W kernel_$round pldr-110m 64 --set train.triton_glu=true
  train $W pytorch_glu_$round pldr-110m 64 --set train.triton_glu=false
done
summary $W kernel_1 pytorch_glu_1 kernel_2 pytorch_glu_2 | tee $OUT/trainer_glu_ab.txt
