"""Packages inside Flower RecordDicts, and plain dense ArrayRecords turned into task vectors."""

from __future__ import annotations

import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from flwr.common.serde import ProtoRecordDict, recorddict_from_proto, recorddict_to_proto

from fedmerge.codec import (
    CodecConfig,
    PackageError,
    PackageMeta,
    TensorShapeMismatch,
    decode_package,
    encode_package,
)
from fedmerge.flower.transport import (
    STYPE,
    MissingPackage,
    dense_record_to_task_vector,
    package_to_record,
    record_to_package,
)


def test_package_survives_a_flower_message(delta: dict[str, torch.Tensor], meta: PackageMeta) -> None:
    data = encode_package(delta, CodecConfig(), meta=meta).data
    rd = package_to_record(data)
    rd["config"] = ConfigRecord({"note": "x"})
    wire = recorddict_to_proto(rd).SerializeToString()  # what Flower puts on the wire
    back = recorddict_from_proto(ProtoRecordDict.FromString(wire))
    assert record_to_package(back) == data
    array = back.array_records["fedmerge.delta"]["package"]
    assert array.stype == STYPE
    with pytest.raises(TypeError):
        array.numpy()
    assert set(decode_package(record_to_package(rd)).tensors) == set(delta)


def test_missing_or_foreign_payloads_are_refused() -> None:
    with pytest.raises(MissingPackage, match=r"fedmerge.delta"):
        record_to_package(RecordDict({"arrays": ArrayRecord({"w": Array(torch.zeros(2).numpy())})}))
    foreign = RecordDict({"fedmerge.delta": ArrayRecord({"package": Array(torch.zeros(2).numpy())})})
    with pytest.raises(MissingPackage, match=r"stype"):
        record_to_package(foreign)


def test_dense_reply_becomes_a_task_vector() -> None:
    base = {"w": torch.zeros(3, 2), "b": torch.ones(2), "steps": torch.tensor(4)}
    reply = {"w": torch.full((3, 2), 0.5), "b": torch.ones(2) * 3, "steps": torch.tensor(5)}
    tv = dense_record_to_task_vector(RecordDict({"arrays": ArrayRecord(reply)}), base)
    assert set(tv) == {"w", "b"}
    assert torch.equal(tv["w"], reply["w"]) and torch.equal(tv["b"], torch.full((2,), 2.0))


def test_dense_reply_must_match_the_base() -> None:
    base = {"w": torch.zeros(3, 2)}
    with pytest.raises(TensorShapeMismatch, match=r"'w'"):
        dense_record_to_task_vector(RecordDict({"a": ArrayRecord({"w": torch.zeros(2, 3)})}), base)
    with pytest.raises(PackageError, match=r"'w'.*NaN"):
        dense_record_to_task_vector(
            RecordDict({"a": ArrayRecord({"w": torch.full((3, 2), float("nan"))})}), base
        )
