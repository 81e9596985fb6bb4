"""The simulations' built-in tasks (``digits``, ``tiny_lm``), found by :func:`fedmerge.tasks.get_task`
through the ``fedmerge.tasks`` entry points this application declares (``pyproject.toml``).

The task protocol and the registry are the library's (:mod:`fedmerge.tasks`); they are re-exported
here for the simulations' own code. :class:`~simulations.tasks.base.SupervisedTask` implements the
protocol for tasks with a pre-training split, a client pool and a global test set.
"""

from __future__ import annotations

from fedmerge.tasks import ClientData, Split, Task, check_task, get_task, register_task, task_names
from fedmerge.tasks.hf_causal_lm import HFCausalLMTask
from fedmerge_simulations.tasks.base import SupervisedTask
from fedmerge_simulations.tasks.digits import DigitsTask
from fedmerge_simulations.tasks.tiny_lm import TinyLMTask

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
