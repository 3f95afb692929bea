#!/usr/bin/env bash
# One device call: pldr-train (pldr-110m, micro-batch 64, compiled, CUDA graphs, Triton GLUs)
# with the next batch built during the backward pass (BatchesAhead.prepare, shipped) and
# without it (a copy of this tree with the prepare() call removed), twice each, alternating;
# then the GPU's idle gaps in a profile of steps 22-24 of the last shipped run.
#   bash benchmarks/gpu_trainer_prefetch_ab.sh $OUT     (needs deepspeed etc. on PYTHONPATH)
set -uo pipefail
OUT=${1:-/tmp/out}
mkdir -p $OUT
NEW=$PWD OLD=/tmp/no_prefetch
rm -rf $OLD && cp -r $NEW $OLD && sed -i 's/^\( *\)batches.prepare()$/\1pass/' $OLD/pldr_dist/train/build.py
grep -c "batches.prepare()" $NEW/pldr_dist/train/build.py $OLD/pldr_dist/train/build.py
source benchmarks/gpu_trainer_lib.sh
W=/tmp/prefetch_ab && rm -rf $W && mkdir -p $W
make_shards $W
export STEPS=25
SITE=$PYTHONPATH
for round in 1 2; do
  extra=(); [ $round = 2 ] && extra=(--set 'log.profile_steps=[22,24]')
  PYTHONPATH=$NEW:$SITE train $W ahead_$round pldr-110m 64 "${extra[@]}"
  (cd $OLD && PYTHONPATH=$OLD:$SITE train $W plain_$round pldr-110m 64)
done
summary $W ahead_1 plain_1 ahead_2 plain_2 | tee $OUT/trainer_prefetch_ab.txt
python benchmarks/trainer_gaps.py $W/ahead_2/profile_trace.json --top 8 | tee $OUT/trainer_gaps_ahead.txt
