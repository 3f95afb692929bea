"""Assemble a run from its config: process grid, model (TP/PP applied from outside), DeepSpeed
engine, data loaders, and the one-step functions for pipelined and non-pipelined layouts."""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist

from ..model import PLDRModel, count_parameters, lm_loss
from ..model.plga import PowerLaw
from .config import ConfigError, RunConfig


def check_data(cfg: RunConfig) -> None:
    """Manifest vs model config, before any process group exists."""
    from ..data.manifest import load_manifest
    manifest = load_manifest(cfg.data.shards)
    mcfg = cfg.model_config()
    if manifest.seq_len > mcfg.context_length:
        raise ConfigError(f"{cfg.source}: shards in {cfg.data.shards} have seq_len={manifest.seq_len} but "
                          f"model.context_length={mcfg.context_length} (raise context_length or re-shard)")
    if manifest.vocab_size > mcfg.vocab_size:
        raise ConfigError(f"{cfg.source}: the shards' tokenizer has {manifest.vocab_size} pieces but "
                          f"model.vocab_size={mcfg.vocab_size} (set model.overrides.vocab_size)")


def precision_of(cfg: RunConfig) -> str:
    if cfg.train.precision != "auto":
        return cfg.train.precision
    return "bf16" if torch.cuda.is_available() else "fp32"


@dataclass
class Run:
    grid: Any
    mcfg: Any
    module: torch.nn.Module
    engine: Any
    optimizer: Any
    train_loader: Any
    valid_loader: Any
    seq_len: int
    tokens_per_step: int
    precision: str
    num_params: int
    loss_fn: Callable
    inject: list

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def grad_norm(self) -> float:
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    # -- one optimizer step ------------------------------------------------------------
    def train_step(self, batches, inject_nonfinite: bool):
        """Returns (mean loss over the step's micro-batches and data-parallel ranks, skipped)."""
        self.inject[0] = inject_nonfinite
        skipped_before = self.optimizer.skipped_steps
        if self.grid.pp > 1:
            loss = self.engine.train_batch(data_iter=_pipe_batches(batches))
            loss = float(loss)
        else:
            total = 0.0
            for _ in range(self.engine.gradient_accumulation_steps()):
                batch = next(batches)
                inputs, targets = _to_device(batch, self.engine.device)
                loss = self.loss_fn(self.engine(inputs), targets)
                self.engine.backward(loss)
                self.engine.step()
                total += loss.detach().float()
            loss = total / self.engine.gradient_accumulation_steps()
            dist.all_reduce(loss, group=self.grid.dp_group)
            loss = float(loss) / self.grid.dp
        return loss, self.optimizer.skipped_steps > skipped_before

    @torch.no_grad()
    def eval_loss(self, num_batches: int) -> float:
        loader = iter(self.valid_loader)
        losses = []
        if self.grid.pp > 1:
            for _ in range(num_batches):
                losses.append(float(self.engine.eval_batch(data_iter=_pipe_batches(loader))))
            return sum(losses) / len(losses)
        self.engine.eval()
        for _ in range(num_batches):
            inputs, targets = _to_device(next(loader), self.engine.device)
            losses.append(self.loss_fn(self.engine(inputs), targets).float())
        self.engine.train()
        loss = torch.stack(losses).mean()
        dist.all_reduce(loss, group=self.grid.dp_group)
        return float(loss) / self.grid.dp


def _to_device(batch, device):
    return batch["input"].to(device, non_blocking=True), batch["target"].to(device, non_blocking=True)


def _pipe_batches(batches):
    """DeepSpeed's pipeline engine pulls (inputs, labels) micro-batches from an iterator."""
    for batch in batches:
        yield batch["input"], batch["target"]
