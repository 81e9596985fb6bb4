"""Committing a round: the merge of its accepted replies, checked finite, as one new version.

With at least ``min-valid`` accepted replies (:func:`commit_round`):

- **tensor-major** (the replies were held, not folded: a bulk endpoint and nothing that needs the
  whole merged delta, :func:`~.spool_merge.spool_fold_blocker`): the merge runs tensor by tensor
  straight into :meth:`~fedmerge.store.ModelStore.commit_stream` (:func:`~.spool_merge.merge_tensor_major`,
  each tensor checked finite as it is merged). If a tensor's merge is not finite the staged commit is
  dropped and the accepted replies are judged again into an in-memory fold (:func:`refold`), where
  the offenders are found;
- **in memory** (the replies were folded as they were judged): the fold is finalized and checked
  finite (:func:`finite_merge`: the offending contributions, not the round, are rejected), privatised
  (central DP), stepped by the server optimiser, optionally compressed for the downlink and scored by
  the server's evaluator, then handed to the same streamed commit (its merged tensors the stream,
  the downlink's residual and the server optimiser's state saved with the version).

Either way the version's parents are [v], its method and exact params, one Contributor per sampled
node (accepted or rejected with its reason), round r and the round's metrics; ``latest`` is re-read
just before the commit and the commit is refused if it moved (:class:`ConcurrentCommit`), so no round
is committed twice.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import torch

from fedmerge.aggregators.server_optimizer import round_step, without_optimizer_state
from fedmerge.codec import PackageMeta
from fedmerge.delta.rules import NonFiniteMerge, first_nonfinite
from fedmerge.delta.state_dict import StateDict
from fedmerge.errors import FedMergeError
from fedmerge.flower.config import RunConfig
from fedmerge.flower.downlink import apply_weights, compress_update, weights_digest
from fedmerge.flower.server.evaluation import EvaluationReport
from fedmerge.flower.server.judge import ReplyOutcome, RoundState
from fedmerge.flower.server.safeguards import anomaly_metadata, prior_accountant, privatize_round
from fedmerge.flower.server.spool_merge import merge_tensor_major
from fedmerge.store import Contributor, ModelStore, Version

log = logging.getLogger("fedmerge.rounds")

Evaluator = Callable[[StateDict], dict[str, float]]


class ConcurrentCommit(FedMergeError, RuntimeError):
    """``latest`` moved while the round ran (another server committed): this round's merge is dropped."""


def check_latest_unmoved(store: ModelStore, base: Version, round_: int) -> None:
    """Raise :class:`ConcurrentCommit` unless ``latest`` is still ``base`` (checked just before a commit)."""
    latest = store.resolve("latest")
    if latest != base.id:
        raise ConcurrentCommit(
            f"round {round_}: latest moved from {base.id} to {latest} while the round ran; "
            "restart the server to resume from the new latest"
        )


@dataclass
class RoundReport:
    """A round's result; ``version_id`` is None when nothing was committed."""

    round: int
    attempt: int
    base_version_id: str
    outcomes: list[ReplyOutcome]
    version_id: str | None = None
    downlink_bytes: int = 0
    wall_s: float = 0.0
    merge_s: float = 0.0  # from the last reply judged (or the deadline) to the version committed
    metrics: dict[str, float] = field(default_factory=dict)
    evaluation: EvaluationReport | None = None  # the federated evaluation of the committed version

    @property
    def accepted(self) -> list[ReplyOutcome]:
        return [o for o in self.outcomes if o.accepted]

    @property
    def rejected(self) -> list[ReplyOutcome]:
        return [o for o in self.outcomes if not o.accepted]

    @property
    def uplink_bytes(self) -> int:
        return sum(o.wire_bytes for o in self.outcomes)

    @property
    def uplink_dense_bytes(self) -> int:
        return sum(o.dense_bytes for o in self.outcomes if o.wire_bytes)


