"""Tasks: built-in ones by short name (``digits``, ``tiny_lm``) and your own by import path.

The run config's ``task`` is either a registered name or ``"package.module:factory"``: ``factory()``
is called once per process and must return an object with the task protocol (docs/flower.md, "Your
own task"): ``build_model(seed)``, ``train(model, data, ...)``, ``evaluate(model, split)``, and for a
deployment ``load_data(path)`` (a node's private data from ``--node-config "data-path=..."``).
Optional: ``pretrained_base(seed)`` (to initialise an empty store), ``client_datasets(...)`` (partitions
for simulation), ``global_test_set()`` or ``server_evaluate(model)`` (server-side evaluation),
``train_lora(...)`` (``mode = "lora"``). The built-in tasks implement all of it
(:class:`~simulations.tasks.base.SupervisedTask`); :func:`register_task` gives a factory a short name.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from fedmerge.errors import ConfigError
from fedmerge_simulations.tasks.base import ClientData, Split, SupervisedTask, Task
from fedmerge_simulations.tasks.digits import DigitsTask
from fedmerge_simulations.tasks.hf_causal_lm import HFCausalLMTask
from fedmerge_simulations.tasks.tiny_lm import TinyLMTask

_FACTORIES: dict[str, Callable[..., Task]] = {
    "digits": DigitsTask,
    "tiny_lm": TinyLMTask,
    "hf_causal_lm": HFCausalLMTask,  # type: ignore[dict-item]  # implements the required part only
}
_SHARED: dict[str, Task] = {}


def register_task(name: str, factory: Callable[..., Task]) -> None:
    """Make ``get_task(name, **options)`` call ``factory(**options)``; a name is registered once."""
    if name in _FACTORIES:
        raise ConfigError(f"a task named {name!r} is already registered; pick another name")
    _FACTORIES[name] = factory


def task_names() -> list[str]:
    return sorted(_FACTORIES)


REQUIRED_METHODS = ("build_model", "train", "evaluate")


def _import_factory(spec: str) -> Callable[..., Task]:
    """The factory named by ``"package.module:attribute"`` (ConfigError saying what failed)."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"task {spec!r} is not 'package.module:factory'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(
            f"task {spec!r}: cannot import module {module_name!r} ({exc}); install it where the "
            "ServerApp and the ClientApps run"
        ) from exc
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ConfigError(f"task {spec!r}: module {module_name!r} has no callable {attr!r}")
    return factory


def check_task(task: Any, name: str) -> Task:
    """``task`` if it has the required methods of the task protocol, else a ConfigError naming them."""
    missing = [m for m in REQUIRED_METHODS if not callable(getattr(task, m, None))]
    if missing:
        raise ConfigError(
            f"task {name!r} ({type(task).__name__}) lacks {', '.join(missing)}; a task provides "
            "build_model(seed), train(model, data, ...) and evaluate(model, split) (docs/flower.md)"
        )
    return task


def get_task(name: str, **options: Any) -> Task:
    """The task registered under ``name``, or built by the factory ``name = "package.module:factory"``.

    Without options the same instance is returned on every call, so its pre-trained base is computed
    once per process and seed; with options (e.g. ``cache_dir=...``) a new instance is built.
    """
    if name not in _FACTORIES and ":" in name:
        _FACTORIES[name] = _import_factory(name)
    if name not in _FACTORIES:
        raise ConfigError(
            f"unknown task {name!r}; choose one of {task_names()}, name your own as "
            "'package.module:factory', or register_task() it"
        )
    try:
        if options:
            return check_task(_FACTORIES[name](**options), name)
        if name not in _SHARED:
            _SHARED[name] = check_task(_FACTORIES[name](), name)
        return _SHARED[name]
    except TypeError as exc:
        raise ConfigError(f"task {name!r} does not accept options {sorted(options)}: {exc}") from exc


__all__ = [
    "ClientData",
    "DigitsTask",
    "HFCausalLMTask",
    "Split",
    "SupervisedTask",
    "Task",
    "TinyLMTask",
    "check_task",
    "get_task",
    "register_task",
    "task_names",
]
