"""Bad run configs: each gets its own clear one-line ConfigError before any process starts."""
import json
import os

import pytest
import yaml

from pldr_dist.train.config import ConfigError, load_config, validate
from pldr_dist.train.schedule import lr_at
from train_helpers import ROOT


@pytest.fixture
def base(tmp_path):
    shards = tmp_path / "manifest.json"
    shards.write_text("{}")
    return {"run_dir": str(tmp_path / "run"), "model": {"preset": "tiny"},
            "data": {"shards": str(shards)}, "train": {"steps": 10, "micro_batch_size": 2}}


def write(tmp_path, data, name="run.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return str(path)


BAD = [
    ("unknown top key", lambda c: c.update(trian={"steps": 1}), "unknown key 'trian'"),
    ("unknown nested key", lambda c: c["train"].update(stepz=3), "unknown key 'train.stepz'"),
    ("wrong type", lambda c: c["train"].update(steps="many"), "train.steps='many' must be of type int"),
    ("bool for int", lambda c: c["train"].update(steps=True), "train.steps=True must be of type int"),
    ("section not mapping", lambda c: c.update(optim=3), "section 'optim' must be a mapping"),
    ("unknown preset", lambda c: c["model"].update(preset="gpt5"), "model.preset='gpt5' is unknown"),
    ("bad model field", lambda c: c["model"].update(overrides={"num_heads": 3}), "d_model=64 must equal num_heads*head_dim"),
    ("tp does not divide heads", lambda c: c.update(parallel={"tp": 3}), "parallel.tp=3 does not divide model.num_heads=4 (choose one of 1, 2, 4)"),
    ("pp exceeds layers", lambda c: c.update(parallel={"pp": 3}), "parallel.pp=3 exceeds model.num_layers=2"),
    ("zero3 with pipeline", lambda c: c.update(parallel={"pp": 2, "zero_stage": 3}), "not supported by DeepSpeed's pipeline engine"),
    ("bad zero stage", lambda c: c.update(parallel={"zero_stage": 4}), "parallel.zero_stage=4 must be 0, 1, 2 or 3"),
    ("bad partition", lambda c: c.update(parallel={"partition_method": "profile"}),
     "parallel.partition_method='profile' must be flops, parameters, uniform or type:<layer class regex>"),
    ("sp without tp", lambda c: c.update(parallel={"sequence_parallel": True}), "sequence_parallel needs parallel.tp > 1"),
    ("bad precision", lambda c: c["train"].update(precision="fp16"), "train.precision='fp16' must be auto, fp32, bf16 or fp8"),
    ("bad clip", lambda c: c.update(optim={"clip": "sometimes"}), "optim.clip='sometimes' must be value, norm or none"),
    ("zero steps", lambda c: c["train"].update(steps=0), "train.steps=0 must be >= 1"),
    ("missing shards", lambda c: c["data"].update(shards="/nonexistent/manifest.json"), "does not exist (run pldr-make-shards first)"),
    ("missing ds config", lambda c: c.update(deepspeed_config="/nope.json"), "deepspeed_config='/nope.json' not found"),
    ("ds config of another stage", lambda c: c.update(deepspeed_config=os.path.join(ROOT, "ds_configs", "zero2_bf16.json")),
     "zero2_bf16.json' has zero_optimization.stage=2 but parallel.zero_stage=1 (set parallel.zero_stage=2"),
    ("bad betas", lambda c: c.update(optim={"betas": [0.9, 1.5]}), "optim.betas=[0.9, 1.5] must be two numbers in [0, 1)"),
    ("bad profile steps", lambda c: c.update(log={"profile_steps": [5, 2]}), "log.profile_steps=[5, 2] must be [first, last]"),
    ("bad corrupt policy", lambda c: c["data"].update(on_corrupt="ignore"), "data.on_corrupt='ignore' must be error or skip"),
]


@pytest.mark.parametrize("name,mutate,message", BAD, ids=[b[0] for b in BAD])
def test_bad_config_gets_its_own_clear_error(tmp_path, base, name, mutate, message):
    mutate(base)
    path = write(tmp_path, base)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    text = str(err.value)
    assert message in text
    assert "\n" not in text
    assert path in text or text.startswith("--set")


def test_sequence_parallel_needs_a_sequence_the_tp_ranks_split_evenly(tmp_path, base):
    """The paper's S = 1023 cannot be split over 2 ranks: refused before any process starts
    (found on 2 GPUs, where the uneven split failed inside the collectives)."""
    from pldr_dist.train.build import check_data
    manifest = {"format": "pldr-token-shards/1", "seq_len": 63, "sample_len": 64, "dtype": "uint16",
                "tokenizer": {"fingerprint": "0" * 64, "vocab_size": 512, "pad_id": 0, "eos_id": 3},
                "splits": {"train": [], "valid": []}}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))   # the file base's data.shards names
    base["parallel"] = {"tp": 2, "sequence_parallel": True}
    path = write(tmp_path, base)
    with pytest.raises(ConfigError) as err:
        check_data(load_config(path))
    assert "seq_len=63 (re-shard with a --seq-len divisible by 2, e.g. 64, or turn sequence_parallel off)" in str(err.value)
    assert path in str(err.value) and "\n" not in str(err.value)
    base["parallel"] = {"tp": 2, "sequence_parallel": False}
    check_data(load_config(write(tmp_path, base)))   # without SP the same shards are fine
    manifest["seq_len"], manifest["sample_len"] = 64, 65
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    base["parallel"] = {"tp": 2, "sequence_parallel": True}
    check_data(load_config(write(tmp_path, base)))


