"""The worked example (``examples/hf_lora``): a small causal LM built from a config with a locally
trained tokenizer, ``fedmerge init`` from its directory, LoRA rounds with the example ClientApp (only
Flower's API + fedmerge's client library), each node on its own private text file."""

from __future__ import annotations

import sys
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from flwr.app import ConfigRecord, Context, Message
from flwr.clientapp import ClientApp

from fedmerge.flower.client.reply import BASE_META, BASE_STATE
from fedmerge.flower.records import UPDATE_RECORD
from fedmerge.flower.server.commit import RoundReport
from fedmerge.store import ModelStore
from fedmerge.store.init import init_store

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "hf_lora"
sys.path.insert(0, str(EXAMPLE))

Simulate = Callable[..., list[RoundReport]]
FORGOT = "test.forgot-base"  # context.state: this node already dropped its base once


def example_store(tmp_path: Path) -> tuple[Path, Path, list[Path]]:
    from make_model import make_model
    from sample_data import write_corpora

    corpora = write_corpora(tmp_path)
    model_dir = make_model(tmp_path / "my-lm", corpora)
    store = tmp_path / "store"
    init_store(store, model_dir)
    return store, model_dir, corpora


def shipped_codec() -> dict[str, Any]:
    """The codec keys of the example's own run config (its ``pyproject.toml``)."""
    with open(EXAMPLE / "pyproject.toml", "rb") as f:
        config = tomllib.load(f)["tool"]["flwr"]["app"]["config"]
    codecs = ("codec-", "downlink-")
    keys = [prefix + k for prefix in codecs for k in ("rank", "density", "values")]
    return {k.replace("-", "_"): config[k] for k in keys}


def test_example_lora_rounds_in_simulation(
    tmp_path: Path, simulate: Simulate, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two LoRA rounds with the example's shipped codec: round 2's downlink is each node's compressed
    update since the version it holds; node 0 loses its base before round 2, so it cannot apply the
    update, says so, and is sent the full weights in the round's next attempt (it never trains on a
    wrong base)."""
    from client_app import train as example_train

    monkeypatch.setenv("PYTHONPATH", f"{EXAMPLE}:{ROOT}")  # the Ray workers import client_app
    store, model_dir, corpora = example_store(tmp_path)
    app = ClientApp()

    @app.train()
    def train(message: Message, context: Context) -> Message:
        i = int(context.node_config["partition-id"])
        context.node_config.update({"model-dir": str(model_dir), "data-path": str(corpora[i]),
                                    "client-id": f"inst-{i}"})  # as --node-config would  # fmt: skip
        if i == 0 and UPDATE_RECORD in message.content and FORGOT not in context.state:
            context.state.pop(BASE_STATE, None)  # as a node whose disk was wiped
            del context.state[BASE_META]
            context.state[FORGOT] = ConfigRecord({"round": 2})
        return example_train(message, context)

    reports = simulate(
        store, app, 3, task="hf_causal_lm", mode="lora", num_rounds=2, min_clients=3, min_valid=3,
        server_eval=False, init_base=False, lr=0.01, local_epochs=1, batch_size=8, max_retries=1,
        **shipped_codec(),
    )  # fmt: skip
    assert [r.version_id for r in reports] == ["v000002", None, "v000003"]
    first, refused, retried = reports
    assert [o.client_id for o in refused.rejected] == ["inst-0"]
    assert "send full weights" in str(refused.rejected[0].reason)
    full = first.downlink_bytes // 3  # round 1: the base weights to each node
    # round 2: the compressed update to the three holders of v000002's parent, a small fraction of them
    assert 0 < refused.downlink_bytes < 0.02 * first.downlink_bytes
    assert retried.downlink_bytes == full  # the next attempt: full weights to node 0 only
    with ModelStore.open(store) as st:
        for vid in ("v000002", "v000003"):
            version = st.get(vid)
            assert sorted(c.client_id for c in version.contributors if c.accepted) == [
                "inst-0",
                "inst-1",
                "inst-2",
            ]
            assert all(c.codec and c.codec["format"] == "fedmerge-delta-v1" for c in version.contributors)
            delta = st.load_delta(version)
            touched = sorted(n for n, t in delta.items() if float(t.abs().sum()) > 0)
            assert touched and all(n.endswith(("q_proj.weight", "v_proj.weight")) for n in touched)
            assert "clients-train-loss" in version.metrics
        assert st.verify().ok
    # a package carries only the adapted weights: a small fraction of the dense fp32 update of the model
    for r in reports:
        assert r.uplink_bytes < 0.03 * r.uplink_dense_bytes


@pytest.mark.usefixtures("server_identity")
@pytest.mark.parametrize("freeze", [True, False], ids=["a-frozen", "a-trained"])
def test_with_a_frozen_the_nodes_updates_share_one_row_space(tmp_path: Path, freeze: bool) -> None:
    """``lora-freeze-a`` (the example's own run-config key, FFA-LoRA): every node of a round draws
    the same A and trains only B, so each node's ΔW = (α/r)·B_i·A lies in A's row space and the
    nodes' updates stacked have rank r — their mean is a rank-r factor pair exactly. With A trained,
    the stacked updates have a larger rank. One round, two nodes, on an in-process grid."""
    import torch
    from client_app import train as example_train

    from fedmerge.codec import decode_package
    from fedmerge.flower.config import parse_run_config
    from fedmerge.flower.server.federation import Federation
    from fedmerge.flower.transport import record_to_package
    from fedmerge_simulations.secagg import InProcessGrid

    store, model_dir, corpora = example_store(tmp_path)
    replies: dict[int, Any] = {}
    app = ClientApp()

    @app.train()
    def train(message: Message, context: Context) -> Message:
        i = int(context.node_config["partition-id"])
        context.node_config.update({"model-dir": str(model_dir), "data-path": str(corpora[i])})
        reply = example_train(message, context)
        replies[i] = decode_package(record_to_package(reply.content)).tensors
        return reply

    cfg = parse_run_config(
        {"store": str(store), "task": "hf_causal_lm", "mode": "lora", "aggregator": "fedavg", "num-rounds": 1,
         "min-clients": 2, "min-valid": 2, "server-eval": False, "init-base": False, "wait-for-nodes-s": 0.0,
         "codec-density": 1.0, "codec-values": "fp32", "lr": 0.01, "local-epochs": 2, "batch-size": 2,
         "lora-rank": 4,
         "lora-freeze-a": freeze}
    )  # fmt: skip
    with ModelStore.open(store) as st:
        (report,) = Federation(InProcessGrid(app, 2), cfg, st).run()
    assert len(report.accepted) == 2
    adapted = sorted(replies[0])
    assert adapted and all(n.endswith(("q_proj.weight", "v_proj.weight")) for n in adapted)
    for name in adapted:
        stacked = torch.cat([torch.as_tensor(replies[i][name]) for i in (0, 1)]).double()
        sv = torch.linalg.svdvals(stacked)
        rank = int((sv > 1e-4 * sv[0]).sum())
        assert (rank == 4) if freeze else (rank > 4), (name, rank, sv[:8].tolist())
