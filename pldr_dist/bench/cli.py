"""`pldr-bench SUITE [options]`: see pldr_dist/bench/__init__.py for the suites."""
from __future__ import annotations

import argparse
import sys

from ..errors import cli_main
from . import data, decode, kernels, numerics, plot, step, trainer


@cli_main("pldr-bench")
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="pldr-bench", description="pldr_dist benchmarks, one suite per question")
    sub = p.add_subparsers(dest="suite", required=True)
    trainer.add_parser(sub)
    plot.add_parser(sub)
    kernels.add_parser(sub)
    step.add_parser(sub)
    numerics.add_parser(sub)
    decode.add_parser(sub)
    data.add_parser(sub)
    a = p.parse_args(argv)
    results = a.func(a)
    return 0 if all(r.exit_code == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
