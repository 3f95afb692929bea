"""Tensor parallelism on real gloo processes, against the single-process model built in the test."""
import pytest
import torch

from distributed import run_distributed
from pldr_dist.model import PLDRModel, lm_loss, preset


def make_model(dtype=torch.float64, **overrides):
    torch.manual_seed(0)
    cfg = preset("tiny", **overrides)
    return PLDRModel(cfg).to(dtype)


def batch(seed=1, B=3, S=12, pad=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(4, 512, (B, S + 1), generator=g)
    if pad:
        x[0, -3:] = 0          # padded targets are excluded from the loss
    return x[:, :-1], x[:, 1:]


def reference(dtype, steps, **overrides):
    model = make_model(dtype, **overrides)
    inputs, targets = batch()
    logits = model(inputs)
    loss = lm_loss(logits, targets)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95), eps=1e-5, weight_decay=0.1)
    for s in range(steps):
        if s:
            opt.zero_grad()
            lm_loss(model(batch(seed=10 + s)[0]), batch(seed=10 + s)[1]).backward()
        opt.step()
    return logits.detach(), loss.item(), grads, {n: p.detach().clone() for n, p in model.named_parameters()}


def tp_worker(rank, world, tp, sp, dtype, steps, overrides):
    from pldr_dist.parallel.cross_entropy import vocab_parallel_lm_loss
    from pldr_dist.parallel.grid import ProcessGrid
    from pldr_dist.parallel.mappings import gather_last_dim
    from pldr_dist.parallel.tensor_parallel import gather_full_state_dict, parallelize
    grid = ProcessGrid(tp=tp)
    model = parallelize(make_model(dtype, **overrides), grid, sequence_parallel=sp)
    inputs, targets = batch()
    local = model(inputs)
    loss = vocab_parallel_lm_loss(local, targets, grid.tp_group)
    loss.backward()
    logits = gather_last_dim(local.detach(), grid.tp_group)
    grads = gather_full_state_dict({n: p.grad for n, p in model.named_parameters()}, grid.tp_group)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95), eps=1e-5, weight_decay=0.1)
    for s in range(steps):
        if s:
            opt.zero_grad()
            i, t = batch(seed=10 + s)
            vocab_parallel_lm_loss(model(i), t, grid.tp_group).backward()
        opt.step()
    params = gather_full_state_dict(dict(model.named_parameters()), grid.tp_group)
    return logits, loss.item(), grads, params


def assert_matches(ref, got, tol, grad_tol=None):
    logits, loss, grads, params = ref
    g_logits, g_loss, g_grads, g_params = got
    assert (g_logits - logits).abs().max() <= tol
    assert abs(g_loss - loss) <= tol * max(1, abs(loss))
    assert set(g_grads) == set(grads)
    for name in grads:   # ||diff|| / ||reference||
        assert (g_grads[name] - grads[name]).norm() <= (grad_tol or tol) * max(1e-3, grads[name].norm()), name
    # Adam divides by sqrt(v) + eps: a gradient difference d moves a parameter by up to ~lr * d / eps
    # (1e3 x here, for gradients near zero), so parameters are compared at that scale.
    for name in params:
        assert (g_params[name] - params[name]).abs().max() <= tol * 1e4, name


@pytest.mark.parametrize("tp,sp", [(2, False), (2, True), (4, False), (4, True)])
def test_tp_logits_loss_gradients_and_adamw_steps_match_single_process(tp, sp):
    ref = reference(torch.float64, 3)
    results = run_distributed(tp_worker, tp, tp, sp, torch.float64, 3, {})
    for got in results:
        assert_matches(ref, got, 1e-10)


def compiled_tp_worker(rank, world, tp, sp):
    """One forward and backward of TP layers compiled whole (fullgraph: the collectives traced as
    functional ones), as the fast path compiles the single-GPU layers (docs/tensor_parallel.md)."""
    import torch._dynamo

    from pldr_dist.model.fast import optimize_for_training
    from pldr_dist.parallel.cross_entropy import vocab_parallel_lm_loss
    from pldr_dist.parallel.grid import ProcessGrid
    from pldr_dist.parallel.mappings import gather_last_dim
    from pldr_dist.parallel.tensor_parallel import gather_full_state_dict, parallelize
    grid = ProcessGrid(tp=tp)
    model = parallelize(make_model(torch.float64), grid, sequence_parallel=sp)
    torch._dynamo.reset()
    optimize_for_training(model, compile=True, packed=True, cuda_graphs=False, backend="aot_eager")
    inputs, targets = batch(pad=False)
    local = model(inputs)
    loss = vocab_parallel_lm_loss(local, targets, grid.tp_group)
    loss.backward()
    grads = gather_full_state_dict({n: p.grad for n, p in model.named_parameters()}, grid.tp_group)
    return gather_last_dim(local.detach(), grid.tp_group), loss.item(), grads


