"""Continual mergers: experts arrive one at a time; explicit, serialisable state; O(P) memory.

>>> from fedmerge.aggregators.continual import available_continual
>>> available_continual()
['continual_task_arithmetic', 'continual_ties', 'magmax', 'opcm', 'running_average']

``continual_task_arithmetic`` and ``magmax`` are the batch aggregators of the same methods (the
batch registry, :func:`fedmerge.aggregators.create`) folded one expert at a time, with their
accumulators as the persisted state (:mod:`~fedmerge.aggregators.continual.batch`); their continual
defaults are declared on the batch class (``continual_defaults``). ``continual_ties``, ``opcm`` and
``running_average`` have their own arithmetic (see each module for why).
"""

from fedmerge.aggregators.continual import (  # noqa: F401  (import registers each method)
    batch,
    continual_ties,
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
from fedmerge.aggregators.continual.batch import BatchContinual
from fedmerge.aggregators.continual.opcm import linear_weight_names, project_out, split_rank

__all__ = [
    "STATE_FORMAT",
    "BatchContinual",
    "ContinualMerger",
    "available_continual",
    "create_continual",
    "get_continual",
    "linear_weight_names",
    "project_out",
    "register_continual",
    "split_rank",
]
