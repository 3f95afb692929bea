"""The whole-learner Triton op, run by Triton's CPU interpreter (checks in metric_kernel_checks.py,
all in one process: subprocess_checks.py), and the `kernels` benchmark suite's CPU smoke run.

On the GPU the op is timed and compared with fp32 by `pldr-bench kernels` (pldr_dist/bench/kernels.py).
"""
import json
import os

import pytest

from subprocess_checks import run_checks

HERE = os.path.dirname(os.path.abspath(__file__))
CHECKS = ["op_matches_fp64", "broken_derivative_fails", "deterministic", "unaligned_input", "opcheck",
          "no_zero_gradients_for_saved_outputs", "fast_path_uses_op", "rejects_bad_head_dim",
          "head_products_match_fp64", "rotary_density_matches_fp64", "fast_path_uses_head_products",
          "power_law_matches_fp64"]


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    return run_checks(os.path.join(HERE, "metric_kernel_checks.py"), CHECKS, str(tmp_path_factory.mktemp("learner")))


@pytest.mark.parametrize("check", CHECKS)
def test_metric_kernel(outcomes, check):
    ok, output = outcomes[check]
    assert ok, output


def test_kernels_bench_smoke(tmp_path, capsys):
    from pldr_dist.bench.cli import main

    out = tmp_path / "out"
    assert main(["kernels", "--smoke", "--sweep", "--out", str(out)]) == 0     # (the sweep needs CUDA: no rows)
    doc = json.loads((out / "kernels.json").read_text())
    rows = {(r["shape"], r["path"]): r for r in doc["results"]}
    eager = [r for (shape, path), r in rows.items() if path == "eager"]
    assert eager and all(r["status"] == "ok" and r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0 for r in eager)
    skipped = [r for r in doc["results"] if r["status"].startswith("skipped")]
    assert skipped and all("CUDA" in r["status"] for r in skipped)
    assert {("attn d64", "flash"), ("attn d64", "cudnn"), ("8192^3", "matmul")} <= set(rows)   # the roofs, listed
    table = (out / "kernels.txt").read_text()
    assert "skipped (needs CUDA)" in table and "eager" in table


def test_kernel_resources_compile_for_hopper_on_the_cpu(tmp_path):
    """`pldr-bench kernels --resources`: the kernels compiled for sm_90 here, their registers read
    from the cubin; a config's register cap reaches ptxas (what the op's fifth config entry does)."""
    from pldr_dist.bench.cli import main
    from pldr_dist.bench.kernel_resources import programs_per_sm

    # what ncu reported on an H100 for the forward (254 registers, 8 warps, 164 KB shared memory):
    # one program an SM, held by registers and shared memory alike; 168 registers at 4 warps: three
    assert programs_per_sm(254, 8, 164 * 1024)[0] == 1 and programs_per_sm(168, 4, 16384) == (3, "registers")
    assert main(["kernels", "--resources", "--smoke", "--out", str(tmp_path), "--name", "res"]) == 0
    rows = json.loads((tmp_path / "res.json").read_text())["results"]
    assert [r["kernel"] for r in rows] == ["_learner_fwd", "_learner_bwd_rows"] + ["_learner_bwd_weights"] * 2
    assert all(r["status"] == "ok" and r["registers"] > 0 and r["per_sm"] >= 1 and r["code_kb"] > 0 for r in rows)
    free, capped = rows[2], rows[3]
    assert capped["config"].endswith(", 128)") and capped["registers"] <= 128 < free["registers"]
    assert "sm_90" in (tmp_path / "res.txt").read_text()


def test_head_products_bench_smoke(tmp_path):
    """`pldr-bench kernels --head-products` on a CPU: the four products, the power law and the loss's log-sum-exp
    pass listed, skipped (their numerics are the interpreter checks above and tests/head_loss_checks.py); on a
    GPU the same rows are timed."""
    from pldr_dist.bench.cli import main

    assert main(["kernels", "--head-products", "--smoke", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "head_products.json").read_text())["results"]
    assert [r["product"] for r in rows] == ["A0 = q^T q", "q G", "q G backward", "q (dA0 + dA0^T)", "rotary + A0",
                                            "rotary + A0 bwd", "power law", "power law fwd+bwd", "loss log-sum-exp"]
    assert all(r["status"] == "skipped (needs CUDA)" for r in rows)


def test_warp_specialized_kernels_compile_for_hopper_on_the_cpu():
    """The Gluon forward and row kernel (metric_kernel_ws) at pldr-110m's learner, compiled for
    sm_90 here: warp-specialized (each consumer raises its registers), in one SM's shared
    memory, and the forward keeps products in flight across its silu work (waits at depths > 0),
    which no Triton kernel does; their code size is read back. Their numbers are checked on the GPU
    (`pldr-bench kernels`)."""
    from pldr_dist.bench.kernel_resources import WS_KERNELS, measure_ws
    from pldr_dist.model.config import preset

    rows = {k: measure_ws(k, preset("pldr-110m")) for k in WS_KERNELS}
    assert all(r.status == "ok" and r.per_sm == 1 for r in rows.values()), rows
    # their machine code, read from the cubin: the GLU and chunk loops run at run time (unrolled,
    # the row kernel was 171-184 KB and stalled on instruction fetch)
    assert all(20 < r.code_kb < 150 for r in rows.values()), rows
    assert {"1", "2", "3"} <= set(rows["_learner_fwd_ws"].mma_waits.split(",")), rows


def test_warp_specialized_kernels_read_each_chunks_biases_from_one_row_block():
    """The biases as the Gluon kernels' ring streams them (metric_kernel_ws.bias_rows): for GLU
    g and 64-unit chunk c, rows c1, c2 (zero past a_dff), c3 and zeros; the row kernel's c3 rows
    are zeros."""
    import torch

    from pldr_dist.model.metric_kernel_ws import CHUNK, bias_rows

    R, n, a, dk = 2, 3, 170, 64
    b1, b2, b3 = torch.randn(R, n, a), torch.randn(R, n, a), torch.randn(R, n, dk)
    rows = bias_rows(b1, b2, b3, a).view(R * n, -1, 4, CHUNK)
    assert rows.shape[1] == 3 and torch.equal(bias_rows(b1, b2, None, a).view_as(rows)[:, :, 2], torch.zeros(6, 3, CHUNK))
    for g in range(R * n):
        for c in range(3):
            units = slice(c * CHUNK, min(a, (c + 1) * CHUNK))
            width = units.stop - units.start
            for role, b in ((0, b1), (1, b2)):
                assert torch.equal(rows[g, c, role, :width], b.reshape(R * n, a)[g, units])
                assert not rows[g, c, role, width:].any()
            assert torch.equal(rows[g, c, 2], b3.reshape(R * n, dk)[g]) and not rows[g, c, 3].any()
