"""Initialisation statistics match the reference (spec §4), on the pldr-110m preset."""
import math

import torch
from torch import nn

from pldr_dist.model import PLDRModel, preset


def xavier_std(weight):
    fan_out, fan_in = weight.shape[0], weight.shape[1] * weight[0, 0].numel()
    return math.sqrt(2.0 / (fan_in + fan_out))


def assert_std(tensor, expected, what):
    got = tensor.detach().float().std().item()
    assert abs(got - expected) <= 0.1 * expected, f"{what}: std {got:.4g}, expected {expected:.4g}"


def assert_linears(linears, weight_std, what):
    for name, linear in linears:
        assert_std(linear.weight, weight_std(linear.weight), f"{what} {name}.weight")
        assert torch.count_nonzero(linear.bias) == 0, f"{what} {name}.bias is not zero"


def check_model(model, wv_xavier):
    cfg = model.cfg
    dk, h = cfg.head_dim, cfg.num_heads
    assert_std(model.embed.tokens.weight, 1.0, "embedding")
    assert abs(model.embed.tokens.weight.mean().item()) < 0.01
    xavier = [("head", model.head)]
    for i, layer in enumerate(model.layers):
        attn = layer.attn
        xavier += [(f"layers.{i}.attn.{n}", getattr(attn, n)) for n in ("wq", "wk", "wo")]
        xavier += [(f"layers.{i}.ffn.{n}", getattr(layer.ffn, n)) for n in ("w1", "w2", "w3")]
        xavier += [(f"layers.{i}.attn.metric.{n}", m) for n, m in attn.metric.named_modules()
                   if isinstance(m, nn.Linear)]
        if wv_xavier:
            xavier.append((f"layers.{i}.attn.wv", attn.wv))
        else:   # PyTorch default: kaiming_uniform(a=sqrt 5) weight, U(+-1/sqrt d) bias
            bound = 1 / math.sqrt(cfg.d_model)
            assert_std(attn.wv.weight, bound / math.sqrt(3), f"layers.{i}.attn.wv.weight")
            assert_std(attn.wv.bias, bound / math.sqrt(3), f"layers.{i}.attn.wv.bias")
            assert attn.wv.weight.abs().max() <= bound and attn.wv.bias.abs().max() <= bound
        for name in ("W", "P", "alpha"):
            assert_std(getattr(attn.power, name), math.sqrt(2 / (dk * dk + h * dk)), f"layers.{i}.{name}")
        for name in ("b", "beta"):
            assert torch.count_nonzero(getattr(attn.power, name)) == 0
    assert_linears(xavier, xavier_std, "xavier_uniform")
    for name, m in model.named_modules():
        if isinstance(m, nn.LayerNorm):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0), name


def test_pldr_110m_initialisation_matches_the_reference():
    torch.manual_seed(0)
    model = PLDRModel(preset("pldr-110m"))
    assert abs(math.sqrt(2 / (64 * 64 + 14 * 64)) - 0.0200) < 1e-4   # the spec's figure
    check_model(model, wv_xavier=False)


def test_fixed_wv_init_uses_xavier_for_wv():
    torch.manual_seed(0)
    check_model(PLDRModel(preset("pldr-110m", num_layers=1, fixed_wv_init=True)), wv_xavier=True)
