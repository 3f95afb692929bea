"""`pldr-bench kernels --head-products`: the deductive path's products around the learner.

Per shape (preset:micro-batch: q~ [B, h, S = 1023, dk] laid out [B, S, h, dk] as the
projections give it, bf16) each Triton op of `model.head_products` against the torch.matmul
calls it replaces (cuBLAS, eager, on the same tensors): A0 = q^T q, q G, the backward of q G
(dG = q^T dqG and dq = dqG G^T) and A0's backward product q (dA0 + dA0^T); the queries'
rotation with A0 in the same pass (`model.rotary_density`) and its backward, against
apply_rotary and those products in eager torch; and the power law
(`model.power_law_kernel`: forward, G_LM alone as training asks for it, and forward + backward)
against `PowerLaw.forward` under autocast and its autograd backward; and the output head's
log-sum-exp pass over the logits (`model.head_loss.row_lse`, [B * S, vocab] bf16) against
torch.logsumexp. Times are the
suite's (`kernels._time_graph`: CUDA-graph replays, median of --iters); GB/s counts the bytes
the op must move (its operands of q's size read once, its outputs written once); errors are
the relative Frobenius error of the op and of torch, each against fp32 products of the same
bf16 values.

On a CPU (`--smoke`) the rows are listed as skipped: the ops' numerics are tested in Triton's
interpreter (tests/metric_kernel_checks.py).
"""
from __future__ import annotations

from dataclasses import dataclass

from . import report

S = 1023


@dataclass
class ProductRow:
    shape: str
    product: str
    status: str = "ok"
    op_ms: float = float("nan")
    torch_ms: float = float("nan")
    op_gbs: float = float("nan")
    op_err: float = float("nan")
    torch_err: float = float("nan")
    exit_code: int = 0


def _rel(got, ref) -> float:
    return ((got.float() - ref).norm() / ref.norm()).item()


def bench_shape(cfg, shape: str, mb: int, device, iters: int) -> list:
    """The four products, the power law's two rows and the loss pass at one shape; each a row."""
    import torch
    from ..model import head_products as hp
    from .kernels import _time_graph
    names = ("A0 = q^T q", "q G", "q G backward", "q (dA0 + dA0^T)", "rotary + A0", "rotary + A0 bwd", "power law",
             "power law fwd+bwd", "loss log-sum-exp")
    if device.type != "cuda":
        return [ProductRow(shape, n, "skipped (needs CUDA)") for n in names]
    h, dk = cfg.num_heads, cfg.head_dim
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(mb, S, h, dk, device=device, dtype=torch.bfloat16, generator=g).transpose(1, 2)
    dqg = torch.randn(mb, S, h, dk, device=device, dtype=torch.bfloat16, generator=g).transpose(1, 2)
    glm = torch.randn(mb, h, dk, dk, device=device, generator=g) / dk ** 0.5      # fp32, as the power law gives it
    da0 = torch.randn(mb, h, dk, dk, device=device, dtype=torch.bfloat16, generator=g)
    gb, m = glm.to(torch.bfloat16), (da0 + da0.transpose(-1, -2))
    qf, dqgf, gf, mf = q.float(), dqg.float(), gb.float(), m.float()
    unit = q.numel() * 2 / 1e9      # GB of one q-sized bf16 tensor
    cases = [
        (names[0], lambda: hp.density(q), lambda: q.transpose(-1, -2) @ q, lambda: qf.transpose(-1, -2) @ qf, unit),
        (names[1], lambda: hp.times_g(q, glm), lambda: q @ gb, lambda: qf @ gf, 2 * unit),
        (names[2], lambda: hp.times_g_backward(dqg, q, glm),
         lambda: (dqg @ gb.transpose(-1, -2), q.transpose(-1, -2) @ dqg),
         lambda: (dqgf @ gf.transpose(-1, -2), qf.transpose(-1, -2) @ dqgf), 3 * unit),
        (names[3], lambda: hp.head_product(q, m), lambda: q @ m, lambda: qf @ mf, 2 * unit),
        *_rotary_cases(cfg, q, dqg, da0, names[4:6], unit),
        *_power_law_cases(cfg, mb, device, g, names[6:8]),
        _lse_case(cfg, mb, device, g, names[8]),
    ]
    rows = []
    for name, op, ref_torch, ref32, gbytes in cases:
        row = ProductRow(shape, name)
        try:
            out, mine, exact = op(), ref_torch(), ref32()
            pairs = list(zip(out, exact)) if isinstance(exact, tuple) else [(out, exact)]
            theirs = list(zip(mine, exact)) if isinstance(exact, tuple) else [(mine, exact)]
            row.op_err = max(_rel(a, b) for a, b in pairs)
            row.torch_err = max(_rel(a, b) for a, b in theirs)
            (row.op_ms, _), (row.torch_ms, _) = _time_graph(op, iters), _time_graph(ref_torch, iters)
            row.op_gbs = gbytes / (row.op_ms / 1e3)
        except Exception as e:   # noqa: BLE001 - a failing op is a reported row
            row.status, row.exit_code = f"FAILED: {type(e).__name__}: {str(e).splitlines()[0][:100]}", 1
        rows.append(row)
    return rows


