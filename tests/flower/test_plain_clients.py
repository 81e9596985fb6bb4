"""Flower's conventions on the wire: plain Flower ClientApps (``fedmerge_clients.plain_app``, which
imports nothing from fedmerge) alone and mixed with fedmerge clients on Flower's simulation engine;
their bad replies; a task named by import path with per-node ``data-path`` files; and the start-up
check of the task's model against the store's base."""

from __future__ import annotations

import ast
import math
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedmerge.flower.server.commit import RoundReport
from fedmerge.store import ModelStore
from fedmerge_clients.app import train_reply
from fedmerge_clients.plain_app import train as plain_train
from fedmerge_server.app import BaseMismatch

Simulate = Callable[..., list[RoundReport]]
Scripted = Callable[[list[str]], ClientApp]
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).parent))  # custom_task, a user's task module


def test_plain_app_imports_nothing_from_fedmerge() -> None:
    tree = ast.parse((ROOT / "clients" / "plain_app.py").read_text())
    modules = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    modules += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert modules and not [m for m in modules if m.startswith("fedmerge")]


def test_plain_clients_alone_train_every_round_and_their_metrics_are_kept(
    tmp_path: Path, simulate: Simulate, scripted_client_app: Scripted
) -> None:
    store = tmp_path / "store"
    reports = simulate(store, scripted_client_app(["plain"] * 3), 3, num_rounds=2, min_clients=3, min_valid=3)
    assert [r.version_id for r in reports] == ["v000002", "v000003"]
    with ModelStore.open(store) as st:
        weight_bytes = sum(t.numel() * t.element_size() for t in st.materialize(st.get("v000001")).values())
        for report, vid in zip(reports, ["v000002", "v000003"], strict=True):
            version = st.get(vid)
            assert all(c.accepted for c in version.contributors) and len(version.contributors) == 3
            assert {c.codec["format"] for c in version.contributors if c.codec} == {"dense"}
            assert all(c.codec == {"format": "dense", "values": "fp32", "density": 1.0}
                       for c in version.contributors)  # fmt: skip
            assert "clients-train_loss" in version.metrics
            per_client = version.metadata["client-metrics"]
            assert len(per_client) == 3 and all("train_loss" in m for m in per_client.values())
            # a plain client never holds a version: it gets the weights in "arrays" in every round
            assert report.downlink_bytes == 3 * weight_bytes
            assert any(float(t.abs().sum()) > 0 for t in st.load_delta(version).values())
        assert st.verify().ok


def test_plain_and_fedmerge_clients_mixed_with_fedavg(
    tmp_path: Path, simulate: Simulate, scripted_client_app: Scripted
) -> None:
    """With the compressed downlink, from round 2 on only the plain nodes are sent weights (the
    fedmerge nodes get the update from the version they hold); both kinds are merged every round and
    the manifest records what each actually sent."""
    store = tmp_path / "store"
    plan = ["ok", "plain", "ok", "plain"]
    reports = simulate(
        store, scripted_client_app(plan), 4, num_rounds=2, min_clients=4, min_valid=4, aggregator="fedavg",
        downlink_density=0.1,
    )  # fmt: skip
    assert [r.version_id for r in reports] == ["v000002", "v000003"]
    with ModelStore.open(store) as st:
        weight_bytes = sum(t.numel() * t.element_size() for t in st.materialize(st.get("v000001")).values())
        assert reports[0].downlink_bytes == 4 * weight_bytes
        # the plain nodes get "arrays"; the fedmerge nodes a compressed update of v000002 (< 10 % each)
        assert 2 * weight_bytes < reports[1].downlink_bytes < 2.2 * weight_bytes
        for vid in ("v000002", "v000003"):
            version = st.get(vid)
            assert version.method == "fedavg"
            codecs = {c.client_id: c.codec for c in version.contributors}
            assert all(c.accepted for c in version.contributors), [c.reason for c in version.contributors]
            fedmerge_ids = {"client-0", "client-2"}
            assert fedmerge_ids <= set(codecs)
            for cid, codec in codecs.items():
                assert codec is not None
                if cid in fedmerge_ids:
                    assert codec["format"] == "fedmerge-delta-v1" and codec["values"] == "int8"
                    assert 0.05 < codec["density"] <= 0.11
                else:
                    assert codec == {"format": "dense", "values": "fp32", "density": 1.0}
            assert version.params["codec"]["values"] == "int8"  # configured; contributors say what was used
        assert st.verify().ok


Corrupt = Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]


def _plain_then(corrupt: Corrupt) -> Callable[..., Message]:
    def behave(message: Message, context: Context) -> Message:
        reply = plain_train(message, context)
        arrays = reply.content.array_records["arrays"]
        weights = corrupt(dict(arrays.to_torch_state_dict()))
        metrics = reply.content.metric_records["metrics"]
        content = RecordDict({"arrays": ArrayRecord(weights), "metrics": metrics})
        return Message(content, reply_to=message)

    return behave


