#!/usr/bin/env bash
# One device call: which host phase of a pldr-train step the GPU waits on. Profiles steps 10-12 of
# pldr-110m at micro-batch 64 (the `pldr:*` ranges of build.Run.train_step and the trainer loop)
# and attributes the GPU's idle time to them; then the preset's own micro-batch (16) for its
# throughput.
#   bash benchmarks/gpu_trainer_phases.sh $OUT
set -uo pipefail
OUT=${1:-/tmp/out}
mkdir -p $OUT
source benchmarks/gpu_trainer_lib.sh
W=/tmp/phases && rm -rf $W && mkdir -p $W
make_shards $W
STEPS=14 train $W phases_mb64 pldr-110m 64 --set log.every=5 --set 'log.profile_steps=[10,12]'
python benchmarks/trainer_gaps.py $W/phases_mb64/profile_trace.json --top 20 | tee $OUT/trainer_phases.txt
python - $W/phases_mb64/profile_trace.json <<'PY' | tee -a $OUT/trainer_phases.txt
import json, sys
ev = [e for e in json.load(open(sys.argv[1]))["traceEvents"] if e.get("ph") == "X" and e.get("name", "").startswith("pldr:")]
t0 = min(e["ts"] for e in ev)
for e in sorted(ev, key=lambda e: e["ts"]):
    print(f"{e['name']:<22} host +{(e['ts'] - t0) / 1e3:8.2f} ms  for {e['dur'] / 1e3:7.2f} ms")
PY
STEPS=30 train $W mb16 pldr-110m 16 --set log.every=5
FROM=10 TO=30 summary $W phases_mb64 mb16 | tee -a $OUT/trainer_phases.txt
