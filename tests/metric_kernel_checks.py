"""Checks of the whole-learner Triton op (pldr_dist.model.metric_kernel) in Triton's CPU interpreter.

TRITON_INTERPRET must be set before Triton is imported, and the interpreter is slow to start,
so test_metric_kernel.py runs all checks in one process, head_products_checks.py's too
(subprocess_checks.py; one check by hand:
`TRITON_INTERPRET=1 python tests/metric_kernel_checks.py NAME`). Tiny shapes: 40 rows (blocks of
32, the last partial), head_dim 16, a_dff 24 in chunks of 16 (`metric_kernel.INTERP_BH`: a padded tail),
R = 2 units of n = 2.
"""
from __future__ import annotations

import copy
import os

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"

import torch  # noqa: E402

from pldr_dist.model import PLDRModel, metric_kernel  # noqa: E402
from pldr_dist.model.config import preset  # noqa: E402
from pldr_dist.model.fast import FusedMetricLearner, optimize_for_training  # noqa: E402
from pldr_dist.model.plga import MetricLearner  # noqa: E402

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
    # head_products_checks.py's checks run in this process too: one interpreter start for both
    from head_products_checks import (fast_path_uses_head_products, head_products_match_fp64,  # noqa: F401
                                      power_law_matches_fp64, rotary_density_matches_fp64)
    from subprocess_checks import main
    main(globals())
