"""The dashboard of a store on object storage: ``s3://bucket/prefix`` on a real SeaweedFS, its catalog
and the replicas' intake queue in a real PostgreSQL — read-only, over HTTP, as on a directory store."""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from fedmerge.dashboard import NotAStoreError, start_in_background
from fedmerge.store import Contributor, ModelStore
from fedmerge.store.pg_local import LocalPostgres
from fedmerge.store.s3_local import LocalSeaweed

pytest.importorskip("boto3")

REASON = "tensor layer.weight has shape [4, 8], the base has [8, 4]; fine-tune the base"


@pytest.fixture(scope="module")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSeaweed]:
    server = LocalSeaweed(tmp_path_factory.mktemp("seaweed")).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def pg() -> Iterator[LocalPostgres]:
    server = LocalPostgres().start()
    yield server
    server.stop()


@pytest.fixture
def s3env(seaweed: LocalSeaweed, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> LocalSeaweed:
    """Credentials in the environment; the endpoint only where a test passes it (``--s3-endpoint``);
    a private read-through cache so nothing is shared with the writer's cache."""
    for key, value in seaweed.env().items():
        if key != "AWS_ENDPOINT_URL":
            monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.setenv("FEDMERGE_S3_CACHE", str(tmp_path / "dashboard-cache"))
    return seaweed


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=60) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_the_dashboard_reads_an_s3_store_on_the_shared_catalog(
    s3env: LocalSeaweed, pg: LocalPostgres, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedmerge.service.replicas import SharedIntakeQueue
    from fedmerge.store.s3 import S3BlobBackend

    bucket = s3env.create_bucket(f"d-{uuid.uuid4().hex[:20]}")
    url, catalog = f"s3://{bucket}/models", pg.create_database(f"d_{uuid.uuid4().hex[:12]}")
    base = {"layer.weight": torch.randn(8, 4, generator=torch.Generator().manual_seed(0))}
    with ModelStore.open(
        url, catalog=catalog, s3_endpoint=s3env.endpoint, cache_dir=tmp_path / "writer-cache"
    ) as st:
        root = st.commit_base(base, name="tiny")
        merged = st.commit(
            {"layer.weight": torch.full((8, 4), 0.01)},
            parents=[root.id],
            method="fedavg",
            params={},
            contributors=[Contributor("client-0", 10, f"{1:064x}")],
            round=1,
            metrics={},
            privacy=None,
        )
    queue = SharedIntakeQueue(
        tmp_path / "replica",
        catalog,
        objects=S3BlobBackend.connect(url, endpoint=s3env.endpoint, cache_dir=tmp_path / "queue-cache"),
    )
    try:
        sub, _ = queue.receive(
            client_id="carol", fmt="checkpoint", base_version=root.id, label="e0", total_size=3,
            chunks=[b"abc"],
        )  # fmt: skip
        queue.mark_rejected(sub.id, REASON)
    finally:
        queue.close()

    monkeypatch.setenv("FEDMERGE_CATALOG", catalog)  # as `dashboard --catalog` sets it
    with start_in_background(url, "127.0.0.1", 0, None, s3_endpoint=s3env.endpoint) as d:
        status, versions = _get(d.url + "/versions")
        assert status == 200 and root.id in versions and merged.id in versions
        assert url in versions  # the header names the store
        status, page = _get(f"{d.url}/versions/{merged.id}")
        assert status == 200 and "client-0" in page and f"/versions/{root.id}" in page  # its parent
        status, intake = _get(d.url + "/intake")
        assert status == 200 and "carol" in intake and REASON in intake
        status, _ = _get(d.url + "/versions/v999999")
        assert status == 404


def test_an_s3_url_that_holds_no_store_is_refused_in_one_line(
    s3env: LocalSeaweed, pg: LocalPostgres, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bucket = s3env.create_bucket(f"d-{uuid.uuid4().hex[:20]}")
    monkeypatch.delenv("FEDMERGE_CATALOG", raising=False)
    with pytest.raises(NotAStoreError, match="holds no fedmerge store"):
        start_in_background(f"s3://{bucket}/nothing", "127.0.0.1", 0, None, s3_endpoint=s3env.endpoint)
    catalog = pg.create_database(f"d_{uuid.uuid4().hex[:12]}")
    with ModelStore.open(
        f"s3://{bucket}/m", catalog=catalog, s3_endpoint=s3env.endpoint, cache_dir=tmp_path / "w"
    ) as st:
        st.commit_base({"w": torch.zeros(3)}, name="b")
    with pytest.raises(NotAStoreError, match="pass the store's catalog with --catalog"):
        start_in_background(f"s3://{bucket}/m", "127.0.0.1", 0, None, s3_endpoint=s3env.endpoint)
    env = {k: v for k, v in os.environ.items() if k != "FEDMERGE_CATALOG"}
    cli = subprocess.run(
        [sys.executable, "-m", "fedmerge.cli", "dashboard", "--store", f"s3://{bucket}/m",
         "--s3-endpoint", s3env.endpoint, "--port", "0"],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert cli.returncode != 0 and "pass the store's catalog with --catalog" in cli.stderr
    assert "Traceback" not in cli.stderr + cli.stdout
