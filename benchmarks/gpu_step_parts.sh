#!/usr/bin/env bash
# One device call: what the rotary table, the padded feed-forward, the fused head + loss and
# the GLU kernels' tanh sigmoid each give to the stand-alone step (step_parts_ab.py), with
# their numerics, and profiles of the step with all of them (PLGA and G = I).
#   bash benchmarks/gpu_step_parts.sh $OUT [MODELS] [extra step_parts_ab.py args]
set -uo pipefail
OUT=${1:-/tmp/out}
MODELS=${2:-pldr-110m:64}
shift 2 2>/dev/null || shift $#
export PYTHONPATH=$PWD:$PWD/benchmarks PYTHONUNBUFFERED=1
python benchmarks/step_parts_ab.py --out $OUT --models $MODELS "$@" 2>&1 | grep -v -i warn | grep -v "^  "
