"""Every floating dtype a real checkpoint uses (fp32, bf16, fp16) through the round engine: the
``"arrays"`` convention of :mod:`fedmerge.flower.records` (bf16 widened to fp32, named in
``"fedmerge.dtypes"``), dense replies judged against the widened base, versions that keep the base's
dtype, and replies whose bytes do not match their header rejected while the round goes on."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord

from fedmerge.flower.records import (
    DTYPES_RECORD,
    DtypeRecordError,
    dtypes_of,
    narrow_from_numpy,
    widen_for_numpy,
)


def _weights() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "bf": torch.randn(5, 3, generator=g).to(torch.bfloat16),
        "half": torch.randn(4, generator=g).to(torch.float16),
        "full": torch.randn(2, 2, generator=g),
        "steps": torch.arange(3),
    }


def test_widening_is_lossless_and_names_only_the_widened_tensors() -> None:
    weights = _weights()
    wide, dtypes = widen_for_numpy(weights)
    assert dtypes == {"bf": "bfloat16"}
    assert wide["bf"].dtype == torch.float32 and wide["half"].dtype == torch.float16
    assert wide["full"] is weights["full"] and wide["steps"] is weights["steps"]
    # through Flower's own Array (numpy) and back: bit-identical bf16
    record = ArrayRecord(wide)
    back = {k: torch.from_numpy(a.numpy().copy()) for k, a in record.items()}
    narrowed = narrow_from_numpy(back, dtypes_of(ConfigRecord(dtypes), back))
    for name, tensor in weights.items():
        assert narrowed[name].dtype == tensor.dtype
        assert torch.equal(narrowed[name], tensor), name


def test_nothing_widened_means_no_record() -> None:
    weights = {k: v for k, v in _weights().items() if k != "bf"}
    assert widen_for_numpy(weights)[1] == {}
    assert dtypes_of(None, weights) == {}


@pytest.mark.parametrize(
    ("record", "match"),
    [
        ({"ghost": "bfloat16"}, "'ghost', which is not a tensor"),
        ({"bf": "float8"}, "dtype 'float8'"),
        ({"bf": 3}, "dtype '3'"),
    ],
)
def test_a_bad_dtypes_record_is_one_clear_error(record: dict[str, object], match: str) -> None:
    with pytest.raises(DtypeRecordError, match=match) as info:
        dtypes_of(ConfigRecord(record), _weights())  # type: ignore[arg-type]
    assert DTYPES_RECORD in str(info.value)


# ----------------------------------------------------------------------- rounds on a real store


def _base(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    shapes = {"fc1.weight": (12, 8), "fc1.bias": (12,), "fc2.weight": (3, 12), "fc2.bias": (3,)}
    return {n: (0.5 * torch.randn(s, generator=g)).to(dtype) for n, s in shapes.items()}


def _client_delta(node_id: int, name: str, shape: tuple[int, ...]) -> torch.Tensor:
    g = torch.Generator().manual_seed(node_id * 1000 + sum(map(ord, name)))
    return 0.01 * torch.randn(shape, generator=g)


def _plain_app(seen: dict[int, dict[str, Any]], lie: set[int] = frozenset()) -> Any:  # type: ignore[assignment]
    """A ClientApp written with Flower's API only: loads "arrays" with numpy, adds a fixed step in
    fp32 and replies fp32 weights; nodes in ``lie`` send bf16 bytes under a float32 header."""
    from flwr.app import Array, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp

    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        arrays = msg.content.array_records["arrays"]
        dtypes = msg.content.config_records.get(DTYPES_RECORD)
        seen[context.node_id] = {
            "dtypes": {k: a.dtype for k, a in arrays.items()},
            "record": None if dtypes is None else dict(dtypes),
        }
        out = {}
        for name, array in arrays.items():
            w = torch.from_numpy(array.numpy().copy()).float()
            w = w + _client_delta(context.node_id, name, tuple(w.shape))
            if context.node_id in lie:  # bf16 bytes under the .npy header of a float32 array
                header = Array(w.numpy()).data[: -w.numel() * 4]
                raw = w.to(torch.bfloat16).view(torch.int16).numpy().tobytes()
                out[name] = Array(dtype="float32", shape=tuple(w.shape), stype="numpy.ndarray",
                                  data=header + raw)  # fmt: skip
            else:
                out[name] = Array(w.numpy())
        content = RecordDict({"arrays": ArrayRecord(out), "metrics": MetricRecord({"num-examples": 10})})
        return Message(content, reply_to=msg)

    return app


pytestmark = pytest.mark.usefixtures("server_identity")


def _federation(tmp_path: Path, base: dict[str, torch.Tensor], app: Any, nodes: int) -> Any:
    from fedmerge.flower.config import parse_run_config
    from fedmerge.flower.server.federation import Federation, ensure_base
    from fedmerge.store import ModelStore
    from fedmerge_simulations.secagg import InProcessGrid

    cfg = parse_run_config(
        {
            "store": str(tmp_path / "store"),
            "aggregator": "fedavg",
            "min-clients": nodes,
            "min-valid": 2,
            "num-rounds": 1,
            "server-eval": False,
            "wait-for-nodes-s": 0.0,
        }
    )
    store = ModelStore.open(cfg.store)
    ensure_base(store, lambda: base, name="mlp")
    return Federation(InProcessGrid(app, nodes), cfg, store)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_a_plain_client_round_keeps_the_base_dtype(tmp_path: Path, dtype: torch.dtype) -> None:
    base = _base(dtype)
    seen: dict[int, dict[str, Any]] = {}
    fed = _federation(tmp_path, base, _plain_app(seen), nodes=3)
    evaluated: dict[str, torch.Tensor] = {}
    fed.evaluate = lambda weights: evaluated.update(weights) or {"score": 1.0}  # server-side evaluation
    with fed.store:
        (report,) = fed.run()
        assert report.version_id is not None and len(report.accepted) == 3, report.outcomes
        merged = fed.store.materialize(fed.store.get(report.version_id))
    # the server evaluates exactly the weights it commits
    assert all(torch.equal(evaluated[n], merged[n]) for n in merged) and report.metrics["server-score"] == 1.0
    sent = "float32" if dtype == torch.bfloat16 else str(dtype).removeprefix("torch.")
    for info in seen.values():
        assert set(info["dtypes"].values()) == {sent}
        assert info["record"] == ({n: "bfloat16" for n in base} if dtype == torch.bfloat16 else None)
    # the reference: mean of the fp32 deltas against the widened base, cast to the base dtype once
    for name, tensor in base.items():
        mean = sum(_client_delta(node, name, tuple(tensor.shape)) for node in seen) / 3
        expected = (tensor.float() + mean).to(dtype)
        assert merged[name].dtype == dtype
        torch.testing.assert_close(merged[name], expected, rtol=0, atol=0 if dtype != torch.float32 else 1e-6)
    # downlink counts the bytes that travelled: fp32 for a widened bf16 base
    per_node = sum(t.numel() * (4 if dtype == torch.bfloat16 else t.element_size()) for t in base.values())
    assert report.downlink_bytes == 3 * per_node


def test_bf16_bytes_under_a_float32_header_are_rejected_and_the_round_goes_on(tmp_path: Path) -> None:
    fed = _federation(tmp_path, _base(torch.bfloat16), _plain_app({}, lie={1001}), nodes=3)
    with fed.store:
        (report,) = fed.run()
    assert report.version_id is not None and len(report.accepted) == 2
    (bad,) = report.rejected
    assert bad.node_id == 1001
    assert "PayloadSizeMismatch" in str(bad.reason) and "float32" in str(bad.reason)


def _package_app(shapes: dict[str, tuple[int, ...]], values: str) -> Any:
    """A ClientApp replying fedmerge packages (dense, ``values`` encoded) against whatever base the
    message names: nodes hold their base as fedmerge clients do, so later rounds send no weights."""
    from flwr.app import Context, Message, MetricRecord
    from flwr.clientapp import ClientApp

    from fedmerge.codec import CodecConfig, PackageMeta, encode_package
    from fedmerge.flower.records import FEDMERGE_RECORD
    from fedmerge.flower.transport import package_to_record

    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        extras = msg.content.config_records[FEDMERGE_RECORD]
        round_ = int(extras["round"])
        delta = {n: _client_delta(context.node_id + 10 * round_, n, s) for n, s in shapes.items()}
        meta = PackageMeta(f"c{context.node_id}", round_, str(extras["base-version-id"]),
                           str(extras["base-version-hash"]), num_examples=10)  # fmt: skip
        codec = CodecConfig(sparsify="none", density=1.0, values=values, error_feedback=False)  # type: ignore[arg-type]
        content = package_to_record(encode_package(delta, codec, meta=meta).data)
        content["metrics"] = MetricRecord({"num-examples": 10})
        return Message(content, reply_to=msg)

    return app


@pytest.mark.parametrize(
    "overrides",
    [{}, {"downlink-density": 0.5, "downlink-values": "bf16"}, {"server-optimizer": "adam"}],
    ids=["plain", "compressed-downlink", "server-adam"],
)
def test_fedmerge_packages_on_a_bf16_base_over_rounds(tmp_path: Path, overrides: dict[str, Any]) -> None:
    from fedmerge.flower.config import parse_run_config
    from fedmerge.flower.server.federation import Federation, ensure_base
    from fedmerge.store import ModelStore
    from fedmerge_simulations.secagg import InProcessGrid

    base = _base(torch.bfloat16)
    shapes = {n: tuple(t.shape) for n, t in base.items()}
    cfg = parse_run_config(
        {"store": str(tmp_path / "store"), "aggregator": "fedavg", "min-clients": 3, "min-valid": 3,
         "num-rounds": 3, "server-eval": False, "wait-for-nodes-s": 0.0, **overrides}
    )  # fmt: skip
    with ModelStore.open(cfg.store) as store:
        ensure_base(store, lambda: base, name="mlp")
        reports = Federation(InProcessGrid(_package_app(shapes, "bf16"), 3), cfg, store).run()
        assert [len(r.accepted) for r in reports] == [3, 3, 3], [r.outcomes for r in reports]
        assert reports[0].downlink_bytes == 3 * sum(4 * t.numel() for t in base.values())  # widened once
        if "downlink-density" in overrides:  # holders of the parent get the compressed update instead
            assert reports[1].downlink_bytes < reports[0].downlink_bytes
        else:  # new weights every round: the new version, widened again
            assert reports[1].downlink_bytes == reports[0].downlink_bytes
        assert all(o.codec and o.codec["values"] == "bf16" for r in reports for o in r.outcomes)
        for report in reports:
            weights = store.materialize(store.get(str(report.version_id)))
            assert {t.dtype for t in weights.values()} == {torch.bfloat16}
            assert all(bool(torch.isfinite(t).all()) for t in weights.values())


def test_a_reply_with_a_bad_dtypes_record_is_rejected_with_its_reason(tmp_path: Path) -> None:
    from flwr.app import Message, MetricRecord, RecordDict

    from fedmerge.flower.config import parse_run_config
    from fedmerge.flower.server.federation import ensure_base
    from fedmerge.flower.server.judge import RoundState
    from fedmerge.store import ModelStore
    from fedmerge_testing.hostile import train_message

    base = _base(torch.bfloat16)
    cfg = parse_run_config({"store": str(tmp_path / "s"), "aggregator": "fedavg", "server-eval": False})
    with ModelStore.open(cfg.store) as store:
        version = ensure_base(store, lambda: base, name="mlp")
    state = RoundState(cfg, 1, version, base)
    wide, widened = widen_for_numpy(base)

    def reply(dtypes: dict[str, Any] | None) -> Message:
        content = RecordDict({"arrays": ArrayRecord({k: v + 0.01 for k, v in wide.items()}),
                              "metrics": MetricRecord({"num-examples": 5})})  # fmt: skip
        if dtypes is not None:
            content[DTYPES_RECORD] = ConfigRecord(dtypes)
        return Message(content, reply_to=train_message(7))

    bad = state.judge(7, reply({"fc1.weight": "float8"}))
    assert not bad.accepted and "StaleOrInvalid" in str(bad.reason) and "'float8'" in str(bad.reason)
    ghost = state.judge(8, reply({"ghost": "bfloat16"}))
    assert not ghost.accepted and "'ghost', which is not a tensor" in str(ghost.reason)
    ok = state.judge(9, reply(widened))
    assert ok.accepted, ok.reason
