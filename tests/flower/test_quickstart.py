"""A ClientApp with the protocol of Flower's quickstart-pytorch (``quickstart_pytorch.py``: Flower's
API only, its own CNN and run-config keys, local synthetic data) federates with fedmerge's ServerApp,
train and evaluate, with no task on the server (``task = ""``): the store's base is the model."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from fedmerge.errors import ConfigError
from fedmerge.flower.config import parse_run_config
from fedmerge.flower.rounds import RoundReport
from fedmerge.store import ModelStore
from fedmerge.store.evaluations import evaluations_of
from fedmerge_server.app import run_server
from fedmerge_simulations.secagg import InProcessGrid

sys.path.insert(0, str(Path(__file__).parent))  # the app module beside this test, as flwr run loads it
qs = importlib.import_module("quickstart_pytorch")
NODES = 3


@pytest.fixture(autouse=True)
def run_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", SUPERLINK_NODE_ID)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


def _run_config(store: Path, **overrides: Any) -> dict[str, Any]:
    return {
        "store": str(store), "task": "", "server-eval": False, "aggregator": "fedavg", "num-rounds": 2,
        "min-clients": NODES, "min-valid": NODES, "fraction-evaluate": 1.0, "min-evaluate-nodes": NODES,
        "local-epochs": 1, "lr": 0.05, "batch-size": 16, "wait-for-nodes-s": 0.0,
        **overrides,
    }  # fmt: skip


def _grid(run_config: dict[str, Any]) -> InProcessGrid:
    grid = InProcessGrid(qs.app, NODES)
    for context in grid.contexts.values():  # as flwr run delivers it to every ClientApp
        context.run_config = dict(run_config)
    return grid


def test_quickstart_client_app_trains_and_evaluates_with_fedmerge_server_app(tmp_path: Path) -> None:
    store = tmp_path / "store"
    base = {k: v.clone() for k, v in qs.Net().state_dict().items()}
    with ModelStore.open(store) as st:  # what `fedmerge init` does from the model's saved weights
        st.commit_base(base, name="quickstart-pytorch")
    run_config = _run_config(store)
    reports: list[RoundReport] = []
    run_server(_grid(run_config), parse_run_config(run_config), reports.append)
    assert [r.version_id for r in reports] == ["v000002", "v000003"]
    with ModelStore.open(store) as st:
        for report in reports:
            version = st.get(str(report.version_id))
            assert len(version.contributors) == NODES and all(c.accepted for c in version.contributors)
            assert all(c.codec == {"format": "dense", "values": "fp32", "density": 1.0}
                       for c in version.contributors)  # fmt: skip
            assert "clients-train_loss" in version.metrics
            ev = report.evaluation
            assert ev is not None and len(ev.accepted) == NODES and not ev.dropped
            assert {"eval_loss", "eval_acc"} <= set(ev.metrics)
            ref = sum(n.num_examples * n.metrics["eval_loss"] for n in ev.accepted) / ev.num_examples
            assert ev.metrics["eval_loss"] == pytest.approx(ref)
            assert [e.metrics for e in evaluations_of(st, version.id)] == [pytest.approx(ev.metrics)]
        final = st.materialize(st.get("latest"))
        assert set(final) == set(base)
        assert any(not torch.equal(final[k], base[k]) for k in base)
        # the federation learns: the second evaluation's loss is below the first's
        assert reports[1].evaluation.metrics["eval_loss"] < reports[0].evaluation.metrics["eval_loss"]  # type: ignore[union-attr]


def test_no_task_on_the_server_needs_server_eval_off(tmp_path: Path) -> None:
    store = tmp_path / "store"
    with ModelStore.open(store) as st:
        st.commit_base(dict(qs.Net().state_dict()), name="quickstart-pytorch")
    run_config = _run_config(store, **{"server-eval": True})
    with pytest.raises(ConfigError, match="set server-eval=false"):
        run_server(_grid(run_config), parse_run_config(run_config))
