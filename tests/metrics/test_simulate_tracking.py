"""``fedmerge simulate`` with ``tracking = "tensorboard"``: each trial's ServerApp (in the trial's own
process) writes one TensorBoard run under OUT/tracking/TRIAL_KEY holding exactly its store's version
metrics, round by round."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tracking_helpers import read_scalars

from fedmerge.store import ModelStore
from fedmerge_simulations.experiment import parse_config
from fedmerge_simulations.runner import run_experiment


@pytest.mark.integration
@pytest.mark.slow  # one simulated federation (Ray start, 2 rounds of local training): about a minute
def test_simulate_tracks_each_trial_to_tensorboard(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))
    config = parse_config(
        {
            "name": "t",
            "clients": 3,
            "fraction": 1.0,
            "rounds": 2,
            "seeds": [0],
            "local_epochs": 1,
            "partitioner": {"name": "dirichlet", "alpha": 0.5},
            "aggregators": [{"name": "fedavg"}],
            "codecs": [{"name": "top10-int8", "density": 0.1, "quantization": "int8"}],
            "tracking": "tensorboard",
        }
    )
    out = tmp_path / "results"
    run_experiment(config, out)
    (trial,) = config.trials()
    with ModelStore.open(out / "stores" / trial.key) as store:
        versions = sorted((v for v in store.list() if v.round is not None), key=lambda v: v.round or 0)
    assert [v.round for v in versions] == [1, 2]
    scalars = read_scalars(out / "tracking" / trial.key)
    assert set(scalars) == set(versions[0].metrics) | set(versions[1].metrics)
    for tag, series in scalars.items():
        expected = {v.round: v.metrics[tag] for v in versions if tag in v.metrics}
        assert series.keys() == expected.keys(), tag
        for step, got in series.items():
            assert math.isclose(got, expected[step], rel_tol=1e-6), (tag, step)
