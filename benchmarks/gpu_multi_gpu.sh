#!/usr/bin/env bash
# Device calls on one nvidia-h100-x2 machine: pldr-train on 2 GPUs over NCCL in every parallel
# layout, launched as a user launches it (launch/torchrun_train.sh, launch/deepspeed_train.sh),
# against one GPU on the same global batch (32 sequences of 1024 tokens a step), bf16, on the
# same warm machine. The two one-GPU references (step refs) run side by side, one per GPU:
#   single        one GPU, compiled fast path (train.compile=true), micro-batch MB x 2 (or x 4)
#   single_eager  one GPU, eager: the reference for the layouts that cannot compile (TP, PP, ZeRO-3)
#   dp_z1         DP=2 ZeRO-1, compiled (torchrun)         dp_z2  DP=2 ZeRO-2, compiled (deepspeed)
#   dp_z3         DP=2 ZeRO-3, eager (torchrun)            tp     TP=2, eager (torchrun)
#   dp_z2_profile DP=2 ZeRO-2, compiled, profiled at steps 20-21   dp_z2_eager  DP=2 ZeRO-2, eager
#   tp_sp         TP=2 + sequence parallel (deepspeed)     pp     PP=2, 1F1B (torchrun)
#   tp_fast, tp_sp_fast, pp_fast: the same with train.compile=true (Triton GLUs, not compiled)
# 110m: also a TP=2 checkpoint consolidated to fp32 and decoded greedily on the GPU and the CPU
# (plain KV+G caches and the G-cache artifact): the tokens must be the same.
#   bash benchmarks/gpu_multi_gpu.sh 110m|1b $OUT STEP...   STEP: refs dp_z1 dp_z2 dp_z3 dp_z2_profile dp_z2_eager tp tp_sp pp
#   tp_fast tp_sp_fast pp_fast roundtrip (in that order; split over calls on one warm machine to keep each call short)
#   CPU dry run (tiny model, gloo): DRY=1 DS_ACCELERATOR=cpu bash ... 110m /tmp/out refs tp roundtrip
set -uo pipefail
PART=$1 OUT=${2:-/tmp/out}
mkdir -p $OUT
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1   # KINDS.md
source benchmarks/gpu_trainer_lib.sh
W=/tmp/multi_$PART && rm -rf $W && mkdir -p $W
TOKENIZER=data/reference/refinedweb-tokenizer-pldrllm-paper.model
make_shards $W 1024   # S = 1024: sequence parallelism splits it evenly over 2 ranks (1023 is refused)
case $PART in
  110m) CONFIG=pldr-110m STEPS=${STEPS:-150} WARMUP=${WARMUP:-30} MB=16 ACCUM=2 EAGER_MB=16 EAGER_ACCUM=2 LIMIT=170 ;;
  1b)   CONFIG=pldr-1b STEPS=${STEPS:-60} WARMUP=${WARMUP:-10} MB=16 ACCUM=2 EAGER_MB=8 EAGER_ACCUM=4 LIMIT=200 ;;
  *) echo "usage: $0 110m|1b OUT STEP..."; exit 2 ;;
esac
COMPILE=true EXTRA=()
if [ -n "${DRY:-}" ]; then   # the same runs, tiny: checks the script, not the GPUs
  STEPS=4 COMPILE=false LIMIT=300 GEN_DEVICES="cpu cpu"
  EXTRA=(--set model.overrides.num_layers=2 --set model.overrides.d_model=64 --set model.overrides.num_heads=4 --set model.overrides.head_dim=16
         --set model.overrides.d_ff=128 --set model.overrides.a_dff=32 --set model.overrides.num_residual_units=1
         --set train.precision=fp32)
fi
PORT=29400

