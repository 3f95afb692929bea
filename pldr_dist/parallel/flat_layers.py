"""One parameter tensor per decoder layer, for ZeRO-2 and ZeRO-3.

Why: DeepSpeed's ZeRO-2 and ZeRO-3 do host work per parameter tensor at every micro-batch (a
gradient hook that copies into a bucket, partition bookkeeping, a norm per tensor in the step):
~130 us (ZeRO-2) and ~370 us (ZeRO-3) of Python each on a CPU (docs/multi_gpu.md). A PLGA
layer has 33 parameter tensors (q/k/v/o, the stacked metric learner, the power law, the norms,
the FFN), so pldr-1b's 533 tensors cost tens of milliseconds a step that the GPU waits for.
`flatten_layers` gives each decoder layer one parameter, `<layer>.flat`, holding its tensors
end to end (in `named_parameters` order); pldr-1b then has 19 tensors.

How the layer uses it: at the start of each `_forward` the flat tensor is split into views
(`torch.split`: one autograd node, whose backward is a single concatenation into the flat
gradient) that are set as the submodules' attributes under their old names (`attn.wq.weight`,
...), so the model's code runs unchanged; at the end the attributes are set to None, so no view
keeps a ZeRO-3 layer's gathered storage alive after DeepSpeed releases it. Activation recompute
runs `_forward` again and splits again. Compiled, the split is part of each layer's graph (the
flat tensor is the graph's input: CUDA graphs see a static parameter).

Each tensor starts on a 16-byte boundary (a multiple of ALIGN elements: zero gaps after the odd
sizes, e.g. the feed-forward biases of width 2389), as make_optimizer's ordering gives the
per-weight layouts: GEMMs and compiled kernels load aligned vectors only from aligned pointers.
The gaps hold zeros that nothing reads; their gradient is zero, so AdamW leaves them at zero.

Names outside the engine do not change: the layer's `state_dict()` lists the old names (views of
the flat tensor) and `load_state_dict` accepts them (or the per-GLU file names), so checkpoints'
module files, the consolidated folder and every converter see today's tensors. DeepSpeed's own
optimizer files (and ZeRO-3's gathered fp32 weights) name `<layer>.flat`; `unflatten_state`
turns those back into the old names from the model config.

Only where DeepSpeed's per-parameter work is the cost and the parameters are not TP-split: ZeRO-2
and ZeRO-3, PP = 1, TP = 1 (TP marks each parameter as split or replicated for the norm, which a
mixed flat tensor cannot be). Training checkpoints record the layout (train/checkpoint.py).
"""
from __future__ import annotations

import functools
import re

import torch
from torch import nn

from ..errors import InputError
from ..model.interchange import from_interchange

FLAT = "flat"
ALIGN = 8           # elements: 16 bytes in bf16
_FLAT_NAME = re.compile(r"^(?P<pre>(?:.*\.)?layers\.\d+\.)" + FLAT + "$")


class FlatLayer:
    """Mixin for a DecoderLayer whose parameters live in one tensor (see the module docstring)."""

    _flat_slots: tuple = ()      # ((submodule path, attribute name), ...), in the flat tensor's order
    _flat_shapes: tuple = ()
    _flat_sizes: tuple = ()      # split sizes: each tensor's numel, then its gap to the next ALIGN boundary

    def _forward(self, *args, **kwargs):
        self._spread(getattr(self, FLAT).split(self._flat_sizes)[0::2])
        try:
            return super()._forward(*args, **kwargs)
        finally:
            self._spread([None] * len(self._flat_slots))

    def _spread(self, pieces) -> None:
        for (path, name), piece, shape in zip(self._flat_slots, pieces, self._flat_shapes):
            module = self
            for part in path:
                module = getattr(module, part)
            setattr(module, name, None if piece is None else piece.view(shape))

    def flat_names(self) -> list[str]:
        """The old parameter names, relative to the layer, in the flat tensor's order."""
        return [".".join((*path, name)) for path, name in self._flat_slots]

    def unflatten(self, flat: torch.Tensor) -> dict:
        """{old name: view of `flat`} for a tensor laid out as this layer's flat parameter."""
        return {n: piece.view(shape) for n, piece, shape in
                zip(self.flat_names(), flat.split(self._flat_sizes)[0::2], self._flat_shapes)}


def split_sizes(numels: list[int]) -> tuple:
    """(numel, gap, numel, gap, ...): each tensor followed by zeros up to the next ALIGN boundary."""
    return tuple(x for n in numels for x in (n, -n % ALIGN))


def _join(tensors: list, sizes: tuple) -> torch.Tensor:
    """The tensors end to end with the zero gaps of `sizes` (split_sizes) between them."""
    parts = []
    for t, gap in zip(tensors, sizes[1::2]):
        parts.append(t.reshape(-1))
        if gap:
            parts.append(t.new_zeros(gap))
    return torch.cat(parts)


@functools.lru_cache(maxsize=None)
def _flat_class(cls: type) -> type:
    return cls if issubclass(cls, FlatLayer) else type(f"Flat{cls.__name__}", (FlatLayer, cls), {})


