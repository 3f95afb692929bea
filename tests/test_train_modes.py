"""Every model mode trains through the real entry point in bf16 (DeepSpeed casts the
parameters to bf16 but leaves buffers such as the fixed G_LM of v510G in fp32)."""
import math

import pytest

from train_helpers import losses, prepare_data, train


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return prepare_data(str(tmp_path_factory.mktemp("data")))


@pytest.mark.parametrize("mode", ["v510G", "v510_dag"])
def test_mode_trains_in_bf16(data, tmp_path, mode):
    at_end = mode == "v510G"   # checkpoint.at_end=false (benchmark runs) writes no checkpoint
    result = train(data, str(tmp_path / mode), nproc=1,
                   sets=["train.steps=2", "train.precision=bf16", f"model.overrides.mode={mode}",
                         f"checkpoint.at_end={str(at_end).lower()}"])
    assert result.returncode == 0, result.stdout + result.stderr
    got = losses(str(tmp_path / mode))
    assert sorted(got) == [1, 2] and all(math.isfinite(v) for v in got.values())
    latest = tmp_path / mode / "checkpoints" / "latest"
    assert latest.is_file() == at_end and (not at_end or latest.read_text().strip() == "step_00000002")
