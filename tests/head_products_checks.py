"""Checks of the deductive path's other Triton ops in Triton's CPU interpreter: A0 = q^T q and
q G (pldr_dist.model.head_products), the queries' rotation with A0 (rotary_density) and the
power law (power_law_kernel).

They run in metric_kernel_checks.py's process (it imports them), so one interpreter start and
one torch + Triton import serve both files; one check by hand:
`TRITON_INTERPRET=1 python tests/metric_kernel_checks.py NAME`. Shapes as there: head_dim 16.
"""
from __future__ import annotations

import copy
import os

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"

import torch  # noqa: E402

from pldr_dist.model import PLDRModel, head_products, power_law_kernel, rotary_density  # noqa: E402
from pldr_dist.model.config import preset  # noqa: E402
from pldr_dist.model.layers import apply_rotary, rotary_cache  # noqa: E402
from pldr_dist.model.fast import FastPLGA, FastPowerLaw, optimize_for_training  # noqa: E402
from pldr_dist.model.plga import PowerLaw  # noqa: E402

from metric_kernel_checks import A, DK, TOL, _rel  # noqa: E402  (its shapes, tolerance and error measure)


def _head_inputs(seed=0):
    """q [B, h, S, dk] laid out [B, S, h, dk] as the projections give it (S = 37: a partial last
    tile of 32 rows), a non-symmetric G [B, h, dk, dk] in fp32 as the power law gives it."""
    torch.manual_seed(seed)
    q = torch.randn(2, 37, 3, DK, dtype=torch.bfloat16).transpose(1, 2)
    return q, torch.randn(2, 3, DK, DK)


