"""The experiment runner end to end on Flower's simulation engine (real training, real merging)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedmerge_simulations.experiment import parse_config
from fedmerge_simulations.runner import run_experiment

pytestmark = pytest.mark.integration


def test_runner_produces_the_report_and_resumes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))
    config = parse_config(
        {
            "name": "t",
            "clients": 4,
            "fraction": 1.0,
            "rounds": 2,
            "seeds": [0],
            "local_epochs": 1,
            "partitioner": {"name": "dirichlet", "alpha": 0.5},
            "aggregators": [{"name": "fedavg"}],
            "codecs": [{"name": "top10-int8", "density": 0.1, "quantization": "int8"}],
        }
    )
    out = tmp_path / "results"
    summary = run_experiment(config, out)
    (trial_file,) = (out / "trials").glob("*.json")
    result = json.loads(trial_file.read_text())
    assert [r["round"] for r in result["rounds"]] == [1, 2]
    for r in result["rounds"]:
        assert r["accepted"] == 4 and r["rejected"] == 0
        assert 0 < r["bytes_sent"] < 0.1 * r["dense_bytes"]  # top-10 % int8 on the wire
        assert 0.0 < r["accuracy"] <= 1.0
        assert len(r["client_accuracy"]) == 4
    assert "fedavg / top10-int8" in summary.read_text()
    for name in ("metrics.csv", "accuracy_vs_round.png", "accuracy_vs_bytes.png", "client_spread.png"):
        assert (out / name).stat().st_size > 0
    # a second run finds the finished trial and does not recompute it
    stamp = trial_file.stat().st_mtime_ns
    run_experiment(config, out)
    assert trial_file.stat().st_mtime_ns == stamp
