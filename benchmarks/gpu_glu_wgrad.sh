#!/usr/bin/env bash
# One device call: the weight-gradient kernel's hidden chunk, row block, warps and programs
# per chunk, with the partial-sum kernel (benchmarks/glu_variants.py --wgrad).
#   bash benchmarks/gpu_glu_wgrad.sh $OUT
set -uo pipefail
OUT=${1:-/tmp/out}
export PYTHONPATH=$PWD:$PWD/benchmarks PYTHONUNBUFFERED=1
python benchmarks/glu_variants.py --wgrad --out $OUT 2>&1 | grep -v -i warn
