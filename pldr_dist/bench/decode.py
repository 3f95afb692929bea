"""The `decode` suite: per-token latency of generation, per cache mode and prompt length.

Batch 1, greedy, random weights (speed does not depend on their values): prefill the prompt,
then time single-token decode steps; the median is reported (prefill not counted). Modes:
`none` (re-runs the whole sequence each token), `kv`, `kv+g` (the paper's fast path),
`artifact` (the v510Gi model of a G-cache artifact with a KV cache), `sdpa` (G = I and the q@G
product skipped: plain attention, the floor). On CUDA also `kv+g+cg`, `artifact+cg`, `sdpa+cg`:
fixed-shape caches, each step replayed as one CUDA graph (`infer.static_decode`, what
`generate()` and `pldr-generate` use there). Only the last position goes through the LM head, in
every mode. Last, `generate()` on three left-padded prompts with the static decoder and with the
growing KV+G caches must give the same tokens (`static_check`; its exit code is 1 if not).
"""
from __future__ import annotations

import contextlib
import os
import statistics
import tempfile
import time
from dataclasses import dataclass

from ..errors import InputError
from . import report

MODES = ("none", "kv", "kv+g", "artifact", "sdpa")
GRAPH_MODES = ("kv+g+cg", "artifact+cg", "sdpa+cg")


@dataclass
class Row:
    mode: str                 # a cache mode, or static_check
    prompt_len: int
    exit_code: int = 0
    ms_per_token: float = 0.0
    tokens_per_s: float = 0.0
    detail: str = ""


def _sync(device):
    if device == "cuda":
        import torch
        torch.cuda.synchronize()


