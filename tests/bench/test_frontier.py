"""``python -m bench frontier``: its summary arithmetic, plot and table (the federations are its own runs)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedmerge_bench.frontier import POINTS, markdown, plot, summarise


def _run(accuracy: list[float], per_round: int, first: int) -> dict[str, object]:
    return {"accuracy": accuracy, "bytes": [first] + [per_round] * (len(accuracy) - 1)}


def test_byte_ratios_and_accuracy_deltas_are_per_seed_then_averaged(tmp_path: Path) -> None:
    flower = {0: _run([0.5, 0.80], 1000, 1000), 1: _run([0.5, 0.70], 1000, 1000)}
    a, b = POINTS[0], POINTS[1]
    ours = {
        (a.label, 0): _run([0.5, 0.79], 10, 500),
        (a.label, 1): _run([0.5, 0.72], 30, 500),
        (b.label, 0): _run([0.5, 0.80], 5, 100),
        (b.label, 1): _run([0.5, 0.70], 5, 100),
    }
    rows = summarise([a, b], flower, ours)
    assert rows[0]["bytes_vs_flower"] == pytest.approx(20 / 1000)  # rounds 2…R, mean over seeds
    all_rounds = ((500 + 10) / 2 + (500 + 30) / 2) / 2
    assert rows[0]["bytes_all_rounds_vs_flower"] == pytest.approx(all_rounds / 1000)
    assert rows[0]["accuracy_delta_points_per_seed"] == pytest.approx([-1.0, 2.0])
    assert rows[0]["accuracy_delta_points"] == pytest.approx(0.5)
    assert rows[1]["accuracy_delta_points"] == pytest.approx(0.0)
    plot(tmp_path / "f.png", rows, "digits", 2, 2)
    assert (tmp_path / "f.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = markdown(rows, "digits", 2, [0, 1], "python -m bench frontier")
    assert "| top-20 % int4 both ways | 0.0200 | 0.2600 | +0.50 | -1.0, +2.0 |" in table
