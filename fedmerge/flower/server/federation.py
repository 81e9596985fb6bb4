"""Running the federation: sample, send, pull replies as they arrive, judge, commit — and resume.

One round r against base version v (the store's ``latest``):

1. sample ⌈fraction·N⌉ (at least ``min-clients``, at most N) connected nodes with a generator seeded
   from (seed, r, attempt); the weights of v go only to nodes not yet known to hold them;
2. push one ``train`` message per node (TTL = ``round-deadline-s``) and pull replies incrementally
   until all arrived or the deadline passed; each reply is judged at once (:mod:`.judge`: codec
   validation, base version id and hash, round, duplicate client or submission, 1 ≤ num-examples ≤
   max) and an accepted delta is folded into the streaming aggregator immediately (memory O(P), not
   O(N·P));
3. with at least ``min-valid`` accepted replies: finalize, evaluate on the task's global test set,
   commit a version (:mod:`.commit`: parents = [v], method, exact params, one Contributor per sampled
   node — accepted or rejected with its reason — round r, metrics); otherwise nothing is committed and
   the round is retried (``max-retries``) or the run stops with :class:`RoundAborted`.

Resume: a run starts at round ``latest.round + 1`` from ``latest``; a reply computed against any
other base is rejected as stale; before committing, ``latest`` is re-read and the commit is refused
if it moved (so no round is committed twice). Plain Flower clients replying full weights in an
``ArrayRecord`` are accepted as τ = θ_reply − θ_base
(:func:`~fedmerge.flower.transport.dense_record_to_task_vector`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from fedmerge.aggregators import create
from fedmerge.aggregators import get as get_aggregator
from fedmerge.aggregators.kernels import PARALLEL_MIN_ELEMENTS
from fedmerge.delta.sparse import SparseTensor
from fedmerge.delta.state_dict import StateDict
from fedmerge.errors import FedMergeError
from fedmerge.flower.client.faults import FaultPlan
from fedmerge.flower.config import RunConfig, needs_fisher
from fedmerge.flower.downlink import weights_digest
from fedmerge.flower.records import (
    ARRAYS_RECORD,
    CONFIG_RECORD,
    DTYPES_RECORD,
    FEDMERGE_RECORD,
    UPDATE_META_RECORD,
    UPDATE_RECORD,
    widen_for_numpy,
)
from fedmerge.flower.server.bulk_endpoint import BulkEndpoint, bulk_endpoint_for
from fedmerge.flower.server.commit import (
    DownlinkUpdate,
    Evaluator,
    RoundReport,
    commit_round,
    round_metrics,
)
from fedmerge.flower.server.evaluation import EvaluationReport, evaluation_due, run_evaluation
from fedmerge.flower.server.exchange import POLL_S, exchange
from fedmerge.flower.server.judge import ReplyOutcome, RoundState, deadline_reason
from fedmerge.flower.server.safeguards import reference_for
from fedmerge.flower.server.spool_merge import aggregator_args, spool_fold_blocker
from fedmerge.flower.transport import RECORD_KEY, package_to_record
from fedmerge.seeds import labelled_digest
from fedmerge.store import ModelStore, TensorView, UnknownVersionError, Version

log = logging.getLogger("fedmerge.rounds")


class RoundAborted(FedMergeError, RuntimeError):
    """A round ended with fewer valid replies than ``min-valid`` after every retry; nothing was committed."""


def ensure_base(store: ModelStore, make_base: Callable[[], StateDict], name: str) -> Version:
    """The store's ``latest`` version, committing ``make_base()`` as the root if the store is empty."""
    try:
        return store.get("latest")
    except UnknownVersionError:
        store.commit_base(make_base(), name=name)
        return store.get("latest")


def start_round(version: Version) -> int:
    """The round a run resumes at: one past the latest committed round (1 for a bare base)."""
    return (version.round or 0) + 1


def sample_nodes(node_ids: Iterable[int], cfg: RunConfig, round_: int, attempt: int) -> list[int]:
    """⌈fraction·N⌉ nodes, at least ``min-clients`` (if connected), seeded by (seed, round, attempt)."""
    nodes = sorted(node_ids)
    k = min(len(nodes), max(cfg.rounds.min_clients, math.ceil(cfg.rounds.fraction * len(nodes))))
    rng = random.Random(labelled_digest(cfg.seed, round_, attempt))
    return sorted(rng.sample(nodes, k))


