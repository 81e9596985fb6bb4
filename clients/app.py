"""The fedmerge ClientApp: train locally on the received base, reply with a compressed task vector.

Per ``train`` message: take the base weights from the message (or this node's cache in
``context.state``), fine-tune with the configured task (:func:`simulations.local_round.local_round`:
full fine-tuning or LoRA through peft, whose merged ΔW = (α/r)·B·A is the task vector), encode
τ = θ_ft − θ_base with the codec (top-k + int8 by default, error-feedback residual kept in
``context.state``) and reply with the package and the training metrics.

The node's data partition comes from ``node_config`` (``partition-id``, ``num-partitions``: set by
the simulation engine, or ``--node-config`` on a SuperNode). The training task is pluggable: pass any
:class:`simulations.tasks.Task` (or register one under a name) to :func:`make_client_app`.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedmerge.codec import PackageMeta
from fedmerge.errors import ConfigError
from fedmerge.flower.client import TrainInstructions, encode_reply, resolve_base, training_device
from fedmerge.flower.faults import FaultPlan, inject_faults
from fedmerge.flower.records import CONFIG_RECORD
from fedmerge_simulations.local_round import local_round
from fedmerge_simulations.tasks import ClientData, Task, get_task

TaskFactory = Callable[[str], Task]


@lru_cache(maxsize=8)
def partition_for(
    task_name: str, num_partitions: int, partitioner: str, alpha: float, seed: int
) -> list[ClientData]:
    args = {"alpha": alpha} if partitioner == "dirichlet" else {}
    return get_task(task_name).client_datasets(num_partitions, partitioner, seed, **args)


def node_partition(context: Context) -> tuple[int, int]:
    """(partition-id, num-partitions) from the node config; a ConfigError says how to set them."""
    cfg = context.node_config
    if "partition-id" not in cfg or "num-partitions" not in cfg:
        raise ConfigError(
            "node_config lacks partition-id / num-partitions; start the SuperNode with "
            '--node-config "partition-id=0 num-partitions=3"'
        )
    return int(cfg["partition-id"]), int(cfg["num-partitions"])


def client_id_of(context: Context, partition_id: int) -> str:
    return str(context.node_config.get("client-id", f"client-{partition_id}"))


def train_reply(message: Message, context: Context, task_factory: TaskFactory = get_task) -> Message:
    """Handle one ``train`` message; exceptions become Flower error replies the server records."""
    conf = TrainInstructions.from_record(message.content.config_records[CONFIG_RECORD])
    base = resolve_base(message.content, context, conf.base_version_id, conf.base_version_hash)
    pid, num = node_partition(context)
    faults = FaultPlan.from_record(message.content.config_records[CONFIG_RECORD])
    inject_faults(faults, conf.seed, conf.round, pid)  # simulated dropout / straggler (off by default)
    task = task_factory(conf.task)
    data = partition_for(conf.task, num, conf.partitioner, conf.dirichlet_alpha, conf.seed)[pid]
    update = local_round(
        task, base, data, seed=conf.seed, round_=conf.round, mode=conf.mode,
        epochs=conf.local_epochs, lr=conf.lr, batch_size=conf.batch_size,
        lora_rank=conf.lora_rank, lora_alpha=conf.lora_alpha, device=training_device(conf.device),
    )  # fmt: skip
    meta = PackageMeta(
        client_id=client_id_of(context, pid),
        round=conf.round,
        base_version_id=conf.base_version_id,
        base_version_hash=conf.base_version_hash,
        num_examples=data.num_examples,
    )
    content, _ = encode_reply(update.delta, conf.codec, meta, context, update.metrics)
    return Message(content, reply_to=message)


def make_client_app(task_factory: TaskFactory = get_task) -> ClientApp:
    """A ClientApp whose tasks come from ``task_factory(name)`` (default: the built-in registry)."""
    client = ClientApp()

    @client.train()
    def train(message: Message, context: Context) -> Message:
        return train_reply(message, context, task_factory)

    return client


app = make_client_app()
