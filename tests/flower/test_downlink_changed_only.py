"""Only what changed travels: a LoRA round's untouched weights cost no bytes up or down, the node still
rebuilds the server's version bit for bit, and a ClientApp's two calls (``base_weights`` then
``fedmerge_reply``) apply a downlink update once."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from fedmerge.codec import CodecConfig, PackageMeta, decode_package, encode_package
from fedmerge.flower.client import base_weights, fedmerge_reply
from fedmerge.flower.client.node_state import BASES
from fedmerge.flower.client.reply import RESIDUAL_RECORD, load_residual, resolve_base
from fedmerge.flower.downlink import (
    apply_update,
    apply_weights,
    changed_tensors,
    compress_update,
    weights_digest,
)
from fedmerge.flower.records import (
    ARRAYS_RECORD,
    CONFIG_RECORD,
    FEDMERGE_RECORD,
    UPDATE_META_RECORD,
    UPDATE_RECORD,
)
from fedmerge.flower.transport import RECORD_KEY, package_to_record, record_to_package

CODEC = CodecConfig(density=0.2, values="int4")
META = PackageMeta(client_id="server", round=1, base_version_id="v1", base_version_hash="h1")


@pytest.fixture(autouse=True)
def empty_cache() -> Iterator[None]:
    BASES.clear()
    yield
    BASES.clear()


def lora_like() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(weights, an update that changes only the adapted ``q``: rank 2, as a LoRA round's merge)."""
    g = torch.Generator().manual_seed(0)
    weights = {"embed": torch.randn(512, 64, generator=g), "q": torch.randn(64, 64, generator=g),
               "mlp": torch.randn(128, 64, generator=g)}  # fmt: skip
    b, a = torch.randn(64, 2, generator=g), torch.randn(2, 64, generator=g)
    update = {k: torch.zeros_like(v) for k, v in weights.items()}
    update["q"] = 1e-3 * (b @ a)
    return weights, update


def test_changed_tensors_keeps_what_carries_something() -> None:
    _, update = lora_like()
    kept, residual = changed_tensors(update, None)
    assert list(kept) == ["q"] and residual is None
    owed = {"embed": torch.zeros(512, 64), "mlp": torch.zeros(128, 64)}
    owed["mlp"][3, 4] = 1e-4  # a residual still owed keeps its tensor in the package
    kept, residual = changed_tensors(update, owed)
    assert sorted(kept) == ["mlp", "q"] and residual is not None and sorted(residual) == ["mlp"]
    zeros = {k: torch.zeros_like(v) for k, v in update.items()}
    assert list(changed_tensors(zeros, None)[0]) == ["embed"]  # a package is never empty


def test_the_downlink_leaves_untouched_weights_out_and_the_node_rebuilds_bit_for_bit() -> None:
    weights, update = lora_like()
    package, applied, residual = compress_update(update, None, CODEC, META)
    assert list(decode_package(package).tensors) == ["q"]
    assert package == encode_package({"q": update["q"]}, CODEC, meta=META).data  # the changed tensor only
    full = encode_package(update, CODEC, meta=META).data  # every tensor: 20 % of the zeros too
    assert len(package) < 0.2 * len(full)
    assert sorted(applied) == sorted(update)  # Δ̂ names every tensor: zero where nothing was sent
    assert not applied["embed"].any() and not applied["mlp"].any() and applied["q"].any()
    assert sorted(residual) == ["q"]
    expected = apply_weights(weights, applied)
    rebuilt = apply_update(weights, package, weights_digest(expected))
    assert all(torch.equal(rebuilt[k], expected[k]) for k in expected)
    assert torch.equal(rebuilt["embed"], weights["embed"])


def _context() -> Context:
    node_config: dict[str, bool | float | int | str] = {"client-id": "inst-a"}
    return Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config={})


