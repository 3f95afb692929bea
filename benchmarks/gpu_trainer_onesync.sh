#!/usr/bin/env bash
# One device call: pldr-train (pldr-110m, micro-batch 64) with the optimizer's own finite check
# off under BF16_Optimizer (one host sync per step left, DeepSpeed's) against the package as of
# ae761ac, alternating, logging every 5 steps; then a profiled run attributing the GPU's idle time
# to the step's host phases.
#   bash benchmarks/gpu_trainer_onesync.sh $OUT   (benchmarks/_prev: git archive ae761ac pldr_dist configs)
set -uo pipefail
OUT=${1:-/tmp/out}
mkdir -p $OUT
source benchmarks/gpu_trainer_lib.sh
W=/tmp/onesync && rm -rf $W && mkdir -p $W
make_shards $W
L="--set log.every=5"
STEPS=40 ab_runs $W pldr-110m 64 $L
FROM=10 TO=40 summary $W new_a prev_a new_b prev_b | tee $OUT/trainer_onesync.txt
losses $W new_a prev_a new_b prev_b | tee -a $OUT/trainer_onesync.txt
STEPS=14 train $W phases pldr-110m 64 $L --set 'log.profile_steps=[10,12]'
python benchmarks/trainer_gaps.py $W/phases/profile_trace.json --top 8 | tee $OUT/trainer_phases_onesync.txt
