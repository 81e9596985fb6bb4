"""Aggregators: one module per method, registered by name.

>>> from fedmerge.aggregators import available, create, merge
>>> sorted(available())[:3]
['breadcrumbs', 'breadcrumbs_ties', 'dare_linear']
"""

from fedmerge.aggregators import (  # noqa: F401  (import registers each method)
    arcee_fusion,
    breadcrumbs,
    continual,
    core_space,
    dare_linear,
    dare_ties,
    della,
    della_linear,
    fedavg,
    fisher,
    iso,
    karcher,
    knots,
    krum,
    magmax,
    median,
    model_stock,
    multislerp,
    nearswap,
    norm_bounded,
    nuslerp,
    ram,
    robust_ties,
    sce,
    slerp,
    task_arithmetic,
    ties,
    trimmed_mean,
    tsv,
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
