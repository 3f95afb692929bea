"""pldr_dist: distributed pretraining of PLDR-LLMs (Power Law Decoder Representations)."""
from setuptools import find_packages, setup

setup(
    name="pldr_dist",
    version="0.1.0",
    description="Tensor/pipeline/ZeRO-parallel pretraining and G-cache inference for PLDR-LLMs",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.11",
    packages=find_packages(include=["pldr_dist", "pldr_dist.*"]),
    install_requires=[
        "torch>=2.4",
        "deepspeed>=0.16",
        "mpi4py",
        "webdataset",
        "sentencepiece",
        "tensorboard",
        "safetensors",
        "pyyaml",
        "matplotlib",
        "zstandard",
        "torchao>=0.16",     # train.precision=fp8 (model/fp8.py)
    ],
    extras_require={"test": ["pytest", "pytest-xdist>=3.5", "pytest-timeout>=2.3", "lm-eval>=0.4,<0.5", "triton>=3.5"], "eval": ["lm-eval>=0.4,<0.5"]},
    entry_points={
        "console_scripts": [
            "pldr-demo=pldr_dist.demo:main",
            "pldr-train=pldr_dist.train.trainer:main",
            "pldr-plot-metrics=pldr_dist.train.plot:main",
            "pldr-train-tokenizer=pldr_dist.data.tokenizer:main",
            "pldr-make-shards=pldr_dist.data.shard_writer:main",
            "pldr-verify-shards=pldr_dist.data.manifest:verify_main",
            "pldr-convert=pldr_dist.convert.cli:main",
            "pldr-generate=pldr_dist.infer.cli:generate_main",
            "pldr-export-gcache=pldr_dist.infer.cli:export_gcache_main",
            "pldr-gcache-check=pldr_dist.infer.cli:gcache_check_main",
            "pldr-eval=pldr_dist.eval.cli:main",
            "pldr-consolidate=pldr_dist.convert.consolidate:main",
            "pldr-reshard=pldr_dist.convert.reshard:main",
            "pldr-bench=pldr_dist.bench.cli:main",
        ],
    },
)
