"""The `numerics` suite: how far each bf16 training path's loss and gradients are from fp64.

Why: a fused kernel must not cost accuracy (issue #24: "loss and gradient errors against fp64
no worse than today's fast path"). For one model at initialisation and one batch of random
tokens it computes the loss and every gradient in fp64 (eager, no autocast), then under bf16
autocast for each path, and reports relative errors ||g - g64|| / ||g64|| per parameter group:
the power law (W, b, P, alpha, beta), the metric learner, and the rest. Paths: `eager` (the
plain model), `fast` (the trainer's: `optimize_for_training`, compiled, every Triton op),
`fast-torch-power` (the same with the power law in PyTorch: what `power_law_kernel` changes).

The power law's gradients are ill-conditioned in bf16 (A_LM^(P-1) is large where A_LM is near
its floor of 1e-9), ~100% off in every implementation: compare paths, not against zero.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import InputError
from . import report
from .step import parse_model

PATHS = ("eager", "fast", "fast-torch-power")
GROUPS = (("power", ".attn.power."), ("learner", ".attn.metric."))


@dataclass
class Row:
    model: str
    path: str
    micro_batch: int
    seq_len: int
    seed: int = 1                     # of the random tokens
    loss: float = 0.0
    loss_error: float = 0.0           # |loss - loss64| / loss64
    power_error: float = 0.0          # relative norm error of the group's gradients
    learner_error: float = 0.0
    rest_error: float = 0.0
    exit_code: int = 0
    error: str = ""


def _group(name: str) -> str:
    return next((g for g, key in GROUPS if key in name), "rest")


def _errors(grads: dict, ref: dict) -> dict:
    """{group: ||g - g64|| / ||g64||} over each group's gradients taken together."""
    import torch
    out = {}
    for group in ("power", "learner", "rest"):
        names = [n for n in ref if _group(n) == group and ref[n] is not None]
        if not names:
            out[group] = float("nan")
            continue
        diff = torch.stack([(grads[n].double() - ref[n]).norm() ** 2 for n in names]).sum().sqrt()
        norm = torch.stack([ref[n].norm() ** 2 for n in names]).sum().sqrt()
        out[group] = (diff / norm).item()
    return out


def _loss_and_grads(model, tokens, autocast: bool, device: str, fast: bool):
    import torch
    from ..model import lm_loss
    with torch.autocast(device, torch.bfloat16, enabled=autocast):
        loss = model(tokens[:, :-1], targets=tokens[:, 1:]) if fast else lm_loss(model(tokens[:, :-1]), tokens[:, 1:])
    loss.backward()
    return loss.item(), {n: p.grad for n, p in model.named_parameters()}


def run(a, log=print) -> list:
    import copy

    import torch
    from ..model import PLDRModel, preset
    from ..model.fast import FastPowerLaw, optimize_for_training

    if a.smoke:
        a.model, a.seq_len = a.model or ["tiny:2"], 32
    models = [parse_model(m) for m in (a.model or ["pldr-110m:4"])]
    if a.seq_len < 1 or set(a.path) - set(PATHS):
        raise InputError(f"--path {','.join(a.path)}: give a comma list of {', '.join(PATHS)}; --seq-len > 0")
    device = "cuda" if torch.cuda.is_available() and not a.smoke else "cpu"
    name = report.device_name(device)
    rows = []
    for model_name, batches in models:
        cfg = preset(model_name)
        torch.manual_seed(0)
        base = PLDRModel(cfg).to(device)
        for batch, seed in ((b, s) for b in batches for s in a.seeds):
            tokens = torch.randint(4, cfg.vocab_size, (batch, a.seq_len + 1), device=device,
                                   generator=torch.Generator(device).manual_seed(seed))
            exact = copy.deepcopy(base).double()
            loss64, ref = _loss_and_grads(exact, tokens, False, device, fast=False)
            del exact
            for path in a.path:
                row = Row(model_name, path, batch, a.seq_len, seed)
                model = copy.deepcopy(base)
                if path != "eager":
                    torch._dynamo.reset()
                    optimize_for_training(model, compile=device == "cuda", cuda_graphs=False,
                                          fused_learner=True)
                    for module in model.modules():
                        if isinstance(module, FastPowerLaw) and path == "fast-torch-power":
                            module.use_kernel = False
                row.loss, grads = _loss_and_grads(model, tokens, True, device, fast=path != "eager")
                row.loss_error = abs(row.loss - loss64) / abs(loss64)
                errs = _errors(grads, ref)
                row.power_error, row.learner_error, row.rest_error = errs["power"], errs["learner"], errs["rest"]
                log(f"  {model_name} mb {batch} seed {seed} {path:<16}: loss {row.loss_error:.1e}, "
                    f"power {row.power_error:.3f}, "
                    f"learner {row.learner_error:.3f}, rest {row.rest_error:.3f}")
                rows.append(row)
                del model, grads
                report.write(a, rows, table(rows, name, a), name)
    log(table(rows, name, a))
    return rows


def table(rows: list, device: str, a) -> str:
    lines = [f"# {device}: errors against fp64 (relative, per gradient group), models at initialisation, "
             f"seq {a.seq_len}, bf16 autocast",
             f"{'model':<10} {'mb':>3} {'seed':>4} {'path':<17} {'loss':>9} {'loss err':>9} {'power':>7} "
             f"{'learner':>8} {'rest':>7}"]
    for r in rows:
        lines.append(f"{r.model:<10} {r.micro_batch:>3} {r.seed:>4} {r.path:<17} {r.loss:>9.5f} {r.loss_error:>9.1e} "
                     f"{r.power_error:>7.3f} {r.learner_error:>8.3f} {r.rest_error:>7.3f}")
    return "\n".join(lines)


def add_parser(sub) -> None:
    p = sub.add_parser("numerics", help="loss and gradient errors of each bf16 path against fp64",
                       description=__doc__.splitlines()[0])
    p.add_argument("--model", action="append", help="PRESET:MICRO_BATCH[,...] (default pldr-110m:4)")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--path", type=lambda s: s.split(","), default=list(PATHS),
                   help=f"comma list of {', '.join(PATHS)} (default all)")
    p.add_argument("--seeds", type=report.int_list, default=[1],
                   help="seeds of the random token batches, a comma list (default 1): the spread between "
                        "batches shows which differences between paths are systematic")
    report.add_common(p, "numerics")
    p.set_defaults(func=run)
