"""The fedmerge ClientApp: train locally on the received base, reply with a compressed task vector.

Per ``train`` message: take the base weights from the message (or this node's cache in
``context.state``), fine-tune with the configured task (:func:`fedmerge.tasks.local_round.local_round`:
full fine-tuning or LoRA through peft, whose merged ΔW = (α/r)·B·A is the task vector), encode
τ = θ_ft − θ_base with the codec (top-k + int8 by default, error-feedback residual kept in
``context.state``) and reply with the package and the training metrics. A node may compress its task
vector to low rank first (TSV-C: ``--node-config "tsv-c-tasks=T"``, :func:`low_rank_delta`).

The node's data: in a deployment, its private file ``--node-config "data-path=/path"`` read by the
task's ``load_data`` (a missing or unreadable path is an error reply naming it); in simulation (no
``data-path``), the ``partition-id`` / ``num-partitions`` slice of the task's client pool. The task
is the run config's ``task``: a built-in name or ``"package.module:factory"``
(:func:`fedmerge.tasks.get_task`); or pass a factory to :func:`make_client_app`.

Per ``evaluate`` message (fedmerge's ServerApp after a round, or any Flower strategy): load the weights
of ``"arrays"`` (bf16 tensors narrowed back per ``"fedmerge.dtypes"``) into the task's model and reply
the task's evaluation on the node's own test split: ``"metrics"`` with ``loss``, ``accuracy`` and
``num-examples``.

Under any Flower strategy (a ``train`` message without fedmerge's ``"fedmerge.config"``, e.g. Flower's
``FedAvg``) the node answers as a plain Flower client: it trains the received ``"arrays"`` and replies
its full weights in ``"arrays"`` plus ``"metrics"`` with ``num-examples`` and the training metrics. The
settings a fedmerge ServerApp would send come from the message's ``"config"`` (``lr``,
``local-epochs``, ``batch-size``, ``server-round`` as Flower's templates send them), else the run
config, else the node config, else fedmerge's defaults (:func:`local_settings`); the task must be named
in one of them (``task``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedmerge.codec import PackageMeta
from fedmerge.delta.lowrank import tsv_compress
from fedmerge.delta.state_dict import StateDict
from fedmerge.errors import ConfigError, FedMergeError
from fedmerge.flower.client.faults import FaultPlan, inject_faults
from fedmerge.flower.client.reply import (
    TrainInstructions,
    encode_reply,
    message_settings,
    resolve_base,
    training_device,
)
from fedmerge.flower.config import RunConfig
from fedmerge.flower.records import (
    ARRAYS_RECORD,
    CONFIG_RECORD,
    DTYPES_RECORD,
    FEDMERGE_RECORD,
    METRICS_RECORD,
    dtypes_of,
    narrow_from_numpy,
    widen_for_numpy,
)
from fedmerge.seeds import derive_generator
from fedmerge.tasks import ClientData, Task, get_task
from fedmerge.tasks.base import check_data_path
from fedmerge.tasks.local_round import local_round
from fedmerge.tasks.partitions import node_partition, partition_for

TaskFactory = Callable[[str], Task]


def client_id_of(context: Context, partition_id: int) -> str:
    default = f"client-{partition_id}" if partition_id >= 0 else f"node-{context.node_id}"
    return str(context.node_config.get("client-id", default))


_LOADED: dict[tuple[str, str, int], ClientData] = {}


@dataclass(frozen=True)
class LocalSettings:
    """What a node needs to train or evaluate when the message does not carry fedmerge's settings."""

    task: str
    round: int
    seed: int
    partitioner: str
    dirichlet_alpha: float
    local_epochs: int
    lr: float
    batch_size: int
    device: str


def _default(name: str) -> Any:
    return RunConfig.__dataclass_fields__[name.replace("-", "_")].default


def local_settings(message: Message, context: Context) -> LocalSettings:
    """Settings from the message's ``"config"`` (also ``learning-rate``, ``num-epochs``), else the run
    config, else the node config, else :class:`~fedmerge.flower.config.RunConfig`'s defaults. A missing
    or malformed task is a ConfigError saying where to set it."""
    config = message.content.config_records.get(CONFIG_RECORD)
    sources: list[Mapping[str, Any]] = [config or {}, context.run_config, context.node_config]
    aliases = {"lr": ("lr", "learning-rate"), "local-epochs": ("local-epochs", "num-epochs")}

    def get(key: str, convert: Callable[[Any], Any], default: Any) -> Any:
        for source in sources:
            for name in aliases.get(key, (key,)):
                if name in source:
                    try:
                        return convert(source[name])
                    except (TypeError, ValueError):
                        raise ConfigError(
                            f"{name}={source[name]!r} is not a valid {convert.__name__}"
                        ) from None
        return default

    task = get("task", str, None)
    if not task:
        raise ConfigError(
            "this message names no task and neither does the run or node config; set task=NAME in the "
            "run config or start the SuperNode with --node-config \"task='NAME'\""
        )
    return LocalSettings(
        task=task,
        round=get("server-round", int, 0),
        seed=get("seed", int, _default("seed")),
        partitioner=get("partitioner", str, "iid"),
        dirichlet_alpha=get("dirichlet-alpha", float, _default("dirichlet-alpha")),
        local_epochs=get("local-epochs", int, _default("local-epochs")),
        lr=get("lr", float, _default("lr")),
        batch_size=get("batch-size", int, _default("batch-size")),
        device=get("device", str, "auto"),
    )


