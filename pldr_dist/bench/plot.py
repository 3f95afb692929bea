"""`pldr-bench plot`: trainer-suite results as bars, one panel per result file.

Each bar is a run's tokens/s relative to the first variant of the same package (ZeRO-1 in the
ZeRO comparisons), this package beside the baseline, with the absolute tokens/s on top. With
`--losses`, each panel overlays the variants' loss curves instead, with each variant's distance
from the first one below: a layout that trains differently shows there.
"""
from __future__ import annotations

import json
import os

from ..errors import InputError


def _read_results(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except OSError as e:
        raise InputError(f"{path}: cannot read it ({e.strerror or e}); pass a .json written by "
                         f"`pldr-bench trainer --out`") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: not valid JSON ({e}); pass a .json written by `pldr-bench trainer --out`") from None


def plot_trainer(paths: list, out: str, title: str = "", losses: bool = False) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    docs = [_read_results(p) for p in paths]
    if losses:
        return _save(_loss_figure(plt, docs), out, title)
    fig, axes = plt.subplots(1, len(docs), figsize=(5.2 * len(docs), 3.8), squeeze=False)
    for ax, doc, path in zip(axes[0], docs, paths):
        results = doc["results"]
        if len({r.get("seq_len") for r in results}) > 1:
            _sweep_panel(ax, doc)
            continue
        variants = list(dict.fromkeys(r["variant"] for r in results))
        packages = list(dict.fromkeys(r["package"] for r in results))
        width = 0.8 / len(packages)
        for k, pkg in enumerate(packages):
            for i, v in enumerate(variants):
                r = next((r for r in results if r["variant"] == v and r["package"] == pkg), None)
                if r is None:
                    continue
                x = i + (k - (len(packages) - 1) / 2) * width
                failed = r["exit_code"] != 0
                ax.bar(x, r["relative"], width, color="lightgray" if failed else f"C{k}",
                       label=("this package" if pkg == "this" else f"before ({pkg})") if i == 0 else None)
                ax.text(x, max(r["relative"], 0.02) + 0.02, "failed" if failed else f"{r['tokens_per_s'] / 1e3:,.0f}k",
                        ha="center", fontsize=7, rotation=90 if len(packages) > 1 else 0)
        ax.axhline(1.0, color="black", lw=0.6)
        procs = {v: next(r.get("nproc", 1) for r in results if r["variant"] == v) for v in variants}
        several = len(set(procs.values())) > 1
        ax.set_xticks(range(len(variants)), [f"{v}\n{procs[v]} GPUs" if several else v for v in variants])
        ax.set_ylim(0, max([1.25] + [1.1 * r["relative"] for r in results]))
        ax.set_ylabel("tokens/s relative to the first variant")
        a = doc["args"]
        ax.set_title(f"{a['config']}, micro-batch {results[0].get('micro_batch') or a['micro_batch']}, "
                     f"{_procs(doc)}\n{doc['device']}", fontsize=9)
        ax.legend(fontsize=7, loc="upper right")
    return _save(fig, out, title)


def _procs(doc) -> str:
    """'2 proc', or '1-2 proc' where variants ran on different process counts (NAME@N)."""
    counts = sorted({r.get("nproc", doc["args"]["nproc"]) for r in doc["results"]})
    return f"{counts[0]} proc" if len(counts) == 1 else f"{counts[0]}-{counts[-1]} proc"


def _save(fig, out: str, title: str) -> str:
    if title:
        fig.suptitle(title, fontsize=9, wrap=True)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=120)
    return out


