"""Federated evaluation: ``evaluate`` messages after a committed round, their replies judged and
aggregated by ``num-examples`` as Flower's strategies do, the result recorded beside the version; and
fedmerge's ClientApp answering ``evaluate`` with the task's evaluation on the node's own data."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedmerge.errors import ConfigError
from fedmerge.flower.config import RunConfig, parse_run_config
from fedmerge.flower.records import DTYPES_RECORD
from fedmerge.flower.server.evaluation import (
    EVALUATE,
    aggregate_evaluate,
    build_evaluate_messages,
    evaluation_due,
    judge_evaluate_reply,
    sample_evaluate_nodes,
)
from fedmerge.flower.server.federation import Federation, ensure_base
from fedmerge.flower.settings import AggregationSettings, EvaluationSettings
from fedmerge.store import ModelStore, UnknownVersionError
from fedmerge.store.evaluations import Evaluation, NodeEvaluation, evaluations_of, record_evaluation
from fedmerge_clients.app import evaluate_reply, local_settings, train_reply
from fedmerge_clients.plain_app import evaluate as plain_evaluate
from fedmerge_clients.plain_app import train as plain_train
from fedmerge_simulations.secagg import InProcessGrid
from fedmerge_simulations.tasks import get_task

NO_PARAMS = AggregationSettings(params={})
CFG = RunConfig(evaluation=EvaluationSettings(fraction_evaluate=1.0), aggregation=NO_PARAMS)


@pytest.fixture(autouse=True)
def run_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """The run a ServerApp process belongs to (Flower's ``Message`` reads it when built)."""
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


def _reply(content: RecordDict) -> Message:
    request = Message(RecordDict(), dst_node_id=1, message_type=EVALUATE)
    return Message(content, reply_to=request)


def _metrics(**values: Any) -> RecordDict:
    return RecordDict({"metrics": MetricRecord(values)})


# ------------------------------------------------------------------------------- judging one reply


def test_a_valid_reply_is_accepted_with_its_metrics() -> None:
    out = judge_evaluate_reply(7, _reply(_metrics(loss=0.5, accuracy=0.75, **{"num-examples": 40})), CFG)
    assert out.accepted and out.num_examples == 40 and out.metrics == {"loss": 0.5, "accuracy": 0.75}
    assert out.client_id == "node-7"
    named = judge_evaluate_reply(7, _reply(_metrics(loss=0.5, **{"num-examples": 4})), CFG, "inst-a")
    assert named.client_id == "inst-a"


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (_metrics(loss=0.5, **{"num-examples": math.nan}), "num-examples=nan is not a whole finite"),
        (_metrics(loss=0.5, **{"num-examples": -3}), "num-examples=-3 is outside [1, max-num-examples"),
        (_metrics(loss=0.5, **{"num-examples": 0}), "num-examples=0 is outside"),
        (_metrics(loss=0.5, **{"num-examples": 2.5}), "num-examples=2.5 is not a whole"),
        (_metrics(loss=0.5), "'num-examples' is missing"),
        (_metrics(**{"num-examples": 10}), "no metric (e.g. loss, accuracy)"),
        (RecordDict(), "reply has no MetricRecord 'metrics'"),
        (RecordDict({"metrics": ConfigRecord({"loss": "low", "num-examples": 3})}), "is a ConfigRecord"),
        (_metrics(loss=math.inf, **{"num-examples": 10}), "metric 'loss' is inf, not a finite number"),
        (_metrics(curve=[0.1, math.nan], **{"num-examples": 10}), "metric 'curve' is nan"),
    ],
    ids=[
        "nan-n",
        "negative-n",
        "zero-n",
        "fractional-n",
        "no-n",
        "no-metric",
        "no-record",
        "wrong-type",
        "inf-metric",
        "nan-in-list",
    ],
)
def test_a_bad_reply_is_dropped_with_one_reason(content: RecordDict, reason: str) -> None:
    out = judge_evaluate_reply(3, _reply(content), CFG)
    assert not out.accepted and out.num_examples == 0
    assert out.reason is not None and out.reason.startswith("InvalidEvaluateReply: ") and reason in out.reason
    assert "\n" not in out.reason


