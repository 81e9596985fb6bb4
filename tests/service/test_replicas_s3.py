"""Replicas that share nothing but the object store and the database: two ``serve-continual``
processes on ``s3://bucket/store`` (a real SeaweedFS) and a real PostgreSQL catalog and queue, each
with its own data directory and its own read-through cache.

An expert acknowledged by the replica that does not hold the lease is merged by the one that does,
from the bucket alone; the lease holder SIGKILLed mid-stream (and its disk thrown away) loses
nothing: every acknowledged expert is merged exactly once, the head equals OPCM run directly on the
same experts, and ``store verify`` is clean. The object store killed under a replica acknowledges
nothing (a retryable refusal) and the same expert goes through once it is back."""

from __future__ import annotations

import random
import re
import shutil
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from replica_helpers import PgServer, ReplicaProcess, audit_track, lease_holder_pid, push_anywhere
from service_helpers import TOKEN, base_weights, write_expert, write_tokens

from fedmerge.service.client import ClientOptions, submit_expert, wait_merged
from fedmerge.service.config import ServiceConfig
from fedmerge.service.replicas import spool_object
from fedmerge.store import ModelStore
from fedmerge.store.s3 import S3BlobBackend
from fedmerge.store.s3_local import LocalSeaweed
from fedmerge.v1 import intake_pb2


@pytest.fixture
def pg() -> Iterator[PgServer]:
    server = PgServer().start()
    yield server
    server.stop()


@pytest.fixture
def seaweed(tmp_path: Path) -> Iterator[LocalSeaweed]:
    server = LocalSeaweed(tmp_path / "seaweed").start()
    yield server
    server.stop()


def _wait_for(what: str, done: object, proc_alive: object, stall_s: float = 120.0) -> None:
    """Poll ``done()`` while ``proc_alive()`` holds; fail after ``stall_s`` s without it."""
    assert callable(done) and callable(proc_alive)
    start = time.monotonic()
    while not done():
        assert proc_alive(), f"a replica died while waiting for {what}"
        assert time.monotonic() - start < stall_s, f"no {what} within {stall_s} s"
        time.sleep(0.1)


@pytest.mark.slow
def test_replicas_on_s3_and_postgresql_share_no_directory_and_lose_nothing_when_one_dies(
    tmp_path: Path, pg: PgServer, seaweed: LocalSeaweed, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key, value in seaweed.env().items():
        monkeypatch.setenv(key, value)
    bucket = seaweed.create_bucket(f"r-{uuid.uuid4().hex[:16]}")
    store_url = f"s3://{bucket}/store"
    url = pg.create_database(f"s3r_{uuid.uuid4().hex[:12]}")
    with ModelStore.open(store_url, catalog=url, cache_dir=tmp_path / "seed-cache") as s:
        s.commit_base(base_weights(width=64), name="tiny")
    tokens = write_tokens(tmp_path / "tokens.txt")

    def replica(name: str) -> ReplicaProcess:  # its own data dir and cache: no shared directory
        env = {"FEDMERGE_S3_CACHE": str(tmp_path / f"{name}-cache")}
        return ReplicaProcess(
            name, store_url, tmp_path / f"{name}-data", url, tokens, tmp_path / f"{name}.log", env=env
        )

    holder, other = replica("a"), replica("b")
    experts = 12
    paths = [write_expert(tmp_path, base_weights(width=64), s) for s in range(experts)]
    acked: list[str] = []
    try:
        holder.start()
        _wait_for("the lease", lambda: lease_holder_pid(url) is not None, lambda: holder.alive)
        assert holder.proc is not None and lease_holder_pid(url) == holder.proc.pid
        other.start(extra=["--dashboard-port", "0"])  # loopback: no operator's token needed

        # 1. experts acknowledged by the replica without the lease: merged by the holder from the bucket
        opts_other = ClientOptions(f"127.0.0.1:{other.port}", token=TOKEN)
        for p in paths[:4]:
            acked.append(submit_expert(opts_other, p, timeout=60).submission_id)
        objects = S3BlobBackend.connect(store_url, cache_dir=tmp_path / "probe-cache")
        for sid in acked:
            sub = wait_merged(opts_other, sid, timeout=300)
            assert sub.state == intake_pb2.SUBMISSION_STATE_MERGED, sub.reason
            assert objects.client.head_object(Bucket=bucket, Key=objects.loc.key(spool_object(sub.sha256)))
        # the replica's dashboard reads the same bucket and catalog: the merged versions, the shared queue
        dashboard = re.search(r"serving dashboard on (\S+)", other.log.read_text())
        assert dashboard is not None, other.tail()
        with urllib.request.urlopen(dashboard.group(1) + "/versions", timeout=60) as page:
            listed = page.read().decode()
        with ModelStore.open(store_url, catalog=url, cache_dir=tmp_path / "probe-store") as s:
            assert all(f"/versions/{v.id}" in listed for v in s.list(limit=3))
        with urllib.request.urlopen(dashboard.group(1) + "/intake", timeout=60) as page:
            assert page.status == 200

        # 2. clients push through both; the lease holder is SIGKILLed mid-stream and its disk lost
        rng = random.Random(7)
        errors: list[BaseException] = []

        def client(k: int) -> None:
            local = random.Random(50 + k)
            try:
                for p in paths[4 + k :: 2]:
                    acked.append(push_anywhere([holder, other], p, local, deadline_s=300))
            except BaseException as exc:  # reported below
                errors.append(exc)

        clients = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(2)]
        for t in clients:
            t.start()
        _wait_for("acknowledgements", lambda: len(acked) >= 6 + rng.randrange(2), lambda: other.alive)
        holder.kill()
        shutil.rmtree(tmp_path / "a-data")
        shutil.rmtree(tmp_path / "a-cache", ignore_errors=True)
        for t in clients:
            t.join()
        assert not errors, errors
        assert len(set(acked)) == experts
        for sid in acked:
            sub = wait_merged(opts_other, sid, timeout=300)
            assert sub.state == intake_pb2.SUBMISSION_STATE_MERGED, sub.reason
        assert other.proc is not None and lease_holder_pid(url) == other.proc.pid, "the survivor took over"
    except BaseException:
        for r in (holder, other):
            print(r.name, r.tail())
        raise
    finally:
        holder.kill()
        other.stop()
    # read back from the bucket alone: a fresh data dir and cache
    audit_track(
        store_url, tmp_path / "audit-data", url, expected=experts, acked=set(acked),
        objects=S3BlobBackend.connect(store_url, cache_dir=tmp_path / "audit-cache"),
        cache_dir=tmp_path / "audit-store-cache",
    )  # fmt: skip


