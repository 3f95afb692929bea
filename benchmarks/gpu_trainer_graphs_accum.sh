#!/usr/bin/env bash
# One device call: the CUDA-graph trainer path with gradient accumulation (2 micro-batches per
# step), validation every 5 steps (no-grad forwards through the graphed layers), G_LM stats and
# a checkpoint + resume, against the same run without graphs. pldr-110m, bf16 ZeRO-1, mb 16.
#   bash benchmarks/gpu_trainer_graphs_accum.sh $OUT
set -uo pipefail
OUT=${1:-/tmp/out}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
W=/tmp/accum_run && rm -rf $W && mkdir -p $W
python -m pldr_dist.data.shard_writer data/tinyshakespeare.txt \
  --tokenizer data/reference/refinedweb-tokenizer-pldrllm-paper.model --out $W/shards --seq-len 1023 \
  --samples-per-shard 32 --valid-fraction 0.2 2>&1 | tail -1
TRAIN='import sys, pldr_dist.model.fast as fast
if sys.argv[1] == "nographs":
    original = fast.optimize_for_training
    fast.optimize_for_training = lambda *a, **k: original(*a, **{**k, "cuda_graphs": False})
from pldr_dist.train.trainer import main
sys.exit(main(sys.argv[2:]))'
run() {  # name, graphs|nographs, steps
  python -c "$TRAIN" $2 --config configs/pldr-110m.yaml --set run_dir=$W/$1 \
    --set data.shards=$W/shards/manifest.json --set train.steps=$3 --set log.every=1 --set eval.every=5 \
    --set eval.batches=2 --set checkpoint.every=10 --set optim.warmup_steps=5 --set data.num_workers=2 \
    --set train.compile=true --set train.micro_batch_size=16 --set train.grad_accum_steps=2 \
    --set log.g_stats_every=5 > $W/$1_$3.log 2>&1
  echo "$1 ($3 steps): exit $?"; grep -E "Error|error" $W/$1_$3.log | grep -v Warning | tail -3
  cp $W/$1_$3.log $OUT/
}
run graphs graphs 10
run graphs graphs 20          # resumes from step 10
run nographs nographs 20
python - "$W" <<'PY' | tee $OUT/trainer_graphs_accum.txt
import json, sys, torch
W = sys.argv[1]
print(f"# {torch.cuda.get_device_name()}: pldr-110m bf16 ZeRO-1 compiled, mb16 x 2 accumulated, eval every 5")
rows = {n: [json.loads(l) for l in open(f"{W}/{n}/metrics.jsonl")] for n in ("graphs", "nographs")}
for key in ("loss", "val_loss", "g_dist/layer_0"):
    for n, rs in rows.items():
        vals = {r["step"]: r[key] for r in rs if key in r}
        print(f"{key:<15} {n:<9} " + " ".join(f"{s}:{v:.4f}" for s, v in sorted(vals.items()) if s in (1, 2, 3, 5, 10, 11, 15, 20)))
PY
