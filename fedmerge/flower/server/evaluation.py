"""Federated evaluation as Flower's strategies do it: ``evaluate`` messages after a committed round.

After every ``evaluate-every``-th committed round r (when ``fraction-evaluate`` > 0), the ServerApp
sends the new version's full weights to a sample of the connected nodes, in the wire convention of
Flower's ``flwr.serverapp.strategy.FedAvg.configure_evaluate``:

* ``message_type = "evaluate"``; content ``"arrays"`` (the weights, every bf16 tensor widened to
  float32 and named in ConfigRecord ``"fedmerge.dtypes"``: :func:`fedmerge.flower.records.widen_for_numpy`)
  and ``"config"`` (``server-round`` plus fedmerge's task settings, which a plain client ignores);
* sample size ``k = min(N, max(⌊fraction-evaluate · N⌋, min-evaluate-nodes))`` of the N connected
  nodes (Flower's rule), drawn with a generator seeded from (seed, "evaluate", r).

Each reply's ``"metrics"`` MetricRecord must hold ``num-examples`` (a whole number in
[1, max-num-examples]) and at least one other metric, every value a finite number (or a list of
finite numbers); otherwise that reply is dropped with one reason (:func:`judge_evaluate_reply`), and
the evaluation and the run go on. The accepted replies are aggregated like Flower's
``aggregate_metricrecords``: each scalar metric m is the weighted mean
``Σ_i n_i · m_i / Σ_i n_i`` over the replies reporting m (Flower divides by the total weight of all
replies, which biases a metric that only some nodes report; here each metric is the mean over its
own reporters, the same when all report it). List-valued metrics are kept per node, not aggregated.

The evaluation runs after the round's commit, so it cannot be part of that immutable version: its
result is recorded beside it (:mod:`fedmerge.store.evaluations`) and attached to the round's report
(Prometheus, the run's events, the log). Evaluating never changes a version.
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import MessageType
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid

from fedmerge.flower.config import RunConfig
from fedmerge.flower.records import (
    ARRAYS_RECORD,
    CONFIG_RECORD,
    DTYPES_RECORD,
    METRICS_RECORD,
    widen_for_numpy,
)
from fedmerge.flower.server.exchange import exchange
from fedmerge.flower.server.judge import whole_num_examples
from fedmerge.store import ModelStore, Version
from fedmerge.store.evaluations import Evaluation, NodeEvaluation, NodeOutcomes, record_evaluation

log = logging.getLogger("fedmerge.evaluation")

EVALUATE = MessageType.EVALUATE
MAX_REASON = 400
EXPIRED_CODES = frozenset({ErrorCode.MESSAGE_UNAVAILABLE, ErrorCode.REPLY_MESSAGE_UNAVAILABLE})


def evaluation_due(cfg: RunConfig, round_: int) -> bool:
    """True when round ``round_`` is followed by a federated evaluation."""
    return cfg.evaluation.fraction_evaluate > 0.0 and round_ % cfg.evaluation.evaluate_every == 0


def sample_evaluate_nodes(node_ids: Iterable[int], cfg: RunConfig, round_: int) -> list[int]:
    """``min(N, max(⌊fraction-evaluate·N⌋, min-evaluate-nodes))`` nodes, seeded by (seed, round)."""
    nodes = sorted(node_ids)
    k = min(
        len(nodes), max(int(cfg.evaluation.fraction_evaluate * len(nodes)), cfg.evaluation.min_evaluate_nodes)
    )
    rng = random.Random(hashlib.sha256(f"{cfg.seed}/evaluate/{round_}".encode()).digest())
    return sorted(rng.sample(nodes, k))


def evaluate_config(cfg: RunConfig, round_: int, version: Version) -> ConfigRecord:
    """The ``"config"`` of an evaluate message: Flower's ``server-round`` and the settings fedmerge's
    ClientApp needs to find the node's data and task (a plain client ignores them)."""
    return ConfigRecord(
        {
            "server-round": round_,
            "round": round_,
            "task": cfg.task,
            "seed": cfg.seed,
            "partitioner": cfg.partitioner,
            "dirichlet-alpha": cfg.dirichlet_alpha,
            "batch-size": cfg.batch_size,
            "device": cfg.training.client_device,
            "version-id": version.id,
            "version-hash": version.content_hash,
        }
    )


