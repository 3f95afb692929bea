"""Harness scores of one model with and without the G-cache, side by side.

The paper's claim (2502.13502): zero-shot scores do not change when G_LM is cached. For
log-likelihood tasks "with the G-cache" means the full forward uses the fixed G_LM (from an
artifact, or from the end-of-sequence prompt) instead of computing G_LM from each input.
"""
from __future__ import annotations


def run_tasks(lm, tasks: list[str], task_manager=None, limit=None, num_fewshot=None) -> dict:
    """{task: {metric: value}} from lm_eval.simple_evaluate for an adapter instance."""
    import lm_eval

    out = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=task_manager, limit=limit,
                                  num_fewshot=num_fewshot, log_samples=False, bootstrap_iters=0)
    return {task: {k.split(",")[0]: v for k, v in metrics.items()
                   if "," in k and "stderr" not in k and isinstance(v, (int, float))}
            for task, metrics in out["results"].items()}


def compare_tables(uncached: dict, cached: dict) -> str:
    """A plain-text table: task, metric, without G-cache, with G-cache, difference."""
    lines = [f"{'task':<24} {'metric':<12} {'no G-cache':>12} {'G-cache':>12} {'diff':>10}"]
    for task in sorted(uncached):
        for metric, value in sorted(uncached[task].items()):
            other = cached.get(task, {}).get(metric, float("nan"))
            lines.append(f"{task:<24} {metric:<12} {value:>12.4f} {other:>12.4f} {other - value:>+10.4f}")
    return "\n".join(lines)


def task_manager_for(tasks: list[str], include_path: str | None = None):
    """lm_eval's task index for these tasks. Indexing lm_eval's own ~15,000 tasks takes ~16 s
    (2-core machine), so where `include_path` holds every task asked for, as plain tasks (a group
    may name lm_eval's), only that folder is indexed."""
    from lm_eval.tasks import TaskManager

    if include_path:
        local = TaskManager(include_path=include_path, include_defaults=False)
        if set(tasks) <= set(local.all_subtasks):
            return local
    return TaskManager(include_path=include_path)


def compare_gcache(lm_uncached, lm_cached, tasks: list[str], task_manager=None, limit=None,
                   num_fewshot=None) -> tuple[dict, dict, str]:
    if task_manager is None:    # one index of lm_eval's tasks for both runs
        task_manager = task_manager_for(tasks)
    uncached = run_tasks(lm_uncached, tasks, task_manager, limit, num_fewshot)
    cached = run_tasks(lm_cached, tasks, task_manager, limit, num_fewshot)
    return uncached, cached, compare_tables(uncached, cached)
