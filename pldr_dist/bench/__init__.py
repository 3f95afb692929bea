"""`pldr-bench`: one command, a suite per question; each prints a table and writes JSON.

Suites: `trainer` (pldr-train on prepared shards, any layout and ZeRO stage, on the GPUs
visible, optionally against an older copy of the package); `plot` draws trainer results.
Results of the GPU machine are committed under benchmarks/results/<suite>/<machine kind>/.
"""
