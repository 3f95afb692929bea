"""A local lm_eval task runs end to end through the adapter (no network).

A tiny model trained in the test to memorise the task's correct answers scores accuracy 1.0;
the same model untrained does not. The run goes through the G-cache comparison, so both
columns (learned G and fixed G) come out of the real harness.
"""
from __future__ import annotations

import json
import os
import time

import pytest
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
    """Plain AdamW on 'question correct-answer' rows until the answers are memorised: the very
    tokens the harness scores (the task's target_delimiter is empty, and a non-empty context gets
    no [END] before it). Trained on '<eos> question answer', the model was scored on text it had
    not seen (no <eos>, and a second space before each choice) and its accuracy hung on the seed
    and the summation order of a backward (0.5-1.0 over four seeds)."""
    with open(os.path.join(TASK_DIR, "pldr_tiny_qa.jsonl")) as f:
        docs = [json.loads(line) for line in f]
    rows = [TOK.encode(d["question"] + d["choices"][d["answer"]]) for d in docs]
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
    manager = TaskManager(include_path=TASK_DIR, include_defaults=False)   # lm_eval's own tasks: 11 s to index
    model = tiny_model(seed=0, dtype=torch.float32)
    t0 = time.time()
    untrained = run_tasks(PLDRLM(model=model, tokenizer=TOK), ["pldr_tiny_qa"], manager)
    assert untrained["pldr_tiny_qa"]["acc"] < 1.0

    print(f'untrained run {time.time() - t0:.1f}s'); t0 = time.time()
    model, loss = memorise(model)
    print(f'training {time.time() - t0:.1f}s')
    print(f'memorised: final loss {loss:.3f}')
    fixed = with_fixed_g(model, g_from_prompt(model, [model.cfg.eos_id]))
    uncached, cached, table = compare_gcache(PLDRLM(model=model, tokenizer=TOK, batch_size=4),
                                             PLDRLM(model=fixed, tokenizer=TOK, batch_size=4),
                                             ["pldr_tiny_qa"], manager)
    print(table)
    assert uncached["pldr_tiny_qa"]["acc"] == 1.0
    assert "pldr_tiny_qa" in cached and "G-cache" in table


@pytest.fixture(scope="module")
def consolidated(tmp_path_factory):
    """A consolidated fp64 folder of an untrained tiny model with a SentencePiece tokenizer
    trained on the task's questions."""
    from pldr_dist.convert.consolidated import save_consolidated
    from pldr_dist.data.tokenizer import train_tokenizer

    tmp_path = tmp_path_factory.mktemp("consolidated")
    corpus = tmp_path / "corpus.txt"
    with open(os.path.join(TASK_DIR, "pldr_tiny_qa.jsonl")) as f:
        corpus.write_text("\n\n".join(json.loads(line)["question"] + " blue green red woof moo meow 3 4 5 6 7 8"
                                      for line in f) * 20)
    tok = train_tokenizer([str(corpus)], str(tmp_path / "tok.model"), vocab_size=290)
    folder = tmp_path / "consolidated"
    # The model's vocabulary is the tokenizer's (text generated from it decodes); with this seed its
    # accuracy differs with and without the G-cache (0.25, 0.375), so swapped columns would show.
    save_consolidated(tiny_model(seed=11, dtype=torch.float64, vocab_size=290), str(folder), dtype="fp64",
                      tokenizer=tok.path)
    return folder


