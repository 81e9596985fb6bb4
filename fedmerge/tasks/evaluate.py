"""Server-side evaluation of a task's full weights (the ServerApp's ``server-eval``, the simulations'
baselines)."""

from __future__ import annotations

from collections.abc import Callable

from fedmerge.delta.state_dict import StateDict
from fedmerge.errors import ConfigError
from fedmerge.tasks import get_task


def task_evaluator(task_name: str, seed: int) -> Callable[[StateDict], dict[str, float]]:
    """Server-side evaluation of full weights, pluggable: the task's ``server_evaluate(model)`` if it
    has one, else ``evaluate(model, global_test_set())`` (``loss`` and ``accuracy``). A task with
    neither is a ConfigError: set ``server-eval=false``."""
    task = get_task(task_name)
    custom = getattr(task, "server_evaluate", None)
    if custom is None and not callable(getattr(task, "global_test_set", None)):
        raise ConfigError(
            f"task {task_name!r} has neither server_evaluate(model) nor global_test_set(); "
            "set server-eval=false or give the task one of them"
        )

    def evaluate(weights: StateDict) -> dict[str, float]:
        model = task.build_model(seed)
        model.load_state_dict(weights)
        result = custom(model) if custom is not None else task.evaluate(model, task.global_test_set())
        return {str(k): float(v) for k, v in result.items() if k != "num-examples"}

    return evaluate
