"""Authentication (bearer tokens, mutual TLS), limits and quotas, other expert formats, the bulk channel."""

from __future__ import annotations

import hashlib
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
import torch
from service_helpers import (
    TOKEN,
    TOKENS,
    base_weights,
    finetuned,
    make_store,
    server_config,
    target,
    write_expert,
)
from typer.testing import CliRunner

from fedmerge.codec import CodecConfig, PackageMeta, encode_package
from fedmerge.delta.lora import LoraAdapter, LoraModule, lora_to_delta, save_peft_adapter
from fedmerge.service.bulk import BulkError, BulkStore
from fedmerge.service.cli import app as cli_app
from fedmerge.service.client import (
    ClientOptions,
    ServiceCallError,
    connect,
    list_versions,
    submit_bulk_expert,
    submit_expert,
    upload_bulk,
    wait_merged,
)
from fedmerge.service.config import Limits, ServiceConfigError, TlsConfig
from fedmerge.service.server import IntakeServer
from fedmerge.service.streams import THREAD_PREFIX
from fedmerge.store import ModelStore
from fedmerge.v1 import intake_pb2, intake_pb2_grpc

OTHER_TOKEN = next(t for t, c in TOKENS.items() if c == "client-01")


def test_calls_without_a_valid_token_are_unauthenticated(server: IntakeServer) -> None:
    for token in (None, "wrong-token-wrong-token"):
        with pytest.raises(ServiceCallError, match="UNAUTHENTICATED") as err:
            list_versions(ClientOptions(target(server), token=token))
        assert err.value.code == grpc.StatusCode.UNAUTHENTICATED and not err.value.retryable
    assert list_versions(ClientOptions(target(server), token=TOKEN))  # the base version


def test_open_server_must_be_explicit(store_dir: Path) -> None:
    with pytest.raises(ServiceConfigError, match="no authentication configured"):
        server_config(store_dir, tokens={})
    with pytest.raises(ServiceConfigError, match="at least 16"):
        server_config(store_dir, tokens={"short": "a"})


def test_oversized_expert_is_refused_before_it_is_read(server: IntakeServer, tmp_path: Path) -> None:
    opts = ClientOptions(target(server), token=TOKEN)
    with pytest.raises(ServiceCallError, match=r"FAILED_PRECONDITION.*per-submission limit") as err:
        submit_expert(opts, b"x" * ((1 << 20) + 1), fmt="delta_package")
    assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert not err.value.retryable  # no retry can make it fit: the client gives up at once
    assert not list((Path(server.config.intake_dir) / "spool").glob("[0-9a-f]*"))


def test_queue_quota_is_retryable(store_dir: Path, tmp_path: Path) -> None:
    srv = IntakeServer(server_config(store_dir, limits=Limits(max_queued=1)))
    srv.start()
    srv._stop.set()  # stop the merge worker so submissions stay queued
    srv._worker_thread.join(10)  # type: ignore[union-attr]
    try:
        opts = ClientOptions(target(srv), token=TOKEN)
        submit_expert(opts, write_expert(tmp_path, base_weights(), 1))
        with pytest.raises(ServiceCallError, match="already has 1 experts waiting") as err:
            submit_expert(opts, write_expert(tmp_path, base_weights(), 2), retries=0)
        assert err.value.retryable
    finally:
        srv.stop(0.2)


def test_truncated_stream_is_not_acknowledged(server: IntakeServer) -> None:
    opts = ClientOptions(target(server), token=TOKEN)
    header = intake_pb2.SubmitHeader(format=intake_pb2.EXPERT_FORMAT_DELTA_PACKAGE, total_size=100)
    msgs = [intake_pb2.SubmitChunk(header=header), intake_pb2.SubmitChunk(data=b"a" * 60)]
    with connect(opts) as ch, pytest.raises(grpc.RpcError) as err:
        intake_pb2_grpc.ExpertIntakeStub(ch).SubmitExpert(iter(msgs), metadata=opts.metadata())
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "received 60 bytes but the header declared 100" in err.value.details()


