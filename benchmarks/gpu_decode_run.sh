#!/usr/bin/env bash
# One device call: GPU decode latency of pldr-110m in fp32 and bf16 (benchmarks/decode_speed.py,
# with the CUDA-graph modes), and a check that pldr_dist's generate() gives the same tokens with
# the graph-replayed static decoder as with the growing caches on the GPU.
#   bash benchmarks/gpu_decode_run.sh $OUT
set -euo pipefail
OUT=${1:-/tmp/out}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
python benchmarks/decode_speed.py --device cuda --lengths 128,512,1000 --steps 50 --out $OUT/decode_speed_gpu.txt 2>&1 | grep -v "^prompt"
python benchmarks/decode_speed.py --device cuda --dtype bf16 --lengths 128,512,1000 --steps 50 --out $OUT/decode_speed_gpu_bf16.txt 2>&1 | grep -v "^prompt"
python benchmarks/static_decode_check.py | tee $OUT/static_decode_gpu_check.txt
