#!/usr/bin/env bash
# One device call: pldr-train (pldr-110m, micro-batch 64, bf16 ZeRO-1, compiled) with fewer host
# syncs per step (the preemption flag agreed over a CPU group, the loss read only when logged,
# the optimizer's finite check read once) against the package as of ae761ac, alternating, all
# logging every 5 steps; a profiled run for the GPU's idle share; micro-batch 128.
#   bash benchmarks/gpu_trainer_syncs.sh $OUT   (benchmarks/_prev: git archive ae761ac pldr_dist configs)
set -uo pipefail
OUT=${1:-/tmp/out}
mkdir -p $OUT
source benchmarks/gpu_trainer_lib.sh
W=/tmp/tsync && rm -rf $W && mkdir -p $W
make_shards $W
L="--set log.every=5"
STEPS=40 ab_runs $W pldr-110m 64 $L
FROM=10 TO=40 summary $W new_a prev_a new_b prev_b | tee $OUT/trainer_syncs.txt
STEPS=14 train $W gaps pldr-110m 64 $L --set 'log.profile_steps=[10,12]'
python benchmarks/trainer_gaps.py $W/gaps/profile_trace.json --top 15 | tee $OUT/trainer_gaps.txt
STEPS=40 train $W new_mb128 pldr-110m 128 $L
FROM=10 TO=40 summary $W new_mb128 | tee -a $OUT/trainer_syncs.txt
losses $W new_a prev_a new_b prev_b new_mb128 | tee -a $OUT/trainer_syncs.txt
