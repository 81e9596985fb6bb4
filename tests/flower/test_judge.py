"""Every reply is judged, never trusted: regression tests for the round engine's ``RoundState.judge``
and the finite-merge check, with real ``flwr.app`` Message/RecordDict objects on a real store."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from flwr.app import ArrayRecord, MetricRecord, RecordDict

from fedmerge.flower.records import METRICS_RECORD
from fedmerge.flower.server.commit import RoundReport, finite_merge
from fedmerge_testing.hostile import Attack, FlowerRound, case, train_message


@pytest.fixture
def fr(tmp_path: Path) -> FlowerRound:
    return FlowerRound.open(tmp_path / "store")


def _dense_reply(fr: FlowerRound, node: int, metrics: dict[str, Any] | None, scale: float = 1.0) -> Any:
    from flwr.app import Message

    valid = fr.valid(node)
    weights = {k: (fr.weights[k] + scale * valid.delta[k]).numpy() for k in valid.delta}
    content = RecordDict({"weights": ArrayRecord({k: _array(v) for k, v in weights.items()})})
    if metrics is not None:
        content[METRICS_RECORD] = MetricRecord(metrics)
    return Message(content, reply_to=train_message(node))


def _array(v: Any) -> Any:
    from flwr.app import Array

    return Array(v)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, -5, 0, 2.5, [1.0, 2.0], 10**15], ids=str)
def test_dense_num_examples_of_any_value_is_a_recorded_rejection(fr: FlowerRound, value: Any) -> None:
    state = fr.state()
    honest = state.judge(0, fr.reply(Attack(fr.valid(0).data), node_id=0))
    out = state.judge(5, _dense_reply(fr, 5, {"num-examples": value}))
    assert honest.accepted and not out.accepted
    assert out.reason and out.reason.startswith("StaleOrInvalid: ") and "num-examples" in out.reason


def test_dense_reply_without_metrics_is_rejected_and_a_valid_one_accepted(fr: FlowerRound) -> None:
    state = fr.state()
    missing = state.judge(5, _dense_reply(fr, 5, None))
    assert not missing.accepted and "has no 'num-examples'" in str(missing.reason)
    ok = state.judge(6, _dense_reply(fr, 6, {"num-examples": 12}))
    assert ok.accepted, ok.reason
    assert ok.num_examples == 12


def test_npy_header_declaring_1e11_entries_is_refused_before_allocation(fr: FlowerRound) -> None:
    state = fr.state()
    out = state.judge(3, fr.reply(case("npy-huge-header").build(fr.valid(3)), node_id=3))
    assert not out.accepted
    assert "TensorShapeMismatch" in str(out.reason) and "(100000000000,)" in str(out.reason)


def test_stale_base_names_expected_and_received_hashes(fr: FlowerRound) -> None:
    valid = fr.valid(2)
    other = "f" * 64
    data = valid.encode(meta=replace(valid.meta, base_version_hash=other))
    out = fr.state().judge(2, fr.reply(Attack(data), node_id=2))
    assert not out.accepted
    assert f"expected hash {fr.base.content_hash}" in str(out.reason)
    assert f"received {other}" in str(out.reason)


def test_partial_task_vector_is_zero_change_and_empty_one_refused(fr: FlowerRound) -> None:
    valid = fr.valid(2)
    keep = sorted(valid.delta)[0]
    partial = valid.encode(delta={keep: valid.delta[keep]})
    state = fr.state()
    out = state.judge(2, fr.reply(Attack(partial), node_id=2))
    assert out.accepted, out.reason
    merged = state.aggregator.finalize()
    assert all(torch.count_nonzero(merged[k]) == 0 for k in merged if k != keep)
    assert torch.count_nonzero(merged[keep]) > 0
    empty = fr.state().judge(3, fr.reply(case("no-tensors").build(fr.valid(3)), node_id=3))
    assert not empty.accepted and "holds no tensors" in str(empty.reason)


def test_huge_values_are_refused_by_the_bound_and_the_round_merges_the_honest(fr: FlowerRound) -> None:
    state = fr.state()
    state.judge(0, fr.reply(Attack(fr.valid(0).data), node_id=0))
    state.judge(1, fr.reply(Attack(fr.valid(1).data), node_id=1))
    bad = state.judge(4, fr.reply(case("huge-values").build(fr.valid(4)), node_id=4))
    assert not bad.accepted and "ValueOutOfBounds" in str(bad.reason)
    merged = state.aggregator.finalize()
    assert all(bool(torch.isfinite(t).all()) for t in merged.values())


def test_a_non_finite_merge_leaves_out_the_offender_not_the_round(fr: FlowerRound) -> None:
    """With the bound lifted, 3e38 values pass judging but overflow the weighted sum: the merge is
    checked before commit, the offender is rejected and the honest replies are merged."""
    state = fr.state()
    state.max_abs = math.inf
    outcomes = [state.judge(p, fr.reply(Attack(fr.valid(p).data), node_id=p)) for p in (0, 1)]
    huge = case("huge-values").build(fr.valid(4))
    outcomes.append(state.judge(4, fr.reply(huge, node_id=4)))
    assert all(o.accepted for o in outcomes)  # the bound was lifted: judged acceptable
    report = RoundReport(1, 0, fr.base.id, outcomes)
    _, merged = finite_merge(state, report)
    assert merged is not None
    assert all(bool(torch.isfinite(t).all()) for t in merged.values())
    rejected = {o.node_id: o.reason for o in report.outcomes if not o.accepted}
    assert list(rejected) == [4] and "NonFiniteMerge" in str(rejected[4])
    reference = fr.state()
    for p in (0, 1):
        reference.judge(p, fr.reply(Attack(fr.valid(p).data), node_id=p))
    expected = reference.aggregator.finalize()
    assert all(torch.equal(merged[k], expected[k]) for k in expected)


def test_judge_never_raises_on_a_reply_whose_content_cannot_be_read(fr: FlowerRound) -> None:
    from flwr.app import Array, Message

    bogus = Array(dtype="float32", shape=(3,), stype="numpy.ndarray", data=b"not an npy array at all")
    name = sorted(fr.valid(0).delta)[0]
    content = RecordDict({"weights": ArrayRecord({name: bogus})})
    content[METRICS_RECORD] = MetricRecord({"num-examples": 3})
    out = fr.state().judge(8, Message(content, reply_to=train_message(8)))
    assert not out.accepted and out.reason


def test_a_client_failure_keeps_its_first_line_and_its_end(fr: FlowerRound) -> None:
    from flwr.app import Error, Message

    from fedmerge.flower.server.judge import MAX_REASON

    first = "RuntimeError: Error(s) in loading state_dict for Net: size mismatch for fc1.weight"
    middle = " ".join(f"frame {i} in module_{i}.py" for i in range(200))
    last = "copying a param with shape torch.Size([64, 128]) from checkpoint"
    reply = Message(Error(2, f"{first}\n{middle}\n{last}"), reply_to=train_message(4))
    out = fr.state().judge(4, reply)
    assert not out.accepted and out.reason is not None
    text = out.reason.removeprefix("client failed (code 2): ")
    assert text.startswith(first) and text.endswith(last) and " … " in text
    assert len(text) == MAX_REASON


def test_nodes_are_named_by_the_client_id_their_replies_state(fr: FlowerRound) -> None:
    from flwr.app import ConfigRecord, Error, Message

    state = fr.state()
    reply = _dense_reply(fr, 5, {"num-examples": 12})
    reply.content["config"] = ConfigRecord({"client-id": "  hospital\n a  "})
    ok = state.judge(5, reply)
    assert ok.accepted and ok.client_id == "hospital a", ok.reason
    rejected = _dense_reply(fr, 6, None)
    rejected.content["config"] = ConfigRecord({"client-id": "clinic-b"})
    out = state.judge(6, rejected)
    assert not out.accepted and out.client_id == "clinic-b"
    # later, a reply without content (an error) from the same node is still named by its client id
    later = fr.state()
    later.labels = state.labels
    failed = later.judge(6, Message(Error(2, "CUDA out of memory"), reply_to=train_message(6)))
    assert failed.client_id == "clinic-b" and "CUDA out of memory" in str(failed.reason)
    # a node without client-id keeps its Flower node id; a client-id of the wrong type is ignored
    anonymous = _dense_reply(fr, 7, {"num-examples": 3})
    anonymous.content["config"] = ConfigRecord({"client-id": 17})
    assert later.judge(7, anonymous).client_id == "node-7"


def test_a_node_whose_package_named_it_keeps_that_name_when_it_later_fails(fr: FlowerRound) -> None:
    from flwr.app import Error, Message

    state = fr.state()
    ok = state.judge(0, fr.reply(Attack(fr.valid(0).data), node_id=0))
    assert ok.accepted and ok.client_id == "honest-0"
    later = fr.state()
    later.labels = state.labels
    failed = later.judge(0, Message(Error(2, "killed"), reply_to=train_message(0)))
    assert failed.client_id == "honest-0" and not failed.accepted