def _wrong_shape(w: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {**w, "fc1.weight": torch.zeros(256, 64)}


def _missing(w: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in w.items() if k != "fc3.bias"}


def _nan(w: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    w["fc2.weight"][0, 0] = math.nan
    return w


def test_bad_plain_replies_are_recorded_rejections_and_the_round_commits(
    tmp_path: Path, simulate: Simulate, monkeypatch: pytest.MonkeyPatch
) -> None:
    behaviours = {"plain": plain_train, "shape": _plain_then(_wrong_shape), "missing": _plain_then(_missing),
                  "nan": _plain_then(_nan), "ok": train_reply}  # fmt: skip
    plan = ["ok", "plain", "shape", "missing", "nan"]
    app = ClientApp()

    @app.train()
    def train(message: Message, context: Context) -> Message:
        return behaviours[plan[int(context.node_config["partition-id"])]](message, context)

    store = tmp_path / "store"
    reports = simulate(store, app, 5, min_clients=5, min_valid=2)
    assert [r.version_id for r in reports] == ["v000002"]
    with ModelStore.open(store) as st:
        version = st.get("latest")
        rejected = sorted(c.reason or "" for c in version.contributors if not c.accepted)
        assert sum(c.accepted for c in version.contributors) == 2
        assert len(rejected) == 3
        joined = " | ".join(rejected)
        assert "fc1.weight" in joined and "(256, 64)" in joined
        assert "fc3.bias" in joined and "missing" in joined
        assert "fc2.weight" in joined and "NaN" in joined


def _write_node_files(folder: Path, count: int) -> list[Path]:
    from custom_task import synthetic

    paths = []
    for i in range(count):
        x, y = synthetic(40 + 10 * i, seed=i)
        paths.append(folder / f"node{i}.npz")
        np.savez(paths[-1], x=x, y=y)
    return paths


def _data_path_app(paths: list[Path]) -> ClientApp:
    """Each simulated node is given its own file, as ``--node-config "data-path=..."`` would."""
    app = ClientApp()

    @app.train()
    def train(message: Message, context: Context) -> Message:
        context.node_config["data-path"] = str(paths[int(context.node_config["partition-id"])])
        return train_reply(message, context)

    return app


def test_task_by_import_path_trains_on_each_nodes_data_path(
    tmp_path: Path, simulate: Simulate, monkeypatch: pytest.MonkeyPatch
) -> None:
    from custom_task import make_task

    monkeypatch.setenv("PYTHONPATH", f"{Path(__file__).parent}:{ROOT}")  # for the Ray workers
    paths = _write_node_files(tmp_path, 3)
    paths[2] = tmp_path / "no-such-dir" / "data.npz"  # this node's data-path does not exist
    store = tmp_path / "store"
    with ModelStore.open(store) as st:
        st.commit_base(dict(make_task().build_model(0).state_dict()), name="custom")
    reports = simulate(
        store, _data_path_app(paths), 3, task="custom_task:make_task", min_clients=3, min_valid=2,
        num_rounds=2, lr=0.5, local_epochs=3,
    )  # fmt: skip
    assert [r.version_id for r in reports] == ["v000002", "v000003"]
    with ModelStore.open(store) as st:
        version = st.get("latest")
        assert version.metadata["task"] == "custom_task:make_task"
        assert "server-accuracy" in version.metrics  # the task's own server_evaluate
        reasons = [c.reason or "" for c in version.contributors if not c.accepted]
        assert len(reasons) == 1 and "no-such-dir/data.npz' does not exist on this node" in reasons[0]
        examples = sorted(c.num_examples for c in version.contributors if c.accepted)
        assert examples == [36, 46]  # each node's own file (40 and 50 samples, 4 held out for testing)


def test_a_base_that_does_not_match_the_task_is_refused_before_any_client_trains(
    tmp_path: Path, simulate: Simulate
) -> None:
    trained: list[int] = []
    app = ClientApp()

    @app.train()
    def train(message: Message, context: Context) -> Message:
        trained.append(1)
        return train_reply(message, context)

    store = tmp_path / "store"
    with ModelStore.open(store) as st:
        st.commit_base({"fc1.weight": torch.zeros(256, 64), "fc1.bias": torch.zeros(256)}, name="other")
    with pytest.raises(BaseMismatch, match=r"task 'digits' does not match the store's base v000001") as info:
        simulate(store, app, 2)
    message = str(info.value)
    assert "'fc1.weight' has shape (128, 64) in the model, (256, 64) in the base" in message
    assert "(6 difference(s))" in message  # fc1 shapes; fc2, fc3 weight and bias missing
    assert not trained
    with ModelStore.open(store) as st:
        assert [v.id for v in st.list()] == ["v000001"]


def test_contributor_codec_is_optional_in_manifests() -> None:
    from fedmerge.store import Contributor

    old = {"client_id": "a", "num_examples": 3, "submission_hash": "h", "accepted": True, "reason": None}
    loaded = Contributor.from_dict(old)
    assert loaded.codec is None and loaded.to_dict() == old  # an old manifest keeps its content hash
    codec = {"format": "dense", "values": "fp32", "density": 1.0}
    new = Contributor("b", 4, "h2", codec=codec)
    assert Contributor.from_dict(new.to_dict()) == new and new.to_dict()["codec"] == codec
