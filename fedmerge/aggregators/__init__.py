"""Aggregators: one module per method, registered by name.

>>> from fedmerge.aggregators import available, create, merge
>>> sorted(available())[:3]
['dare_linear', 'dare_ties', 'della']
"""

from fedmerge.aggregators import (  # noqa: F401  (import registers each method)
    continual,
    dare_linear,
    dare_ties,
    della,
    fedavg,
    krum,
    magmax,
    median,
    norm_bounded,
    robust_ties,
    task_arithmetic,
    ties,
    trimmed_mean,
)
from fedmerge.aggregators.base import (
    Aggregator,
    Prepared,
    available,
    create,
    get,
    merge,
    register,
)
from fedmerge.seeds import derive_generator, derive_seed

__all__ = [
    "Aggregator",
    "Prepared",
    "available",
    "create",
    "derive_generator",
    "derive_seed",
    "get",
    "merge",
    "register",
]