def flatten_layer(layer: nn.Module) -> None:
    """Move `layer`'s parameters into one parameter `layer.flat` (in place; same values)."""
    slots, tensors = [], []
    for module_name, module in layer.named_modules():
        for name, param in list(module._parameters.items()):
            if param is None:
                continue
            slots.append((tuple(module_name.split(".")) if module_name else (), name))
            tensors.append(param)
    if len({t.dtype for t in tensors}) != 1 or not all(t.requires_grad for t in tensors):
        raise ValueError("flatten_layer needs parameters of one dtype that all train")
    for path, name in slots:
        module = layer.get_submodule(".".join(path))
        del module._parameters[name]
        setattr(module, name, None)
    layer.__class__ = _flat_class(layer.__class__)
    layer._flat_slots = tuple(slots)
    layer._flat_shapes = tuple(tuple(t.shape) for t in tensors)
    layer._flat_sizes = split_sizes([t.numel() for t in tensors])
    with torch.no_grad():
        flat = _join([t.detach() for t in tensors], layer._flat_sizes)
    layer.register_parameter(FLAT, nn.Parameter(flat))
    layer._register_state_dict_hook(_state_dict_hook)
    layer._register_load_state_dict_pre_hook(_load_hook, with_module=True)


def flatten_layers(model: nn.Module) -> int:
    """Flatten every decoder layer of `model`; returns the model's parameter tensors afterwards."""
    from ..model.model import DecoderLayer
    for module in model.modules():
        if isinstance(module, DecoderLayer) and not isinstance(module, FlatLayer):
            flatten_layer(module)
    return sum(1 for _ in model.parameters())


def wants_flat_layers(zero_stage: int, tp: int, pp: int) -> bool:
    """Where pldr-train flattens the layers (module docstring: why there and only there)."""
    return zero_stage in (2, 3) and tp == 1 and pp == 1


def has_flat_layers(module: nn.Module) -> bool:
    return any(isinstance(m, FlatLayer) for m in module.modules())


def _state_dict_hook(layer, state, prefix, local_metadata):
    flat = state.get(prefix + FLAT)
    if flat is None or flat.numel() != sum(layer._flat_sizes):
        return state         # a ZeRO-3 partition (DeepSpeed's empty placeholder): nothing to name
    rest = {k: state.pop(k) for k in [k for k in state if k.startswith(prefix)]}
    rest.pop(prefix + FLAT)
    state.update({prefix + n: t for n, t in layer.unflatten(flat).items()})
    state.update(rest)
    return state


def _load_hook(layer, state, prefix, local_metadata, strict, missing, unexpected, errors):
    """The old (or per-GLU file) names of this layer -> its flat tensor; other keys untouched."""
    mine = {k[len(prefix):]: state[k] for k in list(state) if k.startswith(prefix)}
    if FLAT in mine:
        return
    named = from_interchange(mine)
    names = layer.flat_names()
    if not all(n in named for n in names):
        return               # load_state_dict names what is missing
    for k in mine:
        del state[prefix + k]
    for k, t in named.items():
        if k not in names:
            state[prefix + k] = t
    state[prefix + FLAT] = _join([named[n] for n in names], layer._flat_sizes)


def layer_layout(model_config) -> list[tuple[str, tuple]]:
    """[(name relative to a layer, shape)] of a flat layer's tensors for this model config (TP = 1)."""
    from ..model.model import DecoderLayer
    with torch.device("meta"):
        layer = DecoderLayer(model_config)
    return [(n, tuple(p.shape)) for n, p in layer.named_parameters()]


def unflatten_state(state: dict, model_config) -> dict:
    """Any `<...>layers.<i>.flat` entry (DeepSpeed's optimizer files, ZeRO-3's fp32 weights) ->
    the layer's tensors under their model names; other entries pass through, in order."""
    if not any(_FLAT_NAME.match(k) for k in state):
        return state
    layout = layer_layout(model_config)
    sizes = split_sizes([torch.Size(s).numel() for _, s in layout])
    total = sum(sizes)
    out = {}
    for key, t in state.items():
        m = _FLAT_NAME.match(key)
        if m is None:
            out[key] = t
            continue
        if t.numel() != total:     # one line through every CLI (errors.py)
            raise InputError(f"{key} holds {t.numel()} values, a decoder layer of the run's model config {total}: the "
                             f"checkpoint was written for another model (compare its run_config.json)")
        for (name, shape), piece in zip(layout, t.reshape(-1).split(sizes)[0::2]):
            out[m["pre"] + name] = piece.view(shape)
    return out


def unflattened_names(module: nn.Module, names) -> list:
    """`names` of `module`'s parameters, each flat layer's `<layer>.flat` replaced by its old names."""
    flat = {}
    for prefix, layer in module.named_modules():
        if isinstance(layer, FlatLayer):
            prefix = prefix + "." if prefix else ""
            flat[prefix + FLAT] = [prefix + n for n in layer.flat_names()]
    return [m for n in names for m in flat.get(n, [n])]


def flatten_state(state: dict, module: nn.Module) -> dict:
    """The inverse, for loading whole tensors into `module`'s flat layers: each flat layer's old
    names in `state` -> one `<layer>.flat` entry (the others pass through)."""
    out = dict(state)
    for prefix, layer in module.named_modules():
        if not isinstance(layer, FlatLayer):
            continue
        prefix = prefix + "." if prefix else ""
        names = [prefix + n for n in layer.flat_names()]
        if all(n in out for n in names):
            out[prefix + FLAT] = _join([out.pop(n) for n in names], layer._flat_sizes)
    return out
