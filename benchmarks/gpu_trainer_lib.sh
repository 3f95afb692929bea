# Shared by the device scripts that run pldr-train; `source` it from bash after setting OUT.
#   make_shards DIR [S]              the bundled corpus as tokenised shards (S = 1023, the paper's,
#                                    unless given) in DIR/shards
#   train DIR NAME CONFIG MB [ARGS]  pldr-train, compiled, ${STEPS:-30} steps, micro-batch MB, on
#                                    DIR/shards; run in DIR/NAME, log copied to $OUT/NAME.log;
#                                    later ARGS (--set k=v) override the defaults
#   train_copy COPY DIR NAME CONFIG MB [ARGS]
#                                    train, run from a copy of the package in COPY (e.g.
#                                    benchmarks/_prev): python -m puts the working directory
#                                    first on sys.path, so the copy must be the working directory
#   ab_runs DIR CONFIG MB [ARGS]     new_a, prev_a, new_b, prev_b: this package and benchmarks/_prev,
#                                    alternating, ${STEPS:-30} steps each (timings drift with time)
#   losses DIR NAME...               each run's logged losses on one line
#   summary DIR NAME...              median tokens/s, TFLOP/s, MFU, step time of the logged steps
#                                    ${FROM:-8}-${TO:-20}, peak memory and last loss of each run
#                                    (metrics.jsonl)
SITE=${PYTHONPATH:-}   # the carried wheels (/tmp/site), for train_copy
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0

make_shards() {
  python -m pldr_dist.data.shard_writer data/tinyshakespeare.txt \
    --tokenizer data/reference/refinedweb-tokenizer-pldrllm-paper.model --out "$1/shards" --seq-len ${2:-1023} \
    --samples-per-shard 32 2>&1 | tail -1
}

train() {
  local dir=$1 name=$2 config=$3 mb=$4; shift 4
  python -m pldr_dist.train --config configs/$config.yaml --set run_dir=$dir/$name \
    --set data.shards=$dir/shards/manifest.json --set train.steps=${STEPS:-30} --set log.every=1 \
    --set eval.every=0 --set checkpoint.every=0 --set optim.warmup_steps=5 --set data.num_workers=2 \
    --set train.compile=true --set train.micro_batch_size=$mb "$@" > $dir/$name.log 2>&1
  local rc=$?
  echo "$name: exit $rc"; grep -E "Error|error" $dir/$name.log | grep -v Warning | tail -3
  cp $dir/$name.log $OUT/$name.log
  return $rc
}

train_copy() {
  local copy=$1; shift
  ln -sfn $PWD/data $copy/data
  (cd $copy && PYTHONPATH=$PWD:$SITE train "$@")
}

ab_runs() {
  local dir=$1 config=$2 mb=$3; shift 3
  train $dir new_a $config $mb "$@"
  train_copy benchmarks/_prev $dir prev_a $config $mb "$@"
  train $dir new_b $config $mb "$@"
  train_copy benchmarks/_prev $dir prev_b $config $mb "$@"
}

losses() {
  local dir=$1; shift
  for n in "$@"; do echo "$n: $(grep -E '^step' $dir/$n.log | awk '{print $4}' | paste -sd' ')"; done
}

summary() {
  FROM=${FROM:-8} TO=${TO:-20} python - "$@" <<'PY'
import json, os, statistics, sys
import torch
W, names = sys.argv[1], sys.argv[2:]
lo, hi = int(os.environ["FROM"]), int(os.environ["TO"])
device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
print(f"# {device}: pldr-train, median of logged steps {lo}-{hi}")
for name in names:
    path = f"{W}/{name}/metrics.jsonl"
    rows = [json.loads(l) for l in open(path)] if os.path.isfile(path) else []
    steady = [r for r in rows if "tokens_per_s" in r and lo <= r["step"] <= hi]
    if not steady:
        print(f"{name:<24} failed or too short"); continue
    med = lambda k: statistics.median(r[k] for r in steady)
    mfu = f"MFU {100 * med('mfu'):4.1f}%" if "mfu" in steady[0] else "MFU -"   # no peak known on CPU
    print(f"{name:<24} {med('tokens_per_s'):>9,.0f} tokens/s  {med('tflops_per_device'):6.1f} TFLOP/s  "
          f"{mfu}  step {1000 * med('step_time_s'):5.0f} ms  "
          f"mem {max(r['memory_mib'] for r in steady):6.0f} MiB  loss@{rows[-1]['step']} {rows[-1]['loss']:.4f}")
PY
}
