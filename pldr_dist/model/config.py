"""Model configuration: one dataclass, validated at construction, with the paper's presets.

Field names follow the spec's notation (spec §2) so a reader can cross-check: d_model = d,
num_heads = h, head_dim = dk, d_ff = dff, a_dff = a (metric-learner GLU width),
num_residual_units = R, glus_per_unit = n.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

MODES = ("v510", "v510G", "v510_dag")
FIXED_G_KINDS = ("identity", "random", "external")
ROPE_STYLES = ("interleaved", "half")
ATTENTION_IMPLS = ("sdpa", "explicit")


@dataclass
class PLDRConfig:
    vocab_size: int = 32000
    d_model: int = 896
    num_heads: int = 14
    head_dim: int = 64
    num_layers: int = 5
    d_ff: int = 2389
    a_dff: int = 170
    num_residual_units: int = 8
    glus_per_unit: int = 2
    context_length: int = 1024
    # v510: learned G (paper default); v510G: G fixed at construction; v510_dag: v510 + DAG loss.
    mode: str = "v510"
    # Only for v510G: what the fixed G_LM is at construction ("external" = loaded afterwards,
    # e.g. the authors' transferred pickle or a G-cache artifact).
    fixed_g: str = "identity"
    # DAG regulariser coefficients (c_A, c_P, c_G) of spec §5; used in v510_dag only.
    dag_coeffs: tuple[float, float, float] = (0.0, 0.0, 0.0)
    # Rotary layout: interleaved pairs (PLDR v51, spec) or rotate-half (the authors' v52).
    rope_style: str = "interleaved"
    rope_base: float = 10000.0
    ln_eps: float = 1e-6
    # The reference never initialises Wv with xavier (spec §4); True applies xavier like Wq/Wk.
    fixed_wv_init: bool = False
    attention: str = "sdpa"
    pad_id: int = 0
    unk_id: int = 1
    bos_id: int = 2
    eos_id: int = 3

    def __post_init__(self):
        self.dag_coeffs = tuple(float(c) for c in self.dag_coeffs)
        self.validate()

    def validate(self) -> None:
        for name in ("vocab_size", "d_model", "num_heads", "head_dim", "num_layers", "d_ff",
                     "a_dff", "num_residual_units", "glus_per_unit", "context_length"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"model.{name}={value!r} must be a positive integer")
        if self.d_model != self.num_heads * self.head_dim:
            raise ValueError(
                f"model.d_model={self.d_model} must equal num_heads*head_dim="
                f"{self.num_heads}*{self.head_dim}={self.num_heads * self.head_dim}")
        if self.head_dim % 2:
            raise ValueError(f"model.head_dim={self.head_dim} must be even (rotary pairs)")
        if self.mode not in MODES:
            raise ValueError(f"model.mode={self.mode!r} is unknown (choose one of {', '.join(MODES)})")
        if self.fixed_g not in FIXED_G_KINDS:
            raise ValueError(f"model.fixed_g={self.fixed_g!r} is unknown (choose one of {', '.join(FIXED_G_KINDS)})")
        if self.rope_style not in ROPE_STYLES:
            raise ValueError(f"model.rope_style={self.rope_style!r} is unknown (choose one of {', '.join(ROPE_STYLES)})")
        if self.attention not in ATTENTION_IMPLS:
            raise ValueError(f"model.attention={self.attention!r} is unknown (choose one of {', '.join(ATTENTION_IMPLS)})")
        if len(self.dag_coeffs) != 3 or any(c < 0 for c in self.dag_coeffs):
            raise ValueError(f"model.dag_coeffs={self.dag_coeffs!r} must be three non-negative numbers (c_A, c_P, c_G)")
        if self.ln_eps <= 0 or self.rope_base <= 0:
            raise ValueError("model.ln_eps and model.rope_base must be positive")
        for name in ("pad_id", "unk_id", "bos_id", "eos_id"):
            if not 0 <= getattr(self, name) < self.vocab_size:
                raise ValueError(f"model.{name}={getattr(self, name)} is outside the vocabulary [0, {self.vocab_size})")

    @property
    def learned_g(self) -> bool:
        return self.mode != "v510G"

    def replace(self, **changes) -> "PLDRConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["dag_coeffs"] = list(self.dag_coeffs)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "PLDRConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"model config has unknown keys {unknown} (known: {sorted(known)})")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def _defaults(d_model: int, head_dim: int) -> dict:
    """The reference's derived widths: dff = floor(d*4*2/3), a = floor(4*dk*2/3)."""
    return {"d_ff": int(d_model * 4 * 2 / 3), "a_dff": int(4 * head_dim * 2 / 3)}


PRESETS: dict[str, dict] = {
    # The paper's v510 110M model (spec §2): 109,689,362 parameters.
    "pldr-110m": dict(vocab_size=32000, d_model=896, num_heads=14, head_dim=64, num_layers=5,
                      d_ff=2389, a_dff=170, num_residual_units=8, glus_per_unit=2,
                      context_length=1024),
    # ~1B parameters for GPU benchmarks (d=2048, 16 layers, 32 heads of 64).
    "pldr-1b": dict(vocab_size=32000, d_model=2048, num_heads=32, head_dim=64, num_layers=16,
                    **_defaults(2048, 64), num_residual_units=8, glus_per_unit=2,
                    context_length=1024),
    # ~2.9B parameters (d=3072, 24 layers, 48 heads of 64): what one GPU trains with recompute.
    "pldr-3b": dict(vocab_size=32000, d_model=3072, num_heads=48, head_dim=64, num_layers=24,
                    **_defaults(3072, 64), num_residual_units=8, glus_per_unit=2,
                    context_length=1024),
    # Tiny model for CPU tests and the demo (spec §2 suggestion).
    "tiny": dict(vocab_size=512, d_model=64, num_heads=4, head_dim=16, num_layers=2,
                 d_ff=170, a_dff=32, num_residual_units=2, glus_per_unit=2, context_length=64),
}


def preset(name: str, **overrides) -> PLDRConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r} (choose one of {', '.join(PRESETS)})")
    return PLDRConfig(**{**PRESETS[name], **overrides})
