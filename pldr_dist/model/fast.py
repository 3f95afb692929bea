"""Fast training path: the same model, the same state dict, fewer and larger GPU kernels.

`optimize_for_training(model)` changes how the model runs, never what it computes:
- each metric-learner GLU runs as one Triton kernel on CUDA in bf16 (`glu_kernel`: the hidden
  state stays on the chip, the backward recomputes it), or, with fused_learner=True, the whole
  learner as one Triton op (`metric_kernel`: a block of rows stays on the chip from the first
  unit to the last; opt-in: on an H200 level with the per-GLU kernels in a compiled step);
  elsewhere U1 and U2 run as one matrix product, with the hidden width (a_dff = 170 in the
  presets) zero-padded to a multiple of 8 so bf16 rows stay 16-byte aligned; the padding adds
  exact zeros. The parameters keep their names.
- the power law runs as one Triton op forward and one backward (`power_law_kernel`: a
  (batch, head)'s 64 x 64 tiles on the chip, the weight gradients summed in a fixed order);
- A0 = q~^T q~ and q~ G_LM run as Triton ops (`head_products`: one pass over q~ each, in the
  layout the rotary kernel wrote, no padding of S = 1023), for a learned G and for a G = I
  model's fixed one alike; where A0 is needed, the queries' rotation computes it in the same
  pass over q, and its backward takes A0's gradient in the same pass (`rotary_density`);
- each decoder layer is compiled on its own (regional compilation: one graph reused by
  every layer, short compile times) with no graph breaks, so the metric learner, power
  law, rotary and norms become a few fused kernels, and attention on q~G_LM stays in the
  SDPA flash kernel;
- the loss: call the model with targets, `model(tokens, targets=...)`; the head and the
  cross-entropy then run as one autograd step (`head_loss`: one pass over the logits
  forward, one backward, the bias gradient inside the weight-gradient GEMM);
- the rotary cos/sin table is computed once and loaded by the compiled layers (inductor
  would otherwise recompute a pow, cos and sin per element of q and k);
- the feed-forward hidden width (d_ff = 2389 and 5461 in the presets) is zero-padded to a
  multiple of 64 inside each forward, so bf16 rows are 16-byte aligned for the GEMMs and the
  compiled gating kernels; the padding adds exact zeros;
- `assume_unpadded` skips the padding check (a host sync) for packed data without pads.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
import torch._functorch.config as functorch_config

from . import glu_kernel, head_products, metric_kernel, power_law_kernel, rotary_density
from .head_loss import compute_dtype
from .layers import SwiGLU, rotary_cache
from .model import PLDRModel
from .plga import PLGA, MetricLearner, PowerLaw

ALIGN = 8  # bf16 elements in 16 bytes
FFN_ALIGN = 64  # feed-forward hidden width padded to a multiple of this


class FusedMetricLearner(MetricLearner):
    """The metric learner as one Triton op for the whole learner (`metric_kernel`: bf16 on
    CUDA), or with each GLU as one Triton kernel (`glu_kernel`), else with U1 and U2 as one
    padded product; same parameters, same result (to bf16 rounding).

    use_kernel: the Triton kernels at all (False: the compiled PyTorch GLU, for comparisons).
    use_fused_learner: the whole-learner op; None (default) = on CUDA where the kernels run,
    True = also in Triton's CPU interpreter (tests), False = per-GLU kernels only."""

    use_kernel = True
    use_fused_learner = None

    def forward(self, a0: torch.Tensor) -> torch.Tensor:
        fused = self.use_fused_learner
        if (self.use_kernel and fused is not False and metric_kernel.available(a0) and (a0.is_cuda or fused)
                and compute_dtype(self.u1_weight) == torch.bfloat16):
            # LayerNorm(A0) and all R units in one op; A0 goes in as it is (the first step
            # is an fp32 LayerNorm), A comes out fp32 as autocast's LayerNorm gives it. Without
            # autocast (DeepSpeed's bf16: bf16 parameters) PyTorch's LayerNorm gives a0's dtype,
            # and the attention downstream needs q G_LM in the dtype of k and v: cast to it.
            a = metric_kernel.metric_learner(a0, *metric_kernel.learner_params(self), eps=self.eps)
            if not torch.is_autocast_enabled(a0.device.type):
                a = a.to(torch.promote_types(a0.dtype, self.norm_weight.dtype))
            return a
        return super().forward(a0)

    def glu(self, y: torch.Tensor, r: int, j: int) -> torch.Tensor:
        w1, b1, w2, b2, w3, b3 = self.glu_weights(r, j)
        if self.use_kernel and glu_kernel.available(y) and compute_dtype(w1) == torch.bfloat16:
            # The kernel rounds its input to bf16 anyway; casting here (fused by the compiler
            # into whatever made y, e.g. the unit's fp32 LayerNorm) halves what the three
            # kernels read and what autograd saves. The input's gradient is then bf16, as
            # autocast's own linear layers give.
            rows = y.reshape(-1, y.shape[-1]).to(torch.bfloat16)
            return glu_kernel.glu(rows, w1, b1, w2, b2, w3, b3).view(y.shape)
        pad = -w1.shape[0] % ALIGN
        w12 = torch.cat((F.pad(w1, (0, 0, 0, pad)), F.pad(w2, (0, 0, 0, pad))))
        b12 = torch.cat((F.pad(b1, (0, pad)), F.pad(b2, (0, pad))))
        gate, up = F.linear(y, w12, b12).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, F.pad(w3, (0, pad)), b3)


