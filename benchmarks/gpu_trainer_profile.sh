#!/usr/bin/env bash
# One device call: where pldr-train's step time goes on one GPU (pldr-110m, bf16, ZeRO-1,
# micro-batch 16): log.profile_steps over three steady steps, eager and train.compile=true.
#   bash benchmarks/gpu_trainer_profile.sh $OUT
set -uo pipefail
OUT=${1:-/tmp/out}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
W=/tmp/profile_run && rm -rf $W && mkdir -p $W
python -m pldr_dist.data.shard_writer data/tinyshakespeare.txt \
  --tokenizer data/reference/refinedweb-tokenizer-pldrllm-paper.model --out $W/shards --seq-len 1023 \
  --samples-per-shard 32 2>&1 | tail -1
for name in eager compile; do
  python -m pldr_dist.train --config configs/pldr-110m.yaml --set run_dir=$W/$name \
    --set data.shards=$W/shards/manifest.json --set train.steps=14 --set log.every=1 --set eval.every=0 \
    --set checkpoint.every=0 --set optim.warmup_steps=5 --set data.num_workers=2 \
    --set "log.profile_steps=[11,13]" $([ $name = compile ] && echo --set train.compile=true) > $W/$name.log 2>&1
  echo "== $name: exit $?"; grep -E "^step 1[0-4]/" $W/$name.log | cut -c1-110
  cp $W/$name/profile.txt $OUT/profile_$name.txt
  head -22 $W/$name/profile.txt | cut -c1-60,100-175
done