# layout NAME HOW MB ACCUM COMPILE [--set k=v ...]: HOW = gpu0 | gpu1 (one process on that GPU)
# | torchrun | deepspeed (two processes through the launch script). Log in $W/NAME.log.
layout() {
  local name=$1 how=$2 mb=$3 accum=$4 compile=$5; shift 5
  local args=(--config configs/$CONFIG.yaml --set run_dir=$W/$name --set data.shards=$W/shards/manifest.json
    --set train.steps=$STEPS --set log.every=1 --set eval.every=0 --set optim.warmup_steps=$WARMUP --set optim.lr=${LR:-3e-4}
    --set data.num_workers=2 --set train.micro_batch_size=$mb --set train.grad_accum_steps=$accum
    --set train.compile=$compile --set checkpoint.tokenizer=$TOKENIZER --set checkpoint.at_end=false
    "${EXTRA[@]}" "$@")
  PORT=$((PORT + 1))
  local t0=$SECONDS
  case $how in
    gpu0|gpu1) CUDA_VISIBLE_DEVICES=${how#gpu} timeout $LIMIT python -m pldr_dist.train "${args[@]}" ;;
    torchrun) NPROC_PER_NODE=2 RDZV_ENDPOINT=127.0.0.1:$PORT timeout $LIMIT bash launch/torchrun_train.sh "${args[@]}" ;;
    deepspeed) NUM_GPUS=2 MASTER_PORT=$PORT timeout $LIMIT bash launch/deepspeed_train.sh "${args[@]}" ;;
  esac > $W/$name.log 2>&1
  local rc=$?
  echo "$name ($how): exit $rc after $((SECONDS - t0)) s"
  [ $rc = 0 ] || grep -E "Error|error" $W/$name.log | grep -v Warning | tail -4
}

# The TP=2 run's checkpoint -> fp32 consolidated folder -> greedy tokens on the GPU and on the CPU,
# with the KV+G caches and with the G-cache artifact (pldr-export-gcache): the same tokens.
roundtrip() {
  {
    python -m pldr_dist.convert.consolidate $W/tp/checkpoints $W/tp_fp32 --dtype fp32 2>&1 | tail -1
    python -c "from pldr_dist.infer.cli import export_gcache_main; export_gcache_main()" $W/tp_fp32 \
      $W/tp_gcache.safetensors 2>&1 | tail -1
    python - $W/prompts.txt $TOKENIZER <<'PY'
import sys
from pldr_dist.infer.tokenizer import load_tokenizer
tok = load_tokenizer(sys.argv[2])
lines = ["ROMEO:", "First Citizen:\nBefore we proceed", "KING RICHARD III:\nNow is the winter", "To be, or not",
         "JULIET:\nO Romeo", "MENENIUS:\nWhat work's, my countrymen", "The", "I pray you, sir,"]
with open(sys.argv[1], "w") as f:
    for text in lines:
        f.write(" ".join(map(str, tok.encode(text))) + "\n")
PY
    gen() { python -c "from pldr_dist.infer.cli import generate_main; generate_main()" $W/tp_fp32 --prompts $W/prompts.txt \
              --token-ids --max-new-tokens 48 --dtype fp32 "$@"; }
    for device in ${GEN_DEVICES:-cuda cpu}; do
      gen --device $device > $W/gen_kvg_$device.txt
      gen --device $device --gcache $W/tp_gcache.safetensors > $W/gen_gcache_$device.txt
    done
    python - $W <<'PY'
import os, sys
W = sys.argv[1]
gpu_name = "cuda" if os.path.isfile(f"{W}/gen_kvg_cuda.txt") else "cpu"   # dry run: CPU twice
for kind in ("kvg", "gcache"):
    gpu, cpu = (open(f"{W}/gen_{kind}_{d}.txt").read().splitlines() for d in (gpu_name, "cpu"))
    if not gpu or len(gpu) != len(cpu):
        print(f"{kind}: FAILED, {len(gpu)} GPU and {len(cpu)} CPU outputs"); continue
    same = sum(a == b for a, b in zip(gpu, cpu))
    print(f"{kind}: {same}/{len(gpu)} prompts give the same 48 greedy tokens on {gpu_name} and cpu "
          f"(fp32 consolidated TP=2 checkpoint)")
    for a, b in zip(gpu, cpu):
        if a != b:
            print("  GPU:", a, "\n  CPU:", b)
PY
  } 2>&1 | tee $OUT/roundtrip_$PART.txt
}

