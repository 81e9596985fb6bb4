"""A node's packed state and the process's base cache: bit-exact round trips, the same weights with and
without the cache, and every downlink check still made when the cache answers."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, RecordDict

from fedmerge.codec import CodecConfig, PackageMeta
from fedmerge.flower.client.node_state import (
    BASES,
    STATE_DIR_ENV,
    NodeStateError,
    pack_tensors,
    packed_record,
    record_bytes,
    unpack_tensors,
)
from fedmerge.flower.client.reply import (
    BASE_META,
    BASE_STATE,
    MissingBase,
    load_residual,
    resolve_base,
    save_residual,
)
from fedmerge.flower.downlink import UpdateMismatch, apply_weights, compress_update, weights_digest
from fedmerge.flower.records import (
    ARRAYS_RECORD,
    CONFIG_RECORD,
    FEDMERGE_RECORD,
    UPDATE_META_RECORD,
    UPDATE_RECORD,
)
from fedmerge.flower.transport import RECORD_KEY, package_to_record

META = PackageMeta(client_id="server", round=1, base_version_id="v1", base_version_hash="h1")


@pytest.fixture(autouse=True)
def empty_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv(STATE_DIR_ENV, str(tmp_path / "node-state"))  # each test its own directory
    BASES.clear()
    yield
    BASES.clear()


def mixed() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "w": torch.randn(33, 7, generator=g),
        "half": torch.randn(5, generator=g).half(),
        "bf": torch.randn(3, 4, generator=g).bfloat16(),
        "f64": torch.randn(2, generator=g).double(),
        "steps": torch.tensor(7),
        "mask": torch.tensor([True, False, True]),
        "empty": torch.zeros(0, 4),
        "t": torch.randn(8, 8, generator=g).t(),  # not contiguous
    }


def test_packed_tensors_round_trip_bit_for_bit_in_every_dtype() -> None:
    tensors = mixed()
    back = unpack_tensors(record_bytes(packed_record(pack_tensors(tensors))))
    assert list(back) == list(tensors)
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype and back[name].shape == t.shape, name
        assert torch.equal(back[name], t), name
    back["w"] += 1  # writable, and not the caller's tensor
    assert not torch.equal(back["w"], tensors["w"])


@pytest.mark.parametrize(
    "data",
    [b"", b"\x05\x00\x00\x00\x00\x00\x00\x00[[1]", pack_tensors({"w": torch.ones(4)})[:-20]],
    ids=["empty", "bad-layout", "truncated"],
)
def test_malformed_packed_state_is_one_clear_error(data: bytes) -> None:
    with pytest.raises(NodeStateError, match="not a packed tensor blob"):
        unpack_tensors(data)


def test_a_record_of_another_format_is_refused() -> None:
    npy = ArrayRecord({"w": Array(torch.ones(3).numpy())})
    with pytest.raises(NodeStateError, match="written by another fedmerge version"):
        record_bytes(npy)


def _context(node: int) -> Context:
    return Context(run_id=1, node_id=node, node_config={}, state=RecordDict(), run_config={})


def _message(version: str, version_hash: str, **records: object) -> RecordDict:
    conf = ConfigRecord({"round": 1, "base-version-id": version, "base-version-hash": version_hash})
    return RecordDict({CONFIG_RECORD: conf, FEDMERGE_RECORD: ConfigRecord({}), **records})  # type: ignore[dict-item]


def _downlink(parent: dict[str, torch.Tensor]) -> tuple[RecordDict, dict[str, torch.Tensor]]:
    update = {k: 0.01 * torch.randn_like(v) for k, v in parent.items() if v.is_floating_point()}
    package, applied, _ = compress_update(update, None, CodecConfig(density=0.2, values="int4"), META)
    child = apply_weights(parent, applied)
    meta = ConfigRecord({"parent-version-id": "v1", "digest": weights_digest(child)})
    content = _message(
        "v2", "h2",
        **{UPDATE_RECORD: package_to_record(package)[RECORD_KEY], UPDATE_META_RECORD: meta},
    )  # fmt: skip
    return content, child


def test_nodes_rebuild_the_same_version_with_and_without_the_cache() -> None:
    parent = {"w": torch.randn(64, 16), "b": torch.randn(16), "steps": torch.tensor(3)}
    full = _message("v1", "h1", **{ARRAYS_RECORD: ArrayRecord(parent)})
    nodes = [_context(i) for i in range(3)]
    for ctx in nodes:
        got = resolve_base(full, ctx, "v1", "h1")
        assert all(torch.equal(got[k], parent[k]) for k in parent)
    content, child = _downlink(parent)
    first = resolve_base(content, nodes[0], "v2", "h2")  # decoded, added, verified
    assert BASES.applied(weights_digest(parent), _sha(content)) == weights_digest(child)
    second = resolve_base(content, nodes[1], "v2", "h2")  # from the process's cache
    BASES.clear()  # as in another process: the node's own packed copy is read back
    third = resolve_base(content, nodes[2], "v2", "h2")
    for got in (first, second, third):
        assert weights_digest(got) == weights_digest(child)
        assert all(got[k].dtype == child[k].dtype and torch.equal(got[k], child[k]) for k in child)
    first["w"] += 1.0  # the caller's copy: the held base is untouched
    held = resolve_base(_message("v2", "h2"), nodes[0], "v2", "h2")
    assert torch.equal(held["w"], child["w"])
    assert nodes[0].state.config_records[BASE_META]["digest"] == weights_digest(child)
    BASES.clear()
    assert torch.equal(resolve_base(_message("v2", "h2"), nodes[1], "v2", "h2")["w"], child["w"])


def _sha(content: RecordDict) -> str:
    import hashlib

    from fedmerge.flower.transport import record_to_package

    return hashlib.sha256(
        record_to_package(RecordDict({RECORD_KEY: content.array_records[UPDATE_RECORD]}))
    ).hexdigest()


def test_the_cache_never_answers_for_another_parent_or_another_digest() -> None:
    parent = {"w": torch.randn(64, 16), "b": torch.randn(16)}
    other = {k: v + 1.0 for k, v in parent.items()}  # same version id, other weights
    content, _ = _downlink(parent)
    good, bad = _context(1), _context(2)
    resolve_base(_message("v1", "h1", **{ARRAYS_RECORD: ArrayRecord(parent)}), good, "v1", "h1")
    resolve_base(_message("v1", "h1", **{ARRAYS_RECORD: ArrayRecord(other)}), bad, "v1", "h1")
    resolve_base(content, good, "v2", "h2")
    with pytest.raises(UpdateMismatch, match="different parent"):
        resolve_base(content, bad, "v2", "h2")
    assert bad.state.config_records[BASE_META]["version-id"] == "v1"  # nothing replaced
    # a cached application whose digest is not the one announced is refused too
    wrong = RecordDict(dict(content.items()))
    wrong[UPDATE_META_RECORD] = ConfigRecord({"parent-version-id": "v1", "digest": "0" * 64})
    node = _context(3)
    resolve_base(_message("v1", "h1", **{ARRAYS_RECORD: ArrayRecord(parent)}), node, "v1", "h1")
    with pytest.raises(UpdateMismatch):
        resolve_base(wrong, node, "v2", "h2")
    with pytest.raises(MissingBase):
        resolve_base(content, _context(4), "v2", "h2")  # holds nothing


def test_the_base_is_kept_out_of_the_context_state_and_the_residual_round_trips() -> None:
    ctx = _context(1)
    parent = {"w": torch.randn(4, 4)}
    resolve_base(_message("v1", "h1", **{ARRAYS_RECORD: ArrayRecord(parent)}), ctx, "v1", "h1")
    assert BASE_STATE not in ctx.state and not ctx.state.array_records
    assert load_residual(ctx) is None
    residual = {"w": torch.randn(4, 4), "b": torch.randn(2).bfloat16()}
    save_residual(ctx, residual)
    back = load_residual(ctx)
    assert back is not None and all(torch.equal(back[k], residual[k]) for k in residual)


def test_a_version_over_the_cache_budget_is_read_back_from_the_node_state(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from fedmerge.flower.client import node_state, reply

    small = node_state.BaseCache(max_bytes=1024)
    monkeypatch.setattr(reply, "BASES", small)
    parent = {"w": torch.randn(64, 16), "b": torch.randn(16)}  # 4 KiB: over the budget
    nodes = [_context(1), _context(2)]
    for ctx in nodes:
        resolve_base(_message("v1", "h1", **{ARRAYS_RECORD: ArrayRecord(parent)}), ctx, "v1", "h1")
    content, child = _downlink(parent)
    for ctx in nodes:
        got = resolve_base(content, ctx, "v2", "h2")
        assert all(torch.equal(got[k], child[k]) for k in child)
        got["w"].zero_()  # the caller's own tensors
    assert small.get(weights_digest(child)) is None
    assert torch.equal(resolve_base(_message("v2", "h2"), nodes[0], "v2", "h2")["w"], child["w"])
    assert small.put("x", {"w": torch.zeros(2)}, b"12") and small.get("x") is not None
