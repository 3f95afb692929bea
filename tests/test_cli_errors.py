"""Every console script against bad input: one line `pldr-<tool>: error: ...` on stderr, exit 2,
and nothing half-written under the output's name (pldr_dist/errors.py is the one boundary).

The scripts run in this process (their `main(argv)`), except pldr-train on a corrupted shard,
which runs under torchrun: there the error surfaces inside a rank of a launched job.
"""
import os
import pickle
import re
import shutil
from pathlib import Path

import pytest
import torch

import train_helpers
from pldr_dist.convert.consolidated import save_consolidated
from pldr_dist.errors import PLDRError, error_line
from pldr_dist.model import PLDRModel, preset

ROOT = Path(__file__).resolve().parents[1]


def one_line_error(capsys, main, argv, prog, *says):
    """main(argv) fails with exit status 2 and exactly one stderr line, `prog: error: ...`."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), err
    for text in says:
        assert text in lines[0], lines[0]
    return lines[0]


def nothing_written(path):
    """Neither the output nor a temporary sibling of it exists."""
    path = Path(path)
    assert not path.exists(), path
    siblings = list(path.parent.iterdir()) if path.parent.is_dir() else []
    leftovers = [p.name for p in siblings if p.name.startswith((f"{path.name}.", f".{path.name}."))]
    assert not leftovers, leftovers


class _System:
    def __reduce__(self):
        return (os.system, ("touch SHOULD_NOT_EXIST",))


class _BadArgs:   # an allowed callable given nonsense: OrderedDict(5) raises TypeError
    def __reduce__(self):
        import collections
        return (collections.OrderedDict, (5,))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A good consolidated folder, one whose model.safetensors is truncated, and bad input files."""
    root = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    good = save_consolidated(PLDRModel(preset("tiny")), root / "good")
    bad = root / "truncated"
    shutil.copytree(good, bad)
    weights = bad / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    (root / "evil.pkl").write_bytes(pickle.dumps(_System()))
    (root / "random.pkl").write_bytes(bytes(range(256)) * 4)
    (root / "empty.pkl").write_bytes(b"")
    (root / "nonsense.pkl").write_bytes(pickle.dumps(_BadArgs()))
    (root / "prompts.txt").write_text("5 9 44\n")
    return root


def test_model_loaders_say_which_file_is_corrupt(folders, tmp_path, capsys):
    from pldr_dist.convert.cli import main as convert
    from pldr_dist.eval.cli import main as pldr_eval
    from pldr_dist.infer.cli import export_gcache_main, gcache_check_main, generate_main

    bad, corrupt = str(folders / "truncated"), "model.safetensors: corrupt safetensors file"
    one_line_error(capsys, pldr_eval, ["perplexity", "--model", bad, "--shards", str(tmp_path)], "pldr-eval", corrupt)
    one_line_error(capsys, generate_main, [bad, "--prompts", str(folders / "prompts.txt"), "--token-ids"],
                   "pldr-generate", corrupt)
    one_line_error(capsys, export_gcache_main, [bad, str(tmp_path / "g.safetensors")], "pldr-export-gcache", corrupt)
    nothing_written(tmp_path / "g.safetensors")
    one_line_error(capsys, convert, ["to-hf", bad, str(tmp_path / "hf")], "pldr-convert", corrupt)
    nothing_written(tmp_path / "hf")
    one_line_error(capsys, convert, ["to-reference", str(tmp_path / "missing"), str(tmp_path / "ref.pt")],
                   "pldr-convert", "missing", "no such checkpoint folder")
    nothing_written(tmp_path / "ref.pt")
    # a corrupt artifact, and a G-cache of another model
    (tmp_path / "art.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    one_line_error(capsys, gcache_check_main, [str(folders / "good"), str(tmp_path / "art.safetensors"), "--prompts",
                                               str(folders / "prompts.txt"), "--token-ids", "--plot",
                                               str(tmp_path / "c.png")], "pldr-gcache-check", "art.safetensors")
    nothing_written(tmp_path / "c.png")
    one_line_error(capsys, pldr_eval, ["perplexity", "--model", str(folders / "good"), "--shards", str(tmp_path),
                                       "--gcache", str(tmp_path / "art.safetensors")], "pldr-eval",
                   "corrupt or not a G-cache artifact")
    # text prompts need the folder's tokenizer, which this folder lacks
    one_line_error(capsys, generate_main, [str(folders / "good"), "--prompts", str(folders / "prompts.txt")],
                   "pldr-generate", "no tokenizer.model")