def build_evaluate_messages(
    nodes: list[int],
    cfg: RunConfig,
    round_: int,
    version: Version,
    weights: Mapping[str, torch.Tensor],
) -> tuple[list[Message], int]:
    """One ``evaluate`` message per node (the weights built once); returns (messages, bytes sent)."""
    wide, dtypes = widen_for_numpy(dict(weights.items()))
    arrays = ArrayRecord(wide)
    size = sum(t.numel() * t.element_size() for t in wide.values())
    config = evaluate_config(cfg, round_, version)
    messages = []
    for node in nodes:
        content = RecordDict({ARRAYS_RECORD: arrays, CONFIG_RECORD: config})
        if dtypes:
            content[DTYPES_RECORD] = ConfigRecord(dict(dtypes))
        messages.append(
            Message(
                content,
                dst_node_id=node,
                message_type=EVALUATE,
                group_id=f"evaluate-{round_}",
                ttl=cfg.rounds.round_deadline_s,
            )
        )
    return messages, size * len(nodes)


class InvalidEvaluateReply(ValueError):
    """An evaluate reply whose metrics cannot be aggregated (the message says why)."""


def _reason_of_error(reply: Message, deadline_s: float) -> str:
    err = reply.error
    if err.code in EXPIRED_CODES:
        return f"timeout: no evaluate reply within round-deadline-s={deadline_s:g}"
    text = " ".join(str(err.reason or "").split())
    if len(text) > MAX_REASON:  # keep the head (what went wrong) and the tail (where)
        text = text[: MAX_REASON // 2] + " … " + text[-MAX_REASON // 2 :]
    return f"client failed (code {err.code}): {text}"


def _num_examples(value: Any, max_examples: int) -> int:
    n = whole_num_examples(
        value,
        InvalidEvaluateReply,
        missing=f"'num-examples' is missing from MetricRecord {METRICS_RECORD!r}; report how many examples "
        "were evaluated",
    )
    if not 1 <= n <= max_examples:
        raise InvalidEvaluateReply(f"num-examples={n} is outside [1, max-num-examples={max_examples}]")
    return n


def reply_metrics(
    content: RecordDict, max_examples: int
) -> tuple[int, dict[str, float], dict[str, list[float]]]:
    """(num-examples, scalar metrics, list metrics) of an evaluate reply, or :class:`InvalidEvaluateReply`.

    The metrics are the MetricRecord ``"metrics"`` (or, as Flower's aggregation reads it, the reply's
    only MetricRecord)."""
    record: Any = content.get(METRICS_RECORD) if METRICS_RECORD in content else None
    if record is None and len(content.metric_records) == 1:
        record = next(iter(content.metric_records.values()))
    if record is None:
        raise InvalidEvaluateReply(
            f"reply has no MetricRecord {METRICS_RECORD!r} (records: {sorted(content)}); an evaluate reply "
            "carries its metrics and num-examples there"
        )
    if not isinstance(record, MetricRecord):
        raise InvalidEvaluateReply(
            f"{METRICS_RECORD!r} is a {type(record).__name__}, not a MetricRecord of numbers"
        )
    n = _num_examples(record.get("num-examples"), max_examples)
    scalars: dict[str, float] = {}
    lists: dict[str, list[float]] = {}
    for key, value in record.items():
        if key == "num-examples":
            continue
        values = value if isinstance(value, list) else [value]
        for v in values:
            if isinstance(v, bool) or not isinstance(v, int | float):
                raise InvalidEvaluateReply(
                    f"metric {key!r} is {type(v).__name__} {str(v)[:40]!r}, not a number"
                )
            if not math.isfinite(v):
                raise InvalidEvaluateReply(f"metric {key!r} is {v!r}, not a finite number")
        if isinstance(value, list):
            lists[str(key)] = [float(v) for v in value]
        else:
            scalars[str(key)] = float(value)
    if not scalars and not lists:
        raise InvalidEvaluateReply("reply reports num-examples but no metric (e.g. loss, accuracy)")
    return n, scalars, lists


def judge_evaluate_reply(
    node_id: int, reply: Message, cfg: RunConfig, label: str | None = None
) -> NodeEvaluation:
    """Accept or drop one evaluate reply; never raises (every problem is the node's recorded reason)."""
    client_id = label or f"node-{node_id}"
    if reply.has_error():
        return NodeEvaluation(client_id, 0, False, _reason_of_error(reply, cfg.rounds.round_deadline_s))
    try:
        n, scalars, _ = reply_metrics(reply.content, cfg.rounds.max_num_examples)
    except InvalidEvaluateReply as exc:
        return NodeEvaluation(client_id, 0, False, f"InvalidEvaluateReply: {exc}")
    except Exception as exc:  # a reply must never crash the run
        text = " ".join(f"{type(exc).__name__}: {exc}".split())[:MAX_REASON]
        return NodeEvaluation(client_id, 0, False, f"InvalidEvaluateReply: reply could not be read ({text})")
    return NodeEvaluation(client_id, n, True, None, scalars)


def aggregate_evaluate(nodes: Iterable[NodeEvaluation]) -> tuple[dict[str, float], int]:
    """(per-metric weighted means over the accepted nodes reporting each metric, total examples)."""
    accepted = [n for n in nodes if n.accepted]
    sums: dict[str, float] = {}
    weights: dict[str, int] = {}
    for node in accepted:
        for key, value in node.metrics.items():
            sums[key] = sums.get(key, 0.0) + node.num_examples * value
            weights[key] = weights.get(key, 0) + node.num_examples
    means = {k: sums[k] / weights[k] for k in sorted(sums)}
    return {k: v for k, v in means.items() if math.isfinite(v)}, sum(n.num_examples for n in accepted)


@dataclass
class EvaluationReport(NodeOutcomes):
    """One federated evaluation: the version evaluated, each sampled node's outcome, the aggregate."""

    round: int
    version_id: str
    nodes: list[NodeEvaluation] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    num_examples: int = 0
    downlink_bytes: int = 0
    wall_s: float = 0.0
    recorded: bool = False

    def as_evaluation(self) -> Evaluation:
        return Evaluation(
            self.version_id, self.round, dict(self.metrics), self.num_examples, list(self.nodes)
        )


def collect_evaluate(
    grid: Grid,
    messages: list[Message],
    nodes: list[int],
    judge: Callable[[int, Message], NodeEvaluation],
    deadline_s: float,
    labels: Mapping[int, str],
) -> list[NodeEvaluation]:
    """Push, then pull replies as they arrive and judge each, until all came or the deadline passed."""
    outcomes = exchange(
        grid, messages, nodes, judge,
        lambda node, reason: NodeEvaluation(labels.get(node, f"node-{node}"), 0, False, reason),
        deadline_s, f"timeout: no evaluate reply within round-deadline-s={deadline_s:g}",
    )  # fmt: skip
    return sorted(outcomes, key=lambda o: o.client_id)


def run_evaluation(
    grid: Grid,
    cfg: RunConfig,
    store: ModelStore,
    round_: int,
    version: Version,
    weights: Mapping[str, torch.Tensor],
    labels: Mapping[int, str] | None = None,
) -> EvaluationReport:
    """Evaluate ``version`` (whose ``weights`` these are) on a sample of the connected nodes, aggregate
    the accepted replies and record the result with the version. ``labels`` names nodes (node id →
    client id, e.g. from the round's replies). Bad replies are dropped with their reason; a failure to
    record is logged: the run goes on either way."""
    t0 = time.perf_counter()
    names = dict(labels or {})
    report = EvaluationReport(round_, version.id)
    nodes = list(grid.get_node_ids())
    sampled = sample_evaluate_nodes(nodes, cfg, round_)
    if not sampled:
        log.warning("round %d: no node connected; federated evaluation skipped", round_)
        return report
    messages, report.downlink_bytes = build_evaluate_messages(sampled, cfg, round_, version, weights)

    def judge(node: int, reply: Message) -> NodeEvaluation:
        return judge_evaluate_reply(node, reply, cfg, names.get(node))

    report.nodes = collect_evaluate(grid, messages, sampled, judge, cfg.rounds.round_deadline_s, names)
    report.metrics, report.num_examples = aggregate_evaluate(report.nodes)
    for node in report.dropped:
        log.warning("round %d: evaluate reply of %s dropped: %s", round_, node.client_id, node.reason)
    log.info(
        "round %d: federated evaluation of %s: %s over %d examples (%d nodes accepted, %d dropped)",
        round_, version.id, report.metrics, report.num_examples, len(report.accepted), len(report.dropped),
    )  # fmt: skip
    if report.accepted:
        try:
            record_evaluation(store, report.as_evaluation())
            report.recorded = True
        except Exception as exc:  # the evaluation is an observation: losing it must not stop the run
            log.warning("round %d: federated evaluation of %s not recorded: %s", round_, version.id, exc)
    else:
        log.warning("round %d: no valid evaluate reply; nothing recorded for %s", round_, version.id)
    report.wall_s = time.perf_counter() - t0
    return report
