"""Reading blobs from the object store by streamed ranged GETs (:mod:`fedmerge.store.s3_ranges`),
against a real SeaweedFS: random access, connections reused, a stream cut mid-body resumed."""

from __future__ import annotations

import contextlib
import hashlib
import socket
import threading
import uuid
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from store_test_helpers import LocalProxy

from fedmerge.store import ModelStore
from fedmerge.store.s3 import S3BlobBackend
from fedmerge.store.s3_local import LocalSeaweed

pytest.importorskip("boto3")


@pytest.fixture
def bucket(seaweed_server: LocalSeaweed, monkeypatch: pytest.MonkeyPatch) -> str:
    for key, value in seaweed_server.env().items():
        monkeypatch.setenv(key, value)
    return seaweed_server.create_bucket(f"r-{uuid.uuid4().hex[:20]}")


def _weights() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return {"a": torch.randn(1 << 20, generator=g), "b": torch.randn(3, 5, generator=g)}  # 4 MiB + tiny


def _ranged(store: ModelStore) -> S3BlobBackend:
    backend = store.blobs
    assert isinstance(backend, S3BlobBackend)
    backend.cache_blob_max = 0  # every read by ranges, nothing cached
    backend.read_threads = 1  # one reading thread: the connection cut is the first one's
    return backend


def test_random_access_by_ranges_returns_the_blobs_bytes(bucket: str, tmp_path: Path) -> None:
    with ModelStore.open(f"s3://{bucket}/m", cache_dir=tmp_path / "c") as store:
        v = store.commit_base(_weights(), name="w")
        backend = _ranged(store)
        digest = v.tensors["a"].blob
        expected = b"".join(
            backend.client.get_object(Bucket=backend.loc.bucket, Key=backend.key(digest))[
                "Body"
            ].iter_chunks()
        )
        assert hashlib.sha256(expected).hexdigest() == digest
        fh, size = backend.open_read(digest, "test")
        with fh:
            assert size == len(expected)
            for start, n in [(0, 8), (size - 100, 100), (1000, 3 << 20), (17, 1), (size - 1, 10), (0, size)]:
                fh.seek(start)
                assert fh.read(n) == expected[start : start + n], (start, n)
            fh.seek(size)
            assert fh.read(5) == b""
        assert not list(backend.blob_dir.glob("*/*.safetensors"))


class _CuttingProxy(LocalProxy):
    """A TCP proxy in front of the real server that, on its first ``cuts`` connections, forwards
    ``after`` bytes of the server's answer and then closes both sides (a connection reset in the
    middle of a body); every other connection is forwarded byte for byte."""

    def __init__(self, upstream_port: int, cuts: int, after: int) -> None:
        self.cuts = cuts
        self.after = after
        self.cut = 0
        self.connections = 0
        super().__init__(upstream_port)

    def handle(self, conn: socket.socket) -> None:
        with self._lock:
            self.connections += 1
            budget = self.after if self.cut < self.cuts else None
        up = socket.create_connection(("127.0.0.1", self.upstream))

        def close() -> None:
            for s in (conn, up):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

        def answers() -> None:
            sent = 0
            try:
                while data := up.recv(1 << 16):
                    if budget is not None and sent + len(data) > budget:
                        conn.sendall(data[: budget - sent])
                        with self._lock:
                            self.cut += 1
                        return
                    conn.sendall(data)
                    sent += len(data)
            except OSError:
                pass
            finally:
                close()

        threading.Thread(target=answers, daemon=True).start()
        try:
            while data := conn.recv(1 << 16):
                up.sendall(data)
        except OSError:
            pass
        finally:
            close()


def test_a_stream_cut_mid_body_is_resumed_where_it_stopped(
    bucket: str, seaweed_server: LocalSeaweed, tmp_path: Path
) -> None:
    weights = _weights()
    with ModelStore.open(f"s3://{bucket}/m", cache_dir=tmp_path / "c") as store:
        v = store.commit_base(weights, name="w")
    proxy = _CuttingProxy(seaweed_server.s3_port, cuts=1, after=1 << 20)  # 1 MiB into the 4 MiB blob
    try:
        endpoint = f"http://127.0.0.1:{proxy.port}"
        with ModelStore.open(f"s3://{bucket}/m", s3_endpoint=endpoint, cache_dir=tmp_path / "c") as store:
            backend = _ranged(store)
            store.export(v.id, tmp_path / "out")
            assert not list(backend.blob_dir.glob("*/*.safetensors"))
        assert proxy.cut == 1
    finally:
        proxy.close()
    got = load_file(tmp_path / "out" / "model.safetensors")
    assert all(torch.equal(got[k], weights[k]) for k in weights)


def test_sequential_reads_reuse_the_connections(
    bucket: str, seaweed_server: LocalSeaweed, tmp_path: Path
) -> None:
    """Bodies read to their end give their connection back: exports in a row open no new ones."""
    weights = _weights()
    with ModelStore.open(f"s3://{bucket}/m", cache_dir=tmp_path / "c") as store:
        v = store.commit_base(weights, name="w")
    proxy = _CuttingProxy(seaweed_server.s3_port, cuts=0, after=0)
    try:
        endpoint = f"http://127.0.0.1:{proxy.port}"
        for i in range(3):
            with ModelStore.open(f"s3://{bucket}/m", s3_endpoint=endpoint, cache_dir=tmp_path / "c") as store:
                _ranged(store)
                store.export(v.id, tmp_path / f"out{i}")
            if i == 0:
                opened = proxy.connections
        assert proxy.connections == opened
    finally:
        proxy.close()