@pytest.mark.parametrize("sp", [False, True])
def test_tp2_layers_compiled_whole_match_single_process(sp):
    model = make_model(torch.float64)
    inputs, targets = batch(pad=False)
    logits = model(inputs)
    loss = lm_loss(logits, targets)
    loss.backward()
    for got_logits, got_loss, got_grads in run_distributed(compiled_tp_worker, 2, 2, sp):
        assert (got_logits - logits).abs().max() <= 1e-10
        assert abs(got_loss - loss.item()) <= 1e-10 * loss.item()
        for name, p in model.named_parameters():
            assert (got_grads[name] - p.grad).norm() <= 1e-10 * max(1e-3, p.grad.norm()), name


def padded_ffn_tp_worker(rank, world, *args):
    """tp_worker with the FFN shards zero-padded as on CUDA (tiny's d_ff = 170: shards of 85 -> 128)."""
    from pldr_dist.parallel import layers
    previous, layers.PAD_ON_CPU = layers.PAD_ON_CPU, True
    try:
        return tp_worker(rank, world, *args)
    finally:   # the process runs other jobs after this one (distributed.py)
        layers.PAD_ON_CPU = previous


def test_tp2_with_the_ffn_shards_padded_as_on_cuda_matches_single_process():
    ref = reference(torch.float64, 3)
    for got in run_distributed(padded_ffn_tp_worker, 2, 2, False, torch.float64, 3, {}):
        assert_matches(ref, got, 1e-10)


def test_tp2_fp32_and_fixed_g_mode_match_single_process():
    # fp32: logits and loss to 1e-5. Gradients of the metric learner are ill-conditioned in fp32
    # (A0 sums q q^T over all positions before a LayerNorm), so summing them over heads in a
    # different order moves them by ~5e-4 relative; fp64 above pins the maths to 1e-10.
    ref = reference(torch.float32, 1)
    for got in run_distributed(tp_worker, 2, 2, True, torch.float32, 1, {}):
        assert_matches(ref, got, 1e-5, grad_tol=2e-3)
    fixed = {"mode": "v510G", "fixed_g": "random"}
    ref = reference(torch.float64, 1, **fixed)
    for got in run_distributed(tp_worker, 2, 2, False, torch.float64, 1, fixed):
        assert_matches(ref, got, 1e-10)


def nccl_path_tp_worker(rank, world, tp, sp, dtype, steps, overrides):
    """tp_worker through the mappings' NCCL branch, over gloo: reduce_scatter_tensor emulated as
    NCCL runs it, writing the output's memory in order whatever its strides. Found on 2 H100s:
    an output buffer made by empty_like of a transposed view was dense but not contiguous, so
    NCCL's write landed scrambled and TP + sequence parallelism trained to a wrong loss."""
    import types
    import torch.distributed as dist
    from pldr_dist.parallel import mappings

    def reduce_scatter_tensor(out, inp, group=None):
        full = inp.contiguous().clone()
        dist.all_reduce(full, group=group)
        mine = full.chunk(dist.get_world_size(group))[dist.get_rank(group)]
        torch.as_strided(out, (out.numel(),), (1,)).copy_(mine.reshape(-1))

    nccl = {name: getattr(dist, name) for name in dir(dist) if not name.startswith("__")}
    nccl.update(get_backend=lambda group=None: "nccl", reduce_scatter_tensor=reduce_scatter_tensor)
    previous, mappings.dist = mappings.dist, types.SimpleNamespace(**nccl)
    try:
        return tp_worker(rank, world, tp, sp, dtype, steps, overrides)
    finally:   # the process runs other jobs after this one (distributed.py)
        mappings.dist = previous


