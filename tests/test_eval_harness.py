"""A local lm_eval task runs end to end through the adapter (no network).

A tiny model trained in the test to memorise the task's correct answers scores accuracy 1.0;
the same model untrained does not. The run goes through the G-cache comparison, so both
columns (learned G and fixed G) come out of the real harness.
"""
from __future__ import annotations

import json
import os
import time

import torch
from eval_helpers import ByteTokenizer, tiny_model
from lm_eval.tasks import TaskManager

from pldr_dist.eval.compare import compare_gcache, run_tasks
from pldr_dist.eval.lm_eval_adapter import PLDRLM
from pldr_dist.eval.model_io import g_from_prompt, with_fixed_g
from pldr_dist.model import lm_loss

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASK_DIR = os.path.join(ROOT, "tests", "data", "lm_eval_task")
TOK = ByteTokenizer()


def memorise(model, steps: int = 200):
    """Plain AdamW on '<eos> question correct-answer' rows until the answers are memorised."""
    with open(os.path.join(TASK_DIR, "pldr_tiny_qa.jsonl")) as f:
        docs = [json.loads(line) for line in f]
    rows = [[TOK.eos_id] + TOK.encode(d["question"] + d["choices"][d["answer"]]) for d in docs]
    width = max(map(len, rows))
    batch = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        batch[i, :len(r)] = torch.tensor(r)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        loss = lm_loss(model(batch[:, :-1]), batch[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), loss.item()


def test_local_task_accuracy_is_one_after_memorising_and_not_before(monkeypatch):
    monkeypatch.chdir(ROOT)   # the task YAML names its JSONL relative to the repository root
    torch.set_num_threads(1)
    manager = TaskManager(include_path=TASK_DIR)
    model = tiny_model(seed=0, dtype=torch.float32)
    t0 = time.time()
    untrained = run_tasks(PLDRLM(model=model, tokenizer=TOK), ["pldr_tiny_qa"], manager)
    assert untrained["pldr_tiny_qa"]["acc"] < 1.0

    print(f'untrained run {time.time() - t0:.1f}s'); t0 = time.time()
    model, loss = memorise(model)
    print(f'training {time.time() - t0:.1f}s')
    print(f'memorised: final loss {loss:.3f} (the first letter after <eos> is not predictable)')
    fixed = with_fixed_g(model, g_from_prompt(model, [model.cfg.eos_id]))
    uncached, cached, table = compare_gcache(PLDRLM(model=model, tokenizer=TOK, batch_size=4),
                                             PLDRLM(model=fixed, tokenizer=TOK, batch_size=4),
                                             ["pldr_tiny_qa"], manager)
    print(table)
    assert uncached["pldr_tiny_qa"]["acc"] == 1.0
    assert "pldr_tiny_qa" in cached and "G-cache" in table


def test_pldr_eval_harness_cli_loads_a_consolidated_folder_like_the_python_api(monkeypatch, tmp_path):
    """`pldr-eval harness --model pldr --model_args pretrained=<folder>` (lm_eval's own command line)
    gives the same accuracy as the Python API on the same folder (real SentencePiece tokenizer)."""
    from pldr_dist.data.tokenizer import train_tokenizer
    from pldr_dist.eval.cli import main as pldr_eval
    from pldr_dist.convert.consolidated import save_consolidated

    monkeypatch.chdir(ROOT)
    corpus = tmp_path / "corpus.txt"
    with open(os.path.join(TASK_DIR, "pldr_tiny_qa.jsonl")) as f:
        corpus.write_text("\n\n".join(json.loads(line)["question"] + " blue green red woof moo meow 3 4 5 6 7 8"
                                      for line in f) * 20)
    tok = train_tokenizer([str(corpus)], str(tmp_path / "tok.model"), vocab_size=290)
    folder = tmp_path / "consolidated"
    save_consolidated(tiny_model(seed=5, dtype=torch.float64), str(folder), dtype="fp64", tokenizer=tok.path)

    want = run_tasks(PLDRLM(pretrained=str(folder), dtype="float64"), ["pldr_tiny_qa"],
                     TaskManager(include_path=TASK_DIR))["pldr_tiny_qa"]["acc"]
    out = tmp_path / "results"
    pldr_eval(["harness", "--model", "pldr", "--model_args", f"pretrained={folder},dtype=float64",
               "--tasks", "pldr_tiny_qa", "--include_path", TASK_DIR, "--batch_size", "4",
               "--output_path", str(out)])
    (result_file,) = [os.path.join(d, f) for d, _, fs in os.walk(out) for f in fs if f.startswith("results")]
    with open(result_file) as f:
        assert json.load(f)["results"]["pldr_tiny_qa"]["acc,none"] == want
