"""pldr-bench trainer --smoke: the real pldr-train per variant, a table and JSON of its numbers."""
import json

from pldr_dist.bench.cli import main


def test_trainer_suite_runs_each_variant_and_reports_its_numbers(tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["trainer", "--smoke", "--config", "tiny", "--seq-len", "32", "--micro-batch", "4", "--steps", "3",
                 "--window", "2:3", "--variant", "z1:parallel.zero_stage=1 log.profile_steps=[2,2]",
                 "--variant", "bad:train.steps=-1",
                 "--variant", "dp2@2:train.micro_batch_size=2",   # 2 processes, the same global batch
                 "--time-limit", "300",   # a hung run fails with its stacks, before pytest-timeout's 600 s
                 "--work", str(tmp_path / "work"), "--out", str(out), "--name", "smoke"])
    assert code == 1                                    # one variant failed: the command says so
    doc = json.loads((out / "smoke.json").read_text())
    good, bad, dp2 = doc["results"]
    assert (good["variant"], good["exit_code"], len(good["losses"]), good["nproc"]) == ("z1", 0, 3, 1)
    assert good["tokens_per_s"] > 0 and good["relative"] == 1.0 and good["fast_path"].startswith("eager")
    assert bad["exit_code"] == 2 and bad["losses"] == []
    # the profiled variant's host reads inside a step: on the CPU only fused AdamW's (profiling.host_reads)
    assert good["host_reads"] and all(k.endswith("aten::_fused_adamw_") for k in good["host_reads"])
    assert dp2["host_reads"] is None
    assert good["gpu_busy"] is None and good["gpu_idle"] is None          # no GPU timeline on the CPU
    assert (dp2["exit_code"], dp2["nproc"]) == (0, 2) and "dp=2" in open(tmp_path / "work/dp2__this/stdout.log").read()
    assert dp2["per_gpu"] == dp2["relative"] / 2 > 0     # data-parallel scaling against one process
    table = (out / "smoke.txt").read_text()
    assert "z1             this           1" in table and "FAILED (exit 2)" in table
    assert "z1__this/metrics.jsonl" in __import__("tarfile").open(out / "smoke_logs.tar.gz").getnames()
    # ... and its plots: the bars, and the loss curves (the failed variant left out of both).
    for extra in ([], ["--losses"]):
        png = out / f"plot{len(extra)}.png"
        assert main(["plot", str(out / "smoke.json"), "--out", str(png)] + extra) == 0
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_trainer_suite_runs_a_baseline_package_with_relative_paths(tmp_path, monkeypatch):
    """--baseline runs an older copy of the package in its own folder; a relative --work made its
    config point at shards that were not there (the baseline's run failed with exit 2). Each
    package compiles into its own cache: a shared one handed a baseline whose learner op returned
    fewer tensors this package's compiled backward, and its run failed (H100, --baseline)."""
    import shutil

    from pldr_dist.bench import trainer
    caches, run = [], trainer.run_with_limit

    def recording(cmd, cwd, env, out, limit_s):
        caches.append(env["TORCHINDUCTOR_CACHE_DIR"])
        return run(cmd, cwd, env, out, limit_s)
    monkeypatch.setattr(trainer, "run_with_limit", recording)
    for part in ("pldr_dist", "configs"):
        shutil.copytree(f"{trainer.ROOT}/{part}", tmp_path / "prev" / part, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.chdir(tmp_path)
    code = main(["trainer", "--smoke", "--config", "tiny", "--seq-len", "32", "--micro-batch", "4", "--steps", "2",
                 "--window", "1:2", "--baseline", "prev", "--work", "work", "--out", "out", "--name", "base",
                 "--time-limit", "300"])
    assert code == 0
    doc = json.loads((tmp_path / "out" / "base.json").read_text())
    assert [(r["package"], r["exit_code"]) for r in doc["results"]] == [("this", 0), ("prev", 0)]
    assert len(set(caches)) == 2 and all(c.startswith(str(tmp_path / "work")) for c in caches)


def test_a_run_past_the_time_limit_is_ended_with_its_stacks_and_reported_failed(tmp_path, capsys):
    """A hung run must not hold up the suite (a CI job hung on one once): past --time-limit its
    process group gets SIGABRT (each process writes its stacks to the run's log), then SIGKILL."""
    code = main(["trainer", "--smoke", "--config", "tiny", "--seq-len", "32", "--micro-batch", "4", "--steps", "3",
                 "--window", "2:3", "--time-limit", "3", "--work", str(tmp_path / "work"), "--out", str(tmp_path),
                 "--name", "late"])
    assert code == 1
    (result,) = json.loads((tmp_path / "late.json").read_text())["results"]
    assert result["exit_code"] == 124 and result["losses"] == []
    log = (tmp_path / "work/default__this/stdout.log").read_text()
    assert "most recent call first" in log and log.endswith("ended after --time-limit 3 s (stacks above)\n")
    assert "most recent call first" in capsys.readouterr().out      # the stacks are printed too


def test_kernel_table_puts_the_kernels_that_differ_most_between_profiled_runs_first():
    """pldr-bench trainer's per-kernel comparison (GPU time a step from each profiled run): a
    kernel only one run has, or whose time changed most, comes first; inductor's kernels that
    differ only in their counter are one row; a run without a GPU
    profile is left out; fewer than two profiled runs give no table."""
    from pldr_dist.bench.trainer import Result, kernel_table

    def result(variant, kernels, busy):
        return Result(variant, "this", 0, gpu_idle={"busy_ms": busy, "kernels": kernels})
    plga = result("plga", {"gemm": 10.0, "learner_fwd": 2.0, "triton_per_fused_norm_14": 1.0}, 13.0)
    ident = result("g_identity", {"gemm": 9.5, "triton_per_fused_norm_10": 0.25, "triton_per_fused_norm_3": 0.75}, 10.5)
    cpu = Result("cpu", "this", 0)
    lines = kernel_table([plga, ident, cpu]).splitlines()
    assert lines[1].split() == ["plga/this", "g_identity/this", "kernel"]
    assert lines[2].split()[:2] == ["13.000", "10.500"]
    # inductor's kernels are merged by name less their counter (the same fusion in each run)
    assert [line.split()[-1] for line in lines[3:]] == ["learner_fwd", "gemm", "triton_per_fused_norm_N"]
    assert lines[-1].split()[:2] == ["1.000", "1.000"]
    assert lines[3].split()[:2] == ["2.000", "0.000"]
    assert kernel_table([plga, cpu]) == ""


def test_both_orders_runs_the_list_backwards_and_reports_each_variants_mean():
    """--both-orders: A, B, then B_b, A_b (each package in turn: the baseline's runs mirrored too);
    the summary pairs each run with its repeat and divides the means by the first variant's
    (on an H100 a command's first run was 1-3% faster: one order leans to whichever ran first)."""
    import pytest

    from pldr_dist.bench.trainer import Result, both_orders_table, run_order
    from pldr_dist.errors import InputError

    variants = [("plga", [], None), ("g", ["model.overrides.mode=v510G"], 2)]
    order = run_order(variants, ["/this", "/prev"], both_orders=True)
    assert [(n, p, r) for n, _, _, p, r in order] == [
        ("plga", "/this", ""), ("plga", "/prev", ""), ("g", "/this", ""), ("g", "/prev", ""),
        ("g_b", "/prev", "g"), ("g_b", "/this", "g"), ("plga_b", "/prev", "plga"), ("plga_b", "/this", "plga")]
    assert order[4][1:3] == (["model.overrides.mode=v510G"], 2)
    assert run_order(variants, ["/this"]) == [(n, s, c, "/this", "") for n, s, c in variants]
    with pytest.raises(InputError, match="must differ"):
        run_order([("a", [], None), ("a_b", [], None)], ["/this"], both_orders=True)

    runs = [Result("plga", "this", 0, tokens_per_s=780.0), Result("g", "this", 0, tokens_per_s=836.0),
            Result("g_b", "this", 0, tokens_per_s=844.0, repeats="g"),
            Result("plga_b", "this", 0, tokens_per_s=772.0, repeats="plga")]
    lines = both_orders_table(runs).splitlines()
    assert [line.split()[:4] for line in lines[2:]] == [["plga", "this", "776", "1.000"], ["g", "this", "840", "1.082"]]
    assert lines[2].endswith("780 then 772")
    assert both_orders_table(runs[:2]) == "" and both_orders_table(runs[:3]) == ""   # written after each run
