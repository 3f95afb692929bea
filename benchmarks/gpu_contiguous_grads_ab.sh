#!/usr/bin/env bash
# One device call: pldr-train (pldr-110m, bf16, ZeRO-1, train.compile, S = 1023) with the three
# gradient paths DeepSpeed offers for bf16 ZeRO-1, same machine, same call:
#   zero1_bf16acc   DeepSpeed's default: its ZeRO-1 optimizer, gradients accumulated in bf16
#                   (what pldr_dist generated before)
#   bf16opt         data_types.grad_accum_dtype=fp32 -> DeepSpeed's BF16_Optimizer, per-parameter
#   contiguous      the same + pldr_dist's contiguous gradient buffer (the default now)
# then a torch.profiler summary of the contiguous run.
#   bash benchmarks/gpu_contiguous_grads_ab.sh $OUT
set -uo pipefail
OUT=${1:-/tmp/out}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
W=/tmp/cg_run && rm -rf $W && mkdir -p $W
python -m pldr_dist.data.shard_writer data/tinyshakespeare.txt \
  --tokenizer data/reference/refinedweb-tokenizer-pldrllm-paper.model --out $W/shards --seq-len 1023 \
  --samples-per-shard 32 2>&1 | tail -1
python - <<'PY'
import json
from pldr_dist.parallel.engine import make_ds_config
for mb in (16, 64):
    c = make_ds_config(micro_batch_size=mb, grad_accum_steps=1, dp=1, zero_stage=1, precision="bf16")
    json.dump(c, open(f"/tmp/cg_run/ds_fp32acc_{mb}.json", "w"))
    del c["data_types"]
    json.dump(c, open(f"/tmp/cg_run/ds_bf16acc_{mb}.json", "w"))
PY
TRAIN='import sys, pldr_dist.parallel.engine as e
if sys.argv[1] == "off": e.use_contiguous_grads = lambda optimizer: None
from pldr_dist.train.trainer import main
sys.exit(main(sys.argv[2:]))'
run() {  # name, contiguous on|off, ds config, micro-batch, extra --set args...
  local name=$1 cg=$2 ds=$3 mb=$4; shift 4
  python -c "$TRAIN" $cg --config configs/pldr-110m.yaml --set run_dir=$W/$name \
    --set data.shards=$W/shards/manifest.json --set train.steps=${STEPS:-30} --set log.every=1 --set eval.every=0 \
    --set checkpoint.every=0 --set optim.warmup_steps=5 --set data.num_workers=2 --set train.compile=true \
    --set train.micro_batch_size=$mb --set deepspeed_config=$W/$ds "$@" > $W/$name.log 2>&1
  echo "$name: exit $?"; grep -E "Error|error" $W/$name.log | grep -v Warning | tail -3
  cp $W/$name.log $OUT/$name.log
}
run zero1_bf16acc_mb64 off ds_bf16acc_64.json 64
run bf16opt_mb64 off ds_fp32acc_64.json 64
run contiguous_mb64 on ds_fp32acc_64.json 64
run zero1_bf16acc_mb16 off ds_bf16acc_16.json 16
run contiguous_mb16 on ds_fp32acc_16.json 16 --set "log.profile_steps=[21,23]"
cp $W/contiguous_mb16/profile.txt $OUT/profile_contiguous_mb16.txt 2>/dev/null
python - "$W" <<'PY' | tee $OUT/contiguous_grads_ab.txt
import json, os, statistics, sys, torch
W = sys.argv[1]
print(f"# {torch.cuda.get_device_name()}: pldr-train pldr-110m bf16 ZeRO-1 compiled, S=1023, median of steps 8-20")
for name in ("zero1_bf16acc_mb64", "bf16opt_mb64", "contiguous_mb64", "zero1_bf16acc_mb16", "contiguous_mb16"):
    path = f"{W}/{name}/metrics.jsonl"
    if not os.path.isfile(path):
        print(f"{name:<20} failed"); continue
    rows = [json.loads(l) for l in open(path)]
    rows = [r for r in rows if "tokens_per_s" in r and 8 <= r["step"] <= 20]
    med = lambda k: statistics.median(r[k] for r in rows)
    losses = " ".join(f"{r['loss']:.4f}" for r in rows[:3])
    print(f"{name:<20} {med('tokens_per_s'):>9,.0f} tokens/s  MFU {100 * med('mfu'):4.1f}%  step {1000 * med('step_time_s'):4.0f} ms  "
          f"mem {max(r['memory_mib'] for r in rows):6.0f} MiB  losses@8-10 {losses}")
PY
