"""A node's base and residual in its node-local directory: ``context.state`` carries only identifiers,
and a node whose files are gone (another host, a cleared directory) or altered never trains on a
wrong base (``MissingBase``, then the full weights) and restarts error feedback at zero, saying so."""

from __future__ import annotations

import pickle
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict

from fedmerge.codec import CodecConfig, PackageMeta
from fedmerge.flower.client import node_state
from fedmerge.flower.client.node_state import (
    BASES,
    STATE_DIR_ENV,
    STATE_DIR_KEY,
    NodeFiles,
    node_files,
    pack_tensors,
)
from fedmerge.flower.client.reply import (
    BASE_META,
    BASE_STATE,
    RESIDUAL_LOST_METRIC,
    RESIDUAL_RECORD,
    MissingBase,
    encode_reply,
    load_residual,
    resolve_base,
    save_residual,
)
from fedmerge.flower.downlink import apply_weights, compress_update, weights_digest
from fedmerge.flower.records import (
    ARRAYS_RECORD,
    CONFIG_RECORD,
    FEDMERGE_RECORD,
    METRICS_RECORD,
    UPDATE_META_RECORD,
    UPDATE_RECORD,
)
from fedmerge.flower.transport import RECORD_KEY, package_to_record

CODEC = CodecConfig(density=0.2, values="int4", error_feedback=True)


@pytest.fixture(autouse=True)
def node_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    root = tmp_path / "node-state"
    monkeypatch.setenv(STATE_DIR_ENV, str(root))
    BASES.clear()
    yield root
    BASES.clear()


def _context(node: int, run: int = 7, **node_config: str) -> Context:
    return Context(run_id=run, node_id=node, node_config=dict(node_config), state=RecordDict(), run_config={})


def _message(version: str, version_hash: str, **records: object) -> RecordDict:
    conf = ConfigRecord({"round": 1, "base-version-id": version, "base-version-hash": version_hash})
    return RecordDict({CONFIG_RECORD: conf, FEDMERGE_RECORD: ConfigRecord({}), **records})  # type: ignore[dict-item]


def _weights(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(64, 16, generator=g), "b": torch.randn(16, generator=g).half()}


def _full(weights: dict[str, torch.Tensor], version: str = "v1") -> RecordDict:
    return _message(version, f"h-{version}", **{ARRAYS_RECORD: ArrayRecord(weights)})


def _downlink(parent: dict[str, torch.Tensor]) -> tuple[RecordDict, dict[str, torch.Tensor]]:
    update = {k: 0.01 * torch.randn_like(v.float()).to(v.dtype) for k, v in parent.items()}
    meta = PackageMeta(client_id="server", round=1, base_version_id="v1", base_version_hash="h-v1")
    package, applied, _ = compress_update(update, None, CodecConfig(density=0.2, values="int4"), meta)
    child = apply_weights(parent, applied)
    info = ConfigRecord({"parent-version-id": "v1", "digest": weights_digest(child)})
    content = _message(
        "v2", "h-v2", **{UPDATE_RECORD: package_to_record(package)[RECORD_KEY], UPDATE_META_RECORD: info}
    )
    return content, child


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return sorted(a) == sorted(b) and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in b)


def test_context_state_carries_identifiers_only() -> None:
    ctx = _context(1)
    parent = _weights()
    resolve_base(_full(parent), ctx, "v1", "h-v1")
    content, child = _downlink(parent)
    resolve_base(content, ctx, "v2", "h-v2")
    save_residual(ctx, {"w": torch.randn(64, 16)})
    assert all(isinstance(r, ConfigRecord) for r in ctx.state.values()), sorted(ctx.state)
    assert len(pickle.dumps(ctx)) < 2048  # what Ray moves with every message (the base is 4.2 kB)
    BASES.clear()  # another process of the same host: read back from the directory, digest checked
    node_files({}).forget()
    assert _equal(resolve_base(_message("v2", "h-v2"), ctx, "v2", "h-v2"), child)


def test_a_node_without_its_files_is_refused_then_takes_the_full_weights(tmp_path: Path) -> None:
    parent = _weights()
    ctx = _context(1)
    resolve_base(_full(parent), ctx, "v1", "h-v1")
    content, child = _downlink(parent)
    BASES.clear()
    # the same node's context, run on a host whose node-local directory is another one
    moved = Context(1, 1, {STATE_DIR_KEY: str(tmp_path / "other-host")}, ctx.state, {})
    with pytest.raises(MissingBase, match="neither in this process nor in its node-local directory"):
        resolve_base(content, moved, "v2", "h-v2")
    with pytest.raises(MissingBase):
        resolve_base(_message("v1", "h-v1"), moved, "v1", "h-v1")
    assert moved.state.config_records[BASE_META]["version-id"] == "v1"  # nothing replaced
    # the server's next attempt sends the weights: the node continues from them
    assert _equal(resolve_base(_full(child, "v2"), moved, "v2", "h-v2"), child)


def test_an_altered_base_file_is_never_used(node_dir: Path) -> None:
    parent = _weights()
    ctx = _context(1)
    resolve_base(_full(parent), ctx, "v1", "h-v1")
    (path,) = (node_dir / "bases").iterdir()
    assert path.name.startswith(weights_digest(parent))
    path.write_bytes(pack_tensors(_weights(seed=1)))  # well formed, other weights
    BASES.clear()
    with pytest.raises(MissingBase):
        resolve_base(_message("v1", "h-v1"), ctx, "v1", "h-v1")
    path.write_bytes(b"not a packed blob")
    with pytest.raises(MissingBase):
        resolve_base(_message("v1", "h-v1"), ctx, "v1", "h-v1")


