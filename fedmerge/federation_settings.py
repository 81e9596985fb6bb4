"""The settings every federation of fedmerge shares — Flower rounds (:mod:`fedmerge.flower.config`) and
SecAgg+ rounds (:mod:`fedmerge.privacy.secagg`) alike — declared once, below both."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class FederationSettings:
    """What every federation of fedmerge sets (:class:`~fedmerge.flower.config.RunConfig`,
    :class:`~fedmerge.privacy.secagg.SecAggConfig`): where rounds commit, the task, how many rounds,
    how each client partitions its data and trains locally, whether the server evaluates each commit.
    Attribute ``foo_bar`` is run-config key ``foo-bar``."""

    store: str = "fedmerge-store"
    # "" keeps the catalog in the store (SQLite); postgresql://… shares it with other servers
    catalog: str = ""
    task: str = "digits"
    num_rounds: int = 2
    server_eval: bool = True
    seed: int = 0
    partitioner: str = "dirichlet"
    dirichlet_alpha: float = 0.5
    local_epochs: int = 2
    lr: float = 0.1
    batch_size: int = 32


def field_type(f: dataclasses.Field[Any]) -> type | None:
    """The Python type of a scalar config field (``int``, ``float``, ``bool``, ``str``), else None."""
    return {"int": int, "float": float, "bool": bool, "str": str}.get(str(f.type))
