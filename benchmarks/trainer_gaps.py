"""Where a pldr-train step leaves the GPU idle: read the trainer's profiler trace
(`log.profile_steps`, run_dir/profile_trace.json) and report the GPU's busy share over the
profiled steps, and the longest idle gaps with the host-side ops that ran during each.

    python benchmarks/trainer_gaps.py RUN_DIR/profile_trace.json [--top 12]
"""
from __future__ import annotations

import argparse
import json
from collections import Counter


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("trace")
    ap.add_argument("--top", type=int, default=12)
    args = ap.parse_args()
    events = json.load(open(args.trace))["traceEvents"]
    spans = [e for e in events if e.get("ph") == "X" and "dur" in e]
    gpu = sorted((e["ts"], e["ts"] + e["dur"]) for e in spans if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset"))
    host = [e for e in spans if e.get("cat") in ("cpu_op", "python_function", "user_annotation")]
    if not gpu:
        print("no GPU events in the trace")
        return
    busy, gaps, end = 0.0, [], gpu[0][0]
    for a, b in gpu:
        if a > end:
            gaps.append((a - end, end, a))
        busy += max(0.0, b - max(a, end))
        end = max(end, b)
    span = end - gpu[0][0]
    print(f"GPU span {span / 1e3:.1f} ms, busy {busy / 1e3:.1f} ms ({100 * busy / span:.1f}%), "
          f"idle {(span - busy) / 1e3:.1f} ms in {len(gaps)} gaps "
          f"({sum(g for g, _, _ in gaps if g > 100) / 1e3:.1f} ms in gaps over 100 us)")
    # GPU idle time by the trainer's host phase it fell in (`pldr:*` ranges of build.Run.train_step
    # and the trainer loop); the rest is the loop's own bookkeeping between the ranges.
    phases = sorted((e["ts"], e["ts"] + e["dur"], e["name"]) for e in host if e["name"].startswith("pldr:"))
    by_phase = Counter()
    for _, a, b in gaps:
        covered = 0.0
        for lo, hi, name in phases:
            overlap = min(b, hi) - max(a, lo)
            if overlap > 0:
                by_phase[name] += overlap
                covered += overlap
        by_phase["(between the ranges)"] += (b - a) - covered
    if phases:
        print("GPU idle by host phase: " + "; ".join(f"{n} {t / 1e3:.2f} ms" for n, t in by_phase.most_common()))
    for length, a, b in sorted(gaps, reverse=True)[:args.top]:
        during = Counter()
        for e in host:   # host ops overlapping the gap, by the time they overlap it
            lo, hi = max(a, e["ts"]), min(b, e["ts"] + e["dur"])
            if hi > lo:
                during[e["name"][:70]] += hi - lo
        ops = "; ".join(f"{n} {t / 1e3:.2f}" for n, t in during.most_common(6))
        print(f"gap {length / 1e3:6.2f} ms at +{(a - gpu[0][0]) / 1e3:7.1f} ms: {ops}")


if __name__ == "__main__":
    main()
