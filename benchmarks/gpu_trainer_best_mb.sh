#!/usr/bin/env bash
# One device call: pldr-train at the larger micro-batches the stand-alone sweep favoured
# (results/microbatch/): pldr-1b at 32, and pldr-110m at 128 against the package as of ae761ac
# (before the host-sync changes) in the same call.
#   bash benchmarks/gpu_trainer_best_mb.sh $OUT   (benchmarks/_prev: git archive ae761ac pldr_dist configs)
set -uo pipefail
OUT=${1:-/tmp/out}
mkdir -p $OUT
source benchmarks/gpu_trainer_lib.sh
W=/tmp/bestmb && rm -rf $W && mkdir -p $W
make_shards $W
L="--set log.every=5"
STEPS=40 train $W new_110m_mb128 pldr-110m 128 $L
STEPS=40 train_copy benchmarks/_prev $W prev_110m_mb128 pldr-110m 128 $L
STEPS=30 train $W new_1b_mb32 pldr-1b 32 $L
FROM=10 TO=40 summary $W new_110m_mb128 prev_110m_mb128 new_1b_mb32 | tee $OUT/trainer_best_mb.txt
