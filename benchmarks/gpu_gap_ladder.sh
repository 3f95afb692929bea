#!/usr/bin/env bash
# One device call (one H100): where PLGA's gap to G = I goes (gap_ladder.py: the deductive
# path's parts removed one at a time, stand-alone step), pldr-110m at micro-batch 128 with the
# two probes of the shared parts (coordinate-descent tuning, bf16 residual stream), then
# pldr-1b at micro-batch 32 without the probes.
#   bash benchmarks/gpu_gap_ladder.sh $OUT
set -uo pipefail
OUT=${1:-/tmp/out}
mkdir -p $OUT
export PYTHONPATH=$PWD:$PWD/benchmarks:${PYTHONPATH:-} PYTHONUNBUFFERED=1
python benchmarks/gap_ladder.py --out $OUT --models pldr-110m:128 2>&1 | grep -v -i warn | grep -v "^  "
python benchmarks/gap_ladder.py --out $OUT --models pldr-1b:32 --no-probes 2>&1 | grep -v -i warn | grep -v "^  "
