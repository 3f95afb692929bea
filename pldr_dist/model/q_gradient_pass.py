"""An inductor pass that computes q~'s gradient through A0 and through q G in one pass (issue #24).

Why: q~ feeds two products, A0 = q~^T q~ and q~ G_LM, and G_LM is a function of A0. The
backward therefore meets q G first (dq1 = d(qG) G^T, with dG), then, once dG has gone back
through the power law and the metric learner, A0 (dq2 = q~ (dA0 + dA0^T)), and autograd adds
the two. Each op's backward writes its part and the rotary backward reads both: two q~-sized
tensors written and read where one would do. Neither op can do it alone (dA0 is not known when
q G's backward runs), so the fold is a rewrite of the compiled backward graph:

    dq1, dG = times_g_backward(dqg, q, G)           dG = times_g_weight_grad(dqg, q, G)
    dq2 = head_product(q, M)                  ->    ...
    dq = dq1 + dq2                                  dq = q_grad(dqg, G, q, M)   # dqg G^T + q M

q_grad sums both products in fp32 and rounds once (the unfused path rounds dq1, dq2 and their
sum to bf16). The graph is only rewritten where it has exactly this shape (each intermediate
used once, the same q in both products); anything else is left as it was.

Not yet installed by the fast path: it is tested on CPUs (Triton's interpreter, and inductor's
CPU backend by hand), but has not been timed on a GPU (no device machine in the session that
wrote it). `install()` before the first compiled step turns it on; `pldr-bench kernels
--head-products` times the ops both ways.
"""
from __future__ import annotations

import operator

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

from . import head_products


def _single_user(node):
    return next(iter(node.users)) if len(node.users) == 1 else None


def _fold_one(graph: torch.fx.Graph, node) -> bool:
    pldr, aten = torch.ops.pldr, torch.ops.aten
    dqg, q, g = node.args
    outs = {u.args[1]: u for u in node.users if u.target is operator.getitem}
    if set(outs) != {0, 1} or len(node.users) != 2:
        return False
    add = _single_user(outs[0])
    if add is None or add.target is not aten.add.Tensor or len(add.args) != 2 or add.kwargs:
        return False
    other = add.args[1] if add.args[0] is outs[0] else add.args[0]
    if (getattr(other, "target", None) is not pldr.head_product.default or other.args[0] is not q
            or len(other.users) != 1):
        return False
    m = other.args[1]
    with graph.inserting_before(node):
        dg = graph.call_function(pldr.times_g_weight_grad.default, (dqg, q, g))
    dg.meta.update(outs[1].meta)
    with graph.inserting_before(add):
        dq = graph.call_function(pldr.q_grad.default, (dqg, g, q, m))
    dq.meta.update(add.meta)
    dq.meta["val"] = head_products.q_grad(*(a.meta["val"] for a in (dqg, g, q, m)))
    outs[1].replace_all_uses_with(dg)
    add.replace_all_uses_with(dq)
    for dead in (add, other, outs[0], outs[1], node):
        graph.erase_node(dead)
    return True


def fold_q_gradients(graph: torch.fx.Graph) -> int:
    """Rewrites each (times_g_backward, head_product, add) triple of `graph`; returns how many."""
    target = torch.ops.pldr.times_g_backward.default
    return sum(_fold_one(graph, node) for node in list(graph.nodes) if node.target is target)


class FoldQGradients(CustomGraphPass):
    """`fold_q_gradients` as inductor's post-grad pass (`install`); uuid keys inductor's cache."""

    def __call__(self, graph: torch.fx.Graph) -> None:
        fold_q_gradients(graph)

    def uuid(self):
        return get_hash_for_files((__file__,))


def install() -> None:
    """Adds the pass to inductor's post-grad passes (once; other passes already there are kept)."""
    from torch._inductor import config

    current = config.post_grad_custom_post_pass
    passes = list(current) if isinstance(current, (list, tuple)) else [current] if current is not None else []
    if not any(isinstance(p, FoldQGradients) for p in passes):
        passes.append(FoldQGradients())
        config.post_grad_custom_post_pass = passes[0] if len(passes) == 1 else tuple(passes)