def test_a_base_the_directory_does_not_take_stays_in_the_context_state(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    small = NodeFiles(Path("unused"), max_bytes=1024)  # the 4.2 kB base is over its limit
    monkeypatch.setattr(node_state, "_FILES", {})
    monkeypatch.setattr("fedmerge.flower.client.reply.node_files", lambda _config: small)
    parent = _weights()
    ctx = _context(1)
    resolve_base(_full(parent), ctx, "v1", "h-v1")
    assert list(ctx.state.array_records) == [BASE_STATE]
    BASES.clear()
    assert _equal(resolve_base(_message("v1", "h-v1"), ctx, "v1", "h-v1"), parent)


def _encode(ctx: Context, delta: dict[str, torch.Tensor]) -> tuple[bytes, dict[str, float]]:
    meta = PackageMeta(client_id="c", round=2, base_version_id="v1", base_version_hash="h-v1", num_examples=3)
    content, result = encode_reply(delta, CODEC, meta, ctx, {"train-loss": 0.5})
    return result.data, dict(content[METRICS_RECORD])  # type: ignore[arg-type]


def test_a_lost_residual_restarts_error_feedback_at_zero_and_says_so(node_dir: Path) -> None:
    g = torch.Generator().manual_seed(3)
    first = {"w": torch.randn(64, 16, generator=g)}
    second = {"w": torch.randn(64, 16, generator=g)}
    ctx, fresh = _context(1), _context(2)
    _, metrics = _encode(ctx, first)
    assert RESIDUAL_LOST_METRIC not in metrics and isinstance(ctx.state[RESIDUAL_RECORD], ConfigRecord)
    kept = load_residual(ctx)
    assert kept is not None and kept["w"].abs().sum() > 0
    with_residual, metrics = _encode(_copy(ctx), second)  # the residual is used
    assert RESIDUAL_LOST_METRIC not in metrics
    from_zero, _ = _encode(fresh, second)
    assert with_residual != from_zero
    for path in (node_dir / "residuals").rglob("*.fmt"):
        path.unlink()  # the node's directory was cleared (or it runs on another host)
    node_files({}).forget()  # and in another process
    lost, metrics = _encode(ctx, second)
    assert metrics[RESIDUAL_LOST_METRIC] == 1.0
    assert lost == from_zero  # exactly the encoding of a node without a residual
    assert load_residual(ctx) is not None  # the new residual is kept again


def test_another_nodes_or_runs_residual_is_never_taken(node_dir: Path) -> None:
    a, b, other_run = _context(1), _context(2), _context(1, run=8)
    save_residual(a, {"w": torch.ones(3)})
    save_residual(b, {"w": 2 * torch.ones(3)})
    assert load_residual(other_run) is None
    other_run.state[RESIDUAL_RECORD] = a.state[RESIDUAL_RECORD]  # the same sha, another run's directory
    assert load_residual(other_run) is None
    b.state[RESIDUAL_RECORD] = a.state[RESIDUAL_RECORD]  # another node's name: not in b's files
    assert load_residual(b) is None
    (path,) = (node_dir / "residuals" / "7").glob("1-*.fmt")
    path.write_bytes(pack_tensors({"w": torch.zeros(3)}))  # altered: its sha256 no longer matches
    assert load_residual(a) is not None  # this process wrote it: it remembers the bytes
    node_files({}).forget()  # another process reads the file
    assert load_residual(a) is None


def test_a_node_keeps_at_most_two_residual_files(node_dir: Path) -> None:
    ctx = _context(1)
    for i in range(5):
        save_residual(ctx, {"w": float(i) * torch.ones(3)})
    assert len(list((node_dir / "residuals" / "7").glob("1-*.fmt"))) == 2
    node_files({}).forget()
    back = load_residual(ctx)
    assert back is not None and torch.equal(back["w"], 4.0 * torch.ones(3))


def test_a_reply_that_was_not_delivered_leaves_the_previous_residual_readable() -> None:
    ctx = _context(1)
    save_residual(ctx, {"w": torch.ones(3)})
    before = _copy(ctx)  # the state Flower keeps when the next reply fails
    save_residual(ctx, {"w": 2 * torch.ones(3)})
    save_residual(_copy(before), {"w": 5 * torch.ones(3)})  # a retry from the kept state
    back = load_residual(before)
    assert back is not None and torch.equal(back["w"], torch.ones(3))


def _copy(ctx: Context) -> Context:
    return Context(ctx.run_id, ctx.node_id, dict(ctx.node_config), RecordDict(dict(ctx.state.items())), {})


def test_a_residual_over_the_file_limit_stays_in_the_context_state(
    monkeypatch: pytest.MonkeyPatch, node_dir: Path
) -> None:
    small = NodeFiles(node_dir, max_residual_bytes=1024)
    monkeypatch.setattr("fedmerge.flower.client.reply.node_files", lambda _config: small)
    ctx = _context(1)
    residual = {"w": torch.randn(64, 16)}  # 4 kB
    save_residual(ctx, residual)
    assert isinstance(ctx.state[RESIDUAL_RECORD], ArrayRecord) and not (node_dir / "residuals").exists()
    back = load_residual(ctx)
    assert back is not None and torch.equal(back["w"], residual["w"])
