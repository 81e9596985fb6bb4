"""The fedmerge ClientApp: train locally on the received base, reply with a compressed task vector.

Per ``train`` message: take the base weights from the message (or this node's cache in
``context.state``), fine-tune with the configured task (:func:`simulations.local_round.local_round`:
full fine-tuning or LoRA through peft, whose merged ΔW = (α/r)·B·A is the task vector), encode
τ = θ_ft − θ_base with the codec (top-k + int8 by default, error-feedback residual kept in
``context.state``) and reply with the package and the training metrics. A node may compress its task
vector to low rank first (TSV-C: ``--node-config "tsv-c-tasks=T"``, :func:`low_rank_delta`).

The node's data: in a deployment, its private file ``--node-config "data-path=/path"`` read by the
task's ``load_data`` (a missing or unreadable path is an error reply naming it); in simulation (no
``data-path``), the ``partition-id`` / ``num-partitions`` slice of the task's client pool. The task
is the run config's ``task``: a built-in name or ``"package.module:factory"``
(:func:`fedmerge_simulations.tasks.get_task`); or pass a factory to :func:`make_client_app`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import lru_cache

import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedmerge.codec import PackageMeta
from fedmerge.delta.lowrank import tsv_compress
from fedmerge.delta.state_dict import StateDict
from fedmerge.errors import ConfigError, FedMergeError
from fedmerge.flower.client import (
    TrainInstructions,
    encode_reply,
    message_settings,
    resolve_base,
    training_device,
)
from fedmerge.flower.faults import FaultPlan, inject_faults
from fedmerge.seeds import derive_generator
from fedmerge_simulations.local_round import local_round
from fedmerge_simulations.tasks import ClientData, Task, get_task
from fedmerge_simulations.tasks.base import check_data_path

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
            "node_config has neither data-path nor partition-id / num-partitions; start the SuperNode "
            'with --node-config "data-path=/path/to/local/data" (or "partition-id=0 num-partitions=3" '
            "for a built-in task's shared data set)"
        )
    return int(cfg["partition-id"]), int(cfg["num-partitions"])


def client_id_of(context: Context, partition_id: int) -> str:
    default = f"client-{partition_id}" if partition_id >= 0 else f"node-{context.node_id}"
    return str(context.node_config.get("client-id", default))


_LOADED: dict[tuple[str, str, int], ClientData] = {}


def node_data(context: Context, task: Task, conf: TrainInstructions) -> tuple[ClientData, int]:
    """(this node's data, partition id or -1): its ``data-path`` file if set, else its partition."""
    path = context.node_config.get("data-path")
    if path is not None:
        check_data_path(str(path))  # DataPathError naming the path, before the task tries
        load = getattr(task, "load_data", None)
        if load is None:
            raise ConfigError(f"task {conf.task!r} has no load_data(path); it cannot read data-path={path!r}")
        key = (conf.task, str(path), conf.seed)
        if key not in _LOADED:
            _LOADED[key] = load(str(path), seed=conf.seed)
        return _LOADED[key], int(context.node_config.get("partition-id", -1))
    pid, num = node_partition(context)
    return partition_for(conf.task, num, conf.partitioner, conf.dirichlet_alpha, conf.seed)[pid], pid


def low_rank_delta(delta: Mapping[str, torch.Tensor], context: Context) -> Mapping[str, torch.Tensor]:
    """TSV-C before the codec when the node sets ``--node-config "tsv-c-tasks=T"`` (T ≥ 1, the number of
    tasks merged): each matrix of the task vector at rank max(1, ⌊min(m, n)/T⌋)
    (:func:`fedmerge.delta.lowrank.tsv_compress`); unset, the delta as it is."""
    value = context.node_config.get("tsv-c-tasks")
    if value is None:
        return delta
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"node config tsv-c-tasks={value!r} must be an integer ≥ 1 (the number of tasks)")
    return tsv_compress(delta, value)


def train_reply(message: Message, context: Context, task_factory: TaskFactory = get_task) -> Message:
    """Handle one ``train`` message; exceptions become Flower error replies the server records."""
    settings = message_settings(message.content)
    conf = TrainInstructions.from_record(settings)
    base = resolve_base(message.content, context, conf.base_version_id, conf.base_version_hash)
    task = task_factory(conf.task)
    data, pid = node_data(context, task, conf)
    faults = FaultPlan.from_record(settings)
    inject_faults(faults, conf.seed, conf.round, max(pid, 0))  # simulated dropout / straggler (default off)
    update = local_round(
        task, base, data, seed=conf.seed, round_=conf.round, mode=conf.mode,
        epochs=conf.local_epochs, lr=conf.lr, batch_size=conf.batch_size,
        lora_rank=conf.lora_rank, lora_alpha=conf.lora_alpha, device=training_device(conf.device),
    )  # fmt: skip
    delta = low_rank_delta(update.delta, context)
    meta = PackageMeta(
        client_id=client_id_of(context, pid),
        round=conf.round,
        base_version_id=conf.base_version_id,
        base_version_hash=conf.base_version_hash,
        num_examples=data.num_examples,
    )
    fisher = client_fisher(task, base, update.delta, data, conf) if conf.fisher_examples > 0 else None
    content, _ = encode_reply(delta, conf.codec, meta, context, update.metrics, fisher)
    return Message(content, reply_to=message)


def client_fisher(
    task: Task, base: StateDict, delta: Mapping[str, torch.Tensor], data: ClientData, conf: TrainInstructions
) -> dict[str, torch.Tensor]:
    """The diagonal Fisher of the fine-tuned model (base + delta) on ``conf.fisher_examples`` of the
    node's training examples, drawn from the client's own generator stream."""
    estimate = getattr(task, "diagonal_fisher", None)
    if estimate is None:
        raise FedMergeError(
            f"task {conf.task!r} cannot compute a diagonal Fisher (it has no diagonal_fisher method); "
            "the round's aggregator needs one"
        )
    finetuned = {k: v + delta[k].to(v.dtype) if k in delta else v for k, v in base.items()}
    generator = derive_generator(conf.seed, conf.round, data.client_id, "fisher")
    return dict(estimate(finetuned, data.train, conf.fisher_examples, generator))


def make_client_app(task_factory: TaskFactory = get_task) -> ClientApp:
    """A ClientApp whose tasks come from ``task_factory(name)`` (default: the built-in registry)."""
    client = ClientApp()

    @client.train()
    def train(message: Message, context: Context) -> Message:
        return train_reply(message, context, task_factory)

    return client


app = make_client_app()
