"""pldr_dist: pretraining PLDR-LLMs at scale (tensor, pipeline and ZeRO parallel) and
serving them with KV- and G-caches. See README.md and docs/."""
__version__ = "0.1.0"
