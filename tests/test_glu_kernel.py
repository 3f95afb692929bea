"""The Triton metric-learner GLU, run by Triton's CPU interpreter (checks in glu_kernel_checks.py,
all in one process: subprocess_checks.py).

On the GPU the same kernels are compared with fp64 and with the compiled PyTorch GLU by
benchmarks/glu_kernel_bench.py (results in benchmarks/results/glu_kernel/).
"""
import os

import pytest

from subprocess_checks import run_checks

HERE = os.path.dirname(os.path.abspath(__file__))
CHECKS = ["op_matches_fp64", "opcheck", "fast_path_uses_kernel", "rejects_bad_head_dim"]


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    return run_checks(os.path.join(HERE, "glu_kernel_checks.py"), CHECKS, str(tmp_path_factory.mktemp("glu")))


@pytest.mark.parametrize("check", CHECKS)
def test_glu_kernel(outcomes, check):
    ok, output = outcomes[check]
    assert ok, output
