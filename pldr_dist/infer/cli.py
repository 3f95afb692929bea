"""Console tools: pldr-generate, pldr-export-gcache, pldr-gcache-check.

Each loads a consolidated folder (pldr_dist/convert/consolidated.py) and fails with a
one-line error on bad input (pldr_dist/errors.py).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from ..convert.consolidated import load_consolidated, tokenizer_path
from ..errors import InputError, cli_main
from .gcache_artifact import SOURCES, compute_g_cache, load_artifact, parameter_bytes, save_artifact, \
    to_inference_model
from .generate import SamplingConfig, generate
from .tokenizer import load_tokenizer


def _tokenizer(args, folder):
    return load_tokenizer(args.tokenizer or tokenizer_path(folder))


def _read_text(path) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read it as UTF-8 text ({getattr(e, 'strerror', None) or e})") from None


def _read_prompts(path) -> list:
    if path in (None, "-"):
        return [line.rstrip("\n") for line in sys.stdin if line.strip()]
    return _read_text(path).splitlines()


def _encode(texts, tok, token_ids: bool, where: str = "prompts") -> list:
    if not token_ids:
        return [tok.encode(t) for t in texts]
    out = []
    for n, line in enumerate(texts, 1):
        try:
            out.append([int(t) for t in line.split()])
        except ValueError:
            raise InputError(f"{where}:{n}: {line[:40]!r} is not space-separated token ids "
                             f"(drop --token-ids for text prompts)") from None
        if not out[-1]:
            raise InputError(f"{where}:{n}: empty prompt; give at least one token id (e.g. the end-of-sequence id)")
    return out


# ---------------------------------------------------------------------------- generate
@cli_main("pldr-generate")
def generate_main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="pldr-generate", description="Generate text from a consolidated PLDR-LLM with KV+G caches.")
    p.add_argument("model", help="consolidated folder")
    p.add_argument("--prompts", default="-", help="text file, one prompt a line ('-' = stdin)")
    p.add_argument("--gcache", help="G-cache artifact: run the inference-only model (no metric learner)")
    p.add_argument("--foreign-g", action="store_true", help="accept an artifact computed from another model")
    p.add_argument("--tokenizer", help="SentencePiece model (default: the folder's tokenizer.model)")
    p.add_argument("--token-ids", action="store_true", help="prompts are space-separated token ids")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--cache", default="kv+g", choices=["kv+g", "kv", "g", "none"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp64"])
    args = p.parse_args(argv)
    model = load_consolidated(args.model, args.dtype)
    tok = None if args.token_ids else _tokenizer(args, args.model)
    if args.gcache:
        full = parameter_bytes(model)
        model = to_inference_model(model, load_artifact(args.gcache, model, args.foreign_g), args.foreign_g)
        saved = full - parameter_bytes(model)
        print(f"[pldr-generate] inference-only model (v510Gi): {saved / 2**20:.1f} MiB of parameters "
              f"saved ({100 * saved / full:.1f}%)", file=sys.stderr)
        if args.cache == "kv+g":
            args.cache = "kv"   # G is fixed in the model; nothing left to cache
    prompts = _read_prompts(args.prompts)
    ids = _encode(prompts, tok, args.token_ids, args.prompts)
    model.to(args.device)
    sampling = SamplingConfig(args.max_new_tokens, args.temperature, args.top_k, args.top_p, seed=args.seed,
                              vocab_limit=tok.vocab_size if tok is not None else 0)
    started, produced = time.perf_counter(), 0
    for start in range(0, len(ids), args.batch_size):
        batch = ids[start:start + args.batch_size]
        stream = len(batch) == 1

        def on_step(step, new):
            if stream and tok is not None:
                print(tok.id_to_piece(int(new[0])).replace("\u2581", " "), end="", flush=True)
        out = generate(model, batch, sampling, cache_mode=args.cache, on_step=on_step)
        for k, gen in enumerate(out.tokens):
            produced += len(gen)
            text = " ".join(map(str, gen)) if tok is None else tok.decode(gen)
            if stream and tok is not None:
                print()
            else:
                print(f"{prompts[start + k]}\t{text}", flush=True)
    elapsed = time.perf_counter() - started
    print(f"[pldr-generate] {len(ids)} prompts, {produced} tokens in {elapsed:.2f}s "
          f"({produced / max(elapsed, 1e-9):.1f} tokens/s, cache={args.cache}, device={args.device})", file=sys.stderr)


# ---------------------------------------------------------------------------- export
@cli_main("pldr-export-gcache")
def export_gcache_main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="pldr-export-gcache", description="Precompute the G_LM cache artifact of a consolidated model.")
    p.add_argument("model", help="consolidated folder")
    p.add_argument("out", help="artifact file (.safetensors)")
    p.add_argument("--source", default="eos", choices=SOURCES,
                   help="eos: the reference's choice (empty prompt = single [END] token)")
    p.add_argument("--text", help="prompt / text sample for --source prompt")
    p.add_argument("--text-file", help="file whose text is the sample for --source prompt")
    p.add_argument("--tokenizer")
    p.add_argument("--seed", type=int, default=0, help="for --source random")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp64"])
    args = p.parse_args(argv)
    model = load_consolidated(args.model, args.dtype)
    tokens, detail = None, ""
    if args.source == "prompt":
        if args.text is None and args.text_file is None:
            raise InputError("--source prompt needs --text TEXT or --text-file FILE")
        detail = args.text if args.text is not None else _read_text(args.text_file)
        tokens = _tokenizer(args, args.model).encode(detail)[: model.cfg.context_length]
    g, a_lm = compute_g_cache(model, args.source, tokens, args.seed)
    save_artifact(args.out, g, a_lm, model, args.source, detail)
    print(f"[pldr-export-gcache] wrote {args.out}: G_LM and A_LM {list(g.shape)} {args.dtype}, source={args.source}")


# ---------------------------------------------------------------------------- check
@cli_main("pldr-gcache-check")
def gcache_check_main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="pldr-gcache-check",
                                description="How far each prompt's G_LM is from an artifact's, per layer and head.")
    p.add_argument("model", help="consolidated folder (v510: learned G)")
    p.add_argument("artifact")
    p.add_argument("--prompts", required=True, help="text file, one prompt a line")
    p.add_argument("--max-prompts", type=int, default=64)
    p.add_argument("--tokenizer")
    p.add_argument("--token-ids", action="store_true")
    p.add_argument("--foreign-g", action="store_true")
    p.add_argument("--plot", help="PNG path (default: <artifact>.check.png)")
    args = p.parse_args(argv)
    model = load_consolidated(args.model, "fp64")
    art = load_artifact(args.artifact, model, args.foreign_g)
    tok = None if args.token_ids else _tokenizer(args, args.model)
    prompts = _read_prompts(args.prompts)[: args.max_prompts]
    ids = [t[: model.cfg.context_length] for t in _encode(prompts, tok, args.token_ids, args.prompts)]
    ref = art.g_lm.to(torch.float64)
    rmse, logdet = [], []   # per prompt [L, h]
    for t in ids:
        g, _ = compute_g_cache(model, "prompt", t)
        rmse.append(((g - ref) ** 2).mean((-1, -2)).sqrt())
        logdet.append(torch.linalg.slogdet(g).logabsdet)
    rmse, logdet = torch.stack(rmse), torch.stack(logdet)
    ref_sign, ref_logdet = torch.linalg.slogdet(ref)
    print(f"{len(ids)} prompts; per layer, over heads and prompts:")
    print(f"{'layer':>5} {'RMSE mean':>10} {'RMSE max':>10} {'log|det G| art':>15} {'log|det G| mean':>16} {'std':>8}")
    for i in range(rmse.shape[1]):
        print(f"{i:>5} {rmse[:, i].mean():>10.3e} {rmse[:, i].max():>10.3e} {ref_logdet[i].mean():>15.4f} "
              f"{logdet[:, i].mean():>16.4f} {logdet[:, i].std() if len(ids) > 1 else 0.0:>8.4f}")
    _plot(rmse, logdet, ref_logdet, args.plot or f"{args.artifact}.check.png")


def _plot(rmse, logdet, ref_logdet, path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    L = rmse.shape[1]
    fig, axes = plt.subplots(2, L, figsize=(3 * L, 5.5), squeeze=False)
    for i in range(L):
        axes[0, i].boxplot(rmse[:, i].numpy())
        axes[0, i].set_title(f"layer {i}: RMSE(G, G_art)")
        axes[0, i].set_xlabel("head")
        axes[1, i].plot(logdet[:, i].T.numpy(), ".", alpha=0.4, color="tab:blue")
        axes[1, i].plot(ref_logdet[i].numpy(), "x", color="tab:red", label="artifact")
        axes[1, i].set_title("log|det G| per head")
        axes[1, i].set_xlabel("head")
    axes[1, 0].legend()
    fig.tight_layout()
    tmp = f"{path}.tmp-{os.getpid()}.png"
    fig.savefig(tmp, dpi=100)
    os.replace(tmp, path)   # never a half-written plot under the final name
    print(f"plot: {path}")
