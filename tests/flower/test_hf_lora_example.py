"""The worked example (``examples/hf_lora``): a small causal LM built from a config with a locally
trained tokenizer, ``fedmerge init`` from its directory, LoRA rounds with the example ClientApp (only
Flower's API + fedmerge's client library), each node on its own private text file."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedmerge.flower.server.commit import RoundReport
from fedmerge.store import ModelStore
from fedmerge.store.init import init_store

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "hf_lora"
sys.path.insert(0, str(EXAMPLE))

Simulate = Callable[..., list[RoundReport]]

TEXTS = [
    "the river runs north past the old mill and the stone bridge",
    "patients with fever should drink water and rest for two days",
    "the contract ends when both parties sign the final page",
]


def write_corpora(folder: Path, lines: int = 24) -> list[Path]:
    """One private text file per institution, each in its own style."""
    paths = []
    for i, text in enumerate(TEXTS):
        words = text.split()
        rows = [" ".join(words[(j % 3) :] + words[: (j % 3)]) for j in range(lines)]
        paths.append(folder / f"inst{i}.txt")
        paths[-1].write_text("\n".join(rows) + "\n")
    return paths


def example_store(tmp_path: Path) -> tuple[Path, Path, list[Path]]:
    from make_model import make_model

    corpora = write_corpora(tmp_path)
    model_dir = make_model(tmp_path / "my-lm", corpora)
    store = tmp_path / "store"
    init_store(store, model_dir)
    return store, model_dir, corpora


def test_example_lora_rounds_in_simulation(
    tmp_path: Path, simulate: Simulate, monkeypatch: pytest.MonkeyPatch
) -> None:
    from client_app import train as example_train

    monkeypatch.setenv("PYTHONPATH", f"{EXAMPLE}:{ROOT}")  # the Ray workers import client_app
    store, model_dir, corpora = example_store(tmp_path)
    app = ClientApp()

    @app.train()
    def train(message: Message, context: Context) -> Message:
        i = int(context.node_config["partition-id"])
        context.node_config.update({"model-dir": str(model_dir), "data-path": str(corpora[i]),
                                    "client-id": f"inst-{i}"})  # as --node-config would  # fmt: skip
        return example_train(message, context)

    reports = simulate(
        store, app, 3, task="hf_causal_lm", mode="lora", num_rounds=2, min_clients=3, min_valid=3,
        server_eval=False, init_base=False, lr=0.01, local_epochs=1, batch_size=8,
    )  # fmt: skip
    assert [r.version_id for r in reports] == ["v000002", "v000003"]
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
    # a package is a small fraction of the dense fp32 update of the whole model
    for r in reports:
        assert r.uplink_bytes < 0.2 * r.uplink_dense_bytes
