"""The parallel, chunked export writes the bytes the streaming writer writes, and trusts no bad blob.

The reference output is built here with :func:`fedmerge.store.safetensors_format.write_streaming` over
:meth:`ModelStore.iter_materialized` (one tensor at a time, the plain formula), shard by shard with the
same plan; the export must produce byte-identical files whatever the number of threads and the chunk
size (small chunks make every tensor cross many chunk boundaries).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from store_test_helpers import commit_delta, tiny_model

import fedmerge.store.export as export_mod
from fedmerge.errors import ConfigError
from fedmerge.store import CorruptBlobError, MissingBlobError, ModelStore, Version
from fedmerge.store.export import INDEX_FILE, export_safetensors, plan_shards, shard_names
from fedmerge.store.safetensors_format import write_streaming


def _model() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    model = tiny_model(3)
    model.update(
        {
            "big.weight": torch.randn(37, 29, generator=g),  # 1073 elements: not a multiple of any chunk
            "big.half": torch.randn(301, generator=g).to(torch.float16),
            "empty.weight": torch.zeros(0, 4),
            "ids": torch.arange(77, dtype=torch.int32),
            "mask": torch.rand(33, generator=g) > 0.5,
        }
    )
    return model


def _delta(base: dict[str, torch.Tensor], seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + seed)
    return {
        n: (0.1 * torch.randn(t.shape, generator=g, dtype=torch.float64)).to(dtype)
        for n, t in sorted(base.items())
        if t.is_floating_point()
    }


def _chain(store: ModelStore) -> tuple[Version, Version]:
    """A root and a version three deltas down (fp32, bf16 and fp64 deltas: every cast path)."""
    base = _model()
    root = store.commit_base(base, name="mixed")
    v = root
    for i, dtype in enumerate([torch.float32, torch.bfloat16, torch.float64]):
        v = commit_delta(store, _delta(base, i, dtype), v.id, i + 1)
    return root, v


def _reference(store: ModelStore, vid: str, max_shard_bytes: int, out: Path) -> None:
    """The expected files: the streaming writer over iter_materialized, with the export's plan."""
    out.mkdir()
    shards = plan_shards(store.materialized_specs(vid), max_shard_bytes)
    tensors = store.iter_materialized(vid)
    for shard, name in zip(shards, shard_names(len(shards)), strict=True):
        with (out / name).open("wb") as fh:
            write_streaming(fh, shard, tensors, metadata={"format": "pt"})


@pytest.mark.parametrize("workers", [1, 3])
@pytest.mark.parametrize("chunk_bytes", [64, 1 << 20])
@pytest.mark.parametrize("max_shard_bytes", [10**9, 2000])
def test_export_is_byte_identical_to_the_streaming_writer(
    store: ModelStore,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    workers: int,
    chunk_bytes: int,
    max_shard_bytes: int,
) -> None:
    monkeypatch.setattr(export_mod, "CHUNK_BYTES", chunk_bytes)
    monkeypatch.setattr(export_mod, "CHUNK_ELEMENTS", chunk_bytes // 8)
    monkeypatch.setattr(export_mod, "WRITEBACK_BYTES", 3 * chunk_bytes)
    root, v = _chain(store)
    for version in (root, v):
        out = tmp_path / f"out-{version.id}"
        result = export_safetensors(store, version.id, out, max_shard_bytes=max_shard_bytes, workers=workers)
        ref = tmp_path / f"ref-{version.id}"
        _reference(store, version.id, max_shard_bytes, ref)
        weights = sorted(p.name for p in ref.iterdir())
        assert [f for f in result.files if f.endswith(".safetensors")] == weights
        assert (len(weights) > 1) == (max_shard_bytes == 2000)
        for name in weights:
            assert (out / name).read_bytes() == (ref / name).read_bytes(), (version.id, name)
        if len(weights) > 1:
            index = json.loads((out / INDEX_FILE).read_text())
            assert sorted(set(index["weight_map"].values())) == weights
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_a_chain_export_differs_from_its_root_by_the_summed_deltas(store: ModelStore, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    _, v = _chain(store)
    export_safetensors(store, v.id, tmp_path / "v", workers=2)
    got = load_file(tmp_path / "v" / "model.safetensors")
    base = _model()
    deltas = [_delta(base, i, dt) for i, dt in enumerate([torch.float32, torch.bfloat16, torch.float64])]
    for name, t in base.items():
        assert got[name].dtype == t.dtype and got[name].shape == t.shape, name
        if not t.is_floating_point():
            assert torch.equal(got[name], t), name
            continue
        acc = t.to(torch.float64 if t.dtype == torch.float64 else torch.float32)
        for d in deltas:
            acc += d[name].to(acc.dtype)
        assert torch.equal(got[name], acc.to(t.dtype)), name


def _flip_last_byte(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0x01
    path.write_bytes(bytes(raw))


def _leftovers(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in tmp_path.iterdir() if p.name != "store")


@pytest.mark.parametrize("which", ["root", "delta"])
def test_a_corrupted_blob_fails_the_export_and_leaves_nothing(
    store: ModelStore, tmp_path: Path, which: str
) -> None:
    root, v = _chain(store)
    owner = root if which == "root" else store.get(v.parents[0])
    _flip_last_byte(store.blobs.local_path(owner.tensors["big.weight"].blob))
    with pytest.raises(CorruptBlobError, match=rf"version {owner.id} tensor 'big.weight'.*corrupted"):
        export_safetensors(store, v.id, tmp_path / "out", workers=2)
    assert _leftovers(tmp_path) == []


def test_a_blob_with_a_damaged_header_is_reported_as_corrupted(store: ModelStore, tmp_path: Path) -> None:
    root, v = _chain(store)
    path = store.blobs.local_path(root.tensors["ids"].blob)
    raw = bytearray(path.read_bytes())
    raw[10] = ord("#")  # inside the JSON header: it no longer parses
    path.write_bytes(bytes(raw))
    for ref in (root.id, v.id):
        with pytest.raises(CorruptBlobError, match=rf"version {root.id} tensor 'ids'.*corrupted"):
            export_safetensors(store, ref, tmp_path / "out")
        assert _leftovers(tmp_path) == []


def test_a_truncated_or_missing_blob_fails_the_export(store: ModelStore, tmp_path: Path) -> None:
    root, v = _chain(store)
    path = store.blobs.local_path(root.tensors["big.weight"].blob)
    raw = path.read_bytes()
    path.write_bytes(raw[:-100])
    with pytest.raises(CorruptBlobError, match=r"big\.weight"):
        export_safetensors(store, root.id, tmp_path / "out")
    assert _leftovers(tmp_path) == []
    path.unlink()
    with pytest.raises(MissingBlobError, match=rf"version {root.id} tensor 'big.weight'.*missing"):
        export_safetensors(store, v.id, tmp_path / "out")
    assert _leftovers(tmp_path) == []


def test_workers_must_be_positive(store: ModelStore, tmp_path: Path) -> None:
    root, _ = _chain(store)
    with pytest.raises(ConfigError, match="workers is 0"):
        export_safetensors(store, root.id, tmp_path / "out", workers=0)
    assert _leftovers(tmp_path) == []
