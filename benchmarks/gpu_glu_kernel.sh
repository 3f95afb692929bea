#!/usr/bin/env bash
# One device call: the Triton metric-learner GLU (pldr_dist/model/glu_kernel.py).
# 1. pldr-train as shipped for GPUs (kernel on by default), pldr-110m micro-batch 64, 25 steps:
#    does it run under DeepSpeed bf16 + contiguous gradients + CUDA graphs, and how fast.
# 2. benchmarks/glu_kernel_bench.py: GLU numerics and GPU time, training steps with and
#    without the kernel against G = I, profile.
#   bash benchmarks/gpu_glu_kernel.sh $OUT
set -uo pipefail
OUT=${1:-/tmp/out}
mkdir -p $OUT
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
W=/tmp/glu_run && rm -rf $W && mkdir -p $W
python -m pldr_dist.data.shard_writer data/tinyshakespeare.txt \
  --tokenizer data/reference/refinedweb-tokenizer-pldrllm-paper.model --out $W/shards --seq-len 1023 \
  --samples-per-shard 32 2>&1 | tail -1
python -m pldr_dist.train --config configs/pldr-110m.yaml --set run_dir=$W/110m_mb64 \
  --set data.shards=$W/shards/manifest.json --set train.steps=25 --set log.every=1 --set eval.every=0 \
  --set checkpoint.every=0 --set optim.warmup_steps=5 --set data.num_workers=2 --set train.compile=true \
  --set train.micro_batch_size=64 > $OUT/trainer_110m_mb64.log 2>&1
echo "pldr-train exit $?"; grep -E "^step (1|5|10|15|20|25)/|Error|done" $OUT/trainer_110m_mb64.log | tail -8
python benchmarks/glu_kernel_bench.py --out $OUT 2>&1 | grep -v -i warn | grep -v "^  "
