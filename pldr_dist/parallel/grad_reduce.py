"""The data-parallel gradient reduction of bf16 ZeRO-1 (PP = 1), overlapped with the backward.

Why: DeepSpeed's engine reduces the bf16 optimizer's gradients only after the last micro-batch's
backward has finished. It flattens every fp32 gradient into one bucket (a copy), casts it to the
communication dtype, all-reduces it and copies it back, and the GPU computes nothing meanwhile.
On 2 x H100 that is one reason ZeRO-1 at DP=2 scaled only 82.6% for pldr-110m
(docs/multi_gpu.md).

Here, in the micro-batch that ends an optimizer step, the gradient buffer of contiguous_grads.py
is cut at parameter boundaries into buckets of about BUCKET_ELEMENTS. A hook on each parameter
(`register_post_accumulate_grad_hook`) counts the bucket's gradients as autograd finishes them.
When a bucket is complete, its gradients are added into the fp32 accumulator and all-reduced
asynchronously while autograd goes on with the earlier layers, as torch DDP's and Megatron's
buckets are. The engine's reduction step then only waits for the buckets in flight. A bucket
left incomplete (a parameter without a gradient this step) is sent at the end of the backward.

The arithmetic is DeepSpeed's `allreduce_bucket`, element by element: the fp32 accumulation,
the cast to the engine's communication dtype (fp32 in generated configs, engine.make_ds_config),
the sum over the data-parallel group, the scaling by 1/dp in that dtype and the copy back to
fp32. Only where the buckets are cut differs, and that changes no element's sum at dp = 2
(tests/test_contiguous_grads.py: bit-identical weights against DeepSpeed's own reduction).
Configs that change the scaling (prescale_gradients, gradient_predivide_factor, no averaging)
keep DeepSpeed's reduction. With one replica and an fp32 reduction there is nothing to do, so
DeepSpeed's flatten-and-copy-back of every gradient is skipped.
"""
from __future__ import annotations

import functools

import torch
import torch.distributed as dist
from deepspeed.runtime.pipe.engine import PipelineEngine
from deepspeed.utils import groups

# Elements per bucket (torch DDP uses 25 MB, Megatron 40M elements). pldr-110m has ~5 buckets:
# the reduction of each overlaps the backward of the layers below it; only the last is exposed.
BUCKET_ELEMENTS = 25_000_000


class OverlappedReduce:
    def __init__(self, engine, grads):
        self.engine, self.grads, self.opt = engine, grads, grads.opt
        self.group = groups._get_sequence_data_parallel_group()   # the group DeepSpeed reduces over
        self.scale = 1.0 / (dist.get_world_size(self.group) / float(engine.sequence_parallel_size))   # DeepSpeed's
        self.dtype = engine.communication_data_type
        self.buckets = []       # (param group, start, end, parameters)
        for i, (params, views) in enumerate(zip(self.opt.bf16_groups, grads.views)):
            start = end = 0
            members = []
            for param, view in zip(params, views):
                members.append(param)
                end += param.numel()
                param.register_post_accumulate_grad_hook(functools.partial(self._ready, len(self.buckets), view))
                if end - start >= BUCKET_ELEMENTS or param is params[-1]:
                    self.buckets.append((i, start, end, members))
                    start, members = end, []
        self.armed = False
        self.remaining: list[int] = []
        self.sent: list[bool] = []
        self.streams: list[set] = []
        self.in_flight: list[tuple] = []
        self.sent_in_backward = 0     # buckets sent from the hooks since the last step (tests, logs)
        self._deepspeed_reduce = engine.allreduce_gradients
        self._deepspeed_prologue = self.opt.backward_prologue
        engine.allreduce_gradients = self.allreduce_gradients
        self.opt.backward_prologue = self.backward_prologue

    def backward_prologue(self) -> None:
        """Every micro-batch (DeepSpeed clears the bf16 gradients here); arms the hooks in the
        one that ends an optimizer step."""
        self._deepspeed_prologue()
        self.armed = self.engine.is_gradient_accumulation_boundary()
        self.remaining = [len(bucket[3]) for bucket in self.buckets]
        self.sent = [False] * len(self.buckets)
        self.streams = [set() for _ in self.buckets]
        self.sent_in_backward = 0

    def _ready(self, b: int, view: torch.Tensor, param: torch.Tensor) -> None:
        if not self.armed:
            return
        if param.grad is not view:     # autograd made a new .grad (it was None): back into the buffer
            view.copy_(param.grad)
            param.grad = view
        if param.is_cuda:   # the stream autograd accumulated this gradient on (compiled backwards may use several)
            self.streams[b].add(torch.cuda.current_stream())
        self.remaining[b] -= 1
        if self.remaining[b] == 0:
            self._send(b)
            self.sent_in_backward += 1

    @torch.no_grad()
    def _send(self, b: int) -> None:
        i, start, end, _ = self.buckets[b]
        if self.streams[b]:   # read the bucket after every stream that wrote into it
            current = torch.cuda.current_stream()
            for stream in self.streams[b] - {current}:
                current.wait_stream(stream)
        hp = self.opt.fp32_groups_gradients_flat[i][start:end]
        hp.add_(self.grads.lp_flat[i][start:end].to(hp.dtype))
        wire = hp if self.dtype == hp.dtype else hp.to(self.dtype)
        self.in_flight.append((hp, wire, dist.all_reduce(wire, group=self.group, async_op=True)))
        self.sent[b] = True

    def accumulate_rest(self) -> bool:
        """At the end of the backward (contiguous_grads.update_hp_grads): send the buckets no hook
        completed. False when this micro-batch was not armed (the caller then accumulates)."""
        if not self.armed:
            return False
        for b, sent in enumerate(self.sent):
            if not sent:
                self._send(b)
        return True

    @torch.no_grad()
    def allreduce_gradients(self, bucket_size=None) -> None:
        """The engine's reduction step: wait for the buckets and scale them, as DeepSpeed would."""
        if not self.armed:
            if bucket_size is None:
                return self._deepspeed_reduce()
            return self._deepspeed_reduce(bucket_size)
        for hp, wire, work in self.in_flight:
            work.wait()
            wire.mul_(self.scale)
            if wire is not hp:
                hp.copy_(wire)
        self.in_flight.clear()
        self.armed = False


def _one_replica(bucket_size=None) -> None:
    """The reduction of a single replica's fp32 gradients: the identity."""


def overlap_grad_reduction(engine) -> OverlappedReduce | None:
    """Install the overlapped reduction on a bf16 ZeRO-1 engine with contiguous gradients and
    more than one data-parallel replica; otherwise (pipelines, which reduce in their own
    schedule, other optimizers, a single replica, non-default scaling) return None. With a
    single replica and an fp32 reduction the reduction is skipped, pipelines' included (theirs
    copied every gradient into buckets and back, for an all-reduce over one rank)."""
    grads = getattr(engine.optimizer, "contiguous_grads", None)
    if grads is None:
        return None
    if isinstance(engine, PipelineEngine):
        if engine.dp_world_size == 1 and engine.communication_data_type == torch.float32:
            engine._bf16_reduce_grads = _one_replica
        return None
    if dist.get_world_size(groups._get_sequence_data_parallel_group()) == 1:
        if engine.communication_data_type == torch.float32:
            engine.allreduce_gradients = _one_replica    # a sum over one rank, scaled by 1/1
        return None
    if not engine.gradient_average or not engine.postscale_gradients() or engine.gradient_predivide_factor() != 1.0:
        return None
    reducer = OverlappedReduce(engine, grads)
    grads.overlap = reducer
    return reducer
