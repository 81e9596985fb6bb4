"""Built-in simulation tasks and a small registry: ``get_task("digits")``, ``get_task("tiny_lm")``.

A task is one file: subclass :class:`~simulations.tasks.base.SupervisedTask` (or implement the
:class:`~simulations.tasks.base.Task` protocol) and :func:`register_task` a factory for it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fedmerge.errors import ConfigError
from fedmerge_simulations.tasks.base import ClientData, Split, SupervisedTask, Task
from fedmerge_simulations.tasks.digits import DigitsTask
from fedmerge_simulations.tasks.tiny_lm import TinyLMTask

_FACTORIES: dict[str, Callable[..., Task]] = {"digits": DigitsTask, "tiny_lm": TinyLMTask}
_SHARED: dict[str, Task] = {}


def register_task(name: str, factory: Callable[..., Task]) -> None:
    """Make ``get_task(name, **options)`` call ``factory(**options)``; a name is registered once."""
    if name in _FACTORIES:
        raise ConfigError(f"a task named {name!r} is already registered; pick another name")
    _FACTORIES[name] = factory


def task_names() -> list[str]:
    return sorted(_FACTORIES)


def get_task(name: str, **options: Any) -> Task:
    """The task registered under ``name``.

    Without options the same instance is returned on every call, so its pre-trained base is computed
    once per process and seed; with options (e.g. ``cache_dir=...``) a new instance is built.
    """
    if name not in _FACTORIES:
        raise ConfigError(f"unknown task {name!r}; choose one of {task_names()} or register_task() your own")
    try:
        if options:
            return _FACTORIES[name](**options)
        if name not in _SHARED:
            _SHARED[name] = _FACTORIES[name]()
        return _SHARED[name]
    except TypeError as exc:
        raise ConfigError(f"task {name!r} does not accept options {sorted(options)}: {exc}") from exc


__all__ = [
    "ClientData",
    "DigitsTask",
    "Split",
    "SupervisedTask",
    "Task",
    "TinyLMTask",
    "get_task",
    "register_task",
    "task_names",
]
