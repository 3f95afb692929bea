"""KV-cache and G-cache generation (spec §6, §11.3), fp64, batched prompts with left padding."""
import pytest
import torch

from pldr_dist.infer.generate import SamplingConfig, generate, left_pad
from pldr_dist.model import PLDRModel, preset
from pldr_dist.model.ablation import fixed_g_copy

PROMPTS = [[5, 17, 42, 9, 300, 8, 77], [11, 12], [400, 401, 402, 3, 200]]
STEPS = 8


def tiny_model():
    torch.manual_seed(0)
    return PLDRModel(preset("tiny")).double().eval()


def run(model, cache_mode):
    greedy = SamplingConfig(max_new_tokens=STEPS, stop_at_eos=False)
    return generate(model, PROMPTS, greedy, cache_mode=cache_mode, keep_logits=True)


def max_step_diff(a, b):
    return max((x - y).abs().max().item() for x, y in zip(a.step_logits, b.step_logits))


def test_kv_g_and_kv_plus_g_caches_give_the_same_logits_every_step():
    model = tiny_model()
    kv_g, kv, g = run(model, "kv+g"), run(model, "kv"), run(model, "g")
    assert len(kv_g.step_logits) == STEPS
    assert max_step_diff(kv_g, kv) <= 1e-12
    assert max_step_diff(kv_g, g) <= 1e-12
    assert kv_g.tokens == kv.tokens == g.tokens


def test_cached_generation_equals_full_recompute_with_g_frozen_from_the_prompt():
    model = tiny_model()
    cached = run(model, "kv+g")
    prompt_g = [g_lm for _, _, g_lm in model.deductive_outputs(left_pad(PROMPTS, 0))]  # [B, h, dk, dk]
    for layer, g in zip(cached.cache.layers, prompt_g):
        assert (layer.g_lm - g).abs().max().item() <= 1e-12
    frozen = fixed_g_copy(model, prompt_g).eval()
    recomputed = run(frozen, "none")             # no cache: re-runs the growing sequence
    assert max_step_diff(cached, recomputed) <= 1e-12
    assert cached.tokens == recomputed.tokens


def test_no_cache_recomputes_g_from_the_growing_sequence():
    model = tiny_model()
    cached, plain = run(model, "kv+g"), run(model, "none")
    assert (cached.step_logits[0] - plain.step_logits[0]).abs().max().item() <= 1e-12
    # Later steps differ because A0, hence G_LM, now includes the generated tokens.
    assert max_step_diff(cached, plain) > 1e-6
    # ... and no-cache equals a plain forward of the learned-G model over the whole sequence.
    seq = left_pad(PROMPTS, 0)
    for step, logits in enumerate(plain.step_logits):
        with torch.no_grad():
            full = model(seq)[:, -1]
        assert (full - logits).abs().max().item() <= 1e-12
        seq = torch.cat((seq, logits.argmax(-1, keepdim=True)), dim=1)


def test_fixed_g_model_caches_agree_with_no_cache():
    """With G fixed (v510G) nothing depends on A0, so all four cache modes agree."""
    torch.manual_seed(0)
    model = PLDRModel(preset("tiny", mode="v510G", fixed_g="random")).double().eval()
    reference = run(model, "none")
    for mode in ("kv+g", "kv", "g"):
        assert max_step_diff(reference, run(model, mode)) <= 1e-12, mode


def test_static_decoder_equals_the_dynamic_kv_g_path_with_padding_and_pad_fed_rows():
    """The fixed-shape decoder (the one replayed as a CUDA graph on a GPU) runs eagerly here:
    same logits as the growing caches, for learned G, fixed G and identity G (SDPA floor)."""
    from pldr_dist.infer.static_decode import StaticDecoder
    from pldr_dist.model import InferenceCache
    torch.manual_seed(0)
    sdpa = PLDRModel(preset("tiny", mode="v510G", fixed_g="identity")).double().eval()
    for layer in sdpa.layers:
        layer.attn.skip_identity_g = True
    fixed = PLDRModel(preset("tiny", mode="v510G", fixed_g="random")).double().eval()
    for model in (tiny_model(), fixed, sdpa):
        greedy = SamplingConfig(max_new_tokens=STEPS, stop_at_eos=False)
        dynamic = generate(model, PROMPTS, greedy, cache_mode="kv+g", keep_logits=True, static=False)
        static = generate(model, PROMPTS, greedy, cache_mode="kv+g", keep_logits=True, static=True)
        assert max_step_diff(dynamic, static) <= 1e-12
        assert dynamic.tokens == static.tokens
    # rows fed a pad token (finished rows) keep that position masked, as the dynamic path does
    model = tiny_model()
    seq = left_pad(PROMPTS, 0)
    cache = InferenceCache(model.cfg.num_layers)
    with torch.no_grad():
        model(seq, cache=cache)
        decoder = StaticDecoder(model, cache, seq.shape[1] + 3)
        feeds = [torch.tensor([[7], [0], [9]]), torch.tensor([[8], [0], [10]]), torch.tensor([[1], [5], [2]])]
        for feed in feeds:
            assert (decoder.step(feed) - model(feed, cache=cache)[:, -1]).abs().max().item() <= 1e-12
        with pytest.raises(ValueError, match="holds 10 positions; raise max_len"):
            decoder.step(feeds[0])