def _rotary_cases(cfg, q, dqr, da0, names, unit: float) -> list:
    """(name, op, torch, fp32 reference, GB moved) of the queries' rotation with A0
    (`model.rotary_density`) and its backward, against apply_rotary and the products in eager
    torch: q read and q~ written once forward; dq~ and q~ read, dq written once backward."""
    import torch
    from ..model import rotary_density as rd
    from ..model.layers import _swap, apply_rotary, rotary_cache
    style, S_ = cfg.rope_style, q.shape[-2]
    table = rotary_cache(S_, cfg.head_dim, cfg.rope_base, style, q.device)
    half = style == "half"
    qr = rd.rotary_density(q, table, half)[0]
    c, sp = table.unbind(-1)

    def forward(x):
        y = apply_rotary(x, 0, cfg.rope_base, style, table)
        return y, y.transpose(-1, -2) @ y

    def backward(dy, y, d):
        t = dy + y @ (d + d.transpose(-1, -2)).to(y.dtype)
        return t * c + _swap(t * sp, style)
    return [(names[0], lambda: rd.rotary_density(q, table, half), lambda: forward(q), lambda: forward(q.float()),
             2 * unit),
            (names[1], lambda: rd.rotary_density_backward(dqr, da0, qr, table, half), lambda: backward(dqr, qr, da0),
             lambda: backward(dqr.float(), qr.float(), da0.float()), 3 * unit)]


