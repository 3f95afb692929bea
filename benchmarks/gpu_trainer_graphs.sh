#!/usr/bin/env bash
# One device call: pldr-train (pldr-110m, bf16, ZeRO-1, train.compile, S = 1023) as shipped now
# (BF16_Optimizer + contiguous gradients + fused AdamW) with and without CUDA graphs for the
# compiled layers, at micro-batch 16 and 64, against the previous default (DeepSpeed's ZeRO-1
# optimizer with bf16 gradient accumulation) in the same call. One graph run also collects
# G_LM statistics (log.g_stats_every=10) to exercise that path under graphs.
#   bash benchmarks/gpu_trainer_graphs.sh $OUT
set -uo pipefail
OUT=${1:-/tmp/out}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
W=/tmp/graph_run && rm -rf $W && mkdir -p $W
python -m pldr_dist.data.shard_writer data/tinyshakespeare.txt \
  --tokenizer data/reference/refinedweb-tokenizer-pldrllm-paper.model --out $W/shards --seq-len 1023 \
  --samples-per-shard 32 2>&1 | tail -1
python - <<'PY'
import json
from pldr_dist.parallel.engine import make_ds_config
c = make_ds_config(micro_batch_size=64, grad_accum_steps=1, dp=1, zero_stage=1, precision="bf16")
del c["data_types"]
json.dump(c, open("/tmp/graph_run/ds_bf16acc_64.json", "w"))
PY
TRAIN='import sys, pldr_dist.model.fast as fast
if sys.argv[1] == "nographs":
    original = fast.optimize_for_training
    fast.optimize_for_training = lambda *a, **k: original(*a, **{**k, "cuda_graphs": False})
from pldr_dist.train.trainer import main
sys.exit(main(sys.argv[2:]))'
run() {  # name, graphs|nographs, micro-batch, extra --set args...
  local name=$1 graphs=$2 mb=$3; shift 3
  python -c "$TRAIN" $graphs --config configs/pldr-110m.yaml --set run_dir=$W/$name \
    --set data.shards=$W/shards/manifest.json --set train.steps=${STEPS:-30} --set log.every=1 --set eval.every=0 \
    --set checkpoint.every=0 --set optim.warmup_steps=5 --set data.num_workers=2 --set train.compile=true \
    --set train.micro_batch_size=$mb "$@" > $W/$name.log 2>&1
  echo "$name: exit $?"; grep -E "Error|error" $W/$name.log | grep -v Warning | tail -3
  cp $W/$name.log $OUT/$name.log
}
run previous_default_mb64 nographs 64 --set deepspeed_config=$W/ds_bf16acc_64.json
run nographs_mb64 nographs 64
run graphs_mb64 graphs 64
run nographs_mb16 nographs 16
run graphs_mb16 graphs 16 --set log.g_stats_every=10 --set "log.profile_steps=[21,23]"
cp $W/graphs_mb16/profile.txt $OUT/profile_graphs_mb16.txt 2>/dev/null
python - "$W" <<'PY' | tee $OUT/trainer_graphs.txt
import json, os, statistics, sys, torch
W = sys.argv[1]
print(f"# {torch.cuda.get_device_name()}: pldr-train pldr-110m bf16 ZeRO-1 compiled, S=1023, median of steps 8-20")
for name in ("previous_default_mb64", "nographs_mb64", "graphs_mb64", "nographs_mb16", "graphs_mb16"):
    path = f"{W}/{name}/metrics.jsonl"
    if not os.path.isfile(path):
        print(f"{name:<22} failed"); continue
    rows = [json.loads(l) for l in open(path)]
    steady = [r for r in rows if "tokens_per_s" in r and 8 <= r["step"] <= 20]
    med = lambda k: statistics.median(r[k] for r in steady)
    losses = " ".join(f"{r['loss']:.5f}" for r in rows if "loss" in r and r["step"] <= 5)
    g = sum(1 for r in rows if any(k.startswith("g_") or "G" in k for k in r))
    print(f"{name:<22} {med('tokens_per_s'):>9,.0f} tokens/s  MFU {100 * med('mfu'):4.1f}%  step {1000 * med('step_time_s'):4.0f} ms  "
          f"mem {max(r['memory_mib'] for r in steady):6.0f} MiB  losses@1-5 {losses}  rows with G stats {g}")
PY