def time_decode(model, prompt_len: int, steps: int, cache_mode: str, device: str) -> float:
    """Median seconds per decode step after the prompt."""
    import torch
    from ..infer.static_decode import StaticDecoder
    from ..model import InferenceCache

    with torch.no_grad():
        seq = torch.randint(4, model.cfg.vocab_size, (1, prompt_len), device=device)
        flags = {"none": None, "kv": (True, False), "kv+g": (True, True), "static": (True, True)}[cache_mode]
        cache = InferenceCache(model.cfg.num_layers, *flags) if flags else None
        logits = model(seq, cache=cache)[:, -1]
        decoder = StaticDecoder(model, cache, prompt_len + steps + 1) if cache_mode == "static" else None
        _sync(device)
        times = []
        for _ in range(steps):
            nxt = logits.argmax(-1, keepdim=True)
            start = time.perf_counter()
            if decoder is not None:
                logits = decoder.step(nxt)
            elif cache is None:
                seq = torch.cat((seq, nxt), 1)
                logits = model(seq)[:, -1]
            else:
                logits = model(nxt, cache=cache)[:, -1]
            _sync(device)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def static_check(model, device: str, prompt_len: int, new_tokens: int) -> Row:
    """generate() with the static decoder against the growing KV+G caches: same tokens?"""
    import torch
    from ..infer.generate import SamplingConfig, generate

    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(4, model.cfg.vocab_size, (n,), generator=g).tolist()
               for n in (prompt_len, max(1, prompt_len // 4), 1)]
    greedy = SamplingConfig(max_new_tokens=new_tokens, stop_at_eos=False)
    out, rate = {}, {}
    for static in (False, True, True):        # the second static run: capture already warm
        _sync(device)
        t = time.perf_counter()
        out[static] = generate(model, prompts, greedy, cache_mode="kv+g", keep_logits=True, static=static)
        _sync(device)
        rate[static] = new_tokens * len(prompts) / (time.perf_counter() - t)
    same = out[False].tokens == out[True].tokens
    diff = max((x - y).abs().max().item() for x, y in zip(out[False].step_logits, out[True].step_logits))
    return Row("static_check", prompt_len, 0 if same else 1, tokens_per_s=rate[True],
               detail=f"3 left-padded prompts, {new_tokens} greedy tokens: identical tokens {same}, max |logit diff| "
                      f"{diff:.2e}; {rate[True]:,.0f} vs {rate[False]:,.0f} tokens/s (static vs growing caches, "
                      f"batch 3, prefill included)")


def models_for(a, device: str) -> dict:
    """mode -> (model, how its cache runs); every model's head sees the last position only."""
    import torch
    from ..infer.gcache_artifact import compute_g_cache, load_artifact, save_artifact, to_inference_model
    from ..model import PLDRModel, preset

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[a.dtype]
    torch.manual_seed(0)
    model = PLDRModel(preset(a.model)).to(device, dtype).eval()
    g, a_lm = compute_g_cache(model, "eos")
    with tempfile.TemporaryDirectory() as tmp:
        path = save_artifact(os.path.join(tmp, "g.safetensors"), g, a_lm, model, "eos")
        fast = to_inference_model(model, load_artifact(path, model))
    sdpa = PLDRModel(preset(a.model, mode="v510G", fixed_g="identity")).to(device, dtype).eval()
    for layer in sdpa.layers:
        layer.attn.skip_identity_g = True
    return {"none": (model, "none"), "kv": (model, "kv"), "kv+g": (model, "kv+g"), "artifact": (fast, "kv"),
            "sdpa": (sdpa, "kv"), "kv+g+cg": (model, "static"), "artifact+cg": (fast, "static"),
            "sdpa+cg": (sdpa, "static")}


@contextlib.contextmanager
def last_token_head(models):
    """Only the last position goes through each model's head (generation needs no other logits)."""
    import torch

    class Last(torch.nn.Module):
        def __init__(self, head):
            super().__init__()
            self.head = head

        def forward(self, h):
            return self.head(h[:, -1:])
    heads = [m.head for m in models]
    for m, head in zip(models, heads):
        m.head = Last(head)
    try:
        yield
    finally:
        for m, head in zip(models, heads):
            m.head = head


def table(rows: list, device: str, a) -> str:
    lines = [f"# {device}: {a.model} decode, batch 1, greedy, {a.dtype}, median of {a.steps} steps after the prompt",
             f"{'prompt':>6} " + " ".join(f"{m:>11}" for m in a.modes) + "  (ms/token)"]
    for n in a.lengths:
        ms = {r.mode: r.ms_per_token for r in rows if r.prompt_len == n}
        lines.append(f"{n:>6} " + " ".join(f"{ms.get(m, 0):>11.2f}" for m in a.modes))
    best = "kv+g+cg" if "kv+g+cg" in a.modes else "kv+g"
    floor = "sdpa+cg" if "sdpa+cg" in a.modes else "sdpa"
    for n in a.lengths:
        ms = {r.mode: r.ms_per_token for r in rows if r.prompt_len == n}
        lines.append(f"# prompt {n}: none / {best} = {ms['none'] / ms[best]:.1f}x; "
                     f"{best} / {floor} = {ms[best] / ms[floor]:.3f}")
    lines += [f"# static_check: {r.detail}" + ("" if r.exit_code == 0 else "  FAILED")
              for r in rows if r.mode == "static_check"]
    return "\n".join(lines)


def run(a, log=print) -> list:
    import torch
    if a.smoke:
        a.model, a.lengths, a.steps, a.check_tokens = "tiny", [16, 32], 4, 8
    from ..model.config import PRESETS
    if a.model not in PRESETS:
        raise InputError(f"--model {a.model!r}: choose one of {', '.join(PRESETS)}")
    if a.steps < 1 or not a.lengths or min(a.lengths) < 1:
        raise InputError("--steps and --lengths must be positive")
    device = "cuda" if torch.cuda.is_available() and not a.smoke else "cpu"
    if a.threads and device == "cpu":
        torch.set_num_threads(a.threads)
    a.modes = list(MODES + (GRAPH_MODES if device == "cuda" else ()))
    name = report.device_name(device)
    models = models_for(a, device)
    rows = [static_check(models["kv+g"][0], device, a.lengths[0], a.check_tokens)]
    with last_token_head(list({id(m): m for m, _ in models.values()}.values())):
        for n in a.lengths:
            for mode in a.modes:
                model, how = models[mode]
                sec = time_decode(model, n, a.steps, how, device)
                rows.append(Row(mode, n, ms_per_token=1e3 * sec, tokens_per_s=1 / sec))
                log(f"  prompt {n:>5} {mode:>11}: {1e3 * sec:8.2f} ms/token")
    rows = rows[1:] + rows[:1]
    report.write(a, rows, table(rows, name, a), name)
    log(table(rows, name, a))
    return rows


def add_parser(sub) -> None:
    p = sub.add_parser("decode", help="per-token decode latency per cache mode (KV, KV+G, G-cache artifact, "
                                      "CUDA graphs) against plain attention",
                       description=__doc__.splitlines()[0])
    p.add_argument("--model", default="pldr-110m", help="model preset (random weights)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--lengths", type=report.int_list, default=[128, 512, 1000], help="prompt lengths")
    p.add_argument("--steps", type=int, default=50, help="timed decode steps per point (median)")
    p.add_argument("--check-tokens", type=int, default=64, help="tokens generate() makes in the static check")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (default: torch's)")
    report.add_common(p, "decode")
    p.set_defaults(func=run)
