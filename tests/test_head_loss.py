"""The fused head + loss, run by Triton's CPU interpreter (checks in head_loss_checks.py).

On the GPU it is part of the fast path that benchmarks/train_step.py times and checks
against eager bf16 and fp64 (results in benchmarks/results/).
"""
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.parametrize("check", ["matches_plain_loss", "scales_with_incoming_gradient",
                                   "second_backward_raises", "out_of_vocabulary_target_makes_loss_and_gradients_nan", "model_computes_its_loss_with_it"])
def test_head_loss(check):
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, os.path.join(HERE, "head_loss_checks.py"), check],
                          capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
