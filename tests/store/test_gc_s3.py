"""gc of the shared store's intake leftovers against a real SeaweedFS and PostgreSQL: incomplete
multipart uploads and the replicas' spool objects, aged by the object store's clock."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from store_test_helpers import tiny_model

from fedmerge.store import ModelStore
from fedmerge.store.pg_local import LocalPostgres
from fedmerge.store.s3 import INTAKE_SPOOL, S3BlobBackend
from fedmerge.store.s3_client import server_time
from fedmerge.store.s3_local import LocalSeaweed

pytest.importorskip("boto3")

GRACE = 4.0  # the fresh objects below must stay younger than this until the second gc


@pytest.fixture
def shared(
    seaweed_server: LocalSeaweed, pg_server: LocalPostgres, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[ModelStore, str, Any, str]]:
    """A store on a fresh bucket with its catalog in a fresh PostgreSQL database, and a replica's
    queue (:class:`~fedmerge.service.replicas.SharedIntakeQueue`) on both."""
    from fedmerge.service.replicas import SharedIntakeQueue

    for key, value in seaweed_server.env().items():
        monkeypatch.setenv(key, value)
    bucket = seaweed_server.create_bucket(f"g-{uuid.uuid4().hex[:20]}")
    url, catalog = f"s3://{bucket}/store", pg_server.create_database(f"g_{uuid.uuid4().hex[:12]}")
    store = ModelStore.open(url, catalog=catalog, cache_dir=tmp_path / "cache")
    store.commit_base(tiny_model(), name="tiny")
    queue = SharedIntakeQueue(
        tmp_path / "replica", catalog, objects=S3BlobBackend.connect(url, cache_dir=tmp_path / "q-cache")
    )
    yield store, bucket, queue, catalog
    queue.close()
    store.close()


def _submit(queue: Any, payload: bytes) -> Any:
    sub, _ = queue.receive(
        client_id="alice", fmt="checkpoint", base_version="", label="e", total_size=len(payload),
        chunks=[payload],
    )  # fmt: skip
    return sub


def _uploads(client: Any, bucket: str) -> dict[str, float]:
    """Every incomplete upload id → its age by the server's clock."""
    answer = client.list_multipart_uploads(Bucket=bucket)
    now = server_time(answer)
    return {u["UploadId"]: now - u["Initiated"].timestamp() for u in answer.get("Uploads", [])}


def _spool_keys(client: Any, bucket: str) -> set[str]:
    answer = client.list_objects_v2(Bucket=bucket, Prefix=f"store/{INTAKE_SPOOL}/")
    return {o["Key"].rsplit("/", 1)[-1] for o in answer.get("Contents", [])}


def test_gc_sweeps_old_uploads_and_unreferenced_spool_objects_only(
    shared: tuple[ModelStore, str, Any, str], seaweed_server: LocalSeaweed
) -> None:
    store, bucket, queue, catalog = shared
    backend = store.blobs
    assert isinstance(backend, S3BlobBackend)
    client = seaweed_server.client()
    merged, waiting = _submit(queue, b"merged expert"), _submit(queue, b"queued expert")
    queue.mark_merged([merged.id], "v000001")
    # a replica that died after uploading but before acknowledging leaves an object with no row
    dead = b"never acknowledged"
    dead_sha = hashlib.sha256(dead).hexdigest()
    client.put_object(Bucket=bucket, Key=f"store/{INTAKE_SPOOL}/{dead_sha}", Body=dead)
    old_blob = client.create_multipart_upload(Bucket=bucket, Key=backend.key("1" * 64))["UploadId"]
    spool_key = f"store/{INTAKE_SPOOL}/{'2' * 64}"
    old_spool = client.create_multipart_upload(Bucket=bucket, Key=spool_key)["UploadId"]
    # age them past the grace period by the object store's clock (no local clock involved)
    ages = _uploads(client, bucket)
    while min(ages[old_blob], ages[old_spool]) < GRACE + 1.5:
        time.sleep(0.5)
        ages = _uploads(client, bucket)
    cli = subprocess.run(
        [sys.executable, "-m", "fedmerge.cli", "store", "--catalog", catalog,
         "--s3-endpoint", seaweed_server.endpoint, "gc", "--store", f"s3://{bucket}/store",
         "--grace-seconds", str(GRACE), "--dry-run"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert cli.returncode == 0, cli.stderr
    assert "2 intake spool objects" in " ".join(cli.stdout.split())  # however the console wraps
    for named in (merged.sha256, dead_sha, old_blob, old_spool):
        assert named in cli.stdout
    fresh_upload = client.create_multipart_upload(Bucket=bucket, Key=backend.key("3" * 64))["UploadId"]
    fresh = b"just uploaded, no row yet"
    fresh_sha = hashlib.sha256(fresh).hexdigest()
    client.put_object(Bucket=bucket, Key=f"store/{INTAKE_SPOOL}/{fresh_sha}", Body=fresh)

    listed = store.gc(GRACE, dry_run=True)
    assert sorted(s.rsplit("/", 1)[-1] for s in listed.removed_spool) == sorted([merged.sha256, dead_sha])
    assert {f.rsplit(" ", 1)[-1].rstrip(")") for f in listed.removed_files} >= {old_blob, old_spool}
    assert fresh_upload not in " ".join(listed.removed_files)
    assert set(_uploads(client, bucket)) == {old_blob, old_spool, fresh_upload}  # nothing removed
    assert _spool_keys(client, bucket) == {merged.sha256, waiting.sha256, dead_sha, fresh_sha}

    report = store.gc(GRACE)
    assert report.removed_spool == listed.removed_spool and report.kept_young >= 2
    assert set(_uploads(client, bucket)) == {fresh_upload}
    assert _spool_keys(client, bucket) == {waiting.sha256, fresh_sha}
    assert queue.spooled(queue.get(waiting.id)).read_bytes() == b"queued expert"
    assert store.verify().problems == []


def test_an_expert_acknowledged_while_gc_deletes_its_old_copy_is_uploaded_again(
    shared: tuple[ModelStore, str, Any, str], seaweed_server: LocalSeaweed, pg_server: LocalPostgres
) -> None:
    """The replica's half of the rule: gc holds the queue table (SHARE) while it deletes; the replica's
    conditional upload found the old copy, its row waits for gc, then it finds the copy gone and
    uploads it again before acknowledging."""
    import psycopg

    store, bucket, queue, catalog = shared
    client = seaweed_server.client()
    payload = b"resubmitted after its first replica died"
    sha = hashlib.sha256(payload).hexdigest()
    client.put_object(Bucket=bucket, Key=f"store/{INTAKE_SPOOL}/{sha}", Body=payload)  # the old copy
    with psycopg.connect(catalog) as gc_conn, psycopg.connect(catalog, autocommit=True) as watch:
        gc_conn.execute("LOCK TABLE submissions IN SHARE MODE")  # what gc holds while it sweeps
        done: list[Any] = []
        replica = threading.Thread(target=lambda: done.append(_submit(queue, payload)))
        replica.start()
        waiting = "SELECT count(*) FROM pg_locks WHERE NOT granted"
        while not (watch.execute(waiting).fetchone() or (0,))[0]:
            assert replica.is_alive(), "the replica acknowledged without waiting for gc's lock"
            time.sleep(0.05)
        client.delete_object(Bucket=bucket, Key=f"store/{INTAKE_SPOOL}/{sha}")  # gc's delete
        gc_conn.commit()
        replica.join(60)
    assert done and done[0].state == "queued"
    assert sha in _spool_keys(client, bucket)
    assert store.gc(0).removed_spool == []  # queued: kept whatever its age
