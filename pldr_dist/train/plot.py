"""`pldr-plot-metrics`: loss and throughput curves from one or more metrics.jsonl files."""
from __future__ import annotations

import argparse
import json
import os
import sys

from ..errors import InputError, cli_main


def read_metrics(path: str) -> list[dict]:
    if not os.path.isfile(path):
        raise InputError(f"{path} not found (a run writes run_dir/metrics.jsonl)")
    rows = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise InputError(f"{path}:{n}: not a JSON line ({e.msg}); is this a run's metrics.jsonl?") from None
    return rows


def plot(paths: list[str], out: str, labels: list[str] | None = None) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax_loss, ax_tps) = plt.subplots(1, 2, figsize=(11, 4))
    for i, path in enumerate(paths):
        label = labels[i] if labels else os.path.basename(os.path.dirname(os.path.abspath(path)))
        rows = read_metrics(path)
        train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
        val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
        tps = [(r["step"], r["tokens_per_s"]) for r in rows if "tokens_per_s" in r]
        if train:
            ax_loss.plot(*zip(*train), label=f"{label} train")
        if val:
            ax_loss.plot(*zip(*val), "o--", label=f"{label} validation")
        if tps:
            ax_tps.plot(*zip(*tps), label=label)
    ax_loss.set(xlabel="step", ylabel="loss", title="loss")
    ax_tps.set(xlabel="step", ylabel="tokens/s", title="throughput")
    for ax in (ax_loss, ax_tps):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = out + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, out)


@cli_main("pldr-plot-metrics")
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="pldr-plot-metrics", description=__doc__)
    p.add_argument("metrics", nargs="+", help="metrics.jsonl files (several are overlaid)")
    p.add_argument("--out", required=True, help="PNG to write")
    p.add_argument("--labels", nargs="*", help="one label per metrics file")
    args = p.parse_args(argv)
    if args.labels and len(args.labels) != len(args.metrics):
        raise InputError(f"--labels gives {len(args.labels)} labels for {len(args.metrics)} metrics files")
    plot(args.metrics, args.out, args.labels)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
