"""The model store on S3-compatible object storage, against a real SeaweedFS server on localhost.

Covers the S3 backend's own promises (conditional puts, multipart uploads, ranged reads, the
read-through cache, verify and gc) and its faults: server unreachable at start-up and killed
mid-commit, bytes changed in the bucket, an incomplete multipart upload, wrong credentials, a
missing bucket, 5xx/SlowDown answers (through a real TCP proxy in front of the server).
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from store_test_helpers import LocalProxy, commit_delta, tiny_delta, tiny_model

from fedmerge.store import ModelStore
from fedmerge.store.errors import CorruptBlobError, MissingBlobError
from fedmerge.store.s3 import MULTIPART_THRESHOLD, S3BlobBackend
from fedmerge.store.s3_client import ObjectStoreError
from fedmerge.store.s3_local import LocalSeaweed, free_port

pytest.importorskip("boto3")


@pytest.fixture(scope="module")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSeaweed]:
    server = LocalSeaweed(tmp_path_factory.mktemp("seaweed")).start()
    yield server
    server.stop()


@pytest.fixture
def s3env(seaweed: LocalSeaweed, monkeypatch: pytest.MonkeyPatch) -> LocalSeaweed:
    for key, value in seaweed.env().items():
        monkeypatch.setenv(key, value)
    return seaweed


@pytest.fixture
def bucket(s3env: LocalSeaweed) -> str:
    return s3env.create_bucket(f"t-{uuid.uuid4().hex[:20]}")


@pytest.fixture
def s3store(bucket: str, tmp_path: Path) -> Iterator[ModelStore]:
    s = ModelStore.open(f"s3://{bucket}/models", cache_dir=tmp_path / "cache")
    yield s
    s.close()


def _backend(store: ModelStore) -> S3BlobBackend:
    assert isinstance(store.blobs, S3BlobBackend)
    return store.blobs


def _drop_cache(store: ModelStore, *, ranged: bool = False) -> None:
    backend = _backend(store)
    for path in backend.blob_dir.glob("*/*.safetensors"):
        path.unlink()
    if ranged:
        backend.cache_blob_max = 0


def test_commit_and_read_back_through_the_bucket(s3store: ModelStore, tmp_path: Path) -> None:
    base = tiny_model()
    root = s3store.commit_base(base, name="base")
    deltas = [tiny_delta(base, i) for i in range(2)]
    v1 = commit_delta(s3store, deltas[0], root.id, 1)
    v2 = commit_delta(s3store, deltas[1], v1.id, 2)
    # a local store with the same content is the reference
    with ModelStore.open(tmp_path / "local") as local:
        lroot = local.commit_base(base, name="base")
        l1 = commit_delta(local, deltas[0], lroot.id, 1)
        l2 = commit_delta(local, deltas[1], l1.id, 2)
        expected = local.materialize(l2.id)
        assert l2.content_hash == v2.content_hash
    for ranged in (False, True):
        _drop_cache(s3store, ranged=ranged)
        got = s3store.materialize(v2.id)
        assert set(got) == set(expected)
        for name in expected:
            assert got[name].dtype == expected[name].dtype
            assert torch.equal(got[name], expected[name]), name
    # ranged reads: nothing was downloaded into the cache
    assert not list(_backend(s3store).blob_dir.glob("*/*.safetensors"))
    view = s3store.weights_view(v2.id)
    assert torch.equal(view["embed.weight"], expected["embed.weight"])
    report = s3store.verify()
    assert report.problems == [] and report.versions_checked == 3


def test_multipart_blob_streamed_export_and_ranged_reads(s3store: ModelStore, tmp_path: Path) -> None:
    n = MULTIPART_THRESHOLD // 4 + 1000  # one fp32 tensor just over the multipart threshold
    g = torch.Generator().manual_seed(3)
    weights = {"big": torch.randn(n, generator=g), "small": torch.randn(7, generator=g)}
    v = s3store.commit_base(weights, name="big")
    backend = _backend(s3store)
    assert backend.size(v.tensors["big"].blob) > MULTIPART_THRESHOLD
    _drop_cache(s3store, ranged=True)
    out = s3store.export(v.id, tmp_path / "export")
    files = sorted(p for p in (tmp_path / "export").glob("*.safetensors"))
    loaded: dict[str, torch.Tensor] = {}
    for f in files:
        loaded.update(load_file(f))
    assert torch.equal(loaded["big"], weights["big"]) and torch.equal(loaded["small"], weights["small"])
    assert out is not None
    assert not list(backend.blob_dir.glob("*/*.safetensors"))


def test_a_file_object_goes_up_in_parts_once_and_comes_back_checked(
    s3store: ModelStore, bucket: str, s3env: LocalSeaweed, tmp_path: Path
) -> None:
    """``put_file`` / ``fetch_file`` (the intake's spool in the bucket): a file over the multipart
    threshold uploaded in parts, a second upload a no-op, the download checked against its sha256."""
    import hashlib
    import os

    backend = _backend(s3store)
    data = os.urandom(MULTIPART_THRESHOLD + 12345)
    sha = hashlib.sha256(data).hexdigest()
    src = tmp_path / "expert.bin"
    src.write_bytes(data)
    assert backend.put_file(f"intake/spool/{sha}", src) is True
    assert backend.put_file(f"intake/spool/{sha}", src) is False
    dest = tmp_path / "back" / sha
    backend.fetch_file(f"intake/spool/{sha}", dest, sha)
    assert dest.read_bytes() == data
    with pytest.raises(CorruptBlobError, match="changed in the bucket"):
        backend.fetch_file(f"intake/spool/{sha}", tmp_path / "wrong", "0" * 64)
    assert not (tmp_path / "wrong").exists() and not list(tmp_path.glob(".wrong*"))
    with pytest.raises(MissingBlobError, match="missing"):
        backend.fetch_file("intake/spool/" + "1" * 64, tmp_path / "none", "1" * 64)
    assert not s3env.client().list_multipart_uploads(Bucket=bucket).get("Uploads")


def test_a_second_writer_of_a_blob_is_a_no_op(s3store: ModelStore, bucket: str, s3env: LocalSeaweed) -> None:
    v = s3store.commit_base(tiny_model(), name="base")
    backend = _backend(s3store)
    digest = v.tensors["embed.weight"].blob
    before = s3env.client().head_object(Bucket=bucket, Key=backend.key(digest))
    parts = [b"anything"]  # a conditional put never replaces an existing name, whatever the bytes
    assert backend.put(digest, parts) is False
    after = s3env.client().head_object(Bucket=bucket, Key=backend.key(digest))
    assert before["ETag"] == after["ETag"]
    again = s3store.commit_base(tiny_model(), name="base again")
    assert again.tensors["embed.weight"].blob == digest
    assert s3store.verify().problems == []


def test_a_second_server_reads_versions_committed_by_the_first(
    bucket: str, tmp_path: Path, catalog_url_pg: str
) -> None:
    url = f"s3://{bucket}/shared"
    with ModelStore.open(url, catalog=catalog_url_pg, cache_dir=tmp_path / "a") as a:
        base = tiny_model()
        root = a.commit_base(base, name="base")
        v1 = commit_delta(a, tiny_delta(base, 0), root.id, 1)
        expected = a.materialize(v1.id)
    with ModelStore.open(url, catalog=catalog_url_pg, cache_dir=tmp_path / "b") as b:
        assert b.resolve("latest") == v1.id
        got = b.materialize("latest")
        assert all(torch.equal(got[k], expected[k]) for k in expected)
        assert b.verify().problems == []


@pytest.fixture
def catalog_url_pg(request: pytest.FixtureRequest) -> str:
    server = request.getfixturevalue("pg_server")
    return str(server.create_database(f"t_{uuid.uuid4().hex[:16]}"))


def test_bytes_changed_in_the_bucket_are_caught(
    s3store: ModelStore, bucket: str, s3env: LocalSeaweed
) -> None:
    v = s3store.commit_base(tiny_model(), name="base")
    backend = _backend(s3store)
    digest = v.tensors["embed.weight"].blob
    client = s3env.client()
    key = backend.key(digest)
    raw = bytearray(client.get_object(Bucket=bucket, Key=key)["Body"].read())
    raw[-1] ^= 0xFF
    client.put_object(Bucket=bucket, Key=key, Body=bytes(raw))  # an unconditional overwrite outside the store
    report = s3store.verify()
    assert [p.kind for p in report.problems] == ["corrupt_blob"]
    assert digest in report.problems[0].message
    for ranged in (False, True):
        _drop_cache(s3store, ranged=ranged)
        with pytest.raises(CorruptBlobError, match="corrupted"):
            s3store.materialize(v.id)
    assert not list(backend.blob_dir.glob("*/*.safetensors"))  # nothing corrupt was cached


def test_gc_removes_only_old_unreferenced_blobs_and_stale_uploads(
    s3store: ModelStore, bucket: str, s3env: LocalSeaweed
) -> None:
    v = s3store.commit_base(tiny_model(), name="base")
    backend = _backend(s3store)
    orphan = backend.stage([b"not referenced by any version"]).digest
    client = s3env.client()
    # an incomplete multipart upload of a blob name, as a crashed writer leaves it: never visible
    ghost = "0" * 64
    upload = client.create_multipart_upload(Bucket=bucket, Key=backend.key(ghost))
    client.upload_part(
        Bucket=bucket, Key=backend.key(ghost), UploadId=upload["UploadId"], PartNumber=1, Body=b"x" * 1024
    )
    assert not backend.has(ghost)
    assert ghost not in set(backend.digests())
    assert s3store.verify().problems == []
    young = s3store.gc(3600)
    assert young.removed_blobs == [] and young.kept_young >= 1
    assert backend.has(orphan)
    report = s3store.gc(0)
    assert report.removed_blobs == [orphan]
    assert any(ghost in f for f in report.removed_files)
    assert not backend.has(orphan)
    assert client.list_multipart_uploads(Bucket=bucket, Prefix=backend.key(ghost)).get("Uploads", []) == []
    assert all(backend.has(e.blob) for e in v.tensors.values())
    assert s3store.verify().problems == []


def test_wrong_credentials_and_missing_bucket_are_one_clear_line(
    bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ObjectStoreError, match="does not exist") as missing:
        ModelStore.open("s3://no-such-bucket-here/m", cache_dir=tmp_path / "c1")
    assert "\n" not in str(missing.value)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    with pytest.raises(ObjectStoreError, match="credentials") as creds:
        ModelStore.open(f"s3://{bucket}/m", cache_dir=tmp_path / "c2")
    assert "\n" not in str(creds.value)


def test_unreachable_at_start_up_is_one_clear_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with pytest.raises(ObjectStoreError, match="unreachable") as err:
        ModelStore.open("s3://some-bucket/m", s3_endpoint=endpoint, cache_dir=tmp_path / "c")
    assert "\n" not in str(err.value) and endpoint in str(err.value)


class _FaultyProxy(LocalProxy):
    """A TCP proxy in front of the real server that answers the first ``failures`` HTTP requests
    with ``503 SlowDown`` itself and forwards everything else byte for byte."""

    def __init__(self, upstream_port: int, failures: int) -> None:
        self.failures = failures
        self.refused = 0
        super().__init__(upstream_port)

    def handle(self, conn: socket.socket) -> None:
        with self._lock:
            fail = self.refused < self.failures
            if fail:
                self.refused += 1
        if fail:
            conn.settimeout(2)
            try:
                conn.recv(65536)
                body = (
                    b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
                )
                conn.sendall(
                    b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\nConnection: close\r\n"
                    + f"Content-Length: {len(body)}\r\n\r\n".encode()
                    + body
                )
            except OSError:
                pass
            conn.close()
            return
        up = socket.create_connection(("127.0.0.1", self.upstream))

        def pump(src: socket.socket, dst: socket.socket) -> None:
            try:
                while data := src.recv(1 << 16):
                    dst.sendall(data)
            except OSError:
                pass
            finally:
                for s in (src, dst):
                    with contextlib.suppress(OSError):
                        s.shutdown(socket.SHUT_RDWR)

        threading.Thread(target=pump, args=(up, conn), daemon=True).start()
        pump(conn, up)


def test_slow_down_answers_are_retried_with_back_off(
    bucket: str, seaweed: LocalSeaweed, tmp_path: Path
) -> None:
    proxy = _FaultyProxy(seaweed.s3_port, failures=3)
    # a reader behind its own proxy: the process's client for the first endpoint keeps its
    # connections open, so the reader's 503s come from new connections to another endpoint
    reader_proxy = _FaultyProxy(seaweed.s3_port, failures=2)
    try:
        endpoint = f"http://127.0.0.1:{proxy.port}"
        with ModelStore.open(f"s3://{bucket}/m", s3_endpoint=endpoint, cache_dir=tmp_path / "c") as s:
            assert proxy.refused == 3  # the start-up check itself went through after three 503s
            v = s.commit_base(tiny_model(), name="base")
        reader = f"http://127.0.0.1:{reader_proxy.port}"
        with ModelStore.open(f"s3://{bucket}/m", s3_endpoint=reader, cache_dir=tmp_path / "c") as s:
            _drop_cache(s)
            got = s.materialize(v.id)
        assert reader_proxy.refused == 2
        expected = tiny_model()
        assert all(torch.equal(got[k], expected[k]) for k in expected)
    finally:
        proxy.close()
        reader_proxy.close()


@pytest.mark.slow
def test_server_killed_mid_commit_leaves_no_version_with_missing_blobs(tmp_path: Path) -> None:
    server = LocalSeaweed(tmp_path / "sw").start()
    try:
        bucket = server.create_bucket("kill-test")
        env = server.env()
        with pytest.MonkeyPatch.context() as mp:
            for key, value in env.items():
                mp.setenv(key, value)
            store = ModelStore.open(f"s3://{bucket}/m", cache_dir=tmp_path / "cache")
            base = store.commit_base(tiny_model(), name="base")
            _backend(store).client.meta.config.retries["max_attempts"] = 2
            g = torch.Generator().manual_seed(0)
            big = {f"w{i}": torch.randn(1 << 20, generator=g) for i in range(64)}  # 256 MiB of blobs
            errors: list[BaseException] = []

            def commit() -> None:
                try:
                    store.commit_base(big, name="doomed")
                except BaseException as exc:
                    errors.append(exc)

            worker = threading.Thread(target=commit)
            worker.start()
            backend = _backend(store)
            # kill the server once the commit has demonstrably started uploading
            prefix = backend.loc.key("blobs") + "/"
            while worker.is_alive():
                listed = server.client().list_objects_v2(Bucket=bucket, Prefix=prefix).get("KeyCount", 0)
                if listed > len(base.tensors) + 2:
                    break
                time.sleep(0.05)
            server.kill()
            worker.join(timeout=300)
            assert not worker.is_alive()
            assert len(errors) == 1 and isinstance(errors[0], ObjectStoreError), errors
            assert "\n" not in str(errors[0])
            server.start()
            assert [v.id for v in store.list()] == [base.id]
            report = store.verify()
            assert report.problems == []
            store.close()
    finally:
        server.stop()


def test_missing_blob_is_reported_with_its_location(
    s3store: ModelStore, bucket: str, s3env: LocalSeaweed
) -> None:
    v = s3store.commit_base(tiny_model(), name="base")
    backend = _backend(s3store)
    digest = v.tensors["head.weight"].blob
    s3env.client().delete_object(Bucket=bucket, Key=backend.key(digest))
    _drop_cache(s3store)
    with pytest.raises(MissingBlobError, match=f"s3://{bucket}/models"):
        s3store.materialize(v.id)
    assert [p.kind for p in s3store.verify().problems] == ["missing_blob"]


def test_store_commands_take_an_s3_url(
    s3store: ModelStore, bucket: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    from fedmerge.store.cli import app

    v = s3store.commit_base(tiny_model(), name="base")
    monkeypatch.setenv("FEDMERGE_S3_CACHE", str(tmp_path / "cli-cache"))
    runner = CliRunner()
    ok = runner.invoke(app, ["verify", "--store", f"s3://{bucket}/models", "--json"])
    assert ok.exit_code == 0, ok.output
    # the CLI's own cache directory holds a SQLite catalog of its own: it sees no version, and
    # verify walks every blob in the bucket
    report = json.loads(ok.output)
    assert report["problems"] == []
    assert report["blobs_checked"] == len({e.blob for e in v.tensors.values()})
    bad = runner.invoke(app, ["verify", "--store", "s3://no-such-bucket-here/models"])
    assert bad.exit_code == 1
    assert "does not exist" in bad.output and "Traceback" not in bad.output
