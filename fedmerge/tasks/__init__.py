"""Tasks: the protocol a user implements to bring their own model and data, and the registry that finds
one by name.

The run config's ``task`` is either a registered name or ``"package.module:factory"``: ``factory()``
is called once per process and must return an object with the task protocol (docs/flower.md, "Your
own task"): ``build_model(seed)``, ``train(model, data, ...)``, ``evaluate(model, split)``, and for a
deployment ``load_data(path)`` (a node's private data from ``--node-config "data-path=..."``).
Optional: ``pretrained_base(seed)`` (to initialise an empty store), ``client_datasets(...)`` (partitions
for simulation), ``global_test_set()`` or ``server_evaluate(model)`` (server-side evaluation),
``train_lora(...)`` (``mode = "lora"``).

Names are found, in order: :func:`register_task` in this process; the library's own tasks
(``hf_causal_lm``); the ``fedmerge.tasks`` entry-point group of the installed distributions (the
simulations declare ``digits`` and ``tiny_lm`` there), so the library never imports an application.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any

from fedmerge.errors import ConfigError
from fedmerge.tasks.base import ClientData, DataPathError, Split, Task, check_data_path, load_xy_file

ENTRY_POINT_GROUP = "fedmerge.tasks"
LIBRARY_TASKS = {"hf_causal_lm": "fedmerge.tasks.hf_causal_lm:HFCausalLMTask"}
"""The tasks of the library itself, by import string (imported on first use)."""

_FACTORIES: dict[str, Callable[..., Task]] = {}
_SHARED: dict[str, Task] = {}


def register_task(name: str, factory: Callable[..., Task]) -> None:
    """Make ``get_task(name, **options)`` call ``factory(**options)``; a name is registered once."""
    if name in _FACTORIES or name in LIBRARY_TASKS or name in _installed():
        raise ConfigError(f"a task named {name!r} is already registered; pick another name")
    _FACTORIES[name] = factory


def _installed() -> dict[str, str]:
    """Name → ``module:attribute`` of the tasks the installed distributions declare."""
    return {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}


def task_names() -> list[str]:
    return sorted({*_FACTORIES, *LIBRARY_TASKS, *_installed()} - {n for n in _FACTORIES if ":" in n})


REQUIRED_METHODS = ("build_model", "train", "evaluate")


def _import_factory(spec: str, name: str | None = None) -> Callable[..., Task]:
    """The factory named by ``"package.module:attribute"`` (ConfigError saying what failed)."""
    what = f"task {spec!r}" if name is None else f"task {name!r} ({spec})"
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"task {spec!r} is not 'package.module:factory'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(
            f"{what}: cannot import module {module_name!r} ({exc}); install it where the "
            "ServerApp and the ClientApps run"
        ) from exc
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ConfigError(f"{what}: module {module_name!r} has no callable {attr!r}")
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


def _factory(name: str) -> Callable[..., Task]:
    if name not in _FACTORIES:
        known = {**_installed(), **LIBRARY_TASKS}
        if name in known:
            _FACTORIES[name] = _import_factory(known[name], name)
        elif ":" in name:
            _FACTORIES[name] = _import_factory(name)
        else:
            raise ConfigError(
                f"unknown task {name!r}; choose one of {task_names()}, name your own as "
                "'package.module:factory', or register_task() it"
            )
    return _FACTORIES[name]


def get_task(name: str, **options: Any) -> Task:
    """The task registered under ``name``, or built by the factory ``name = "package.module:factory"``.

    Without options the same instance is returned on every call, so its pre-trained base is computed
    once per process and seed; with options (e.g. ``cache_dir=...``) a new instance is built.
    """
    factory = _factory(name)
    try:
        if options:
            return check_task(factory(**options), name)
        if name not in _SHARED:
            _SHARED[name] = check_task(factory(), name)
        return _SHARED[name]
    except TypeError as exc:
        raise ConfigError(f"task {name!r} does not accept options {sorted(options)}: {exc}") from exc


__all__ = [
    "ENTRY_POINT_GROUP",
    "ClientData",
    "DataPathError",
    "Split",
    "Task",
    "check_data_path",
    "check_task",
    "get_task",
    "load_xy_file",
    "register_task",
    "task_names",
]
