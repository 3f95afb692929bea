#!/usr/bin/env bash
# One device call: the Triton GLU kernels' launch configurations against the previous kernels
# (benchmarks/glu_variants.py), then the pldr-110m micro-batch-64 training step with the new
# kernels, the compiled PyTorch GLU and G = I, and profiles of the PLGA and G = I steps
# (glu_kernel_bench.py --steps-only --profile).
#   bash benchmarks/gpu_glu_variants.sh $OUT
set -uo pipefail
# the previous kernels, for comparison (run where git is, before the call; see glu_variants.py):
#   git show a4edc8f:pldr_dist/model/glu_kernel.py | sed 's/"pldr::/"pldr_old::/' > benchmarks/_previous_glu_kernel.py
OUT=${1:-/tmp/out}
mkdir -p $OUT
export PYTHONPATH=$PWD:$PWD/benchmarks PYTHONUNBUFFERED=1
python benchmarks/glu_variants.py --out $OUT 2>&1 | grep -v -i warn
python benchmarks/glu_kernel_bench.py --out $OUT --steps-only --profile --models pldr-110m:64 2>&1 | grep -v -i warn | grep -v "^  "
