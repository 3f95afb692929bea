"""Checks of the whole-learner Triton op (pldr_dist.model.metric_kernel) in Triton's CPU interpreter.

TRITON_INTERPRET must be set before Triton is imported, and the interpreter is slow to start,
so test_metric_kernel.py runs all checks in one process (subprocess_checks.py; one check by hand:
`TRITON_INTERPRET=1 python tests/metric_kernel_checks.py NAME`). Tiny shapes: 40 rows (blocks of
32, the last partial), head_dim 16, a_dff 24 in chunks of 16 (`metric_kernel.INTERP_BH`: a padded tail),
R = 2 units of n = 2.
"""
from __future__ import annotations

import copy
import os

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"

import torch  # noqa: E402

from pldr_dist.model import PLDRModel, head_products, metric_kernel, power_law_kernel  # noqa: E402
from pldr_dist.model.config import preset  # noqa: E402
from pldr_dist.model.fast import FastPLGA, FastPowerLaw, FusedMetricLearner, optimize_for_training  # noqa: E402
from pldr_dist.model.plga import MetricLearner, PowerLaw  # noqa: E402

ROWS, DK, A = 40, 16, 24
NAMES = ("x", "in_norm.weight", "in_norm.bias", "u1_weight", "u1_bias", "u2_weight", "u2_bias",
         "u3_weight", "u3_bias", "norm_weight", "norm_bias")
TOL = 3e-2   # bf16 operands give ~1e-2 relative error; a wrong index or derivative gives O(1)


def make_learner(dtype=torch.float32) -> MetricLearner:
    """A tiny learner with every parameter away from its default (LayerNorm weights not 1,
    biases not 0), so that each gradient term matters."""
    torch.manual_seed(0)
    m = MetricLearner(preset("tiny", head_dim=DK, a_dff=A))
    with torch.no_grad():
        for p in (m.u1_bias, m.u2_bias, m.u3_bias):
            p.normal_(0.0, 0.5)
        for p in (m.in_norm.weight, m.norm_weight):
            p.normal_(1.0, 0.3)
        for p in (m.in_norm.bias, m.norm_bias):
            p.normal_(0.0, 0.3)
    return m.to(dtype)


def reference(m: MetricLearner) -> MetricLearner:
    """The fp64 PyTorch learner (`MetricLearner.forward`) on the values the kernel multiplies:
    GLU weight matrices rounded to bf16."""
    ref = copy.deepcopy(m).double()
    with torch.no_grad():
        for name in ("u1_weight", "u2_weight", "u3_weight"):
            getattr(ref, name).copy_(getattr(m, name).bfloat16().double())
    return ref


def _rel(a, ref):
    return ((a.double() - ref).norm() / ref.norm()).item()


def errors(wdtype=torch.float32, xdtype=torch.float32, seed=1) -> dict:
    """Relative errors of the op's output and of its 11 gradients against fp64."""
    m = make_learner(wdtype)
    ref = reference(m)
    torch.manual_seed(seed)
    x = (3.0 * torch.randn(ROWS, DK) + 1.0).to(xdtype).requires_grad_(True)
    dout = torch.randn(ROWS, DK)
    params = metric_kernel.learner_params(m)
    out = metric_kernel.metric_learner(x, *params, eps=m.eps)
    out.backward(dout)
    assert out.dtype == torch.float32 and out.shape == x.shape
    xr = x.detach().double().requires_grad_(True)
    yref = ref(xr)
    yref.backward(dout.double())
    errs = {"out": _rel(out.detach(), yref.detach())}
    for name, t, r in zip(NAMES, (x, *params), (xr, *metric_kernel.learner_params(ref))):
        assert t.grad.dtype == t.dtype and t.grad.shape == t.shape, name
        errs[name] = _rel(t.grad, r.grad)
    return errs


