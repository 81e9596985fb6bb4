"""On the gRPC surface of a real intake server: the bulk channel keeps its promises
(``header.sha256`` verified, partial uploads per client), submission metadata is disclosed only to
its submitter or an operator, and an empty ``SubmitChunk`` gets a message saying so."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from service_helpers import TOKEN, TOKENS, base_weights, server_config, target, write_expert

from fedmerge.service.client import ClientOptions, connect, submit_expert, upload_bulk, wait_merged
from fedmerge.service.config import Limits, load_token_file
from fedmerge.service.server import IntakeServer
from fedmerge.v1 import intake_pb2, intake_pb2_grpc

OTHER = next(t for t, c in TOKENS.items() if c == "client-01")
OPERATOR = next(t for t, c in TOKENS.items() if c == "client-02")


@pytest.fixture
def srv(store_dir: Path) -> Iterator[IntakeServer]:
    config = server_config(
        store_dir, limits=Limits(max_submission_bytes=1 << 20), operators=frozenset({"client-02"})
    )
    server = IntakeServer(config)
    server.start()
    try:
        yield server
    finally:
        server.stop(grace=0.5)


def _call(srv: IntakeServer, token: str, method: str, request: object) -> object:
    opts = ClientOptions(target(srv), token=token)
    with connect(opts) as ch:
        stub = intake_pb2_grpc.ExpertIntakeStub(ch)
        return getattr(stub, method)(request, metadata=opts.metadata(), timeout=30)


def test_only_the_submitter_or_an_operator_reads_a_submission(srv: IntakeServer, tmp_path: Path) -> None:
    opts = ClientOptions(target(srv), token=TOKEN)
    reply = submit_expert(opts, write_expert(tmp_path, base_weights(), 1), label="secret-label")
    own = wait_merged(opts, reply.submission_id, timeout=60)
    assert own.client_id == "client-00" and own.label == "secret-label"
    request = intake_pb2.GetSubmissionRequest(submission_id=reply.submission_id)
    with pytest.raises(grpc.RpcError) as err:
        _call(srv, OTHER, "GetSubmission", request)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "client-00" not in err.value.details() and "secret-label" not in err.value.details()
    assert "of client 'client-01'" in err.value.details()
    seen = _call(srv, OPERATOR, "GetSubmission", request)
    assert seen.client_id == "client-00" and seen.label == "secret-label"  # type: ignore[attr-defined]


def test_operators_come_from_the_token_file(tmp_path: Path) -> None:
    path = tmp_path / "tokens.txt"
    path.write_text("alice aaaaaaaaaaaaaaaaaaaa\nops oooooooooooooooooooo operator\n")
    tokens, operators = load_token_file(path)
    assert tokens == {"aaaaaaaaaaaaaaaaaaaa": "alice", "oooooooooooooooooooo": "ops"}
    assert operators == frozenset({"ops"})


def test_a_bulk_submission_with_a_wrong_declared_sha256_is_refused(srv: IntakeServer, tmp_path: Path) -> None:
    opts = ClientOptions(target(srv), token=TOKEN)
    sha = upload_bulk(write_expert(tmp_path, base_weights(), 2), opts)
    wrong = hashlib.sha256(b"other bytes").hexdigest()
    header = intake_pb2.SubmitHeader(
        format=intake_pb2.EXPERT_FORMAT_CHECKPOINT, bulk_object=sha, sha256=wrong, total_size=1
    )
    with connect(opts) as ch, pytest.raises(grpc.RpcError) as err:
        intake_pb2_grpc.ExpertIntakeStub(ch).SubmitExpert(
            iter([intake_pb2.SubmitChunk(header=header)]), metadata=opts.metadata(), timeout=30
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert wrong in err.value.details() and sha in err.value.details()
    assert srv.queue.by_sha(sha) is None  # nothing acknowledged
    header.sha256 = sha  # the right hash: accepted and merged
    with connect(opts) as ch:
        reply = intake_pb2_grpc.ExpertIntakeStub(ch).SubmitExpert(
            iter([intake_pb2.SubmitChunk(header=header)]), metadata=opts.metadata(), timeout=30
        )
    assert wait_merged(opts, reply.submission_id, timeout=60).state == intake_pb2.SUBMISSION_STATE_MERGED


def test_another_clients_begin_does_not_reset_a_partial_upload(srv: IntakeServer) -> None:
    data = bytes(range(256)) * 64
    sha = hashlib.sha256(data).hexdigest()
    half = len(data) // 2
    a = ClientOptions(target(srv), token=TOKEN)
    b = ClientOptions(target(srv), token=OTHER)
    with connect(a) as ch_a, connect(b) as ch_b:
        bulk_a = intake_pb2_grpc.BulkUploadStub(ch_a)
        bulk_b = intake_pb2_grpc.BulkUploadStub(ch_b)
        begin = intake_pb2.BulkBeginRequest(sha256=sha, total_size=len(data))
        assert bulk_a.Begin(begin, metadata=a.metadata()).offset == 0
        chunk = intake_pb2.BulkChunk(sha256=sha, offset=0, data=data[:half])
        assert bulk_a.Upload(iter([chunk]), metadata=a.metadata()).offset == half
        hostile = intake_pb2.BulkBeginRequest(sha256=sha, total_size=half - 1)  # another size
        assert bulk_b.Begin(hostile, metadata=b.metadata()).offset == 0
        assert bulk_b.Begin(begin, metadata=b.metadata()).offset == 0  # B's own upload: nothing yet
        assert bulk_a.Begin(begin, metadata=a.metadata()).offset == half  # A resumes where it was
        rest = intake_pb2.BulkChunk(sha256=sha, offset=half, data=data[half:])
        assert bulk_a.Upload(iter([rest]), metadata=a.metadata()).complete
    with srv.bulk.open(sha) as fh:
        assert fh.read() == data


@pytest.mark.parametrize("position", ["first", "after-data"])
def test_an_empty_submit_chunk_is_named(srv: IntakeServer, position: str) -> None:
    opts = ClientOptions(target(srv), token=TOKEN)
    header = intake_pb2.SubmitHeader(format=intake_pb2.EXPERT_FORMAT_CHECKPOINT, total_size=8)
    msgs = [intake_pb2.SubmitChunk()]
    if position == "after-data":
        msgs = [intake_pb2.SubmitChunk(header=header), intake_pb2.SubmitChunk(data=b"1234"), msgs[0]]
    with connect(opts) as ch, pytest.raises(grpc.RpcError) as err:
        intake_pb2_grpc.ExpertIntakeStub(ch).SubmitExpert(iter(msgs), metadata=opts.metadata(), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "is empty (neither header nor data)" in err.value.details()
    assert "only the first SubmitChunk may carry a header" not in err.value.details()
