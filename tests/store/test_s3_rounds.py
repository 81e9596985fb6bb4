"""Rounds on a shared store: the ServerApp's ``run_server`` with ``store = "s3://…"`` (a real SeaweedFS)
and ``catalog = "postgresql://…"`` (a real PostgreSQL) commits each round's version there, a second
server with its own empty cache reads the same history, and a bucket without a base is one
:class:`MissingStore` line."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from pg_server import PgServer

from fedmerge.flower.config import parse_run_config
from fedmerge.flower.server.federation import ensure_base
from fedmerge.store import ModelStore
from fedmerge.store.s3_local import LocalSeaweed
from fedmerge_server.app import MissingStore, run_server
from fedmerge_simulations.secagg import InProcessGrid

SHAPES = {"fc.weight": (6, 4), "fc.bias": (6,)}


def _base() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {n: torch.randn(s, generator=g).to(torch.bfloat16) for n, s in SHAPES.items()}


def _plain_app() -> ClientApp:
    """Flower's API only: fp32 weights in, the weights plus a node-specific step out."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        out = {}
        for name, array in msg.content.array_records["arrays"].items():
            w = torch.from_numpy(array.numpy().copy()).float()
            out[name] = Array((w + 0.01 * (context.node_id - 999)).numpy())
        content = RecordDict({"arrays": ArrayRecord(out), "metrics": MetricRecord({"num-examples": 10})})
        return Message(content, reply_to=msg)

    return app


@pytest.fixture(autouse=True)
def _server_identity() -> Iterator[None]:
    """Messages read the process's task identity; set it as Flower's ServerApp runtime does."""
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


def _config(url: str, rounds: int, catalog: str = "") -> Any:
    return parse_run_config(
        {
            "store": url,
            "catalog": catalog,
            "task": "",
            "server-eval": False,
            "aggregator": "fedavg",
            "min-clients": 3,
            "min-valid": 2,
            "num-rounds": rounds,
            "wait-for-nodes-s": 0.0,
        }
    )


def test_rounds_commit_to_a_shared_store_and_a_second_server_reads_them(
    seaweed_server: LocalSeaweed, pg_server: PgServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for key, value in seaweed_server.env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("FEDMERGE_S3_CACHE", str(tmp_path / "cache-a"))  # the first server's local cache
    monkeypatch.chdir(tmp_path)  # files the run keeps beside the store land here, not in the repository
    url = f"s3://{seaweed_server.create_bucket('rounds-on-s3')}/store"
    catalog = pg_server.create_database("rounds_on_s3")
    base = _base()
    with ModelStore.open(url, catalog=catalog) as store:
        root = ensure_base(store, lambda: base, name="mlp")

    reports = run_server(InProcessGrid(_plain_app(), 3), _config(url, rounds=2, catalog=catalog))

    assert [r.round for r in reports] == [1, 2] and all(r.version_id for r in reports)
    # another server, with an empty cache of its own, sees the same chain from the bucket
    with ModelStore.open(url, catalog=catalog, cache_dir=tmp_path / "cache-b") as other:
        latest = other.get("latest")
        assert latest.id == reports[-1].version_id and latest.parents == (reports[0].version_id,)
        weights = other.materialize(latest)
    # FedAvg of steps 0.01·(1, 2, 3) is 0.02 per round, on the bf16 base widened to fp32, cast back
    # (within bf16's precision: each round rounds to bf16 once)
    expected = (base["fc.bias"].float() + 0.02).to(torch.bfloat16)
    expected = (expected.float() + 0.02).to(torch.bfloat16)
    assert weights["fc.bias"].dtype == torch.bfloat16
    torch.testing.assert_close(weights["fc.bias"], expected)
    moved = (weights["fc.bias"].float() - base["fc.bias"].float()).abs().min()
    assert moved > 0.03, moved
    assert root.id != latest.id


def test_a_bucket_without_a_base_is_one_missing_store_line(
    seaweed_server: LocalSeaweed, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for key, value in seaweed_server.env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("FEDMERGE_S3_CACHE", str(tmp_path / "cache"))
    url = f"s3://{seaweed_server.create_bucket('rounds-empty')}/store"
    monkeypatch.chdir(tmp_path)
    with pytest.raises(MissingStore, match=r"holds no version yet.*fedmerge init"):
        run_server(InProcessGrid(_plain_app(), 3), _config(url, rounds=1))
