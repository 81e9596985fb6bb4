"""fedmerge's ClientApp under a stock Flower strategy: Flower's own ``flwr.serverapp.strategy.FedAvg``
sends train and evaluate messages without fedmerge's settings; the node answers as a plain Flower
client (dense ``"arrays"`` + ``"metrics"`` with ``num-examples``; loss/accuracy for evaluate), so the
federation trains and the strategy's aggregated weights move and its metrics come back."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg, Result

from fedmerge_clients.app import app as fedmerge_client_app
from fedmerge_simulations.secagg import InProcessGrid
from fedmerge_simulations.tasks import get_task

TRAIN_CONFIG: dict[str, Any] = {
    "task": "digits",
    "lr": 0.05,
    "local-epochs": 1,
}  # what the strategy sends every node


def _initial() -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in get_task("digits").pretrained_base(0).items()}


def _run_fedavg(grid: Grid, num_rounds: int) -> Result:
    strategy = FedAvg(fraction_train=1.0, fraction_evaluate=1.0, min_available_nodes=3, min_train_nodes=3,
                      min_evaluate_nodes=3)  # fmt: skip
    return strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(_initial()),
        num_rounds=num_rounds,
        train_config=ConfigRecord(TRAIN_CONFIG),
        evaluate_config=ConfigRecord({"task": "digits"}),
    )


def _check(result: Result, num_rounds: int) -> None:
    initial = _initial()
    final = result.arrays.to_torch_state_dict()
    assert set(final) == set(initial)
    assert all(final[k].dtype == initial[k].dtype for k in initial)
    assert any(not torch.allclose(final[k], initial[k]) for k in initial), "FedAvg's weights did not move"
    assert sorted(result.train_metrics_clientapp) == list(range(1, num_rounds + 1))
    assert sorted(result.evaluate_metrics_clientapp) == list(range(1, num_rounds + 1))
    for metrics in result.evaluate_metrics_clientapp.values():
        assert {"loss", "accuracy"} <= set(metrics)
        assert 0.0 <= float(metrics["accuracy"]) <= 1.0  # type: ignore[arg-type]
    for metrics in result.train_metrics_clientapp.values():
        assert "train-loss" in metrics
    # a model that learns: the evaluated loss after the last round is below the first's
    losses = [float(result.evaluate_metrics_clientapp[r]["loss"]) for r in (1, num_rounds)]  # type: ignore[arg-type]
    assert losses[-1] < losses[0] or num_rounds == 1


def test_fedmerge_client_app_federates_under_flowers_fedavg_in_process(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Flower's FedAvg strategy code, fedmerge's ClientApp object, every message through a protobuf
    round trip (:class:`InProcessGrid`)."""
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", SUPERLINK_NODE_ID)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = _run_fedavg(InProcessGrid(fedmerge_client_app, 3), num_rounds=3)
    _check(result, 3)


@pytest.mark.slow
def test_fedmerge_client_app_federates_under_flowers_fedavg_server_app() -> None:
    """The same with a FedAvg ServerApp on Flower's supported simulation runtime (``flwr run`` on a
    SuperLink in simulation mode, Ray, one process per node); the strategy's Result comes back through
    :func:`emit_report`."""
    from fedmerge.flower.simulation import emit_report, run_simulation_app

    results: list[Result] = []
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        emit_report(_run_fedavg(grid, num_rounds=2))

    run_simulation_app(
        server, "fedmerge_clients.app:app", num_supernodes=3, num_cpus=1, on_report=results.append
    )
    assert len(results) == 1
    _check(results[0], 2)
