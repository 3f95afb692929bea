"""lm-evaluation-harness adapter: `lm_eval --model pldr --model_args pretrained=<folder>,...`.

Registered as "pldr" when this module is imported (`pldr-eval harness ...` imports it, then runs
the harness's own command line). model_args: pretrained=<consolidated folder>, gcache=<G-cache
artifact> or fixed_g=eos|<text> (score with a fixed G_LM instead of computing it from each
input), foreign_g=true (accept an artifact computed from another model), device=cpu|cuda,
dtype=float32|float64|bfloat16, batch_size=8.

Batching and exactness. A v510 model's G_LM comes from A0, a sum over *every* position of a
row, padding included (spec §3.3), so padding a row would change its scores: rows of a batch
therefore have equal lengths when G is learned. With a fixed G, right padding changes nothing
(causal attention, positions from 0), so any lengths share a batch. Generation left-pads,
which shifts rotary positions (and q G kᵀ is not shift-invariant unless G = I): its batches
always hold prompts of one length.
"""
from __future__ import annotations

from itertools import groupby
from typing import Optional

import torch
import logging

from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from ..infer.generate import SamplingConfig, generate
from ..errors import InputError
from .model_io import load_for_eval, parse_dtype

eval_logger = logging.getLogger(__name__)


def batches_of(items: list, batch_size: int, key) -> list:
    """Consecutive groups of at most batch_size items with equal key (items already sorted)."""
    out = []
    for _, group in groupby(items, key=key):
        group = list(group)
        out += [group[i:i + batch_size] for i in range(0, len(group), batch_size)]
    return out


