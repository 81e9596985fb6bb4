"""Shared fixtures: an isolated Flower home, and ClientApps that misbehave in chosen ways."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedmerge.flower.records import FEDMERGE_RECORD
from fedmerge.flower.server.commit import RoundReport
from fedmerge.flower.simulation import ServerAppFactory, run_simulation_app
from fedmerge.flower.transport import package_to_record, record_to_package
from fedmerge_clients.app import train_reply
from fedmerge_clients.plain_app import train as plain_train


@pytest.fixture(autouse=True)
def flower_env(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("FLWR_HOME", str(tmp_path_factory.mktemp("flwr-home")))
    monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "0")
    monkeypatch.setenv("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    yield


@pytest.fixture
def server_identity() -> Iterator[None]:
    """Messages read the process's task identity; set it as Flower's ServerApp runtime does (for a
    Federation driven in the test's process, e.g. on an ``InProcessGrid``)."""
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


Behaviour = Callable[[Message, Context], Message]


def _truncated(message: Message, context: Context) -> Message:
    reply = train_reply(message, context)
    data = record_to_package(reply.content)
    reply.content = package_to_record(data[: len(data) // 2])
    return reply


def _duplicate_of_0(message: Message, context: Context) -> Message:
    """Claims to be client-0 (partition 0 also replies as client-0)."""
    context.node_config["client-id"] = "client-0"
    return train_reply(message, context)


def _crash(message: Message, context: Context) -> Message:
    raise RuntimeError("simulated crash during local training")


def _stale(message: Message, context: Context) -> Message:
    """Trains on the weights it holds but labels the package with an older base version."""
    message.content.config_records[FEDMERGE_RECORD]["base-version-id"] = "v000000"
    return train_reply(message, context)


STRAGGLER_OVERRUN_S = 2.0  # how long past its message's deadline a "straggler" replies


def _straggler(message: Message, context: Context) -> Message:
    """Trains correctly but replies ``STRAGGLER_OVERRUN_S`` after the message's deadline (created + TTL)."""
    late = message.metadata.created_at + message.metadata.ttl + STRAGGLER_OVERRUN_S
    while (left := late - time.time()) > 0:
        time.sleep(min(left, 0.5))
    return train_reply(message, context)


BEHAVIOURS: dict[str, Behaviour] = {
    "ok": train_reply,
    "truncated": _truncated,
    "duplicate": _duplicate_of_0,
    "crash": _crash,
    "dense": plain_train,
    "plain": plain_train,
    "stale": _stale,
    "straggler": _straggler,
}


def _scripted_client_app(plan: list[str]) -> ClientApp:
    """Partition i behaves as ``plan[i]`` (a key of BEHAVIOURS)."""
    app = ClientApp()

    @app.train()
    def train(message: Message, context: Context) -> Message:
        return BEHAVIOURS[plan[int(context.node_config["partition-id"])]](message, context)

    return app


def _simulate(store: Path, client_app: ClientApp, num_nodes: int, **overrides: Any) -> list[RoundReport]:
    """Run the fedmerge ServerApp on Flower's simulation runtime (``flwr run`` on a private SuperLink,
    the overrides as the run config); returns the round reports."""
    reports: list[RoundReport] = []
    config = {"store": str(store), "num-rounds": 1, "local-epochs": 1, "lr": 0.05, "server-eval": True}
    config.update({k.replace("_", "-"): v for k, v in overrides.items()})
    run_simulation_app(
        ServerAppFactory("fedmerge_server.app:make_server_app"),
        client_app,
        num_supernodes=num_nodes,
        run_config=config,
        on_report=reports.append,
    )
    return reports


@pytest.fixture
def scripted_client_app() -> Callable[[list[str]], ClientApp]:
    return _scripted_client_app


@pytest.fixture
def simulate() -> Callable[..., list[RoundReport]]:
    return _simulate