@dataclass(frozen=True)
class DownlinkUpdate:
    """How nodes holding ``parent`` reach the new version: a codec package and the expected digest."""

    parent_id: str
    package: bytes
    digest: str


class CommitContext(Protocol):
    """What a commit reads and updates of the run (:class:`~.federation.Federation` is one)."""

    cfg: RunConfig
    store: ModelStore
    evaluate: Evaluator | None
    updates: dict[str, DownlinkUpdate]  # version id → how nodes holding its parent reach it
    server_residual: StateDict | None  # what the compressed downlink has not sent yet
    latest_weights: tuple[str, StateDict] | None  # (version id, θ) of the last commit

    def weights_of(self, base: Version) -> StateDict: ...


def commit_round(
    run: CommitContext, state: RoundState, report: RoundReport, base: Version, *, cohort: int, connected: int
) -> None:
    """Merge the round's accepted replies and commit them as a version (module docstring); sets
    ``report.version_id``, or leaves it None (and says why) with fewer than ``min-valid`` usable
    replies. ``cohort``: the nodes sampled, ``connected``: the nodes connected (DP accounting)."""
    cfg = run.cfg
    if not state.fold and len(report.accepted) >= cfg.rounds.min_valid:
        try:
            report.version_id = _commit_streamed(run, base, state, report)
        except NonFiniteMerge as exc:  # find the offenders the in-memory way
            log.warning("round %d: %s; merging in memory to find the offending replies", report.round, exc)
            state = refold(state, run.weights_of(base))
    if state.fold:
        _commit_in_memory(run, state, report, base, cohort, connected)
    elif report.version_id is None:
        _nothing_committed(report, cfg)


def _nothing_committed(report: RoundReport, cfg: RunConfig) -> None:
    log.warning(
        "round %d attempt %d: %d valid replies < min-valid=%d; nothing committed",
        report.round, report.attempt, len(report.accepted), cfg.rounds.min_valid,
    )  # fmt: skip


def _commit_in_memory(
    run: CommitContext, state: RoundState, report: RoundReport, base: Version, cohort: int, connected: int
) -> None:
    """Finalize the folded merge (checked finite), privatise, step the server optimiser, commit."""
    cfg, store = run.cfg, run.store
    weights = state.base_weights
    assert isinstance(weights, dict), "the in-memory merge runs on materialised weights"
    state, finalized = finite_merge(state, report)
    if finalized is None or len(report.accepted) < cfg.rounds.min_valid:
        _nothing_committed(report, cfg)
        return
    merged, state.privacy = privatize_round(
        finalized, cfg, prior_accountant(store, base),
        cohort=cohort, connected=connected, accepted=len(report.accepted),
        round_=report.round, attempt=report.attempt,
    )  # fmt: skip
    opt = cfg.server_opt.create()  # a server optimiser's step; its state is kept with the version
    merged, opt_state = round_step(opt, store.load_state(base) if opt.enabled else None, merged)
    package = None
    if cfg.downlink.compressed:  # commit what clients will rebuild; keep the rest as residual
        if run.server_residual is None:
            run.server_residual = without_optimizer_state(store.load_state(base))
        codec = cfg.downlink.config()
        meta = PackageMeta("server", report.round, base.id, base.content_hash)
        package, merged, run.server_residual = compress_update(merged, run.server_residual, codec, meta)
    if run.evaluate is not None:
        # θ + τ summed in (at least) fp32 and cast once to the base's dtype, as the store materialises
        new = dict(weights)
        for k in merged:
            t = weights[k]
            new[k] = (t.to(torch.promote_types(t.dtype, torch.float32)) + merged[k]).to(t.dtype)
        report.metrics.update({f"server-{k}": float(v) for k, v in run.evaluate(new).items()})
    version = _commit(
        run, base, state, report, merged,
        params=version_params(cfg, state, opt_state or {}),
        kept={
            **(run.server_residual if package is not None and run.server_residual else {}),
            **(opt_state or {}),
        },
    )  # fmt: skip
    new_weights = apply_weights(weights, merged)
    if package is not None:
        run.updates[version.id] = DownlinkUpdate(base.id, package, weights_digest(new_weights))
    # θ_base + τ in fp32 is what the store materialises for fp32 weights, bit for bit; other
    # dtypes are summed over the whole chain before one cast there, so they are re-read instead
    fp32 = all(t.dtype == torch.float32 for t in weights.values() if t.is_floating_point())
    run.latest_weights = (version.id, new_weights) if fp32 else None
    report.version_id = version.id