def test_pickles_are_refused_in_one_line_and_nothing_runs(folders, tmp_path, capsys, monkeypatch):
    from pldr_dist.convert.cli import main as convert

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "g.safetensors"
    line = one_line_error(capsys, convert, ["g-pickle", str(folders / "evil.pkl"), str(out), "--preset", "tiny"],
                          "pldr-convert", "evil.pkl", ".system", "refusing to load it")
    assert "Traceback" not in line and not (tmp_path / "SHOULD_NOT_EXIST").exists()
    nothing_written(out)
    one_line_error(capsys, convert, ["g-pickle", str(folders / "random.pkl"), str(out), "--preset", "tiny"],
                   "pldr-convert", "random.pkl", "not a readable pickle")
    for name in ("empty.pkl", "nonsense.pkl"):    # EOFError, TypeError inside the unpickler
        one_line_error(capsys, convert, ["g-pickle", str(folders / name), str(out), "--preset", "tiny"],
                       "pldr-convert", name, "not a readable pickle")
    one_line_error(capsys, convert, ["g-pickle", str(tmp_path / "none.pkl"), str(out), "--preset", "tiny"],
                   "pldr-convert", "none.pkl")
    nothing_written(out)


def test_wrong_layouts_and_checkpoints(folders, tmp_path, capsys):
    from pldr_dist.convert.cli import main as convert
    from pldr_dist.convert.consolidate import main as consolidate
    from pldr_dist.convert.names import to_authors
    from pldr_dist.convert.reshard import main as reshard

    # the authors' v510G ablation: no metric learner, the G in a separate pickle not given
    model = PLDRModel(preset("tiny", mode="v510G", fixed_g="external"))
    state = {to_authors(k): v for k, v in model.interchange_state_dict().items() if not k.endswith("G_fixed")}
    torch.save({"model_state_dict": state}, tmp_path / "v510G.pt")
    one_line_error(capsys, convert, ["from-reference", str(tmp_path / "v510G.pt"), str(tmp_path / "out"),
                                     "--preset", "tiny"], "pldr-convert", "no metric learner", "--gcache")
    # a G of the wrong shape for the preset
    (tmp_path / "g.pkl").write_bytes(pickle.dumps([torch.zeros(1, 2, 8, 8)] * 2))
    one_line_error(capsys, convert, ["from-reference", str(tmp_path / "v510G.pt"), str(tmp_path / "out"),
                                     "--preset", "tiny", "--gcache", str(tmp_path / "g.pkl")], "pldr-convert",
                   "g.pkl", "does the model preset match?")
    one_line_error(capsys, convert, ["from-reference", str(tmp_path / "v510G.pt"), str(tmp_path / "out")],
                   "pldr-convert", "--preset")
    nothing_written(tmp_path / "out")
    # a folder that is no training checkpoint, and a checkpoint whose run config is corrupt
    one_line_error(capsys, consolidate, [str(folders / "good"), str(tmp_path / "c")], "pldr-consolidate",
                   "neither a checkpoint folder")
    tag = tmp_path / "ckpt" / "step_00000002"
    tag.mkdir(parents=True)
    (tag / "COMPLETE.json").write_text("{}")
    (tag / "run_config.json").write_text('{"parallel": {"tp": ')
    one_line_error(capsys, consolidate, [str(tag), str(tmp_path / "c")], "pldr-consolidate", "run_config.json",
                   "not valid JSON")
    one_line_error(capsys, reshard, [str(tag), str(tmp_path / "r")], "pldr-reshard", "run_config.json")
    nothing_written(tmp_path / "c")
    nothing_written(tmp_path / "r")