for step in ${@:3}; do
  case $step in
    refs)  # the two one-GPU references side by side, one per GPU
      layout single gpu0 $MB $ACCUM $COMPILE &
      layout single_eager gpu1 $EAGER_MB $EAGER_ACCUM false &
      wait ;;
    dp_z1) layout dp_z1 torchrun $MB 1 $COMPILE --set parallel.zero_stage=1 ;;
    dp_z2) layout dp_z2 deepspeed $MB 1 $COMPILE --set parallel.zero_stage=2 ;;
    dp_z3) layout dp_z3 torchrun $EAGER_MB $((EAGER_ACCUM / 2)) false --set parallel.zero_stage=3 ;;
    # why ZeRO-2 is slow: the compiled run profiled at steps 20-21 (rank 0), and an eager run
    dp_z2_profile) layout dp_z2_profile deepspeed $MB 1 $COMPILE --set parallel.zero_stage=2 --set "log.profile_steps=[20,21]" ;;
    dp_z2_eager)   layout dp_z2_eager deepspeed $EAGER_MB $((EAGER_ACCUM / 2)) false --set parallel.zero_stage=2 ;;
    tp)    # 110m: keeps its checkpoint for the round trip; 1b: a profile of steps 30-31 (rank 0)
      if [ $PART = 110m ]; then layout tp torchrun $EAGER_MB $EAGER_ACCUM false --set parallel.tp=2 --set checkpoint.at_end=true
      else layout tp torchrun $EAGER_MB $EAGER_ACCUM false --set parallel.tp=2 --set "log.profile_steps=[30,31]"; fi ;;
    tp_sp) layout tp_sp deepspeed $EAGER_MB $EAGER_ACCUM false --set parallel.tp=2 --set parallel.sequence_parallel=true ;;
    pp)    layout pp torchrun $EAGER_MB $EAGER_ACCUM false --set parallel.pp=2 ;;
    # TP / PP with train.compile=true: the fast path's kernels (Triton GLUs; TP: padded FFN shards),
    # layers not compiled
    tp_fast)    layout tp_fast torchrun $MB $ACCUM $COMPILE --set parallel.tp=2 ;;
    tp_sp_fast) layout tp_sp_fast deepspeed $MB $ACCUM $COMPILE --set parallel.tp=2 --set parallel.sequence_parallel=true ;;
    pp_fast)    layout pp_fast torchrun $((MB / 2)) $((ACCUM * 2)) $COMPILE --set parallel.pp=2 ;;
    roundtrip) roundtrip ;;
    *) echo "unknown step $step"; exit 2 ;;
  esac
  # after each step, so that a call cut off at its time limit still returns what ran
  (cd $W && tar -czf $OUT/logs_$PART.tar.gz *.log */metrics.jsonl gen_*.txt prompts.txt */profile.txt 2>/dev/null)
done

RUNS=$(cd $W && ls */metrics.jsonl 2>/dev/null | cut -d/ -f1 | tr '\n' ' ')
if [ -n "${DRY:-}" ]; then
  FROM=1 TO=$STEPS summary $W $RUNS | tee $OUT/summary_$PART.txt
elif [ $PART = 110m ]; then
  FROM=20 TO=$STEPS summary $W $RUNS | tee $OUT/summary_$PART.txt
else   # the TP run is profiled at steps 30-31: those stay out of its medians
  FROM=10 TO=29 summary $W $RUNS | tee $OUT/summary_$PART.txt
  FROM=32 TO=$STEPS summary $W $RUNS | tee -a $OUT/summary_$PART.txt
fi
nvidia-smi topo -m > $OUT/topo.txt 2>&1 || true
