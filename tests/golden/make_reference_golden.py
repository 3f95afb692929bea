"""Write tests/golden/reference_tiny.safetensors by running the AUTHORS' PLDR-LLM v510 code.

Not imported by the tests (it needs the authors' code and torchtune); run once by hand. The
golden file pins what tests/test_golden_reference.py checks our importer against: a tiny
model's weights exactly as the authors' code names them, and the logits the authors' code
gives for fixed tokens.

How it was run (the authors' repo github.com/burcgokden/PLDR-LLM-with-KVG-cache at commit
8e8658fca4eacf8c9013f5bcd60408b5fc679777, in a throwaway venv outside the project):

    git clone https://github.com/burcgokden/PLDR-LLM-with-KVG-cache /tmp/authors_clone
    git -C /tmp/authors_clone checkout 8e8658fca4eacf8c9013f5bcd60408b5fc679777
    python3 -m venv /tmp/authors_venv
    /tmp/authors_venv/bin/pip install torch==2.13.0 torchtune==0.5.0 torchao==0.8.0 \
        keras==3.8.0 safetensors numpy
    /tmp/authors_venv/bin/python tests/golden/make_reference_golden.py /tmp/authors_clone

(torchtune 0.5.0 is the authors' pinned version and needs a torchao that still has
torchao.dtypes.nf4tensor, hence 0.8.0; keras is imported by the authors' run script, whose
create_masks builds the attention mask, and runs here on its torch backend. Rerunning gives
the same tensors; the safetensors header's key order may differ byte-wise.)

What it does:
1. Builds the authors' PLDR_Model with the spec §2 "tiny" config (L=2, h=4, dk=16, d=64,
   dff=170, A_dff=32, R=2, n=2, V=512, max_seq_len=64), seeded, with their own init.
2. Perturbs the parameters their init leaves constant (all Linear biases and the PLGA b and
   beta are zeros, LayerNorms are 1/0): otherwise same-shaped tensors such as wq.bias and
   wk.bias, or two LayerNorms, would be identical and a swap of their names undetectable.
3. Stores their state_dict under their names, in fp32 (the dtype their model is built in;
   this keeps the file small), so the weights are exactly representable in fp32.
4. Casts the model to fp64 (`.double()`: their plga_layer creates its tensors with an
   explicit dtype=float32, so torch.set_default_dtype alone would leave mixed dtypes) and
   runs their forward on fixed tokens, batch 2 x 24; row 1 has pad id 0 at one interior
   position and at the last four (right padding, so no query row is fully masked), with the
   mask from their own dist_pldr_model_e2e.create_masks (padding + look-ahead).
   - golden.logits: their code as is. torchtune's RotaryPositionalEmbeddings computes in
     fp32 even for fp64 inputs (x.float(), fp32 angle table), so these logits carry
     fp32-level rounding from the rotary step only.
   - golden.logits_rope_fp64: the same run with torchtune's rotary module evaluated in fp64
     (same formula: theta = 1 / base^(2i/dk), interleaved pairs; only the .float() casts
     dropped). Everything else is their fp64 forward, so our fp64 model must match it to
     rounding.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import types
from pathlib import Path

TINY = dict(num_layers=2, d_model=64, num_heads=4, dff=170, input_vocab_size=512,
            A_dff=32, num_reslayerA=2, num_denseA=2, max_seq_len=64)
SEED = 20250319
TOKEN_SEED = 1234
BATCH, SEQ = 2, 24
PAD_POSITIONS_ROW1 = [9, 20, 21, 22, 23]
OUT = Path(__file__).resolve().parent / "reference_tiny.safetensors"


def rope_forward_fp64(self, x, *, input_pos=None):
    """torchtune 0.5.0 RotaryPositionalEmbeddings.forward without its casts to fp32."""
    import torch
    seq_len = x.size(1)
    rope_cache = self.cache[:seq_len] if input_pos is None else self.cache[input_pos]
    xshaped = x.reshape(*x.shape[:-1], -1, 2)
    rope_cache = rope_cache.view(-1, xshaped.size(1), 1, xshaped.size(3), 2)
    x_out = torch.stack([xshaped[..., 0] * rope_cache[..., 0] - xshaped[..., 1] * rope_cache[..., 1],
                         xshaped[..., 1] * rope_cache[..., 0] + xshaped[..., 0] * rope_cache[..., 1]], -1)
    return x_out.flatten(3)


def use_fp64_rope(model):
    import torch
    from torchtune.modules import RotaryPositionalEmbeddings
    n = 0
    for mod in model.modules():
        if isinstance(mod, RotaryPositionalEmbeddings):
            theta = 1.0 / (mod.base ** (torch.arange(0, mod.dim, 2)[: mod.dim // 2].double() / mod.dim))
            angles = torch.outer(torch.arange(mod.max_seq_len, dtype=torch.float64), theta)
            mod.cache = torch.stack([angles.cos(), angles.sin()], dim=-1)
            mod.forward = types.MethodType(rope_forward_fp64, mod)
            n += 1
    assert n == TINY["num_layers"], n


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("authors_repo", type=Path, help="a checkout of burcgokden/PLDR-LLM-with-KVG-cache")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    repo = args.authors_repo.resolve()
    src = repo / "src" / "pldr_model_v510"
    sys.path[:0] = [str(src), str(repo / "src")]
    os.environ.setdefault("KERAS_BACKEND", "torch")
    commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True,
                            text=True, check=True).stdout.strip()

    import torch
    import torch.nn.functional as F
    import torchtune
    from safetensors.torch import save_file

    import pldr_model_v510 as pm
    import pldr_run_model_v510 as prm

    torch.manual_seed(SEED)
    model = pm.PLDR_Model(**TINY, activation=F.silu, device=torch.device("cpu"))
    gen = torch.Generator().manual_seed(SEED + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf in ("bias", "blst", "balst"):       # zeros after their init
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
            if ".layernorm" in name and leaf == "weight":  # ones after their init
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
    state32 = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    assert all(v.dtype == torch.float32 for v in state32.values())

    tokens = torch.randint(1, TINY["input_vocab_size"], (BATCH, SEQ),
                           generator=torch.Generator().manual_seed(TOKEN_SEED))
    tokens[1, PAD_POSITIONS_ROW1] = 0
    runner = prm.dist_pldr_model_e2e.__new__(prm.dist_pldr_model_e2e)   # only for create_masks
    runner.device = torch.device("cpu")
    mask = runner.create_masks(tokens)

    model = model.double().eval()
    with torch.no_grad():
        logits = model([tokens, mask])[0]
        use_fp64_rope(model)
        logits64 = model([tokens, mask])[0]
    assert logits.dtype == logits64.dtype == torch.float64
    print("max |logits - logits_rope_fp64| =", (logits - logits64).abs().max().item(),
          " max |logits| =", logits64.abs().max().item())

    tensors = dict(state32)
    tensors["golden.tokens"] = tokens
    tensors["golden.logits"] = logits.contiguous()
    tensors["golden.logits_rope_fp64"] = logits64.contiguous()
    meta = {
        "authors_repo": "github.com/burcgokden/PLDR-LLM-with-KVG-cache",
        "authors_commit": commit,
        "authors_model": "src/pldr_model_v510/pldr_model_v510.py PLDR_Model",
        "config": json.dumps({**TINY, "activation": "silu"}),
        "seed": str(SEED), "token_seed": str(TOKEN_SEED), "pad_positions_row1": json.dumps(PAD_POSITIONS_ROW1),
        "weights_dtype": "float32 (the authors' model as built)",
        "run_dtype": "float64 (model.double()); golden.logits: torchtune rotary in fp32 as shipped; "
                     "golden.logits_rope_fp64: rotary evaluated in fp64",
        "perturbation": "biases, blst, balst += 0.05*N(0,1); LayerNorm weights += 0.1*N(0,1)",
        "torch": torch.__version__, "torchtune": torchtune.__version__,
        "made_by": "tests/golden/make_reference_golden.py",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(args.out), metadata=meta)
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes, {len(state32)} parameters)")


if __name__ == "__main__":
    main()
