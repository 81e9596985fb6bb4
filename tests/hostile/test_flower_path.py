"""The hostile-input corpus against the Flower ServerApp's reply validation.

Direct: every case's reply goes through ``RoundState.judge`` after two honest replies; each must be
rejected with a reason naming what was wrong, and the merge must come out exactly as the two honest
replies alone make it. Simulation (slow): one Flower round with a hostile ClientApp per case beside
honest ones; the round commits from the honest replies, each hostile client is recorded rejected
with its reason, and the earlier version is byte-identical afterwards.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from google.protobuf.descriptor import FieldDescriptor
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedmerge.codec import container, decode_package
from fedmerge.codec.checksum import package_checksum, tensor_checksum
from fedmerge.store import ModelStore
from fedmerge.v1 import delta_pb2
from fedmerge_testing.hostile import (
    Attack,
    FlowerRound,
    Outcome,
    cases_for,
    run_flower_direct,
    run_flower_simulation,
    seeded_bytes,
)

FLOWER = cases_for("flower")
DIRECT = [c for c in FLOWER if c.name != "slow-loris"]  # a stall needs a round deadline: simulation
REJECTIONS = (
    r"^(MalformedPackage|MissingPackage|UnsupportedFormatVersion|ChecksumMismatch|DeclaredSizeTooLarge|"
    r"PayloadSizeMismatch|InvalidIndices|NonFiniteValues|UnsupportedDtype|TensorNameMismatch|"
    r"TensorShapeMismatch|PackageError|StaleOrInvalid|AnomalousSubmission|"
    # the judge: the magnitude bound, completeness, a merge that would not be finite
    r"ValueOutOfBounds|IncompleteSubmission|NonFiniteMerge): \S"
)


@pytest.fixture(scope="module")
def direct(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Outcome], dict[str, Any]]:
    outcomes, info = run_flower_direct(tmp_path_factory.mktemp("flower-direct"))
    return {o.case: o for o in outcomes}, info


@pytest.fixture(scope="module")
def flower_round(tmp_path_factory: pytest.TempPathFactory) -> FlowerRound:
    return FlowerRound.open(tmp_path_factory.mktemp("flower-round") / "store")


@pytest.mark.parametrize("name", [c.name for c in DIRECT])
def test_each_hostile_reply_is_rejected_with_a_reason_naming_the_fault(
    direct: tuple[dict[str, Outcome], dict[str, Any]], name: str
) -> None:
    out = direct[0][name]
    assert not out.crash, out.error
    assert not out.merged, f"{name} was accepted"
    assert out.matches, f"{name}: {out.error!r} does not match {out.expect!r}"
    assert out.versions_unchanged


def test_rejected_replies_leave_the_merge_as_the_honest_ones_make_it(
    direct: tuple[dict[str, Outcome], dict[str, Any]],
) -> None:
    outcomes, info = direct
    assert info["accepted"] == ["honest-0", "honest-1"]
    assert info["merged_equal"]  # bit-identical to a round that saw only the two honest replies
    assert set(outcomes) == {c.name for c in FLOWER}
    assert outcomes["slow-loris"].how == "simulation only"


def test_an_impostor_replying_first_does_not_get_the_honest_client_rejected(
    flower_round: FlowerRound,
) -> None:
    state = flower_round.state()
    honest = flower_round.valid(0)
    impostor = flower_round.valid(5)
    forged = impostor.encode(meta=replace(impostor.meta, client_id=honest.meta.client_id))
    first = state.judge(5, flower_round.reply(Attack(forged), node_id=5))
    outcome = state.judge(0, flower_round.reply(Attack(honest.data), node_id=0))
    assert first.accepted and outcome.accepted, outcome.reason
    # identity is the node: the second claimant of an id is recorded under a qualified label
    assert {first.client_id, outcome.client_id} == {honest.meta.client_id, f"{honest.meta.client_id}@node-0"}
    again = state.judge(0, flower_round.reply(Attack(impostor.data), node_id=0))
    assert not again.accepted and "duplicate: node 0" in str(again.reason)


# ------------------------------------------------------------------------------------------ fuzz

_FIELDS = [
    "nnz",
    "block_size",
    "rice_k",
    "seed",
    "keep_threshold",
    "value_encoding",
    "index_encoding",
    "dtype",
]
_PKG_FIELDS = ["format_version", "round", "num_examples", "kind", "client_id", "base_version_id"]


def _field_integers(message: Any, name: str) -> st.SearchStrategy[int]:
    """Every value the protobuf field can hold (int32 and enum fields refuse ≥ 2³¹ at assignment)."""
    kind = message.DESCRIPTOR.fields_by_name[name].type
    signed32 = (FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_SINT32, FieldDescriptor.TYPE_ENUM)
    unsigned64 = (FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_FIXED64)
    if kind in signed32:
        return st.integers(-(1 << 31), (1 << 31) - 1)
    if kind in unsigned64:
        return st.integers(0, (1 << 64) - 1)
    if kind in (FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_SINT64):
        return st.integers(-(1 << 63), (1 << 63) - 1)
    return st.integers(0, (1 << 32) - 1)


def _mutated(data: bytes, draw: Any) -> bytes:
    """One of: random bytes, byte edits, truncation, or a re-signed header/payload mutation."""
    kind = draw(st.sampled_from(["random", "edit", "truncate", "tensor-field", "package-field", "payload"]))
    if kind == "random":
        return bytes(draw(st.binary(max_size=4096)))
    if kind == "edit":
        out = bytearray(data)
        for pos, byte in draw(st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 255)), max_size=8)):
            out[pos % len(out)] = byte
        return bytes(out)
    if kind == "truncate":
        return data[: draw(st.integers(0, len(data)))]
    pkg = delta_pb2.DeltaPackage.FromString(container.inflated(data, container.MAX_INFLATED_BYTES))
    td = pkg.tensors[draw(st.integers(0, len(pkg.tensors) - 1))]
    if kind == "tensor-field":
        name = draw(st.sampled_from(_FIELDS))
        value: Any = draw(st.text(max_size=10)) if name == "dtype" else draw(_field_integers(td, name))
        setattr(td, name, value)
    elif kind == "package-field":
        name = draw(st.sampled_from(_PKG_FIELDS))
        text = name in ("client_id", "base_version_id")
        setattr(pkg, name, draw(st.text(max_size=12)) if text else draw(_field_integers(pkg, name)))
    else:
        which = draw(st.sampled_from(["indices", "values", "block_scales"]))
        setattr(td, which, draw(st.binary(max_size=256)))
    try:  # re-sign, so the mutation reaches the checks behind the checksum
        for t in pkg.tensors:
            t.checksum = tensor_checksum(t)
        pkg.checksum = package_checksum(pkg)
    except struct.error:  # a negative enum or int32 the checksum cannot encode: sent with the old one
        pass
    return pkg.SerializeToString()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_fuzzed_replies_are_judged_never_raise(flower_round: FlowerRound, data: st.DataObject) -> None:
    """Any bytes in the package slot: ``judge`` returns; a rejection names its error class; an
    acceptance only for a package that decodes against the base shapes."""
    valid = flower_round.valid(2)
    payload = _mutated(valid.data, data.draw)
    state = flower_round.state()
    outcome = state.judge(7, flower_round.reply(Attack(payload), node_id=7))
    if outcome.accepted:
        decoded = decode_package(payload, expected_shapes=state.shapes, limits=state.limits)
        assert decoded.meta.base_version_id == flower_round.base.id
    else:
        assert outcome.reason and re.match(REJECTIONS, outcome.reason), outcome.reason


def test_random_reply_bytes_of_every_size_class_are_rejected(flower_round: FlowerRound) -> None:
    state = flower_round.state()
    for size in (0, 1, 7, 64, 4096, 1 << 16):
        outcome = state.judge(9, flower_round.reply(Attack(seeded_bytes(f"r{size}", size)), node_id=9))
        assert not outcome.accepted and outcome.reason and re.match(REJECTIONS, outcome.reason)


# ------------------------------------------------------------------------------------------ simulation


@pytest.fixture
def simulation(tmp_path: Path) -> Iterator[tuple[dict[str, Outcome], dict[str, Any]]]:
    outcomes, summary = run_flower_simulation(tmp_path, deadline_s=60.0)
    yield {o.case: o for o in outcomes}, summary


@pytest.mark.slow
def test_one_round_with_a_hostile_client_per_case_commits_from_the_honest_ones(
    simulation: tuple[dict[str, Outcome], dict[str, Any]],
) -> None:
    outcomes, summary = simulation
    assert not summary["aborted"] and summary["committed"] == "v000002"
    parts: dict[int, bool] = summary["outcome_partitions"]
    honest = len(summary["honest_partitions"])
    assert sorted(parts) == list(range(honest + len(FLOWER)))  # every node's outcome, mapped back
    assert parts[1] and parts[2]  # honest-1 and the real training client
    assert parts[0]  # honest-0
    for name, out in outcomes.items():
        assert not out.crash and out.serving, (name, out.error)
        assert not out.merged and out.matches, (name, out.error)
    assert summary["earlier_versions_unchanged"]
    with ModelStore.open(summary["store"]) as store:
        version = store.get("latest")
        assert version.id == "v000002" and version.parents == ("v000001",)
        rejected = [c for c in version.contributors if not c.accepted]
        assert len(rejected) == len(FLOWER) and all(c.reason for c in rejected)
        assert len([c for c in version.contributors if c.accepted]) == honest
        assert store.verify().ok
