#!/usr/bin/env bash
# One device call: pldr-train (compiled, CUDA graphs, Triton GLUs, batch built ahead) with the
# fast path's new parts (rotary table, padded feed-forward, fused head + loss, tanh sigmoid)
# against the package as of commit 8b0dfc6 (before them), alternating, pldr-110m at
# micro-batch 64 and pldr-1b at 16; then a profile of the new trainer's steps 10-12.
#   before the call, where git is (carry benchmarks/_prev, gitignored):
#     mkdir -p benchmarks/_prev && git archive 8b0dfc6 pldr_dist configs | tar -x -C benchmarks/_prev
#   bash benchmarks/gpu_trainer_parts.sh $OUT      (needs deepspeed etc. on PYTHONPATH)
set -uo pipefail
OUT=${1:-/tmp/out}
mkdir -p $OUT
source benchmarks/gpu_trainer_lib.sh
W=/tmp/tparts && rm -rf $W && mkdir -p $W
make_shards $W
STEPS=25 train $W new_110m_mb64 pldr-110m 64
STEPS=25 train_copy benchmarks/_prev $W prev_110m_mb64 pldr-110m 64
STEPS=22 train $W new_1b_mb16 pldr-1b 16
STEPS=22 train_copy benchmarks/_prev $W prev_1b_mb16 pldr-1b 16
summary $W new_110m_mb64 prev_110m_mb64 new_1b_mb16 prev_1b_mb16 | tee $OUT/trainer_parts.txt
# where the new trainer leaves the GPU idle: steps 10-12 profiled (as gpu_trainer_gaps.sh)
STEPS=14 train $W gaps pldr-110m 64 --set 'log.profile_steps=[10,12]'
cp $W/gaps/profile.txt $OUT/trainer_profile_110m_mb64.txt
python benchmarks/trainer_gaps.py $W/gaps/profile_trace.json --top 15 | tee $OUT/trainer_gaps.txt
