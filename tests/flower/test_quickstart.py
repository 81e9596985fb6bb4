"""A ClientApp with the protocol of Flower's quickstart-pytorch (``quickstart_pytorch.py``: Flower's
API only, its own CNN and run-config keys, local synthetic data) federates with fedmerge's ServerApp,
train and evaluate, with no task on the server (``task = ""``): the store's base is the model. In
process (every message through a protobuf round trip), and with ``flwr run`` of an app whose
``pyproject.toml`` names fedmerge's ServerApp beside the quickstart's ClientApp (slow)."""

from __future__ import annotations

import contextlib
import importlib
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from fedmerge.errors import ConfigError
from fedmerge.flower.config import parse_run_config
from fedmerge.flower.server.commit import RoundReport
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


APP_PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "quickstart-with-fedmerge"
version = "1.0.0"
dependencies = ["flwr[simulation]>=1.42", "torch"]

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "fedmerge-tests"

[tool.flwr.app.components]
serverapp = "fedmerge_server.app:app"  # fedmerge's ServerApp, from the installed fedmerge
clientapp = "quickstart_pytorch:app"   # the quickstart's ClientApp, unchanged

[tool.flwr.app.config]
# the quickstart's own keys (its ClientApp reads batch-size and local-epochs)
num-server-rounds = 2
fraction-evaluate = 1.0
local-epochs = 1
learning-rate = 0.1
batch-size = 16
# fedmerge's ServerApp: a store initialised with the model's weights, no task on the server
store = "fedmerge-store"
task = ""
server-eval = false
aggregator = "fedavg"
min-clients = 3
min-valid = 3
min-evaluate-nodes = 3
lr = 0.05
"""


@pytest.fixture
def local_superlink_cleanup() -> Iterator[None]:
    """End the local SuperLink ``flwr run`` started for this test's FLWR_HOME (its processes, by pid)."""
    import psutil

    yield
    home = os.environ["FLWR_HOME"]
    procs = [
        p for p in psutil.process_iter(["pid", "cmdline"])
        if home in " ".join(p.info.get("cmdline") or []) and p.pid != os.getpid()
    ]  # fmt: skip
    for proc in procs:
        for p in [*proc.children(recursive=True), proc]:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.terminate()
    psutil.wait_procs(procs, timeout=10)


@pytest.mark.integration
@pytest.mark.slow
def test_quickstart_with_fedmerge_server_app_under_flwr_run(
    tmp_path: Path, local_superlink_cleanup: None
) -> None:
    from fedmerge_testing.progress import run_watched

    app_dir = tmp_path / "app"
    app_dir.mkdir()
    (app_dir / "pyproject.toml").write_text(APP_PYPROJECT)
    shutil.copy(Path(__file__).with_name("quickstart_pytorch.py"), app_dir / "quickstart_pytorch.py")
    store = tmp_path / "store"
    with ModelStore.open(store) as st:
        st.commit_base(dict(qs.Net().state_dict()), name="quickstart-pytorch")
    flwr = str(Path(sys.executable).with_name("flwr"))
    result = run_watched(
        [flwr, "run", str(app_dir), "--stream", "--run-config", f"store='{store}'",
         "--federation-config", "num-supernodes=3 client-resources-num-cpus=1"],
        cwd=app_dir, env=dict(os.environ), idle_s=180, watch=[store],
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    with ModelStore.open(store) as st:
        latest = st.get("latest")
        assert latest.round == 2 and sum(c.accepted for c in latest.contributors) == NODES
        for vid in ("v000002", "v000003"):
            (evaluation,) = evaluations_of(st, vid)
            assert len(evaluation.accepted) == NODES and {"eval_loss", "eval_acc"} <= set(evaluation.metrics)
