"""What the pages show, computed from a store without the web layer."""

from __future__ import annotations

import math
from typing import Any

import pytest

from fedmerge.dashboard import views
from fedmerge.errors import ConfigError
from fedmerge.store import ModelStore


def test_diff_against_parent_matches_the_store(small_store: Any) -> None:
    with views.open_store(small_store.root) as st:
        vid = small_store.versions[-1]
        detail = views.version_detail(st, vid)
        expected = st.diff(st.get(vid).parents[0], vid)
        assert detail.diff is not None
        assert [r.change_norm for r in detail.diff] == [t.change_norm for t in expected.tensors]
        assert detail.total_change_norm == pytest.approx(expected.total_change_norm)
        assert detail.children == []
        assert views.version_detail(st, small_store.versions[1]).children == [vid]


def test_diff_is_skipped_above_the_read_budget(small_store: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(views, "MAX_DIFF_READS", 10)
    with views.open_store(small_store.root) as st:
        detail = views.version_detail(st, small_store.versions[-1])
    assert detail.diff is None and detail.diff_note is not None and "ModelStore.diff" in detail.diff_note


def test_run_view_and_pages(small_store: Any) -> None:
    with views.open_store(small_store.root) as st:
        run = views.run_view(st, small_store.versions[-1])
        assert [p.round for p in run.points] == [1, 2]
        assert [p.rejected for p in run.points] == [0, 1]
        assert [p.epsilon for p in run.points] == [pytest.approx(0.7), pytest.approx(1.4)]
        assert all(p.seconds is not None and p.seconds >= 0 and math.isfinite(p.seconds) for p in run.points)
        page = views.versions_page(st, limit=1, offset=1)
        assert page.total >= 3 and [v.id for v in page.versions] == [small_store.versions[-2]]
        with pytest.raises(ConfigError, match="limit"):
            views.versions_page(st, limit=views.MAX_PAGE_SIZE + 1)
        rb = views.rollbacks(st)
        assert [(r.alias, r.left, r.to) for r in rb] == [
            ("prod", small_store.versions[2], small_store.versions[1])
        ]


def test_open_store_never_creates(tmp_path: Any) -> None:
    with pytest.raises(views.NotAStoreError):
        views.open_store(tmp_path / "new")
    assert not (tmp_path / "new").exists()
    ModelStore.open(tmp_path / "made").close()
    views.open_store(tmp_path / "made").close()
