"""The PLDR model as a DeepSpeed PipelineModule (1F1B), built from the same layer objects.

Build the full PLDRModel from the seed, `parallelize` it when tp > 1, then hand its pieces
here: the embedding, every DecoderLayer and the output head become the pipeline's layers, so
weights, initialisation and maths are exactly the non-pipelined model's. Only plain tensors
cross stage boundaries:

    embedding:  tokens                      -> (h, tokens)
    decoder:    (h, tokens[, penalty])      -> (h, tokens[, penalty])
    head:       (h, tokens[, penalty])      -> logits  or (logits, penalty)

The tokens travel with the activations (they are integers, so DeepSpeed sends no gradient for
them) and each stage rebuilds the causal + padding mask from them, which is cheaper than
sending a [B, 1, S, S] mask. In v510_dag training the running sum of the layers' DAG penalties
travels as a float tensor of shape [1] and the loss adds penalty / num_layers, like
`PLDRModel.forward(..., return_penalty=True)`.
"""
from __future__ import annotations

from typing import Callable

from deepspeed.pipe import PipelineModule
from deepspeed.runtime import utils as ds_utils
from torch import nn

from ..model import PLDRModel
from ..model.model import attention_bias


class EmbeddingStage(nn.Module):
    """tokens [B, S] -> (hidden [B, S, d], tokens)."""

    def __init__(self, embed: nn.Module):
        super().__init__()
        self.embed = embed

    def forward(self, tokens):
        return self.embed(tokens), tokens


class DecoderStage(nn.Module):
    """One DecoderLayer; the mask is rebuilt from the tokens that travel alongside."""

    def __init__(self, layer: nn.Module, pad_id: int, carries_penalty: bool):
        super().__init__()
        self.layer, self.pad_id, self.carries_penalty = layer, pad_id, carries_penalty
        self.assume_unpadded = False     # set by assume_unpadded(pipe) for packed data

    def forward(self, inputs):
        h, tokens = inputs[0], inputs[1]
        key_pad = None if self.assume_unpadded else tokens.eq(self.pad_id)
        bias = attention_bias(key_pad, 0, tokens.shape[1], h.dtype)
        out, penalty = self.layer(h, 0, bias)
        if not self.carries_penalty:
            return out, tokens
        running = inputs[2] if len(inputs) > 2 else None
        if penalty is None:  # eval mode computes no penalty; keep the tuple's shape
            penalty = out.new_zeros(())
        penalty = penalty.reshape(1).to(out.dtype)
        return out, tokens, penalty if running is None else running + penalty


class HeadStage(nn.Module):
    """(hidden, tokens[, penalty]) -> logits [B, S, V] (or V / tp) [, penalty]."""

    def __init__(self, head: nn.Module):
        super().__init__()
        self.head = head

    def forward(self, inputs):
        logits = self.head(inputs[0])
        return (logits, inputs[2]) if len(inputs) > 2 else logits


def carries_penalty(model: PLDRModel) -> bool:
    return model.cfg.mode == "v510_dag" and any(c > 0 for c in model.cfg.dag_coeffs)


def pipeline_loss(loss_fn: Callable, num_layers: int) -> Callable:
    """loss_fn(logits, targets) extended with the DAG penalty when the head passes one on."""

    def loss(outputs, targets):
        if isinstance(outputs, tuple):
            logits, penalty = outputs
            return loss_fn(logits, targets) + penalty.sum() / num_layers
        return loss_fn(outputs, targets)

    return loss


def pipeline_layers(model: PLDRModel) -> list:
    """The model's own modules, wrapped in the order the data flows through them."""
    dag = carries_penalty(model)
    return ([EmbeddingStage(model.embed)]
            + [DecoderStage(layer, model.cfg.pad_id, dag) for layer in model.layers]
            + [HeadStage(model.head)])


def layer_flops(cfg) -> list:
    """Forward FLOPs per token of each pipeline layer (model/flops.py at the context length):
    0 for the embedding (a lookup), each decoder layer's share, the output head's 2 d V."""
    from ..model.flops import forward_breakdown
    terms = forward_breakdown(cfg, cfg.context_length)
    decoder = sum(v for k, v in terms.items() if k != "output_head") / cfg.num_layers
    return [0] + [round(decoder)] * cfg.num_layers + [round(terms["output_head"])]