def test_data_tools(folders, tmp_path, capsys):
    from pldr_dist.data.manifest import verify_main
    from pldr_dist.data.shard_writer import main as make_shards
    from pldr_dist.data.tokenizer import main as train_tokenizer
    from pldr_dist.train.plot import main as plot_metrics

    one_line_error(capsys, verify_main, [str(tmp_path)], "pldr-verify-shards", "no manifest")
    (tmp_path / "corpus.txt").write_text("some text\n")
    one_line_error(capsys, make_shards, [str(tmp_path / "corpus.txt"), "--tokenizer", str(folders / "random.pkl"),
                                         "--out", str(tmp_path / "shards")], "pldr-make-shards",
                   "random.pkl: not a SentencePiece model")
    assert not (tmp_path / "shards").exists()
    one_line_error(capsys, train_tokenizer, [str(tmp_path / "no-such-*.txt"), "--out", str(tmp_path / "t.model")],
                   "pldr-train-tokenizer", "no file matches")
    nothing_written(tmp_path / "t.model")
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')
    one_line_error(capsys, plot_metrics, [str(tmp_path / "metrics.jsonl"), "--out", str(tmp_path / "m.png")],
                   "pldr-plot-metrics", "metrics.jsonl:2")
    one_line_error(capsys, plot_metrics, [str(tmp_path / "metrics.jsonl"), "--out", str(tmp_path / "m.png"),
                                          "--labels", "a", "b"], "pldr-plot-metrics", "2 labels for 1 metrics files")
    one_line_error(capsys, plot_metrics, [str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "m.png")],
                   "pldr-plot-metrics", "none.jsonl not found")
    nothing_written(tmp_path / "m.png")


def test_demo_and_bench(tmp_path, capsys):
    from pldr_dist.bench.cli import main as bench
    from pldr_dist.demo import main as demo

    one_line_error(capsys, demo, ["--corpus", str(tmp_path / "missing.txt"), "--work", str(tmp_path / "w")],
                   "pldr-demo", "missing.txt")
    one_line_error(capsys, bench, ["plot", str(tmp_path / "missing.json"), "--out", str(tmp_path / "b.png")],
                   "pldr-bench", "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    one_line_error(capsys, bench, ["plot", str(tmp_path / "bad.json"), "--out", str(tmp_path / "b.png")],
                   "pldr-bench", "bad.json: not valid JSON")
    one_line_error(capsys, bench, ["trainer", "--variant", ":x", "--work", str(tmp_path / "bw")],
                   "pldr-bench", "--variant ':x'")
    nothing_written(tmp_path / "bw")
    nothing_written(tmp_path / "b.png")


@pytest.mark.parametrize("sets, says", [
    (["log.g_stats_every=-1"], "log.g_stats_every=-1 must be >= 0 (0 = no G_LM statistics)"),
    (["checkpoint.every=-5"], "checkpoint.every=-5 must be >= 0"),
    (["eval.batches=0"], "eval.batches=0 must be >= 1"),
    (["train.max_nonfinite_in_row=0"], "train.max_nonfinite_in_row=0 must be >= 1"),
    (["data.num_workers=-1"], "data.num_workers=-1 must be >= 0"),
    (["data.seed=-3"], "data.seed=-3 must be >= 0"),
    (["parallel.tp=3"], "parallel.tp=3 does not divide model.num_heads=4"),
    (["train.stepz=3"], "unknown key 'train.stepz'"),
])
def test_train_refuses_a_bad_config_before_any_process_group(tmp_path, capsys, sets, says):
    from pldr_dist.train.trainer import main as train

    (tmp_path / "manifest.json").write_text("{}")
    argv = ["--config", str(ROOT / "configs" / "tiny.yaml"), "--set", f"data.shards={tmp_path / 'manifest.json'}",
            "--set", "checkpoint.tokenizer="]
    for item in sets:
        argv += ["--set", item]
    one_line_error(capsys, train, argv, "pldr-train", says)


