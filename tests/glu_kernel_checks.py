"""Checks of the Triton GLU (pldr_dist.model.glu_kernel) run in Triton's CPU interpreter.

TRITON_INTERPRET must be set before Triton is imported, so test_glu_kernel.py runs them in a
process of their own: `python tests/glu_kernel_checks.py NAME [NAME ...]` (subprocess_checks.py).
"""
from __future__ import annotations

import copy
import os
import sys

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from pldr_dist.model import PLDRModel, glu_kernel  # noqa: E402
from pldr_dist.model.config import preset  # noqa: E402
from pldr_dist.model.fast import optimize_for_training  # noqa: E402
from torch import nn  # noqa: E402
from pldr_dist.model.model import lm_loss  # noqa: E402

NAMES = ("x", "w1", "b1", "w2", "b2", "w3", "b3")


def glu_params(dk, a, dtype=torch.float32):
    """(U1, c1, U2, c2, U3, c3) of one GLU dk -> a -> dk, PyTorch's default Linear init."""
    linears = (nn.Linear(dk, a), nn.Linear(dk, a), nn.Linear(a, dk))
    return [p.detach().to(dtype).requires_grad_(True) for m in linears for p in (m.weight, m.bias)]


def _rel(a, ref):
    return ((a.double() - ref).norm() / ref.norm()).item()


def op_matches_fp64():
    """Output and all seven gradients against fp64 on the same bf16-rounded inputs, for fp32
    master weights (autocast) and bf16 weights (DeepSpeed bf16); 200 rows (a partial row
    block), hidden width 170 (a masked tail chunk)."""
    torch.manual_seed(0)
    for wdtype, xdtype in ((torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16)):
        params = glu_params(64, 170, wdtype)
        x = torch.randn(200, 64).to(xdtype).requires_grad_(True)
        dy = torch.randn(200, 64).bfloat16()
        ref = [t.detach().bfloat16().double().requires_grad_(True) for t in [x, *params]]
        xr, w1, b1, w2, b2, w3, b3 = ref
        F.linear(F.silu(F.linear(xr, w1, b1)) * F.linear(xr, w2, b2), w3, b3).backward(dy.double())
        y = glu_kernel.glu(x, *params)
        y.backward(dy)
        with torch.no_grad():
            yref = F.linear(F.silu(F.linear(xr, w1, b1)) * F.linear(xr, w2, b2), w3, b3)
        assert y.dtype == torch.bfloat16 and y.shape == x.shape
        # bf16 rounding (truncating, in the interpreter) gives ~1e-2; a wrong index or
        # derivative gives O(1).
        assert _rel(y, yref) < 3e-2, _rel(y, yref)
        for name, t, r in zip(NAMES, [x, *params], ref):
            assert t.grad.dtype == t.dtype and t.grad.shape == t.shape, name
            err = _rel(t.grad, r.grad)
            assert err < 3e-2, f"{name} ({wdtype}): relative error {err:.3g}"
        print(f"op vs fp64 ok for {wdtype} weights")


def opcheck():
    """The ops' fake (meta) kernels match the real outputs, as torch.compile relies on."""
    torch.manual_seed(0)
    params = glu_params(64, 40)
    x = torch.randn(50, 64)
    ws = [p.detach() for p in params]
    torch.library.opcheck(glu_kernel.glu, (x.requires_grad_(True), *[w.requires_grad_(True) for w in ws]),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    torch.library.opcheck(glu_kernel.glu_backward, (torch.randn(50, 64).bfloat16(), x.detach(), *ws[:5]),
                          test_utils=("test_schema", "test_faketensor"))
    print("opcheck ok")


def fast_path_uses_kernel():
    """optimize_for_training runs the kernel under bf16 autocast (eager and compiled, the same
    numbers), keeps it off in fp32, and the loss stays within bf16 of the PyTorch GLU."""
    calls = [0]
    run = glu_kernel._glu_fwd.run

    def counting(*args, **kwargs):
        calls[0] += 1
        return run(*args, **kwargs)
    glu_kernel._glu_fwd.run = counting
    try:
        _fast_path_uses_kernel(calls)
    finally:   # the next check runs in this process (subprocess_checks.py)
        glu_kernel._glu_fwd.run = run


def _fast_path_uses_kernel(calls):
    torch.manual_seed(0)
    cfg = preset("tiny", head_dim=16, a_dff=40)
    base = PLDRModel(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (2, 33))
    glus = cfg.num_layers * cfg.num_residual_units * cfg.glus_per_unit

    def loss_and_grads(compile, kernel, autocast):
        model = copy.deepcopy(base)
        optimize_for_training(model, compile=compile, cuda_graphs=False, backend="aot_eager", triton_glu=kernel)
        calls[0] = 0
        with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            loss = model(tokens[:, :-1], targets=tokens[:, 1:])
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()], calls[0]

    eager, grads, n = loss_and_grads(False, True, True)
    assert n == glus, f"kernel ran {n} times, expected {glus}"
    compiled, cgrads, n = loss_and_grads(True, True, True)
    assert n == glus, f"compiled: kernel ran {n} times, expected {glus}"
    assert torch.equal(eager, compiled) and all(torch.equal(a, b) for a, b in zip(grads, cgrads))
    torch_glu, _, n = loss_and_grads(False, False, True)
    assert n == 0
    assert abs(eager.item() - torch_glu.item()) / torch_glu.item() < 1e-2, (eager.item(), torch_glu.item())
    fp32_kernel, g32, n = loss_and_grads(False, True, False)
    assert n == 0, "fp32 must not use the bf16 kernel"
    fp32_torch, g32t, _ = loss_and_grads(False, False, False)
    assert torch.equal(fp32_kernel, fp32_torch) and all(torch.equal(a, b) for a, b in zip(g32, g32t))
    print("fast path ok")


def rejects_bad_head_dim():
    params = glu_params(24, 40)
    try:
        glu_kernel.glu(torch.randn(8, 24), *params)
    except ValueError as e:
        assert "power-of-two head_dim" in str(e), e
        print("bad head_dim refused")
        return
    raise AssertionError("head_dim 24 was accepted")


if __name__ == "__main__":
    from subprocess_checks import main
    main(globals())
