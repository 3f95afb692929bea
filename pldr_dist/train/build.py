"""Assemble a run from its config: process grid, model (TP/PP applied from outside), DeepSpeed
engine, data loaders, and the one-step functions for pipelined and non-pipelined layouts."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch.profiler import record_function

from ..model import PLDRModel, count_parameters, lm_loss
from ..model.recompute import set_activation_checkpointing
from .config import ConfigError, RunConfig
from .device_batches import DeviceBatches, to_device


def check_data(cfg: RunConfig) -> None:
    """Manifest vs model config, before any process group exists."""
    from ..data.manifest import load_manifest
    manifest = load_manifest(cfg.data.shards)
    mcfg = cfg.model_config()
    if manifest.seq_len > mcfg.context_length:
        raise ConfigError(f"{cfg.source}: shards in {cfg.data.shards} have seq_len={manifest.seq_len} but "
                          f"model.context_length={mcfg.context_length} (raise context_length or re-shard)")
    tp, cp = cfg.parallel.tp, cfg.parallel.cp
    if cp > 1 and manifest.seq_len % (2 * cp):
        # Each context-parallel rank holds two of 2*cp equal chunks (parallel/context_parallel.py).
        raise ConfigError(f"{cfg.source}: parallel.cp={cp} cuts each sequence into {2 * cp} equal chunks, but the "
                          f"shards in {cfg.data.shards} have seq_len={manifest.seq_len} (re-shard with a --seq-len "
                          f"divisible by {2 * cp}, e.g. {manifest.seq_len + (-manifest.seq_len % (2 * cp))})")
    if cfg.parallel.sequence_parallel and (manifest.seq_len // cp) % tp:
        # The sequence is split evenly over the TP ranks between layers (as in Megatron); an
        # uneven split fails inside the collectives (gloo aborts, NCCL may hang).
        raise ConfigError(f"{cfg.source}: parallel.sequence_parallel splits the sequence over parallel.tp={tp} ranks, "
                          f"but the shards in {cfg.data.shards} have seq_len={manifest.seq_len} (re-shard with a "
                          f"--seq-len divisible by {tp}, e.g. {manifest.seq_len + (-manifest.seq_len % tp)}, or turn "
                          f"sequence_parallel off)")
    vocab = manifest.data["tokenizer"]["vocab_size"]
    if vocab > mcfg.vocab_size:
        raise ConfigError(f"{cfg.source}: the shards' tokenizer has {vocab} pieces but "
                          f"model.vocab_size={mcfg.vocab_size} (set model.overrides.vocab_size)")


def check_fp8(cfg: RunConfig) -> None:
    """train.precision=fp8 on a machine without FP8 tensor cores (or torchao): one line, at start-up."""
    if cfg.train.precision == "fp8":
        from ..model.fp8 import unavailable_reason
        reason = unavailable_reason()
        if reason:
            raise ConfigError(f"{cfg.source}: {reason}")


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
    cuda_graphs: bool = False    # compiled layers replay CUDA graphs: mark each forward as a new step
    fast_path: str = ""          # what train.compile did, for the start-up log line
    device_batches: Any = None   # device_batches.DeviceBatches: the next batch copied during the backward

    def forward(self, inputs, **kwargs):
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        return self.engine(inputs, **kwargs)

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def grad_norm(self):
        """The last step's global gradient norm as DeepSpeed holds it (a device tensor, a float or
        None), not read: reading a device tensor waits for the step (the trainer reads it when it
        writes the step's log line)."""
        return self.engine.get_global_grad_norm()

    def micro_batch_loss(self, inputs, targets, penalty: bool = True):
        """One micro-batch's loss (PP = 1), plus the DAG penalty in mode v510_dag.

        TP = 1: the model computes the loss itself (`model(tokens, targets=...)`, head and
        cross-entropy fused), so the loss is the engine's output. DeepSpeed's bf16 optimizer
        starts its backward from hooks on that output; a head applied after the engine returned
        would send its gradients before them, and they were lost. TP > 1: the vocabulary-parallel
        loss of the logits.
        """
        dag = penalty and self.mcfg.mode == "v510_dag"
        if self.grid.tp == 1:
            out = self.forward(inputs, targets=targets, return_penalty=dag)
            loss, pen = out if dag else (out, None)
            loss = loss * float("nan") if self.inject[0] else loss
        else:
            out = self.forward(inputs, return_penalty=dag)
            logits, pen = out if dag else (out, None)
            loss = self.loss_fn(logits, targets)
        return loss + pen if pen is not None else loss

    # -- one optimizer step ------------------------------------------------------------
    def train_step(self, batches, inject_nonfinite: bool):
        """batches: a data.loader.BatchesAhead. Returns (mean loss over the step's micro-batches
        and data-parallel ranks, skipped). The loss stays a 0-dim device tensor: reading it
        waits for the GPU to finish the step, so the trainer reads it only when it logs.
        `skipped` is a bool or a device_skip.SkipFlag: truth-testing a flag waits for this step's
        optimizer, so the trainer tests it a step later."""
        self.inject[0] = inject_nonfinite
        deepspeed_skips = self.deepspeed_skips()
        self.optimizer.flag = None
        if self.grid.pp > 1:
            with record_function("pldr:pipeline_schedule"):   # forwards, backwards and the optimizer step
                loss = self.engine.train_batch(data_iter=_pipe_batches(batches)).detach().float()
        else:
            total = 0.0
            for _ in range(self.engine.gradient_accumulation_steps()):
                # Named ranges in profiles (log.profile_steps) show which host phase the GPU waits on.
                with record_function("pldr:forward"):
                    loss = self.micro_batch_loss(*self.device_batches.take(next(batches)))
                with record_function("pldr:backward"):
                    self.engine.backward(loss)
                with record_function("pldr:prepare_batch"):
                    batches.prepare()   # the next batch, built (and copied) while the GPU runs the backward
                    self.device_batches.start(batches.peek())
                with record_function("pldr:optimizer_step"):
                    self.engine.step()
                total += loss.detach().float()
            loss = total / self.engine.gradient_accumulation_steps()
            if self.grid.replicas > 1:     # dp x cp: context-parallel ranks hold slices of the sequences
                dist.all_reduce(loss, group=self.grid.replica_group)
                loss = loss / self.grid.replicas
        device_skip = getattr(self.engine.optimizer, "device_skip", None)
        if device_skip is not None:     # bf16 ZeRO-1: parallel/device_skip.py
            return loss, device_skip.flag
        if self.deepspeed_skips() > deepspeed_skips:
            return loss, True
        flag = self.optimizer.flag     # ClippedAdamW's own check (parallel/optim.py); not truth-tested here
        return loss, False if flag is None else flag

    def deepspeed_skips(self) -> int:
        """Steps DeepSpeed itself skipped (its overflow checks, where a config turns them on)."""
        return int(getattr(self.engine, "skipped_steps", 0) or 0)

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
            losses.append(self.micro_batch_loss(*to_device(next(loader), self.engine.device), penalty=False).float())
        self.engine.train()
        loss = torch.stack(losses).mean()
        dist.all_reduce(loss, group=self.grid.replica_group)
        return float(loss) / self.grid.replicas


def _pipe_batches(batches):
    """DeepSpeed's pipeline engine pulls (inputs, labels) micro-batches from an iterator."""
    for batch in batches:
        yield batch["input"], batch["target"]


def build_run(cfg: RunConfig) -> Run:
    """Every rank: the same full model from the seed, then TP, then pipeline stages, then DeepSpeed."""
    from ..data.loader import TokenLoader
    from ..data.manifest import load_manifest
    from ..parallel.cross_entropy import vocab_parallel_lm_loss
    from ..parallel.context_parallel import SlicedBatches, enable_context_parallel
    from ..parallel.engine import initialize, load_ds_config, make_ds_config
    from ..parallel.flat_layers import flatten_layers, wants_flat_layers
    from ..parallel.grid import ProcessGrid
    from ..parallel.optim import make_optimizer
    from ..parallel.pipeline import assume_unpadded, build_pipeline_module
    from ..parallel.tensor_parallel import parallelize

    p, t = cfg.parallel, cfg.train
    mcfg = cfg.model_config()
    grid = ProcessGrid(tp=p.tp, pp=p.pp, cp=p.cp)
    precision = precision_of(cfg)
    check_fp8(cfg)
    torch.manual_seed(t.seed)
    model = PLDRModel(mcfg)
    num_params = count_parameters(model)
    for i, layer in enumerate(model.layers):          # global layer index for G_LM statistics
        if mcfg.learned_g:
            layer.attn.power.layer_index = i
    set_activation_checkpointing(model, t.activation_checkpointing)
    if p.tp > 1:
        model = parallelize(model, grid, sequence_parallel=p.sequence_parallel)
    enable_context_parallel(model, grid.cp_group, grid.cp_rank, grid.cp)
    if torch.cuda.is_available():
        model = model.cuda()
    fp8_products = 0
    if precision == "fp8":      # before DeepSpeed and the compiler see the modules
        from ..model.fp8 import enable_fp8
        fp8_products = enable_fp8(model, t.fp8_recipe)
    inject = [False]       # set by Run.train_step for the testing aid train.inject_nonfinite_at

    def loss_fn(logits, targets):   # pipelines (their last stage) and TP > 1; see Run.micro_batch_loss
        loss = (vocab_parallel_lm_loss(logits, targets, grid.tp_group, mcfg.pad_id) if p.tp > 1
                else lm_loss(logits, targets, mcfg.pad_id))
        return loss * float("nan") if inject[0] else loss

    flat_tensors = 0
    if wants_flat_layers(p.zero_stage, p.tp, p.pp):   # before the optimizer and DeepSpeed see the parameters
        flat_tensors = flatten_layers(model)
    if p.pp > 1:
        module = build_pipeline_module(model, grid, loss_fn, p.partition_method, p.activation_checkpoint_interval)
    else:
        module = model
    optimizer = make_optimizer(module, lr=cfg.optim.lr, clip_value=cfg.optim.clip_value if cfg.optim.clip == "value" else 0.0)
    for group in optimizer.param_groups:
        group.update(betas=tuple(cfg.optim.betas), eps=cfg.optim.eps, weight_decay=cfg.optim.weight_decay)
    if cfg.deepspeed_config:
        ds_config = load_ds_config(cfg.deepspeed_config)
        ds_config.update(train_micro_batch_size_per_gpu=t.micro_batch_size, gradient_accumulation_steps=t.grad_accum_steps,
                         train_batch_size=t.micro_batch_size * t.grad_accum_steps * grid.replicas)
    else:
        ds_config = make_ds_config(micro_batch_size=t.micro_batch_size, grad_accum_steps=t.grad_accum_steps, dp=grid.replicas,
                                   pp=p.pp, zero_stage=p.zero_stage,
                                   precision="bf16" if precision == "fp8" else precision,
                                   clip_norm=cfg.optim.clip_value if cfg.optim.clip == "norm" else 0.0)
    engine = initialize(module, grid, ds_config, optimizer)
    cuda_graphs = False
    if t.compile:   # same maths, fewer kernels (model/fast.py); packed shards hold no padding
        from ..model.fast import optimize_for_training
        # Each decoder layer compiled on its own where tp = cp = 1: one process's layers, or a
        # pipeline stage's (the stages exchange activations outside the layers). Under ZeRO-3 each
        # layer's forward is compiled and DeepSpeed gathers the layer's parameters around it
        # (parallel/engine.zero3_whole_layers). Tensor- and context-parallel layers are not
        # compiled (their collectives sit inside the layers; compiled TP layers train correctly
        # on the CPU but wait for a check on GPUs: docs/tensor_parallel.md); they still get the
        # fast path's kernels (the Triton GLUs replace most of the eager metric learner's many
        # small launches).
        whole = p.tp == 1 and p.cp == 1
        zero3 = p.zero_stage == 3
        # CUDA graphs replay each layer's kernels without the host. Only where no .grad keeps the
        # graphs' gradient outputs, memory the next replay overwrites: ZeRO-1's gradients land in
        # contiguous_grads' buffer (autograd adds into it), and ZeRO-2's hooks copy each gradient
        # into DeepSpeed's bucket during the backward and point .grad there. (ZeRO-3's parameters
        # change storage at every gather: a graph would read the released ones. A pipeline keeps
        # several micro-batches' activations alive across forwards, which a replay overwrites.)
        cuda_graphs = whole and p.pp == 1 and torch.cuda.is_available() and (
            hasattr(engine.optimizer, "contiguous_grads") or p.zero_stage == 2)
        fused = optimize_for_training(model, compile=whole, packed=True, cuda_graphs=cuda_graphs,
                                     triton_glu=t.metric_kernel != "pytorch", fused_learner=t.metric_kernel == "learner",
                                     hooks_outside=zero3)
        compiled = ("compiled with CUDA graphs" if cuda_graphs else
                    "compiled (forwards only: ZeRO-3 gathers each layer's parameters around it)" if zero3 else "compiled")
        how = {"learner": "one op per layer", "glu": "one kernel per GLU", "pytorch": "compiled PyTorch"}[t.metric_kernel]
        fast_path = (f"fast path: {fused} metric-learner GLUs fused ({how}), layers "
                     + (compiled if whole else "not compiled (tp/cp > 1)"))
    else:
        fast_path = "eager (train.compile=false)"
    # The shards are packed (data/shard_writer.py: no padding), so no layer checks the tokens for
    # it: that check reads a device value on the host, a GPU sync per micro-batch (and per layer
    # in a pipeline stage) that would make the GPU wait while the host launches what follows.
    model.assume_unpadded = True
    if p.pp > 1:
        assume_unpadded(module)
    if t.activation_checkpointing != "none":
        fast_path += f", {t.activation_checkpointing} activation recompute"
    if flat_tensors:
        fast_path += f", {flat_tensors} parameter tensors (one per decoder layer)"
    if fp8_products:
        fast_path += f", {fp8_products} products in FP8 ({t.fp8_recipe})"
    overlap = getattr(getattr(engine.optimizer, "contiguous_grads", None), "overlap", None)
    if overlap is not None:     # parallel/grad_reduce.py
        fast_path += (f", data-parallel gradients reduced in {str(overlap.dtype).removeprefix('torch.')} "
                      f"during the backward ({len(overlap.buckets)} bucket{'s' * (len(overlap.buckets) > 1)})")
    if p.pp > 1:        # the split DeepSpeed's module made (layer 0 the embedding, the last the head)
        bounds = [int(b) for b in module.parts]
        stages = " | ".join(f"{a}-{b - 1}" for a, b in zip(bounds[:-1], bounds[1:]))
        fast_path += f", pipeline stages hold layers {stages} ({p.partition_method})"
    sp_linears = sum(1 for m in model.modules() if getattr(m, "sequence_parallel", False))
    if sp_linears:      # counted in the model, not read from the config: what the run really does
        fast_path += f", sequence parallel ({sp_linears} linears gather / reduce-scatter the sequence)"

    manifest = load_manifest(cfg.data.shards)
    fingerprint = _tokenizer_fingerprint(cfg)
    train_loader = TokenLoader(cfg.data.shards, "train", t.micro_batch_size, manifest.seq_len, grid.dp_rank, grid.dp,
                               cfg.data.seed, cfg.data.num_workers, fingerprint, cfg.data.on_corrupt)
    if grid.cp > 1:
        train_loader = SlicedBatches(train_loader, grid.cp_rank, grid.cp)
    valid_loader = None
    if cfg.eval.every:
        valid_loader = _ValidLoader(cfg.data.shards, t.micro_batch_size, manifest.seq_len, grid, fingerprint)
    return Run(grid=grid, mcfg=mcfg, module=engine.module, engine=engine, optimizer=optimizer,
               train_loader=train_loader, valid_loader=valid_loader, seq_len=manifest.seq_len,
               tokens_per_step=t.micro_batch_size * t.grad_accum_steps * grid.dp * manifest.seq_len,
               precision=precision, num_params=num_params, loss_fn=loss_fn, inject=inject, cuda_graphs=cuda_graphs,
               fast_path=fast_path, device_batches=DeviceBatches(engine.device))


def _tokenizer_fingerprint(cfg: RunConfig):
    if not cfg.checkpoint.tokenizer:
        return None
    from ..data.tokenizer import Tokenizer
    tok = Tokenizer(cfg.checkpoint.tokenizer)
    tok.check_model(cfg.model_config())
    return tok.fingerprint


class _ValidLoader:
    """The same held-out batches at every validation; data-parallel ranks split each global
    batch, as for training."""

    def __init__(self, shards, batch_size, seq_len, grid, fingerprint):
        from ..data.loader import TokenLoader
        from ..parallel.context_parallel import SlicedBatches
        self.make = lambda: SlicedBatches(TokenLoader(shards, "valid", batch_size, seq_len, grid.dp_rank, grid.dp, 0, 0,
                                                      fingerprint, shuffle=False), grid.cp_rank, grid.cp)
        self.make()   # refuse bad validation data at start-up, not at the first validation

    def __iter__(self):
        return iter(self.make())
