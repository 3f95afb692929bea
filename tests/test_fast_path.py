"""The fast training path computes the same loss and gradients as the eager model (CPU, fp32)."""
import copy

import torch

from pldr_dist.model import PLDRModel
from pldr_dist.model.config import preset
from pldr_dist.model.fast import FusedMetricLearner, PaddedSwiGLU, optimize_for_training
from pldr_dist.model.layers import apply_rotary, rotary_cache
from pldr_dist.model.model import lm_loss


def _loss_and_grads(model, fast, tokens):
    """The fast path's loss is model(x, targets=y); the eager reference applies lm_loss."""
    model.zero_grad(set_to_none=True)
    x, y = tokens[:, :-1], tokens[:, 1:]
    loss = model(x, targets=y) if fast else lm_loss(model(x), y)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _check(compile_backend):
    torch.manual_seed(0)
    cfg = preset("tiny", a_dff=30)  # 30 is not a multiple of 8: exercises the zero padding
    eager = PLDRModel(cfg)
    fast = copy.deepcopy(eager)
    optimize_for_training(fast, compile=compile_backend is not None, backend=compile_backend or "inductor")
    assert fast.state_dict().keys() == eager.state_dict().keys()
    assert any(isinstance(m, FusedMetricLearner) for m in fast.modules())
    assert any(isinstance(m, PaddedSwiGLU) for m in fast.modules())   # d_ff = 170: padded to 192
    assert all(layer.attn.rope_cache is not None for layer in fast.layers)
    tokens = torch.randint(4, cfg.vocab_size, (2, 33))  # packed: no pad tokens
    ref_loss, ref_grads = _loss_and_grads(eager, False, tokens)
    loss, grads = _loss_and_grads(fast, True, tokens)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-6, msg=name)


def test_fused_glus_match_eager_loss_and_gradients():
    _check(None)


def test_compiled_layers_capture_without_graph_breaks_and_match_eager():
    _check("aot_eager")  # fullgraph=True: a graph break would raise


def test_rotary_cache_gives_the_computed_rotation_bit_for_bit():
    x = torch.randn(2, 3, 40, 16)
    for style in ("interleaved", "half"):
        cache = rotary_cache(64, 16, 10000.0, style, "cpu")
        for offset in (0, 7, 24):   # 24 + 40 = 64: the cache's last row
            ref = apply_rotary(x, offset, 10000.0, style)
            assert torch.equal(apply_rotary(x, offset, 10000.0, style, cache), ref)
            assert torch.equal(apply_rotary(x.bfloat16(), offset, 10000.0, style, cache),
                               apply_rotary(x.bfloat16(), offset, 10000.0, style))
    # the table is what gets used: a zeroed one zeroes the rotation
    assert not apply_rotary(x, 0, 10000.0, "half", torch.zeros_like(cache)).any()
    # past the cache's end, a tensor offset (the graph-captured decoder) or fp64: computed
    assert torch.equal(apply_rotary(x, 30, 10000.0, "half", cache), apply_rotary(x, 30, 10000.0, "half"))
    assert torch.equal(apply_rotary(x, torch.tensor(3), 10000.0, "half", cache), apply_rotary(x, 3, 10000.0, "half"))
    assert torch.equal(apply_rotary(x.double(), 3, 10000.0, "half", cache), apply_rotary(x.double(), 3, 10000.0, "half"))


def test_rotary_rotates_the_spec_pairs():
    """x * C + swap(x) * S' is the pairwise rotation (x_a cos - x_b sin, x_b cos + x_a sin) with
    pairs (2i, 2i+1) interleaved and (i, i + dk/2) half, bit for bit."""
    x = torch.randn(2, 3, 40, 16, dtype=torch.float64)
    pos = torch.arange(5, 45, dtype=torch.float64)[:, None]
    theta = pos * 10000.0 ** (-torch.arange(0, 16, 2, dtype=torch.float64) / 16)
    cos, sin = theta.cos(), theta.sin()
    for style, (a, b) in (("interleaved", (x[..., 0::2], x[..., 1::2])), ("half", (x[..., :8], x[..., 8:]))):
        ra, rb = a * cos - b * sin, b * cos + a * sin
        want = torch.stack((ra, rb), -1).flatten(-2) if style == "interleaved" else torch.cat((ra, rb), -1)
        assert torch.equal(apply_rotary(x, 5, 10000.0, style), want), style
