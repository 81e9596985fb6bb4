"""The phase arithmetic of ``bench large`` on hand-made timestamps (no processes, no timing)."""

from __future__ import annotations

from typing import Any

import pytest

from bench.large import best, phases
from bench.wan_link import NodeLink


def _link(reads: list[tuple[float, int]]) -> NodeLink:
    link = NodeLink(rate_bps=1e9)
    link.up_reads.extend(reads)
    return link


def test_phases_from_first_burst_to_verified_and_from_last_reply_to_committed() -> None:
    polls = [(100.0 + i, 200) for i in range(5)]  # a SuperNode's polling: no upload
    links = [
        _link(polls + [(110.0 + 0.01 * i, 65536) for i in range(20)]),
        _link(polls + [(111.0 + 0.01 * i, 65536) for i in range(20)]),
    ]
    events = [
        {"mode": "fedmerge-dense/0", "node": 0, "event": "delta-ready", "t": 109.0},
        {"mode": "fedmerge-dense/0", "node": 1, "event": "delta-ready", "t": 109.5},
        {"mode": "flower/0", "node": 0, "event": "delta-ready", "t": 50.0},  # another round
    ]
    result = {"replies_t": [115.0, 118.0], "verified_t": 119.0, "committed_t": 121.5}
    got = phases(result, events, "fedmerge-dense/0", links)
    assert got == pytest.approx(
        {
            "upload_s": 9.0,  # 110 (first byte of node 0) → 119
            "on_link_s": 1.19,  # → 111.19, the last upload read (node 1) before the last reply
            "arrival_s": 8.0,
            "judge_last_s": 1.0,
            "upload_from_ready_s": 10.0,  # 109 → 119
            "server_s": 3.5,  # 118 → 121.5
            "verified_to_committed_s": 2.5,
            "first_byte_spread_s": 1.0,
        }
    )


def test_missing_timestamps_give_none_not_a_number() -> None:
    got = phases({"replies_t": []}, [], "flower/0", [])
    assert set(got.values()) == {None}


def test_best_of_k_takes_each_phase_minimum() -> None:
    runs: list[dict[str, Any]] = [
        {"upload_s": 3.0, "server_s": None},
        {"upload_s": 2.0, "server_s": 5.0},
    ]
    assert best(runs) == {"upload_s": 2.0, "server_s": 5.0}
    assert best([]) == {}


def test_bad_arguments_and_a_model_too_large_for_memory_are_refused_before_anything_starts(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from bench.large import main

    assert main(["--clients", "0"]) == 2
    assert "--clients" in capsys.readouterr().err
    assert main(["--quick", "--params", str(10**13)]) == 2  # ≈ 180 TB for 3 nodes
    assert "lower --clients or --params" in capsys.readouterr().err
