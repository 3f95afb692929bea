"""Checks of the fused head + loss (pldr_dist.model.head_loss) run in Triton's CPU interpreter.

TRITON_INTERPRET must be set before Triton is imported, so test_head_loss.py runs them in a
process of their own: `python tests/head_loss_checks.py NAME [NAME ...]` (subprocess_checks.py).
"""
from __future__ import annotations

import copy
import os
import sys

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from pldr_dist.model import PLDRModel, head_loss  # noqa: E402
from pldr_dist.model.config import preset  # noqa: E402
from pldr_dist.model.fast import optimize_for_training  # noqa: E402
from pldr_dist.model.model import lm_loss  # noqa: E402

PAD = 0


def _case(vocab=300, d=24, seed=0):
    torch.manual_seed(seed)
    head = torch.nn.Linear(d, vocab)
    h = torch.randn(2, 37, d) * 2
    targets = torch.randint(1, vocab, (2, 37))
    targets[0, :5] = PAD          # ignored positions
    targets[1, -1] = vocab - 1    # the last column
    return head, h, targets


def _grads(fn, head, h, targets, factor=1.0):
    head = copy.deepcopy(head)
    x = h.clone().requires_grad_(True)
    loss = fn(x, head, targets)
    (loss * factor).backward()
    return loss.detach(), [x.grad, head.weight.grad, head.bias.grad]


def _plain(x, head, targets):
    return lm_loss(F.linear(x, head.weight, head.bias), targets, PAD)


def _fused(x, head, targets):
    return head_loss.head_loss(x, head, targets, PAD)


def _assert_match(vocab, block, factor=1.0):
    default, head_loss.BLOCK_V = head_loss.BLOCK_V, block
    head, h, targets = _case(vocab)
    ref_loss, ref = _grads(_plain, head, h, targets, factor)
    try:
        loss, got = _grads(_fused, head, h, targets, factor)
    finally:   # the next check runs in this process (subprocess_checks.py)
        head_loss.BLOCK_V = default
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    for name, g, r in zip(("h", "weight", "bias"), got, ref):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-7, msg=f"{name} gradient, V={vocab}, block={block}")


def check_matches_plain_loss():
    """Loss and gradients of h, W and b against cross-entropy on F.linear, pad targets ignored:
    one masked block (V < BLOCK), several blocks with a tail, and an exact multiple."""
    for vocab, block in ((300, 4096), (300, 128), (256, 64)):
        _assert_match(vocab, block)


def check_scales_with_incoming_gradient():
    _assert_match(300, 128, factor=0.37)   # e.g. 1 / gradient-accumulation steps


def check_out_of_vocabulary_target_makes_loss_and_gradients_nan():
    head, h, targets = _case(vocab=300)
    assert torch.isfinite(_fused(h, head, targets))
    targets[1, 3] = 300
    loss, grads = _grads(_fused, head, h, targets)
    assert torch.isnan(loss) and all(torch.isnan(g).any() for g in grads)


def check_second_backward_raises():
    head, h, targets = _case()
    x = h.clone().requires_grad_(True)
    loss = _fused(x, head, targets)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward"):
        loss.backward()


def check_model_computes_its_loss_with_it():
    """PLDRModel(tokens, targets=...) runs the fused op (as the fast path and the trainer call
    it); loss and all gradients equal lm_loss on the eager model's logits."""
    torch.manual_seed(0)
    cfg = preset("tiny")
    eager = PLDRModel(cfg)
    fast = copy.deepcopy(eager)
    optimize_for_training(fast, compile=False)
    tokens = torch.randint(4, cfg.vocab_size, (2, 33))
    calls = []
    real = head_loss._HeadLoss.apply
    head_loss._HeadLoss.apply = lambda *a: calls.append(1) or real(*a)
    try:
        loss = fast(tokens[:, :-1], targets=tokens[:, 1:])
    finally:   # the next check runs in this process (subprocess_checks.py)
        del head_loss._HeadLoss.apply
    assert calls, "the fused op did not run"
    loss.backward()
    ref = lm_loss(eager(tokens[:, :-1]), tokens[:, 1:])
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    # Each gradient within 1e-5 of its own largest entry (worst seen 1.5e-6): element by element,
    # the ill-conditioned power-law gradients' fp32 rounding differs between CPUs (power.W's
    # entries up to 8.3 are 4.8e-6 apart on an AVX2 machine), and a wrong gradient is off by O(1).
    for (name, p), q in zip(fast.named_parameters(), eager.parameters()):
        err = ((p.grad - q.grad).abs().max() / q.grad.abs().max()).item()
        assert err <= 1e-5, f"{name}: gradient off by {err:.2e} of its largest entry"


if __name__ == "__main__":
    from subprocess_checks import main
    main(globals(), prefix="check_")
