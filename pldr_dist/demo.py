"""The embedded default job (`make demo`, `pldr-demo`): tokenise and shard the bundled corpus,
train the tiny PLDR-LLM with 2 CPU processes through the real entry point (`pldr-train`,
launched by torchrun), consolidate the final checkpoint, export its G_LM cache from the
end-of-sequence token, and generate text with KV + G caches from the inference-only model.

The steps after training call the console scripts' own `main(argv)` in this process (each
printed as the command a user would type): a process each would import torch three more
times, ~4 s apiece on two cores.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

from .errors import PLDRError, cli_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tool(prog: str, main, argv: list[str]) -> None:
    """A console script's main, in this process; its error is its own one line and exit 2."""
    print("+ " + " ".join([prog, *argv]), flush=True)
    main(argv)


def sh(cmd: list[str], env=None) -> None:
    print("+ " + " ".join(cmd), flush=True)
    done = subprocess.run(cmd, env=env)
    if done.returncode != 0:   # the step printed its own error above
        raise PLDRError(f"this step exited with status {done.returncode} (its message is above): "
                        f"{' '.join(cmd[:6])} ...")


@cli_main("pldr-demo")
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="pldr-demo", description=__doc__.splitlines()[0])
    p.add_argument("--corpus", default=os.path.join(ROOT, "data", "tinyshakespeare.txt"))
    p.add_argument("--work", default="runs", help="folder for the shards, run and exports")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--prompt", action="append", default=None)
    args = p.parse_args(argv)
    t0 = time.time()
    data_dir = os.path.join(args.work, "demo-data")
    run_dir = os.path.join(args.work, "demo")

    from .data.prepare import prepare_corpus
    print(f"[1/4] tokenizer + shards from {args.corpus}", flush=True)
    prepared = prepare_corpus(args.corpus, data_dir, vocab_size=512, seq_len=64, samples_per_shard=512)

    print(f"[2/4] training the tiny model with {args.nproc} CPU processes (torchrun)", flush=True)
    env = {**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu"),
           "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // args.nproc))}
    sh([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
        "-m", "pldr_dist.train", "--config", os.path.join(ROOT, "configs", "tiny.yaml"),
        "--set", f"run_dir={run_dir}", "--set", f"data.shards={prepared.manifest}",
        "--set", f"checkpoint.tokenizer={prepared.tokenizer}", "--set", f"train.steps={args.steps}"], env)

    print("[3/4] consolidate + export the G_LM cache from the end-of-sequence token", flush=True)
    model_dir = os.path.join(args.work, "demo-model")
    gcache = os.path.join(args.work, "demo-gcache.safetensors")
    from .convert.consolidate import main as consolidate_main
    from .infer.cli import export_gcache_main, generate_main
    tool("pldr-consolidate", consolidate_main, [os.path.join(run_dir, "checkpoints"), model_dir])
    tool("pldr-export-gcache", export_gcache_main, [model_dir, gcache, "--source", "eos"])

    print("[4/4] generate with the inference-only model (KV-cache + G-cache)", flush=True)
    prompts = args.prompt or ["ROMEO:", "First Citizen:", "KING HENRY:"]
    prompt_file = os.path.join(args.work, "demo-prompts.txt")
    with open(prompt_file + ".tmp", "w") as f:
        f.write("\n".join(p.replace("\n", "\\n") for p in prompts) + "\n")
    os.replace(prompt_file + ".tmp", prompt_file)
    tool("pldr-generate", generate_main, [model_dir, "--gcache", gcache, "--prompts", prompt_file,
                                          "--max-new-tokens", "60", "--temperature", "0.8", "--top-k", "40",
                                          "--seed", "0"])
    print(f"demo finished in {time.time() - t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