def op_matches_fp64():
    """Output and every gradient within bf16 accuracy of fp64, for fp32 master weights
    (autocast) and bf16 weights and input (DeepSpeed bf16)."""
    for wdtype, xdtype in ((torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16)):
        errs = errors(wdtype, xdtype)
        bad = {k: v for k, v in errs.items() if not v < TOL}
        print(f"vs fp64 ({wdtype} weights): " + " ".join(f"{k}={v:.1e}" for k, v in errs.items()))
        assert not bad, f"{wdtype}: errors above {TOL}: {bad}"


def broken_derivative_fails():
    """Dropping one term of a derivative must fail the fp64 comparison: the LayerNorm
    backward's projection term (1), silu's g*s*(1-s) term (2)."""
    try:
        for drop, must_fail in ((1, ("x", "in_norm.weight", "u1_weight")), (2, ("u1_weight", "u1_bias"))):
            metric_kernel.BREAK_DERIVATIVE = drop
            errs = errors()
            print(f"broken derivative {drop}: " + " ".join(f"{k}={v:.1e}" for k, v in errs.items()))
            assert errs["out"] < TOL, "the forward does not depend on the flag"
            assert max(errs.values()) > TOL, f"drop {drop}: op_matches_fp64's check would pass"
            caught = [k for k in must_fail if errs[k] > 3 * TOL]
            assert caught == list(must_fail), f"drop {drop}: the check missed it ({errs})"
    finally:
        metric_kernel.BREAK_DERIVATIVE = 0


def deterministic():
    """Two backward passes give the same bits (no atomics, fixed summation order)."""
    m = make_learner()
    x = torch.randn(ROWS, DK, requires_grad=True)
    dout = torch.randn(ROWS, DK)
    grads = []
    for _ in range(2):
        m.zero_grad(set_to_none=True)
        x.grad = None
        metric_kernel.metric_learner(x, *metric_kernel.learner_params(m), eps=m.eps).backward(dout)
        grads.append([x.grad] + [p.grad for p in metric_kernel.learner_params(m)])
    assert all(torch.equal(a, b) for a, b in zip(*grads))
    print("backward bit-identical twice")


def unaligned_input():
    """A0 rows whose storage is not 16-byte aligned (TMA descriptors need it) and a
    non-contiguous output gradient give the same numbers as aligned, contiguous ones."""
    m = make_learner()
    params = metric_kernel.learner_params(m)
    x = torch.randn(ROWS, DK)
    shifted = torch.empty(ROWS * DK + 1)[1:].view(ROWS, DK).copy_(x).requires_grad_(True)
    assert shifted.data_ptr() % 16
    dout = torch.randn(DK, ROWS)
    results = []
    for xin, d in ((x.clone().requires_grad_(True), dout.t().contiguous()), (shifted, dout.t())):
        m.zero_grad(set_to_none=True)
        out = metric_kernel.metric_learner(xin, *params, eps=m.eps)
        out.backward(d)
        results.append([out.detach(), xin.grad] + [p.grad for p in params])
    assert all(torch.equal(a, b) for a, b in zip(*results))
    print("unaligned input ok")


