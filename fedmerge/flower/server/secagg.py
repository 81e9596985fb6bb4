"""Server side of SecAgg+ rounds: the legacy strategy that commits each round's secure sum to the store,
Flower's SecAgg+ workflow, byte counting and the ServerApp factory (the app itself is
``fedmerge_server.secagg:server_app``). The sum mathematics is :mod:`fedmerge.privacy.secagg`; the
clients are the ClientApps of ``fedmerge_clients.secagg``."""

from __future__ import annotations

import hashlib
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import torch
from flwr.app import Context, Message, RecordDict
from flwr.common import (
    FitIns,
    FitRes,
    Parameters,
    Scalar,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server import LegacyContext, ServerConfig
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import FedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from fedmerge.aggregators import create
from fedmerge.delta.state_dict import floating_names
from fedmerge.errors import ConfigError
from fedmerge.flower.server.commit import check_latest_unmoved
from fedmerge.flower.server.federation import RoundAborted, ensure_base, start_round
from fedmerge.privacy.secagg import (
    MAX_REASON,
    SUBMISSIONS,
    SecAggConfig,
    SumResult,
    aggregate_from_sums,
    snap_sum,
)
from fedmerge.store import Contributor, ModelStore, Version
from fedmerge.tasks import get_task

log = logging.getLogger("fedmerge.secagg")


def wire_bytes(message: Message) -> int:
    """Serialized size of ``message`` as Flower 1.41 moves it between SuperLink and SuperNode: the sum of
    the deflated inflatable objects (message, record dict, records, arrays, array chunks), each once."""
    return sum(len(obj.deflate()) for obj in get_all_nested_objects(message).values())


@dataclass
class Traffic:
    """Per-round (Flower's group id) byte and message counts, and the time spent counting."""

    downlink: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    uplink: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    messages: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    counting_s: dict[str, float] = field(default_factory=lambda: defaultdict(float))


class CountingGrid(Grid):
    """A Grid that forwards everything to ``inner`` and counts the serialized bytes of each message
    pushed (server → client) and each reply pulled (client → server), keyed by the message's group id."""

    def __init__(self, inner: Grid, pull_interval: float = 0.05) -> None:
        self.inner = inner
        self.traffic = Traffic()
        self.pull_interval = pull_interval

    def set_run(self, run: Any) -> None:
        self.inner.set_run(run)

    @property
    def run(self) -> Any:
        return self.inner.run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return self.inner.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self.inner.get_node_ids()

    def _count(self, messages: Iterable[Message], table: dict[str, int]) -> None:
        for msg in messages:
            t0 = time.perf_counter()
            group = msg.metadata.group_id
            table[group] += wire_bytes(msg)
            self.traffic.messages[group] += 1
            self.traffic.counting_s[group] += time.perf_counter() - t0

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        msgs = list(messages)
        ids = list(self.inner.push_messages(msgs))
        self._count(msgs, self.traffic.downlink)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies = list(self.inner.pull_messages(message_ids))
        self._count(replies, self.traffic.uplink)
        return replies

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        pending = set(self.push_messages(messages))
        end = time.monotonic() + (timeout if timeout is not None else 0.0)
        out: list[Message] = []
        while pending and (timeout is None or time.monotonic() < end):
            replies = list(self.pull_messages(pending))
            out.extend(replies)
            pending.difference_update(r.metadata.reply_to_message_id for r in replies)
            if pending and not replies:
                time.sleep(self.pull_interval)
        return out


# ---------------------------------------------------------------------------------------- server side
@dataclass(frozen=True)
class SecAggRound:
    """One committed round: bytes per direction (serialized, all protocol stages), time, what was learned."""

    round: int
    version_id: str
    parent_id: str
    mode: str
    secure: bool
    num_clients: int
    failures: int
    uplink_bytes: int
    downlink_bytes: int
    messages: int
    wall_s: float
    total_examples: int
    error_bound: float
    ambiguous_coordinates: int
    metrics: dict[str, float]


class RecordingSecAggPlusWorkflow(SecAggPlusWorkflow):
    """Flower's SecAgg+ workflow, remembering the effective share count and threshold of each round."""

    effective: dict[str, int]

    def setup_stage(self, grid: Grid, context: LegacyContext, state: Any) -> bool:
        ok = bool(super().setup_stage(grid, context, state))
        self.effective = {
            "num_shares": int(state.num_shares),
            "reconstruction_threshold": int(state.threshold),
            "sampled": len(state.sampled_node_ids),
        }
        return ok


def _as_share_param(value: float) -> int | float:
    """Flower reads an int as a count and a float as a fraction: 1.0 means all, 5.0 means five."""
    return int(value) if value > 1.0 else float(value)


class SecAggStrategy(FedAvg):
    """Legacy FedAvg that sends full base weights, and commits the round's aggregate task vector."""

    def __init__(
        self,
        cfg: SecAggConfig,
        store: ModelStore,
        grid: CountingGrid,
        workflow: RecordingSecAggPlusWorkflow | None,
        on_round: Callable[[SecAggRound], None] | None = None,
    ) -> None:
        super().__init__(
            fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=cfg.num_clients,
            min_evaluate_clients=cfg.num_clients, min_available_clients=cfg.num_clients,
        )  # fmt: skip
        self.cfg, self.store, self.grid, self.workflow, self.on_round = cfg, store, grid, workflow, on_round
        self.names: list[str] = []
        self.base: Version | None = None
        self.first_round = 1
        self.started: dict[int, float] = {}
        self.reports: list[SecAggRound] = []
        self.evaluate_weights = None
        if cfg.server_eval:
            from fedmerge.tasks.evaluate import task_evaluator

            self.evaluate_weights = task_evaluator(cfg.task, cfg.seed)

    def __repr__(self) -> str:
        return f"SecAggStrategy(mode={self.cfg.mode!r}, secure={self.cfg.secure})"

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        cfg = self.cfg
        self.base = ensure_base(
            self.store, lambda: get_task(cfg.task).pretrained_base(cfg.seed), name=cfg.task
        )
        self.first_round = start_round(self.base)
        weights = self.store.materialize(self.base)
        self.names = floating_names(weights)
        if len(self.names) != len(weights):
            raise ConfigError(
                f"task {cfg.task!r} has non-floating state {sorted(set(weights) - set(self.names))}; "
                "secure-aggregation rounds send floating tensors only"
            )
        return ndarrays_to_parameters([weights[n].numpy() for n in self.names])

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        self.started[server_round] = time.perf_counter()
        config = self.cfg.client_config(self.first_round + server_round - 1, self.names)
        fit_ins = FitIns(parameters, config)
        clients = client_manager.sample(
            num_clients=self.cfg.num_clients, min_num_clients=self.cfg.num_clients
        )
        return [(client, fit_ins) for client in clients]

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        if len(results) < self.cfg.min_summed:
            log.warning(
                "round %d: %d results < min-summed=%d; nothing committed", server_round, len(results),
                self.cfg.min_summed,
            )  # fmt: skip
            return None, {}
        assert self.base is not None
        round_ = self.first_round + server_round - 1
        base = self.base
        weights = self.store.materialize(base)
        shapes = {n: tuple(weights[n].shape) for n in self.names}
        name, params = self.cfg.method()
        aggregator_params = create(name, seed=self.cfg.seed, round=round_, **params).params
        pids = sorted(int(cast(int, res.metrics.get("partition-id", -1))) for _, res in results)
        if self.cfg.secure:
            m = len(results)
            means = parameters_to_ndarrays(results[0][1].parameters)
            sums = [snap_sum(a, m, self.cfg) for a in means]
            result = aggregate_from_sums(sums, self.names, shapes, self.cfg, m)
            contributors = [Contributor(f"client-{p}", 0, "") for p in pids]
        else:
            result, contributors = self._plain(results, round_, shapes, name, params)
        merged = result.aggregate
        new = {k: weights[k] + merged[k].to(weights[k].dtype) for k in self.names}
        group = str(server_round)
        traffic = self.grid.traffic
        metrics: dict[str, float] = {
            "clients": float(len(results)),
            "failures": float(len(failures)),
            "uplink-bytes": float(traffic.uplink[group]),
            "downlink-bytes": float(traffic.downlink[group]),
            "total-examples": float(result.total_examples),
        }
        if self.evaluate_weights is not None:
            metrics.update({f"server-{k}": float(v) for k, v in self.evaluate_weights(new).items()})
        check_latest_unmoved(self.store, base, round_)
        version = self.store.commit(
            merged,
            parents=[base.id],
            method=name,
            params={**aggregator_params, "mode": "full"},
            contributors=contributors,
            round=round_,
            metrics=metrics,
            privacy=None,
            metadata={
                "task": self.cfg.task,
                "secure_aggregation": self._secagg_record(result, len(results), failures),
            },
        )
        self.base = version
        wall = time.perf_counter() - self.started.get(server_round, time.perf_counter())
        report = SecAggRound(
            round=round_,
            version_id=version.id,
            parent_id=base.id,
            mode=self.cfg.mode,
            secure=self.cfg.secure,
            num_clients=len(results),
            failures=len(failures),
            uplink_bytes=traffic.uplink[group],
            downlink_bytes=traffic.downlink[group],
            messages=traffic.messages[group],
            wall_s=wall - traffic.counting_s[group],
            total_examples=result.total_examples,
            error_bound=result.error_bound,
            ambiguous_coordinates=result.ambiguous_coordinates,
            metrics=metrics,
        )
        self.reports.append(report)
        if self.on_round is not None:
            self.on_round(report)
        return ndarrays_to_parameters([new[n].numpy() for n in self.names]), {}

    def _plain(
        self,
        results: list[tuple[ClientProxy, FitRes]],
        round_: int,
        shapes: Mapping[str, tuple[int, ...]],
        name: str,
        params: Mapping[str, Any],
    ) -> tuple[SumResult, list[Contributor]]:
        """The reference: fedmerge's aggregator over the dense fp32 task vectors, client ids = partitions."""
        agg = create(name, seed=self.cfg.seed, round=round_, **params)
        agg.begin(shapes)
        contributors, total = [], 0
        for _, res in sorted(results, key=lambda r: int(cast(int, r[1].metrics["partition-id"]))):
            pid = int(cast(int, res.metrics["partition-id"]))
            arrays = parameters_to_ndarrays(res.parameters)
            delta = {n: torch.from_numpy(np.asarray(a)) for n, a in zip(self.names, arrays, strict=True)}
            agg.add(delta, res.num_examples, client_id=pid)
            digest = hashlib.sha256(b"".join(np.asarray(a).tobytes() for a in arrays)).hexdigest()
            contributors.append(Contributor(f"client-{pid}", int(res.num_examples), digest))
            total += int(res.num_examples)
        return SumResult(agg.finalize(), total, 0.0), contributors

    def _secagg_record(
        self, result: SumResult, summed: int, failures: Sequence[Any]
    ) -> dict[str, Any] | None:
        if not self.cfg.secure:
            return None
        cfg = self.cfg
        effective = getattr(self.workflow, "effective", {}) if self.workflow is not None else {}
        reasons = [" ".join(str(f).split())[-MAX_REASON:] for f in failures]
        return {
            "protocol": "SecAgg+ (flwr.server.workflow.SecAggPlusWorkflow, legacy DefaultWorkflow)",
            "submission": SUBMISSIONS[cfg.mode],
            "num_shares": int(effective.get("num_shares", 0)),
            "reconstruction_threshold": int(effective.get("reconstruction_threshold", 0)),
            "num_shares_setting": cfg.num_shares,
            "reconstruction_threshold_setting": cfg.reconstruction_threshold,
            "clipping_range": cfg.clipping_range,
            "quantization_range": cfg.quantization_range,
            "modulus_range": cfg.modulus_range,
            "weight_scale": cfg.weight_scale,
            "clients_summed": summed,
            "clients_sampled": int(effective.get("sampled", summed)),
            "dropped": reasons,
            "total_examples": result.total_examples,
            "error_bound": result.error_bound,
            "ambiguous_coordinates": result.ambiguous_coordinates,
        }


def serve(
    grid: Grid,
    context: Context,
    overrides: Mapping[str, Any] | None = None,
    on_round: Callable[[SecAggRound], None] | None = None,
    traffic_out: list[Traffic] | None = None,
) -> list[SecAggRound]:
    """The server side of a run: ``num-rounds`` legacy rounds (SecAgg+ when ``secure``) on ``grid``,
    each aggregate committed to the store. Raises :class:`RoundAborted` if a round commits nothing."""
    cfg = SecAggConfig.from_mapping({**dict(context.run_config), **dict(overrides or {})})
    if not cfg.store:
        raise ConfigError("set store=PATH: the model store that receives one version per round")
    counting = CountingGrid(grid)
    if traffic_out is not None:
        traffic_out.append(counting.traffic)
    workflow = None
    if cfg.secure:
        workflow = RecordingSecAggPlusWorkflow(
            num_shares=_as_share_param(cfg.num_shares),
            reconstruction_threshold=_as_share_param(cfg.reconstruction_threshold),
            max_weight=1.0, clipping_range=cfg.clipping_range, quantization_range=cfg.quantization_range,
            modulus_range=cfg.modulus_range, timeout=cfg.timeout_s,
        )  # fmt: skip
    with ModelStore.open(cfg.store, catalog=cfg.catalog or None) as store:
        strategy = SecAggStrategy(cfg, store, counting, workflow, on_round)
        legacy = LegacyContext(context, config=ServerConfig(num_rounds=cfg.num_rounds), strategy=strategy)
        DefaultWorkflow(fit_workflow=workflow)(counting, legacy)
    if len(strategy.reports) < cfg.num_rounds:
        done = [r.round for r in strategy.reports]
        raise RoundAborted(
            f"only rounds {done} of {cfg.num_rounds} were committed: secure aggregation halted or fewer "
            f"than min-summed={cfg.min_summed} clients' vectors were summed (see the server log)"
        )
    return strategy.reports


def make_server_app(
    overrides: Mapping[str, Any] | None = None,
    on_round: Callable[[SecAggRound], None] | None = None,
    traffic_out: list[Traffic] | None = None,
) -> ServerApp:
    """A ServerApp running :func:`serve` with ``context.run_config`` updated by ``overrides``."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        serve(grid, context, overrides, on_round, traffic_out)

    return app