def wait_for_nodes(grid: Grid, minimum: int, timeout_s: float) -> list[int]:
    """Connected node ids once at least ``minimum`` are connected, or whatever is there at the timeout."""
    end = time.monotonic() + timeout_s
    while True:
        nodes = list(grid.get_node_ids())
        if len(nodes) >= minimum or time.monotonic() >= end:
            return nodes
        time.sleep(POLL_S * 5)


def train_config(cfg: RunConfig, round_: int, base: Version) -> ConfigRecord:
    """Flower's ``"config"`` record of a ``train`` message: what any client (plain or fedmerge) needs
    to train this round. ``server-round``, ``lr``, ``local-epochs`` and ``batch-size`` are the keys
    Flower's quickstarts read; the rest are fedmerge's task settings (the server is the single source
    of settings). Run-config keys fedmerge does not know (a Flower app's own, :attr:`RunConfig.extra`)
    travel here too, under their own names, so a ClientApp reads them as it would from Flower."""
    return ConfigRecord(
        {
            **cfg.extra,
            "server-round": round_,
            "round": round_,
            "lr": cfg.lr,
            "local-epochs": cfg.local_epochs,
            "batch-size": cfg.batch_size,
            "task": cfg.task,
            "mode": cfg.training.mode,
            "seed": cfg.seed,
            "partitioner": cfg.partitioner,
            "dirichlet-alpha": cfg.dirichlet_alpha,
            "lora-rank": cfg.training.lora_rank,
            "lora-alpha": cfg.training.lora_alpha,
            "device": cfg.training.client_device,
        }
    )


def fedmerge_config(cfg: RunConfig, round_: int, base: Version) -> ConfigRecord:
    """fedmerge's extras (``"fedmerge.config"``): the base version id and content hash a package must
    name, the codec, and the DP and fault settings; plain Flower clients ignore this record."""
    codec = cfg.codec.config()
    return ConfigRecord(
        {
            "round": round_,
            "base-version-id": base.id,
            "base-version-hash": base.content_hash,
            "codec-sparsify": codec.sparsify,
            "codec-density": codec.density,
            "codec-values": codec.values,
            "codec-error-feedback": codec.error_feedback,
            "codec-rank": codec.rank,
            "codec-deflate": codec.deflate,
            **FaultPlan(cfg.faults.dropout, cfg.faults.straggler, cfg.faults.straggler_delay_s).to_record(),
            **dp_train_keys(cfg),
            # > 0: reply with the diagonal Fisher of the fine-tuned model beside the delta
            "fisher-examples": cfg.training.fisher_examples if needs_fisher(cfg) else 0,
            "client-test-metrics": cfg.evaluation.client_test_metrics,
        }
    )


def dp_train_keys(cfg: RunConfig) -> dict[str, Any]:
    """The ``dp-*`` keys a client needs to clip (and in local mode noise); none when DP is off."""
    if cfg.dp.config() is None:
        return {}
    return {
        "dp-clip-norm": cfg.dp.clip_norm,
        "dp-noise-multiplier": cfg.dp.noise_multiplier,
        "dp-delta": cfg.dp.delta,
        "dp-mode": cfg.dp.mode,
        "dp-noise-seed": cfg.dp.noise_seed,
    }


