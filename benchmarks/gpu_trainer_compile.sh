#!/usr/bin/env bash
# One device call: the real trainer (pldr-train: DeepSpeed ZeRO-1, bf16, pldr-110m, S = 1023) on
# one GPU, eager vs train.compile=true (fused metric-learner GLUs + per-layer torch.compile), and
# compiled at a larger micro-batch. Prints each run's steady tokens/s, MFU and peak memory.
#   bash benchmarks/gpu_trainer_compile.sh $OUT
set -uo pipefail
OUT=${1:-/tmp/out}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
W=/tmp/compile_run && rm -rf $W && mkdir -p $W
python -m pldr_dist.data.shard_writer data/tinyshakespeare.txt \
  --tokenizer data/reference/refinedweb-tokenizer-pldrllm-paper.model --out $W/shards --seq-len 1023 \
  --samples-per-shard 32 2>&1 | tail -1
run() {  # name, extra --set args...
  local name=$1; shift
  echo "== $name"
  python -m pldr_dist.train --config configs/pldr-110m.yaml --set run_dir=$W/$name \
    --set data.shards=$W/shards/manifest.json --set train.steps=${STEPS:-40} --set log.every=5 --set eval.every=0 \
    --set checkpoint.every=0 --set optim.warmup_steps=10 --set data.num_workers=2 "$@" > $W/$name.log 2>&1
  echo "exit $?"; grep -E "^step|done|Error|error" $W/$name.log | grep -v Warning | tail -4
  cp $W/$name.log $OUT/trainer_$name.log
  [ -f $W/$name/metrics.jsonl ] && cp $W/$name/metrics.jsonl $OUT/metrics_$name.jsonl
}
run eager_mb16
run compile_mb16 --set train.compile=true
run compile_mb64 --set train.compile=true --set train.micro_batch_size=64
python - "$W" <<'PY' | tee $OUT/trainer_compile_summary.txt
import json, os, statistics, sys, torch
W = sys.argv[1]
print(f"# pldr-train on {torch.cuda.get_device_name()}: pldr-110m, bf16, ZeRO-1, S=1023, 40 steps; steady = median of steps > 10")
print(f"{'run':<14} {'tokens/s':>10} {'TFLOP/s':>8} {'MFU':>6} {'mem MiB':>8} {'loss@40':>8}")
for name in ("eager_mb16", "compile_mb16", "compile_mb64"):
    path = f"{W}/{name}/metrics.jsonl"
    if not os.path.isfile(path):
        print(f"{name:<14} failed (see trainer_{name}.log)"); continue
    rows = [json.loads(l) for l in open(path)]
    rows = [r for r in rows if "tokens_per_s" in r and r["step"] > 10]
    if not rows:
        print(f"{name:<14} no steady steps"); continue
    med = lambda k: statistics.median(r[k] for r in rows)
    print(f"{name:<14} {med('tokens_per_s'):>10,.0f} {med('tflops_per_device'):>8.1f} {100 * med('mfu'):>5.1f}% "
          f"{max(r['memory_mib'] for r in rows):>8.0f} {rows[-1]['loss']:>8.4f}")
PY