def test_tp2_sequence_parallel_through_the_nccl_branch_matches_single_process():
    ref = reference(torch.float64, 2)
    for got in run_distributed(nccl_path_tp_worker, 2, 2, True, torch.float64, 2, {}):
        assert_matches(ref, got, 1e-10)


def generate_worker(rank, world, tp):
    from pldr_dist.infer import SamplingConfig, generate
    from pldr_dist.parallel.grid import ProcessGrid
    from pldr_dist.parallel.tensor_parallel import parallelize
    grid = ProcessGrid(tp=tp)
    model = parallelize(make_model(), grid).eval()
    out = generate(model, [[5, 6, 7, 8, 9], [10, 11, 12]], SamplingConfig(max_new_tokens=6, stop_at_eos=False),
                   cache_mode="kv+g", keep_logits=True)
    return out.tokens, torch.stack(out.step_logits), out.cache.layers[0].g_lm.shape


def test_tp2_generation_with_kv_and_g_caches_matches_tp1():
    from pldr_dist.infer import SamplingConfig, generate
    ref = generate(make_model().eval(), [[5, 6, 7, 8, 9], [10, 11, 12]],
                   SamplingConfig(max_new_tokens=6, stop_at_eos=False), cache_mode="kv+g", keep_logits=True)
    for tokens, logits, g_shape in run_distributed(generate_worker, 2, 2):
        assert tokens == ref.tokens
        assert (logits - torch.stack(ref.step_logits)).abs().max() <= 1e-10
        assert g_shape[1] == 2          # the rank's G-cache holds only its 2 of the 4 heads


def test_vocab_parallel_cross_entropy_equals_cross_entropy():
    logits = torch.randn(10, 512, dtype=torch.float64)
    target = torch.randint(0, 512, (10,))
    target[3] = 0
    ref = torch.nn.functional.cross_entropy(logits, target, ignore_index=0)
    got = run_distributed(_ce_worker, 2, logits, target)
    for loss, grad in got:
        assert abs(loss - ref.item()) < 1e-12
        full = logits.clone().requires_grad_()
        torch.nn.functional.cross_entropy(full, target, ignore_index=0).backward()
        assert (grad - full.grad).abs().max() < 1e-12


def _ce_worker(rank, world, logits, target):
    import torch.distributed as dist
    from pldr_dist.parallel.cross_entropy import vocab_parallel_lm_loss
    from pldr_dist.parallel.tensor_parallel import gather_full_state_dict
    local = logits.chunk(world, dim=-1)[rank].clone().requires_grad_()
    loss = vocab_parallel_lm_loss(local, target, dist.group.WORLD)
    loss.backward()
    return loss.item(), gather_full_state_dict({"head.weight": local.grad.T}, dist.group.WORLD)["head.weight"].T


def layout_worker(rank, world):
    from pldr_dist.parallel.grid import LayoutError, ProcessGrid, check_layout
    from pldr_dist.parallel.tensor_parallel import parallelize
    errors = []
    for kwargs in ({"tp": 3}, {"tp": 2, "pp": 2}):
        try:
            ProcessGrid(**kwargs)
        except LayoutError as e:
            errors.append(str(e))
    grid = ProcessGrid(tp=2)
    for cfg in ({"num_heads": 2, "head_dim": 32, "d_model": 64, "vocab_size": 511},):
        try:
            torch.manual_seed(0)
            parallelize(PLDRModel(preset("tiny", **cfg)), grid)
        except LayoutError as e:
            errors.append(str(e))
    try:
        check_layout(2, 2, 1, num_heads=5)
    except LayoutError as e:
        errors.append(str(e))
    return errors


def test_invalid_layouts_are_refused_with_clear_errors():
    errors = run_distributed(layout_worker, 2)[0]
    assert errors == [
        "world size 2 is not divisible by parallel.tp*parallel.pp=3*1=3 (launch a multiple of 3 processes)",
        "world size 2 is not divisible by parallel.tp*parallel.pp=2*2=4 (launch a multiple of 4 processes)",
        "parallel.tp=2 does not divide model.vocab_size=511 (pad the vocabulary to a multiple of 2)",
        "parallel.tp=2 does not divide model.num_heads=5 (choose one of 1, 5)",
    ]
