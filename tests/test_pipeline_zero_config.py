"""Unsupported layouts are refused up front with one readable line; shipped configs are valid."""
import glob
import json

import pytest
import torch

from pldr_dist.parallel.engine import UnsupportedLayout, check_supported, make_ds_config


@pytest.mark.parametrize("pp, zero, precision, words", [
    (2, 2, "fp32", "zero_stage=2 with parallel.pp=2"),
    (4, 3, "bf16", "zero_stage=3 with parallel.pp=4"),
    (2, 0, "bf16", "cannot load these checkpoints back"),
    (1, 4, "fp32", "zero_stage=4 is unknown"),
    (1, 1, "fp16", "precision='fp16' is unknown"),
])
def test_unsupported_layouts_are_refused_with_one_line(pp, zero, precision, words):
    with pytest.raises(UnsupportedLayout, match=words) as err:
        make_ds_config(micro_batch_size=1, grad_accum_steps=4, dp=1, pp=pp, zero_stage=zero, precision=precision)
    assert "\n" not in str(err.value)


def test_generated_config_sets_clipping_and_batch_sizes_explicitly():
    config = make_ds_config(micro_batch_size=2, grad_accum_steps=8, dp=4, pp=2, zero_stage=1, precision="bf16")
    assert config["gradient_clipping"] == 0.0  # DeepSpeed would clip at 1.0 otherwise
    assert config["train_batch_size"] == 2 * 8 * 4
    assert config["bf16"]["enabled"] and config["zero_optimization"]["stage"] == 1
    # fp32 accumulation is reduced in fp32 (DeepSpeed's default for bf16 would round it to bf16)
    assert config["data_types"]["grad_accum_dtype"] == config["communication_data_type"] == "fp32"
    for stage in (2, 3):   # reductions in buckets during the backward (overlap_comm is off by default for stage 2)
        zero = make_ds_config(micro_batch_size=2, grad_accum_steps=8, dp=4, zero_stage=stage, precision="bf16")
        assert zero["zero_optimization"]["overlap_comm"] is True
        assert zero["zero_optimization"]["reduce_bucket_size"] < 100_000_000   # DeepSpeed's 5e8 holds a whole model
    # ZeRO-2 with one replica: nothing to overlap, and the overlapped epilogue syncs the device
    one_replica = make_ds_config(micro_batch_size=2, grad_accum_steps=8, dp=1, zero_stage=2)
    assert one_replica["zero_optimization"]["overlap_comm"] is False
    # ZeRO-3 steps its whole partition at once, so a non-finite gradient skips all of it
    assert zero["zero_optimization"]["sub_group_size"] >= 10**12

def test_shipped_ds_configs_are_supported_layouts():
    paths = sorted(glob.glob("ds_configs/*.json"))
    assert len(paths) >= 6
    for path in paths:
        with open(path) as f:
            config = json.load(f)
        assert "gradient_clipping" in config, path
        pp = 2 if "pipeline" in config else 1
        precision = "bf16" if config["bf16"]["enabled"] else "fp32"
        check_supported(pp, config["zero_optimization"]["stage"], precision)
        if config.get("data_types", {}).get("grad_accum_dtype") == "fp32" and precision == "bf16":
            assert config.get("communication_data_type") == "fp32", f"{path}: reduces the fp32 gradients in bf16"


def test_pipeline_stages_chained_equal_model_forward_with_dag_penalty():
    """The stage wrappers, run in order, give the model's logits and loss (v510_dag penalty included)."""
    import torch

    from pldr_dist.model import PLDRModel, lm_loss, preset
    from pldr_dist.parallel.pipeline import pipeline_layers, pipeline_loss

    torch.manual_seed(0)
    model = PLDRModel(preset("tiny", mode="v510_dag", dag_coeffs=(0.1, 0.01, 0.1))).double()
    x = torch.randint(4, 512, (2, 9))
    x[0, -2:] = 0
    inputs, targets = x[:, :-1], x[:, 1:]
    logits, penalty = model(inputs, return_penalty=True)
    expected = lm_loss(logits, targets) + penalty
    out = inputs
    for stage in pipeline_layers(model):
        out = stage(out)
    got = pipeline_loss(lm_loss, model.cfg.num_layers)(out, targets)
    torch.testing.assert_close(out[0], logits, rtol=0, atol=0)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)


def test_zero3_refuses_deepspeeds_linear_replacement_and_gathers_whole_layers():
    """DeepSpeed's memory_efficient_linear gives zero gradients in compiled layers on GPUs
    (docs/multi_gpu.md): a DeepSpeed JSON that turns it on is refused in one line; without the
    key it is set off, and every decoder layer becomes one ZeRO-3 gathering unit."""
    from pldr_dist.model import PLDRModel, preset
    from pldr_dist.parallel.engine import zero3_whole_layers

    model = PLDRModel(preset("pldr-110m", d_model=32, num_heads=2, head_dim=16, d_ff=48, a_dff=8,
                             num_layers=2, vocab_size=64, num_residual_units=1))
    with pytest.raises(UnsupportedLayout, match="memory_efficient_linear=true") as err:
        zero3_whole_layers(model, {"zero_optimization": {"stage": 3, "memory_efficient_linear": True}})
    assert "\n" not in str(err.value)
    config = {"zero_optimization": {"stage": 3}}
    zero3_whole_layers(model, config)
    assert config["zero_optimization"]["memory_efficient_linear"] is False
    assert [getattr(layer, "_z3_leaf", False) for layer in model.layers] == [True, True]


def test_flops_split_balances_the_presets_stages_as_documented():
    """parallel.partition_method=flops at pp = 2 (docs/pipeline_zero.md): the output head, the
    costliest layer, leaves the last stage fewer decoder layers than DeepSpeed's split by
    parameters, and the slower stage's forward FLOPs fall (pldr-110m 106 -> 96 MFLOP a token,
    pldr-1b 1025 -> 1005)."""
    from deepspeed.runtime.utils import partition_balanced
    from pldr_dist.model import PLDRModel, preset
    from pldr_dist.parallel.pipeline import layer_flops
    for name, split, slower in (("pldr-110m", [0, 5, 7], 96), ("pldr-1b", [0, 10, 18], 1005)):
        cfg = preset(name)
        with torch.device("meta"):
            model = PLDRModel(cfg)
        params = ([sum(p.numel() for p in model.embed.parameters())]
                  + [sum(p.numel() for p in layer.parameters()) for layer in model.layers]
                  + [sum(p.numel() for p in model.head.parameters())])
        flops = layer_flops(cfg)
        stage_flops = lambda parts: [sum(flops[a:b]) for a, b in zip(parts[:-1], parts[1:])]  # noqa: E731
        assert [int(b) for b in partition_balanced(flops, 2)] == split, name
        by_params = [int(b) for b in partition_balanced(params, 2)]
        assert by_params[1] == split[1] - 1, name          # one decoder layer more on the last stage
        assert round(max(stage_flops(split)) / 1e6) == slower < max(stage_flops(by_params)) / 1e6, name
