#!/usr/bin/env bash
# One device call: which of the fast path's new parts changes pldr-train's loss curve
# (pldr-110m, micro-batch 64, 12 steps). Each run uses a copy of the package with one part
# off by default (made where git is, carried as benchmarks/_v/NAME, gitignored):
#   for v in noloss norope nopad notanh; do mkdir -p benchmarks/_v/$v &&
#     git archive HEAD pldr_dist configs | tar -x -C benchmarks/_v/$v; done, then one sed each
#   bash benchmarks/gpu_trainer_bisect.sh $OUT      (needs deepspeed etc. on PYTHONPATH)
set -uo pipefail
OUT=${1:-/tmp/out}
mkdir -p $OUT
source benchmarks/gpu_trainer_lib.sh
W=/tmp/tbisect && rm -rf $W && mkdir -p $W
make_shards $W
for v in "$@"; do
  STEPS=12 train_copy benchmarks/_v/$v $W $v pldr-110m 64
  grep -E "^step" $W/$v.log | awk '{print $2, $4}' | paste -sd' '
done
