"""fedmerge.tracking: sinks, their configuration keys, and TensorBoard files read back by TensorBoard."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tracking_helpers import read_scalars

from fedmerge.errors import ConfigError
from fedmerge.flower.config import parse_run_config
from fedmerge.tracking import MLflowSink, TensorBoardSink, TrackingUnavailable, open_sink
from fedmerge_simulations.experiment import parse_config


def test_tensorboard_event_files_hold_exactly_the_logged_rounds(tmp_path: Path) -> None:
    sink = open_sink("tensorboard", tmp_path / "tb")
    assert isinstance(sink, TensorBoardSink)
    rounds = {
        1: {"accepted": 3.0, "uplink-bytes": 12345.0, "server-accuracy": 0.625, "bad": float("nan")},
        2: {"accepted": 2.0, "uplink-bytes": 23456.0, "server-accuracy": 0.75, "bad": float("inf")},
    }
    for step, values in rounds.items():
        sink.log_round(step, values)
    sink.close()
    scalars = read_scalars(tmp_path / "tb")
    assert set(scalars) == {"accepted", "uplink-bytes", "server-accuracy"}  # non-finite values dropped
    for tag, series in scalars.items():
        assert series.keys() == rounds.keys()
        for step, got in series.items():
            assert math.isclose(got, rounds[step][tag], rel_tol=1e-6), (tag, step)


def test_tracking_keys_are_checked_where_they_are_read(tmp_path: Path) -> None:
    assert open_sink("", tmp_path) is None
    with pytest.raises(ConfigError, match="must be one of"):
        open_sink("wandb", tmp_path)
    with pytest.raises(ConfigError, match="tracking-dir"):
        open_sink("tensorboard", None)
    with pytest.raises(ConfigError, match="tracking='wandb' must be one of"):
        parse_run_config({"tracking": "wandb"})
    assert (
        parse_run_config({"tracking": "tensorboard", "tracking-dir": "tb"}).tracker.backend == "tensorboard"
    )
    with pytest.raises(ConfigError, match="tracking must be one of"):
        parse_config({"name": "x", "tracking": "wandb"})
    exp = parse_config({"name": "x", "tracking": "tensorboard", "tracking_dir": "runs"})
    plain = parse_config({"name": "x"})
    assert (exp.tracking, exp.tracking_dir) == ("tensorboard", "runs")
    assert exp.trials()[0].key == plain.trials()[0].key  # tracking does not change a trial's result


@pytest.mark.skipif(importlib.util.find_spec("mlflow") is not None, reason="mlflow is installed")
def test_mlflow_missing_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(TrackingUnavailable, match="pip install mlflow"):
        open_sink("mlflow", tmp_path)


@pytest.mark.skipif(importlib.util.find_spec("mlflow") is None, reason="mlflow is not installed")
def test_mlflow_run_holds_the_logged_rounds(tmp_path: Path) -> None:
    import mlflow

    sink = open_sink("mlflow", tmp_path / "mlruns", run_name="trial")
    assert isinstance(sink, MLflowSink)
    run_id = mlflow.active_run().info.run_id
    sink.log_round(1, {"accepted": 3.0, "server-accuracy": 0.5})
    sink.log_round(2, {"accepted": 2.0, "server-accuracy": 0.75})
    sink.close()
    history = mlflow.tracking.MlflowClient().get_metric_history(run_id, "server-accuracy")
    assert [(m.step, m.value) for m in history] == [(1, 0.5), (2, 0.75)]
