"""Several intake replicas on one store and one real PostgreSQL (catalog, queue, track lease).

The lease (by the database's clock), a lease that expires while its holder merges (the commit is
refused), two replicas serving and racing for the track, and PostgreSQL restarted under a running
replica: every acknowledged expert merged exactly once, in a single linear chain, equal to OPCM
run directly on the same experts."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from replica_helpers import PgServer, audit_track
from service_helpers import TOKEN, base_weights, make_store, server_config, write_expert

from fedmerge.service.client import ClientOptions, submit_expert, wait_merged
from fedmerge.service.config import ServiceConfigError
from fedmerge.service.replicas import SharedIntakeQueue, TrackLease
from fedmerge.service.server import IntakeServer
from fedmerge.service.worker import MergeWorker
from fedmerge.store import ModelStore
from fedmerge.store.pg_catalog import LeaseLostError
from fedmerge.v1 import intake_pb2


@pytest.fixture(scope="module")
def pg() -> Iterator[PgServer]:
    server = PgServer().start()
    yield server
    server.stop()


@pytest.fixture
def url(pg: PgServer) -> str:
    return pg.create_database(f"r_{uuid.uuid4().hex[:12]}")


def _shared_store(tmp_path: Path, url: str) -> Path:
    store = tmp_path / "store"
    with ModelStore.open(store, catalog=url) as s:
        s.commit_base(base_weights(), name="tiny")
    return store


def _receive(q: SharedIntakeQueue, path: Path, client: str = "client-00") -> str:
    data = path.read_bytes()
    sub, _ = q.receive(
        client_id=client, fmt="checkpoint", base_version="", label="", total_size=len(data), chunks=[data]
    )
    return sub.id


def test_the_lease_is_exclusive_expires_by_the_database_clock_and_counts_takeovers(url: str) -> None:
    a = TrackLease(url, "continual", ttl_s=0.6, holder="a")
    b = TrackLease(url, "continual", ttl_s=0.6, holder="b")
    assert a.acquire() and a.token == 1
    assert not b.acquire(), "held and unexpired: nobody else takes it"
    assert a.renew() and a.acquire(), "the holder renews"
    time.sleep(0.8)  # a stops renewing (it died)
    assert b.acquire() and b.token == 2, "taken over with the next fencing token"
    assert not a.renew() and a.token is None, "the old holder learns it lost the lease"
    b.release()
    assert a.acquire() and a.token == 3, "released: taken at once"
    assert a.holder_now() == ("a", 3, True)
    a.close()
    b.close()


def test_a_lease_that_expires_while_merging_commits_nothing_and_the_new_holder_merges_once(
    tmp_path: Path, url: str
) -> None:
    store_path = _shared_store(tmp_path, url)
    q = SharedIntakeQueue(tmp_path / "intake", url)
    sid = _receive(q, write_expert(tmp_path, base_weights(), 1))
    slow = ModelStore.open(store_path, catalog=url)
    lease_a = TrackLease(url, "continual", ttl_s=0.5, holder="a")
    assert lease_a.acquire()
    slow.catalog.set_fence("continual", "a", lease_a.token or 0)  # type: ignore[attr-defined]
    worker_a = MergeWorker(slow, q, method="opcm", params={})
    time.sleep(0.7)  # a pause longer than the lease (GC, swap, a stopped VM) mid-merge
    lease_b = TrackLease(url, "continual", ttl_s=30, holder="b")
    assert lease_b.acquire() and lease_b.token == 2
    with pytest.raises(LeaseLostError, match="expired or was taken over"):
        worker_a.step()
    assert [v.id for v in slow.list()] == ["v000001"], "the expired holder committed nothing"
    assert q.get(sid).state == "queued", "the acknowledged expert is still waiting"
    other = ModelStore.open(store_path, catalog=url)
    other.catalog.set_fence("continual", "b", lease_b.token or 0)  # type: ignore[attr-defined]
    worker_b = MergeWorker(other, q, method="opcm", params={})
    worker_b.recover()
    version = worker_b.step()
    assert version is not None and q.get(sid).state == "merged" and q.get(sid).version == version.id
    assert [c.submission_hash for c in version.contributors] == [q.get(sid).sha256]
    for closable in (slow, other, q, lease_a, lease_b):
        closable.close()


def _serve(store: Path, data: Path, url: str, ttl: float = 1.5) -> IntakeServer:
    srv = IntakeServer(server_config(store, data_dir=data, catalog=url, lease_ttl_s=ttl))
    srv.start()
    return srv


def test_two_replicas_serve_one_track_merge_each_expert_once_equal_to_direct_opcm(
    tmp_path: Path, url: str, pg: PgServer
) -> None:
    store = _shared_store(tmp_path, url)
    data = tmp_path / "intake"  # one directory both replicas share (a shared filesystem in production)
    replicas = [_serve(store, data, url), _serve(store, data, url)]
    try:
        paths = [write_expert(tmp_path, base_weights(), s) for s in range(8)]
        acked: list[str] = []
        errors: list[BaseException] = []

        def push(offset: int) -> None:
            try:
                for i, p in enumerate(paths[offset::2]):
                    opts = ClientOptions(f"127.0.0.1:{replicas[(i + offset) % 2].port}", token=TOKEN)
                    acked.append(submit_expert(opts, p, retries=60, backoff=0.1).submission_id)
            except BaseException as exc:  # reported below
                errors.append(exc)

        pushers = [threading.Thread(target=push, args=(k,)) for k in (0, 1)]
        for t in pushers:
            t.start()
        for t in pushers:
            t.join(300)
        assert not errors, errors
        assert len(set(acked)) == 8
        opts = ClientOptions(f"127.0.0.1:{replicas[0].port}", token=TOKEN)
        subs = [wait_merged(opts, sid, timeout=300) for sid in acked]
        assert all(s.state == intake_pb2.SUBMISSION_STATE_MERGED for s in subs), [s.reason for s in subs]
    finally:
        for srv in replicas:
            srv.stop(0.5)
    audit_track(store, data, url, expected=8)


def test_postgres_restarted_under_a_running_replica_loses_no_acknowledged_expert(
    tmp_path: Path, url: str, pg: PgServer
) -> None:
    store = _shared_store(tmp_path, url)
    data = tmp_path / "intake"
    srv = _serve(store, data, url)
    try:
        opts = ClientOptions(f"127.0.0.1:{srv.port}", token=TOKEN)
        paths = [write_expert(tmp_path, base_weights(), s) for s in range(6)]
        acked = [submit_expert(opts, p, retries=60, backoff=0.1).submission_id for p in paths[:3]]
        pg.kill()  # the database crashes; the replica's connections break mid-whatever
        restarter = threading.Timer(1.0, pg.restart)
        restarter.start()
        # submissions during the outage get UNAVAILABLE and are retried with back-off
        acked += [submit_expert(opts, p, retries=200, backoff=0.1).submission_id for p in paths[3:]]
        restarter.join()
        subs = [wait_merged(opts, sid, timeout=300) for sid in acked]
        assert all(s.state == intake_pb2.SUBMISSION_STATE_MERGED for s in subs), [s.reason for s in subs]
    finally:
        srv.stop(0.5)
    audit_track(store, data, url, expected=6)


def test_a_catalog_that_is_not_postgresql_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ServiceConfigError, match="postgresql://"):
        server_config(make_store(tmp_path), catalog="sqlite:///x.db")
    with pytest.raises(ServiceConfigError, match="lease_ttl_s"):
        server_config(tmp_path / "store", catalog="postgresql://x@127.0.0.1/db", lease_ttl_s=0)
