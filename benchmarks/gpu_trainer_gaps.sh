#!/usr/bin/env bash
# One device call: where pldr-train (pldr-110m, micro-batch 64, compiled, CUDA graphs, Triton
# GLUs) leaves the GPU idle: steps 10-12 profiled (log.profile_steps), the trace's busy share
# and longest gaps with the host ops during each (benchmarks/trainer_gaps.py).
#   bash benchmarks/gpu_trainer_gaps.sh $OUT     (needs deepspeed etc. on PYTHONPATH)
set -uo pipefail
OUT=${1:-/tmp/out}
mkdir -p $OUT
source benchmarks/gpu_trainer_lib.sh
W=/tmp/gaps && rm -rf $W && mkdir -p $W
make_shards $W
STEPS=14 train $W gaps pldr-110m 64 --set 'log.profile_steps=[10,12]'
cp $W/gaps/profile.txt $OUT/trainer_profile_110m_mb64.txt
python benchmarks/trainer_gaps.py $W/gaps/profile_trace.json --top 15 | tee $OUT/trainer_gaps.txt
summary $W gaps
