"""The model against an independent transformer written here from the spec (§3), fp64.

The reference below shares no code with pldr_dist.model: it reads the weights from the
state dict and writes embedding, LayerNorm, interleaved rotary (as complex rotations), the
deductive path, attention, post-LN blocks, SwiGLU and the head by hand.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from pldr_dist.model import PLDRModel, preset


@pytest.fixture(autouse=True)
def float64_default():
    """fp64 for this module's tests only (a module-level set_default_dtype leaks into every
    test collected after it)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def layer_norm(x, w, b, eps=1e-6):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * w + b


def linear(x, sd, name):
    return x @ sd[name + ".weight"].T + sd[name + ".bias"]


def rotate_interleaved(x, base=10000.0):
    """x [B, S, h, dk]: pairs (2i, 2i+1) are complex numbers multiplied by exp(i p theta_i)."""
    B, S, h, dk = x.shape
    theta = 1.0 / base ** (torch.arange(dk // 2, dtype=torch.float64) * 2 / dk)
    phase = torch.polar(torch.ones(S, dk // 2), torch.arange(S, dtype=torch.float64)[:, None] * theta)
    z = torch.view_as_complex(x.reshape(B, S, h, dk // 2, 2).contiguous())
    return torch.view_as_real(z * phase[None, :, None, :]).reshape(B, S, h, dk)


def reference_g(sd, p, q_rot, cfg):
    """G_LM [B, h, dk, dk] from rotated queries [B, h, S, dk] (spec §3 steps 3-6)."""
    a = torch.einsum("bhsi,bhsj->bhij", q_rot, q_rot)
    a = layer_norm(a, sd[p + "metric.in_norm.weight"], sd[p + "metric.in_norm.bias"])
    for r in range(cfg.num_residual_units):
        y = a
        for j in range(cfg.glus_per_unit):
            u = f"{p}metric.units.{r}.glus.{j}."
            y = linear(F.silu(linear(y, sd, u + "u1")) * linear(y, sd, u + "u2"), sd, u + "u3")
        a = layer_norm(y + a, sd[f"{p}metric.units.{r}.norm.weight"], sd[f"{p}metric.units.{r}.norm.bias"])
    y = torch.einsum("hij,bhjk->bhik", sd[p + "power.W"], a) + sd[p + "power.b"]
    a_lm = y * y * torch.sigmoid(y) + 1e-9
    a_p = a_lm ** sd[p + "power.P"]
    return torch.einsum("hij,bhjk->bhik", sd[p + "power.alpha"], a_p) + sd[p + "power.beta"]


def reference_logits(model, tokens, learned_g):
    cfg, sd = model.cfg, model.interchange_state_dict()
    B, S = tokens.shape
    h, dk = cfg.num_heads, cfg.head_dim
    x = sd["embed.tokens.weight"][tokens] * math.sqrt(cfg.d_model)
    x = layer_norm(x, sd["embed.norm.weight"], sd["embed.norm.bias"])
    future = torch.arange(S)[None, :] > torch.arange(S)[:, None]
    masked = future[None, None] | tokens.eq(cfg.pad_id)[:, None, None, :]
    for i in range(cfg.num_layers):
        p = f"layers.{i}.attn."
        q = rotate_interleaved(linear(x, sd, p + "wq").view(B, S, h, dk)).transpose(1, 2)
        k = rotate_interleaved(linear(x, sd, p + "wk").view(B, S, h, dk)).transpose(1, 2)
        v = linear(x, sd, p + "wv").view(B, S, h, dk).transpose(1, 2)
        if learned_g:
            q = q @ reference_g(sd, p, q, cfg)
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=masked.to(q.dtype) * -1e9)
        x = layer_norm(linear(att.transpose(1, 2).reshape(B, S, -1), sd, p + "wo") + x,
                       sd[f"layers.{i}.norm1.weight"], sd[f"layers.{i}.norm1.bias"])
        f = f"layers.{i}.ffn."
        ffn = linear(F.silu(linear(x, sd, f + "w1")) * linear(x, sd, f + "w2"), sd, f + "w3")
        x = layer_norm(ffn + x, sd[f"layers.{i}.norm2.weight"], sd[f"layers.{i}.norm2.bias"])
    return linear(x, sd, "head")


def batches(cfg):
    g = torch.Generator().manual_seed(1)
    plain = torch.randint(4, cfg.vocab_size, (3, 24), generator=g)
    padded = plain.clone()
    padded[0, :7] = cfg.pad_id            # left padding
    padded[1, 20:] = cfg.pad_id           # right padding
    return plain, padded


def max_diff_on_real_queries(a, b, tokens, pad_id):
    """Pad-position queries see only -1e9-masked keys (their rows are rounding noise, and they
    never reach a real token's output), so real tokens' logits are compared."""
    keep = tokens.ne(pad_id)
    return (a - b)[keep].abs().max().item()


def test_identity_g_logits_equal_an_independent_sdpa_transformer():
    for attention in ("sdpa", "explicit"):
        torch.manual_seed(0)
        model = PLDRModel(preset("tiny", mode="v510G", fixed_g="identity", attention=attention)).double()
        for tokens in batches(model.cfg):
            with torch.no_grad():
                got, want = model(tokens), reference_logits(model, tokens, learned_g=False)
            assert max_diff_on_real_queries(got, want, tokens, 0) <= 1e-12, attention


def test_learned_g_logits_equal_an_independent_plga_transformer():
    for attention in ("sdpa", "explicit"):
        torch.manual_seed(0)
        model = PLDRModel(preset("tiny", attention=attention)).double()
        for tokens in batches(model.cfg):
            with torch.no_grad():
                got, want = model(tokens), reference_logits(model, tokens, learned_g=True)
            # 1e-11, not 1e-12: A_LM ** P amplifies rounding where A_LM is near its 1e-9 floor.
            assert max_diff_on_real_queries(got, want, tokens, 0) <= 1e-11, attention


def test_a0_sums_over_padding_and_future_positions():
    """Spec §11.6: A0 has no mask, so changing a later token changes earlier logits."""
    torch.manual_seed(0)
    model = PLDRModel(preset("tiny")).double()
    tokens = batches(model.cfg)[0]
    changed = tokens.clone()
    changed[:, -1] = (changed[:, -1] + 1) % model.cfg.vocab_size
    with torch.no_grad():
        early = (model(tokens) - model(changed))[:, :-1].abs().max().item()
    assert early > 1e-6


def test_a_file_missing_one_glu_tensor_is_refused_in_one_line():
    """A truncated per-GLU file (one tensor gone) names the stacked tensor, not a stack() error."""
    import pytest
    from pldr_dist.errors import InputError
    sd = PLDRModel(preset("tiny")).interchange_state_dict()
    del sd["layers.0.attn.metric.units.1.glus.0.u2.bias"]
    with pytest.raises(InputError, match=r"layers\.0\.attn\.metric\.u2_bias: .* incomplete \(3 of the \(2, 2\) blocks\)"):
        PLDRModel(preset("tiny")).load_state_dict(sd)
