"""Presets, parameter counts (spec §2) and config validation."""
import pytest
import torch

from pldr_dist.model import PLDRConfig, PLDRModel, count_parameters, preset


def meta_count(**overrides):
    with torch.device("meta"):
        return count_parameters(PLDRModel(preset("pldr-110m", **overrides)))


def test_pldr_110m_has_the_papers_parameter_count():
    assert meta_count() == 109_689_362


def test_pldr_110m_with_a_180_matches_the_reference_training_script():
    assert meta_count(a_dff=180) == 109_844_562


def test_fixed_g_110m_drops_exactly_the_deductive_network():
    assert meta_count(mode="v510G") == 105_606_482


def test_config_round_trips_through_a_dict():
    cfg = preset("tiny", mode="v510_dag", dag_coeffs=(0.1, 0.0, 0.2))
    assert PLDRConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("field, value", [
    ("d_model", 65), ("num_heads", 0), ("head_dim", -16), ("num_layers", 0), ("d_ff", 0),
    ("a_dff", 0), ("num_residual_units", 0), ("glus_per_unit", 0), ("vocab_size", 0),
    ("context_length", 0), ("mode", "v999"), ("fixed_g", "zeros"), ("rope_style", "spiral"),
    ("attention", "flash3"), ("dag_coeffs", (1.0, -1.0, 0.0)), ("eos_id", 512),
])
def test_invalid_config_raises_value_error_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        preset("tiny", **{field: value})


def test_unknown_keys_and_presets_are_named():
    with pytest.raises(ValueError, match="heads"):
        PLDRConfig.from_dict({**preset("tiny").to_dict(), "heads": 4})
    with pytest.raises(ValueError, match="pldr-7b"):
        preset("pldr-7b")