def test_an_s3_store_keeps_the_intake_data_outside_the_stores_cache(tmp_path: Path) -> None:
    config = ServiceConfig(store="s3://bucket/prefix", allow_insecure=True, s3_endpoint="http://127.0.0.1:9")
    assert config.on_object_store
    assert config.intake_dir.name == "prefix.intake"
    assert ServiceConfig(store=str(tmp_path / "s"), allow_insecure=True).intake_dir == tmp_path / "intake"


@pytest.mark.slow
def test_the_object_store_down_at_submission_acknowledges_nothing_and_the_client_retries(
    tmp_path: Path, pg: PgServer, seaweed: LocalSeaweed, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SeaweedFS SIGKILLed under a running replica: a submission is refused as retryable
    (``UNAVAILABLE``) with no queue row; once it is back, the same expert is acknowledged and merged."""
    from fedmerge.service.client import ServiceCallError
    from fedmerge.service.server import IntakeServer

    for key, value in seaweed.env().items():
        monkeypatch.setenv(key, value)
    store_url = f"s3://{seaweed.create_bucket(f'd-{uuid.uuid4().hex[:16]}')}/store"
    url = pg.create_database(f"s3d_{uuid.uuid4().hex[:12]}")
    monkeypatch.setenv("FEDMERGE_S3_CACHE", str(tmp_path / "cache"))
    with ModelStore.open(store_url, catalog=url) as s:
        s.commit_base(base_weights(), name="tiny")
    config = ServiceConfig(
        store=store_url, data_dir=tmp_path / "data", listen="127.0.0.1:0", allow_insecure=True,
        catalog=url, lease_ttl_s=2.0,
    )  # fmt: skip
    server = IntakeServer(config)
    port = server.start()
    try:
        opts = ClientOptions(f"127.0.0.1:{port}")
        first = submit_expert(opts, write_expert(tmp_path, base_weights(), 1), timeout=60)
        assert wait_merged(opts, first.submission_id, timeout=120).state == intake_pb2.SUBMISSION_STATE_MERGED
        seaweed.kill()
        second = write_expert(tmp_path, base_weights(), 2)
        with pytest.raises(ServiceCallError) as refused:
            submit_expert(opts, second, retries=0, timeout=120)
        assert refused.value.retryable and "UNAVAILABLE" in str(refused.value), refused.value
        assert [s.id for s in server.queue.all()] == [first.submission_id], "nothing acknowledged"
        seaweed.start()
        again = submit_expert(opts, second, timeout=120)
        merged = wait_merged(opts, again.submission_id, timeout=300)
        assert merged.state == intake_pb2.SUBMISSION_STATE_MERGED, merged.reason
    finally:
        server.stop()
    with ModelStore.open(store_url, catalog=url) as s:
        assert s.get("continual").metadata["num_merged"] == 2
        assert s.verify().ok
