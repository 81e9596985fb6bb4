"""Drivers of SecAgg+ runs: Flower's simulation engine or a synchronous in-process grid, with the server
(:mod:`fedmerge.flower.server.secagg`) and the ClientApps of ``fedmerge_clients.secagg`` (loaded by
import string, as Flower loads apps) of a run."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from fedmerge.errors import ConfigError
from fedmerge.flower.server.secagg import SecAggRound, Traffic, serve
from fedmerge.flower.simulation import emit_report, run_simulation_app
from fedmerge.plugins import load_object
from fedmerge.privacy.secagg import SecAggConfig

log = logging.getLogger("fedmerge.secagg")


class InProcessGrid(Grid):
    """A synchronous grid in the calling thread, for tests and debugging: every pushed message goes
    through a protobuf round trip (as on the wire), is handled by its node's ``ClientApp`` (mods
    included) with that node's persistent ``Context``, and the reply goes through a round trip back.
    Node i has ``partition-id = i``. An exception in the ClientApp becomes an error reply, as on a
    SuperNode. No Ray, no concurrency; the protocol and the client code are those of the simulation."""

    def __init__(self, client_app: ClientApp, num_nodes: int, run_id: int = 1) -> None:
        from flwr.supercore.run import Run

        self.client_app = client_app
        self._run = Run.create_empty(run_id)
        self.contexts = {
            1000 + i: Context(
                run_id=run_id,
                node_id=1000 + i,
                node_config={"partition-id": i, "num-partitions": num_nodes},
                state=RecordDict(),
                run_config={},
            )
            for i in range(num_nodes)
        }
        self.replies: dict[str, Message] = {}
        self._next = 0

    def set_run(self, run: Any) -> None:
        self._run = run

    @property
    def run(self) -> Any:
        return self._run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    @staticmethod
    def _wire(message: Message) -> Message:
        from flwr.common.serde import message_from_proto, message_to_proto

        return message_from_proto(message_to_proto(message))

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        from flwr.app import Error
        from flwr.common.constant import ErrorCode

        ids = []
        for msg in messages:
            self._next += 1
            mid = f"m{self._next:08d}"
            msg.metadata.__dict__["_message_id"] = mid
            received = self._wire(msg)
            try:
                reply = self.client_app(received, self.contexts[msg.metadata.dst_node_id])
            except Exception as exc:  # a SuperNode turns a ClientApp exception into an error reply
                reason = f"{type(exc).__name__}: {exc}"
                reply = Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason), reply_to=received)
            self.replies[mid] = self._wire(reply)
            ids.append(mid)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self.replies.pop(i) for i in list(message_ids) if i in self.replies]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))


def run_secagg(
    config: Mapping[str, Any],
    *,
    engine: Literal["simulation", "inprocess"] = "simulation",
    on_round: Callable[[SecAggRound], None] | None = None,
    traffic_out: list[Traffic] | None = None,
) -> list[SecAggRound]:
    """Run ``config`` (kebab-case :class:`SecAggConfig` keys); returns the committed rounds.

    ``engine="simulation"``: Flower's simulation engine (Ray), ``num-clients`` SuperNodes with one CPU
    each. ``engine="inprocess"``: the same apps on an :class:`InProcessGrid` (fast, sequential).
    """
    return run_legs([config], engine=engine, on_round=on_round, traffic_out=traffic_out)[0]


def run_legs(
    configs: Sequence[Mapping[str, Any]],
    *,
    engine: Literal["simulation", "inprocess"] = "simulation",
    on_round: Callable[[SecAggRound], None] | None = None,
    traffic_out: list[Traffic] | None = None,
) -> list[list[SecAggRound]]:
    """Run several configs one after the other on the *same* nodes (one simulation, one Ray start);
    they must agree on ``num-clients``. Mixed secure and plain legs use
    ``fedmerge_clients.secagg:client_app``."""
    cfgs = [SecAggConfig.from_mapping(c) for c in configs]
    if not cfgs or len({c.num_clients for c in cfgs}) != 1:
        raise ConfigError("run_legs needs at least one config, all with the same num-clients")
    kinds = {c.secure for c in cfgs}
    name = "client_app" if len(kinds) == 2 else "secure_client_app" if cfgs[0].secure else "plain_client_app"
    app = load_object(f"fedmerge_clients.secagg:{name}", "ClientApp")
    results: list[list[SecAggRound]] = []

    def serve_all(grid: Grid, context: Context) -> None:
        for config in configs:
            results.append(serve(grid, context, config, on_round, traffic_out))

    if engine == "inprocess":
        from flwr.common.constant import SUPERLINK_NODE_ID
        from flwr.supercore.task_identity import TaskIdentity

        grid = InProcessGrid(app, cfgs[0].num_clients)
        context = Context(
            run_id=grid.run.run_id,
            node_id=SUPERLINK_NODE_ID,
            node_config={},
            state=RecordDict(),
            run_config={},
        )
        # messages read the process's task identity, set here as Flower's ServerApp runtime sets it
        saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = (
            1,
            grid.run.run_id,
            SUPERLINK_NODE_ID,
        )
        try:
            serve_all(grid, context)
        finally:
            TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved
        return results
    if engine != "simulation":
        raise ConfigError(f"engine must be 'simulation' or 'inprocess', got {engine!r}")

    def serve_and_report(grid: Grid, context: Context) -> None:
        """In the simulation process: each round and each finished leg go back to this caller."""
        for config in configs:
            traffic: list[Traffic] = []
            rounds = serve(grid, context, config, lambda r: emit_report(("round", r)), traffic)
            emit_report(("leg", rounds, traffic))

    def on_report(item: tuple[Any, ...]) -> None:
        if item[0] == "round" and on_round is not None:
            on_round(item[1])
        elif item[0] == "leg":
            results.append(item[1])
            if traffic_out is not None:
                traffic_out.extend(item[2])

    server = ServerApp()
    server.main()(serve_and_report)
    run_simulation_app(server, app, num_supernodes=cfgs[0].num_clients, on_report=on_report)
    return results
