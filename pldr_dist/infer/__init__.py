"""Inference: batched generation with KV-cache and G-cache, and the G_LM cache artifact."""
from .generate import Generation, SamplingConfig, generate, left_pad, sample_next

__all__ = ["Generation", "SamplingConfig", "generate", "left_pad", "sample_next"]
