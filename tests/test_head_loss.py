"""The fused head + loss, run by Triton's CPU interpreter (checks in head_loss_checks.py, all in
one process: subprocess_checks.py).

On the GPU it is part of the fast path that benchmarks/train_step.py times and checks
against eager bf16 and fp64 (results in benchmarks/results/).
"""
import os

import pytest

from subprocess_checks import run_checks

HERE = os.path.dirname(os.path.abspath(__file__))
CHECKS = ["matches_plain_loss", "scales_with_incoming_gradient", "second_backward_raises",
          "out_of_vocabulary_target_makes_loss_and_gradients_nan", "model_computes_its_loss_with_it"]


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    return run_checks(os.path.join(HERE, "head_loss_checks.py"), CHECKS, str(tmp_path_factory.mktemp("head_loss")))


@pytest.mark.parametrize("check", CHECKS)
def test_head_loss(outcomes, check):
    ok, output = outcomes[check]
    assert ok, output