class PLDRPipeline(PipelineModule):
    """DeepSpeed's PipelineModule with one more partition method, "flops": stages balanced by
    forward FLOPs (DeepSpeed's balanced split of `layer_flops`). A pipeline runs at the pace of
    its slowest stage, and DeepSpeed's "parameters" balances parameters: it counts the
    embedding, which computes nothing, like the output head, the costliest layer (1.2 decoder
    layers at pldr-1b, 2.4 at pldr-110m). At pp = 2, pldr-110m gets the embedding and 4 decoder
    layers on stage 0, 1 and the head on stage 1 (the slower stage 96 MFLOP a token; 106 with
    "parameters"); pldr-1b 9 and 7 (1005 against 1025). The loss after the head (a softmax
    over the vocabulary, memory-bound) is not counted, so the last stage is still the heavier.
    Megatron's options that count the embedding and the loss in the pipeline split do the same."""

    def __init__(self, *args, flops: list, **kwargs):
        self._flops = flops      # read by _partition_layers, which PipelineModule.__init__ calls
        super().__init__(*args, **kwargs)

    def _partition_layers(self, method="uniform"):
        if method != "flops":
            return super()._partition_layers(method)
        self.parts = ds_utils.partition_balanced(weights=self._flops, num_parts=self.num_stages)
        stage = self._topo.get_coord(self.global_rank).pipe
        self._set_bounds(start=self.parts[stage], stop=self.parts[stage + 1])


def build_pipeline_module(model: PLDRModel, grid, loss_fn: Callable, partition_method: str = "flops",
                          activation_checkpoint_interval: int = 0) -> PipelineModule:
    """`model` (already parallelized when tp > 1) -> a PipelineModule over `grid.topology`.

    partition_method: "flops" (balance forward FLOPs: PLDRPipeline), DeepSpeed's "parameters"
    (balance parameter counts), "uniform" (balance layer counts) or "type:DecoderStage" (balance
    decoder layers). Every rank passes the whole model; each keeps only its stage's modules,
    the others are freed with `model`.
    """
    return PLDRPipeline(layers=pipeline_layers(model), topology=grid.topology,
                        loss_fn=pipeline_loss(loss_fn, model.cfg.num_layers),
                        partition_method=partition_method, flops=layer_flops(model.cfg),
                        activation_checkpoint_interval=activation_checkpoint_interval)


def assume_unpadded(pipe: PipelineModule) -> None:
    """Packed shards hold no padding: the decoder stages skip the padding check, which reads a
    device value on the host (`attention_bias`): a GPU sync in every layer's forward, for every
    micro-batch, where the non-pipelined model (`PLDRModel.assume_unpadded`) has none."""
    for module in pipe.modules():
        if isinstance(module, DecoderStage):
            module.assume_unpadded = True


def model_parameter_name(pipe: PipelineModule, name: str) -> str:
    """A PipelineModule parameter name ('3.layer.attn.wq.weight') -> the PLDRModel's name
    ('layers.2.attn.wq.weight'), so checkpoints and comparisons use one naming."""
    index, rest = name.split(".", 1)
    index = int(index)
    last = len(pipe._layer_specs) - 1
    if index == 0:
        return rest  # 'embed.tokens.weight'
    if index == last:
        return rest  # 'head.weight'
    return f"layers.{index - 1}.{rest.removeprefix('layer.')}"


def stage_state_dict(pipe: PipelineModule) -> dict:
    """This stage's parameters and buffers under the PLDRModel's names."""
    return {model_parameter_name(pipe, n): t for n, t in pipe.state_dict().items()}


def drop_batch_timings(engine) -> None:
    """DeepSpeed's PipelineEngine times every `train_batch` with two new CUDA events, kept until
    it prints its own log line: every `steps_per_print` steps, which make_ds_config puts out of
    reach (the trainer logs). So a run held two more events every step, for good. The engine's
    `train_batch` now drops them after each batch."""
    from deepspeed.runtime.pipe.engine import TRAIN_BATCH_TIMER
    train_batch = engine.train_batch

    def train_batch_without_timings(*args, **kwargs):
        loss = train_batch(*args, **kwargs)
        engine.timers(TRAIN_BATCH_TIMER).reset()
        return loss

    engine.train_batch = train_batch_without_timings
