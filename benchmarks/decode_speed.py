"""Decode speed of pldr-110m with and without KV/G caches and the G-cache artifact.

For each prompt length: prefill the prompt, then time single-token decode steps (batch 1,
greedy). Modes: none (re-runs the whole sequence each token), kv, kv+g (the paper's fast
path), artifact (the v510Gi inference-only model: fixed G from pldr-export-gcache, KV cache),
sdpa (a v510G model with identity G and the q@G product skipped: plain attention, the floor).
On CUDA also kv+g+cg, artifact+cg, sdpa+cg: the same with fixed-shape caches and each decode
step replayed as a CUDA graph (pldr_dist.infer.static_decode, what pldr-generate uses there). Random weights: speed does
not depend on their values. Only the last position goes through the LM head (generation
needs no other logits), in every mode, so prefill and the no-cache mode do not pay for
32000-way logits of the whole prompt.

    python benchmarks/decode_speed.py --device cpu --steps 2 --out benchmarks/results/decode_speed_cpu.txt
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from pldr_dist.infer.gcache_artifact import compute_g_cache, load_artifact, parameter_bytes, save_artifact, \
    to_inference_model
from pldr_dist.infer.static_decode import StaticDecoder
from pldr_dist.model import InferenceCache, PLDRModel, preset

MODES = ("none", "kv", "kv+g", "artifact", "sdpa")
GRAPH_MODES = ("kv+g+cg", "artifact+cg", "sdpa+cg")


class LastTokenHead(torch.nn.Module):
    def __init__(self, head):
        super().__init__()
        self.head = head

    def forward(self, h):
        return self.head(h[:, -1:])


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@torch.no_grad()
def time_decode(model, prompt_len, steps, cache_mode, device):
    """Median seconds per decode step after the prompt (prefill not counted)."""
    vocab = model.cfg.vocab_size
    seq = torch.randint(4, vocab, (1, prompt_len), device=device)
    flags = {"none": None, "kv": (True, False), "kv+g": (True, True), "static": (True, True)}[cache_mode]
    cache = InferenceCache(model.cfg.num_layers, *flags) if flags else None
    logits = model(seq, cache=cache)[:, -1]
    decoder = StaticDecoder(model, cache, prompt_len + steps + 1) if cache_mode == "static" else None
    sync(device)
    times = []
    for _ in range(steps):
        nxt = logits.argmax(-1, keepdim=True)
        start = time.perf_counter()
        if decoder is not None:
            logits = decoder.step(nxt)
        elif cache is None:
            seq = torch.cat((seq, nxt), 1)
            logits = model(seq)[:, -1]
        else:
            logits = model(nxt, cache=cache)[:, -1]
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--lengths", default="128,512,1000")
    p.add_argument("--steps", type=int, default=2, help="timed decode steps per point (median)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="benchmarks/results/decode_speed_cpu.txt")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    model = PLDRModel(preset("pldr-110m")).to(args.device, dtype).eval()
    g, a_lm = compute_g_cache(model, "eos")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    art_path = save_artifact(out.with_suffix(".gcache.safetensors"), g, a_lm, model, "eos")
    fast = to_inference_model(model, load_artifact(art_path, model))
    art_path.unlink()
    sdpa = PLDRModel(preset("pldr-110m", mode="v510G", fixed_g="identity")).to(args.device, dtype).eval()
    for layer in sdpa.layers:
        layer.attn.skip_identity_g = True
    models = {"none": (model, "none"), "kv": (model, "kv"), "kv+g": (model, "kv+g"),
              "artifact": (fast, "kv"), "sdpa": (sdpa, "kv"),
              "kv+g+cg": (model, "static"), "artifact+cg": (fast, "static"), "sdpa+cg": (sdpa, "static")}
    modes = MODES + (GRAPH_MODES if args.device.startswith("cuda") else ())
    for m in (model, fast, sdpa):
        m.head = LastTokenHead(m.head)
    lengths = [int(x) for x in args.lengths.split(",")]
    results = {m: [] for m in modes}
    for n in lengths:
        for mode in modes:
            m, cache_mode = models[mode]
            results[mode].append(time_decode(m, n, args.steps, cache_mode, args.device))
            print(f"prompt {n:>5} {mode:>9}: {1000 * results[mode][-1]:8.1f} ms/token", flush=True)
    saved = parameter_bytes(model) - parameter_bytes(fast)
    lines = [f"# decode_speed: pldr-110m, batch 1, greedy, device={args.device}, dtype={args.dtype}, "
             f"threads={args.threads}, median of {args.steps} decode steps after prefill",
             f"# inference-only model (artifact) saves {saved / 2**20:.1f} MiB of parameters "
             f"({100 * saved / parameter_bytes(model):.1f}%)",
             f"{'prompt_len':>10} " + " ".join(f"{m + ' ms':>14} {m + ' tok/s':>15}" for m in modes)]
    for k, n in enumerate(lengths):
        lines.append(f"{n:>10} " + " ".join(f"{1000 * results[m][k]:>14.2f} {1 / results[m][k]:>15.1f}" for m in modes))
    best = "kv+g+cg" if "kv+g+cg" in modes else "kv+g"
    floor = "sdpa+cg" if "sdpa+cg" in modes else "sdpa"
    for k, n in enumerate(lengths):
        lines.append(f"# prompt {n}: no cache / {best} = {results['none'][k] / results[best][k]:.1f}x; "
                     f"{best} / {floor} = {results[best][k] / results[floor][k]:.3f}")
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(lengths, results, out.with_suffix(".png"), args)


def plot(lengths, results, path, args):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for mode in results:
        ax.plot(lengths, [1000 * t for t in results[mode]], "o-", label=mode)
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel("ms per decoded token (batch 1)")
    ax.set_yscale("log")
    ax.set_title(f"pldr-110m decode latency, {args.device} {args.dtype}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
