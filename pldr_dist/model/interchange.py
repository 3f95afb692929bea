"""The metric learner's two namings: stacked tensors in the model, one tensor per GLU in files.

Why: the model holds each layer's metric learner as eight stacked tensors
(`metric.u1_weight` [R, n, a, dk], `metric.norm_weight` [R, dk], ...) instead of 6*R*n + 2*R
small ones, so pldr-110m trains with ~170 parameter tensors instead of ~690: DeepSpeed's
per-parameter gradient hooks and per-tensor optimizer work cost ~100 us each on the host.
Every file that leaves a run (the consolidated folder, the portable checkpoint, the authors'
reference and Hugging Face formats, the G-cache fingerprint) keeps the per-GLU names and
shapes it always had:

    <prefix>metric.units.{r}.glus.{j}.u1.weight  [a, dk]   <->  <prefix>metric.u1_weight[r, j]
    <prefix>metric.units.{r}.norm.bias           [dk]      <->  <prefix>metric.norm_bias[r]

`to_interchange` and `from_interchange` convert whole name -> tensor dicts; names that are not
the metric learner's pass through, so both accept any prefix (`param.`, `exp_avg.`, ...).
"""
from __future__ import annotations

import re
from collections import defaultdict

import torch

from ..errors import InputError

GLU_ROLES = ("u1", "u2", "u3")
_PER_GLU = re.compile(r"^(?P<pre>(?:.*\.)?metric\.)units\.(?P<r>\d+)\.glus\.(?P<j>\d+)\.(?P<u>u[123])\.(?P<p>weight|bias)$")
_PER_UNIT = re.compile(r"^(?P<pre>(?:.*\.)?metric\.)units\.(?P<r>\d+)\.norm\.(?P<p>weight|bias)$")
_STACKED = re.compile(r"^(?P<pre>(?:.*\.)?metric\.)(?P<role>u[123]|norm)_(?P<p>weight|bias)$")


def stacked_name(prefix: str, role: str, part: str) -> str:
    return f"{prefix}{role}_{part}"


def to_interchange(state: dict) -> dict:
    """Model names -> file names, in the order the per-GLU modules had (the input norm, then
    unit by unit: GLU by GLU, the unit's norm). Pieces are copies, so the result can be saved
    as it is (safetensors refuses tensors that share memory)."""
    out, done = {}, set()
    for name, t in state.items():
        m = _STACKED.match(name)
        if m is None:
            if name not in out:
                out[name] = t
            continue
        pre = m["pre"]
        if pre in done:
            continue
        done.add(pre)
        for part in ("weight", "bias"):
            if f"{pre}in_norm.{part}" in state:
                out[f"{pre}in_norm.{part}"] = state[f"{pre}in_norm.{part}"]
        stacked = {(role, part): state[stacked_name(pre, role, part)]
                   for role in (*GLU_ROLES, "norm") for part in ("weight", "bias")
                   if stacked_name(pre, role, part) in state}
        R, n = stacked["u1", "weight"].shape[:2] if ("u1", "weight") in stacked else (0, 0)
        for r in range(R):
            for j in range(n):
                for role in GLU_ROLES:
                    for part in ("weight", "bias"):
                        out[f"{pre}units.{r}.glus.{j}.{role}.{part}"] = stacked[role, part][r, j].clone()
            for part in ("weight", "bias"):
                out[f"{pre}units.{r}.norm.{part}"] = stacked["norm", part][r].clone()
    return out


def from_interchange(state: dict) -> dict:
    """File names (or model names: they pass through) -> model names. Raises ValueError when
    a metric learner's per-GLU tensors do not form whole [R, n] blocks."""
    out, pieces = {}, defaultdict(dict)
    for name, t in state.items():
        m = _PER_GLU.match(name) or _PER_UNIT.match(name)
        if m is None:
            out[name] = t
            continue
        role = m.groupdict().get("u") or "norm"
        key = (int(m["r"]), int(m["j"])) if role != "norm" else (int(m["r"]),)
        pieces[stacked_name(m["pre"], role, m["p"])][key] = t
    for name, parts in pieces.items():
        keys = sorted(parts)
        shape = tuple(max(k[i] for k in keys) + 1 for i in range(len(keys[0])))
        if len(keys) != (shape[0] * (shape[1] if len(shape) > 1 else 1)):
            # a file whose metric-learner tensors were cut or renamed: one line through every CLI
            raise InputError(f"{name}: the file's per-GLU metric-learner tensors are incomplete ({len(keys)} of "
                             f"the {shape} blocks); the checkpoint or export is truncated: write it again")
        if len(shape) == 1:
            out[name] = torch.stack([parts[(r,)] for r in range(shape[0])])
        else:
            out[name] = torch.stack([torch.stack([parts[(r, j)] for j in range(shape[1])]) for r in range(shape[0])])
    return out


def has_per_glu_names(names) -> bool:
    """True when `names` use the file naming (a checkpoint written before the stacking)."""
    return any(_PER_GLU.match(n) or _PER_UNIT.match(n) for n in names)
