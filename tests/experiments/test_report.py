from __future__ import annotations

import csv
import json

import pytest

from fedmerge_simulations.report import markdown_summary, summary_rows, write_report


def fake_result(agg: str, seed: int, accs: list[float], sent: int) -> dict:
    return {
        "key": f"{agg}-{seed}",
        "aggregator": agg,
        "codec": "top10-int8",
        "seed": seed,
        "wall_s": 1.0,
        "rounds": [
            {
                "round": i + 1,
                "accuracy": a,
                "loss": 1 - a,
                "bytes_sent": sent,
                "dense_bytes": 10 * sent,
                "wall_s": 0.5,
                "accepted": 4,
                "rejected": 0,
                "client_accuracy": [a - 0.1, a, a + 0.1],
            }
            for i, a in enumerate(accs)
        ],
    }


RESULTS = [
    fake_result("ties", 0, [0.5, 0.8], 100),
    fake_result("ties", 1, [0.5, 0.9], 100),
    fake_result("fedavg", 0, [0.5, 0.6], 100),
    fake_result("fedavg", 1, [0.5, 0.7], 100),
]


def test_summary_is_mean_and_std_over_seeds_and_names_the_winner() -> None:
    rows = summary_rows(RESULTS)
    assert [r["method"] for r in rows] == ["ties / top10-int8", "fedavg / top10-int8"]
    assert rows[0]["final_accuracy_mean"] == pytest.approx(0.85)
    assert rows[0]["final_accuracy_std"] == pytest.approx(0.0707, abs=1e-4)
    assert rows[0]["bytes_vs_dense"] == pytest.approx(0.1)
    text = markdown_summary(RESULTS, title="t")
    assert "85.0 ± 7.1" in text
    assert "**ties / top10-int8** has the highest final accuracy, 20.0 points above" in text
    assert "clear margin" in text


def test_write_report_produces_every_artefact(tmp_path) -> None:  # type: ignore[no-untyped-def]
    summary = write_report(RESULTS, tmp_path, title="demo", baseline=0.5)
    plots = ("accuracy_vs_round.png", "accuracy_vs_bytes.png", "client_spread.png")
    for name in ("results.json", "metrics.csv", *plots):
        path = tmp_path / name
        assert path.exists() and path.stat().st_size > 0, name
    assert (tmp_path / "accuracy_vs_round.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = list(csv.DictReader((tmp_path / "metrics.csv").open()))
    assert len(rows) == 8 and {r["method"] for r in rows} == {"ties / top10-int8", "fedavg / top10-int8"}
    assert json.loads((tmp_path / "results.json").read_text())[0]["key"] == "ties-0"
    assert "Base model before any round: 50.0%" in summary.read_text()


def test_one_seed_makes_no_claim_of_significance() -> None:
    text = markdown_summary([RESULTS[0], RESULTS[2]], title="t")
    assert "one seed only" in text and "clear margin" not in text
