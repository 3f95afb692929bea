"""Checkpoint save/load time and size for the pldr-110m preset, DP=2, ZeRO-1, on this machine
(CPU, fp32), through the real entry point; plus the demo's CPU training throughput.

    python benchmarks/checkpoint_110m.py [--out benchmarks/results/checkpoint_110m.txt]
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def train(run_dir, data, steps, preset, extra=()):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "pldr_dist.train",
           "--config", os.path.join(ROOT, "configs", "tiny.yaml"), "--set", f"run_dir={run_dir}",
           "--set", f"data.shards={data.manifest}", "--set", f"checkpoint.tokenizer={data.tokenizer}",
           "--set", f"model.preset={preset}", "--set", f"train.steps={steps}", "--set", "eval.every=0",
           "--set", "log.every=10", *[a for kv in extra for a in ("--set", kv)]]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(out.stdout + out.stderr)
    return out.stdout


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "checkpoint_110m.txt"))
    a = p.parse_args()
    from pldr_dist.data.prepare import prepare_corpus
    lines = [f"# checkpoint_110m on {os.uname().nodename}: {os.cpu_count()} CPU cores, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"]
    with tempfile.TemporaryDirectory() as tmp:
        data = prepare_corpus(os.path.join(ROOT, "data", "tinyshakespeare.txt"), os.path.join(tmp, "data"), 512, 64,
                              samples_per_shard=512, log=lambda *_: None)
        demo = train(os.path.join(tmp, "demo"), data, 200, "tiny")
        tps = [float(x.replace(",", "")) for x in re.findall(r"([\d,]+) tok/s", demo)][2:]
        lines.append(f"demo (tiny preset, 2 CPU processes, DP=2 ZeRO-1, fp32, 16 x 64 tokens per rank per step): "
                     f"{sum(tps) / len(tps):,.0f} tokens/s (mean of the logged steps after warm-up)")
        run = os.path.join(tmp, "m110")
        first = train(run, data, 1, "pldr-110m", ["train.micro_batch_size=2"])
        saved = re.search(r"checkpoint (\S+) saved \(([\d.]+) MiB, ([\d.]+) s\)", first)
        second = train(run, data, 2, "pldr-110m", ["train.micro_batch_size=2"])
        loaded = re.search(r"verified and loaded in ([\d.]+) s", second)
        files = sorted(os.listdir(os.path.join(run, "checkpoints", saved.group(1))))
        lines.append(f"pldr-110m, DP=2, ZeRO-1, fp32 (CPU): checkpoint {saved.group(2)} MiB, save {saved.group(3)} s "
                     f"(DeepSpeed write + sha256 of every file + atomic 'latest'), verify+load {loaded.group(1)} s")
        lines.append(f"  files: {', '.join(files)}")
    text = "\n".join(lines) + "\n"
    print(text, end="")
    with open(a.out, "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