def test_layout_must_fit_the_world_size(tmp_path, base):
    base["parallel"] = {"tp": 2, "pp": 2}
    cfg = load_config(write(tmp_path, base))
    validate(cfg, world_size=8)
    with pytest.raises(ConfigError, match=r"6 processes cannot form parallel.tp\*parallel.pp=2\*2 groups"):
        validate(cfg, world_size=6)


def test_invalid_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(bad))
    with pytest.raises(ConfigError, match="config file '/no/such.yaml' not found"):
        load_config("/no/such.yaml")


def test_set_overrides_and_toml(tmp_path, base):
    cfg = load_config(write(tmp_path, base), ["train.steps=7", "optim.lr=0.01", "parallel.tp=2",
                                              "model.overrides.rope_style=half"])
    assert (cfg.train.steps, cfg.optim.lr, cfg.parallel.tp) == (7, 0.01, 2)
    assert cfg.model_config().rope_style == "half"
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(write(tmp_path, base), ["train.steps"])
    toml = tmp_path / "run.toml"
    toml.write_text(f'run_dir = "x"\n[model]\npreset = "tiny"\n[data]\nshards = "{base["data"]["shards"]}"\n'
                    f'[train]\nsteps = 5\n')
    assert load_config(str(toml)).train.steps == 5


def test_shipped_configs_parse(tmp_path, monkeypatch):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    monkeypatch.chdir(tmp_path)     # their data paths are relative and absent here
    for name in ("tiny.yaml", "pldr-110m.yaml", "pldr-1b.yaml"):
        with pytest.raises(ConfigError, match="data.shards=.* does not exist"):
            load_config(os.path.join(root, "configs", name))   # everything but the data is valid


def test_lr_schedule_is_warmup_then_cosine_to_min_ratio():
    peak, warm, total = 1e-3, 10, 110
    assert lr_at(0, peak, warm, total, 0.1) == pytest.approx(1e-4)
    assert lr_at(9, peak, warm, total, 0.1) == pytest.approx(1e-3)
    assert lr_at(10, peak, warm, total, 0.1) == pytest.approx(1e-3)
    assert lr_at(60, peak, warm, total, 0.1) == pytest.approx(0.55e-3)
    assert lr_at(110, peak, warm, total, 0.1) == pytest.approx(1e-4)
    values = [lr_at(s, peak, warm, total, 0.1) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_a_run_config_written_before_a_key_was_renamed_still_loads():
    """Checkpoints keep their run_config.json: train.triton_glu (before train.metric_kernel) loads."""
    from pldr_dist.train.config import RunConfig, _build
    assert _build(RunConfig, {"train": {"triton_glu": False}}, "", "old.json").train.metric_kernel == "pytorch"
    assert _build(RunConfig, {"train": {"triton_glu": True}}, "", "old.json").train.metric_kernel == "glu"