def test_train_missing_config_and_rank_above_0_leaves_rank_0_to_report(tmp_path, capsys, monkeypatch):
    from pldr_dist.train import trainer

    waits = []
    monkeypatch.setattr(trainer.time, "sleep", waits.append)
    one_line_error(capsys, trainer.main, ["--config", str(tmp_path / "none.yaml")], "pldr-train", "none.yaml")
    assert waits == []                          # rank 0 (or a lone process) reports at once
    for key, value in {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29999"}.items():
        monkeypatch.setenv(key, value)
    one_line_error(capsys, trainer.main, ["--config", str(tmp_path / "none.yaml")], "pldr-train", "none.yaml")
    assert waits == [trainer.REPORT_GRACE_S]    # rank 1 waits for rank 0's report to end the job first


def test_periodic_actions_treat_0_as_off():
    from pldr_dist.train.trainer import due
    assert [s for s in range(1, 8) if due(s, 3)] == [3, 6]
    assert not any(due(s, 0) for s in range(1, 8))


def test_every_console_script_runs_inside_the_boundary(capsys):
    """Each entry point of setup.py is wrapped by errors.cli_main; the line format itself."""
    import importlib
    text = (ROOT / "setup.py").read_text()
    scripts = re.findall(r'"(pldr-[\w-]+)=([\w.]+):(\w+)"', text)
    assert len(scripts) >= 14
    for name, module, attr in scripts:
        fn = getattr(importlib.import_module(module), attr)
        assert getattr(fn, "__wrapped__", None) is not None, f"{name} ({module}:{attr}) has no error boundary"
        assert fn.__pldr_prog__ == name, (name, fn.__pldr_prog__)

    class ShardLikeError(PLDRError):
        pass
    assert error_line("pldr-x", ShardLikeError("ShardLikeError: a.tar: bad\n(re-run it)")) == \
        "pldr-x: error: a.tar: bad; (re-run it)"


def test_train_on_a_corrupted_shard_ends_in_one_line_naming_the_shard(tmp_path):
    """Under torchrun: the loader finds the sha256 mismatch at the first batch; rank 0 prints one
    line naming the shard and the fix, and the trainer exits 2 (log.g_stats_every=0 = off on the way)."""
    from pldr_dist.data.prepare import prepare_corpus
    with open(ROOT / "data" / "tinyshakespeare.txt") as f:
        (tmp_path / "corpus.txt").write_text(f.read()[:60_000])
    data = prepare_corpus(str(tmp_path / "corpus.txt"), str(tmp_path / "data"), vocab_size=512, seq_len=32,
                          samples_per_shard=256, log=lambda *_: None)
    shards = sorted((tmp_path / "data" / "shards").glob("train-*.tar"))
    for shard in shards:                  # one byte of a token inside the first sample: still a valid tar
        raw = bytearray(shard.read_bytes())
        raw[520] ^= 0xFF
        shard.write_bytes(bytes(raw))
    run_dir = tmp_path / "run"
    result = train_helpers.train_under_torchrun(data, str(run_dir), 1, ["train.steps=2", "log.g_stats_every=0"])
    assert result.returncode != 0
    err = result.stderr
    lines = [line for line in err.splitlines() if line.startswith("pldr-train: error: ")]
    assert len(lines) == 1, err[-4000:]
    assert re.search(r"train-\d+\.tar: sha256 differs from the manifest .*re-run pldr-make-shards", lines[0]), lines
    assert str(shards[0].parent) in lines[0]
    assert "[rank0]" not in err and f'File "{ROOT / "pldr_dist"}' not in err, err[-4000:]   # no trainer traceback
    root_cause = re.search(r"Root Cause.*?exitcode\s*:\s*(-?\d+)", err, re.S)
    assert root_cause and int(root_cause.group(1)) == 2, err[-3000:]
    assert not list((run_dir / "checkpoints").glob("step_*")) if (run_dir / "checkpoints").exists() else True