def test_an_error_reply_keeps_the_head_of_its_reason() -> None:
    request = Message(RecordDict(), dst_node_id=1, message_type=EVALUATE)
    reason = "ValueError: the first line says what went wrong " + "x" * 2000 + " and the end says where"
    out = judge_evaluate_reply(3, Message(Error(code=2, reason=reason), reply_to=request), CFG)
    assert not out.accepted and out.reason is not None
    assert "the first line says what went wrong" in out.reason and "the end says where" in out.reason
    assert len(out.reason) < 500


# ------------------------------------------------------------------------------ aggregation, sampling


def test_aggregate_is_the_num_examples_weighted_mean_over_each_metrics_reporters() -> None:
    nodes = [
        NodeEvaluation("a", 10, True, None, {"loss": 1.0, "accuracy": 0.5}),
        NodeEvaluation("b", 30, True, None, {"loss": 2.0, "accuracy": 0.9, "eval_acc": 0.8}),
        NodeEvaluation("c", 60, True, None, {"eval_acc": 0.2}),
        NodeEvaluation("d", 0, False, "dropped", {}),
    ]
    metrics, total = aggregate_evaluate(nodes)
    # plain reference: Σ n·m / Σ n over the nodes that report m
    ref: dict[str, float] = {}
    for key in ("loss", "accuracy", "eval_acc"):
        reporters = [n for n in nodes if n.accepted and key in n.metrics]
        ref[key] = sum(n.num_examples * n.metrics[key] for n in reporters) / sum(
            n.num_examples for n in reporters
        )
    assert metrics == pytest.approx(ref) and total == 100
    assert metrics["loss"] == pytest.approx((10 * 1.0 + 30 * 2.0) / 40)
    assert aggregate_evaluate([]) == ({}, 0)


def test_sampling_follows_flowers_rule() -> None:
    nodes = list(range(10, 20))
    cfg = RunConfig(
        evaluation=EvaluationSettings(fraction_evaluate=0.5, min_evaluate_nodes=2), aggregation=NO_PARAMS
    )
    assert len(sample_evaluate_nodes(nodes, cfg, 1)) == 5  # ⌊0.5·10⌋
    assert sample_evaluate_nodes(nodes, cfg, 1) == sample_evaluate_nodes(nodes, cfg, 1)
    few = RunConfig(
        evaluation=EvaluationSettings(fraction_evaluate=0.1, min_evaluate_nodes=3), aggregation=NO_PARAMS
    )
    assert len(sample_evaluate_nodes(nodes, few, 1)) == 3  # min-evaluate-nodes wins
    assert len(sample_evaluate_nodes(nodes[:2], few, 1)) == 2  # never more than connected
    assert set(sample_evaluate_nodes(nodes, cfg, 1)) <= set(nodes)


