"""The run configuration: one YAML or TOML file, a tree of dataclasses, validated up front.

Every error is a one-line `ConfigError` naming the file and key, raised before any process
group work starts, so a bad config fails in seconds on every rank alike.
"""
from __future__ import annotations

import dataclasses
import os
import tomllib
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml

from ..errors import PLDRError
from ..model import PLDRConfig, PRESETS


class ConfigError(PLDRError, ValueError):
    pass


@dataclass
class ModelSection:
    preset: str = "tiny"
    overrides: dict = field(default_factory=dict)   # any PLDRConfig field


@dataclass
class ParallelSection:
    tp: int = 1
    pp: int = 1
    cp: int = 1                # context parallel: each rank holds 1/cp of every sequence
    sequence_parallel: bool = False
    zero_stage: int = 1
    partition_method: str = "flops"   # pipeline stages balanced by forward FLOPs (parallel/pipeline.PLDRPipeline); or DeepSpeed's parameters, uniform, type:<regex>
    activation_checkpoint_interval: int = 0


@dataclass
class DataSection:
    shards: str = ""          # manifest.json of the shard writer, or its folder
    seed: int = 1234
    num_workers: int = 0
    on_corrupt: str = "error"  # error | skip


@dataclass
class OptimSection:
    lr: float = 1e-3
    betas: tuple = (0.9, 0.95)
    eps: float = 1e-5
    weight_decay: float = 0.1
    warmup_steps: int = 2000
    min_lr_ratio: float = 0.1
    clip: str = "value"        # value (element-wise, the reference) | norm | none
    clip_value: float = 1.0


@dataclass
class TrainSection:
    steps: int = 1000
    micro_batch_size: int = 16       # sequences per micro-batch per data-parallel rank
    grad_accum_steps: int = 1        # micro-batches per step (pipeline: per 1F1B schedule)
    precision: str = "auto"          # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16 | fp8 (bf16 + FP8 products: model/fp8.py)
    fp8_recipe: str = "tensorwise"   # with precision fp8: torchao's scaling, tensorwise | rowwise
    seed: int = 1234
    compile: bool = False            # GPU fast path (pldr_dist.model.fast): the Triton metric learner (CUDA, bf16; metric_kernel), rotary table, padded FFN, and per-layer torch.compile + CUDA graphs where tp=pp=1 (TP/PP: the kernels without torch.compile)
    metric_kernel: str = "learner"   # with compile: the metric learner as one Triton op for the whole learner (learner), one Triton kernel per GLU (glu), or compiled PyTorch (pytorch; for A/B runs). learner launches 4 kernels a layer where glu launches 48: where no CUDA graph hides launches (ZeRO-3) pldr-1b ran 1.26x faster (docs/multi_gpu.md)
    activation_checkpointing: str = "none"   # none | selective (recompute element-wise work) | full (recompute each decoder layer): pldr_dist/model/recompute.py
    max_nonfinite_in_row: int = 5
    inject_nonfinite_at: list = field(default_factory=list)   # testing aid: steps whose loss is made NaN


@dataclass
class EvalSection:
    every: int = 0            # steps between validations (0 = never)
    batches: int = 4


@dataclass
class CheckpointSection:
    every: int = 0            # steps between checkpoints (0 = only at the end)
    at_end: bool = True       # false: none when the run ends (benchmarks, throwaway runs)
    keep: int = 3
    tokenizer: str = ""       # copied into each checkpoint when set
    async_save: bool = True   # copy the state to host memory, write the files in the background (train/async_save.py)
    write_delay_s: float = 0.0   # testing aid: an asynchronous write sleeps this long before renaming its files


@dataclass
class LogSection:
    every: int = 10
    tensorboard: bool = True
    g_stats_every: int = 50   # steps between G_LM statistics (0 = never)
    peak_tflops: float = 0.0  # per device; 0 = auto (989 on CUDA, none on CPU)
    profile_steps: list = field(default_factory=list)   # [first, last]: torch.profiler over these steps (rank 0)


