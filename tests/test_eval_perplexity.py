"""Perplexity on held-out shards equals exp of the mean token loss computed independently."""
from __future__ import annotations

import json
import math
import os

import numpy as np
import torch
from eval_helpers import tiny_model

from pldr_dist.convert.consolidated import save_consolidated
from pldr_dist.data.manifest import FORMAT, Manifest
from pldr_dist.data.shard_writer import write_shard
from pldr_dist.eval.cli import main as pldr_eval
from pldr_dist.eval.model_io import g_from_prompt, with_fixed_g
from pldr_dist.eval.perplexity import evaluate_loss, evaluate_shards

SEQ = 16


def write_valid_shards(folder, samples_per_shard=(5, 7), vocab=512, seed=0):
    """Two 'valid' shards of random token samples (seq_len + 1 each), with their manifest."""
    rng = np.random.default_rng(seed)
    shards, all_samples, first = [], [], 0
    for index, count in enumerate(samples_per_shard):
        samples = rng.integers(4, vocab, (count, SEQ + 1)).astype(np.uint16)
        name = f"valid-{index:06d}.tar"
        digest = write_shard(os.path.join(folder, name), samples, first)
        first += count
        shards.append({"name": name, "samples": count, "tokens": count * (SEQ + 1), "sha256": digest})
        all_samples.append(samples)
    manifest = Manifest(os.path.join(folder, "manifest.json"), {
        "format": FORMAT, "seq_len": SEQ, "sample_len": SEQ + 1, "dtype": "uint16",
        "tokenizer": {"fingerprint": "test", "vocab_size": vocab, "pad_id": 0, "eos_id": 3},
        "splits": {"train": [], "valid": shards}})
    manifest.save()
    return manifest.path, torch.tensor(np.concatenate(all_samples).astype(np.int64))


@torch.no_grad()
def independent_mean_loss(model, samples: torch.Tensor) -> float:
    """Every sample alone, per-token cross-entropy summed in fp64, divided by the token count."""
    total, count = 0.0, 0
    for row in samples:
        logits = model(row[None, :-1])[0].double()
        total += float(torch.nn.functional.cross_entropy(logits, row[1:], reduction="sum"))
        count += SEQ
    return total / count


def test_shard_perplexity_is_exp_of_independent_mean_token_loss(tmp_path, capsys):
    manifest, samples = write_valid_shards(str(tmp_path))
    model = tiny_model()
    want = independent_mean_loss(model, samples)
    got = evaluate_shards(model, manifest, "valid", batch_size=4)   # 12 samples: 3 full batches
    assert got["tokens"] == 12 * SEQ
    assert abs(got["loss"] - want) < 1e-10 and abs(got["perplexity"] - math.exp(want)) < 1e-8 * math.exp(want)

    folder = tmp_path / "consolidated"
    save_consolidated(model, str(folder), dtype="fp64")
    assert pldr_eval(["perplexity", "--model", str(folder), "--shards", manifest, "--batch-size", "4",
                      "--dtype", "float64"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert abs(printed["perplexity"] - math.exp(want)) < 1e-8 * math.exp(want)

    fixed = with_fixed_g(model, g_from_prompt(model, [model.cfg.eos_id]))
    assert pldr_eval(["perplexity", "--model", str(folder), "--shards", manifest, "--batch-size", "4",
                      "--dtype", "float64", "--fixed-g", "eos"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert abs(printed["loss"] - independent_mean_loss(fixed, samples)) < 1e-10

    # the same G from an artifact, read by the G-cache loader pldr-generate uses
    from pldr_dist.convert.consolidated import load_consolidated
    from pldr_dist.infer.gcache_artifact import compute_g_cache, save_artifact
    stored = load_consolidated(folder)
    save_artifact(tmp_path / "g.safetensors", *compute_g_cache(stored, "eos"), stored, "eos")
    assert pldr_eval(["perplexity", "--model", str(folder), "--shards", manifest, "--batch-size", "4",
                      "--dtype", "float64", "--gcache", str(tmp_path / "g.safetensors")]) == 0
    assert abs(json.loads(capsys.readouterr().out)["loss"] - printed["loss"]) < 1e-10


def test_validation_loss_weighs_batches_by_non_pad_targets():
    """A batch with padded targets counts by its real tokens, not as one batch among many."""
    model = tiny_model(seed=3)
    torch.manual_seed(3)
    a = torch.randint(4, 512, (2, SEQ + 1))
    b = torch.randint(4, 512, (3, SEQ + 1))
    b[:, 6:] = 0                                   # right-padded rows: 5 real targets each
    batches = [{"input": x[:, :-1], "target": x[:, 1:]} for x in (a, b)]
    mean, tokens = evaluate_loss(model, batches)
    total, count = 0.0, 0
    with torch.no_grad():
        for x in (a, b):
            logits = model(x[:, :-1]).double()
            per_token = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten(), reduction="none")
            keep = x[:, 1:].flatten().ne(0)
            total += float(per_token[keep].sum())
            count += int(keep.sum())
    assert tokens == count == 2 * SEQ + 3 * 5
    assert abs(mean - total / count) < 1e-12
