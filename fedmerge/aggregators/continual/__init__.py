"""Continual mergers: experts arrive one at a time; explicit, serialisable state; O(P) memory.

>>> from fedmerge.aggregators.continual import available_continual
>>> available_continual()
['continual_task_arithmetic', 'continual_ties', 'magmax', 'opcm', 'running_average']

``magmax`` here is the sequential (stateful) MagMax; the batch MagMax aggregator is registered under
the same name in the separate batch registry (:func:`fedmerge.aggregators.create`).
"""

from fedmerge.aggregators.continual import (  # noqa: F401  (import registers each method)
    continual_task_arithmetic,
    continual_ties,
    magmax,
    opcm,
    running_average,
)
from fedmerge.aggregators.continual.base import (
    STATE_FORMAT,
    ContinualMerger,
    available_continual,
    create_continual,
    get_continual,
    register_continual,
)
from fedmerge.aggregators.continual.opcm import linear_weight_names, project_out, split_rank

__all__ = [
    "STATE_FORMAT",
    "ContinualMerger",
    "available_continual",
    "create_continual",
    "get_continual",
    "linear_weight_names",
    "project_out",
    "register_continual",
    "split_rank",
]
