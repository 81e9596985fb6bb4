"""gc of the shared store's leftovers against a real SeaweedFS and PostgreSQL: incomplete multipart
uploads, the replicas' spool objects and an interrupted commit's manifest copy, aged by the object
store's clock; gc refuses a catalog that is not the bucket's."""

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
from store_test_helpers import commit_delta, tiny_delta, tiny_model

from fedmerge.store import ModelStore
from fedmerge.store.errors import StoreIntegrityError
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


def _manifest_ages(client: Any, bucket: str, prefix: str) -> dict[str, float]:
    """Every object under ``<prefix>/manifests/`` → its age by the server's clock."""
    answer = client.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/manifests/")
    now = server_time(answer)
    objects = answer.get("Contents", [])
    return {o["Key"].rsplit("/", 1)[-1]: now - o["LastModified"].timestamp() for o in objects}


def test_gc_sweeps_an_interrupted_commits_manifest_copy_once_old_and_refuses_a_foreign_catalog(
    seaweed_server: LocalSeaweed, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key, value in seaweed_server.env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("FEDMERGE_S3_CACHE", str(tmp_path / "s3-cache"))  # where the CLI finds the catalog
    bucket = seaweed_server.create_bucket(f"m-{uuid.uuid4().hex[:20]}")
    url = f"s3://{bucket}/store"
    client = seaweed_server.client()
    store = ModelStore.open(url)  # the SQLite catalog in the default cache directory
    base = tiny_model()
    root = store.commit_base(base, name="tiny")

    def dies(*args: object, **kwargs: object) -> None:
        raise RuntimeError("the server died between the manifest copy and the catalog row")

    with monkeypatch.context() as patch:
        patch.setattr(store.catalog, "insert_version", dies)
        with pytest.raises(RuntimeError, match="server died"):
            commit_delta(store, tiny_delta(base, 1), root.id, 1)
    orphan = f"{url}/manifests/v000002.json"
    assert set(_manifest_ages(client, bucket, "store")) == {"v000001.json", "v000002.json"}
    assert [r.id for r in store.catalog.rows()] == [root.id]

    young = store.gc(GRACE)  # inside the grace period: kept
    assert orphan not in young.removed_files and young.kept_young >= 1
    assert "v000002.json" in _manifest_ages(client, bucket, "store")
    while _manifest_ages(client, bucket, "store")["v000002.json"] < GRACE + 1.5:
        time.sleep(0.5)

    cli = subprocess.run(
        [sys.executable, "-m", "fedmerge.cli", "store", "--s3-endpoint", seaweed_server.endpoint,
         "gc", "--store", url, "--grace-seconds", str(GRACE), "--dry-run"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert cli.returncode == 0, cli.stderr
    assert orphan in cli.stdout.split()
    listed = store.gc(GRACE, dry_run=True)
    assert [f for f in listed.removed_files if f.startswith("s3://")] == [orphan]
    assert set(_manifest_ages(client, bucket, "store")) == {"v000001.json", "v000002.json"}  # dry run

    report = store.gc(GRACE)
    assert [f for f in report.removed_files if f.startswith("s3://")] == [orphan]
    assert set(_manifest_ages(client, bucket, "store")) == {"v000001.json"}
    assert report.removed_blobs and set(report.removed_blobs).isdisjoint(root.blobs)  # its blobs too

    v2 = commit_delta(store, tiny_delta(base, 2), root.id, 1)  # takes the number again
    assert v2.id == "v000002"
    assert store.gc(0).removed_files == []  # a committed version's copy is never touched
    assert set(_manifest_ages(client, bucket, "store")) == {"v000001.json", "v000002.json"}
    assert store.verify().problems == []
    store.close()

    # the bucket read through a fresh catalog (another cache directory): gc refuses, removes nothing
    blobs_before = client.list_objects_v2(Bucket=bucket, Prefix="store/blobs/")["KeyCount"]
    refused = r"gc refused, nothing removed.*v000001\.json"
    with (
        ModelStore.open(url, cache_dir=tmp_path / "elsewhere") as stranger,
        pytest.raises(StoreIntegrityError, match=refused),
    ):
        stranger.gc(0)
    assert client.list_objects_v2(Bucket=bucket, Prefix="store/blobs/")["KeyCount"] == blobs_before
    assert set(_manifest_ages(client, bucket, "store")) == {"v000001.json", "v000002.json"}