def _loss_figure(plt, docs):
    """Per result file: every run's loss per step (top) and its difference from the first run (bottom)."""
    fig, axes = plt.subplots(2, len(docs), figsize=(5.2 * len(docs), 5.2), squeeze=False,
                             gridspec_kw={"height_ratios": [2, 1]}, sharex="col")
    for col, doc in enumerate(docs):
        runs = [r for r in doc["results"] if r["exit_code"] == 0 and r.get("losses")]
        top, bottom = axes[0][col], axes[1][col]
        for r in runs:
            label = r["variant"] if r["package"] == "this" else f"{r['variant']} ({r['package']})"
            steps = range(1, len(r["losses"]) + 1)
            top.plot(steps, r["losses"], lw=1, label=label)
            if r is not runs[0]:
                bottom.plot(steps, [x - y for x, y in zip(r["losses"], runs[0]["losses"])], lw=0.8, label=label)
        a = doc["args"]
        top.set_title(f"{a['config']}, micro-batch {a['micro_batch']}, {_procs(doc)}\n{doc['device']}", fontsize=9)
        top.set_ylabel("training loss")
        top.legend(fontsize=7)
        bottom.axhline(0.0, color="black", lw=0.6)
        bottom.set_ylabel(f"loss - {runs[0]['variant'] if runs else ''}")
        bottom.set_xlabel("step")
        if len(runs) > 1:
            bottom.legend(fontsize=7)
    return fig


def _sweep_panel(ax, doc) -> None:
    """A sequence-length sweep: tokens/s against length, one line per variant (failed runs,
    e.g. out of memory, as crosses on the axis)."""
    lines = {}
    for r in doc["results"]:
        lines.setdefault((r["variant"].split("@")[0], r["package"]), []).append(r)
    for (variant, pkg), runs in lines.items():
        ok = [r for r in runs if r["exit_code"] == 0]
        label = variant if pkg == "this" else f"{variant} ({pkg})"
        line, = ax.plot([r["seq_len"] for r in ok], [r["tokens_per_s"] / 1e3 for r in ok], "o-", label=label)
        for r in ok:
            ax.annotate(f"{r['memory_mib'] / 1024:.0f}G", (r["seq_len"], r["tokens_per_s"] / 1e3), fontsize=6,
                        textcoords="offset points", xytext=(0, 4), ha="center")
        failed = [r["seq_len"] for r in runs if r["exit_code"] != 0]
        ax.plot(failed, [0] * len(failed), "x", color=line.get_color(), ms=8)
    variants = list(dict.fromkeys(v for v, pkg in lines if pkg == "this"))
    if len(variants) > 1:       # the first variant against the others, length by length (right axis)
        first = {r["seq_len"]: r["tokens_per_s"] for r in lines[(variants[0], "this")] if r["exit_code"] == 0}
        right = ax.twinx()
        for v in variants[1:]:
            pts = [(r["seq_len"], first[r["seq_len"]] / r["tokens_per_s"]) for r in lines[(v, "this")]
                   if r["exit_code"] == 0 and r["seq_len"] in first]
            right.plot(*zip(*pts), "k--", lw=0.8, label=f"{variants[0]} / {v}")
            for x, y in pts:
                right.annotate(f"{y:.3f}", (x, y), fontsize=6, textcoords="offset points", xytext=(0, -9), ha="center")
        right.set_ylim(0, 1.1)
        right.set_ylabel("tokens/s ratio (dashed)")
        right.legend(fontsize=7, loc="lower left")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sequence length (x: did not run; labels: peak memory)")
    ax.set_ylabel("tokens/s (thousands)")
    ax.set_ylim(bottom=0)
    a = doc["args"]
    ax.set_title(f"{a['config']}, {_procs(doc)}\n{doc['device']}", fontsize=9)
    ax.legend(fontsize=7)


def add_parser(sub) -> None:
    p = sub.add_parser("plot", help="plot trainer-suite JSON results (one panel each)")
    p.add_argument("results", nargs="+", help="<name>.json files written by `pldr-bench trainer --out`")
    p.add_argument("--out", required=True, help="PNG path")
    p.add_argument("--title", default="")
    p.add_argument("--losses", action="store_true", help="the runs' loss curves overlaid, instead of tokens/s bars")

    def run(a, log=print):
        log(f"wrote {plot_trainer(a.results, a.out, a.title, a.losses)}")
        return []
    p.set_defaults(func=run)
