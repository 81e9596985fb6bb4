"""The server-rendered SVG: lineage lanes, edges, escaping, and charts that survive odd data."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from fedmerge.dashboard import start_in_background
from fedmerge.dashboard.svg import lanes, line_chart, lineage_graph, stacked_bars
from fedmerge.dashboard.views import Rollback, VersionSummary
from fedmerge.store import Contributor, ModelStore


def summary(vid: str, parents: tuple[str, ...] = (), method: str = "fedavg") -> VersionSummary:
    return VersionSummary(
        vid, "task_vector" if parents else "full", method, None, parents, 0, 0, {}, [], "", "", None
    )


def test_a_chain_stays_in_one_lane_and_a_branch_takes_another() -> None:
    chain = [summary("v000001"), summary("v000002", ("v000001",)), summary("v000003", ("v000002",))]
    assert set(lanes(chain).values()) == {0}
    branched = [*chain, summary("v000004", ("v000002",)), summary("v000005", ("v000003", "v000004"))]
    got = lanes(branched)
    assert got["v000004"] != got["v000003"]  # v000002's lane was continued by v000003
    assert got["v000005"] == got["v000003"]


def test_lineage_graph_edges_and_rollbacks() -> None:
    versions = [
        summary("v000001"),
        summary("v000002", ("v000001",)),
        summary("v000003", ("v000002",)),
        summary("v000004", ("v000001", "v000002", "v000003"), method="ties"),
    ]
    svg = lineage_graph(versions, [Rollback("prod", "v000003", "v000002", "2026-01-01T00:00:00")])
    for v in versions:
        assert f'data-version="{v.id}"' in svg
    assert svg.count('class="edge"') == 3  # a first parent each for v000002, v000003, v000004
    assert svg.count('class="edge merge"') == 2  # further inputs of the merge
    assert svg.count('class="rollback"') == 1


def test_text_is_escaped() -> None:
    evil = "<script>alert(1)</script>"
    svg = lineage_graph([summary("v000001", method=evil)], [])
    chart = line_chart(evil, [(evil, [(1.0, 2.0)])], chart_id="c")
    bars = stacked_bars(evil, [1.0], [(evil, [1.0])], chart_id="b")
    for out in (svg, chart, bars):
        assert "<script>" not in out and "&lt;script&gt;" in out


def test_charts_with_no_or_degenerate_data() -> None:
    assert "no data yet" in line_chart("t", [("a", [])], chart_id="c")
    assert "no data yet" in stacked_bars("t", [], [("a", [])], chart_id="c")
    one = line_chart("t", [("a", [(1.0, 5.0)]), ("b", [(1.0, math.inf)])], chart_id="c")
    assert one.count("<circle") == 1 and "nan" not in one.lower()


def test_contributor_text_is_escaped_on_the_pages(tmp_path: Path) -> None:
    evil = '<img src=x onerror="alert(1)">'
    with ModelStore.open(tmp_path / "s") as st:
        base = st.commit_base({"w": torch.zeros(2, 2)}, name=evil)
        st.commit(
            {"w": torch.ones(2, 2)}, parents=[base.id], method=evil, params={"p": evil},
            contributors=[Contributor(evil, 1, "0" * 64, accepted=False, reason=evil)],
            round=1, metrics={evil: 1.0}, privacy={"note": evil},
        )  # fmt: skip
    import urllib.request

    with start_in_background(tmp_path / "s", "127.0.0.1", 0, None) as d:
        for path in ("/versions", "/versions/v000002", "/run"):
            with urllib.request.urlopen(d.url + path, timeout=30) as r:
                html = r.read().decode()
            assert "<img" not in html, path
