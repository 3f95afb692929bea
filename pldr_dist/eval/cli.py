"""`pldr-eval`: perplexity on held-out shards, harness tasks, and G-cache comparisons.

  pldr-eval perplexity --model run/consolidated --shards data/manifest.json [--gcache A | --fixed-g eos]
  pldr-eval harness --model pldr --model_args pretrained=run/consolidated --tasks arc_easy ...
  pldr-eval compare-gcache --model run/consolidated [--gcache A] --tasks arc_easy,piqa [--include-path DIR]

Folders and artifacts are read by the project's one loader of each (pldr_dist/eval/model_io.py);
bad input ends in one line, `pldr-eval: error: ...`, and exit status 2.
"""
from __future__ import annotations

import argparse
import json
import sys

from ..errors import cli_main


def _perplexity(args) -> int:
    from .model_io import load_for_eval
    from .perplexity import evaluate_shards

    model, _ = load_for_eval(args.model, args.gcache, args.fixed_g, args.device, args.dtype, args.foreign_g)
    result = evaluate_shards(model, args.shards, args.split, args.batch_size, args.max_batches)
    result.update(model=args.model, gcache=args.gcache, fixed_g=args.fixed_g, split=args.split)
    print(json.dumps(result, indent=1))
    return 0


def _harness(argv: list[str]) -> int:
    from . import lm_eval_adapter  # noqa: F401  (registers --model pldr)
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm_eval", *argv]
    cli_evaluate()
    return 0


def _compare(args) -> int:
    from .compare import compare_gcache, task_manager_for
    from .lm_eval_adapter import PLDRLM
    from .model_io import g_from_prompt, load_for_eval, with_fixed_g

    model, tokenizer = load_for_eval(args.model, device=args.device, dtype=args.dtype)
    if args.gcache:
        fixed, _ = load_for_eval(args.model, args.gcache, None, args.device, args.dtype, args.foreign_g)
    else:
        fixed = with_fixed_g(model, g_from_prompt(model, [model.cfg.eos_id]))
    plain = PLDRLM(model=model, tokenizer=tokenizer, batch_size=args.batch_size)
    cached = PLDRLM(model=fixed, tokenizer=tokenizer, batch_size=args.batch_size)
    tasks = args.tasks.split(",")
    _, _, table = compare_gcache(plain, cached, tasks, task_manager_for(tasks, args.include_path), args.limit,
                                 args.num_fewshot)
    print(f"model {args.model}; G-cache {args.gcache or 'computed from the end-of-sequence prompt'}")
    print(table)
    return 0


@cli_main("pldr-eval")
def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["harness"]:
        return _harness(argv[1:])
    parser = argparse.ArgumentParser(prog="pldr-eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("harness", help="run lm_eval's command line with --model pldr registered")
    for name in ("perplexity", "compare-gcache"):
        p = sub.add_parser(name)
        p.add_argument("--model", required=True, help="consolidated model folder")
        p.add_argument("--gcache", help="G-cache artifact: score with its fixed G_LM")
        p.add_argument("--foreign-g", action="store_true", help="accept an artifact computed from another model")
        p.add_argument("--device", default="cpu")
        p.add_argument("--dtype", default="float32")
        p.add_argument("--batch-size", type=int, default=8)
    ppl = sub.choices["perplexity"]
    ppl.add_argument("--shards", required=True, help="manifest.json of the webdataset shards")
    ppl.add_argument("--split", default="valid")
    ppl.add_argument("--max-batches", type=int)
    ppl.add_argument("--fixed-g", help="'eos' or a text: fixed G_LM computed once from this prompt")
    cmp = sub.choices["compare-gcache"]
    cmp.add_argument("--tasks", required=True, help="comma-separated harness task names")
    cmp.add_argument("--include-path", help="folder of extra task YAMLs")
    cmp.add_argument("--limit", type=float)
    cmp.add_argument("--num-fewshot", type=int)
    args = parser.parse_args(argv)
    return _perplexity(args) if args.command == "perplexity" else _compare(args)


if __name__ == "__main__":
    sys.exit(main())