def _commit_streamed(run: CommitContext, base: Version, state: RoundState, report: RoundReport) -> str:
    """Merge the held replies tensor by tensor straight into the streamed commit (spool_merge)."""
    merged = merge_tensor_major(run.cfg, report.round, state.shapes, state.held)
    version = _commit(run, base, state, report, merged, params=version_params(run.cfg, state, {}), kept={})
    run.latest_weights = None  # θ was never in memory: the next round reads it from the store
    return version.id


def _commit(
    run: CommitContext,
    base: Version,
    state: RoundState,
    report: RoundReport,
    merged: Iterable[tuple[str, torch.Tensor]] | StateDict,
    *,
    params: dict[str, Any],
    kept: StateDict,
) -> Version:
    """The round's one commit: ``merged`` (a tensor-major stream, or the in-memory fold's merged
    tensors) streamed into :meth:`~fedmerge.store.ModelStore.commit_stream` on ``base`` once
    ``latest`` is checked unmoved, with ``kept`` (the downlink's residual and the server optimiser's
    state, if any) saved with the version."""
    check_latest_unmoved(run.store, base, report.round)
    return run.store.commit_stream(
        merged,
        parents=[base.id],
        method=run.cfg.aggregation.name,
        params=params,
        contributors=contributors_of(report),
        round=report.round,
        metrics=report.metrics,
        privacy=state.privacy,
        state=kept or None,
        metadata=version_metadata(run.cfg, state, report),
    )


def version_params(
    cfg: RunConfig, state: RoundState, opt_state: Mapping[str, torch.Tensor]
) -> dict[str, Any]:
    """The version's exact params: the aggregator's, the codec, the mode and the merge order."""
    c = cfg.codec.config()
    codec = {
        "sparsify": c.sparsify,
        "density": c.density,
        "values": c.values,
        "error_feedback": c.error_feedback,
    }
    return {
        **state.aggregator.params,
        "codec": codec,
        "mode": cfg.training.mode,
        "merge-order": "in-memory" if state.fold else "tensor-major",
        **({"server-optimizer": cfg.server_opt.create().params()} if opt_state else {}),
    }


def version_metadata(cfg: RunConfig, state: RoundState, report: RoundReport) -> dict[str, Any]:
    """The version's metadata: attempt, task, the clients' own metrics and the anomaly scores."""
    return {
        "attempt": report.attempt,
        "task": cfg.task,
        **client_metrics_metadata(report, cfg),
        **anomaly_metadata(state.scores, state.reference, cfg),
    }


def contributors_of(report: RoundReport) -> list[Contributor]:
    """Every judged reply of the round as a manifest contributor, sorted by client id."""
    return [o.contributor() for o in sorted(report.outcomes, key=lambda o: o.client_id)]


def refold(state: RoundState, weights: StateDict) -> RoundState:
    """A fresh in-memory state (``fold=True``, materialised ``weights``) with the accepted replies of
    ``state`` judged again into it; ``state``'s held replies are closed."""
    for held in state.held:
        held.close()
    new = state.fresh(weights)
    for node, reply in state.accepted_replies:
        new.judge(node, reply)
    return new


def client_metrics_metadata(report: RoundReport, cfg: RunConfig) -> dict[str, Any]:
    """``client-metrics``: each accepted client's own finite metrics (as it reported them, e.g. a plain
    Flower client's ``train_loss``), kept whatever names other clients use. Withheld under central DP
    (per-client values are not covered by the DP release)."""
    if cfg.dp.config() is not None and cfg.dp.mode == "central":
        return {}
    return {"client-metrics": {o.client_id: dict(sorted(o.metrics.items())) for o in report.accepted}}