def no_zero_gradients_for_saved_outputs():
    """The op's saved outputs z and ys get no gradient, and autograd must not fill zero tensors
    of their size for them (on an H100 ~0.19 ms a call at pldr-110m mb 128): the backward may
    make no zeros of z's or ys's shape."""
    from torch.utils._python_dispatch import TorchDispatchMode

    fills = (torch.ops.aten.zeros_like.default, torch.ops.aten.zeros.default, torch.ops.aten.fill_.Scalar,
             torch.ops.aten.zero_.default, torch.ops.aten.new_zeros.default)

    class Zeros(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.shapes = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func in fills:
                self.shapes.append(tuple(out.shape))
            return out

    m = make_learner()
    x = torch.randn(ROWS, DK, requires_grad=True)
    out = metric_kernel.metric_learner(x, *metric_kernel.learner_params(m), eps=m.eps)
    R, n = m.shape
    with Zeros() as mode:
        out.backward(torch.randn(ROWS, DK))
    saved = {(R, ROWS, DK), (R * n, ROWS, DK)}
    assert not saved & set(mode.shapes), f"zero tensors of the saved outputs' shapes made: {mode.shapes}"
    print(f"zero fills in the backward: {mode.shapes}")


def opcheck():
    """The ops' fake (meta) kernels match the real outputs, as torch.compile relies on, and
    autograd is registered."""
    m = make_learner()
    params = [p.detach().requires_grad_(True) for p in metric_kernel.learner_params(m)]
    x = torch.randn(ROWS, DK, requires_grad=True)
    torch.library.opcheck(metric_kernel.metric_learner_op, (x, *params, m.eps),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    _, z, ys = metric_kernel.metric_learner_op(x.detach(), *[p.detach() for p in params], m.eps)
    torch.library.opcheck(metric_kernel.metric_learner_backward,
                          (torch.randn(ROWS, DK), x.detach(), z, ys, *[p.detach() for p in params], m.eps),
                          test_utils=("test_schema", "test_faketensor"))
    print("opcheck ok")


def fast_path_uses_op():
    """optimize_for_training with the whole-learner op (use_fused_learner=True; on CPUs the
    default keeps it to CUDA): one op call per layer, eager and compiled the same numbers,
    losses within bf16 of the eager PyTorch model and of the per-GLU kernel path; fp32 runs
    never use it."""
    calls = [0]
    run = metric_kernel._learner_fwd_tuned.run

    def counting(*args, **kwargs):
        calls[0] += 1
        return run(*args, **kwargs)
    metric_kernel._learner_fwd_tuned.run = counting
    torch.manual_seed(0)
    cfg = preset("tiny", num_heads=2, d_model=2 * DK, head_dim=DK, a_dff=A, num_layers=1)
    base = PLDRModel(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (1, 17))     # 32 learner rows per layer

    def loss_and_grads(fast, compile=False, fused=True, autocast=True):
        model = copy.deepcopy(base)
        if fast:
            optimize_for_training(model, compile=compile, cuda_graphs=False, backend="aot_eager")
            for module in model.modules():
                if isinstance(module, FusedMetricLearner):
                    module.use_fused_learner = True if fused else None
        calls[0] = 0
        with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            loss = model(tokens[:, :-1], targets=tokens[:, 1:])
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()], calls[0]

    fused, grads, n = loss_and_grads(True)
    assert n == cfg.num_layers, f"op ran {n} times, expected {cfg.num_layers}"
    compiled, cgrads, n = loss_and_grads(True, compile=True)
    assert n == cfg.num_layers, f"compiled: op ran {n} times"
    assert torch.equal(fused, compiled) and all(torch.equal(a, b) for a, b in zip(grads, cgrads))
    per_glu, _, n = loss_and_grads(True, fused=False)
    assert n == 0, "use_fused_learner=None must keep the op to CUDA"
    eager, _, _ = loss_and_grads(False)
    for other in (per_glu, eager):
        assert abs(fused.item() - other.item()) / other.item() < 1e-2, (fused.item(), other.item())
    # (The whole model's gradients are not compared: at this size every bf16 path, eager
    # included, is O(1) away from fp32 in the learner's gradients; op_matches_fp64 checks them.)
    assert all(torch.isfinite(g).all() for g in grads)
    # DeepSpeed's bf16: bf16 parameters, no autocast; A must come out bf16 as PyTorch's
    # LayerNorm gives it (an fp32 A made q G_LM fp32 against bf16 k and v in SDPA)
    base_fp32, base = base, copy.deepcopy(base).bfloat16()
    pure, _, n = loss_and_grads(True, autocast=False)
    assert n == cfg.num_layers, f"bf16 parameters: op ran {n} times"
    pure_eager, _, _ = loss_and_grads(False, autocast=False)
    assert abs(pure.item() - pure_eager.item()) / pure_eager.item() < 2e-2, (pure.item(), pure_eager.item())
    learner = next(m for m in base.modules() if isinstance(m, MetricLearner))
    fast = copy.deepcopy(learner)
    fast.__class__, fast.use_fused_learner = FusedMetricLearner, True
    a0 = torch.randn(4, DK, dtype=torch.bfloat16)
    assert fast(a0).dtype == learner(a0).dtype == torch.bfloat16
    base = base_fp32
    fp32, _, n = loss_and_grads(True, autocast=False)
    assert n == 0, "fp32 must not use the bf16 op"
    fp32_eager, _, _ = loss_and_grads(False, autocast=False)
    assert abs(fp32.item() - fp32_eager.item()) < 1e-5
    print(f"fast path ok: loss fused {fused.item():.5f} per-GLU {per_glu.item():.5f} eager {eager.item():.5f}")


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


def fast_path_uses_head_products():
    """The fast path's PLGA and power law (use_head_products=True, use_kernel=True; on CPUs
    the default keeps the ops to CUDA) run A0, q G and the power law through the ops, once
    each a layer, with the loss within bf16 of the same fast path without them, compiled and
    not the same numbers; a G = I model's q G too."""
    calls = {"density": 0, "times_g": 0, "power_law": 0}
    modules = {"density": head_products, "times_g": head_products, "power_law": power_law_kernel}

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
        assert calls == dict.fromkeys(calls, cfg.num_layers), calls
        compiled, cgrads = loss_and_grads(True, compile=True)
        assert torch.equal(ops, compiled) and all(torch.equal(a, b) for a, b in zip(grads, cgrads))
        calls.update(dict.fromkeys(calls, 0))
        plain, _ = loss_and_grads(None)
        assert calls == dict.fromkeys(calls, 0), "use_head_products / use_kernel None must keep the ops to CUDA"
        base = PLDRModel(preset("tiny", num_heads=2, d_model=2 * DK, head_dim=DK, num_layers=1, mode="v510G"))
        fixed_g, _ = loss_and_grads(True)
        assert calls == {"density": 0, "times_g": 1, "power_law": 0}, calls
        fixed_plain, _ = loss_and_grads(None)
    finally:
        for name, op in originals.items():
            setattr(modules[name], name, op)
    assert abs(ops.item() - plain.item()) / plain.item() < 1e-2, (ops.item(), plain.item())
    assert all(torch.isfinite(g).all() for g in grads)
    assert abs(fixed_g.item() - fixed_plain.item()) / fixed_plain.item() < 1e-2, (fixed_g.item(), fixed_plain.item())
    print(f"fast path head products and power law ok: loss {ops.item():.5f} against {plain.item():.5f} "
          "with torch.matmul and PowerLaw.forward")


def q_gradient_ops_match_fp64():
    """The folded backward's two ops: q_grad = dqg G^T + q M within bf16 accuracy of fp64 (laid
    out like q), and not what G in place of G^T gives; times_g_weight_grad = times_g_backward's
    dG bit for bit."""
    q, g = _head_inputs()
    torch.manual_seed(2)
    dqg = torch.randn(2, 3, 37, DK).to(torch.bfloat16)
    m = torch.randn(2, 3, DK, DK).to(torch.bfloat16)
    dq = head_products.q_grad(dqg, g, q, m)
    g64 = g.to(torch.bfloat16).double()
    ref = dqg.double() @ g64.transpose(-1, -2) + q.double() @ m.double()
    err, wrong = _rel(dq.double(), ref), _rel(dq.double(), dqg.double() @ g64 + q.double() @ m.double())
    assert err < TOL and wrong > 10 * TOL and dq.stride() == q.stride() and dq.dtype == q.dtype, (err, wrong)
    assert torch.equal(head_products.times_g_weight_grad(dqg, q, g), head_products.times_g_backward(dqg, q, g)[1])
    for op, args in ((head_products.q_grad, (dqg, g, q, m)), (head_products.times_g_weight_grad, (dqg, q, g))):
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))
    print(f"q_grad ok: {err:.1e} against fp64, {wrong:.2f} with G for G^T")


