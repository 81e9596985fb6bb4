"""TSV-C on the client (``--node-config "tsv-c-tasks=T"``) in real rounds: what reaches the store is a merge
of rank-k matrices, the other tensors as trained."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedmerge.delta.lowrank import tsv_rank
from fedmerge.flower.server.commit import RoundReport
from fedmerge.store import ModelStore
from fedmerge_clients.app import train_reply

Simulate = Callable[..., list[RoundReport]]
TASKS = 8


def tsv_c_app() -> ClientApp:
    app = ClientApp()

    @app.train()
    def train(message: Message, context: Context) -> Message:
        context.node_config["tsv-c-tasks"] = TASKS  # as --node-config "tsv-c-tasks=8" sets it
        return train_reply(message, context)

    return app


@pytest.mark.slow
def test_clients_send_rank_k_matrices(tmp_path: Path, simulate: Simulate) -> None:
    store = tmp_path / "store"
    opts = {
        "aggregator": "fedavg",
        "codec_density": 1.0,
        "codec_values": "fp32",
        "round_deadline_s": 600.0,
        "wait_for_nodes_s": 300.0,
    }  # generous: a loaded machine is slow
    reports = simulate(store, tsv_c_app(), 2, min_clients=2, min_valid=2, **opts)
    assert reports[0].version_id is not None and len(reports[0].accepted) == 2
    with ModelStore.open(store) as st:
        delta = st.load_delta(reports[0].version_id)
    matrices = {
        n: t for n, t in delta.items() if t.dim() == 2 and min(t.shape) > 2 * tsv_rank(t.shape, TASKS)
    }
    assert matrices, "the task has a matrix large enough to show the rank"
    for name, t in matrices.items():
        rank = int(torch.linalg.matrix_rank(t.float()))
        assert 1 <= rank <= 2 * tsv_rank(tuple(t.shape), TASKS), name  # the mean of two rank-k matrices
    assert any(t.dim() == 1 and bool(t.abs().sum() > 0) for t in delta.values())  # biases as trained