def test_pldr_eval_harness_cli_loads_a_consolidated_folder_like_the_python_api(consolidated, monkeypatch, tmp_path):
    """`pldr-eval harness --model pldr --model_args pretrained=<folder>` (lm_eval's own command line)
    gives the same accuracy as the Python API on the same folder (real SentencePiece tokenizer)."""
    from pldr_dist.eval.cli import main as pldr_eval

    monkeypatch.chdir(ROOT)
    folder = consolidated
    want = run_tasks(PLDRLM(pretrained=str(folder), dtype="float64"), ["pldr_tiny_qa"],
                     TaskManager(include_path=TASK_DIR, include_defaults=False))["pldr_tiny_qa"]["acc"]
    out = tmp_path / "results"
    pldr_eval(["harness", "--model", "pldr", "--model_args", f"pretrained={folder},dtype=float64",
               "--tasks", "pldr_tiny_qa", "--include_path", TASK_DIR, "--batch_size", "4",
               "--output_path", str(out)])
    (result_file,) = [os.path.join(d, f) for d, _, fs in os.walk(out) for f in fs if f.startswith("results")]
    with open(result_file) as f:
        assert json.load(f)["results"]["pldr_tiny_qa"]["acc,none"] == want


def test_pldr_eval_compare_gcache_cli_prints_the_scores_with_and_without_the_g_cache(consolidated, monkeypatch,
                                                                                     capsys):
    """`pldr-eval compare-gcache` on a folder scores the model as it is, then the model with G_LM
    fixed from the end-of-sequence prompt (its two harness runs are recorded here: same logits as
    those two models built here), and prints one row per metric with both scores and their difference."""
    from pldr_dist.convert.consolidated import load_consolidated
    from pldr_dist.eval import compare
    from pldr_dist.eval.cli import main as pldr_eval

    monkeypatch.chdir(ROOT)
    runs = []
    real_run_tasks = compare.run_tasks
    monkeypatch.setattr(compare, "run_tasks", lambda lm, *a, **k: runs.append((lm.model, real_run_tasks(lm, *a, **k)))
                        or runs[-1][1])
    capsys.readouterr()
    assert pldr_eval(["compare-gcache", "--model", str(consolidated), "--tasks", "pldr_tiny_qa", "--include-path",
                      TASK_DIR, "--batch-size", "4", "--dtype", "float64"]) == 0
    out = capsys.readouterr().out.splitlines()

    model = load_consolidated(consolidated).double().eval()
    fixed = with_fixed_g(model, g_from_prompt(model, [model.cfg.eos_id]))
    tokens = torch.randint(4, model.cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    assert len(runs) == 2
    with torch.no_grad():
        for (scored, _), want in zip(runs, (model, fixed)):
            assert scored.cfg.mode == want.cfg.mode
            assert torch.equal(scored(tokens), want(tokens))
        assert not torch.equal(model(tokens), fixed(tokens))

    assert out[0] == f"model {consolidated}; G-cache computed from the end-of-sequence prompt", out
    assert out[1].split() == ["task", "metric", "no", "G-cache", "G-cache", "diff"], out
    plain, cached = runs[0][1]["pldr_tiny_qa"], runs[1][1]["pldr_tiny_qa"]
    printed = {row.split()[1]: [float(v) for v in row.split()[2:]] for row in out[2:] if row.startswith("pldr_tiny_qa")}
    assert printed.keys() == plain.keys() and "acc" in printed, (out, plain)
    assert plain["acc"] != cached["acc"]    # the fixture's model: the two columns differ
    for metric, values in printed.items():
        assert values == pytest.approx([plain[metric], cached[metric], cached[metric] - plain[metric]], abs=1e-4), \
            (metric, values, plain, cached)


def test_pldr_generate_encodes_text_prompts_and_decodes_with_the_folders_tokenizer(consolidated, tmp_path, capsys):
    """pldr-generate with text prompts (no --token-ids): each prompt is encoded by the folder's
    tokenizer.model, the greedy continuation decoded with it: `prompt<TAB>text` per line."""
    import sentencepiece as spm

    from pldr_dist.convert.consolidated import load_consolidated
    from pldr_dist.infer import SamplingConfig, generate
    from pldr_dist.infer.cli import generate_main

    prompts = ["What colour is the sky?", "A cow says"]
    (tmp_path / "prompts.txt").write_text("".join(p + "\n" for p in prompts))
    sp = spm.SentencePieceProcessor(model_file=str(consolidated / "tokenizer.model"))
    model = load_consolidated(consolidated)
    tokens = generate(model, [sp.encode(p) for p in prompts], SamplingConfig(max_new_tokens=6)).tokens
    assert all(len(t) > 0 for t in tokens)
    capsys.readouterr()
    generate_main([str(consolidated), "--prompts", str(tmp_path / "prompts.txt"), "--max-new-tokens", "6"])
    captured = capsys.readouterr()
    assert captured.out.splitlines() == [f"{p}\t{sp.decode(t)}" for p, t in zip(prompts, tokens)], captured
    assert "2 prompts" in captured.err


def test_pldr_generate_never_samples_ids_the_tokenizer_lacks(consolidated, tmp_path, capsys):
    """A model whose vocabulary is larger than its tokenizer's (the trainer accepts that): the ids
    past the tokenizer's pieces are never generated, though here their logits are the largest
    (before, decoding one raised a raw IndexError)."""
    import sentencepiece as spm

    from pldr_dist.convert.consolidated import save_consolidated
    from pldr_dist.infer import SamplingConfig, generate
    from pldr_dist.infer.cli import generate_main

    sp = spm.SentencePieceProcessor(model_file=str(consolidated / "tokenizer.model"))
    pieces = sp.get_piece_size()
    model = tiny_model(seed=11, dtype=torch.float64, vocab_size=pieces + 10)
    with torch.no_grad():
        model.head.bias[pieces:] = 1e3
    prompts = ["A cow says", "What colour is the sky?"]
    ids = [sp.encode(p) for p in prompts]
    unlimited = generate(model, ids, SamplingConfig(max_new_tokens=4, stop_at_eos=False)).tokens
    assert all(t >= pieces for gen in unlimited for t in gen)      # what the limit has to stop
    sampled = generate(model, ids, SamplingConfig(max_new_tokens=4, temperature=1.0, seed=3, stop_at_eos=False,
                                                  vocab_limit=pieces)).tokens
    assert all(0 <= t < pieces for gen in sampled for t in gen)
    limited = generate(model, ids, SamplingConfig(max_new_tokens=4, vocab_limit=pieces)).tokens
    folder = save_consolidated(model, str(tmp_path / "wide"), dtype="fp64", tokenizer=consolidated / "tokenizer.model")
    (tmp_path / "prompts.txt").write_text("".join(p + "\n" for p in prompts))
    capsys.readouterr()
    generate_main([str(folder), "--prompts", str(tmp_path / "prompts.txt"), "--max-new-tokens", "4"])
    out = capsys.readouterr().out.splitlines()
    assert out == [f"{p}\t{sp.decode(t)}" for p, t in zip(prompts, limited)], out


def test_a_local_task_folder_is_indexed_without_lm_evals_own_tasks(monkeypatch):
    """compare-gcache indexes lm_eval's ~15,000 tasks (~16 s) only when --include-path lacks a task."""
    import lm_eval.tasks

    from pldr_dist.eval.compare import task_manager_for
    local = task_manager_for(["pldr_tiny_qa"], TASK_DIR)
    assert "pldr_tiny_qa" in local.all_subtasks and "arc_easy" not in local.all_tasks
    built = []

    class Recording(lm_eval.tasks.TaskManager):     # records what is indexed, indexes the folder only
        def __init__(self, include_path=None, include_defaults=True, **kwargs):
            built.append(include_defaults)
            super().__init__(include_path=include_path, include_defaults=False, **kwargs)
    monkeypatch.setattr(lm_eval.tasks, "TaskManager", Recording)
    task_manager_for(["pldr_tiny_qa", "arc_easy"], TASK_DIR)
    assert built == [False, True]            # the folder alone lacked arc_easy: the full index next
    built.clear()
    task_manager_for(["arc_easy"])
    assert built == [True]
