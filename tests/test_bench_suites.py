"""pldr-bench step / decode / data --smoke: each suite runs on the CPU, prints its table and writes
JSON with the rows it promises, every number positive."""
import json

import pytest

from pldr_dist.bench.cli import main


def run_suite(tmp_path, capsys, *argv):
    out = tmp_path / argv[0]
    assert main([*argv, "--smoke", "--out", str(out)]) == 0
    doc = json.loads((out / f"{argv[0]}.json").read_text())
    assert doc["suite"] == argv[0] and doc["device"].startswith("CPU")
    assert (out / f"{argv[0]}.txt").read_text().splitlines()[0] in capsys.readouterr().out
    return doc["results"]


def test_step_suite_times_plga_against_identity_g(tmp_path, capsys):
    rows = run_suite(tmp_path, capsys, "step", "--metric-kernel", "glu,pytorch")
    assert [(r["model"], r["attention"], r["metric_kernel"], r["micro_batch"]) for r in rows] == \
        [("tiny", "plga", "glu", 2), ("tiny", "plga", "pytorch", 2), ("tiny", "identity", "", 2)]
    for r in rows:
        assert r["exit_code"] == 0 and r["path"] == "uncompiled"
        assert min(r["tokens_per_s"], r["step_ms"], r["tflops"], r["mfu"]) > 0
        assert r["tokens_per_s"] == pytest.approx(2 * 32 / (r["step_ms"] / 1e3))
    for plga in rows[:2]:     # each PLGA row against the one G = I row
        assert plga["plga_over_identity"] == pytest.approx(plga["tokens_per_s"] / rows[2]["tokens_per_s"])


def test_decode_suite_times_every_cache_mode_and_checks_the_static_decoder(tmp_path, capsys):
    rows = run_suite(tmp_path, capsys, "decode")
    timed = [r for r in rows if r["mode"] != "static_check"]
    assert {(r["mode"], r["prompt_len"]) for r in timed} == \
        {(m, n) for m in ("none", "kv", "kv+g", "artifact", "sdpa") for n in (16, 32)}    # no CUDA graphs on the CPU
    assert all(r["ms_per_token"] > 0 and r["tokens_per_s"] > 0 for r in timed)
    check, = [r for r in rows if r["mode"] == "static_check"]
    assert check["exit_code"] == 0 and "identical tokens True" in check["detail"]


def test_data_suite_measures_tokenizer_shards_and_loader(tmp_path, capsys):
    rows = run_suite(tmp_path, capsys, "data")
    assert [(r["measure"], r["unit"]) for r in rows] == [("tokenizer", "s"), ("shards", "MB/s"),
                                                         ("loader", "M tokens/s"), ("loader_dp", "M tokens/s")]
    assert all(r["value"] > 0 and r["exit_code"] == 0 for r in rows)


def test_numerics_suite_compares_each_path_with_fp64(tmp_path, capsys):
    import torch

    from pldr_dist.bench.numerics import _errors
    rows = run_suite(tmp_path, capsys, "numerics")
    assert [(r["model"], r["path"]) for r in rows] == [("tiny", p) for p in ("eager", "fast", "fast-torch-power")]
    for r in rows:     # bf16 against fp64: the loss to ~1e-4, gradients off but finite and nonzero
        assert r["exit_code"] == 0 and 0 < r["loss_error"] < 1e-2
        assert all(0 < r[k] < 100 for k in ("power_error", "learner_error", "rest_error"))
    ref = {"l.attn.power.W": torch.ones(2, dtype=torch.float64), "l.attn.metric.u": torch.ones(3, dtype=torch.float64),
           "l.wq": torch.full((4,), 2.0, dtype=torch.float64)}
    got = dict(ref, **{"l.wq": torch.full((4,), 2.5)})
    assert _errors(got, ref) == {"power": 0.0, "learner": 0.0, "rest": pytest.approx(0.25)}


def test_bad_input_is_one_line(tmp_path, capsys):
    for argv, words in ((["step", "--model", "pldr-7b:8"], "--model 'pldr-7b:8'"),
                        (["step", "--model", "tiny:x"], "'x': give one integer"),
                        (["step", "--metric-kernel", "glu,triton"], "--metric-kernel glu,triton"),
                        (["decode", "--model", "nope"], "--model 'nope'")):
        with pytest.raises(SystemExit) as e:
            main([*argv, "--out", str(tmp_path)])
        assert e.value.code == 2 and words in capsys.readouterr().err


def test_kernel_profile_ranks_sass_lines_by_stall_samples():
    """ncu's source page (CSV, one table per kernel) comes back as each kernel's SASS lines with
    the most stall samples first, as shares of that kernel's samples."""
    from pldr_dist.bench.kernel_profile import top_sass
    hdr = '"Address","Source","Warp Stall Sampling (All Samples)","Warp Stall Sampling (Not-issued Samples)"'
    text = "\n".join(['"Kernel A"', hdr, '"0x0","MOV R1, R2","30","1"', '"0x10","HGMMA.64x64x16","10","0"',
                      '"0x20","LDG.E R4","60","50"', '"Kernel B"', hdr, '"0x0","BRA 0x0","1,000","0"'])
    out = top_sass(text.splitlines(), 2).splitlines()
    assert out[0].startswith("== kernel 0: 100 stall samples over 3 SASS lines")
    assert out[1].split() == ["60.0%", "LDG.E", "R4"] and out[2].split() == ["30.0%", "MOV", "R1,", "R2"]
    assert out[3].startswith("== kernel 1: 1000 stall samples") and out[4].split()[0] == "100.0%"
