"""A node's share of a task's shared data set (simulations and demos: ``partition-id`` /
``num-partitions`` in the node config, instead of a node's private ``data-path``)."""

from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING

from fedmerge.errors import ConfigError
from fedmerge.tasks import get_task
from fedmerge.tasks.base import ClientData

if TYPE_CHECKING:
    from flwr.app import Context


@lru_cache(maxsize=8)
def partition_for(
    task_name: str, num_partitions: int, partitioner: str, alpha: float, seed: int
) -> list[ClientData]:
    """The task's client pool split among ``num_partitions`` clients (``alpha`` for ``dirichlet``)."""
    args = {"alpha": alpha} if partitioner == "dirichlet" else {}
    return get_task(task_name).client_datasets(num_partitions, partitioner, seed, **args)


def node_partition(context: Context) -> tuple[int, int]:
    """(partition-id, num-partitions) from the node config; a ConfigError says how to set them."""
    cfg = context.node_config
    if "partition-id" not in cfg or "num-partitions" not in cfg:
        raise ConfigError(
            "node_config has neither data-path nor partition-id / num-partitions; start the SuperNode "
            'with --node-config "data-path=/path/to/local/data" (or "partition-id=0 num-partitions=3" '
            "for a built-in task's shared data set)"
        )
    return int(cfg["partition-id"]), int(cfg["num-partitions"])
