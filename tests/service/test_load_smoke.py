"""Smoke test of ``python -m bench load``'s intake part: 10 concurrent clients for 5 s against a real
``serve-continual`` process; nothing acknowledged may be lost or merged twice."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedmerge.store import ModelStore
from fedmerge_bench.load import LoadConfig, run_intake_load


@pytest.mark.slow
@pytest.mark.integration
def test_intake_load_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    cfg = LoadConfig(clients=10, duration_s=5.0, processes=2, startup_s=3.0, drain_timeout_s=180.0, seed=3)
    result = run_intake_load(cfg, tmp_path / "load")

    assert result.acknowledged > cfg.clients, "every client should get several experts acknowledged"
    assert result.errors == []
    assert (result.lost, result.duplicated, result.rejected) == (0, 0, 0)
    assert (result.crashes, result.server_exit_code, result.worker_errors_logged) == (0, 0, 0)
    assert result.non_retryable_errors == 0 and result.abandoned == 0
    assert result.store_ok
    assert 0 < result.ack_p50_ms <= result.ack_p99_ms

    # independently of the benchmark's own bookkeeping: each acknowledged expert is a contributor of
    # exactly one committed version, and the track's head counts exactly the acknowledged experts
    counts: dict[str, int] = {}
    with ModelStore.open(tmp_path / "load" / "store") as store:
        for version in store.list():
            for c in version.contributors:
                counts[c.submission_hash] = counts.get(c.submission_hash, 0) + 1
        head = store.get("continual")
        assert head.metadata["num_merged"] == result.acknowledged
    assert len(result.acked_sha256) == result.acknowledged
    assert {sha: counts.get(sha, 0) for sha in result.acked_sha256} == dict.fromkeys(result.acked_sha256, 1)
    assert sum(counts.values()) == result.acknowledged  # nothing merged that was not acknowledged
