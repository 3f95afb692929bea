"""Parameter-name mapping between pldr_dist and the authors' layout.

The authors' PyTorch reference (PLDR_Model in src/pldr_model_v510/pldr_model_v510.py of
github.com/burcgokden/PLDR-LLM-with-KVG-cache) and their Hugging Face implementation
(PldrllmForCausalLM in src/transformers/models/pldrllm/modeling_pldrllm.py) use the same
module names, so one table serves both. Each rule maps a pldr_dist name pattern to theirs;
`{i}` is the decoder layer, `{r}` the residual unit, `{j}` the GLU inside it. Shapes are
identical on both sides (nn.Linear weights are [out, in] everywhere).
"""
from __future__ import annotations

import re

# (pldr_dist name, authors' name, shape in terms of the config; V=vocab, d=d_model,
#  f=d_ff, a=a_dff, h=heads, k=head_dim)
NAME_TABLE = [
    ("embed.tokens.weight", "decoder.embedding.weight", "V,d"),
    ("embed.norm.{p}", "decoder.layernorm1.{p}", "d"),
    ("layers.{i}.attn.wq.weight", "decoder.dec_layers.{i}.mha1.wq.weight", "d,d"),
    ("layers.{i}.attn.wq.bias", "decoder.dec_layers.{i}.mha1.wq.bias", "d"),
    ("layers.{i}.attn.wk.weight", "decoder.dec_layers.{i}.mha1.wk.weight", "d,d"),
    ("layers.{i}.attn.wk.bias", "decoder.dec_layers.{i}.mha1.wk.bias", "d"),
    ("layers.{i}.attn.wv.weight", "decoder.dec_layers.{i}.mha1.wv.weight", "d,d"),
    ("layers.{i}.attn.wv.bias", "decoder.dec_layers.{i}.mha1.wv.bias", "d"),
    ("layers.{i}.attn.wo.weight", "decoder.dec_layers.{i}.mha1.dense.weight", "d,d"),
    ("layers.{i}.attn.wo.bias", "decoder.dec_layers.{i}.mha1.dense.bias", "d"),
    ("layers.{i}.attn.metric.in_norm.{p}", "decoder.dec_layers.{i}.mha1.layernorm1.{p}", "k"),
    ("layers.{i}.attn.metric.units.{r}.glus.{j}.u1.weight", "decoder.dec_layers.{i}.mha1.reslayerAs.{r}.denseAs.{j}.gluw1.weight", "a,k"),
    ("layers.{i}.attn.metric.units.{r}.glus.{j}.u1.bias", "decoder.dec_layers.{i}.mha1.reslayerAs.{r}.denseAs.{j}.gluw1.bias", "a"),
    ("layers.{i}.attn.metric.units.{r}.glus.{j}.u2.weight", "decoder.dec_layers.{i}.mha1.reslayerAs.{r}.denseAs.{j}.gluw2.weight", "a,k"),
    ("layers.{i}.attn.metric.units.{r}.glus.{j}.u2.bias", "decoder.dec_layers.{i}.mha1.reslayerAs.{r}.denseAs.{j}.gluw2.bias", "a"),
    ("layers.{i}.attn.metric.units.{r}.glus.{j}.u3.weight", "decoder.dec_layers.{i}.mha1.reslayerAs.{r}.denseAs.{j}.gluw3.weight", "k,a"),
    ("layers.{i}.attn.metric.units.{r}.glus.{j}.u3.bias", "decoder.dec_layers.{i}.mha1.reslayerAs.{r}.denseAs.{j}.gluw3.bias", "k"),
    ("layers.{i}.attn.metric.units.{r}.norm.{p}", "decoder.dec_layers.{i}.mha1.reslayerAs.{r}.layernormA.{p}", "k"),
    ("layers.{i}.attn.power.W", "decoder.dec_layers.{i}.mha1.plgatt_layer.Wlst", "h,k,k"),
    ("layers.{i}.attn.power.b", "decoder.dec_layers.{i}.mha1.plgatt_layer.blst", "h,k,k"),
    ("layers.{i}.attn.power.P", "decoder.dec_layers.{i}.mha1.plgatt_layer.pwlst", "h,k,k"),
    ("layers.{i}.attn.power.alpha", "decoder.dec_layers.{i}.mha1.plgatt_layer.alst", "h,k,k"),
    ("layers.{i}.attn.power.beta", "decoder.dec_layers.{i}.mha1.plgatt_layer.balst", "h,k,k"),
    ("layers.{i}.norm1.{p}", "decoder.dec_layers.{i}.layernorm1.{p}", "d"),
    ("layers.{i}.ffn.w1.weight", "decoder.dec_layers.{i}.ffn.gluw1.weight", "f,d"),
    ("layers.{i}.ffn.w1.bias", "decoder.dec_layers.{i}.ffn.gluw1.bias", "f"),
    ("layers.{i}.ffn.w2.weight", "decoder.dec_layers.{i}.ffn.gluw2.weight", "f,d"),
    ("layers.{i}.ffn.w2.bias", "decoder.dec_layers.{i}.ffn.gluw2.bias", "f"),
    ("layers.{i}.ffn.w3.weight", "decoder.dec_layers.{i}.ffn.gluw3.weight", "d,f"),
    ("layers.{i}.ffn.w3.bias", "decoder.dec_layers.{i}.ffn.gluw3.bias", "d"),
    ("layers.{i}.norm2.{p}", "decoder.dec_layers.{i}.layernorm2.{p}", "d"),
    ("head.weight", "final_layer.weight", "V,d"),
    ("head.bias", "final_layer.bias", "V"),
]


def _regex(pattern: str) -> re.Pattern:
    out = re.escape(pattern)
    for key, rx in (("i", r"\d+"), ("r", r"\d+"), ("j", r"\d+"), ("p", r"weight|bias")):
        out = out.replace(re.escape("{" + key + "}"), f"(?P<{key}>{rx})")
    return re.compile(out + "$")


_OURS = [(_regex(ours), theirs) for ours, theirs, _ in NAME_TABLE]
_THEIRS = [(_regex(theirs), ours) for ours, theirs, _ in NAME_TABLE]


def _translate(name: str, rules, direction: str) -> str:
    for rx, target in rules:
        m = rx.match(name)
        if m:
            return target.format(**m.groupdict())
    raise KeyError(f"tensor {name!r} has no {direction} name (see pldr_dist/convert/names.py NAME_TABLE)")


def to_authors(name: str) -> str:
    return _translate(name, _OURS, "authors'")


def from_authors(name: str) -> str:
    return _translate(name, _THEIRS, "pldr_dist")


def expected_shape(spec: str, cfg) -> tuple:
    sizes = {"V": cfg.vocab_size, "d": cfg.d_model, "f": cfg.d_ff, "a": cfg.a_dff,
             "h": cfg.num_heads, "k": cfg.head_dim}
    return tuple(sizes[s] for s in spec.split(","))


def shape_of_authors_name(name: str, cfg) -> tuple:
    for (rx, _), (_, _, spec) in zip(_THEIRS, NAME_TABLE):
        if rx.match(name):
            return expected_shape(spec, cfg)
    raise KeyError(name)
