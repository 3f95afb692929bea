"""Held-out loss and perplexity: one pass over token batches, averaged over tokens.

`evaluate_loss` is what the training loop calls for its validation step; `evaluate_shards`
adds reading the held-out webdataset split and timing, for `pldr-eval perplexity`.
"""
from __future__ import annotations

import math
import time
from typing import Callable, Iterable, Optional

import torch

from ..model import lm_loss


@torch.no_grad()
def evaluate_loss(model, batches: Iterable[dict], loss_fn: Optional[Callable] = None,
                  pad_id: Optional[int] = None, max_batches: Optional[int] = None) -> tuple[float, int]:
    """(mean token loss, number of target tokens) over batches of {"input", "target"} [B, S].

    loss_fn(logits, targets) returns the mean over a batch's non-pad targets (default `lm_loss`);
    each batch is weighed by its non-pad target count so the result is a mean over tokens, not
    over batches (batches with more padding would otherwise count too much).
    """
    if pad_id is None:   # a DeepSpeed engine wraps the model: read its config through .module
        cfg = getattr(model, "cfg", None) or getattr(getattr(model, "module", None), "cfg", None)
        pad_id = cfg.pad_id if cfg is not None else 0
    loss_fn = loss_fn or (lambda logits, targets: lm_loss(logits, targets, pad_id))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    try:
        for i, batch in enumerate(batches):
            if max_batches is not None and i >= max_batches:
                break
            inputs, targets = batch["input"].to(device), batch["target"].to(device)
            count = int(targets.ne(pad_id).sum())
            if count == 0:
                continue
            total += float(loss_fn(model(inputs), targets)) * count
            tokens += count
    finally:
        model.train(was_training)
    if tokens == 0:
        raise ValueError("evaluate_loss: the batches hold no non-pad target tokens (is the held-out split empty?)")
    return total / tokens, tokens


def evaluate_shards(model, shards: str, split: str = "valid", batch_size: int = 8,
                    max_batches: Optional[int] = None) -> dict:
    """Loss, perplexity and tokens/s of `model` over one pass of a shard split (in order)."""
    from ..data.loader import TokenLoader
    from ..data.manifest import load_manifest

    loader = TokenLoader(shards, split, batch_size, load_manifest(shards).seq_len, shuffle=False)
    batches = loader.plan.samples_per_epoch // batch_size   # one epoch; the loader itself never ends
    if max_batches is not None:
        batches = min(batches, max_batches)
    start = time.perf_counter()
    loss, tokens = evaluate_loss(model, loader, max_batches=batches)
    seconds = time.perf_counter() - start
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": tokens, "batches": batches,
            "seconds": seconds, "tokens_per_s": tokens / seconds}
