"""Models a process builds once and reuses for its local rounds, instead of one ``build_model`` each.

A task's model is rebuilt, initialised and then fully overwritten by ``load_state_dict(base)`` in
every local round; on a small model that construction is a sizeable part of the round (digits: 5 % of
a simulated client's busy time, as much as its backward passes). :func:`borrowed_model` lends a
model the process built earlier for the same task and seed, reset to what a fresh one is before its
weights are loaded: each submodule's training mode and each parameter's ``requires_grad`` as
``build_model`` gave them, no gradients. The caller loads the base into it (``load_state_dict`` with
its default ``strict=True``: every parameter and persistent buffer is replaced), so the round
computes exactly what it would on a fresh model — the same delta, bit for bit
(``tests/simulations/test_model_pool.py``).

Only what a round leaves reusable is lent: full fine-tuning on the CPU, of a task that says so with a
true class attribute ``reuse_model`` (its ``train`` leaves nothing in the model but its weights: no
hooks, wrappers or other state; the simulations' tasks do; a task without it builds each round). A
LoRA round wraps and merges the model in place, and a model moved to an accelerator stays there, so
those build afresh. A task that takes no weak reference is never pooled, and a task's models go when
the task does. A model is lent to one caller at a time (a concurrent caller builds its own), and at
most :data:`MAX_IDLE` idle models per (task, seed) are kept, none larger than
:data:`MAX_MODEL_BYTES` (a large model's memory is not held between rounds).
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from fedmerge.tasks.base import Task

MAX_IDLE = 2
MAX_MODEL_BYTES = 256 << 20

# what build_model gave: each submodule's training flag, each parameter's requires_grad
Fresh = tuple[tuple[bool, ...], tuple[bool, ...]]
Idle = dict[int, list[tuple[nn.Module, Fresh]]]  # seed → idle models
# id(task) → (a weak reference to the task, its idle models); the entry goes when the task does
_IDLE: dict[int, tuple[weakref.ref[Task], Idle]] = {}
_LOCK = threading.RLock()  # re-entrant: a task's weak-reference callback may run inside it


def _fresh_flags(model: nn.Module) -> Fresh:
    return tuple(m.training for m in model.modules()), tuple(p.requires_grad for p in model.parameters())


def _reset(model: nn.Module, fresh: Fresh) -> None:
    for m, training in zip(model.modules(), fresh[0], strict=True):
        m.training = training
    for p, needs in zip(model.parameters(), fresh[1], strict=True):
        p.requires_grad_(needs)


def _idle_of(task: Task, create: bool) -> Idle | None:
    entry = _IDLE.get(id(task))
    if entry is not None and entry[0]() is task:
        return entry[1]
    if not create:
        return None
    key = id(task)
    try:
        ref = weakref.ref(task, lambda _: _forget(key))
    except TypeError:  # a task that takes no weak reference is never pooled
        return None
    _IDLE[key] = (ref, {})
    return _IDLE[key][1]


def _forget(key: int) -> None:
    with _LOCK:
        _IDLE.pop(key, None)


def reuses_models(task: Task) -> bool:
    """Whether ``task`` lets a process reuse its model between full-fine-tuning rounds (its
    ``reuse_model`` attribute is ``True``; absent: no)."""
    return getattr(task, "reuse_model", False) is True


def idle_models(task: Task, seed: int) -> int:
    """How many idle models of (``task``, ``seed``) the process keeps."""
    with _LOCK:
        idle = _idle_of(task, create=False)
        return len(idle.get(seed, [])) if idle else 0


def _take(task: Task, seed: int) -> tuple[nn.Module, Fresh] | None:
    with _LOCK:
        idle = _idle_of(task, create=False)
        models = idle.get(seed) if idle else None
        return models.pop() if models else None


def _give_back(task: Task, seed: int, model: nn.Module, fresh: Fresh) -> None:
    for p in model.parameters():
        p.grad = None
    size = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    if size > MAX_MODEL_BYTES:
        return
    with _LOCK:
        idle = _idle_of(task, create=True)
        if idle is None:
            return
        models = idle.setdefault(seed, [])
        if len(models) < MAX_IDLE:
            models.append((model, fresh))


@contextmanager
def borrowed_model(task: Task, seed: int, *, reuse: bool = True) -> Iterator[nn.Module]:
    """A model of ``task`` built with ``seed``, as ``build_model`` gives it (modes, ``requires_grad``, no
    gradients; weights not reset): one the process
    built before when there is an idle one, else ``task.build_model(seed)``. It is given back for
    reuse when the block ends without an exception and ``reuse`` is true (the caller says the round
    leaves it reusable: full fine-tuning on the CPU); the caller must load every weight before use."""
    lent = _take(task, seed) if reuse else None
    if lent is None:
        model = task.build_model(seed)
        fresh = _fresh_flags(model)
    else:
        model, fresh = lent
        _reset(model, fresh)
    yield model
    if reuse and all(t.device.type == "cpu" for t in model.parameters()):
        _give_back(task, seed, model, fresh)


def forget_models() -> None:
    """Drop every idle model (the next round of each task builds afresh)."""
    with _LOCK:
        _IDLE.clear()
