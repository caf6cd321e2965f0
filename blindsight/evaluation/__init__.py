"""Accuracy (bs-eval): dense vs BlindSight-compiled on a deterministic multi-segment task.

Python API: ``evaluate(...) -> dict`` (see :mod:`blindsight.evaluation.runner`)
and ``task_prompts`` for the task itself (:mod:`blindsight.prompts`).
"""

from blindsight.prompts import TaskPrompt, task_prompts

__all__ = ["TaskPrompt", "task_prompts", "evaluate"]


def evaluate(*args, **kwargs):
    """See :func:`blindsight.evaluation.runner.evaluate` (imported lazily: it needs torch)."""
    from blindsight.evaluation.runner import evaluate as _evaluate

    return _evaluate(*args, **kwargs)