def _train_message(version: str, version_hash: str, round_: int, **records: object) -> Message:
    conf = ConfigRecord(
        {"round": round_, "base-version-id": version, "base-version-hash": version_hash,
         "codec-density": 0.1, "codec-values": "int8", "codec-error-feedback": True}
    )  # fmt: skip
    content = RecordDict({CONFIG_RECORD: ConfigRecord({"server-round": round_}), FEDMERGE_RECORD: conf,
                          **records})  # type: ignore[dict-item]  # fmt: skip
    return Message(content, dst_node_id=7, message_type="train")


@pytest.fixture
def run_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Messages read the process's task identity; set it as Flower's runtime does."""
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", SUPERLINK_NODE_ID)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


@pytest.mark.usefixtures("run_identity")
def test_base_weights_then_fedmerge_reply_apply_a_downlink_update_once() -> None:
    """The worked example's two calls on one message: the second finds the version already held (before,
    it applied the update again to the rebuilt version and failed with MissingBase)."""
    weights, update = lora_like()
    ctx = _context()
    first = _train_message("v1", "h1", 1, **{ARRAYS_RECORD: ArrayRecord(weights)})
    assert all(torch.equal(base_weights(first, ctx)[k], weights[k]) for k in weights)
    package, applied, _ = compress_update(update, None, CODEC, META)
    child = apply_weights(weights, applied)
    meta = ConfigRecord({"parent-version-id": "v1", "digest": weights_digest(child)})
    msg = _train_message("v2", "h2", 2, **{UPDATE_RECORD: package_to_record(package)[RECORD_KEY],
                                            UPDATE_META_RECORD: meta})  # fmt: skip
    base = base_weights(msg, ctx)
    assert weights_digest(base) == weights_digest(child)
    trained = dict(base)
    trained["q"] = base["q"] + 1e-2 * torch.ones(64, 1) @ torch.ones(1, 64)  # only q changes: LoRA-like
    reply = fedmerge_reply(msg, ctx, trained, num_examples=4)
    sent = decode_package(record_to_package(reply.content))
    assert list(sent.tensors) == ["q"]  # the untouched weights are not sent
    assert sent.meta.base_version_id == "v2"
    assert RESIDUAL_RECORD in ctx.state and sorted(load_residual(ctx) or {}) == ["q"]
    again = resolve_base(msg.content, ctx, "v2", "h2")  # a third look: still the held version
    assert weights_digest(again) == weights_digest(child)


@pytest.mark.usefixtures("run_identity")
@pytest.mark.parametrize("deflate", [True, False])
def test_deflated_downlink_is_applied_and_the_reply_deflated_as_the_message_asks(deflate: bool) -> None:
    """``downlink-deflate``: the node rebuilds the version from a deflated update; ``codec-deflate`` in
    ``"fedmerge.config"``: the reply is one DEFLATE stream (fedmerge.codec.container), else as it is."""
    import hashlib
    from dataclasses import replace

    from fedmerge.codec import container

    weights, update = lora_like()
    ctx = _context()
    base_weights(_train_message("v1", "h1", 1, **{ARRAYS_RECORD: ArrayRecord(weights)}), ctx)
    meta = replace(META, base_version_hash=hashlib.sha256(b"v1").hexdigest())  # a store's: 64 hex digits
    package, applied, _ = compress_update(update, None, replace(CODEC, deflate=deflate), meta)
    assert container.is_deflated(package) == deflate
    child = apply_weights(weights, applied)
    update_meta = ConfigRecord({"parent-version-id": "v1", "digest": weights_digest(child)})
    msg = _train_message("v2", "h2", 2, **{UPDATE_RECORD: package_to_record(package)[RECORD_KEY],
                                            UPDATE_META_RECORD: update_meta})  # fmt: skip
    msg.content.config_records[FEDMERGE_RECORD]["codec-deflate"] = deflate
    base = base_weights(msg, ctx)
    assert weights_digest(base) == weights_digest(child)
    trained = {k: v + 1e-2 for k, v in base.items()}
    data = record_to_package(fedmerge_reply(msg, ctx, trained, num_examples=4).content)
    assert container.is_deflated(data) == deflate
    assert sorted(decode_package(data).tensors) == sorted(weights)
