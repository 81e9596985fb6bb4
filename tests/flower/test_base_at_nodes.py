"""``downlink-base-at-nodes``: a node's first message names the base by weights digest instead of
carrying it, and the node uses its own copy — a bf16 Hugging Face checkpoint at its ``base-path``,
or the base fedmerge's ClientApp builds from its task — only when the digest matches. A node whose
copy is another model refuses with ``MissingBase`` and is sent the weights in its next message.
Rounds run on an in-process grid with real ClientApps, protobuf round trips and a real store."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from flwr.app import Context, Message, RecordDict

from fedmerge.errors import ConfigError
from fedmerge.flower.client import base_weights, fedmerge_reply
from fedmerge.flower.client.local_base import BASE_PATH_KEY, find_base
from fedmerge.flower.client.node_state import BASES, STATE_DIR_KEY
from fedmerge.flower.client.reply import MissingBase, take_own_base
from fedmerge.flower.config import parse_run_config
from fedmerge.flower.downlink import weights_digest
from fedmerge.flower.server.federation import Federation
from fedmerge.store import ModelStore
from fedmerge.store.init import init_store
from fedmerge_clients.app import app as fedmerge_client_app
from fedmerge_simulations.secagg import InProcessGrid

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("server_identity")


def save_llama(directory: Path, seed: int) -> None:
    config = transformers.LlamaConfig(
        vocab_size=40, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(seed)
    transformers.LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(str(directory))


def step(node: int, name: str, shape: tuple[int, ...]) -> torch.Tensor:
    g = torch.Generator().manual_seed(node * 7919 + sum(map(ord, name)))
    return 1e-2 * torch.randn(shape, generator=g)


def own_client_app() -> Any:
    """A user's own ClientApp (the client library only): the base, a fixed fp32 step, the reply.
    Each call starts with an empty process cache, as if every node ran on its own host."""
    from flwr.clientapp import ClientApp

    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        BASES.clear()
        base = base_weights(msg, context)
        trained = {k: v.float() + step(context.node_id, k, tuple(v.shape)) for k, v in base.items()}
        return fedmerge_reply(msg, context, trained, num_examples=10)

    return app


def test_nodes_train_on_their_own_bf16_checkpoint_and_a_node_without_it_gets_the_weights_next(
    tmp_path: Path,
) -> None:
    model_dir, other_dir = tmp_path / "model", tmp_path / "other"
    save_llama(model_dir, seed=0)
    save_llama(other_dir, seed=1)  # the same architecture, other weights: another digest
    store_dir = tmp_path / "store"
    root = init_store(store_dir, model_dir).root
    cfg = parse_run_config(
        {"store": str(store_dir), "task": "hf_causal_lm", "aggregator": "fedavg", "min-clients": 3,
         "min-valid": 2, "num-rounds": 2, "server-eval": False, "init-base": False, "wait-for-nodes-s": 0.0,
         "codec-density": 1.0, "codec-values": "fp32", "downlink-base-at-nodes": True}
    )  # fmt: skip
    grid = InProcessGrid(own_client_app(), 3)
    for i, (node, ctx) in enumerate(sorted(grid.contexts.items())):
        ctx.node_config[STATE_DIR_KEY] = str(tmp_path / f"node-state-{node}")  # one host per node
        ctx.node_config[BASE_PATH_KEY] = str(other_dir if i == 2 else model_dir)
    wrong = max(grid.contexts)
    try:
        with ModelStore.open(store_dir) as store:
            base = store.materialize(root)
            weight_bytes = sum(t.numel() * 4 for t in base.values())  # widened to fp32 in "arrays"
            first, second = Federation(grid, cfg, store).run()
            # round 1: no weights sent; the node whose checkpoint is another model says so and is refused
            assert first.downlink_bytes == 0
            assert {o.node_id for o in first.accepted} == set(grid.contexts) - {wrong}
            (refused,) = first.rejected
            assert refused.node_id == wrong and "holds no copy of it" in refused.reason
            assert "other holds weights digest" in refused.reason  # its base-path, named (shortened)
            # the two nodes trained on their own copy: the merge is the base plus their mean step
            merged = store.materialize(store.get(str(first.version_id)))
            for name, tensor in base.items():
                mean = sum(step(n, name, tuple(tensor.shape)) for n in set(grid.contexts) - {wrong}) / 2
                torch.testing.assert_close(merged[name], (tensor.float() + mean).to(torch.bfloat16))
            # round 2 (full-weights downlink): every node is sent version 2, that node too, and is accepted
            assert second.downlink_bytes == 3 * weight_bytes
            assert len(second.accepted) == 3 and not second.rejected
    finally:
        BASES.clear()


def test_fedmerge_clients_build_the_task_base_and_nothing_is_sent_in_round_one(tmp_path: Path) -> None:
    from fedmerge_server.app import run_server

    def rounds(store: Path, **overrides: Any) -> list[Any]:
        cfg = parse_run_config(
            {"store": str(store), "task": "digits", "aggregator": "fedavg", "min-clients": 3, "min-valid": 3,
             "num-rounds": 2, "server-eval": False, "wait-for-nodes-s": 0.0, "max-retries": 0, **overrides}
        )  # fmt: skip
        grid = InProcessGrid(fedmerge_client_app, 3)
        for node, ctx in grid.contexts.items():  # a fresh directory per run: no files from another
            ctx.node_config[STATE_DIR_KEY] = str(tmp_path / f"state-{len(list(tmp_path.iterdir()))}-{node}")
        BASES.clear()
        return run_server(grid, cfg)

    try:
        own = rounds(tmp_path / "own", **{"downlink-base-at-nodes": True})
        sent = rounds(tmp_path / "sent")
        # a run that continues from a version the federation made sends it: nodes hold only the root
        (continued,) = rounds(tmp_path / "own", **{"downlink-base-at-nodes": True, "num-rounds": 1})
    finally:
        BASES.clear()
    assert all(len(r.accepted) == 3 and not r.rejected for r in [*own, *sent, continued])
    assert own[0].downlink_bytes == 0 and sent[0].downlink_bytes > 0
    assert continued.downlink_bytes == sent[0].downlink_bytes  # the weights, to every node
    assert own[0].uplink_bytes == sent[0].uplink_bytes  # the same training on the same base
    with ModelStore.open(tmp_path / "own") as a, ModelStore.open(tmp_path / "sent") as b:
        ours, theirs = a.materialize(str(own[-1].version_id)), b.materialize(str(sent[-1].version_id))
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


def test_the_node_looks_in_its_directory_then_base_path_then_what_it_builds(tmp_path: Path) -> None:
    model_dir = tmp_path / "model"
    save_llama(model_dir, seed=0)
    from fedmerge.delta.hf import load_hf_state_dict

    weights = load_hf_state_dict(model_dir)
    digest = weights_digest(weights)
    BASES.clear()
    try:
        config: dict[str, Any] = {STATE_DIR_KEY: str(tmp_path / "state")}
        found, tried = find_base(digest, config)
        assert found is None and tried[-1] == "no base-path in the node config"
        found, _ = find_base(digest, config, build=lambda: weights)
        assert found is not None and found.source == "the ClientApp's own base"
        found, _ = find_base(digest, {**config, BASE_PATH_KEY: str(model_dir / "model.safetensors")})
        assert found is not None and found.source.startswith("base-path")
        assert all(torch.equal(found.tensors[k], v) for k, v in weights.items())
        # a copy that is not the named one is never taken, whatever its source
        other = {k: v.clone() for k, v in weights.items()}
        next(iter(other.values())).view(-1)[0] += 1
        found, tried = find_base(digest, config, build=lambda: other)
        assert found is None and "the ClientApp's own base has weights digest" in tried[-1]
        with pytest.raises(ConfigError, match="does not exist"):
            find_base(digest, {**config, BASE_PATH_KEY: str(tmp_path / "nowhere")})
        # a base kept by an earlier node of this host is found in the node-state directory
        context = Context(run_id=1, node_id=7, node_config=config, state=RecordDict(), run_config={})
        take_own_base(context, digest, "v1", "h1", build=lambda: weights)
        BASES.clear()
        found, _ = find_base(digest, config)
        assert found is not None and found.source.startswith("node-state directory")
        BASES.clear()
        with pytest.raises(MissingBase, match="downlink-base-at-nodes"):
            take_own_base(context, "0" * 64, "v2", "h2")
    finally:
        BASES.clear()
