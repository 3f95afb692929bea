#!/usr/bin/env bash
# One device call, the GLU kernels as now shipped (pipelined one-wave weight-gradient kernel,
# one partial-sum kernel):
# 1. the whole op against the previous kernels (commit a4edc8f), glu_variants.py --op-only;
# 2. glu_kernel_bench.py: numerics vs fp64, GPU time vs compiled PyTorch, training steps of
#    pldr-110m (micro-batch 64) and pldr-1b (16) with the kernel, the compiled PyTorch GLU and
#    G = I, each model's three runs in this one call; a profile of the pldr-110m step.
#   bash benchmarks/gpu_glu_kernel_v2.sh $OUT
set -uo pipefail
# the previous kernels, for comparison (run where git is, before the call; see glu_variants.py):
#   git show a4edc8f:pldr_dist/model/glu_kernel.py | sed 's/"pldr::/"pldr_old::/' > benchmarks/_previous_glu_kernel.py
OUT=${1:-/tmp/out}
export PYTHONPATH=$PWD:$PWD/benchmarks PYTHONUNBUFFERED=1
python benchmarks/glu_variants.py --op-only --out $OUT 2>&1 | grep -v -i warn
python benchmarks/glu_kernel_bench.py --out $OUT 2>&1 | grep -v -i warn | grep -v "^  "
