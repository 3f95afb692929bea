"""Activation recompute gives the gradients of the run that keeps every activation, and keeps less."""
import copy

import pytest
import torch

from pldr_dist.model import PLDRModel, preset
from pldr_dist.model.fast import optimize_for_training
from torch.utils.checkpoint import CheckpointPolicy

from pldr_dist.model.recompute import selective_policy, set_activation_checkpointing


def loss_and_grads(model, tokens, mode):
    set_activation_checkpointing(model, mode)
    model.zero_grad(set_to_none=True)
    loss = model(tokens[:, :-1], targets=tokens[:, 1:])
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("compiled", [False, True])
def test_selective_and_full_recompute_give_the_same_loss_and_gradients(compiled):
    torch.manual_seed(0)
    model = PLDRModel(preset("tiny", mode="v510_dag", dag_coeffs=(0.1, 0.0, 0.05)))
    if compiled:   # the compiled layers (fullgraph): the checkpoint and its policy inside the graph
        optimize_for_training(model, backend="aot_eager")
    tokens = torch.randint(4, 512, (2, 33))
    ref_loss, ref_grads = loss_and_grads(model, tokens, "none")
    for mode in ("selective", "full"):
        loss, grads = loss_and_grads(model, tokens, mode)
        assert torch.equal(loss, ref_loss), mode
        for name, g in ref_grads.items():
            torch.testing.assert_close(grads[name], g, rtol=1e-6, atol=1e-7, msg=f"{mode}: {name}")


def test_recompute_keeps_fewer_activations_and_selective_keeps_the_products():
    """Autograd keeps fewer bytes outside the recomputed layers (the layers keep their inputs
    only); inside, the selective policy saves matrix products and attention and recomputes
    element-wise work. (Peak memory per mode on a GPU: docs/training.md.)"""
    torch.manual_seed(0)
    model = PLDRModel(preset("tiny"))
    tokens = torch.randint(4, 512, (4, 64))
    kept = {}
    for mode in ("none", "full"):
        set_activation_checkpointing(model, mode)
        total = [0]

        def pack(t):
            total[0] += 0 if isinstance(t, torch.nn.Parameter) else t.numel() * t.element_size()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(tokens[:, :-1], targets=tokens[:, 1:])
        kept[mode] = total[0]
    assert kept["full"] < kept["none"] / 3, kept
    policy, aten = selective_policy(), torch.ops.aten
    assert policy(None, aten.mm.default) == CheckpointPolicy.MUST_SAVE
    assert policy(None, aten._scaled_dot_product_flash_attention.default) == CheckpointPolicy.MUST_SAVE
    for op in (torch.ops.pldr.glu.default, torch.ops.pldr.metric_learner.default):   # the fast path's learner ops
        assert policy(None, op) == CheckpointPolicy.MUST_SAVE, op
    for op in (aten.native_layer_norm.default, aten.mul.Tensor, aten.silu.default, aten.pow.Tensor_Tensor):
        assert policy(None, op) == CheckpointPolicy.PREFER_RECOMPUTE, op


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="must be one of none, selective, full"):
        set_activation_checkpointing(copy.deepcopy(PLDRModel(preset("tiny"))), "some")
