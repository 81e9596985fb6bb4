"""The queue's read API on both queues: one server's SQLite file and the replicas' PostgreSQL table
(a real PostgreSQL), the same snapshot from the same submissions; the dashboard's intake page reads
the PostgreSQL queue through it."""

from __future__ import annotations

import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from replica_helpers import PgServer

from fedmerge.service.intake import IntakeQueue
from fedmerge.service.intake_stats import QueueSnapshot, QueueUnreadable, find_queue, read_queue
from fedmerge.service.replicas import SharedIntakeQueue
from fedmerge.store import ModelStore

REASON = "tensor 'layer.weight' has shape [4, 8], the base has [8, 4]; fine-tune the store's base"


@pytest.fixture(scope="module")
def pg() -> Iterator[PgServer]:
    server = PgServer().start()
    yield server
    server.stop()


def _fill(queue: IntakeQueue) -> None:
    """Five submissions: two merged, one rejected, one failed, one queued."""
    subs = []
    for i, client in enumerate(("alice", "bob", "carol", "dave", "erin")):
        payload = f"expert {i}".encode()
        sub, _ = queue.receive(
            client_id=client, fmt="checkpoint", base_version="", label=f"e{i}",
            total_size=len(payload), chunks=[payload],
        )  # fmt: skip
        subs.append(sub)
    queue.mark_merged([subs[0].id, subs[1].id], "v000002")
    queue.mark_rejected(subs[2].id, REASON)
    queue.mark_failed(subs[3].id, "could not be merged: MemoryError")


def _comparable(snap: QueueSnapshot) -> tuple[object, ...]:
    return (
        snap.states,
        sorted((s.id, s.client_id, s.state, s.version, s.reason) for s in snap.refused),
        sorted((s.id, s.client_id, s.state, s.version) for s in snap.merged),
        len(snap.created_since),
    )


def test_the_postgresql_queue_reads_as_the_sqlite_queue(tmp_path: Path, pg: PgServer) -> None:
    url = pg.create_database(f"q_{uuid.uuid4().hex[:12]}")
    assert find_queue(tmp_path / "none", catalog=url) is None, "no intake table yet: no queue"
    local = IntakeQueue(tmp_path / "one")
    shared = SharedIntakeQueue(tmp_path / "replica", url)
    try:
        _fill(local)
        _fill(shared)
    finally:
        local.close()
        shared.close()
    assert find_queue(tmp_path / "one") == tmp_path / "one" / "queue.sqlite"
    assert find_queue(tmp_path / "one", catalog=url) == url, "the shared queue wins when it exists"
    on_sqlite = read_queue(tmp_path / "one", recent=10, since="1970-01-01")
    on_pg = read_queue(url, recent=10, since="1970-01-01")
    assert on_sqlite.states == {"merged": 2, "rejected": 1, "failed": 1, "queued": 1}
    assert _comparable(on_pg) == _comparable(on_sqlite)
    assert [s.state for s in read_queue(url, recent=1, since="9999").refused] == ["failed"]
    assert read_queue(url, recent=1, since="9999").created_since == []


def test_an_unreachable_queue_database_is_one_clear_error(tmp_path: Path, pg: PgServer) -> None:
    url = pg.create_database(f"q_{uuid.uuid4().hex[:12]}")
    gone = url.rsplit("/", 1)[0] + "/no_such_database"
    with pytest.raises(QueueUnreadable, match="no_such_database"):
        find_queue(tmp_path, catalog=gone)


def test_the_dashboard_intake_page_reads_the_shared_queue(
    tmp_path: Path, pg: PgServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedmerge.dashboard import start_in_background

    url = pg.create_database(f"q_{uuid.uuid4().hex[:12]}")
    store = tmp_path / "store"
    with ModelStore.open(store, catalog=url) as s:
        s.commit_base({"layer.weight": torch.zeros(8, 4)}, name="tiny")
    queue = SharedIntakeQueue(tmp_path / "replica", url)
    try:
        _fill(queue)
    finally:
        queue.close()
    monkeypatch.setenv("FEDMERGE_CATALOG", url)  # as `dashboard --catalog` and serve-continual set it
    nowhere = tmp_path / "no-local-queue"
    with (
        start_in_background(store, "127.0.0.1", 0, None, intake_dir=nowhere) as d,
        urllib.request.urlopen(d.url + "/intake", timeout=30) as r,
    ):
        html = r.read().decode()
    assert '<dd id="queue-depth">1</dd>' in html
    assert REASON.replace("'", "&#39;") in html and "carol" in html