def build_messages(
    nodes: list[int],
    cfg: RunConfig,
    round_: int,
    base: Version,
    base_weights: Mapping[str, torch.Tensor],
    holders: set[int],
    update: DownlinkUpdate | None = None,
    parent_holders: set[int] = frozenset(),  # type: ignore[assignment]
    node_settings: Callable[[int], Mapping[str, Any]] | None = None,
    announce: Mapping[int, str] | None = None,
) -> tuple[list[Message], int]:
    """One ``train`` message per node, in Flower's shape (``"arrays"``, ``"config"``) with fedmerge's extras
    beside them (``"fedmerge.config"``). ``holders`` (fedmerge clients holding the base: see
    :meth:`Federation.run_round`) get no weights, the compressed ``update`` goes to fedmerge clients
    holding its parent, and every other node — any plain Flower client — gets the full weights in
    ``"arrays"`` — bf16 tensors widened to fp32 there and named in ``"fedmerge.dtypes"``
    (:func:`~fedmerge.flower.records.widen_for_numpy`). ``node_settings(node)`` adds per-node keys to
    ``"fedmerge.config"`` (the bulk endpoint and the node's upload token). With ``bulk-downlink = true``
    and a base larger than ``bulk-threshold-bytes``, a node that needs full weights gets instead the
    base's download reference from the bulk endpoint
    (:meth:`~fedmerge.flower.server.bulk_endpoint.NodeBulkSettings.base_reference`) and fetches them there.
    ``announce`` (``downlink-base-at-nodes``): node → the base's weights digest, for nodes that need
    the base and are trusted to hold their own copy: their message names the digest
    (``"fedmerge.config"`` ``base-digest``) and carries no weights.
    Returns (messages, downlink bytes)."""
    from fedmerge.flower.client.bulk import BASE_SIZE_KEY
    from fedmerge.flower.client.local_base import BASE_DIGEST_KEY
    from fedmerge.flower.server.bulk_endpoint import NodeBulkSettings

    config = train_config(cfg, round_, base)
    extras = fedmerge_config(cfg, round_, base)
    weights: ArrayRecord | None = None  # built once, and only if some node needs full weights
    dtypes: ConfigRecord | None = None  # "fedmerge.dtypes": the tensors widened in "arrays"
    weight_bytes = 0
    messages, downlink = [], 0
    for node in nodes:
        settings = {} if node_settings is None else node_settings(node)
        node_extras = extras if node_settings is None else ConfigRecord({**extras, **settings})
        content = RecordDict({CONFIG_RECORD: config, FEDMERGE_RECORD: node_extras})
        needs_base = node not in holders and (update is None or node not in parent_holders)
        ref = None
        if cfg.bulk.downlink and needs_base and isinstance(settings, NodeBulkSettings):
            ref = settings.base_reference(base)  # None below bulk-threshold-bytes: "arrays" then
        if node in holders:
            pass
        elif announce is not None and needs_base and node in announce:
            content[FEDMERGE_RECORD] = ConfigRecord({**node_extras, BASE_DIGEST_KEY: announce[node]})
        elif update is not None and node in parent_holders:
            content[UPDATE_RECORD] = package_to_record(update.package)[RECORD_KEY]
            content[UPDATE_META_RECORD] = ConfigRecord(
                {"parent-version-id": update.parent_id, "digest": update.digest}
            )
            downlink += len(update.package)
        elif ref is not None:  # the node downloads the base from the bulk endpoint
            content[FEDMERGE_RECORD] = ConfigRecord({**node_extras, **ref})
            downlink += int(ref[BASE_SIZE_KEY])
        else:
            if weights is None:  # a store view is read here, once
                full, widened = widen_for_numpy(dict(base_weights.items()))  # numpy has no bf16
                weights = ArrayRecord(full)
                dtypes = ConfigRecord(dict[str, Any](widened)) if widened else None
                weight_bytes = sum(t.numel() * t.element_size() for t in full.values())
                del full
            content[ARRAYS_RECORD] = weights
            if dtypes is not None:
                content[DTYPES_RECORD] = dtypes
            downlink += weight_bytes
        messages.append(
            Message(
                content,
                dst_node_id=node,
                message_type="train",
                group_id=str(round_),
                ttl=cfg.rounds.round_deadline_s,
            )
        )
    return messages, downlink


def collect(
    grid: Grid, messages: list[Message], nodes: list[int], state: RoundState, deadline_s: float
) -> list[ReplyOutcome]:
    """Push, then pull replies as they arrive and judge each at once, until all came or the deadline."""
    return exchange(
        grid, messages, nodes, state.judge,
        lambda node, reason: ReplyOutcome(node, state.labels.get(node, f"node-{node}"), False, reason),
        deadline_s, deadline_reason(deadline_s),
    )  # fmt: skip


def floating_shapes_of(view: TensorView) -> dict[str, tuple[int, ...]]:
    """The floating tensors' shapes of a store view, from its manifest (no tensor is read)."""
    return {n: shape for n, shape in view.shapes.items() if view.dtypes[n].is_floating_point}