@dataclass
class RunConfig:
    run_dir: str = "runs/default"
    deepspeed_config: str = ""        # a JSON file from ds_configs/; empty = generated
    model: ModelSection = field(default_factory=ModelSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    eval: EvalSection = field(default_factory=EvalSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    log: LogSection = field(default_factory=LogSection)
    source: str = ""                  # the file this came from (for messages)

    def model_config(self) -> PLDRConfig:
        try:
            return PLDRConfig(**{**PRESETS[self.model.preset], **self.model.overrides})
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{self.source}: {e}") from None

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("source")
        return d


def _check_type(where: str, value: Any, hint) -> Any:
    origin = typing.get_origin(hint) or hint
    if origin is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if origin is float and isinstance(value, str):   # YAML 1.1 reads 1e-4 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if origin is tuple and isinstance(value, list):
        value = tuple(value)
    if origin in (bool, int, float, str, list, dict, tuple):
        if not isinstance(value, origin) or (origin is int and isinstance(value, bool)):
            raise ConfigError(f"{where}={value!r} must be of type {origin.__name__}")
    return value


def _upgrade(data: dict) -> dict:
    """Keys renamed since a run was written: its run_config.json (checkpoints, pldr-reshard,
    pldr-consolidate) and old config files keep loading. train.triton_glu (bool) became
    train.metric_kernel."""
    train = data.get("train")
    if isinstance(train, dict) and "triton_glu" in train:
        train = dict(train)
        old = train.pop("triton_glu")
        train.setdefault("metric_kernel", "glu" if old else "pytorch")
        data = {**data, "train": train}
    return data


def _build(cls, data: dict, prefix: str, source: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: section '{prefix.rstrip('.')}' must be a mapping, got {data!r}")
    if cls is RunConfig:
        data = _upgrade(data)
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)} - {"source"}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{source}: unknown key '{prefix}{unknown[0]}' (known in this section: "
                          f"{', '.join(sorted(names))})")
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value, f"{prefix}{name}.", source)
        else:
            kwargs[name] = _check_type(f"{source}: {prefix}{name}", value, hint)
    return cls(**kwargs)


def _parse_value(text: str) -> Any:
    return yaml.safe_load(text) if text != "" else ""