def head_products_match_fp64():
    """A0 = q^T q, q G and their gradients (dq through each, dG) within bf16 accuracy of fp64
    on the values the kernels multiply; outputs laid out like q; the same bits twice; a
    transposed G in the backward (a plausible bug) would be far outside the tolerance."""
    q, g = _head_inputs()
    q, g = q.requires_grad_(), g.requires_grad_()
    a0, qg = head_products.density(q), head_products.times_g(q, g)
    assert a0.dtype == qg.dtype == torch.bfloat16 and qg.stride() == q.stride(), (a0.dtype, qg.stride())
    q64 = q.detach().double().requires_grad_()
    g64 = g.detach().to(torch.bfloat16).double().requires_grad_()   # autocast's matmul rounds G
    torch.manual_seed(1)
    da0, dqg = torch.randn(2, 3, DK, DK).to(torch.bfloat16), torch.randn(2, 3, 37, DK).to(torch.bfloat16)
    a0r, qgr = q64.transpose(-1, -2) @ q64, q64 @ g64
    dq_a = torch.autograd.grad(a0, q, da0, retain_graph=True)[0]
    dq_g, dg = torch.autograd.grad(qg, (q, g), dqg)
    dq_ar = torch.autograd.grad(a0r, q64, da0.double())[0]
    dq_gr, dgr = torch.autograd.grad(qgr, (q64, g64), dqg.double())
    errs = {name: _rel(got.double(), ref) for name, got, ref in (
        ("A0", a0, a0r), ("qG", qg, qgr), ("dq (A0)", dq_a, dq_ar), ("dq (qG)", dq_g, dq_gr), ("dG", dg, dgr))}
    assert all(e < TOL for e in errs.values()), errs
    assert dg.dtype == torch.float32 and dq_g.stride() == dqg.stride()
    wrong = _rel(dq_g.double(), dqg.double() @ g64.detach())           # G where G^T belongs
    assert wrong > 10 * TOL, wrong
    again = torch.autograd.grad(head_products.times_g(q, g), (q, g), dqg)
    assert torch.equal(again[0], dq_g) and torch.equal(again[1], dg)
    torch.library.opcheck(head_products.density, (q.detach().requires_grad_(),),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    torch.library.opcheck(head_products.times_g, (q.detach().requires_grad_(), g.detach().requires_grad_()),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    torch.library.opcheck(head_products.times_g_backward, (dqg, q.detach(), g.detach()),
                          test_utils=("test_schema", "test_faketensor"))
    fixed = torch.randn(3, DK, DK).to(torch.bfloat16)      # G = I models: [h, dk, dk], no gradient
    qf = q.detach().requires_grad_()
    out = head_products.times_g(qf, fixed)
    (dqf,) = torch.autograd.grad(out, qf, dqg)
    fixed64 = fixed.double()
    errs["qG fixed"] = _rel(out.double(), q64.detach() @ fixed64)
    errs["dq fixed"] = _rel(dqf.double(), dqg.double() @ fixed64.transpose(-1, -2))
    assert errs["qG fixed"] < TOL and errs["dq fixed"] < TOL, errs
    print("head products ok: " + ", ".join(f"{k} {v:.1e}" for k, v in errs.items()) + f"; transposed G {wrong:.2f}")


def _rotary_density_errors(half: bool, break_partner: bool = False) -> tuple:
    """({name: error}, inputs) of the rotary + A0 op and its backward: q~ against apply_rotary
    on the same table (max abs, in units of q~'s largest value), A0 and dq against fp64.
    break_partner: the kernel told the other rotary style (a wrong partner element)."""
    style = "half" if half else "interleaved"
    torch.manual_seed(2)
    table = rotary_cache(64, DK, 10000.0, style, "cpu")
    q = torch.randn(2, 37, 3, DK, dtype=torch.bfloat16).transpose(1, 2).requires_grad_()
    qr, a0 = rotary_density.rotary_density(q, table[:37], half != break_partner)
    assert qr.stride() == q.stride() and a0.dtype == torch.bfloat16, (qr.stride(), a0.dtype)
    q64 = q.detach().double().requires_grad_()
    qr64 = apply_rotary(q64, 0, 10000.0, style)
    a064 = qr64.transpose(-1, -2) @ qr64
    dqr, da0 = torch.randn(qr.shape).bfloat16(), torch.randn(a0.shape).bfloat16()
    dq = torch.autograd.grad((qr, a0), q, (dqr, da0))[0]
    dq64 = torch.autograd.grad((qr64, a064), q64, (dqr.double(), da0.double()))[0]
    same = apply_rotary(q.detach(), 0, 10000.0, style, table)
    return ({"q~": ((qr - same).abs().max() / same.abs().max()).item(), "A0": _rel(a0, a064), "dq": _rel(dq, dq64)},
            (q, dqr, da0, table[:37]))


def rotary_density_matches_fp64():
    """The queries' rotation with A0 in the same pass (rotary_density), both rotary styles: q~
    as apply_rotary gives it (to one bf16 rounding), A0 and dq within bf16 accuracy of fp64;
    the other style's partner element fails; the same bits twice; opcheck."""
    for half in (False, True):
        errs, args = _rotary_density_errors(half)
        print(f"rotary density ({'half' if half else 'interleaved'}): " + " ".join(f"{k}={v:.1e}" for k, v in errs.items()))
        assert errs["q~"] < 1e-2 and errs["A0"] < TOL and errs["dq"] < TOL, errs
        wrong, _ = _rotary_density_errors(half, break_partner=True)
        assert wrong["q~"] > 0.1 and wrong["dq"] > 10 * TOL, wrong
        q, dqr, da0, table = args
        first = torch.autograd.grad(rotary_density.rotary_density(q, table, half), q, (dqr, da0))[0]
        again = torch.autograd.grad(rotary_density.rotary_density(q, table, half), q, (dqr, da0))[0]
        assert torch.equal(first, again), "two runs, different bits"
    fresh = q.detach().requires_grad_()
    torch.library.opcheck(rotary_density.rotary_density, (fresh, table, True),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    qr = rotary_density.rotary_density(fresh, table, True)[0].detach()
    torch.library.opcheck(rotary_density.rotary_density_backward, (dqr, da0, qr, table, True),
                          test_utils=("test_schema", "test_faketensor"))


def fast_path_uses_head_products():
    """The fast path's PLGA and power law (use_head_products=True, use_kernel=True; on CPUs
    the default keeps the ops to CUDA) run the queries' rotation with A0, q G and the power law
    through the ops, once each a layer, with the loss within bf16 of the same fast path without
    them, compiled and not the same numbers; a G = I model's q G too (its rotation needs no A0:
    the compiled rotary)."""
    calls = {"rotary_density": 0, "density": 0, "times_g": 0, "power_law": 0}
    modules = {"rotary_density": rotary_density, "density": head_products, "times_g": head_products,
               "power_law": power_law_kernel}

    def counted(name):
        op = getattr(modules[name], name)

        def call(*args):
            calls[name] += 1
            return op(*args)
        return call
    torch.manual_seed(0)
    cfg = preset("tiny", num_heads=2, d_model=2 * DK, head_dim=DK, a_dff=A, num_layers=2)
    base = PLDRModel(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (2, 17))

    def loss_and_grads(on, compile=False):
        model = copy.deepcopy(base)
        optimize_for_training(model, compile=compile, cuda_graphs=False, backend="aot_eager")
        for module in model.modules():
            if isinstance(module, FastPLGA):
                module.use_head_products = on
            if isinstance(module, FastPowerLaw):
                module.use_kernel = on
        with torch.autocast("cpu", torch.bfloat16):
            loss = model(tokens[:, :-1], targets=tokens[:, 1:])
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    originals = {name: getattr(modules[name], name) for name in calls}
    try:
        for name in calls:
            setattr(modules[name], name, counted(name))
        ops, grads = loss_and_grads(True)
        assert calls == {**dict.fromkeys(calls, cfg.num_layers), "density": 0}, calls
        compiled, cgrads = loss_and_grads(True, compile=True)
        assert torch.equal(ops, compiled) and all(torch.equal(a, b) for a, b in zip(grads, cgrads))
        calls.update(dict.fromkeys(calls, 0))
        plain, _ = loss_and_grads(None)
        assert calls == dict.fromkeys(calls, 0), "use_head_products / use_kernel None must keep the ops to CUDA"
        base = PLDRModel(preset("tiny", num_heads=2, d_model=2 * DK, head_dim=DK, num_layers=1, mode="v510G"))
        fixed_g, _ = loss_and_grads(True)
        assert calls == {"rotary_density": 0, "density": 0, "times_g": 1, "power_law": 0}, calls
        fixed_plain, _ = loss_and_grads(None)
    finally:
        for name, op in originals.items():
            setattr(modules[name], name, op)
    assert abs(ops.item() - plain.item()) / plain.item() < 1e-2, (ops.item(), plain.item())
    assert all(torch.isfinite(g).all() for g in grads)
    assert abs(fixed_g.item() - fixed_plain.item()) / fixed_plain.item() < 1e-2, (fixed_g.item(), fixed_plain.item())
    print(f"fast path head products and power law ok: loss {ops.item():.5f} against {plain.item():.5f} "
          "with torch.matmul and PowerLaw.forward")


POWER_NAMES = ("A", "W", "b", "P", "alpha", "beta")


def _power_law_errors(upstream: str, seed=0) -> tuple:
    """Relative errors against fp64 of the power-law op's three outputs and six gradients;
    upstream "g": only G_LM gets a gradient (training), "all": A_LM and A_P too (the DAG
    penalty). Weights as the model initialises them, b and beta moved off zero; A, W and alpha
    (the first products' operands) hold bf16 values, since the interpreter rounds fp32 to bf16
    towards zero where the GPU rounds to nearest: the reference then multiplies the same values
    (the power law's gradient is ill-conditioned where A_LM is near 0, so a one-ulp difference
    in W showed as 30% in dA)."""
    torch.manual_seed(seed)
    dk = 2 * DK            # two column blocks of the backward (BN = 16)
    law = PowerLaw(preset("tiny", num_heads=3, head_dim=dk, d_model=3 * dk))
    with torch.no_grad():
        for name in ("W", "P", "alpha"):
            torch.nn.init.xavier_normal_(getattr(law, name))
        law.b.normal_(0.0, 0.3)
        law.beta.normal_(0.0, 0.3)
        for name in ("W", "alpha"):
            getattr(law, name).copy_(getattr(law, name).bfloat16())
    a = torch.randn(3, 3, dk, dk).bfloat16().float().requires_grad_()   # the learner's output (fp32)
    outs = power_law_kernel.power_law(a, *law.parameters(), False)
    ref = copy.deepcopy(law).double()
    ar = a.detach().double().requires_grad_()
    refs = ref(ar)
    ups = [torch.randn(a.shape) if upstream == "all" or i == 2 else None for i in range(3)]
    torch.autograd.backward([o for o, u in zip(outs, ups) if u is not None], [u for u in ups if u is not None])
    torch.autograd.backward([r for r, u in zip(refs, ups) if u is not None],
                            [u.double() for u in ups if u is not None])
    errs = {name: _rel(o.detach(), r.detach()) for name, o, r in zip(("A_LM", "A_P", "G_LM"), outs, refs)}
    for name, t, r in zip(POWER_NAMES, (a, *law.parameters()), (ar, *ref.parameters())):
        assert t.grad.dtype == t.dtype and t.grad.shape == t.shape, name
        errs["d" + name] = _rel(t.grad, r.grad)
    return errs, (a, *law.parameters()), outs


def power_law_matches_fp64():
    """A_LM, A_P, G_LM and every gradient within bf16 accuracy of fp64, with G_LM's gradient
    alone and with all three outputs'; a dropped derivative term (each of two) fails; the
    same bits twice; the ops' schemas, fake kernels and autograd registration (opcheck)."""
    for upstream in ("g", "all"):
        errs, inputs, _ = _power_law_errors(upstream)
        print(f"power law ({upstream}): " + " ".join(f"{k}={v:.1e}" for k, v in errs.items()))
        assert all(e < TOL for e in errs.values()), errs
    try:
        for drop in (1, 2):
            power_law_kernel.BREAK_DERIVATIVE = drop
            errs, _, _ = _power_law_errors("g")
            print(f"power law, broken derivative {drop}: dA={errs['dA']:.2f} dW={errs['dW']:.2f}")
            assert errs["G_LM"] < TOL and min(errs["dA"], errs["dW"], errs["db"]) > 3 * TOL, errs
    finally:
        power_law_kernel.BREAK_DERIVATIVE = 0
    _, inputs, outs = _power_law_errors("g")
    _, again, _ = _power_law_errors("g")
    assert all(torch.equal(x.grad, y.grad) for x, y in zip(inputs, again)), "two runs, different bits"
    fresh = [t.detach().requires_grad_() for t in inputs]
    for g_only in (False, True):
        torch.library.opcheck(power_law_kernel.power_law, (*fresh, g_only),
                              test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    only = power_law_kernel.power_law(*fresh, True)
    assert only[0].numel() == only[1].numel() == 0 and torch.equal(only[2], outs[2]), "g_only changed G_LM"
    dg = torch.randn(inputs[0].shape)
    torch.library.opcheck(power_law_kernel.power_law_backward, (dg, None, dg, *(t.detach() for t in inputs[:5])),
                          test_utils=("test_schema", "test_faketensor"))