def _power_law_cases(cfg, mb: int, device, g, names) -> list:
    """(name, op, torch, fp32 reference, GB moved) of the power law at one shape: A [B, h, dk, dk]
    fp32 as the learner gives it, weights as the model initialises them (b, beta off zero).
    The backward's rows compare dA and G_LM (the weights' gradients are tested in the
    interpreter against fp64)."""
    import copy

    import torch
    from ..model import power_law_kernel as plk
    from ..model.plga import PowerLaw
    law = PowerLaw(cfg).to(device)
    with torch.no_grad():
        for name in ("W", "P", "alpha"):
            torch.nn.init.xavier_normal_(getattr(law, name))
        law.b.normal_(0.0, 0.1, generator=g)
        law.beta.normal_(0.0, 0.1, generator=g)
    dk = cfg.head_dim
    a = torch.nn.functional.layer_norm(torch.randn(mb, cfg.num_heads, dk, dk, device=device, generator=g), (dk,))
    dg = torch.randn(a.shape, device=device, generator=g)
    params = [p.detach() for p in law.parameters()]
    exact = copy.deepcopy(law)            # fp32, on the bf16 values the op's products multiply
    with torch.no_grad():
        for name in ("W", "alpha"):
            getattr(exact, name).copy_(getattr(law, name).bfloat16())
    ab = a.bfloat16().float()
    leaf = a.clone().requires_grad_()

    def op_both():
        g_lm = plk.power_law(a, *params, True)[2]
        return g_lm, plk.power_law_backward(dg, None, None, a, *params[:4])[0]

    def torch_both():
        with torch.autocast("cuda", torch.bfloat16):
            g_lm = law(leaf)[2]
        return g_lm.detach(), torch.autograd.grad(g_lm, leaf, dg)[0]

    def exact_both():
        x = ab.clone().requires_grad_()
        g_lm = exact(x)[2]
        return g_lm.detach(), torch.autograd.grad(g_lm, x, dg)[0]

    def torch_forward():
        with torch.autocast("cuda", torch.bfloat16):
            return law(a)[2]
    gb = a.numel() * 4 / 1e9            # one fp32 [B, h, dk, dk] tensor
    return [(names[0], lambda: plk.power_law(a, *params, True)[2], torch_forward, lambda: exact(ab)[2], 2 * gb),
            (names[1], op_both, torch_both, exact_both, 5 * gb)]


def _lse_case(cfg, mb: int, device, g, name) -> tuple:
    """(name, op, torch, fp32 reference, GB moved) of the head's log-sum-exp pass: logits
    [mb * S, vocab] bf16 (the shape `pldr-train` gives it), read once."""
    import torch
    from ..model import head_loss
    logits = (2 * torch.randn(mb * S, cfg.vocab_size, device=device, generator=g)).bfloat16()
    targets = torch.randint(1, cfg.vocab_size, (mb * S,), device=device, generator=g)

    def exact():   # in row chunks: fp32 copies of all the logits would not fit next to them
        return torch.cat([torch.logsumexp(c.float(), -1) for c in logits.split(8192)])
    return (name, lambda: head_loss.row_lse(logits, targets, 0)[0], lambda: torch.logsumexp(logits, -1), exact,
            logits.numel() * 2 / 1e9)


def table(rows: list, device: str) -> str:
    lines = [f"# {device}: the deductive path's products and power law, Triton ops (model/head_products.py, "
             f"power_law_kernel.py) against torch.matmul / PowerLaw.forward (autocast) on the same tensors, and the "
             f"loss's log-sum-exp pass (head_loss.py) against torch.logsumexp; q~ [B, h, {S}, dk] laid out "
             f"[B, S, h, dk]. Errors: relative, against fp32 on the same bf16 values",
             f"{'shape':<16} {'product':<18} {'op ms':>8} {'torch ms':>9} {'speed-up':>8} {'op GB/s':>8} "
             f"{'op err':>8} {'torch err':>9}  status"]
    for r in rows:
        if r.status != "ok":
            lines.append(f"{r.shape:<16} {r.product:<18} {'':>8} {'':>9} {'':>8} {'':>8} {'':>8} {'':>9}  {r.status}")
            continue
        lines.append(f"{r.shape:<16} {r.product:<18} {r.op_ms:8.3f} {r.torch_ms:9.3f} {r.torch_ms / r.op_ms:8.2f} "
                     f"{r.op_gbs:8.0f} {r.op_err:8.1e} {r.torch_err:9.1e}  ok")
    return "\n".join(lines)


def run(a, shapes: list, device, log) -> list:
    """`pldr-bench kernels --head-products`: the rows of every shape, one table."""
    from ..model.config import preset
    rows = []
    for name, mb in shapes:
        rows += bench_shape(preset(name), f"{name} mb{mb}", mb, device, a.iters or 20)
    text = table(rows, report.device_name(device.type))
    a.name = a.name or "head_products"
    report.write(a, rows, text, report.device_name(device.type))
    log(text)
    return rows