def received_weights(content: RecordDict) -> dict[str, torch.Tensor]:
    """The message's ``"arrays"`` as torch tensors, each tensor named in ``"fedmerge.dtypes"`` narrowed
    back to its dtype (bf16 travels widened to fp32); a FedMergeError when there are none."""
    record = content.array_records.get(ARRAYS_RECORD)
    if record is None:
        raise FedMergeError(
            f"message carries no ArrayRecord {ARRAYS_RECORD!r} (has {sorted(content)}): no model to use"
        )
    weights = dict(record.to_torch_state_dict())
    try:
        return narrow_from_numpy(weights, dtypes_of(content.config_records.get(DTYPES_RECORD), weights))
    except ValueError as exc:
        raise FedMergeError(str(exc)) from None


def node_data(
    context: Context, task: Task, conf: TrainInstructions | LocalSettings
) -> tuple[ClientData, int]:
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


def is_fedmerge_message(message: Message) -> bool:
    """True when the message was sent by fedmerge's ServerApp (it carries ``"fedmerge.config"``)."""
    return isinstance(message.content.get(FEDMERGE_RECORD), ConfigRecord)


def plain_train_reply(message: Message, context: Context, task_factory: TaskFactory = get_task) -> Message:
    """Flower's plain answer to a ``train`` message of any strategy: train the received ``"arrays"``
    (:func:`local_settings`) and reply the full trained weights in ``"arrays"`` (bf16 widened to fp32,
    numpy's dtypes, as every Flower strategy aggregates them) and ``"metrics"`` (``num-examples`` and
    the task's training metrics)."""
    conf = local_settings(message, context)
    base = received_weights(message.content)
    task = task_factory(conf.task)
    data, _ = node_data(context, task, conf)
    update = local_round(
        task, base, data, seed=conf.seed, round_=conf.round, mode="full", epochs=conf.local_epochs,
        lr=conf.lr, batch_size=conf.batch_size, device=training_device(conf.device),
    )  # fmt: skip
    trained = {
        name: (t.to(torch.float32) + update.delta[name].to(torch.float32)).to(t.dtype)
        if name in update.delta
        else t
        for name, t in base.items()
    }
    arrays, _ = widen_for_numpy(trained)
    metrics = {k: float(v) for k, v in update.metrics.items() if k != "num-examples"}
    content = RecordDict(
        {
            ARRAYS_RECORD: ArrayRecord({k: v.contiguous() for k, v in arrays.items()}),
            METRICS_RECORD: MetricRecord({**metrics, "num-examples": data.num_examples}),
        }
    )
    return Message(content, reply_to=message)


def evaluate_reply(message: Message, context: Context, task_factory: TaskFactory = get_task) -> Message:
    """The task's evaluation of the received weights on this node's own test split: ``"metrics"`` with
    ``loss``, ``accuracy`` and ``num-examples`` (for fedmerge's ServerApp and any Flower strategy)."""
    conf = local_settings(message, context)
    weights = received_weights(message.content)
    task = task_factory(conf.task)
    data, _ = node_data(context, task, conf)
    model = task.build_model(conf.seed)
    model.load_state_dict(weights)
    result = task.evaluate(model, data.test, training_device(conf.device))
    metrics = {str(k): float(v) for k, v in result.items() if k != "num-examples"}
    content = RecordDict({METRICS_RECORD: MetricRecord({**metrics, "num-examples": len(data.test)})})
    return Message(content, reply_to=message)


def train_reply(message: Message, context: Context, task_factory: TaskFactory = get_task) -> Message:
    """Handle one ``train`` message; exceptions become Flower error replies the server records. A
    message without fedmerge's settings gets Flower's plain answer (:func:`plain_train_reply`)."""
    if not is_fedmerge_message(message):
        return plain_train_reply(message, context, task_factory)
    settings = message_settings(message.content)
    conf = TrainInstructions.from_record(settings)
    task = task_factory(conf.task)
    own = own_base(task, conf.seed)
    base = resolve_base(message.content, context, conf.base_version_id, conf.base_version_hash, settings, own)
    data, pid = node_data(context, task, conf)
    faults = FaultPlan.from_record(settings)
    inject_faults(faults, conf.seed, conf.round, max(pid, 0))  # simulated dropout / straggler (default off)
    update = local_round(
        task, base, data, seed=conf.seed, round_=conf.round, mode=conf.mode,
        epochs=conf.local_epochs, lr=conf.lr, batch_size=conf.batch_size,
        lora_rank=conf.lora_rank, lora_alpha=conf.lora_alpha, device=training_device(conf.device),
        test_metrics=conf.test_metrics,
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


def own_base(task: Task, seed: int) -> Callable[[], Mapping[str, torch.Tensor]] | None:
    """The base this node can build itself — its task's pretrained base for the run's seed, which a
    store initialised by the task (``init-base``) starts from — or None when the task has none. Used
    only when the server names the base by weights digest (``downlink-base-at-nodes``) and only if
    the digest matches."""
    pretrained = getattr(task, "pretrained_base", None)
    return None if not callable(pretrained) else lambda: pretrained(seed)


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

    @client.evaluate()
    def evaluate(message: Message, context: Context) -> Message:
        return evaluate_reply(message, context, task_factory)

    return client


app = make_client_app()
