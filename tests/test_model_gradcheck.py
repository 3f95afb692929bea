"""Analytical gradients equal finite differences in fp64, through the power-law path (spec §11.5)."""
import torch
from torch.func import functional_call  # noqa: F401  (used below)

from pldr_dist.model import PLDRModel, preset

# A very small learned-G model: full (slow-mode) gradcheck stays cheap.
SMALL = dict(vocab_size=11, d_model=8, num_heads=2, head_dim=4, num_layers=2, d_ff=10,
             a_dff=6, num_residual_units=2, glus_per_unit=2, context_length=8)


def test_gradcheck_of_one_decoder_layer_in_its_input():
    torch.manual_seed(0)
    layer = PLDRModel(preset("tiny", **SMALL)).double().layers[0]
    x = torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: layer(t)[0], (x,), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_gradcheck_of_the_tiny_preset_in_every_parameter_fast_mode():
    torch.manual_seed(0)
    model = PLDRModel(preset("tiny", num_layers=1)).double()
    names = [n for n, _ in model.named_parameters()]
    chosen = [p.detach().clone().requires_grad_() for p in model.parameters()]
    tokens = torch.randint(4, 512, (2, 6), generator=torch.Generator().manual_seed(0))

    def loss(*tensors):
        return functional_call(model, dict(zip(names, tensors)), (tokens,))

    assert torch.autograd.gradcheck(loss, chosen, eps=1e-6, atol=1e-6, rtol=1e-5, fast_mode=True)
