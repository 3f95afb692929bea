#!/usr/bin/env bash
# One device call: the real trainer (pldr-train, DeepSpeed, bf16) on one GPU with the pldr-110m
# preset on the bundled corpus tokenised with the paper's tokenizer (S = 1023), then GPU decode speed. Usage on the device machine, from the repo root:
#   bash benchmarks/gpu_trainer_run.sh $OUT
set -euo pipefail
OUT=${1:-/tmp/out}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
W=/tmp/gpu_run && rm -rf $W && mkdir -p $W
python -m pldr_dist.data.shard_writer data/tinyshakespeare.txt \
  --tokenizer data/reference/refinedweb-tokenizer-pldrllm-paper.model --out $W/shards --seq-len 1023 \
  --samples-per-shard 32 2>&1 | tail -3
for mode in eager; do
  python -m pldr_dist.train --config configs/pldr-110m.yaml --set run_dir=$W/$mode \
    --set data.shards=$W/shards/manifest.json --set train.steps=${STEPS:-120} \
    --set log.every=10 --set eval.every=60 --set eval.batches=2 --set checkpoint.every=0 \
    --set optim.warmup_steps=20 --set data.num_workers=1 2>&1 | grep -v "Warning\|warn(" | tail -16 | tee $OUT/trainer_$mode.log
  cp $W/$mode/metrics.jsonl $OUT/metrics_$mode.jsonl
done
python benchmarks/decode_speed.py --device cuda --lengths 128,512,1000 --steps 20 --out $OUT/decode_speed_gpu.txt 2>&1 | tail -14
