"""`pldr-bench`: one command, a suite per question; each prints a table and writes JSON.

Suites: `step` (one GPU's stand-alone training step, PLGA against G = I: tokens/s, MFU,
memory); `numerics` (each bf16 path's loss and gradient errors against fp64); `trainer` (pldr-train on prepared shards, any layout and ZeRO stage, on the GPUs
visible, optionally against an older copy of the package); `decode` (per-token latency per
cache mode); `data` (tokenizer, shard writing, loader); `kernels` (the metric learner's
kernels); `plot` draws trainer results. Every suite takes `--smoke` (CPU, seconds).
Results of the GPU machine are committed under benchmarks/results/<suite>/<machine kind>/.
"""