def apply_overrides(raw: dict, overrides: list[str], source: str) -> dict:
    """--set a.b.c=value (value parsed as YAML: numbers, booleans, lists)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value (e.g. --set train.steps=100)")
        key, value = item.split("=", 1)
        node = raw
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: '{part}' is not a section")
        node[parts[-1]] = _parse_value(value)
    return raw


def load_config(path: str, overrides: Optional[list[str]] = None) -> RunConfig:
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} not found (pass --config configs/tiny.yaml or your own file)")
    try:
        with open(path, "rb") as f:
            if path.endswith(".toml"):
                raw = tomllib.load(f)
            else:
                raw = yaml.safe_load(f) or {}
    except (yaml.YAMLError, tomllib.TOMLDecodeError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"{path}: not valid {'TOML' if path.endswith('.toml') else 'YAML'} ({first})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    raw = apply_overrides(raw, overrides or [], path)
    cfg = _build(RunConfig, raw, "", path)
    cfg.source = path
    validate(cfg)
    return cfg


def validate(cfg: RunConfig, world_size: Optional[int] = None) -> None:
    """Checks that need no process group. world_size, when given, checks the layout too."""
    src = cfg.source or "config"
    if cfg.model.preset not in PRESETS:
        raise ConfigError(f"{src}: model.preset={cfg.model.preset!r} is unknown (choose one of {', '.join(PRESETS)})")
    mcfg = cfg.model_config()
    p, t, o = cfg.parallel, cfg.train, cfg.optim
    # Every integer knob: a count or period that must be >= 1, or one where 0 means "off".
    positive = {"parallel.tp": p.tp, "parallel.pp": p.pp, "parallel.cp": p.cp, "train.steps": t.steps,
                "train.micro_batch_size": t.micro_batch_size, "train.grad_accum_steps": t.grad_accum_steps,
                "train.max_nonfinite_in_row": t.max_nonfinite_in_row, "eval.batches": cfg.eval.batches,
                "checkpoint.keep": cfg.checkpoint.keep, "log.every": cfg.log.every}
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{src}: {key}={value} must be >= 1")
    zero_means = {"eval.every": (cfg.eval.every, "no validation"),
                  "checkpoint.every": (cfg.checkpoint.every, "a checkpoint only at the end"),
                  "log.g_stats_every": (cfg.log.g_stats_every, "no G_LM statistics"),
                  "parallel.activation_checkpoint_interval": (p.activation_checkpoint_interval, "none"),
                  "data.num_workers": (cfg.data.num_workers, "read in the training process"),
                  "optim.warmup_steps": (o.warmup_steps, "no warm-up")}
    for key, (value, zero) in zero_means.items():
        if value < 0:
            raise ConfigError(f"{src}: {key}={value} must be >= 0 (0 = {zero})")
    for key, value in (("data.seed", cfg.data.seed), ("train.seed", t.seed)):
        if value < 0:
            raise ConfigError(f"{src}: {key}={value} must be >= 0 (numpy's generators take no negative seed)")
    if cfg.checkpoint.write_delay_s < 0:
        raise ConfigError(f"{src}: checkpoint.write_delay_s={cfg.checkpoint.write_delay_s} must be >= 0")
    if cfg.log.peak_tflops < 0:
        raise ConfigError(f"{src}: log.peak_tflops={cfg.log.peak_tflops} must be >= 0 (0 = auto)")
    if p.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"{src}: parallel.zero_stage={p.zero_stage} must be 0, 1, 2 or 3")
    if p.pp > 1 and p.zero_stage > 1:
        raise ConfigError(f"{src}: parallel.zero_stage={p.zero_stage} with parallel.pp={p.pp} is not supported by "
                          f"DeepSpeed's pipeline engine (use zero_stage 0 or 1 with pipelines)")
    if p.partition_method not in ("flops", "parameters", "uniform") and not p.partition_method.startswith("type:"):
        raise ConfigError(f"{src}: parallel.partition_method={p.partition_method!r} must be flops, parameters, uniform "
                          f"or type:<layer class regex>")
    if p.sequence_parallel and p.tp == 1:
        raise ConfigError(f"{src}: parallel.sequence_parallel needs parallel.tp > 1")
    if mcfg.num_heads % p.tp:
        divs = [d for d in range(1, mcfg.num_heads + 1) if mcfg.num_heads % d == 0]
        raise ConfigError(f"{src}: parallel.tp={p.tp} does not divide model.num_heads={mcfg.num_heads} "
                          f"(choose one of {', '.join(map(str, divs))})")
    if mcfg.vocab_size % p.tp:
        raise ConfigError(f"{src}: parallel.tp={p.tp} does not divide model.vocab_size={mcfg.vocab_size}")
    if p.pp > mcfg.num_layers:
        raise ConfigError(f"{src}: parallel.pp={p.pp} exceeds model.num_layers={mcfg.num_layers}")
    if world_size is not None and world_size % (p.tp * p.pp * p.cp):
        n = p.tp * p.pp * p.cp
        axes = "parallel.tp*parallel.pp" + ("*parallel.cp" if p.cp > 1 else "")
        sizes = f"{p.tp}*{p.pp}" + (f"*{p.cp}" if p.cp > 1 else "")
        raise ConfigError(f"{src}: {world_size} processes cannot form {axes}={sizes} groups (launch a multiple "
                          f"of {n} processes or change the layout)")
    prof = cfg.log.profile_steps
    if prof and (len(prof) != 2 or not all(isinstance(x, int) and x >= 1 for x in prof) or prof[0] > prof[1]):
        raise ConfigError(f"{src}: log.profile_steps={prof} must be [first, last] step numbers, 1 <= first <= last")
    if t.activation_checkpointing not in ("none", "selective", "full"):
        raise ConfigError(f"{src}: train.activation_checkpointing={t.activation_checkpointing!r} must be none, "
                          f"selective or full")
    if t.precision not in ("auto", "fp32", "bf16", "fp8"):
        raise ConfigError(f"{src}: train.precision={t.precision!r} must be auto, fp32, bf16 or fp8")
    if t.metric_kernel not in ("learner", "glu", "pytorch"):
        raise ConfigError(f"{src}: train.metric_kernel={t.metric_kernel!r} must be learner, glu or pytorch")
    if t.fp8_recipe not in ("tensorwise", "rowwise"):
        raise ConfigError(f"{src}: train.fp8_recipe={t.fp8_recipe!r} must be tensorwise or rowwise")
    if t.precision == "fp8" and p.tp > 1:
        # torchao's Float8Linear cannot wrap the tensor-parallel linears (pipelines are fine: tests/test_fp8.py)
        raise ConfigError(f"{src}: train.precision=fp8 runs with parallel.tp=1 (data and pipeline parallelism and "
                          f"ZeRO 0-3 are fine); use bf16 for tensor parallelism")
    if o.clip not in ("value", "norm", "none"):
        raise ConfigError(f"{src}: optim.clip={o.clip!r} must be value, norm or none")
    if not 0 <= o.min_lr_ratio <= 1 or o.lr <= 0:
        raise ConfigError(f"{src}: optim.lr must be > 0 and optim.min_lr_ratio in [0, 1]")
    if len(o.betas) != 2 or not all(0 <= b < 1 for b in o.betas):
        raise ConfigError(f"{src}: optim.betas={list(o.betas)} must be two numbers in [0, 1)")
    if cfg.data.on_corrupt not in ("error", "skip"):
        raise ConfigError(f"{src}: data.on_corrupt={cfg.data.on_corrupt!r} must be error or skip")
    if not cfg.data.shards:
        raise ConfigError(f"{src}: data.shards is empty (point it at the manifest.json made by pldr-make-shards)")
    if not os.path.exists(cfg.data.shards):
        raise ConfigError(f"{src}: data.shards={cfg.data.shards!r} does not exist (run pldr-make-shards first)")
    if cfg.deepspeed_config and not os.path.isfile(cfg.deepspeed_config):
        raise ConfigError(f"{src}: deepspeed_config={cfg.deepspeed_config!r} not found (see ds_configs/)")
    if cfg.deepspeed_config:
        _check_ds_stage(src, cfg.deepspeed_config, cfg.parallel.zero_stage)
    if cfg.checkpoint.tokenizer and not os.path.isfile(cfg.checkpoint.tokenizer):
        raise ConfigError(f"{src}: checkpoint.tokenizer={cfg.checkpoint.tokenizer!r} not found")
    if mcfg.context_length < 2:
        raise ConfigError(f"{src}: model.overrides.context_length must be >= 2")


def _check_ds_stage(src: str, path: str, zero_stage: int) -> None:
    """A DeepSpeed JSON's ZeRO stage must be parallel.zero_stage: checkpoints record that key, and
    pldr-consolidate, pldr-reshard and the parameter layout (parallel/flat_layers.py) follow it."""
    import json
    try:
        with open(path) as f:
            stage = json.load(f).get("zero_optimization", {}).get("stage", 0)
    except (OSError, ValueError, AttributeError) as e:
        raise ConfigError(f"{src}: deepspeed_config={path!r} is not a readable DeepSpeed JSON object ({e})") from None
    if stage != zero_stage:
        raise ConfigError(f"{src}: deepspeed_config={path!r} has zero_optimization.stage={stage} but parallel.zero_stage="
                          f"{zero_stage} (set parallel.zero_stage={stage}: checkpoints and their tools follow that key)")
