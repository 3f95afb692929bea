"""The Triton metric-learner GLU, run by Triton's CPU interpreter (checks in glu_kernel_checks.py).

On the GPU the same kernels are compared with fp64 and with the compiled PyTorch GLU by
benchmarks/glu_kernel_bench.py (results in benchmarks/results/glu_kernel/).
"""
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.parametrize("check", ["op_matches_fp64", "opcheck", "fast_path_uses_kernel", "rejects_bad_head_dim"])
def test_glu_kernel(check):
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, os.path.join(HERE, "glu_kernel_checks.py"), check],
                          capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