def _finalize(state: RoundState) -> tuple[StateDict | None, str | None]:
    """(merged, None) when the fold is sound and finite, else (None, why)."""
    if state.tainted:
        return None, "an aggregator step failed part-way"
    try:
        merged = state.aggregator.finalize()
    except FedMergeError as exc:
        return None, f"{type(exc).__name__}: {exc}"
    bad = first_nonfinite(merged)
    return (merged, None) if bad is None else (None, f"tensor {bad!r} of the merge is NaN or infinite")


def finite_merge(state: RoundState, report: RoundReport) -> tuple[RoundState, StateDict | None]:
    """The round's merge, checked finite before anything is committed; the offending contributions,
    not the round, are rejected.

    With fewer than ``min-valid`` accepted replies nothing is finalized: (state, None). When the fold
    is finite: (state, merged). Otherwise each accepted reply is merged alone; a reply whose solo merge
    is rejected, fails or is non-finite is an offender, recorded in ``report.outcomes`` as rejected
    (:class:`NonFiniteMerge`), and the others are folded again into a fresh state, returned with its
    merge if that is finite. If it is still not (an overflow only the combination produces), every
    reply is recorded rejected and (state, None) is returned: nothing is committed.
    """
    if len(report.accepted) < state.cfg.rounds.min_valid:
        return state, None
    merged, why = _finalize(state)
    if merged is not None:
        return state, merged
    log.warning("round %d: the merge is not usable (%s); merging each reply alone", state.round, why)
    offenders: dict[int, str] = {}
    for node, reply in state.accepted_replies:
        solo = state.fresh()
        outcome = solo.judge(node, reply)
        if not outcome.accepted:
            offenders[node] = str(outcome.reason)
            continue
        if solo.tainted:
            offenders[node] = "its fold failed"
            continue
        try:
            alone = solo.aggregator.finalize()
        except FedMergeError:
            continue  # e.g. a robust aggregator that needs several clients: not attributable alone
        bad = first_nonfinite(alone)
        if bad is not None:
            offenders[node] = f"merging it makes tensor {bad!r} NaN or infinite"
    clean = state.fresh()
    for node, reply in state.accepted_replies:
        if node not in offenders:
            clean.judge(node, reply)
    merged, why = (
        _finalize(clean) if len(clean.accepted_replies) >= state.cfg.rounds.min_valid else (None, None)
    )
    if merged is None:
        offenders.update({n: f"the round's merge is not finite ({why or 'too few finite replies'})"
                          for n, _ in state.accepted_replies if n not in offenders})  # fmt: skip
    report.outcomes = [
        replace(o, accepted=False, reason=f"NonFiniteMerge: {offenders[o.node_id]}; left out of the merge")
        if o.accepted and o.node_id in offenders
        else o
        for o in report.outcomes
    ]
    report.metrics = round_metrics(report)
    return clean, merged


def round_metrics(report: RoundReport) -> dict[str, float]:
    """Weighted means of the accepted clients' metrics plus byte and count totals (all finite floats)."""
    acc = report.accepted
    total = sum(o.num_examples for o in acc)
    out: dict[str, float] = {
        "accepted": float(len(acc)),
        "rejected": float(len(report.rejected)),
        "uplink-bytes": float(report.uplink_bytes),
        "uplink-dense-bytes": float(report.uplink_dense_bytes),
        "downlink-bytes": float(report.downlink_bytes),
    }
    if total > 0:
        keys = set.intersection(*(set(o.metrics) for o in acc)) - {"num-examples"}
        for key in sorted(keys):
            value = sum(o.metrics[key] * o.num_examples for o in acc) / total
            if math.isfinite(value):
                out[f"clients-{key}"] = value
    return out
