"""`pldr-demo` (the README's first command runs it) end to end at a small size: tokenizer and
shards, training under torchrun, consolidation, the G_LM cache export, and generation with the
inference-only model. Each stage's product is checked, not just the exit code."""
import json
import os

import torch

from pldr_dist.demo import main as demo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_demo_trains_consolidates_exports_the_gcache_and_generates(tmp_path, capfd):
    from pldr_dist.convert.consolidated import load_consolidated
    from pldr_dist.infer.gcache_artifact import load_artifact

    corpus = tmp_path / "corpus.txt"
    with open(os.path.join(ROOT, "data", "tinyshakespeare.txt")) as f:
        corpus.write_text(f.read()[:120_000])
    work = tmp_path / "work"
    assert demo(["--corpus", str(corpus), "--work", str(work), "--steps", "4", "--prompt", "ROMEO:",
                 "--prompt", "KING HENRY:"]) == 0
    captured = capfd.readouterr()
    out, err = captured.out, captured.err
    steps = [json.loads(line)["step"] for line in open(work / "demo" / "metrics.jsonl") if '"loss"' in line]
    assert steps and steps[-1] == 4 and steps == sorted(set(steps)), steps   # the steps it was asked for, once each
    model = load_consolidated(work / "demo-model")
    final = torch.load(work / "demo" / "checkpoints" / "step_00000004" / "mp_rank_00_model_states.pt",
                       weights_only=False)["module"]
    assert all(torch.equal(model.state_dict()[k], v.to(model.state_dict()[k].dtype)) for k, v in final.items())
    artifact = load_artifact(str(work / "demo-gcache.safetensors"), model)
    assert len(artifact.g_lm) == model.cfg.num_layers
    generated = [line for line in out.splitlines() if line.startswith(("ROMEO:\t", "KING HENRY:\t"))]
    assert len(generated) == 2 and all(len(line.split("\t", 1)[1]) > 0 for line in generated), out[-2000:]
    assert "[pldr-generate] inference-only model (v510Gi)" in err + out and "demo finished" in out
