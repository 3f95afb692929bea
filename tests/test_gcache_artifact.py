"""G-cache artifact: generation equals the in-memory G-cache, cache modes agree (spec §6), refusals."""
import pytest
import torch

from pldr_dist.convert.consolidated import CheckpointError
from pldr_dist.infer.gcache_artifact import (FingerprintError, compute_g_cache, load_artifact, parameter_bytes,
                                             save_artifact, to_inference_model)
from pldr_dist.infer.generate import SamplingConfig, generate
from pldr_dist.model import PLDRModel, preset

PROMPTS = [[5, 9, 44, 7, 100], [17, 3 + 30, 250]]


def tiny64(seed=0):
    torch.manual_seed(seed)
    return PLDRModel(preset("tiny")).to(torch.float64).eval()


@pytest.mark.parametrize("source,tokens", [("eos", None), ("prompt", [11, 12, 13, 14]), ("random", None)])
def test_generation_with_artifact_equals_in_memory_g_cache(tmp_path, source, tokens):
    model = tiny64()
    g, a_lm = compute_g_cache(model, source, tokens)
    path = save_artifact(tmp_path / "g.safetensors", g, a_lm, model, source)
    art = load_artifact(path, model)
    assert art.meta["source"] == source and art.meta["mode"] == "v510Gi" and torch.equal(art.g_lm, g)
    fast = to_inference_model(model, art)
    assert not any(".metric." in k or ".power." in k for k in fast.state_dict())
    assert parameter_bytes(fast) < parameter_bytes(model)
    sampling = SamplingConfig(max_new_tokens=6, stop_at_eos=False)
    want = generate(model, PROMPTS, sampling, cache_mode="kv+g", keep_logits=True, g_init=list(g))
    got = generate(fast, PROMPTS, sampling, cache_mode="kv", keep_logits=True)
    assert got.tokens == want.tokens
    for a, b in zip(got.step_logits, want.step_logits):
        assert (a - b).abs().max().item() <= 1e-12
    sampled = SamplingConfig(max_new_tokens=6, temperature=0.8, top_k=50, top_p=0.9, seed=3, stop_at_eos=False)
    assert generate(fast, PROMPTS, sampled, "kv").tokens == generate(model, PROMPTS, sampled, "kv+g", g_init=list(g)).tokens


def test_eos_source_is_the_g_of_the_single_end_token():
    model = tiny64()
    g, _ = compute_g_cache(model, "eos")
    outs = model.deductive_outputs(torch.tensor([[model.cfg.eos_id]]))
    assert all(torch.equal(g[i], outs[i][2][0]) for i in range(model.cfg.num_layers))


def test_cache_modes_agree_as_spec_says():
    model = tiny64()
    sampling = SamplingConfig(max_new_tokens=8, stop_at_eos=False)
    runs = {mode: generate(model, PROMPTS, sampling, cache_mode=mode, keep_logits=True) for mode in ("kv+g", "kv", "g", "none")}
    for mode in ("kv", "g"):
        assert runs[mode].tokens == runs["kv+g"].tokens
        for a, b in zip(runs[mode].step_logits, runs["kv+g"].step_logits):
            assert (a - b).abs().max().item() <= 1e-12
    # without caches G_LM follows the growing sequence: the first step agrees, later ones need not
    assert (runs["none"].step_logits[0] - runs["kv+g"].step_logits[0]).abs().max().item() <= 1e-12


def test_artifact_refusals(tmp_path):
    model, other = tiny64(0), tiny64(1)
    g, a_lm = compute_g_cache(other, "eos")
    path = save_artifact(tmp_path / "other.safetensors", g, a_lm, other, "eos")
    with pytest.raises(FingerprintError, match="computed from another model.*--foreign-g"):
        load_artifact(path, model)
    with pytest.raises(FingerprintError):
        to_inference_model(model, load_artifact(path))
    foreign = to_inference_model(model, load_artifact(path, model, foreign=True), foreign=True)
    assert torch.equal(foreign.layers[0].attn.G_fixed, g[0])
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="corrupt or not a G-cache artifact"):
        load_artifact(path, model)
