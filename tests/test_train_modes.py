"""Every model mode trains through the real entry point: v510G in bf16 (DeepSpeed casts the
parameters to bf16 but leaves buffers such as the fixed G_LM of v510G in fp32), and v510_dag with
a non-zero DAG penalty, whose first logged loss is checked against lm_loss + penalty computed here.

v510_dag runs in fp32: on CPU, torch's matrix_exp returns garbage in bf16 (see
test_model_modes_flops_sampling.py::test_dag_penalty_in_bf16), so its penalty is NaN in a bf16 run."""
import math

import pytest
import torch

from train_helpers import command, losses, prepare_data, train

DAG_COEFFS = (0.1, 0.0, 0.2)   # (c_A, c_P, c_G); the default (0, 0, 0) adds no penalty at all


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return prepare_data(str(tmp_path_factory.mktemp("data")))


@pytest.mark.parametrize("mode", ["v510G", "v510_dag"])
def test_mode_trains(data, tmp_path, mode):
    at_end = mode == "v510G"   # checkpoint.at_end=false (benchmark runs) writes no checkpoint
    precision = "bf16" if mode == "v510G" else "fp32"
    sets = ["train.steps=2", f"train.precision={precision}", f"model.overrides.mode={mode}",
            f"checkpoint.at_end={str(at_end).lower()}"]
    if mode == "v510_dag":
        sets.append(f"model.overrides.dag_coeffs=[{','.join(map(str, DAG_COEFFS))}]")
    result = train(data, str(tmp_path / mode), nproc=1, sets=sets)
    assert result.returncode == 0, result.stdout + result.stderr
    got = losses(str(tmp_path / mode))
    assert sorted(got) == [1, 2] and all(math.isfinite(v) for v in got.values())
    latest = tmp_path / mode / "checkpoints" / "latest"
    assert latest.is_file() == at_end and (not at_end or latest.read_text().strip() == "step_00000002")
    if mode == "v510_dag":
        lm, penalty = first_step_loss(data, str(tmp_path / mode), sets)
        assert penalty > 0.05                      # far above the tolerance: a lost penalty shows
        assert abs(got[1] - (lm + penalty)) <= 1e-5 * (lm + penalty), (got[1], lm, penalty)


def first_step_loss(data, run_dir, sets):
    """(lm_loss, DAG penalty) of the run's initial weights on its first batch, computed from the
    model's pieces (logits, deductive_outputs, dag_penalty), not through the trainer's loss."""
    from pldr_dist.data.loader import TokenLoader
    from pldr_dist.data.manifest import load_manifest
    from pldr_dist.model import PLDRModel, lm_loss
    from pldr_dist.model.plga import dag_penalty
    from pldr_dist.train.config import load_config

    argv = command(data, run_dir, 1, sets)    # the run's own command line, read as the trainer reads it
    cfg = load_config(argv[argv.index("--config") + 1], [argv[i + 1] for i, a in enumerate(argv) if a == "--set"])
    mcfg = cfg.model_config()
    assert mcfg.mode == "v510_dag" and mcfg.dag_coeffs == DAG_COEFFS
    torch.manual_seed(cfg.train.seed)          # the trainer's initial weights (build_run)
    model = PLDRModel(mcfg).double()
    loader = TokenLoader(cfg.data.shards, "train", cfg.train.micro_batch_size, load_manifest(cfg.data.shards).seq_len,
                         0, 1, cfg.data.seed)
    batch = next(iter(loader))
    with torch.no_grad():
        lm = lm_loss(model(batch["input"]), batch["target"], mcfg.pad_id).item()
        per_layer = [sum(c * dag_penalty(t) for c, t in zip(DAG_COEFFS, outs) if c > 0)
                     for outs in model.deductive_outputs(batch["input"])]
    return lm, (sum(per_layer) / len(per_layer)).item()   # the mean over layers
