"""Prometheus metrics of federated evaluation: a round report's evaluation travels in the round event
(through its JSON line, as from a ServerApp to ``fedmerge serve``'s endpoint) into counters of
accepted/dropped evaluate replies, the evaluate downlink, and one gauge per aggregated metric (a
bounded set of names)."""

from __future__ import annotations

from fedmerge.flower.server.commit import RoundReport
from fedmerge.flower.server.evaluation import EvaluationReport
from fedmerge.flower.server.judge import ReplyOutcome
from fedmerge.metrics import MAX_EVALUATE_METRICS, FedmergeMetrics, RoundEvent
from fedmerge.store.evaluations import NodeEvaluation


def _report(round_: int, metrics: dict[str, float], dropped: int = 1) -> RoundReport:
    nodes = [NodeEvaluation("a", 10, True, None, metrics), NodeEvaluation("b", 30, True, None, metrics)]
    nodes += [NodeEvaluation(f"x{i}", 0, False, "InvalidEvaluateReply: no metric") for i in range(dropped)]
    ev = EvaluationReport(round_, f"v{round_:06d}", nodes, dict(metrics), 40, downlink_bytes=1000)
    outcomes = [ReplyOutcome(1, "a", True, num_examples=10), ReplyOutcome(2, "b", True, num_examples=30)]
    return RoundReport(round_, 0, "v000001", outcomes, version_id=f"v{round_:06d}", evaluation=ev)


def _sample(m: FedmergeMetrics, name: str, **labels: str) -> float | None:
    return m.registry.get_sample_value(name, labels)


def test_the_evaluation_of_a_round_is_exported() -> None:
    event = RoundEvent.from_json(RoundEvent.from_report(_report(3, {"loss": 0.5, "accuracy": 0.8})).to_json())
    assert (event.evaluate_accepted, event.evaluate_dropped) == (2, 1)
    assert event.evaluate_metrics == {"loss": 0.5, "accuracy": 0.8}
    m = FedmergeMetrics()
    m.observe_round(event)
    assert _sample(m, "fedmerge_evaluate_replies_total", outcome="accepted") == 2
    assert _sample(m, "fedmerge_evaluate_replies_total", outcome="dropped") == 1
    assert _sample(m, "fedmerge_evaluate_metric", metric="loss") == 0.5
    assert _sample(m, "fedmerge_evaluate_metric", metric="accuracy") == 0.8
    assert _sample(m, "fedmerge_last_evaluated_round") == 3
    assert _sample(m, "fedmerge_downlink_bytes_total") == 1000  # the evaluate messages' weights
    m.observe_round(RoundEvent.from_report(_report(4, {"loss": 0.25}, dropped=0)))
    assert _sample(m, "fedmerge_evaluate_metric", metric="loss") == 0.25
    assert _sample(m, "fedmerge_evaluate_replies_total", outcome="accepted") == 4


def test_a_round_without_evaluation_changes_no_evaluate_metric() -> None:
    report = _report(2, {"loss": 0.5})
    report.evaluation = None
    m = FedmergeMetrics()
    m.observe_round(RoundEvent.from_report(report))
    assert _sample(m, "fedmerge_evaluate_replies_total", outcome="accepted") == 0
    assert _sample(m, "fedmerge_last_evaluated_round") == 0
    assert _sample(m, "fedmerge_evaluate_metric", metric="loss") is None


def test_metric_names_chosen_by_clients_are_a_bounded_label_set() -> None:
    m = FedmergeMetrics()
    names = {f"m{i:02d}": float(i) for i in range(MAX_EVALUATE_METRICS + 5)}
    m.observe_round(RoundEvent.from_report(_report(1, names)))
    exported = [n for n in names if _sample(m, "fedmerge_evaluate_metric", metric=n) is not None]
    assert exported == sorted(names)[:MAX_EVALUATE_METRICS]