class FastPLGA(PLGA):
    """PLGA with A0 = q~^T q~ and q~ G_LM as Triton ops (`head_products`: one pass over q~
    each, no padding) on bf16 work; same parameters and result (to bf16 rounding). A fixed G
    (G = I models) takes the same q G op, so the two models' comparison stays like for like.
    use_head_products: None (default) = on CUDA, True = also in Triton's CPU interpreter
    (tests), False = torch.matmul."""

    use_head_products = None

    def _products_on(self, q: torch.Tensor) -> bool:
        on = self.use_head_products
        return (on is not False and q.dtype == torch.bfloat16 and head_products.available(q)
                and (q.is_cuda or on is True))

    def gram(self, q_rot: torch.Tensor) -> torch.Tensor:
        return head_products.density(q_rot) if self._products_on(q_rot) else super().gram(q_rot)

    def rotate_queries(self, q: torch.Tensor, offset, with_a0: bool) -> tuple:
        """With A0 wanted, an int offset and the rotary table: q~ and A0 from one pass over q
        (`rotary_density`), whose backward also takes the density's product."""
        table, S = self.rope_cache, q.shape[-2]
        if with_a0 and isinstance(offset, int) and table is not None and offset + S <= table.shape[0] \
                and self._products_on(q):
            table = table[offset:offset + S]
            if rotary_density.available(q, table):
                return rotary_density.rotary_density(q, table, self.cfg.rope_style == "half")
        return super().rotate_queries(q, offset, with_a0)

    def times_g(self, q: torch.Tensor, g_lm: torch.Tensor) -> torch.Tensor:
        if (g_lm.dim() == 4 or not g_lm.requires_grad) and self._products_on(q):
            return head_products.times_g(q, g_lm)
        return super().times_g(q, g_lm)


class FastPowerLaw(PowerLaw):
    """The power law as one Triton op (`power_law_kernel`) on bf16 work; same parameters and
    outputs (to bf16 rounding). use_kernel: None (default) = on CUDA, True = also in Triton's
    CPU interpreter (tests), False = `PowerLaw.forward`."""

    use_kernel = None

    def forward(self, a: torch.Tensor, g_only: bool = False):
        on = self.use_kernel
        if (on is not False and compute_dtype(self.W) == torch.bfloat16 and power_law_kernel.available(a)
                and (a.is_cuda or on is True)):
            a_lm, a_p, g = power_law_kernel.power_law(a, self.W, self.b, self.P, self.alpha, self.beta, g_only)
            return (None, None, g) if g_only else (a_lm, a_p, g)
        return super().forward(a, g_only)


