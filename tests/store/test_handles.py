"""Another handle on an open store (``store.handles.reopener``) names the same store in every part —
directory or bucket, endpoint, cache and catalog — and the rounds' bulk endpoint, which opens the
store in its own threads, serves a base from an ``s3://`` store with a PostgreSQL catalog (a real
SeaweedFS and PostgreSQL) bit for bit."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
import torch
from pg_server import PgServer
from safetensors.torch import load as load_safetensors

from fedmerge.flower.config import parse_run_config
from fedmerge.flower.server.bulk_endpoint import bulk_endpoint_for
from fedmerge.store import ModelStore
from fedmerge.store.handles import reopener
from fedmerge.store.pg_catalog import PgCatalog
from fedmerge.store.s3 import S3BlobBackend
from fedmerge.store.s3_local import LocalSeaweed


def _base() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    return {"layer.weight": torch.randn(64, 32, generator=gen), "layer.bias": torch.randn(64, generator=gen)}


def test_a_directory_store_reopens_on_its_directory_and_sqlite(tmp_path: Path) -> None:
    with ModelStore.open(tmp_path / "store") as store:
        v = store.commit_base(_base(), name="tiny")
        with reopener(store)() as again:
            assert again.root == store.root and not isinstance(again.catalog, PgCatalog)
            assert again.get("latest").id == v.id


def test_the_bulk_endpoint_serves_a_base_from_s3_and_postgresql(
    tmp_path: Path, pg_server: PgServer, seaweed_server: LocalSeaweed, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key, value in seaweed_server.env().items():
        monkeypatch.setenv(key, value)
    url = f"s3://{seaweed_server.create_bucket(f'h-{uuid.uuid4().hex[:16]}')}/store"
    catalog = pg_server.create_database(f"h_{uuid.uuid4().hex[:12]}")
    with ModelStore.open(url, catalog=catalog, cache_dir=tmp_path / "cache") as store:
        base = store.commit_base(_base(), name="tiny")
        with reopener(store)() as again:  # the same bucket, endpoint, cache and catalog
            assert isinstance(again.catalog, PgCatalog) and again.catalog.url == catalog
            assert isinstance(again.blobs, S3BlobBackend) and str(again.blobs.loc) == url
            assert again.root == store.root and again.get("latest").id == base.id
        cfg = parse_run_config(
            {"store": url, "catalog": catalog, "bulk-address": "127.0.0.1:0", "bulk-downlink": True,
             "bulk-spool-dir": str(tmp_path / "spool"), "bulk-threshold-bytes": 0}
        )  # fmt: skip
        with bulk_endpoint_for(cfg, store) as endpoint:
            endpoint.open_round(1, 0)
            reference = endpoint.offer_base(1, 0, 7, base)
            assert reference is not None
            offer = endpoint.offer_of(1, 0)
            assert offer is not None
            data = b"".join(chunk.data for chunk in endpoint.stream_base(offer))
        assert len(data) == offer.size
        got = load_safetensors(data)
        want = store.materialize(base)
        assert sorted(got) == sorted(want)
        for name, tensor in want.items():
            assert torch.equal(got[name], tensor), name