def test_peft_adapter_and_delta_package_experts(server: IntakeServer, tmp_path: Path) -> None:
    opts = ClientOptions(target(server), token=TOKEN)
    g = torch.Generator().manual_seed(3)
    module = LoraModule(torch.randn(2, 8, generator=g), torch.randn(16, 2, generator=g), 2.0)
    adapter = LoraAdapter(
        modules={"l1.weight": module}, rank=2, alpha=4.0, target_modules=("l1",), use_rslora=False,
        fan_in_fan_out=False, config={}, extra={},
    )  # fmt: skip
    save_peft_adapter(adapter, tmp_path / "adapter")
    s1 = wait_merged(opts, submit_expert(opts, tmp_path / "adapter").submission_id, timeout=60)
    assert s1.state == intake_pb2.SUBMISSION_STATE_MERGED, s1.reason
    base = base_weights()
    tv = {k: finetuned(base, 9)[k] - v for k, v in base.items() if v.is_floating_point()}
    with ModelStore.open(server.config.store) as store:
        root_hash = store.get("v000001").content_hash
    meta = PackageMeta(client_id="c", round=0, base_version_id="v000001", base_version_hash=root_hash)
    pkg = encode_package(tv, CodecConfig(), meta=meta).data
    s2 = wait_merged(opts, submit_expert(opts, pkg, fmt="delta_package").submission_id, timeout=60)
    assert s2.state == intake_pb2.SUBMISSION_STATE_MERGED, s2.reason
    with ModelStore.open(server.config.store) as store:
        first = store.load_delta(s1.version)
    expected = lora_to_delta(adapter)["l1.weight"]
    torch.testing.assert_close(first["l1.weight"], expected)  # OPCM: first expert merged as is
    assert torch.count_nonzero(first["l2.weight"]) == 0


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_pki(d: Path) -> None:
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
             "-days", "2", "-subj", "/CN=fedmerge-test-ca", cwd=d)  # fmt: skip
    for name, cn in (("server", "localhost"), ("client", "hospital-a")):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN={cn}", cwd=d)  # fmt: skip
        (d / f"{name}.ext").write_text(f"subjectAltName=DNS:{cn}\n")
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext", cwd=d)  # fmt: skip


