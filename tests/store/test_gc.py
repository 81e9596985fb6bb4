"""gc removes only unreferenced blobs and leftovers, and only after the grace period."""

from __future__ import annotations

import os
import time

import pytest
import torch
from store_test_helpers import commit_delta, tiny_delta, tiny_model

from fedmerge.errors import ConfigError
from fedmerge.store import ModelStore
from fedmerge.store.blobs import encode_blob

BOTH_CATALOGS = True  # every test using ``store`` runs on SQLite and on PostgreSQL


def _orphan_blob(store: ModelStore, age: float, value: float) -> str:
    """Store a blob no version references, with its modification time ``age`` seconds ago."""
    digest, parts = encode_blob(torch.full((5,), value))
    store.blobs.put(digest, parts)
    then = time.time() - age
    os.utime(store.blobs.local_path(digest), (then, then))
    return digest


def test_gc_removes_old_unreferenced_blobs_only(store: ModelStore) -> None:
    base = tiny_model()
    root = store.commit_base(base, name="tiny")
    v = commit_delta(store, tiny_delta(base, 1), root.id, 1)
    old, young = _orphan_blob(store, age=7200, value=1.0), _orphan_blob(store, age=0, value=2.0)
    report = store.gc(grace_seconds=3600)
    assert report.removed_blobs == [old] and report.kept_young == 1 and report.freed_bytes > 0
    assert not store.blobs.has(old) and store.blobs.has(young)
    assert store.verify().ok
    assert store.materialize(v.id).keys() == base.keys()


def test_gc_dry_run_removes_nothing(store: ModelStore) -> None:
    store.commit_base(tiny_model(), name="tiny")
    old = _orphan_blob(store, age=7200, value=1.0)
    report = store.gc(grace_seconds=0, dry_run=True)
    assert report.removed_blobs == [old] and store.blobs.has(old)


def test_a_reused_old_blob_is_refreshed_so_gc_keeps_it(store: ModelStore) -> None:
    base = tiny_model()
    root = store.commit_base(base, name="tiny")
    delta = tiny_delta(base, 1)
    digest, parts = encode_blob(delta["head.weight"])
    store.blobs.put(digest, parts)
    then = time.time() - 7200
    os.utime(store.blobs.local_path(digest), (then, then))
    commit_delta(store, delta, root.id, 1)  # reuses the old blob
    assert time.time() - store.blobs.mtime(digest) < 60
    assert digest not in store.gc(grace_seconds=3600).removed_blobs


def test_negative_grace_is_refused(store: ModelStore) -> None:
    with pytest.raises(ConfigError, match="grace_seconds is -1"):
        store.gc(grace_seconds=-1)
