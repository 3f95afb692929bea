#!/usr/bin/env bash
# One device call: prototype persistent forward / input-gradient GLU kernels (weights loaded
# once per program; benchmarks/glu_persistent_proto.py) against the shipped ones, and the
# whole op with the one-wave weight-gradient kernel (glu_variants.py).
#   bash benchmarks/gpu_glu_persistent.sh $OUT
set -uo pipefail
OUT=${1:-/tmp/out}
export PYTHONPATH=$PWD:$PWD/benchmarks PYTHONUNBUFFERED=1
python benchmarks/glu_variants.py --persistent --out $OUT 2>&1 | grep -v -i warn