@register_model("pldr")
class PLDRLM(TemplateLM):
    def __init__(self, pretrained: Optional[str] = None, gcache: Optional[str] = None,
                 fixed_g: Optional[str] = None, device: str = "cpu", dtype: str = "float32",
                 batch_size=8, max_batch_size=None, model=None, tokenizer=None, foreign_g=False, **unused):
        super().__init__()
        if unused:
            raise InputError(f"pldr model_args: unknown {sorted(unused)} (known: pretrained, gcache, fixed_g, "
                             f"foreign_g, device, dtype, batch_size)")
        if model is None:
            if str(device or "cpu").startswith("cuda") and not torch.cuda.is_available():
                # lm_eval's command line asks for cuda unless told otherwise; HF's adapter falls back too.
                eval_logger.warning(f"pldr: device={device} but CUDA is not available; running on CPU")
                device = "cpu"
            if not pretrained:
                raise InputError("pldr model_args: pretrained=<consolidated folder> is required")
            model, tokenizer = load_for_eval(pretrained, gcache, fixed_g, device or "cpu", dtype,
                                             str(foreign_g).lower() in ("true", "1", "yes"))
        elif gcache or fixed_g:
            raise InputError("PLDRLM(model=...): apply the G-cache to the model first (model_io.with_fixed_g)")
        if tokenizer is None:
            raise InputError(f"{pretrained}: no tokenizer.model in the folder (copy the run's tokenizer there)")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.cfg = model.cfg
        self._device = next(model.parameters()).device
        self.batch_size = 8 if str(batch_size).startswith("auto") else int(batch_size)
        self.max_length = self.cfg.context_length

    # -- tokenisation ------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        # Training appends end-of-sequence to every document, so [END] is what precedes a text.
        return self.cfg.eos_id

    def tok_encode(self, string: str, add_special_tokens=None, **kwargs) -> list[int]:
        return list(self.tokenizer.encode(string))

    def tok_decode(self, tokens) -> str:
        return self.tokenizer.decode(tokens)

    # -- scoring -------------------------------------------------------------------------
    @torch.no_grad()
    def _score(self, rows: list[tuple[list[int], int]]) -> list[tuple[float, bool]]:
        """(sum of log p of the last n tokens, all greedy) for rows (tokens, n); n >= 1.

        A row longer than context_length + 1 keeps its last context_length + 1 tokens.
        """
        window = self.max_length + 1
        prepared = []
        for index, (tokens, n) in enumerate(rows):
            tokens = tokens[-window:]
            prepared.append((index, tokens[:-1], tokens[1:][-n:] if n else []))
        prepared.sort(key=lambda r: -len(r[1]))            # long first: memory errors show early
        same_length = self.cfg.learned_g
        results: list = [None] * len(rows)
        for batch in batches_of(prepared, self.batch_size, key=lambda r: len(r[1]) if same_length else 0):
            width = len(batch[0][1])
            inputs = torch.full((len(batch), width), self.cfg.pad_id, dtype=torch.long)
            key_pad = torch.ones((len(batch), width), dtype=torch.bool)
            for b, (_, inp, _) in enumerate(batch):
                inputs[b, :len(inp)] = torch.as_tensor(inp)
                key_pad[b, :len(inp)] = False
            logits = self.model(inputs.to(self._device), key_pad=key_pad.to(self._device))
            logprobs = torch.log_softmax(logits.double() if logits.dtype == torch.float64 else logits.float(), -1)
            for b, (index, inp, targets) in enumerate(batch):
                n = len(targets)
                lp = logprobs[b, len(inp) - n:len(inp)]
                t = torch.as_tensor(targets, device=lp.device)
                total = float(lp.gather(-1, t[:, None]).sum())
                results[index] = (total, bool(lp.argmax(-1).eq(t).all()))
        return results

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        rows = [(list(ctx) + list(cont), len(cont)) for _, ctx, cont in requests]
        results = self._score(rows)
        for (key, _, _), result in zip(requests, results):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole documents, in disjoint windows of the model's context length."""
        rows, owner = [], []
        for i, req in enumerate(requests):
            (text,) = req.args
            windows = get_rolling_token_windows(self.tok_encode(text), self.prefix_token_id, self.max_length, 1)
            for ctx, cont in map(make_disjoint_window, windows):
                rows.append((ctx + cont, len(cont)))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (logprob, _) in zip(owner, self._score(rows)):
            totals[i] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # -- generation ----------------------------------------------------------------------
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy continuations with KV+G caches, cut at the first stop sequence."""
        jobs = []
        for i, req in enumerate(requests):
            context, kwargs = req.args
            kwargs = dict(kwargs or {})
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.get("max_gen_toks", 256))
            prompt = self.tok_encode(context) or [self.prefix_token_id]
            prompt = prompt[-max(1, self.max_length - max_new):]
            jobs.append((i, prompt, max_new, until))
        jobs.sort(key=lambda j: (len(j[1]), j[2]))
        out: list = [None] * len(jobs)
        for batch in batches_of(jobs, self.batch_size, key=lambda j: (len(j[1]), j[2])):
            sampling = SamplingConfig(max_new_tokens=batch[0][2], temperature=0.0, stop_at_eos=True,
                                      vocab_limit=getattr(self.tokenizer, "vocab_size", 0))   # (any encode/decode object)
            gen = generate(self.model, [j[1] for j in batch], sampling, cache_mode="kv+g")
            for (i, _, _, until), tokens in zip(batch, gen.tokens):
                tokens = [t for t in tokens if t != self.cfg.eos_id]
                text = self.tok_decode(tokens)
                cuts = [text.find(s) for s in until if s and s in text]
                out[i] = text[:min(cuts)] if cuts else text
                self.cache_hook.add_partial("generate_until", requests[i].args, out[i])
        return out


def from_model(model, tokenizer, batch_size: int = 8) -> PLDRLM:
    """A harness LM around an in-memory model (e.g. `lm_eval.simple_evaluate(model=from_model(...))`)."""
    return PLDRLM(model=model, tokenizer=tokenizer, batch_size=batch_size)


__all__ = ["PLDRLM", "from_model", "parse_dtype"]