def test_mutual_tls_identifies_clients_by_certificate(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    pki.mkdir()
    make_pki(pki)
    store = make_store(tmp_path)
    tls = TlsConfig(pki / "server.pem", pki / "server.key", pki / "ca.pem")
    srv = IntakeServer(server_config(store, tokens={}, tls=tls))
    srv.start()
    try:
        addr = f"localhost:{srv.port}"
        good = ClientOptions(
            addr, root_cert=pki / "ca.pem", client_cert=pki / "client.pem", client_key=pki / "client.key"
        )
        sub = wait_merged(
            good, submit_expert(good, write_expert(tmp_path, base_weights(), 1)).submission_id, timeout=60
        )
        assert sub.client_id == "hospital-a" and sub.state == intake_pb2.SUBMISSION_STATE_MERGED
        no_cert = ClientOptions(addr, root_cert=pki / "ca.pem")
        with pytest.raises(ServiceCallError, match="UNAVAILABLE"):
            list_versions(no_cert)  # the handshake refuses it
        with pytest.raises(ServiceCallError, match="UNAVAILABLE"):
            list_versions(ClientOptions(addr))  # plaintext to a TLS port
    finally:
        srv.stop(0.2)


# ------------------------------------------------------------------------------------ bulk channel


def test_bulk_upload_roundtrip_and_expert_from_bulk(server: IntakeServer, tmp_path: Path) -> None:
    opts = ClientOptions(target(server), token=TOKEN)
    path = write_expert(tmp_path, base_weights(), 4)
    seen: list[int] = []
    sha = upload_bulk(path, opts, chunk_size=256, progress=lambda done, total: seen.append(done))
    assert sha == hashlib.sha256(path.read_bytes()).hexdigest()
    assert seen[-1] == path.stat().st_size and len(seen) > 1
    with server.bulk.open(sha) as fh:
        assert fh.read() == path.read_bytes()
    assert upload_bulk(path, opts) == sha  # already complete: nothing re-sent
    sub = wait_merged(opts, submit_bulk_expert(opts, sha, fmt="checkpoint").submission_id, timeout=60)
    assert sub.state == intake_pb2.SUBMISSION_STATE_MERGED and sub.sha256 == sha


def test_bulk_upload_resumes_after_a_broken_stream(server: IntakeServer) -> None:
    opts = ClientOptions(target(server), token=TOKEN)
    data = torch.randint(0, 256, (300_000,), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    payload = bytes(data.numpy())
    sha = hashlib.sha256(payload).hexdigest()

    def broken() -> Iterator[intake_pb2.BulkChunk]:
        for off in range(0, 100_000, 10_000):
            yield intake_pb2.BulkChunk(sha256=sha, offset=off, data=payload[off : off + 10_000])
        raise ConnectionError("network cut")

    with connect(opts) as ch:
        stub = intake_pb2_grpc.BulkUploadStub(ch)
        stub.Begin(intake_pb2.BulkBeginRequest(sha256=sha, total_size=len(payload)), metadata=opts.metadata())
        with pytest.raises(grpc.RpcError):
            stub.Upload(broken(), metadata=opts.metadata())
        # the server notices the cancelled stream on its own threads: it gets as long as 200 of its
        # slowest answers so far (at least 10 s), so a busy machine's slower answers extend the wait
        started, slowest = time.monotonic(), 0.0
        while True:
            asked = time.monotonic()
            status = stub.Begin(
                intake_pb2.BulkBeginRequest(sha256=sha, total_size=len(payload)), metadata=opts.metadata()
            )
            slowest = max(slowest, time.monotonic() - asked)
            if status.offset > 0 or time.monotonic() - started > max(10.0, 200 * slowest):
                break
            time.sleep(0.05)
        assert 0 < status.offset <= 100_000 and not status.complete
    sent: list[int] = []
    assert upload_bulk(payload, opts, chunk_size=50_000, progress=lambda d, t: sent.append(d)) == sha
    assert sent[0] > status.offset  # resumed, not restarted
    with server.bulk.open(sha) as fh:
        assert fh.read() == payload


def test_bulk_store_refuses_bad_offsets_and_hashes(tmp_path: Path) -> None:
    bulk = BulkStore(tmp_path / "bulk", max_bytes=1000)
    with pytest.raises(BulkError, match="limit is 1000"):
        bulk.begin("a" * 64, 2000)
    with pytest.raises(BulkError, match="not a lowercase sha256"):
        bulk.begin("xyz", 10)
    wrong = "b" * 64
    bulk.begin(wrong, 4)
    bulk.acquire(wrong)
    with pytest.raises(BulkError, match="offset 2, expected 0"):
        bulk.write(wrong, 2, b"ab")
    bulk.write(wrong, 0, b"abcd")
    bulk.release(wrong)
    with pytest.raises(BulkError, match="hashes to"):
        bulk.finish(wrong)
    assert not bulk.has(wrong) and not any(bulk.partial.iterdir())


# ------------------------------------------------------------------------------------ stale packages


def _package(seed: int, base_id: str, base_hash: str) -> bytes:
    base = base_weights()
    tv = {k: finetuned(base, seed)[k] - v for k, v in base.items() if v.is_floating_point()}
    meta = PackageMeta(client_id="c", round=0, base_version_id=base_id, base_version_hash=base_hash)
    return encode_package(tv, CodecConfig(), meta=meta).data


def test_a_delta_package_made_against_another_base_is_rejected_naming_both_bases(
    server: IntakeServer,
) -> None:
    opts = ClientOptions(target(server), token=TOKEN)
    with ModelStore.open(server.config.store) as store:
        root = store.get("v000001")
    stale = {
        "other id": _package(21, "v000007", root.content_hash),
        "other hash": _package(22, root.id, "0" * 64),
        "both other": _package(23, "v000002", "ab" * 32),
    }
    reasons: dict[str, str] = {}
    for what, data in stale.items():
        sub = wait_merged(opts, submit_expert(opts, data, fmt="delta_package").submission_id, timeout=60)
        assert sub.state == intake_pb2.SUBMISSION_STATE_REJECTED, what
        assert "stale delta package" in sub.reason, sub.reason
        assert repr(root.id) in sub.reason and root.content_hash[:16] in sub.reason, sub.reason
        reasons[what] = sub.reason
    assert "'v000007'" in reasons["other id"] and "0000000000000000…" in reasons["other hash"]
    assert "'v000002'" in reasons["both other"] and "abababababababab…" in reasons["both other"]
    # a package naming no base (or only half of it) is refused like a stale one, naming what to set
    for what, (seed, base_id, base_hash) in {
        "no base": (25, "", ""),
        "id only": (26, root.id, ""),
        "hash only": (27, "", root.content_hash),
    }.items():
        sub = wait_merged(
            opts, submit_expert(opts, _package(seed, base_id, base_hash)).submission_id, timeout=60
        )
        assert sub.state == intake_pb2.SUBMISSION_STATE_REJECTED, what
        assert "names no base" in sub.reason, sub.reason
        assert f"base_version_id={root.id!r}" in sub.reason, sub.reason
        assert f"base_version_hash={root.content_hash!r}" in sub.reason, sub.reason
    sub = wait_merged(
        opts, submit_expert(opts, _package(24, root.id, root.content_hash)).submission_id, timeout=60
    )
    assert sub.state == intake_pb2.SUBMISSION_STATE_MERGED, sub.reason  # id and hash match: merged
    with ModelStore.open(server.config.store) as store:
        assert sorted(v.id for v in store.list() if v.method == "opcm") == ["v000002"]


# ------------------------------------------------------------------------------------ stalled streams


class _Stalled:
    """A client stream that sends ``msgs`` and then waits until :meth:`release` or the server ends it."""

    def __init__(self, method: grpc.StreamUnaryMultiCallable, msgs: list[object], token: str) -> None:
        self._go = threading.Event()

        def stream() -> Iterator[object]:
            yield from msgs
            self._go.wait()

        self.sent_at = time.monotonic()
        self.future = method.future(stream(), metadata=(("authorization", f"Bearer {token}"),))
        self.ended_at = 0.0
        self.future.add_done_callback(lambda _: setattr(self, "ended_at", time.monotonic()))

    def code(self, timeout: float) -> tuple[grpc.StatusCode, str]:
        exc = self.future.exception(timeout=timeout)
        assert isinstance(exc, grpc.RpcError), exc
        return exc.code(), exc.details()

    def release(self) -> None:
        self.future.cancel()
        self._go.set()


def _readers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(THREAD_PREFIX)]


def _others() -> set[int]:
    """Live threads other than the gRPC handler pool's (which grows lazily up to max_workers)."""
    return {t.ident or 0 for t in threading.enumerate() if not t.name.startswith("fedmerge-rpc")}


def _eventually(check: Callable[[], bool], timeout: float = 10.0) -> bool:
    end = time.monotonic() + timeout
    while not check():
        if time.monotonic() > end:
            return False
        time.sleep(0.02)
    return True


IDLE_S = 2.0
SLACK_S = 4.0  # shared 2-core machines: the abort may come late, never early


def test_a_stalled_submit_stream_is_aborted_and_other_clients_are_served_meanwhile(
    store_dir: Path, tmp_path: Path
) -> None:
    limits = Limits(max_submission_bytes=1 << 20, max_concurrent_streams=2)
    srv = IntakeServer(server_config(store_dir, max_workers=4, limits=limits, stream_idle_timeout_s=IDLE_S))
    srv.start()
    payload = write_expert(tmp_path, base_weights(), 31).read_bytes()
    header = intake_pb2.SubmitHeader(format=intake_pb2.EXPERT_FORMAT_CHECKPOINT, total_size=len(payload))
    msgs: list[object] = [
        intake_pb2.SubmitChunk(header=header),
        intake_pb2.SubmitChunk(data=payload[: len(payload) // 2]),
    ]
    try:
        with connect(ClientOptions(target(srv), token=TOKEN)) as ch:
            stub = intake_pb2_grpc.ExpertIntakeStub(ch)
            list_versions(ClientOptions(target(srv), token=TOKEN))  # warm the channel and a handler
            before = _others()
            stalls = [_Stalled(stub.SubmitExpert, msgs, TOKEN) for _ in range(2)]  # the client's cap
            other = ClientOptions(target(srv), token=OTHER_TOKEN)
            reply = submit_expert(other, write_expert(tmp_path, base_weights(), 32), retries=0)
            assert not any(s.future.done() for s in stalls)  # acknowledged while both streams stall
            assert len(_readers()) >= 2  # one reader thread per open stream
            assert (
                wait_merged(other, reply.submission_id, timeout=60).state
                == intake_pb2.SUBMISSION_STATE_MERGED
            )
            for s in stalls:
                code, details = s.code(timeout=IDLE_S + SLACK_S + 30)
                assert code == grpc.StatusCode.DEADLINE_EXCEEDED, details
                assert "--stream-idle-timeout-s" in details and "nothing it sent was kept" in details
                assert IDLE_S - 0.05 <= s.ended_at - s.sent_at <= IDLE_S + SLACK_S
            # nothing of the stalled expert was kept: no spool file, no queue row, no acknowledgement
            assert not list((srv.config.intake_dir / "spool" / "tmp").iterdir())
            assert [sub.id for sub in srv.queue.all()] == [reply.submission_id]
            assert _eventually(lambda: srv.handlers.slots.open_streams("client-00") == 0)
            again = submit_expert(ClientOptions(target(srv), token=TOKEN), payload, fmt="checkpoint")
            assert not again.duplicate  # the slots are free again and the bytes were never stored
            # the server's reader threads end with their calls, while the clients still hold the streams
            assert _eventually(lambda: not _readers()), _readers()
            for s in stalls:
                s.release()
            assert _eventually(lambda: _others() <= before), _others() - before  # no thread left behind
    finally:
        srv.stop(0.2)


def test_a_stalled_bulk_upload_is_aborted_and_stays_resumable(store_dir: Path) -> None:
    srv = IntakeServer(server_config(store_dir, max_workers=8, stream_idle_timeout_s=IDLE_S))
    srv.start()
    data = torch.randint(0, 256, (50_000,), generator=torch.Generator().manual_seed(4), dtype=torch.uint8)
    payload = bytes(data.numpy())
    sha = hashlib.sha256(payload).hexdigest()
    opts = ClientOptions(target(srv), token=TOKEN)
    try:
        with connect(opts) as ch:
            stub = intake_pb2_grpc.BulkUploadStub(ch)
            stub.Begin(
                intake_pb2.BulkBeginRequest(sha256=sha, total_size=len(payload)), metadata=opts.metadata()
            )
            stall = _Stalled(
                stub.Upload, [intake_pb2.BulkChunk(sha256=sha, offset=0, data=payload[:20_000])], TOKEN
            )
            code, details = stall.code(timeout=IDLE_S + SLACK_S + 30)
            assert code == grpc.StatusCode.DEADLINE_EXCEEDED and "Upload stream" in details, details
            assert (
                "resumable" in details and IDLE_S - 0.05 <= stall.ended_at - stall.sent_at <= IDLE_S + SLACK_S
            )
            status = stub.Begin(
                intake_pb2.BulkBeginRequest(sha256=sha, total_size=len(payload)), metadata=opts.metadata()
            )
            assert (status.offset, status.complete) == (20_000, False) and not srv.bulk.has(sha)
            stall.release()
        assert upload_bulk(payload, opts, chunk_size=10_000) == sha
        with srv.bulk.open(sha) as fh:
            assert fh.read() == payload
        assert _eventually(lambda: not _readers()), _readers()
    finally:
        srv.stop(0.2)


def test_a_client_gets_at_most_max_concurrent_streams(store_dir: Path, tmp_path: Path) -> None:
    limits = Limits(max_submission_bytes=1 << 20, max_concurrent_streams=2)
    srv = IntakeServer(server_config(store_dir, max_workers=4, limits=limits))  # idle timeout: default 30 s
    srv.start()
    header = intake_pb2.SubmitHeader(format=intake_pb2.EXPERT_FORMAT_CHECKPOINT, total_size=1000)
    msgs: list[object] = [intake_pb2.SubmitChunk(header=header), intake_pb2.SubmitChunk(data=b"x" * 10)]
    stalls: list[_Stalled] = []
    try:
        with connect(ClientOptions(target(srv), token=TOKEN)) as ch:
            stub = intake_pb2_grpc.ExpertIntakeStub(ch)
            stalls = [_Stalled(stub.SubmitExpert, msgs, TOKEN) for _ in range(2)]
            assert _eventually(lambda: srv.handlers.slots.open_streams("client-00") == 2)
            t0 = time.monotonic()
            busy = r"RESOURCE_EXHAUSTED: client 'client-00' already has 2 streams open \(limit 2.*--max-conc"
            with pytest.raises(ServiceCallError, match=busy) as err:
                submit_expert(
                    ClientOptions(target(srv), token=TOKEN), b"y" * 100, fmt="checkpoint", retries=0
                )
            assert err.value.retryable and time.monotonic() - t0 < 5.0  # refused at once, not queued
            upload = _Stalled(
                intake_pb2_grpc.BulkUploadStub(ch).Upload, [], TOKEN
            )  # Upload streams share the cap
            assert upload.code(timeout=10)[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
            other = ClientOptions(target(srv), token=OTHER_TOKEN)  # other clients are not affected
            reply = submit_expert(other, write_expert(tmp_path, base_weights(), 33), retries=0)
            assert (
                wait_merged(other, reply.submission_id, timeout=60).state
                == intake_pb2.SUBMISSION_STATE_MERGED
            )
            assert not any(s.future.done() for s in stalls)
            for s in stalls:
                s.release()
            assert _eventually(lambda: srv.handlers.slots.open_streams("client-00") == 0)
            mine = submit_expert(
                ClientOptions(target(srv), token=TOKEN), write_expert(tmp_path, base_weights(), 34)
            )
            assert not mine.duplicate  # a slot is free again once the stalled streams ended
    finally:
        for s in stalls:
            s.release()
        srv.stop(0.2)


def test_stream_settings_are_validated_and_offered_on_the_command_line(
    store_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for bad in (0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ServiceConfigError, match="stream_idle_timeout_s must be"):
            server_config(store_dir, stream_idle_timeout_s=bad)
    with pytest.raises(ServiceConfigError, match="max_concurrent_streams must be a positive"):
        Limits(max_concurrent_streams=0)
    with pytest.raises(
        ServiceConfigError, match=r"max_concurrent_streams \(4\) must be below max_workers \(4\)"
    ):
        server_config(store_dir, max_workers=4)
    # serve-continual tunes malloc for the whole process; keep this test process as it is
    monkeypatch.setattr("fedmerge.memory.use_mmap_for_large_allocations", lambda *a, **k: False)
    runner = CliRunner()
    result = runner.invoke(cli_app, ["serve-continual", "--store", str(store_dir), "--allow-insecure",
                                     "--stream-idle-timeout-s", "0"])  # fmt: skip
    assert result.exit_code == 2 and "stream_idle_timeout_s must be" in result.output, result.output
    result = runner.invoke(cli_app, ["serve-continual", "--store", str(store_dir), "--allow-insecure",
                                     "--max-workers", "3", "--max-concurrent-streams", "3"])  # fmt: skip
    assert result.exit_code == 2 and "must be below max_workers (3)" in result.output, result.output
