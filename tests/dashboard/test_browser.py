"""The dashboard in a real browser: Debian's headless Chromium driven by Playwright, on a store written
by a real demo run (Flower simulation, a rejected contributor, a recipe merge, a rollback).

Every page must load without console errors or failed requests; the lineage graph shows every version;
the rejected contributor's reason is visible; a version committed while the page is open appears
without a reload. With ``FEDMERGE_SCREENSHOTS_DIR=docs`` the screenshots of the README and
``docs/dashboard.md`` are written there.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from fedmerge.dashboard import RunningDashboard, start_in_background
from fedmerge.store import Contributor, ModelStore

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
REFRESH_MS = 300


@pytest.fixture(scope="module")
def served(demo_store: Any) -> Iterator[RunningDashboard]:
    d = start_in_background(demo_store.root, "127.0.0.1", 0, None, refresh_ms=REFRESH_MS)
    yield d
    d.stop()


@pytest.fixture(scope="module")
def browser(request: pytest.FixtureRequest) -> Iterator[Any]:
    chromium = Path("/usr/bin/chromium")
    if not chromium.exists():
        pytest.skip(f"{chromium} is absent (Debian's chromium package; .ci/run installs it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(chromium), args=CHROMIUM_ARGS)
        yield b
        b.close()


class Watched:
    """A page with every console error, uncaught exception and failed request recorded."""

    def __init__(self, browser: Any) -> None:
        self.context = browser.new_context(viewport={"width": 1280, "height": 860})
        self.page = self.context.new_page()
        self.problems: list[str] = []
        self.page.on(
            "console",
            lambda m: self.problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None,
        )
        self.page.on("pageerror", lambda e: self.problems.append(f"page error: {e}"))
        self.page.on("requestfailed", lambda r: self.problems.append(f"request failed: {r.url} {r.failure}"))
        self.page.on(
            "response",
            lambda r: self.problems.append(f"HTTP {r.status}: {r.url}") if r.status >= 400 else None,
        )

    def open(self, url: str) -> Any:
        response = self.page.goto(url, wait_until="load")
        assert response is not None and response.status == 200, url
        # the live-refresh script has polled at least once
        self.page.wait_for_selector("#live.on", timeout=10_000)
        return self.page

    def close(self) -> None:
        self.context.close()


@pytest.fixture()
def watched(browser: Any) -> Iterator[Watched]:
    w = Watched(browser)
    yield w
    w.close()


def screenshot(page: Any, name: str, *, full_page: bool = False) -> None:
    target = os.environ.get("FEDMERGE_SCREENSHOTS_DIR")
    if target:
        path = Path(target) / f"dashboard-{name}.png"
        page.screenshot(path=str(path), full_page=full_page)
        assert path.stat().st_size < 300_000, f"{path} is {path.stat().st_size} bytes"


def test_versions_page_draws_every_version(
    served: RunningDashboard, demo_store: Any, watched: Watched
) -> None:
    page = watched.open(served.url + "/versions")
    nodes = page.locator("svg#lineage a.node")
    drawn = sorted(nodes.evaluate_all("els => els.map(e => e.getAttribute('data-version'))"))
    assert drawn == demo_store.versions
    for vid in demo_store.versions:
        assert page.locator(f"svg#lineage a.node[data-version='{vid}'] circle").is_visible()
    # the recipe merge has two parents: a solid first-parent edge and a dashed second input
    # the recipe merge has several parents: a solid first-parent edge and a dashed edge per further input
    merge = demo_store.merge_version
    with ModelStore.open(demo_store.root) as st:
        parents = st.get(merge).parents
    assert len(parents) >= 3
    assert page.locator(f"svg#lineage path.edge[data-child='{merge}']").count() == len(parents)
    assert page.locator(f"svg#lineage path.edge.merge[data-child='{merge}']").count() == len(parents) - 1
    assert (
        page.locator(f"svg#lineage path.rollback[data-alias='{demo_store.rolled_back_alias}']").count() == 1
    )
    assert page.locator("table#versions tbody tr").count() == len(demo_store.versions)
    screenshot(page, "versions")
    assert watched.problems == []


def test_version_page_shows_rejection_reason(
    served: RunningDashboard, demo_store: Any, watched: Watched
) -> None:
    with ModelStore.open(demo_store.root) as st:
        vid = next(v.id for v in st.list() if any(not c.accepted for c in v.contributors))
    page = watched.open(served.url + f"/versions/{vid}")
    row = page.locator(f"table#contributors tr.rejected[data-client='{demo_store.rejected_client}']")
    assert row.count() >= 1
    assert demo_store.rejected_reason in row.first.locator("td.reason").inner_text()
    assert row.first.locator("td.reason").is_visible()
    assert page.locator("table#diff tbody tr").count() >= 1
    assert page.locator("table#tensors tbody tr").count() >= 1
    assert page.locator("a#export-hf").get_attribute("href") == f"/versions/{vid}/export/hf.tar"
    screenshot(page, "version", full_page=False)
    assert watched.problems == []


def test_run_page_draws_its_charts(served: RunningDashboard, demo_store: Any, watched: Watched) -> None:
    page = watched.open(served.url + "/run")
    for chart in ("accuracy", "loss", "bytes", "time", "clients", "epsilon"):
        assert page.locator(f"svg#chart-{chart}").is_visible()
    # two rounds, each with an accuracy point drawn by the server
    assert page.locator("svg#chart-accuracy circle").count() >= 2
    assert page.locator("svg#chart-clients rect.s1").count() >= 1  # a rejected bar
    screenshot(page, "run")
    assert watched.problems == []


def test_intake_page(demo_store: Any, watched: Watched, tmp_path: Path) -> None:
    """The intake page over serve-continual's own queue: merged, rejected and queued experts."""
    from fedmerge.service.intake import IntakeQueue

    queue = IntakeQueue(tmp_path / "intake")
    subs = []
    for i, client in enumerate(["hospital-a", "hospital-b", "lab-c", "lab-d", "hospital-a"]):
        payload = f"expert {i}".encode()
        sub, _ = queue.receive(
            client_id=client, fmt="checkpoint", base_version="v000001", label=f"expert-{i}",
            total_size=len(payload), chunks=[payload],
        )  # fmt: skip
        subs.append(sub)
    queue.mark_merged([subs[0].id, subs[1].id], "v000002")
    queue.mark_merged([subs[2].id], "v000003")
    reason = "tensor 'fc.weight' has shape [10, 32], the base has [32, 10]; fine-tune the store's base"
    queue.mark_rejected(subs[3].id, reason)
    queue.close()
    with start_in_background(
        demo_store.root, "127.0.0.1", 0, None, intake_dir=tmp_path / "intake", refresh_ms=REFRESH_MS
    ) as d:
        page = watched.open(d.url + "/intake")
        assert page.inner_text("#queue-depth") == "1"
        assert reason in page.locator("#intake-rejections td.reason").first.inner_text()
        assert page.locator("#intake-merged tbody tr").count() == 3
        assert page.locator("svg#chart-intake-rate rect.s0").count() >= 1
        screenshot(page, "intake")
        assert watched.problems == []


def test_live_view_updates_without_reload(
    served: RunningDashboard, demo_store: Any, watched: Watched
) -> None:
    page = watched.open(served.url + "/versions")
    page.evaluate("window.__notReloaded = true")
    with ModelStore.open(demo_store.root) as st:
        head = st.get("latest")
        delta = {n: 0.001 * torch.ones(e.shape) for n, e in head.tensors.items()}
        new = st.commit(
            delta,
            parents=[head.id],
            method="fedavg",
            params={},
            contributors=[Contributor("late-client", 10, "ab" * 32)],
            round=(head.round or 0) + 1,
            metrics={"server-accuracy": 0.5},
            privacy=None,
            aliases=("live-test",),
        )
    page.wait_for_selector(f"svg#lineage a.node[data-version='{new.id}']", timeout=15_000)
    assert page.evaluate("window.__notReloaded") is True
    assert int(page.get_attribute("body", "data-refreshes") or "0") >= 1
    assert page.locator(f"table#versions tr[data-version='{new.id}']").count() == 1
    assert watched.problems == []
