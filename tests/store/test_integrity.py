"""Corruption is found, reported with the version and tensor, and never silently repaired or deleted."""

from __future__ import annotations

import json

import pytest
import torch
from store_test_helpers import commit_delta, tiny_delta, tiny_model

from fedmerge.errors import StoreIntegrityError
from fedmerge.store import CorruptBlobError, ForeignFileError, MissingBlobError, ModelStore, Version
from fedmerge.store.blobs import encode_blob

BOTH_CATALOGS = True  # every test using ``store`` runs on SQLite and on PostgreSQL


def _two_versions(store: ModelStore) -> tuple[Version, Version]:
    base = tiny_model()
    root = store.commit_base(base, name="tiny")
    return root, commit_delta(store, tiny_delta(base, 1), root.id, 1)


def test_clean_store_verifies(store: ModelStore) -> None:
    root, v = _two_versions(store)
    report = store.verify()
    assert report.ok and report.versions_checked == 2
    assert report.blobs_checked == len(root.blobs | v.blobs)
    report.raise_for_problems()


def test_flipped_byte_in_a_blob_is_reported_with_version_and_tensor(store: ModelStore) -> None:
    _, v = _two_versions(store)
    path = store.blobs.local_path(v.tensors["head.weight"].blob)
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0x01
    path.write_bytes(bytes(raw))
    report = store.verify()
    assert [(p.kind, p.version, p.tensor) for p in report.problems] == [("corrupt_blob", v.id, "head.weight")]
    with pytest.raises(CorruptBlobError, match=rf"version {v.id} tensor 'head.weight'.*corrupted"):
        report.raise_for_problems()
    with pytest.raises(CorruptBlobError, match=rf"version {v.id} tensor 'head.weight'"):
        store.load_delta(v.id)
    with pytest.raises(CorruptBlobError, match=r"head\.weight"):
        store.materialize(v.id)
    assert path.read_bytes() == bytes(raw), "verify must not repair or delete"


def test_missing_blob_is_reported_with_version_and_tensor(store: ModelStore) -> None:
    _, v = _two_versions(store)
    store.blobs.local_path(v.tensors["embed.weight"].blob).unlink()
    problems = store.verify().problems
    assert [(p.kind, p.version, p.tensor) for p in problems] == [("missing_blob", v.id, "embed.weight")]
    with pytest.raises(MissingBlobError, match=rf"version {v.id} tensor 'embed.weight'.*missing"):
        store.load_delta(v.id)


def test_foreign_files_are_reported_not_deleted(store: ModelStore) -> None:
    _two_versions(store)
    strays = [
        store.root / "notes.txt",
        store.root / "manifests" / "draft.json",
        store.root / "blobs" / "x.bin",
    ]
    for p in strays:
        p.write_text("mine")
    problems = store.verify().problems
    assert sorted(str(p.path) for p in problems if p.kind == "foreign_file") == sorted(str(p) for p in strays)
    with pytest.raises(ForeignFileError, match="foreign file"):
        store.verify().raise_for_problems()
    store.gc(grace_seconds=0)
    assert all(p.read_text() == "mine" for p in strays)


def test_edited_manifest_is_detected_on_read_and_by_verify(store: ModelStore) -> None:
    _, v = _two_versions(store)
    path = store.manifest_dir / f"{v.id}.json"
    doc = json.loads(path.read_text())
    doc["metrics"]["loss"] = 0.01  # a quiet edit of history
    path.write_text(json.dumps(doc))
    fresh = ModelStore.open(store.root, catalog=store.catalog.url)
    with pytest.raises(StoreIntegrityError, match=rf"version {v.id}: manifest .* modified after commit"):
        fresh.get(v.id)
    problems = fresh.verify().problems
    assert [(p.kind, p.version) for p in problems] == [("bad_manifest", v.id)]
    fresh.close()


def test_every_missing_blob_is_reported_and_other_versions_stay_clean(store: ModelStore) -> None:
    root, v = _two_versions(store)
    a = store.blobs.local_path(v.tensors["embed.weight"].blob)
    b = store.blobs.local_path(v.tensors["head.weight"].blob)
    a.unlink()
    b.unlink()
    report = store.verify()
    assert {(p.kind, p.tensor) for p in report.problems} == {
        ("missing_blob", "embed.weight"),
        ("missing_blob", "head.weight"),
    }
    assert all(p.version == v.id for p in report.problems)
    assert store.verify().leftovers == []
    assert root.id not in {p.version for p in report.problems}


def test_a_valid_blob_planted_under_another_name_is_caught(store: ModelStore) -> None:
    _, v = _two_versions(store)
    _, parts = encode_blob(torch.zeros(3))
    target = store.blobs.local_path(v.tensors["head.weight"].blob)
    target.write_bytes(b"".join(bytes(p) for p in parts))
    kinds = {(p.kind, p.tensor) for p in store.verify().problems}
    assert kinds == {("corrupt_blob", "head.weight")}


def test_leftovers_of_interrupted_commits_are_not_problems_and_gc_removes_them(store: ModelStore) -> None:
    _two_versions(store)
    orphan = store.manifest_dir / "v000003.json"
    orphan.write_text("{}")
    partial = store.blobs.tmp_dir / "abcd.partial"
    partial.write_bytes(b"half")
    report = store.verify()
    assert report.ok and sorted(report.leftovers) == sorted([str(orphan), str(partial)])
    assert store.gc(grace_seconds=3600).removed_files == []
    gc = store.gc(grace_seconds=0)
    assert sorted(gc.removed_files) == sorted([str(orphan), str(partial)])
    assert not orphan.exists() and not partial.exists()
