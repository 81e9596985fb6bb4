"""The hostile-input corpus against a real intake server process over gRPC on localhost.

One server takes the whole corpus (``fedmerge_testing.hostile.run_intake``): a valid expert first,
then every case — each must give a clear error (a gRPC status with a message, or a REJECTED submission
with its reason), leave the server serving, and change no stored version — then a second valid expert, which
must still be merged. A second server takes a hypothesis fuzz of the SubmitExpert stream.

Defences the server lacks are cases with ``gaps``: their tests are ``xfail(strict=True)`` and say what
is missing, so they start failing (and must be un-marked) the day the defence lands.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedmerge.store import ModelStore
from fedmerge.v1 import intake_pb2, intake_pb2_grpc
from fedmerge_testing.hostile import (
    INTAKE_SERVER_ARGS,
    TOKENS,
    Attack,
    IntakeProcess,
    Outcome,
    cases_for,
    intake_valid,
    run_intake,
    send,
    serving,
    settle,
    store_snapshot,
)

INTAKE = cases_for("intake")
# --stream-idle-timeout-s 1: the slow-loris cases watch the stalls for 2 s
SERVER_ARGS = list(INTAKE_SERVER_ARGS)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Outcome], dict[str, Any]]:
    outcomes, summary = run_intake(tmp_path_factory.mktemp("intake"), stall_s=2.0, server_args=SERVER_ARGS)
    return {o.case: o for o in outcomes}, summary


def _param(name: str) -> Any:
    gap = next(c for c in INTAKE if c.name == name).gaps.get("intake")
    return pytest.param(name, marks=pytest.mark.xfail(strict=True, reason=gap)) if gap else name


@pytest.mark.parametrize("name", [_param(c.name) for c in INTAKE])
def test_each_case_gives_a_clear_error_and_changes_nothing(
    corpus: tuple[dict[str, Outcome], dict[str, Any]], name: str
) -> None:
    out = corpus[0][name]
    assert not out.crash, out.error
    assert out.matches, f"{name}: {out.error!r} does not match {out.expect!r}"
    assert out.serving, f"{name}: the server stopped serving"
    assert out.versions_unchanged, f"{name}: a stored version changed or one was added"
    assert not out.merged, f"{name} was merged"


def test_acknowledged_hostile_submissions_are_rejected_with_a_reason_and_none_is_lost(
    corpus: tuple[dict[str, Outcome], dict[str, Any]],
) -> None:
    outcomes, summary = corpus
    assert summary["server_alive"] and summary["verify"] == "ok"
    assert summary["lost_acknowledged"] == []
    assert summary["valid_after_corpus"] == "merged"  # the server still merges valid experts
    gaps = {c.name for c in INTAKE if "intake" in c.gaps}
    for sid, row in summary["acknowledged"].items():
        if row["case"].startswith("valid") or row["case"] in gaps:
            continue
        if row["case"] == "replay":
            assert row["state"] == "merged"  # the replayed (valid) submission, merged once
            continue
        assert row["state"] == "rejected" and row["reason"], (sid, row)
    acked = [o for o in outcomes.values() if o.acknowledged]
    assert len(acked) >= 20  # content cases reach the merge worker's validation


def test_a_replay_gets_the_same_id_and_is_merged_once(
    corpus: tuple[dict[str, Outcome], dict[str, Any]],
) -> None:
    outcomes, summary = corpus
    replay = outcomes["replay"]
    first = next(sid for sid, row in summary["acknowledged"].items() if row["case"] == "valid-1")
    assert replay.submission_id == first and "duplicate" in replay.error
    with ModelStore.open(summary["store"]) as store:
        holders = [v.id for v in store.list() if first in (v.metadata or {}).get("submissions", [])]
    assert len(holders) == 1


def test_a_stalled_stream_does_not_block_other_clients(
    corpus: tuple[dict[str, Outcome], dict[str, Any]],
) -> None:
    out = corpus[0]["slow-loris"]
    assert out.serving and "still serving" in out.error
    assert out.versions_unchanged and not out.crash
    assert "1 stalled stream(s) dropped by the server: DEADLINE_EXCEEDED" in out.error, out.error
    assert "stream_idle_timeout_s" in out.error  # the message names the setting


def test_one_client_cannot_take_the_whole_handler_pool(
    corpus: tuple[dict[str, Outcome], dict[str, Any]],
) -> None:
    """As many stalled streams as handler threads from one client: those past its stream cap are
    refused at once, the rest dropped by the idle timeout, and another client is served meanwhile."""
    out = corpus[0]["slow-loris-pool"]
    assert out.serving and out.versions_unchanged and not out.crash, out.error
    assert "8 stalled stream(s) dropped by the server" in out.error, out.error


# ------------------------------------------------------------------------------------------ fuzz


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[IntakeProcess]:
    with IntakeProcess(tmp_path_factory.mktemp("intake-fuzz"), *SERVER_ARGS) as srv:
        yield srv


_TEXT = st.text(st.characters(exclude_categories=["Cs"]), max_size=24)
_HEX64 = st.text(alphabet="0123456789abcdef", min_size=64, max_size=64)
ALLOWED = {"OK", "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "NOT_FOUND"}


@st.composite
def streams(draw: st.DrawFn, valid: bytes) -> tuple[list[intake_pb2.SubmitChunk], str]:
    """A SubmitExpert stream with random header fields, framing and data (random or an edited
    valid package), and the token it is sent with."""
    if draw(st.booleans()):
        data = bytearray(valid)
        for pos, byte in draw(st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(0, 255)), max_size=4)):
            data[pos % len(data)] = byte
        payload = bytes(data[: draw(st.integers(0, len(data)))])
    else:
        payload = draw(st.binary(max_size=3000))
    exact = draw(st.booleans())
    header = intake_pb2.SubmitHeader(
        format=draw(st.integers(0, 5)),  # type: ignore[arg-type]  # open enum: unknown values too
        total_size=len(payload)
        if exact
        else draw(st.one_of(st.integers(0, 4096), st.integers(0, (1 << 64) - 1))),
        sha256=draw(st.sampled_from(["", hashlib.sha256(payload).hexdigest()]) | _HEX64 | _TEXT),
        base_version=draw(st.sampled_from(["", "v000001", "latest", "continual", "v999999"]) | _TEXT),
        label=draw(_TEXT),
        bulk_object=draw(st.just("") | _HEX64 | _TEXT) if draw(st.integers(0, 4)) == 0 else "",
    )
    size = draw(st.integers(1, 1024))
    chunks = [intake_pb2.SubmitChunk(data=payload[i : i + size]) for i in range(0, len(payload), size)]
    framing = draw(st.sampled_from(["ok", "ok", "ok", "data-first", "second-header", "header-only", "none"]))
    head = intake_pb2.SubmitChunk(header=header)
    msgs = {
        "ok": [head, *chunks],
        "data-first": [*chunks[:1], head, *chunks[1:]],
        "second-header": [head, *chunks[:1], head, *chunks[1:]],
        "header-only": [head],
        "none": [],
    }[framing]
    return msgs, draw(st.sampled_from(sorted(TOKENS)))


def test_fuzzed_submit_streams_get_clear_answers_and_the_server_keeps_serving(
    fuzz_server: IntakeProcess,
) -> None:
    """Random header fields, framing and bytes: every call ends with OK or a client-error status with
    a message (never INTERNAL/UNKNOWN/UNAVAILABLE), every acknowledged submission ends merged or
    rejected with a reason, no earlier version changes, and a valid expert is still merged afterwards."""
    target = fuzz_server.target
    valid = intake_valid(fuzz_server.store, seed=5).data
    before = store_snapshot(fuzz_server.store)
    acked: dict[str, str] = {}  # submission id -> the token of the client that submitted it
    codes: list[str] = []

    @settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None)
    @given(streams(valid))
    def one(stream: tuple[list[intake_pb2.SubmitChunk], str]) -> None:
        msgs, token = stream
        with grpc.insecure_channel(target) as ch:
            stub = intake_pb2_grpc.ExpertIntakeStub(ch)
            try:
                reply = stub.SubmitExpert(
                    iter(msgs), metadata=(("authorization", f"Bearer {token}"),), timeout=20
                )
                codes.append("OK")
                acked.setdefault(reply.submission_id, token)  # a duplicate is read by its first sender
            except grpc.RpcError as exc:
                codes.append(exc.code().name)
                assert exc.code().name in ALLOWED, (exc.code(), exc.details())
                assert exc.details(), "an error without a message"

    one()
    assert fuzz_server.alive() and serving(target)
    assert set(codes) - {"OK"}, "the fuzz never reached an error path"
    # a client reads only its own submissions: each is settled with the token that submitted it
    states = {sid: settle(target, sid, timeout=30.0, token=token) for sid, token in acked.items()}
    for sid, (state, _, reason) in states.items():
        assert state == "merged" or (state in ("rejected", "failed") and reason), (sid, state)
    sent = send(target, Attack(intake_valid(fuzz_server.store, seed=6).data), label="after-fuzz")
    assert sent.ok and settle(target, sent.submission_id)[0] == "merged"
    after = store_snapshot(fuzz_server.store)
    assert after["@verify"] == "ok"
    assert all(after[k] == v for k, v in before.items() if not k.startswith("@"))
    merged = {sid for sid, (state, _, _) in states.items() if state == "merged"} | {sent.submission_id}
    with ModelStore.open(fuzz_server.store) as store:
        for v in store.list():
            if v.id not in before:  # a new version holds only submissions that were merged
                assert set(v.metadata.get("submissions", [])) <= merged, json.dumps(v.metadata)


def test_server_drops_unauthenticated_calls_before_reading_a_byte(fuzz_server: IntakeProcess) -> None:
    spool = fuzz_server.dir / "intake" / "spool"
    before = sorted(p.name for p in spool.glob("*") if p.is_file()) if spool.exists() else []
    for auth in ("none", "wrong"):
        sent = send(fuzz_server.target, Attack(b"x" * 5000, auth=auth))
        assert not sent.ok and sent.code == "UNAUTHENTICATED"
    time.sleep(0.2)
    after = sorted(p.name for p in spool.glob("*") if p.is_file()) if spool.exists() else []
    assert after == before
    assert Path(fuzz_server.store).exists()