def q_gradient_pass_folds_the_backward():
    """install() puts the pass into inductor's post-grad passes once; fold_q_gradients on the
    compiled backward of a 2-layer fast-path model (AOTAutograd's real graph, run eagerly after the
    pass): each layer's (times_g_backward, head_product, add) becomes (times_g_weight_grad, q_grad);
    the loss is the same bits, and so is every gradient of the last layer but wq's (dG is
    unchanged; q~'s gradient is rounded once instead of three times)."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    from pldr_dist.model.q_gradient_pass import fold_q_gradients

    folded = []

    def backward_compiler(gm, _):
        folded.append(fold_q_gradients(gm.graph))
        gm.recompile()
        targets = {n.target for n in gm.graph.nodes}
        assert torch.ops.pldr.times_g_backward.default not in targets and torch.ops.pldr.q_grad.default in targets
        return make_boxed_func(gm)

    torch.manual_seed(0)
    base = PLDRModel(preset("tiny", num_heads=2, d_model=2 * DK, head_dim=DK, a_dff=A, num_layers=2))
    tokens = torch.randint(0, base.cfg.vocab_size, (2, 17))

    def loss_and_grads(backend):
        model = copy.deepcopy(base)
        optimize_for_training(model, compile=True, cuda_graphs=False, backend=backend)
        for module in model.modules():
            if isinstance(module, FastPLGA):
                module.use_head_products = True
        with torch.autocast("cpu", torch.bfloat16):
            loss = model(tokens[:, :-1], targets=tokens[:, 1:])
        loss.backward()
        return loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}

    from torch._inductor import config as inductor_config

    from pldr_dist.model.q_gradient_pass import FoldQGradients, install
    before = inductor_config.post_grad_custom_post_pass
    install()
    install()                                                    # once, however often it is called
    assert isinstance(inductor_config.post_grad_custom_post_pass, FoldQGradients)
    inductor_config.post_grad_custom_post_pass = before
    loss, grads = loss_and_grads("aot_eager")
    loss_f, grads_f = loss_and_grads(aot_autograd(fw_compiler=lambda gm, _: make_boxed_func(gm), bw_compiler=backward_compiler))
    assert folded == [1], folded                       # one graph serves both layers: one fold in it
    assert torch.equal(loss, loss_f)
    # The last layer: only wq's gradient depends on q~'s, within bf16 rounding; every other one the
    # same bits. Earlier layers get the change through the residual stream and their own learner
    # (whose bf16 gradients at this size move by percents for any rounding change, as every
    # bf16 path's do): a loose bound there, a wrong fold would be O(1) in wq's already.
    errs = {k: _rel(grads_f[k].double(), grads[k].double()) for k in grads}
    last = {k: e for k, e in errs.items() if k.startswith("layers.1.")}
    assert all(e == 0 for k, e in last.items() if ".wq." not in k), last
    assert 0 < max(last.values()) < 1e-2, last
    assert max(errs.values()) < 0.1, errs
    print(f"q gradient pass ok: the last layer's wq gradient within {max(last.values()):.1e} of the unfolded "
          f"graph's, the rest the same bits; earlier layers within {max(errs.values()):.1e}")


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


def rejects_bad_head_dim():
    m = MetricLearner(preset("tiny", num_heads=2, head_dim=24, d_model=48, a_dff=A))
    try:
        metric_kernel.metric_learner(torch.randn(8, 24), *metric_kernel.learner_params(m), eps=m.eps)
    except ValueError as e:
        assert "power-of-two head_dim" in str(e), e
        print("bad head_dim refused")
        return
    raise AssertionError("head_dim 24 was accepted")


if __name__ == "__main__":
    from subprocess_checks import main
    main(globals())