@dataclass
class Federation:
    """Runs rounds against one store; ``evaluate`` scores full weights (server-side evaluation)."""

    grid: Grid
    cfg: RunConfig
    store: ModelStore
    evaluate: Evaluator | None = None
    on_round: Callable[[RoundReport], None] | None = None
    holders: dict[str, set[int]] = field(default_factory=dict)
    updates: dict[str, DownlinkUpdate] = field(default_factory=dict)  # version id → how to reach it
    server_residual: StateDict | None = None  # what the compressed downlink has not sent yet
    latest_weights: tuple[str, StateDict] | None = None  # (version id, θ) of the last commit
    bulk: BulkEndpoint | None = None  # large payloads (bulk-address); started by run() when configured
    labels: dict[int, str] = field(default_factory=dict)  # node id → the client id its replies state
    offered: set[int] = field(default_factory=set)  # nodes named a base by digest (downlink-base-at-nodes)
    digests: dict[str, str] = field(default_factory=dict)  # root version id → its weights digest
    _warm: bool = field(default=False, init=False)

    def weights_of(self, base: Version) -> StateDict:
        """θ of ``base``: kept from this server's last commit, else materialised from the store (which
        reads the whole chain of deltas, a cost that grows with the number of rounds)."""
        if self.latest_weights is not None and self.latest_weights[0] == base.id:
            return self.latest_weights[1]
        return self.store.materialize(base)

    def announcements(
        self, sampled: list[int], base: Version, weights: Mapping[str, torch.Tensor]
    ) -> dict[int, str] | None:
        """With ``downlink-base-at-nodes`` and ``base`` the store's root (a version without parents: the
        checkpoint the store was initialised from, which the nodes hold): node → its weights digest for
        the sampled nodes never named a base by digest in this run (each node is, once: one that then
        replied ``MissingBase`` gets the weights from its next message on). None otherwise: a version
        the federation made reaches a node as an update of the one it holds, or as weights."""
        if not self.cfg.downlink.base_at_nodes or base.parents:
            return None
        fresh = [node for node in sampled if node not in self.offered]
        if not fresh:
            return {}
        self.offered.update(fresh)
        if base.id not in self.digests:  # read once per run: the root's weights do not change
            self.digests[base.id] = weights_digest(weights)
        return dict.fromkeys(fresh, self.digests[base.id])

    def warm_up(self) -> None:
        """Load and compile the merge's code (the aggregator's numba kernels, serial and parallel, dense
        and sparse folds) with one tiny merge, so that a round's memory and time are its data's. Done
        once per process by :meth:`run`; a caller may do it earlier (e.g. before it measures a round)."""
        if self._warm:
            return
        sizes = {"warm-up.small": (64,), "warm-up.large": (PARALLEL_MIN_ELEMENTS,)}
        agg = create(self.cfg.aggregation.name, **aggregator_args(self.cfg, 0))
        agg.begin(sizes)
        gen = torch.Generator().manual_seed(0)
        for i in range(3):
            dense = {n: torch.randn(shape, generator=gen) * 1e-3 for n, shape in sizes.items()}
            delta: dict[str, Any] = dense
            if i == 2:  # a sparse client too
                delta = {n: SparseTensor.from_dense(t * (t.abs() > 2e-3)) for n, t in dense.items()}
            side: dict[str, Any] = {
                k: {n: t.abs() for n, t in dense.items()}
                for k in get_aggregator(self.cfg.aggregation.name).side_inputs
            }
            agg.add(delta, 1.0, client_id=f"warm-up-{i}", **side)
        agg.finalize()
        self._warm = True

    def run(self) -> list[RoundReport]:
        """``num-rounds`` rounds from the store's latest version; raises RoundAborted when one fails."""
        self.warm_up()
        first = start_round(self.store.get("latest"))
        with contextlib.ExitStack() as stack:
            if self.bulk is None and self.cfg.bulk.address:
                self.bulk = stack.enter_context(bulk_endpoint_for(self.cfg, self.store))
                stack.callback(setattr, self, "bulk", None)
            if self.bulk is not None:
                dropped = self.bulk.discard_except(first)
                if dropped:
                    log.info("discarded the spools of an earlier run: %s", dropped)
            return self._run_rounds(first)

    def evaluate_federated(self, report: RoundReport) -> EvaluationReport:
        """Send the version ``report`` committed to a sample of nodes as ``evaluate`` messages and record
        their aggregated metrics with it (:mod:`.evaluation`); bad replies are dropped."""
        version = self.store.get(str(report.version_id))
        labels = {o.node_id: o.client_id for o in report.outcomes if o.accepted}
        weights = self.weights_of(version)
        return run_evaluation(self.grid, self.cfg, self.store, report.round, version, weights, labels)

    def _run_rounds(self, first: int) -> list[RoundReport]:
        reports = []
        for round_ in range(first, first + self.cfg.num_rounds):
            for attempt in range(self.cfg.rounds.max_retries + 1):
                report = self.run_round(round_, attempt)
                reports.append(report)
                if report.version_id is not None and evaluation_due(self.cfg, round_):
                    report.evaluation = self.evaluate_federated(report)
                if self.on_round is not None:
                    self.on_round(report)
                if report.version_id is not None:
                    break
            else:
                raise RoundAborted(
                    f"round {round_}: fewer than min-valid={self.cfg.rounds.min_valid} valid replies in "
                    f"{self.cfg.rounds.max_retries + 1} attempt(s); nothing committed. Reasons: "
                    + "; ".join(f"{o.client_id}: {o.reason}" for o in reports[-1].rejected)
                )
        return reports

    def run_round(self, round_: int, attempt: int = 0) -> RoundReport:
        """One round attempt: sample, push, judge replies as they arrive, merge, commit a version.

        With a bulk endpoint and nothing that needs the whole merged delta in memory
        (:func:`~.spool_merge.spool_fold_blocker`), the base weights are a store view and
        the merge runs tensor-major from the spool (:mod:`.spool_merge`); otherwise each
        accepted reply is folded as it is judged."""
        t0 = time.perf_counter()
        base = self.store.get("latest")
        blocker = spool_fold_blocker(self.cfg, self.evaluate is not None)
        tensor_major = self.bulk is not None and blocker is None
        weights: Mapping[str, torch.Tensor] = (
            self.store.weights_view(base) if tensor_major else self.weights_of(base)
        )
        report = RoundReport(round_, attempt, base.id, [])
        nodes = wait_for_nodes(self.grid, self.cfg.rounds.min_clients, self.cfg.rounds.wait_for_nodes_s)
        if len(nodes) < self.cfg.rounds.min_valid:
            log.warning("round %d: only %d nodes connected (< min-valid)", round_, len(nodes))
            report.wall_s = time.perf_counter() - t0
            return report
        sampled = sample_nodes(nodes, self.cfg, round_, attempt)
        holders = self.holders.setdefault(base.id, set())
        update = self.updates.get(base.id)
        parent_holders = self.holders.get(update.parent_id, set()) if update else set()
        bulk = self.bulk
        if bulk is not None:
            bulk.open_round(round_, attempt)
        messages, report.downlink_bytes = build_messages(
            sampled, self.cfg, round_, base, weights, holders, update, parent_holders,
            node_settings=None if bulk is None else lambda node: bulk.settings_for(round_, attempt, node),
            announce=self.announcements(sampled, base, weights),
        )  # fmt: skip
        shapes = floating_shapes_of(weights) if isinstance(weights, TensorView) else None
        state = RoundState(self.cfg, round_, base, weights, shapes=shapes, fold=not tensor_major)
        state.reference = reference_for(self.store, base, lazy=tensor_major)
        state.labels = self.labels  # client ids stated in earlier replies name the nodes
        state.bulk, state.attempt = bulk, attempt
        state.verify_uploads_as_they_arrive()  # tensor-major: each upload checked as it completes
        try:
            report.outcomes = collect(self.grid, messages, sampled, state, self.cfg.rounds.round_deadline_s)
            # only fedmerge clients cache the base: a plain Flower client gets "arrays" in every round
            holders.update(o.node_id for o in report.outcomes if o.accepted and o.fedmerge_client)
            # what a refused node holds is unknown (e.g. it could not apply the downlink update: it
            # reported MissingBase or UpdateMismatch): it is sent full weights until it replies again
            refused = {o.node_id for o in report.outcomes if not o.accepted}
            for nodes_holding in self.holders.values():
                nodes_holding -= refused
            report.metrics = round_metrics(report)
            collected = time.perf_counter()
            commit_round(self, state, report, base, cohort=len(sampled), connected=len(nodes))
            report.merge_s = time.perf_counter() - collected
        finally:
            for held in state.held:
                held.close()
        if bulk is not None:  # committed or abandoned: the spool is reclaimed either way
            bulk.close_round(round_, attempt)
        report.wall_s = time.perf_counter() - t0
        return report
