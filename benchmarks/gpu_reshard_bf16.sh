#!/usr/bin/env bash
# One device call (nvidia-h100-x1): pldr-reshard's bf16 path on the GPU. The real trainer
# (pldr-110m, bf16, ZeRO-1) runs 30 steps with a checkpoint at 15 (run A); the step-15 checkpoint
# is resumed twice: as DeepSpeed wrote it (run B, the ordinary resume) and after pldr-reshard
# (run C, the portable checkpoint through safe_set_full_fp32_param / _optimizer_state). C's
# losses must equal B's as closely as B's equal A's (GPU kernels are not bit-deterministic).
#   bash benchmarks/gpu_reshard_bf16.sh $OUT
set -euo pipefail
OUT=${1:-/tmp/out}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
W=/tmp/reshard_run && rm -rf $W && mkdir -p $W
python -m pldr_dist.data.shard_writer data/tinyshakespeare.txt \
  --tokenizer data/reference/refinedweb-tokenizer-pldrllm-paper.model --out $W/shards --seq-len 1023 \
  --samples-per-shard 32 2>&1 | tail -2
train() {  # run_dir, extra args...
  local dir=$1; shift
  python -m pldr_dist.train --config configs/pldr-110m.yaml --set run_dir=$dir \
    --set data.shards=$W/shards/manifest.json --set train.steps=30 --set log.every=1 --set eval.every=0 \
    --set checkpoint.every=15 --set checkpoint.keep=5 --set optim.warmup_steps=5 --set data.num_workers=1 "$@" \
    2>&1 | grep -v "Warning\|warn(" | grep -E "resumed|step (1|15|16|30)/|done|error|Error" || true
}
echo "== A: 30 steps"; train $W/A
mkdir -p $W/B/checkpoints && cp -r $W/A/checkpoints/step_00000015 $W/B/checkpoints/ && echo step_00000015 > $W/B/checkpoints/latest
echo "== B: DeepSpeed resume from step 15"; train $W/B
echo "== C: pldr-reshard step 15, then resume"
python -m pldr_dist.convert.reshard $W/A/checkpoints/step_00000015 $W/C
train $W/C
python - "$W" <<'EOF' | tee $OUT/gpu_reshard_bf16.txt
import json, sys, torch
W = sys.argv[1]
def losses(run):
    return {r["step"]: r["loss"] for r in map(json.loads, open(f"{W}/{run}/metrics.jsonl")) if "loss" in r}
a, b, c = losses("A"), losses("B"), losses("C")
print(f"# pldr-reshard bf16 on {torch.cuda.get_device_name()} (pldr-110m, ZeRO-1, micro-batch 16, S=1023)")
print("step   A (no restart)   B (DeepSpeed resume)   C (pldr-reshard resume)   |B-A|     |C-B|")
for s in range(16, 31):
    print(f"{s:4d}   {a[s]:.6f}         {b[s]:.6f}               {c[s]:.6f}                  {abs(b[s]-a[s]):.1e}   {abs(c[s]-b[s]):.1e}")
db = max(abs(b[s] - a[s]) for s in range(16, 31)); dc = max(abs(c[s] - b[s]) for s in range(16, 31))
print(f"max |B-A| = {db:.2e} (GPU non-determinism), max |C-B| = {dc:.2e}")
EOF
