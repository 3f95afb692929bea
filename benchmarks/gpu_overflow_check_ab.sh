#!/usr/bin/env bash
# One device call: pldr-train (pldr-110m, bf16, ZeRO-1, train.compile, micro-batch 64) with
# DeepSpeed's per-tensor bf16 overflow check on (DeepSpeed's default) and off (pldr_dist's
# generated config: ClippedAdamW checks the flat partition once). Same machine, same call.
#   bash benchmarks/gpu_overflow_check_ab.sh $OUT
set -uo pipefail
OUT=${1:-/tmp/out}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
W=/tmp/ab_run && rm -rf $W && mkdir -p $W
python -m pldr_dist.data.shard_writer data/tinyshakespeare.txt \
  --tokenizer data/reference/refinedweb-tokenizer-pldrllm-paper.model --out $W/shards --seq-len 1023 \
  --samples-per-shard 32 2>&1 | tail -1
python - <<'PY'
import json
from pldr_dist.parallel.engine import make_ds_config
for on in (True, False):
    c = make_ds_config(micro_batch_size=64, grad_accum_steps=1, dp=1, zero_stage=1, precision="bf16")
    c["bf16"]["check_grad_overflow"] = on
    json.dump(c, open(f"/tmp/ab_run/ds_{'on' if on else 'off'}.json", "w"))
PY
for check in on off; do
  python -m pldr_dist.train --config configs/pldr-110m.yaml --set run_dir=$W/$check \
    --set data.shards=$W/shards/manifest.json --set train.steps=${STEPS:-25} --set log.every=1 --set eval.every=0 \
    --set checkpoint.every=0 --set optim.warmup_steps=5 --set data.num_workers=2 --set train.compile=true \
    --set train.micro_batch_size=64 --set deepspeed_config=$W/ds_$check.json > $W/$check.log 2>&1
  echo "overflow check $check: exit $?"
done
python - "$W" <<'PY' | tee $OUT/overflow_check_ab.txt
import json, statistics, sys, torch
W = sys.argv[1]
print(f"# {torch.cuda.get_device_name()}: pldr-train pldr-110m bf16 ZeRO-1 compiled, micro-batch 64, median of steps 8-25")
for check in ("on", "off"):
    rows = [json.loads(l) for l in open(f"{W}/{check}/metrics.jsonl")]
    rows = [r for r in rows if "tokens_per_s" in r and r["step"] >= 8]
    med = lambda k: statistics.median(r[k] for r in rows)
    print(f"DeepSpeed bf16 overflow check {check:>3}: {med('tokens_per_s'):>9,.0f} tokens/s, MFU {100 * med('mfu'):.1f}%, "
          f"step {1000 * med('step_time_s'):.0f} ms, loss@{rows[-1]['step']} {rows[-1]['loss']:.4f}")
PY