def test_evaluation_is_due_every_n_rounds_and_off_at_fraction_zero() -> None:
    every2 = RunConfig(
        evaluation=EvaluationSettings(fraction_evaluate=1.0, evaluate_every=2), aggregation=NO_PARAMS
    )
    assert [evaluation_due(every2, r) for r in (1, 2, 3, 4)] == [False, True, False, True]
    assert not evaluation_due(RunConfig(aggregation=NO_PARAMS), 1)  # off by default


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        ("fraction-evaluate", 1.5, "fraction-evaluate=1.5 must be in"),
        ("min-evaluate-nodes", 0, "≥ 1"),
        ("evaluate-every", 0, "evaluate-every=0 must be ≥ 1"),
    ],
)
def test_evaluate_keys_are_checked(key: str, value: Any, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        parse_run_config({key: value})


def test_evaluate_messages_follow_flowers_convention_with_bf16_widened(tmp_path: Path) -> None:
    weights = {"w": torch.randn(4, 3).to(torch.bfloat16), "b": torch.randn(4)}
    with ModelStore.open(tmp_path / "s") as store:
        version = ensure_base(store, lambda: weights, name="t")
        messages, size = build_evaluate_messages([5, 6], CFG, 3, version, weights)
    assert [m.metadata.message_type for m in messages] == ["evaluate", "evaluate"]
    assert [m.metadata.dst_node_id for m in messages] == [5, 6] and size == 2 * 4 * (12 + 4)
    content = messages[0].content
    assert content.config_records["config"]["server-round"] == 3
    assert dict(content.config_records[DTYPES_RECORD]) == {"w": "bfloat16"}
    arrays = content.array_records["arrays"]
    assert arrays["w"].dtype == "float32"
    assert torch.equal(arrays.to_torch_state_dict()["w"].to(torch.bfloat16), weights["w"])


# -------------------------------------------------------------------------------------- the record


def test_evaluations_are_recorded_beside_the_version_which_stays_unchanged(tmp_path: Path) -> None:
    with ModelStore.open(tmp_path / "s") as store:
        version = ensure_base(store, lambda: {"w": torch.ones(3)}, name="t")
        before = store.get(version.id).to_json()
        nodes = [NodeEvaluation("a", 5, True, None, {"loss": 0.5}), NodeEvaluation("b", 0, False, "why")]
        record_evaluation(store, Evaluation(version.id, 1, {"loss": 0.5}, 5, nodes))
        record_evaluation(store, Evaluation(version.id, 1, {"loss": 0.4}, 5, nodes[:1]))
        found = evaluations_of(store, version.id)
        assert [e.metrics for e in found] == [{"loss": 0.5}, {"loss": 0.4}]
        assert found[0].dropped[0].reason == "why" and found[0].recorded_at
        assert store.get(version.id).to_json() == before
        with pytest.raises(UnknownVersionError):
            record_evaluation(store, Evaluation("v000099", 1, {"loss": 0.5}, 5, []))
        with pytest.raises(ValueError, match="not a finite number"):
            record_evaluation(store, Evaluation(version.id, 1, {"loss": math.nan}, 5, []))
        assert len(evaluations_of(store, version.id)) == 2
        assert store.verify().ok


def test_store_show_prints_the_recorded_evaluations(tmp_path: Path) -> None:
    import json

    from typer.testing import CliRunner

    from fedmerge.store.cli import app

    with ModelStore.open(tmp_path / "s") as store:
        version = ensure_base(store, lambda: {"w": torch.ones(3)}, name="t")
        nodes = [NodeEvaluation("a", 5, True, None, {"loss": 0.25}), NodeEvaluation("b", 0, False, "why")]
        record_evaluation(store, Evaluation(version.id, 4, {"loss": 0.25}, 5, nodes))
    runner = CliRunner()
    shown = runner.invoke(app, ["show", "--store", str(tmp_path / "s"), version.id], env={"COLUMNS": "200"})
    assert shown.exit_code == 0, shown.output
    text = " ".join(shown.output.split())
    assert "federated evaluation (round 4)" in text and '{"loss": 0.25} over 5 examples' in text
    assert "1 node(s) accepted, 1 dropped" in text
    as_json = runner.invoke(app, ["show", "--store", str(tmp_path / "s"), version.id, "--json"])
    doc = json.loads(as_json.output)
    assert doc["evaluations"][0]["metrics"] == {"loss": 0.25} and doc["evaluations"][0]["round"] == 4


# ----------------------------------------------------------------------------- the ClientApp's side


def _context(node: int = 0, nodes: int = 3, run_config: dict[str, Any] | None = None) -> Context:
    return Context(
        run_id=1, node_id=1000 + node, node_config={"partition-id": node, "num-partitions": nodes},
        state=RecordDict(), run_config=run_config or {},
    )  # fmt: skip


def _message(kind: str, weights: dict[str, torch.Tensor], config: dict[str, Any]) -> Message:
    content = RecordDict({"arrays": ArrayRecord(weights), "config": ConfigRecord(config)})
    return Message(content, dst_node_id=1000, message_type=kind)


def test_fedmerge_client_evaluates_the_received_weights_on_its_own_data() -> None:
    task = get_task("digits")
    weights = dict(task.pretrained_base(0))
    reply = evaluate_reply(_message("evaluate", weights, {"task": "digits", "server-round": 1}), _context())
    metrics = reply.content.metric_records["metrics"]
    assert set(metrics) == {"loss", "accuracy", "num-examples"}
    assert isinstance(metrics["num-examples"], int) and metrics["num-examples"] > 0
    # the same as the task's evaluation of the same weights on that node's test split
    model = task.build_model(0)
    model.load_state_dict(weights)
    data = task.client_datasets(3, "iid", 0)[0]
    ref = task.evaluate(model, data.test)
    assert metrics["loss"] == pytest.approx(ref["loss"]) and metrics["accuracy"] == pytest.approx(
        ref["accuracy"]
    )
    assert metrics["num-examples"] == len(data.test)


def test_a_message_naming_no_task_is_one_clear_error() -> None:
    with pytest.raises(ConfigError, match="names no task"):
        local_settings(_message("evaluate", {"w": torch.ones(1)}, {}), _context())


def test_settings_come_from_the_message_then_run_config_then_defaults() -> None:
    msg = _message("train", {"w": torch.ones(1)}, {"learning-rate": 0.3, "server-round": 4})
    conf = local_settings(msg, _context(run_config={"task": "digits", "local-epochs": 3, "lr": 0.9}))
    assert (conf.task, conf.lr, conf.local_epochs, conf.round) == ("digits", 0.3, 3, 4)
    assert conf.batch_size == RunConfig.__dataclass_fields__["batch_size"].default


def test_fedmerge_client_answers_a_plain_train_message_as_flower_does() -> None:
    """No fedmerge settings (a stock strategy's message): dense full weights + num-examples."""
    task = get_task("digits")
    weights = {k: v.clone() for k, v in task.pretrained_base(0).items()}
    msg = _message("train", weights, {"lr": 0.1, "server-round": 1})
    reply = train_reply(msg, _context(run_config={"task": "digits", "local-epochs": 1}))
    content = reply.content
    assert set(content) == {"arrays", "metrics"}
    trained = content.array_records["arrays"].to_torch_state_dict()
    assert set(trained) == set(weights) and all(trained[k].dtype == weights[k].dtype for k in weights)
    assert any(not torch.equal(trained[k], weights[k]) for k in weights)
    assert (
        content.metric_records["metrics"]["num-examples"] == task.client_datasets(3, "iid", 0)[0].num_examples
    )


# ------------------------------------------------------------------------ end to end in rounds


def _evaluating_app(plan: list[str], plain_train_nodes: frozenset[int] = frozenset()) -> ClientApp:
    """fedmerge's ClientApp for training (Flower's plain one on ``plain_train_nodes``); node i answers
    evaluate per ``plan[i]``."""

    def bad(content: RecordDict) -> Any:
        return lambda message, context: Message(content, reply_to=message)

    behaviours = {
        "ok": evaluate_reply,
        "plain": plain_evaluate,
        "nan": bad(_metrics(loss=0.1, **{"num-examples": math.nan})),
        "negative": bad(_metrics(loss=0.1, **{"num-examples": -1})),
        "none": bad(RecordDict()),
        "wrong-type": bad(RecordDict({"metrics": ConfigRecord({"loss": "x", "num-examples": 1})})),
    }
    app = ClientApp()

    @app.train()
    def train(message: Message, context: Context) -> Message:
        if int(context.node_config["partition-id"]) in plain_train_nodes:
            return plain_train(message, context)
        return train_reply(message, context)

    @app.evaluate()
    def evaluate(message: Message, context: Context) -> Message:
        return behaviours[plan[int(context.node_config["partition-id"])]](message, context)

    return app


def _federation(tmp_path: Path, app: ClientApp, nodes: int, **overrides: Any) -> Federation:
    cfg = parse_run_config(
        {
            "store": str(tmp_path / "store"), "aggregator": "fedavg", "min-clients": nodes, "min-valid": 2,
            "num-rounds": 2, "server-eval": False, "wait-for-nodes-s": 0.0, "local-epochs": 1,
            "fraction-evaluate": 1.0, "min-evaluate-nodes": 1,
            **{k.replace("_", "-"): v for k, v in overrides.items()},
        }
    )  # fmt: skip
    store = ModelStore.open(cfg.store)
    ensure_base(store, lambda: get_task("digits").pretrained_base(0), name="digits")
    return Federation(InProcessGrid(app, nodes), cfg, store)


def test_rounds_evaluate_each_committed_version_and_drop_bad_replies(tmp_path: Path) -> None:
    plan = ["ok", "ok", "nan", "negative", "none", "wrong-type"]
    fed = _federation(tmp_path, _evaluating_app(plan), len(plan))
    reports = fed.run()
    assert [r.version_id for r in reports] == ["v000002", "v000003"]
    for report in reports:
        ev = report.evaluation
        assert ev is not None and ev.version_id == report.version_id and ev.round == report.round
        assert len(ev.nodes) == 6 and len(ev.accepted) == 2 and len(ev.dropped) == 4
        assert all(n.reason and n.reason.startswith("InvalidEvaluateReply: ") for n in ev.dropped)
        ok = ev.accepted
        assert {n.client_id for n in ok} == {"client-0", "client-1"}  # labelled as in the round
        expected = sum(n.num_examples * n.metrics["loss"] for n in ok) / sum(n.num_examples for n in ok)
        assert ev.metrics["loss"] == pytest.approx(expected) and "accuracy" in ev.metrics
        assert ev.recorded and ev.num_examples == sum(n.num_examples for n in ok)
        recorded = evaluations_of(fed.store, str(report.version_id))
        assert len(recorded) == 1 and recorded[0].metrics == pytest.approx(ev.metrics)
        # the version's own metrics are those of its round: evaluation changed nothing in it
        assert "loss" not in fed.store.get(str(report.version_id)).metrics
    assert fed.store.verify().ok


def test_plain_and_fedmerge_clients_both_answer_evaluate(tmp_path: Path) -> None:
    """A plain Flower client (eval_loss/eval_acc) and fedmerge clients (loss/accuracy) in one
    evaluation: each metric is the weighted mean over the nodes that report it."""
    app = _evaluating_app(["ok", "plain", "plain"], plain_train_nodes=frozenset({1, 2}))
    fed = _federation(tmp_path, app, 3, num_rounds=1, evaluate_every=1)
    (report,) = fed.run()
    ev = report.evaluation
    assert ev is not None and len(ev.accepted) == 3
    assert {"loss", "accuracy", "eval_loss", "eval_acc"} <= set(ev.metrics)
    plain = [n for n in ev.accepted if "eval_loss" in n.metrics]
    assert len(plain) == 2
    assert ev.metrics["eval_acc"] == pytest.approx(
        sum(n.num_examples * n.metrics["eval_acc"] for n in plain) / sum(n.num_examples for n in plain)
    )


def test_no_evaluation_when_fraction_evaluate_is_zero(tmp_path: Path) -> None:
    calls: list[int] = []
    app = ClientApp()
    app.train()(train_reply)

    @app.evaluate()
    def evaluate(message: Message, context: Context) -> Message:
        calls.append(context.node_id)
        return evaluate_reply(message, context)

    fed = _federation(tmp_path, app, 2, num_rounds=1, fraction_evaluate=0.0)
    (report,) = fed.run()
    assert report.version_id is not None and report.evaluation is None and calls == []
    assert evaluations_of(fed.store, report.version_id) == []


def test_client_test_metrics_off_train_replies_carry_only_training_metrics(tmp_path: Path) -> None:
    app = ClientApp()

    @app.train()
    def train(message: Message, context: Context) -> Message:
        return train_reply(message, context)

    def round_metrics(flag: bool) -> list[dict[str, Any]]:
        fed = _federation(
            tmp_path / str(flag), app, 2, fraction_evaluate=0.0, num_rounds=1, client_test_metrics=flag
        )
        (report,) = fed.run()
        assert report.version_id is not None and len(report.accepted) == 2
        return [dict(o.metrics) for o in report.accepted]

    with_tests, without = round_metrics(True), round_metrics(False)
    assert all("test-accuracy" in m and "base-test-loss" in m for m in with_tests)
    assert all(not any("test-" in k for k in m) and "train-loss" in m for m in without)
