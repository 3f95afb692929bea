"""pldr-convert: move models between the consolidated folder, the Hugging Face `pldrllm`
layout, the authors' reference checkpoints, and the authors' G_LM pickle."""
from __future__ import annotations

import argparse
import json
import sys

import torch

from ..model import PLDRConfig, preset
from .consolidated import CheckpointError, load_consolidated, save_consolidated, tokenizer_path


def _config(args) -> PLDRConfig:
    if args.config:
        with open(args.config, encoding="utf-8") as f:
            return PLDRConfig.from_dict(json.load(f))
    if args.preset:
        return preset(args.preset)
    raise ValueError("give --config config.json or --preset NAME for the model's architecture")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="pldr-convert", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    for name, help_ in (("to-hf", "consolidated -> Hugging Face pldrllm folder"),
                        ("from-hf", "Hugging Face pldrllm folder -> consolidated"),
                        ("to-reference", "consolidated -> reference torch.save file"),
                        ("from-reference", "reference torch.save file or DCP folder -> consolidated"),
                        ("g-pickle", "authors' G_LM pickle -> G-cache artifact (foreign G)")):
        s = sub.add_parser(name, help=help_)
        s.add_argument("src")
        s.add_argument("dst")
        s.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
        if name in ("from-reference", "g-pickle"):
            s.add_argument("--config", help="PLDRConfig json (the reference stores none)")
            s.add_argument("--preset", help="model preset instead of --config, e.g. pldr-110m")
    args = p.parse_args(argv)
    try:
        if args.cmd == "to-hf":
            from .hf import export_hf
            export_hf(load_consolidated(args.src), args.dst, args.dtype, tokenizer_path(args.src))
        elif args.cmd == "from-hf":
            from .hf import import_hf
            save_consolidated(import_hf(args.src), args.dst, args.dtype, {"source": f"huggingface:{args.src}"})
        elif args.cmd == "to-reference":
            from .reference import save_reference_checkpoint
            save_reference_checkpoint(load_consolidated(args.src), args.dst)
        elif args.cmd == "from-reference":
            from .reference import load_reference_checkpoint
            model = load_reference_checkpoint(args.src, _config(args))
            save_consolidated(model, args.dst, args.dtype, {"source": f"reference:{args.src}"})
        else:
            from .safe_pickle import load_g_lm_pickle
            cfg = _config(args)
            g = torch.stack(load_g_lm_pickle(args.src, cfg.num_layers, cfg.num_heads, cfg.head_dim))
            # The pickle names no model, so its artifact always needs --foreign-g.
            save_artifact_foreign(args.dst, g, args.src)
    except (CheckpointError, OSError, ValueError, KeyError) as e:
        print(f"{type(e).__name__}: {e}", file=sys.stderr)
        raise SystemExit(2)
    print(f"[pldr-convert] {args.cmd}: {args.src} -> {args.dst}")


def save_artifact_foreign(path, g: torch.Tensor, source: str) -> None:
    import os
    import time
    from safetensors.torch import save_file
    meta = {"mode": "v510Gi", "source": "pickle", "source_detail": str(source), "dtype": "float32",
            "fingerprint": "foreign:" + os.path.basename(str(source)),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "shape": json.dumps(list(g.shape))}
    tmp = f"{path}.tmp-{os.getpid()}"
    save_file({"g_lm": g.contiguous(), "a_lm": torch.zeros_like(g)}, tmp, metadata=meta)
    os.replace(tmp, path)
