#!/usr/bin/env bash
# One device call: pldr-train as shipped for GPUs (compiled layers + CUDA graphs + compiled
# loss), PLGA against the same model with G fixed to the identity (model.mode=v510G: the plain
# attention upper bound inside the real trainer; it still multiplies q by G = I; v510G failed
# in bf16 in gpu_trainer_loss.sh, fixed since), for pldr-110m at micro-batch 64 and 128 and
# pldr-1b at 16. Same machine, same call.
#   bash benchmarks/gpu_trainer_identity.sh $OUT
set -uo pipefail
OUT=${1:-/tmp/out}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
W=/tmp/identity_run && rm -rf $W && mkdir -p $W
python -m pldr_dist.data.shard_writer data/tinyshakespeare.txt \
  --tokenizer data/reference/refinedweb-tokenizer-pldrllm-paper.model --out $W/shards --seq-len 1023 \
  --samples-per-shard 32 2>&1 | tail -1
run() {  # name, config, micro-batch, extra --set args...
  local name=$1 config=$2 mb=$3; shift 3
  python -m pldr_dist.train --config configs/$config.yaml --set run_dir=$W/$name \
    --set data.shards=$W/shards/manifest.json --set train.steps=${STEPS:-30} --set log.every=1 --set eval.every=0 \
    --set checkpoint.every=0 --set optim.warmup_steps=5 --set data.num_workers=2 --set train.compile=true \
    --set train.micro_batch_size=$mb "$@" > $W/$name.log 2>&1
  local rc=$?; echo "$name: exit $rc"; grep -E "Error|error" $W/$name.log | grep -v Warning | tail -3
  cp $W/$name.log $OUT/$name.log; [ -f $W/$name/profile.txt ] && cp $W/$name/profile.txt $OUT/profile_$name.txt
  return $rc
}
for mb in 64 128; do
  run 110m_mb$mb pldr-110m $mb
  run 110m_mb${mb}_identity pldr-110m $mb --set model.overrides.mode=v510G
done
run 1b_mb16 pldr-1b 16
run 1b_mb16_identity pldr-1b 16 --set model.overrides.mode=v510G
python - "$W" <<'PY' | tee $OUT/trainer_identity.txt
import json, os, statistics, sys, torch
W = sys.argv[1]
print(f"# {torch.cuda.get_device_name()}: pldr-train, bf16 ZeRO-1, compiled layers + CUDA graphs + compiled loss, S=1023, median of steps 8-20")
for name in ("110m_mb64", "110m_mb64_identity", "110m_mb128", "110m_mb128_identity", "1b_mb16", "1b_mb16_identity"):
    path = f"{W}/{name}/metrics.jsonl"
    if not os.path.isfile(path):
        print(f"{name:<20} failed"); continue
    rows = [json.loads(l) for l in open(path)]
    steady = [r for r in rows if "tokens_per_s" in r and 8 <= r["step"] <= 20]
    med = lambda k: statistics.median(r[k] for r in steady)
    print(f"{name:<20} {med('tokens_per_s'):>9,.0f} tokens/s  {med('tflops_per_device'):6.1f} TFLOP/s  MFU {100 * med('mfu'):4.1f}%  "
          f"step {1000 * med('step_time_s'):5.0f} ms  mem {max(r['memory_mib'] for r in steady):6.0f} MiB  loss@{rows[-1]['step']} {rows[-1]['loss']:.4f}")
PY
