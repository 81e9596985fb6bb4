"""The streamed export of a version from the object store (blobs read by ranged GETs on many threads,
each tensor copied in :attr:`S3BlobBackend.read_chunk_bytes` steps), against a real SeaweedFS: the
same bytes as the export of the same weights from a local store, and a blob whose bytes changed in
the bucket after its first step still fails the export with nothing published."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
import torch

from fedmerge.store import ModelStore
from fedmerge.store.errors import CorruptBlobError
from fedmerge.store.s3 import S3BlobBackend
from fedmerge.store.s3_local import LocalSeaweed

pytest.importorskip("boto3")


@pytest.fixture
def bucket(seaweed_server: LocalSeaweed, monkeypatch: pytest.MonkeyPatch) -> str:
    for key, value in seaweed_server.env().items():
        monkeypatch.setenv(key, value)
    return seaweed_server.create_bucket(f"e-{uuid.uuid4().hex[:20]}")


def _weights() -> dict[str, torch.Tensor]:
    """Tensors of several copy steps each, none a whole number of steps, in three dtypes."""
    g = torch.Generator().manual_seed(11)
    out = {f"layers.{i}.weight": torch.randn(300_000 + 977 * i, generator=g) for i in range(6)}
    out["embed.weight"] = torch.randn(700, 1000, generator=g).to(torch.bfloat16)
    out["head.weight"] = torch.randn(333, 1001, generator=g).to(torch.float16)
    out["position_ids"] = torch.arange(4099)
    return out


def _ranged(store: ModelStore, threads: int) -> S3BlobBackend:
    backend = store.blobs
    assert isinstance(backend, S3BlobBackend)
    backend.cache_blob_max = 0  # every blob read by ranges, nothing cached
    backend.read_threads = threads
    return backend


def test_export_by_ranges_on_many_threads_equals_the_local_export(bucket: str, tmp_path: Path) -> None:
    weights = _weights()
    with ModelStore.open(tmp_path / "local") as local:
        local.commit_base(weights, name="m")
        local.export("latest", tmp_path / "want")
    want = (tmp_path / "want" / "model.safetensors").read_bytes()
    with ModelStore.open(f"s3://{bucket}/m", cache_dir=tmp_path / "cache") as store:
        store.commit_base(weights, name="m")
        backend = _ranged(store, threads=16)
        assert backend.read_chunk_bytes < max(t.numel() * t.element_size() for t in weights.values())
        for threads in (16, 1):
            backend.read_threads = threads
            out = tmp_path / f"got-{threads}"
            store.export("latest", out)
            assert (out / "model.safetensors").read_bytes() == want, f"{threads} threads"
        assert not list(backend.blob_dir.glob("*/*.safetensors"))  # read by ranges, nothing cached


def test_a_blob_changed_past_its_first_step_fails_the_export_and_publishes_nothing(
    bucket: str, seaweed_server: LocalSeaweed, tmp_path: Path
) -> None:
    weights = _weights()
    with ModelStore.open(f"s3://{bucket}/m", cache_dir=tmp_path / "cache") as store:
        v = store.commit_base(weights, name="m")
        backend = _ranged(store, threads=16)
        digest = v.tensors["layers.5.weight"].blob
        client = seaweed_server.client()
        key = backend.key(digest)
        raw = bytearray(client.get_object(Bucket=bucket, Key=key)["Body"].read())
        at = len(raw) - backend.read_chunk_bytes // 3  # inside the last copy step, not the first
        assert at > backend.read_chunk_bytes
        raw[at] ^= 0x01
        client.put_object(Bucket=bucket, Key=key, Body=bytes(raw))  # an overwrite outside the store
        out = tmp_path / "export"
        with pytest.raises(CorruptBlobError, match=digest):
            store.export("latest", out)
        assert not out.exists()
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".export")]  # no staging left