class PaddedSwiGLU(SwiGLU):
    """SwiGLU with the hidden width zero-padded to a multiple of FFN_ALIGN for the products:
    same parameters and result (padded units are silu(0) * 0 = 0 and meet zero columns of W3).
    The padding copies the weights once per step (~6 M values), which the compiler fuses into
    their bf16 cast; aligned [tokens, d_ff] activations are what the GEMMs and gating read."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad = -self.w1.out_features % FFN_ALIGN
        gate = F.linear(x, F.pad(self.w1.weight, (0, 0, 0, pad)), F.pad(self.w1.bias, (0, pad)))
        up = F.linear(x, F.pad(self.w2.weight, (0, 0, 0, pad)), F.pad(self.w2.bias, (0, pad)))
        return F.linear(F.silu(gate) * up, F.pad(self.w3.weight, (0, pad)), self.w3.bias)


@functools.lru_cache(maxsize=None)
def _fast_class(cls: type, fast: type, prefix: str) -> type:
    """cls with the methods of `fast` (a subclass of cls's model class), keeping whatever cls
    adds to it (the tensor-parallel gradient sharing of parallel/layers.py wraps the learner's
    forward; context parallelism's PLGA sums A0 over ranks)."""
    if issubclass(cls, fast):
        return cls
    if cls is fast.__base__:
        return fast
    return type(f"{prefix}{cls.__name__}", (cls, fast), {})


def fuse_metric_glus(model: PLDRModel, kernel: bool = True, fused_learner: bool = False) -> int:
    """Switch every metric learner to the fused GLUs in place; returns how many GLUs.
    kernel=False keeps the Triton kernels off (the compiled PyTorch GLU; for comparisons);
    fused_learner=False keeps the per-GLU kernels instead of the whole-learner op."""
    count = 0
    for module in model.modules():
        if isinstance(module, MetricLearner):
            module.__class__ = _fast_class(module.__class__, FusedMetricLearner, "Fused")
            module.use_kernel = kernel
            module.use_fused_learner = None if fused_learner else False
            R, n = module.shape
            count += R * n
    return count


def optimize_for_training(model: PLDRModel, compile: bool = True, packed: bool = True,
                          cuda_graphs: bool = True, backend: str = "inductor",
                          triton_glu: bool = True, rope_cache: bool = True, pad_ffn: bool = True,
                          fused_learner: bool = False, hooks_outside: bool = False) -> int:
    """Make `model` train fast in place; its loss is `model(tokens, targets=targets)`. Returns
    the number of metric-learner GLUs switched to the fused forward.

    packed=True: the batches hold no pad tokens (packed pretraining data), so the padding
    mask is never built. cuda_graphs=True replays each compiled layer as a CUDA graph: the
    metric learner launches ~1000 small kernels a step, and without graphs the step waits on
    the CPU (call `torch.compiler.cudagraph_mark_step_begin()` before each step's forward).
    backend: torch.compile's backend ("aot_eager" in CPU tests). triton_glu: the metric
    learner's GLUs, A0, q G and the power law run as Triton kernels where they can (CUDA, bf16; see
    `glu_kernel`, `head_products`, `power_law_kernel`);
    fused_learner: as one op for the whole learner (`metric_kernel`) rather than per GLU.
    rope_cache, pad_ffn: the precomputed rotary table and the padded feed-forward (on by
    default; off only to measure what each gives). hooks_outside: compile each layer's forward
    only, so the module's hooks run eagerly around the graph (ZeRO-3 gathers and releases the
    layer's parameters in them; traced, they fail inside dynamo).
    """
    fused = fuse_metric_glus(model, triton_glu, fused_learner)
    device = next(model.parameters()).device
    for module in model.modules():
        # (under TP the FFN's parallel layers pad their own shards: parallel/tensor_parallel.py)
        # (an FP8 feed-forward, model/fp8.py, pads its own weights: only the plain class switches)
        if type(module) is SwiGLU and pad_ffn and isinstance(module.w1, torch.nn.Linear) \
                and module.w1.out_features % FFN_ALIGN:
            module.__class__ = PaddedSwiGLU
        if isinstance(module, PLGA):     # (with G = I too: both models' q G through one op)
            module.__class__ = _fast_class(module.__class__, FastPLGA, "Fast")
            module.use_head_products = None if triton_glu else False
        if isinstance(module, PowerLaw):
            module.__class__ = _fast_class(module.__class__, FastPowerLaw, "Fast")
            module.use_kernel = None if triton_glu else False
        if isinstance(module, PLGA) and rope_cache:
            cfg = module.cfg
            module.rope_cache = rotary_cache(cfg.context_length, cfg.head_dim, cfg.rope_base, cfg.rope_style, device)
    model.assume_unpadded = packed
    if not compile:
        return fused
    # One compiled graph per shape serves every layer; several models or batch sizes in one
    # process (benchmarks) need more cache entries than the default.
    dynamo = torch._dynamo.config
    dynamo.cache_size_limit = max(dynamo.cache_size_limit, 64)
    dynamo.accumulated_cache_size_limit = max(dynamo.accumulated_cache_size_limit, 512)
    # A0's autograd.Function (layers._Density) would make AOTAutograd skip its cache, so every
    # process re-traced and re-partitioned each layer's joint graph (~5 s a rank for the tiny
    # test model on 2 CPU cores; more for a real model at each restart). The function's traced
    # forward and backward are part of the graph that keys the cache: editing either misses it.
    functorch_config.autograd_cache_allow_custom_autograd_functions = True
    # (A0 and q G are Triton ops, `FastPLGA`, not batched matmuls, because inductor's choice for
    # them at S = 1023 was unstable: `pad_mm` times an unaligned product padded and unpadded in
    # isolation and keeps the faster, and on a fresh H100 it kept the unpadded form, a 12 ms
    # rotary kernel writing q~ transposed for an align-1 GEMM, ~7 ms a pldr-1b step. Forcing the
    # padding (inductor's force_shape_pad) fixed that, 1.012x, but would pad every unaligned
    # product, e.g. each large GEMM at B*1023 tokens with B odd, or S = 8191: not kept.)
    options = dict(fullgraph=True, dynamic=False, backend=backend)
    mode = {"mode": "reduce-overhead"} if cuda_graphs and backend == "inductor" else {}
    for layer in model.layers:
        if hooks_outside:
            layer.forward = torch.compile(layer.forward, **options, **mode)
        else:
            layer.compile(**options, **mode)
    return fused
