"""Round metrics end to end: a real round on Flower's simulation engine writes its round events (as
the ServerApp under ``fedmerge serve --metrics-port`` does), the endpoint reads them at scrape time,
and every counter equals what the round reports say happened; the same run tracks to TensorBoard
(``tracking = "tensorboard"``), and the event files read back hold exactly the store's metrics."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path
from types import ModuleType

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from metrics_helpers import scrape, value
from tracking_helpers import read_scalars

from fedmerge.metrics import EVENTS_ENV, feed_registry, start_metrics_server
from fedmerge.store import ModelStore


def _flower_helpers() -> ModuleType:
    """tests/flower/conftest.py (the scripted ClientApps and the simulation runner), loaded by path."""
    path = Path(__file__).parents[1] / "flower" / "conftest.py"
    spec = importlib.util.spec_from_file_location("fedmerge_tests_flower_helpers", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.integration
@pytest.mark.slow  # Ray's start and a round of local training: about a minute on a shared 2-core machine
def test_a_real_round_moves_the_round_counters(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    flower = _flower_helpers()
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))
    monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "0")
    monkeypatch.setenv("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    events = tmp_path / "state" / "round-events.jsonl"
    metrics, feed = feed_registry(events)
    store = tmp_path / "store"
    metrics.watch_store(store)
    server = start_metrics_server(metrics.registry)
    try:
        before = scrape(server.url)
        monkeypatch.setenv(EVENTS_ENV, str(events))
        reports = flower._simulate(
            store, flower._scripted_client_app(["ok", "ok", "crash"]), 3,
            num_rounds=1, min_clients=3, min_valid=2, server_eval=True,
            tracking="tensorboard", tracking_dir=str(tmp_path / "tb"),
        )  # fmt: skip
        after = scrape(server.url)
    finally:
        server.stop()
    assert len(reports) == 1 and reports[0].version_id is not None
    report = reports[0]

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("fedmerge_rounds_completed_total") == 1
    assert moved("fedmerge_rounds_uncommitted_total") == 0
    assert moved("fedmerge_round_replies_accepted_total") == len(report.accepted) == 2
    assert moved("fedmerge_round_replies_rejected_total", reason="client_error") == 1
    assert moved("fedmerge_round_replies_rejected_total", reason="invalid") == 0
    assert moved("fedmerge_uplink_bytes_total") == report.uplink_bytes > 0
    assert moved("fedmerge_downlink_bytes_total") == report.downlink_bytes > 0
    assert moved("fedmerge_round_duration_seconds_count") == 1
    assert math.isclose(moved("fedmerge_round_duration_seconds_sum"), report.wall_s, rel_tol=1e-9)
    assert value(after, "fedmerge_last_committed_version_info", version=report.version_id) == 1
    assert value(after, "fedmerge_last_committed_round") == report.round == 1
    assert value(after, "fedmerge_store_size_bytes") > 0
    assert feed.skipped == 0
    # tracking: exactly the committed version's metrics, at step = its round
    with ModelStore.open(store) as s:
        version = s.get("latest")
    assert version.id == report.version_id
    assert "server-accuracy" in version.metrics and "uplink-bytes" in version.metrics
    scalars = read_scalars(tmp_path / "tb")
    assert set(scalars) == set(version.metrics)
    for tag, series in scalars.items():
        assert list(series) == [version.round]
        assert math.isclose(series[version.round], version.metrics[tag], rel_tol=1e-6), tag
