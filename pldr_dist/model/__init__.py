"""The PLDR-LLM model as plain PyTorch (spec: docs/model.md)."""
from .config import PLDRConfig, PRESETS, preset
from .model import InferenceCache, PLDRModel, attention_bias, count_parameters, lm_loss
from .plga import LayerCache, PLGA

__all__ = ["PLDRConfig", "PRESETS", "preset", "PLDRModel", "InferenceCache", "LayerCache", "PLGA",
           "attention_bias", "count_parameters", "lm_loss"]
