"""pldr-convert: move models between the consolidated folder, the Hugging Face `pldrllm`
layout, the authors' reference checkpoints, and the authors' G_LM pickle."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ..errors import InputError, cli_main
from ..model import PLDRConfig, preset
from .consolidated import load_consolidated, save_consolidated, tokenizer_path


def _config(args) -> PLDRConfig:
    if args.config:
        try:
            with open(args.config, encoding="utf-8") as f:
                return PLDRConfig.from_dict(json.load(f))
        except OSError as e:
            raise InputError(f"--config {args.config}: cannot read it ({e.strerror or e})") from None
        except (TypeError, ValueError, AttributeError) as e:   # JSONDecodeError is a ValueError
            raise InputError(f"--config {args.config}: not a PLDRConfig JSON file ({e})") from None
    if args.preset:
        try:
            return preset(args.preset)
        except (KeyError, ValueError) as e:
            raise InputError(f"--preset {args.preset}: {e}") from None
    raise InputError("give --config config.json or --preset NAME for the model's architecture")


@cli_main("pldr-convert")
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
        if name == "from-reference":
            s.add_argument("--gcache", help="the fixed G_LM of a v510G ablation checkpoint (no metric learner): "
                                            "the authors' G_LM pickle or a G-cache artifact")
    args = p.parse_args(argv)
    src_name = Path(args.src).name   # metadata names files, never a machine's paths
    if args.cmd == "to-hf":
        from .hf import export_hf
        export_hf(load_consolidated(args.src), args.dst, args.dtype, tokenizer_path(args.src))
    elif args.cmd == "from-hf":
        from .hf import import_hf
        save_consolidated(import_hf(args.src), args.dst, args.dtype, {"source": f"huggingface:{src_name}"})
    elif args.cmd == "to-reference":
        from .reference import save_reference_checkpoint
        save_reference_checkpoint(load_consolidated(args.src), args.dst)
    elif args.cmd == "from-reference":
        from .reference import load_reference_checkpoint
        cfg = _config(args)
        meta = {"source": f"reference:{src_name}"}
        fixed_g = None
        if args.gcache:
            from ..infer.gcache_artifact import load_fixed_g
            fixed_g = load_fixed_g(args.gcache, cfg)
            meta["fixed_g"] = Path(args.gcache).name
        model = load_reference_checkpoint(args.src, cfg, fixed_g)
        save_consolidated(model, args.dst, args.dtype, meta)
    else:
        from ..infer.gcache_artifact import save_artifact
        from .safe_pickle import load_g_lm_pickle
        cfg = _config(args)
        g = torch.stack(load_g_lm_pickle(args.src, cfg.num_layers, cfg.num_heads, cfg.head_dim))
        # The pickle names no model, so its artifact always needs --foreign-g.
        save_artifact(args.dst, g, torch.zeros_like(g), None, "pickle", src_name, fingerprint=f"foreign:{src_name}")
    print(f"[pldr-convert] {args.cmd}: {args.src} -> {args.dst}")
